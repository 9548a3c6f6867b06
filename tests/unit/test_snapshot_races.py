"""Snapshots of a running VM's volumes ordered against everything else: a snapshot whose
fencing failed leaves nothing a later snapshot would miss, a snapshot finishing late never
touches a namesake taken meanwhile, and copy-on-write waits for a write still in flight to the
extent it copies (two snapshots of one VM: ``test_vm_jobs``)."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from aecp.cluster.volumes import VolumeService
from aecp.common.errors import Conflict, StoreUnavailable, Unavailable
from aecp.storage.blockdev import Fenced
from aecp.storage.chunk.errors import ReplicaUnavailable
from aecp.storage.pool import ReplicaPool
from aecp.storage.snapshots import SnapshotService
from tests.unit._sync import run_ready
from tests.unit.abskit import BLOCK, EXTENT, Cluster
from tests.unit.test_recovery_races import Override, fence_fails, filled

AT = 12 * BLOCK


async def failed_then_taken(cluster: Cluster, again: bool = True) -> tuple[Any, str]:
    """``filled``; a snapshot that could fence nothing (failed, deleted again; the volume's
    extents count as shared now, but nothing was fenced), then, if ``again``, one that
    worked: (the access point, the extent)."""
    dev, ext_id, other = await filled(cluster)
    with pytest.raises(Unavailable):
        await SnapshotService(cluster.meta, fence_fails(cluster, {"n1", other})).snapshot(
            "v", "s1", paused_on="n1"
        )
    if again:
        await SnapshotService(cluster.meta, cluster.pool).snapshot("v", "s2", paused_on="n1")
    return dev, ext_id


async def test_a_snapshot_after_one_that_failed_to_fence_stays_as_taken(
    cluster: Cluster,
) -> None:
    dev, ext_id = await failed_then_taken(cluster)
    await dev.write(AT, b"A" * 4096)  # still under the old epoch: refused, copied on write
    assert await cluster.replicas["n1"].store.read(ext_id, AT, 4096) == b"\x11" * 4096
    assert await dev.read(AT, 4096) == b"A" * 4096


async def test_copy_on_write_waits_for_a_write_still_in_flight_to_the_extent(
    cluster: Cluster,
) -> None:
    dev, _ = await failed_then_taken(cluster, again=False)
    n1, held, go_on = cluster.replicas["n1"], asyncio.Event(), asyncio.Event()
    copying = asyncio.Event()

    async def held_write(ext: str, offset: int, *args: Any, **kw: Any) -> Any:
        if offset == AT:
            held.set()
            await go_on.wait()
        return await n1.write(ext, offset, *args, **kw)

    async def ping(*args: Any) -> Any:  # the copy on write's last step before it waits
        answer = await n1.ping(*args)
        copying.set()
        return answer

    cluster.pool.add("n1", Override(Override(n1, "write", held_write), "ping", ping))  # type: ignore[arg-type]
    first = asyncio.ensure_future(dev.write(AT, b"W" * 4096))  # in place: nothing refuses it
    await held.wait()
    vol, rev = await cluster.meta.volume("v")
    dev.refresh(vol, rev, {})  # the recovery loop's next pass: the extent is shared now
    second = asyncio.ensure_future(dev.write(AT + 2 * BLOCK, b"X" * 4096))  # copies on write
    await copying.wait()  # it found its source replica
    await run_ready()  # and waits for the write in flight (no I/O before that)
    go_on.set()
    await asyncio.gather(first, second)
    assert await dev.read(AT, 4096) == b"W" * 4096


def fence_held(
    cluster: Cluster, node: str, fail: bool
) -> tuple[ReplicaPool, asyncio.Event, asyncio.Event]:
    """A pool whose fence on ``node`` waits for ``go_on`` (then fails if ``fail``); with
    ``fail``, the other nodes' fences fail at once: (the pool, held: set once that fence
    waits, go_on)."""
    pool, held, go_on = ReplicaPool(cluster.meta), asyncio.Event(), asyncio.Event()
    for name, client in cluster.replicas.items():

        async def fence(*args: Any, _c: Any = client, _held: bool = name == node) -> Any:
            if _held:
                held.set()
                await go_on.wait()
            if fail:
                raise ReplicaUnavailable("-", "no answer")
            return await _c.fence(*args)

        pool.add(name, Override(client, "fence", fence))  # type: ignore[arg-type]
    return pool, held, go_on


@pytest.mark.parametrize("fails", [True, False], ids=["late-failure", "late-success"])
async def test_a_snapshot_finishing_late_leaves_a_namesake_taken_meanwhile_alone(
    cluster: Cluster, fails: bool
) -> None:
    _, _, other = await filled(cluster)
    pool, held, go_on = fence_held(cluster, other, fails)
    first = asyncio.ensure_future(SnapshotService(cluster.meta, pool).snapshot("v", "s", "n1"))
    await held.wait()  # taken, not ready: its fence of `other` hangs
    snaps = SnapshotService(cluster.meta, cluster.pool)
    await snaps.delete("v", "s")  # the operator deletes the not-ready one, takes it again
    again = await snaps.snapshot("v", "s", paused_on="n1")
    go_on.set()
    with pytest.raises(Unavailable if fails else Conflict):
        await first
    [now] = await snaps.snapshots("v")
    assert now.uid == again.uid and now.ready


async def test_an_extent_an_earlier_snapshot_fenced_does_not_fail_the_next_one(
    cluster: Cluster,
) -> None:
    await cluster.meta.create_volume("v", 2 * EXTENT, replicas=2)
    dev = await cluster.open("v", "n1")
    await dev.write(0, b"\x11" * 4096)
    await dev.write(EXTENT, b"\x22" * 4096)
    vol, _ = await cluster.meta.volume("v")
    kept = vol.extents[0] or ""
    snaps = SnapshotService(cluster.meta, cluster.pool)
    await snaps.snapshot("v", "s1", paused_on="n1")
    await dev.write(EXTENT, b"\x33" * 4096)  # slot 1 copied on write; slot 0 stays s1's
    before, _ = await cluster.meta.extent(kept)
    pool = ReplicaPool(cluster.meta)  # the fence of s1's extent fails everywhere
    for node, client in cluster.replicas.items():

        async def fence(ext_id: str, epoch: int, _c: Any = client) -> Any:
            if ext_id == kept:
                raise ReplicaUnavailable("-", "no answer")
            return await _c.fence(ext_id, epoch)

        pool.add(node, Override(client, "fence", fence))  # type: ignore[arg-type]
    assert (await SnapshotService(cluster.meta, pool).snapshot("v", "s2", "n1")).ready
    assert (await cluster.meta.extent(kept))[0] == before  # nothing dropped


async def test_a_write_that_finds_its_access_point_taken_over_fences_it(
    cluster: Cluster,
) -> None:
    dev, _, other = await filled(cluster)
    await cluster.open("v", "n3", takeover=True)  # fences n1 and `other`
    cluster.replicas[other].down = True  # `other` fails: dropping it needs the attachment
    with pytest.raises(Fenced):
        await dev.write(AT, b"A" * 4096)
    with pytest.raises(Fenced):
        await dev.read(AT, 4096)


@pytest.mark.parametrize("then", ["raises", "is-cancelled"])
async def test_a_copy_on_write_committed_but_unconfirmed_keeps_its_replicas(
    cluster: Cluster, monkeypatch: pytest.MonkeyPatch, then: str
) -> None:
    # The store can apply the change and still fail the call (a reply lost, a timeout), or
    # the request can be cancelled after the commit: the table then names the new extent.
    dev, ext_id, _ = await filled(cluster)
    await SnapshotService(cluster.meta, cluster.pool).snapshot("v", "s", paused_on="n1")
    replace, committed = cluster.meta.replace_extent, asyncio.Event()

    async def unconfirmed(*args: Any, **kw: Any) -> bool:
        assert await replace(*args, **kw)
        committed.set()
        if then == "raises":
            raise StoreUnavailable("the reply was lost")
        await asyncio.Event().wait()  # no answer: the request is cancelled meanwhile
        return True

    monkeypatch.setattr(cluster.meta, "replace_extent", unconfirmed)
    writing = asyncio.ensure_future(dev.write(AT, b"A" * 4096))
    await committed.wait()
    if then == "is-cancelled":
        writing.cancel()
    with pytest.raises((StoreUnavailable, asyncio.CancelledError)):
        await writing
    vol, _ = await cluster.meta.volume("v")
    new, _ = await cluster.meta.extent(vol.extents[0] or "")
    assert new.id != ext_id
    for node in new.replicas:
        assert await cluster.replicas[node].store.read(new.id, 0, 4096) == b"\x11" * 4096


async def test_a_volume_made_again_under_an_old_name_does_not_own_its_extents(
    cluster: Cluster,
) -> None:
    snaps = SnapshotService(cluster.meta, cluster.pool)
    await cluster.meta.create_volume("x", EXTENT, replicas=2)
    dev = await cluster.open("x")
    await dev.write(0, b"A" * BLOCK)
    await dev.close()
    await snaps.clone_volume("x", "c")
    await VolumeService(cluster.meta, cluster.pool).delete("x")  # c still names the extent
    await snaps.clone_volume("c", "x")  # a new "x" sharing c's extent
    dev = await cluster.open("x")
    await dev.write(0, b"B" * BLOCK)  # copies on write, never in place
    await dev.close()
    c = await cluster.open("c")
    assert await c.read(0, BLOCK) == b"A" * BLOCK
