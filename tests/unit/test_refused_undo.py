"""The undo of a write or trim some replicas refused for want of space, when other things go
wrong around it: a catch-up planned before the undo lowered its start, Meta failing during
the undo or during the refused write's own drop, a source sector failing its checksum, a
target (or the refusing replica of a trim) without room. The replicas that stay valid must
end up agreeing, with every acknowledged write, and a full disk must not cost a copy."""

from __future__ import annotations

import asyncio
import contextlib
import errno
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from aecp.common.errors import Unavailable
from aecp.storage.access import VolumeDevice
from aecp.storage.blockdev import NoSpace
from aecp.storage.chunk.errors import ChunkIOError, ReplicaUnavailable
from aecp.storage.recovery import RecoveryPolicy, Repairer
from tests.unit.abskit import BLOCK, EXTENT, Cluster
from tests.unit.test_refused_writes import (
    agree,
    catch_up,
    fill_up,
    hook,
    lose_answers,
    written,
)


def repairer(cluster: Cluster, dev: VolumeDevice) -> Repairer:
    return Repairer(dev, RecoveryPolicy(60, 1e12), cluster.board)


def no_room() -> ChunkIOError:
    return ChunkIOError("no space left on device", errno.ENOSPC)


def fail_lowerings(cluster: Cluster) -> Any:
    """Make Meta fail every drop that drops no valid replica (it only lowers stale ones'
    catch-up); returns the real ``drop_replicas``."""
    real = cluster.meta.drop_replicas

    async def drop(ext_id: str, nodes: list[str], **kw: Any) -> Any:
        ext, _ = await cluster.meta.extent(ext_id)
        if not set(nodes) & set(ext.replicas):
            raise Unavailable("etcd: deadline exceeded")
        return await real(ext_id, nodes, **kw)

    cluster.meta.drop_replicas = drop  # type: ignore[method-assign]
    return real


async def stale_with_a_block_nobody_else_has(
    cluster: Cluster,
) -> tuple[VolumeDevice, str, str, int]:
    """Volume ``v`` (two replicas, blocks 0-1 written), the replica not on n1 dropped at
    generation g, then given block 1 of 0x99 under g, as a refused write it took would be:
    (the access point, the extent, that replica's node, g)."""
    dev, ext_id, replicas = await written(cluster, data=b"\x11" * 2 * BLOCK)
    x = next(n for n in replicas if n != "n1")
    ext = await cluster.meta.drop_replicas(ext_id, [x])
    g = ext.stale[x]
    await cluster.replicas[x].store.write(
        ext_id, BLOCK, b"\x99" * 4096, epoch=dev.epoch, generation=g
    )
    return dev, ext_id, x, g


async def n1_full(cluster: Cluster) -> tuple[VolumeDevice, str, str]:
    """Volume ``v`` (two replicas, blocks 0-1 of its first extent written), then no room
    left on n1 for a new block: (the access point, the extent, the other replica's node)."""
    dev, ext_id, replicas = await written(cluster, size=2 * EXTENT, data=b"\x11" * 2 * BLOCK)
    fill_up(cluster.replicas["n1"].store)
    return dev, ext_id, next(n for n in replicas if n != "n1")


@contextlib.contextmanager
def meta_down_for_undos(dev: VolumeDevice) -> Iterator[None]:
    """Inside the block, the undo cannot read the extent's record (Meta does not answer)."""
    real = dev.current

    async def meta_down(e: str) -> Any:
        raise Unavailable("etcd: deadline exceeded")

    dev.current = meta_down  # type: ignore[method-assign]
    try:
        yield
    finally:
        dev.current = real  # type: ignore[method-assign]


# ---- 1: a catch-up and the undo that lowers its start ------------------------------------------


