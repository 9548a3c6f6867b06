"""The access point over three nodes' replica stores (real stores in temporary directories, an
in-memory cluster store): replication, thin allocation, dropping an unreachable replica with a
generation bump, fencing by epoch, and repair of a corrupt replica from a good one."""

from __future__ import annotations

import asyncio
from array import array
from pathlib import Path

import pytest

from aecp.storage import access
from aecp.storage.blockdev import Allocation, Fenced, InvalidRequest
from aecp.storage.chunk.errors import ChecksumError
from aecp.storage.chunk.store import ReplicaStore
from aecp.storage.fanout import split
from tests.unit.abskit import EXTENT, Cluster


def test_requests_are_cut_at_extent_boundaries() -> None:
    pieces = list(split(EXTENT - 10, 30, EXTENT))
    assert [(p.slot, p.offset, p.length, p.at) for p in pieces] == [
        (0, EXTENT - 10, 10, 0),
        (1, 0, 20, 10),
    ]


async def test_a_write_lands_on_every_replica_and_only_its_extent_is_allocated(
    cluster: Cluster,
) -> None:
    await cluster.meta.create_volume("v", 4 * EXTENT, replicas=2)
    dev = await cluster.open("v")
    await dev.write(EXTENT + 512, b"x" * 8192)
    vol, _ = await cluster.meta.volume("v")
    assert vol.extents[0] is None and vol.extents[1] is not None
    ext, _ = await cluster.meta.extent(vol.extents[1])
    assert ext.replicas[0] == "n1"  # the access point's node holds one replica
    for node in ext.replicas:
        data = await cluster.replicas[node].store.read(ext.id, 512, 8192)
        assert data == b"x" * 8192
    assert await dev.read(EXTENT, 1024) == bytes(512) + b"x" * 512
    assert await dev.read(0, 4096) == bytes(4096)  # never written: zeros, no extent
    status = await dev.block_status(0, 4 * EXTENT)
    assert status[0].flags == Allocation.HOLE | Allocation.ZERO


async def test_an_unreachable_replica_is_dropped_and_writes_go_on(cluster: Cluster) -> None:
    await cluster.meta.create_volume("v", 2 * EXTENT, replicas=2)
    dev = await cluster.open("v")
    await dev.write(0, b"a" * 4096)
    vol, _ = await cluster.meta.volume("v")
    ext, _ = await cluster.meta.extent(vol.extents[0] or "")
    other = ext.replicas[1]
    cluster.replicas[other].down = True
    await dev.write(4096, b"b" * 4096)  # acknowledged with one replica left
    after, _ = await cluster.meta.extent(ext.id)
    assert after.replicas == ["n1"]
    assert after.stale == {other: ext.generation}
    assert after.generation == ext.generation + 1
    # the write that hit the failure was re-issued under the new generation: a returning
    # replica finds it among the blocks modified since the generation it missed from
    changed = await cluster.replicas["n1"].store.modified_since(ext.id, ext.generation)
    assert changed and changed[0][0] == 0
    assert await dev.read(0, 8192) == b"a" * 4096 + b"b" * 4096


async def test_all_replicas_unreachable_fails_the_write(cluster: Cluster) -> None:
    await cluster.meta.create_volume("v", EXTENT, replicas=1)
    dev = await cluster.open("v")
    await dev.write(0, b"a" * 512)
    cluster.replicas["n1"].down = True
    with pytest.raises(Exception, match="unreachable"):
        await dev.write(0, b"b" * 512)


async def test_a_newer_attach_fences_the_older_access_point(cluster: Cluster) -> None:
    await cluster.meta.create_volume("v", EXTENT, replicas=2)
    old = await cluster.open("v", "n1")
    await old.write(0, b"1" * 4096)
    new = await cluster.open("v", "n2", takeover=True)
    with pytest.raises(Fenced):
        await old.write(0, b"2" * 4096)
    with pytest.raises(Fenced):
        await old.read(0, 4096)
    assert await new.read(0, 4096) == b"1" * 4096
    await new.write(0, b"3" * 4096)
    assert await new.read(0, 4096) == b"3" * 4096


async def test_a_corrupt_sector_is_served_from_another_replica_and_repaired(
    cluster: Cluster, tmp_path: Path
) -> None:
    await cluster.meta.create_volume("v", EXTENT, replicas=2)
    dev = await cluster.open("v")
    await dev.write(0, b"good" * 2048)
    await dev.flush()
    vol, _ = await cluster.meta.volume("v")
    ext_id = vol.extents[0] or ""
    local = cluster.replicas["n1"].store
    await local.close()
    data_files = list((tmp_path / "n1").rglob(f"{ext_id}.data"))
    assert data_files, list((tmp_path / "n1").rglob("*"))
    with data_files[0].open("r+b") as f:
        f.seek(100)
        f.write(b"\xff")
    cluster.replicas["n1"].store = ReplicaStore(tmp_path / "n1", block_size=64 * 1024)
    assert await dev.read(0, 8192) == b"good" * 2048
    assert await cluster.replicas["n1"].store.scrub(ext_id) == []
    await cluster.replicas["n1"].store.close()


async def test_out_of_range_requests_are_refused(cluster: Cluster) -> None:
    await cluster.meta.create_volume("v", EXTENT, replicas=1)
    dev = await cluster.open("v")
    with pytest.raises(InvalidRequest):
        await dev.write(EXTENT - 100, b"x" * 200)
    with pytest.raises(InvalidRequest):
        await dev.read(-1, 10)


