"""A write some replicas refuse for want of space fails with ENOSPC, and the replicas end up
agreeing again: those that took it get back what a refusing replica holds, but never from one
dropped meanwhile (it would overwrite an acknowledged write); a joining replica gets it back
too and is not admitted; a replica that failed in the same fan-out, or was dropped before the
undo, catches the range up; a full disk's failed flush drops nobody. (Trims, and the undo when
Meta, a checksum or room fail it: ``test_refused_undo``.)"""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from aecp.storage.access import VolumeDevice
from aecp.storage.blockdev import NoSpace
from aecp.storage.chunk.errors import ChunkError, ChunkIOError, ReplicaUnavailable
from aecp.storage.chunk.store import ReplicaStore
from aecp.storage.recovery import RecoveryPolicy, Repairer
from tests.unit.abskit import BLOCK, EXTENT, Cluster
from tests.unit.test_full_disk import FullDisk, open_fd
from tests.unit.test_recovery_races import Override


async def written(
    cluster: Cluster, size: int = EXTENT, replicas: int = 2, data: bytes = b"\x11" * BLOCK
) -> tuple[VolumeDevice, str, list[str]]:
    """Volume ``v`` attached on n1, ``data`` written at 0: (its access point, its first
    extent, the nodes of that extent's replicas)."""
    await cluster.meta.create_volume("v", size, replicas=replicas)
    dev = await cluster.open("v", "n1")
    await dev.write(0, data)
    vol, _ = await cluster.meta.volume("v")
    ext, _ = await cluster.meta.extent(vol.extents[0] or "")
    return dev, ext.id, ext.replicas


def fill_up(store: ReplicaStore) -> None:
    """No room left in ``store`` for a new block."""
    store.space.capacity = store.space.used


async def agree(cluster: Cluster, ext_id: str, nodes: list[str]) -> bool:
    """Whether the replicas on ``nodes`` hold the same bytes and the same valid sectors."""
    stores = [cluster.replicas[n].store for n in nodes]
    contents = [await s.read(ext_id, 0, EXTENT) for s in stores]
    runs = [await s.allocation(ext_id) for s in stores]
    return all(c == contents[0] for c in contents) and all(r == runs[0] for r in runs)


def hook(cluster: Cluster, node: str, name: str, method: Any) -> None:
    cluster.pool.add(node, Override(cluster.replicas[node], name, method))  # type: ignore[arg-type]


def lose_answers(cluster: Cluster, node: str) -> None:
    """``node``'s replica takes every write, but its answer is lost on the way back."""
    replica = cluster.replicas[node]

    async def write_then_lose_the_answer(ext: str, offset: int, data: Any, **kw: Any) -> None:
        await replica.write(ext, offset, data, **kw)
        raise ReplicaUnavailable(node, "connection reset after the write")

    hook(cluster, node, "write", write_then_lose_the_answer)


async def catch_up(cluster: Cluster, name: str = "v") -> list[str]:
    dev = await cluster.open(name, "n1", takeover=True)
    try:
        return await Repairer(dev, RecoveryPolicy(60, 1e12), cluster.board).run_pass()
    finally:
        await dev.close()


async def test_an_undo_never_copies_a_replica_dropped_meanwhile_over_an_acknowledged_write(
    cluster: Cluster,
) -> None:
    # W1 is refused by the full n1 and taken by n2. W2, overlapping and in flight, fails on n1
    # (dropped) and is acknowledged by n2 alone. The undo of W1 copied n1's old bytes over n2.
    dev, ext_id, replicas = await written(cluster, size=2 * EXTENT)
    other = next(n for n in replicas if n != "n1")
    n1 = cluster.replicas["n1"]
    fill_up(n1.store)  # block 1 needs space there
    refused = asyncio.Event()

    async def write(ext: str, offset: int, data: Any, **kw: Any) -> None:
        if bytes(data[:1]) == b"\x77":  # W2: the connection breaks once n1 refused W1
            await refused.wait()
            raise ReplicaUnavailable("n1", "connection reset")
        try:
            await n1.write(ext, offset, data, **kw)
        except ChunkIOError as exc:
            refused.set()
            raise exc

    hook(cluster, "n1", "write", write)
    w1 = asyncio.ensure_future(dev.write(0, b"\x66" * 2 * BLOCK))
    w2 = asyncio.ensure_future(dev.write(0, b"\x77" * 4096))
    with pytest.raises(NoSpace):
        await w1
    await w2  # acknowledged
    ext, _ = await cluster.meta.extent(ext_id)
    assert ext.replicas == [other]
    assert await dev.read(0, 4096) == b"\x77" * 4096
    assert await cluster.replicas[other].store.read(ext_id, 0, 4096) == b"\x77" * 4096
    await dev.flush()
    await dev.close()
    # n1, back with room, catches up: it must then hold what n2 holds, W1's other block too
    cluster.pool.add("n1", n1)  # type: ignore[arg-type]
    n1.store.space.capacity = None
    [sentence] = await catch_up(cluster)
    assert "n1 caught up" in sentence
    assert await agree(cluster, ext_id, ["n1", other])