async def test_a_catch_up_planned_before_an_undo_lowered_it_still_copies_the_refused_write_back(
    cluster: Cluster,
) -> None:
    # W (refused by the full n1) was taken by x; W2 then dropped x and was acknowledged by n1.
    # A recovery pass read x's catch-up start before the undo lowered it, waited for the undo,
    # copied from the old start and admitted x with W's bytes over the acknowledged 0x11.
    dev, ext_id, x = await n1_full(cluster)  # block 2 needs space on n1
    n1, rx = cluster.replicas["n1"], cluster.replicas[x]
    refused = asyncio.Event()

    async def n1_write(e: str, offset: int, data: Any, **kw: Any) -> None:
        try:
            await n1.write(e, offset, data, **kw)
        except ChunkIOError:
            refused.set()
            raise

    async def x_write(e: str, offset: int, data: Any, **kw: Any) -> None:
        if bytes(data[:1]) == b"\x77":  # W2 fails on x once n1 refused W
            await refused.wait()
            raise ReplicaUnavailable(x, "connection reset")
        await rx.write(e, offset, data, **kw)

    hook(cluster, "n1", "write", n1_write)
    hook(cluster, x, "write", x_write)
    passes: list[asyncio.Future[list[str]]] = []
    real_current = dev.current

    dropped, real_drop = asyncio.Event(), dev.drop

    async def drop(*args: Any, **kw: Any) -> None:
        await real_drop(*args, **kw)
        dropped.set()  # W2 dropped x: x is stale in Meta

    async def current(e: str) -> Any:  # the undo's first read: a recovery pass starts now
        await dropped.wait()
        cluster.pool.add(x, rx)  # type: ignore[arg-type]  # x answers again
        rep, read = repairer(cluster, dev), asyncio.Event()
        real_from = rep._catch_up_from

        async def catch_up_from(ext: str, node: str) -> int:
            since = await real_from(ext, node)
            read.set()  # the pass has read x's start: the undo may lower it now
            return since

        rep._catch_up_from = catch_up_from  # type: ignore[method-assign]
        passes.append(asyncio.ensure_future(rep.run_pass()))
        reading = asyncio.ensure_future(read.wait())
        await asyncio.wait([reading, passes[-1]], return_when=asyncio.FIRST_COMPLETED)
        reading.cancel()  # (a pass that ended without reading fails the test below)
        return await real_current(e)

    dev.drop = drop  # type: ignore[method-assign]

    dev.current = current  # type: ignore[method-assign]
    w = asyncio.ensure_future(dev.write(0, b"\x66" * 3 * BLOCK))
    w2 = asyncio.ensure_future(dev.write(8192, b"\x77" * 4096))
    with pytest.raises(NoSpace):
        await w
    await w2
    [sentence] = await passes[0]
    assert f"{x} caught up" in sentence
    assert await agree(cluster, ext_id, ["n1", x])
    assert await rx.store.read(ext_id, BLOCK, 4096) == b"\x11" * 4096
    await dev.close()


async def test_a_catch_up_starts_from_the_generation_meta_holds_once_its_join_has_begun(
    cluster: Cluster,
) -> None:
    # The start was read as the pass began: a lowering between then and the join was missed.
    dev, ext_id, x, g = await stale_with_a_block_nobody_else_has(cluster)
    real_begin = dev.begin_join

    async def begin_join(e: str, node: str) -> None:
        await cluster.meta.drop_replicas(e, [node], missed_from=g - 1)  # an undo lowers it
        await real_begin(e, node)

    dev.begin_join = begin_join  # type: ignore[method-assign]
    [sentence] = await repairer(cluster, dev).run_pass()
    assert f"{x} caught up" in sentence and f"since generation {g - 1}" in sentence
    assert await agree(cluster, ext_id, ["n1", x])
    await dev.close()