async def test_write_nowait_serves_the_usual_write_and_declines_the_rest(cluster: Cluster) -> None:
    await cluster.meta.create_volume("v", 2 * EXTENT, replicas=2)
    dev = await cluster.open("v")
    assert dev.write_nowait(0, b"a" * 4096) is None, "the extent does not exist yet"
    await dev.write(0, b"a" * 4096)
    for offset, length in ((EXTENT - 512, 1024), (2 * EXTENT - 512, 1024), (-512, 512)):
        assert dev.write_nowait(offset, b"x" * length) is None, (offset, length)
    started = dev.write_nowait(4096, b"b" * 4096)
    assert started is not None
    await started
    vol, _ = await cluster.meta.volume("v")
    ext, _ = await cluster.meta.extent(vol.extents[0] or "")
    for node in ext.replicas:
        assert await cluster.replicas[node].store.read(ext.id, 0, 8192) == b"a" * 4096 + b"b" * 4096


async def test_write_nowait_computes_the_checksums_once_for_every_replica(
    cluster: Cluster, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Every replica records the checksums the access point computed (here deliberately
    wrong, so each replica's read fails on them); a write of partial sectors leaves them to
    the replicas."""
    await cluster.meta.create_volume("v", EXTENT, replicas=2)
    dev = await cluster.open("v")
    await dev.write(0, b"a" * 16384)
    computed: list[int] = []

    def wrong(data: bytes, sector: int) -> array[int]:
        computed.append(len(data))
        return array("I", [12345] * (len(data) // sector))

    monkeypatch.setattr(access, "sector_crcs", wrong)
    started = dev.write_nowait(4096, b"b" * 8192)
    assert started is not None
    await started
    assert computed == [8192], "once, not once per replica"
    ext, _ = await cluster.meta.extent((await cluster.meta.volume("v"))[0].extents[0] or "")
    for node in ext.replicas:
        with pytest.raises(ChecksumError):
            await cluster.replicas[node].store.read(ext.id, 4096, 4096)
    partial = dev.write_nowait(512, b"c" * 512)
    if partial is not None:  # partial sectors go the general way in the store
        await partial
    else:
        await dev.write(512, b"c" * 512)
    assert computed == [8192]
    for node in ext.replicas:
        assert await cluster.replicas[node].store.read(ext.id, 0, 1024) == b"a" * 512 + b"c" * 512


async def test_write_nowait_redoes_a_write_a_replica_failed_like_write_does(
    cluster: Cluster,
) -> None:
    await cluster.meta.create_volume("v", EXTENT, replicas=2)
    dev = await cluster.open("v")
    await dev.write(0, b"a" * 4096)
    vol, _ = await cluster.meta.volume("v")
    ext, _ = await cluster.meta.extent(vol.extents[0] or "")
    other = ext.replicas[1]
    cluster.replicas[other].down = True
    started = dev.write_nowait(4096, b"b" * 4096)
    assert started is not None
    await started  # acknowledged once the write was redone on the replica left
    after, _ = await cluster.meta.extent(ext.id)
    assert after.replicas == ["n1"]
    assert after.generation == ext.generation + 1
    changed = await cluster.replicas["n1"].store.modified_since(ext.id, ext.generation)
    assert changed and changed[0][0] == 0
    assert await dev.read(0, 8192) == b"a" * 4096 + b"b" * 4096


async def test_write_nowait_of_a_fenced_access_point_fails_and_changes_nothing(
    cluster: Cluster,
) -> None:
    await cluster.meta.create_volume("v", EXTENT, replicas=2)
    old = await cluster.open("v", "n1")
    await old.write(0, b"1" * 4096)
    new = await cluster.open("v", "n2", takeover=True)
    started = old.write_nowait(0, b"2" * 4096)
    assert started is not None, "the old access point does not know yet"
    with pytest.raises(Fenced):
        await started
    assert old.write_nowait(0, b"2" * 4096) is None, "now it knows"
    assert await new.read(0, 4096) == b"1" * 4096


async def test_read_nowait_serves_the_local_replica_and_declines_the_rest(
    cluster: Cluster,
) -> None:
    await cluster.meta.create_volume("v", 2 * EXTENT, replicas=2)
    here = await cluster.open("v", "n1")
    assert here.read_nowait(0, 4096) == bytes(4096), "never written: zeros"
    await here.write(0, b"a" * 8192)
    assert here.read_nowait(4096, 4096) == b"a" * 4096
    assert here.read_nowait(EXTENT - 512, 1024) is None, "two extents"
    assert here.read_nowait(2 * EXTENT - 512, 1024) is None, "past the end"
    vol, _ = await cluster.meta.volume("v")
    ext, _ = await cluster.meta.extent(vol.extents[0] or "")
    elsewhere = next(n for n in ("n1", "n2", "n3") if n not in ext.replicas)
    there = await cluster.open("v", elsewhere, takeover=True)
    await there.read(0, 4096)  # learns the extent
    assert there.read_nowait(0, 4096) is None, "no local replica: read over the network"


async def test_a_write_that_completes_after_a_flush_began_is_covered_by_the_next_flush(
    cluster: Cluster,
) -> None:
    """FLUSH makes every write completed before it durable: a write still in flight when an
    earlier flush took the set of dirty extents must still be flushed by the next one."""
    await cluster.meta.create_volume("v", EXTENT, replicas=1)
    dev = await cluster.open("v")
    await dev.write(0, b"a" * 4096)
    await dev.flush()
    replica = cluster.replicas["n1"]
    gate = replica.gate("write")
    writing = asyncio.ensure_future(dev.write(4096, b"b" * 4096))
    await gate.entered.wait()  # the write reached the replica, not acknowledged yet
    await dev.flush()  # overlaps the write in flight
    gate.open()
    await writing
    replica.calls.clear()
    await dev.flush()
    flushed = [c for c in replica.calls if c == "flush"]
    assert flushed, "the write completed before this flush, yet its extent was not flushed"