async def test_a_replica_that_failed_in_the_same_fan_out_as_a_refusal_is_dropped_and_catches_up(
    cluster: Cluster,
) -> None:
    # It was neither dropped nor undone: it kept the refused write, the others did not.
    dev, ext_id, _ = await written(cluster, replicas=3)
    fill_up(cluster.replicas["n1"].store)
    n3 = cluster.replicas["n3"]
    lose_answers(cluster, "n3")
    with pytest.raises(NoSpace):
        await dev.write(BLOCK, b"\x66" * BLOCK)  # a new block: refused by n1
    ext, _ = await cluster.meta.extent(ext_id)
    assert sorted(ext.replicas) == ["n1", "n2"] and "n3" in ext.stale
    assert await agree(cluster, ext_id, ["n1", "n2"])  # n2 was undone
    await dev.close()
    cluster.pool.add("n3", n3)  # type: ignore[arg-type]
    [sentence] = await catch_up(cluster)
    assert "n3 caught up" in sentence
    assert await agree(cluster, ext_id, ["n1", "n2", "n3"])
    assert await n3.store.read(ext_id, BLOCK, 4096) == bytes(4096)


async def test_a_joining_replica_gets_a_refused_write_undone_and_is_not_admitted(
    cluster: Cluster,
) -> None:
    # The refusal was matched against the valid replicas only: the joiner kept the write.
    dev, ext_id, replicas = await written(cluster)
    other = next(n for n in replicas if n != "n1")
    joiner = ({"n1", "n2", "n3"} - set(replicas)).pop()
    await cluster.replicas[joiner].store.create(ext_id, EXTENT, epoch=dev.epoch)
    await dev.begin_join(ext_id, joiner)  # a re-replication: live writes reach it
    fill_up(cluster.replicas["n1"].store)
    with pytest.raises(NoSpace):
        await dev.write(BLOCK, b"\x66" * BLOCK)
    assert await cluster.replicas[joiner].store.read(ext_id, BLOCK, 4096) == bytes(4096)
    assert await cluster.replicas[other].store.read(ext_id, BLOCK, 4096) == bytes(4096)

    async def admit() -> Any:
        raise AssertionError("a failed join is not admitted")

    with pytest.raises(ChunkError, match="failed while joining"):
        await dev.end_join(ext_id, admit)
    await dev.close()


async def test_a_flush_a_full_disk_refuses_fails_with_enospc_and_drops_no_replica(
    cluster: Cluster, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The failed flush marked n1's replica failed: the next write dropped it.
    dev, ext_id, replicas = await written(cluster)
    n1 = cluster.replicas["n1"].store
    disk = FullDisk(monkeypatch, open_fd(n1.root / f"{ext_id}.jrnl"))
    with pytest.raises(NoSpace):
        await dev.flush()
    disk.off()
    await dev.write(0, b"\x22" * 4096)
    await dev.flush()  # covers the first write too
    ext, _ = await cluster.meta.extent(ext_id)
    assert ext.replicas == replicas and ext.stale == {}
    assert await n1.read(ext_id, 0, 8192) == b"\x22" * 4096 + b"\x11" * 4096
    await dev.close()