async def test_a_catch_up_whose_start_is_lowered_during_its_copy_is_not_admitted(
    cluster: Cluster,
) -> None:
    # Admission checked only that the node was still stale, not from where it had to copy.
    dev, ext_id, x, g = await stale_with_a_block_nobody_else_has(cluster)
    real_end = dev.end_join

    async def end_join(e: str, admit: Any) -> None:  # the copy is done: an undo lowers it
        await cluster.meta.drop_replicas(ext_id, [x], missed_from=g - 1)
        await real_end(e, admit)

    dev.end_join = end_join  # type: ignore[method-assign]
    [sentence] = await repairer(cluster, dev).run_pass()
    assert "repair failed" in sentence and "not admitted" in sentence
    ext, _ = await cluster.meta.extent(ext_id)
    assert ext.stale == {x: g - 1}
    dev.end_join = real_end  # type: ignore[method-assign]
    [sentence] = await repairer(cluster, dev).run_pass()  # the next pass copies from g - 1
    assert f"{x} caught up" in sentence
    assert await agree(cluster, ext_id, ["n1", x])
    await dev.close()


# ---- 2: Meta failing during the refusal ---------------------------------------------------------


async def refused_once_x_is_dropped(
    cluster: Cluster, dev: VolumeDevice, x: str, offset: int, length: int
) -> None:
    """W (``length`` bytes of 0x66 at ``offset``, needing a new block on the full n1) is
    taken by x; W2 (0x77 at 8192) then drops x and is acknowledged by n1; only then does
    n1's refusal of W come back. Meta fails every lowering of a stale replica's catch-up
    meanwhile (the undo's). Returns with W refused, Meta as it was and x back in the pool."""
    n1, rx = cluster.replicas["n1"], cluster.replicas[x]
    x_dropped = asyncio.Event()

    async def n1_write(e: str, offset: int, data: Any, **kw: Any) -> None:
        if bytes(data[:1]) == b"\x66":  # W's refusal comes back once x is dropped
            await x_dropped.wait()
        await n1.write(e, offset, data, **kw)

    async def x_write(e: str, offset: int, data: Any, **kw: Any) -> None:
        if bytes(data[:1]) == b"\x77":
            raise ReplicaUnavailable(x, "connection reset")
        await rx.write(e, offset, data, **kw)

    hook(cluster, "n1", "write", n1_write)
    hook(cluster, x, "write", x_write)
    real_drop = fail_lowerings(cluster)
    lowering_fails = cluster.meta.drop_replicas

    async def drop(ext_id: str, nodes: list[str], **kw: Any) -> Any:
        try:
            return await lowering_fails(ext_id, nodes, **kw)
        finally:
            x_dropped.set()

    cluster.meta.drop_replicas = drop  # type: ignore[method-assign]
    w = asyncio.ensure_future(dev.write(offset, b"\x66" * length))
    await asyncio.sleep(0)
    await dev.write(8192, b"\x77" * 4096)  # x dropped, acknowledged by n1
    with pytest.raises(NoSpace):
        await w
    cluster.meta.drop_replicas = real_drop  # type: ignore[method-assign]
    cluster.pool.add("n1", n1)  # type: ignore[arg-type]
    cluster.pool.add(x, rx)  # type: ignore[arg-type]


async def test_an_undo_whose_lowering_meta_fails_still_has_the_dropped_replica_copy_the_range(
    cluster: Cluster,
) -> None:
    # x took W and was dropped by W2 before n1's refusal of W came back. The undo's lowering of
    # x's catch-up failed; the undo gave up, and x later kept W's bytes over acknowledged data.
    dev, ext_id, x = await n1_full(cluster)
    await refused_once_x_is_dropped(cluster, dev, x, 0, 3 * BLOCK)
    assert not dev.undos  # the undo is complete: the rewrite covers x's catch-up
    await dev.close()
    cluster.replicas["n1"].store.space.capacity = None
    [sentence] = await catch_up(cluster)
    assert f"{x} caught up" in sentence
    assert await agree(cluster, ext_id, ["n1", x])
    assert await cluster.replicas[x].store.read(ext_id, BLOCK, 4096) == b"\x11" * 4096


async def test_a_refused_write_whose_drop_meta_fails_still_answers_enospc_and_is_undone(
    cluster: Cluster,
) -> None:
    # n3 took the write but its answer was lost; dropping it failed in Meta, and that error
    # reached the client instead of ENOSPC: nothing was undone, n3 and n2 kept the write.
    dev, ext_id, _ = await written(cluster, replicas=3, data=b"\x11" * 2 * BLOCK)
    fill_up(cluster.replicas["n1"].store)
    lose_answers(cluster, "n3")
    real_drop = cluster.meta.drop_replicas

    async def drop(*a: Any, **kw: Any) -> Any:
        raise Unavailable("etcd: deadline exceeded")

    cluster.meta.drop_replicas = drop  # type: ignore[method-assign]
    with pytest.raises(NoSpace):
        await dev.write(0, b"\x66" * 3 * BLOCK)  # block 2 is new: refused by n1
    assert dev.undos  # n3 failed the undo too, and could not be dropped: pending
    cluster.meta.drop_replicas = real_drop  # type: ignore[method-assign]
    cluster.pool.add("n3", cluster.replicas["n3"])  # type: ignore[arg-type]
    [sentence] = await repairer(cluster, dev).run_pass()
    assert "was undone from n1" in sentence and "failed" not in sentence
    assert not dev.undos
    ext, _ = await cluster.meta.extent(ext_id)
    assert sorted(ext.replicas) == ["n1", "n2", "n3"] and ext.stale == {}
    assert await agree(cluster, ext_id, ["n1", "n2", "n3"])
    assert await dev.read(0, 3 * BLOCK) == b"\x11" * 2 * BLOCK + bytes(BLOCK)
    await dev.close()


async def test_a_replica_dropped_while_an_undo_is_pending_catches_up_from_before_the_write(
    cluster: Cluster,
) -> None:
    # The undo could not read Meta and was forgotten; x kept the refused write, and when a
    # later write dropped x, its catch-up started after the refused write's generation.
    dev, ext_id, x = await n1_full(cluster)
    g = (await cluster.meta.extent(ext_id))[0].generation
    with meta_down_for_undos(dev), pytest.raises(NoSpace):
        await dev.write(0, b"\x66" * 3 * BLOCK)
    assert dev.undos
    cluster.replicas[x].down = True
    await dev.write(BLOCK + 8192, b"\x22" * 4096)  # x is dropped (n1 has room in block 1)
    ext, _ = await cluster.meta.extent(ext_id)
    assert ext.stale == {x: g - 1}
    cluster.replicas[x].down = False
    sentences = await repairer(cluster, dev).run_pass()
    assert any("was undone" in s for s in sentences), sentences
    assert any(f"{x} caught up" in s for s in sentences), sentences
    assert await agree(cluster, ext_id, ["n1", x])
    await dev.close()


async def test_closing_an_access_point_tries_its_pending_undos_once_more(
    cluster: Cluster,
) -> None:
    dev, ext_id, x = await n1_full(cluster)
    with meta_down_for_undos(dev), pytest.raises(NoSpace):
        await dev.write(0, b"\x66" * 3 * BLOCK)
    replicas = ["n1", x]
    assert not await agree(cluster, ext_id, replicas)
    await dev.close()
    assert not dev.undos
    assert await agree(cluster, ext_id, replicas)


# ---- 3: a source sector failing its checksum ---------------------------------------------------


def corrupt(root: Path, ext_id: str, offset: int) -> None:
    """Damage one byte of the replica's data file at ``offset`` (its checksum then fails)."""
    [data] = list(root.rglob(f"{ext_id}.data"))
    with data.open("r+b") as f:
        f.seek(offset)
        f.write(b"\xff")


async def test_an_undo_whose_source_has_a_bad_sector_restores_from_its_readable_sectors(
    cluster: Cluster, tmp_path: Path
) -> None:
    # The refusing replica failed its checksum in the range: it was skipped, and the undo
    # said "all agree" while the other replica kept the refused write.
    dev, ext_id, replicas = await written(cluster, data=b"\x11" * 2 * BLOCK)
    other = next(n for n in replicas if n != "n1")
    n1 = cluster.replicas["n1"].store
    corrupt(tmp_path / "n1", ext_id, BLOCK + 100)  # sector 16, in block 1
    fill_up(n1)
    with pytest.raises(NoSpace):
        await dev.write(0, b"\x66" * 3 * BLOCK)
    assert not dev.undos
    assert await n1.scrub(ext_id) == []  # its bad sector was written whole, from the other
    assert await agree(cluster, ext_id, ["n1", other])
    expected = b"\x11" * BLOCK + b"\x66" * 4096 + b"\x11" * (BLOCK - 4096) + bytes(BLOCK)
    assert await dev.read(0, 3 * BLOCK) == expected
    await dev.close()


# ---- 4: no room for the undo --------------------------------------------------------------------


async def test_a_refused_trim_is_completed_on_the_replica_that_refused_it_not_refilled(
    cluster: Cluster,
) -> None:
    # The undo refilled the blocks the trim had emptied on the others: on a full disk that
    # refill failed and the replicas that took the trim were dropped.
    dev, ext_id, replicas = await written(cluster, data=b"\x11" * 2 * BLOCK)
    other = next(n for n in replicas if n != "n1")
    n1 = cluster.replicas["n1"]
    refusals = 1

    async def trim(*args: Any, **kw: Any) -> None:  # its disk refuses once, changing nothing
        nonlocal refusals
        if refusals:
            refusals -= 1
            raise no_room()
        await n1.trim(*args, **kw)

    async def refill(*args: Any, **kw: Any) -> None:
        raise AssertionError("the replica that took the trim is not refilled")

    hook(cluster, "n1", "trim", trim)
    hook(cluster, other, "write", refill)
    with pytest.raises(NoSpace):
        await dev.trim(BLOCK, BLOCK)
    assert not dev.undos
    assert await agree(cluster, ext_id, replicas)
    assert await n1.store.read(ext_id, BLOCK, BLOCK) == bytes(BLOCK)
    assert (await cluster.meta.extent(ext_id))[0].stale == {}
    await dev.close()


async def test_a_trim_undo_without_room_drops_no_replica_and_completes_when_room_appears(
    cluster: Cluster,
) -> None:
    dev, ext_id, replicas = await written(cluster, data=b"\x11" * 2 * BLOCK)

    async def trim(*args: Any, **kw: Any) -> None:
        raise no_room()

    hook(cluster, "n1", "trim", trim)
    with pytest.raises(NoSpace):
        await dev.trim(BLOCK, BLOCK)
    ext, _ = await cluster.meta.extent(ext_id)
    assert ext.replicas == replicas and ext.stale == {}
    assert dev.undos
    cluster.pool.add("n1", cluster.replicas["n1"])  # type: ignore[arg-type]  # room again
    [sentence] = await repairer(cluster, dev).run_pass()
    assert "was undone" in sentence and not dev.undos
    assert await agree(cluster, ext_id, replicas)
    assert await dev.read(0, 2 * BLOCK) == b"\x11" * BLOCK + bytes(BLOCK)
    assert (await cluster.meta.extent(ext_id))[0].stale == {}
    await dev.close()


async def test_an_undo_target_without_room_is_not_dropped_and_is_undone_later(
    cluster: Cluster,
) -> None:
    dev, ext_id, replicas = await written(cluster, data=b"\x11" * 2 * BLOCK)
    x = next(n for n in replicas if n != "n1")
    rx = cluster.replicas[x]
    fill_up(cluster.replicas["n1"].store)

    async def x_write(e: str, offset: int, data: Any, **kw: Any) -> None:
        if bytes(data[:1]) != b"\x66":  # the undo's writes find no room on x
            raise no_room()
        await rx.write(e, offset, data, **kw)

    hook(cluster, x, "write", x_write)
    with pytest.raises(NoSpace):
        await dev.write(0, b"\x66" * 3 * BLOCK)
    ext, _ = await cluster.meta.extent(ext_id)
    assert ext.replicas == replicas and ext.stale == {}
    assert dev.undos
    cluster.pool.add(x, rx)  # type: ignore[arg-type]
    await repairer(cluster, dev).run_pass()
    assert not dev.undos
    assert await agree(cluster, ext_id, replicas)
    await dev.close()
