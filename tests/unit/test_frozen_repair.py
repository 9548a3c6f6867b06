"""Extents that only snapshots name (their volume copied them on write) are repaired like any
other after a node loss, and scrubbed: by the Meta leader, extent by extent, since no volume's
recovery ever sees them."""

from __future__ import annotations

from pathlib import Path

import pytest

from aecp.common.clock import FakeClock
from aecp.common.errors import InvalidState
from aecp.storage.chunk.store import ReplicaStore
from aecp.storage.frozen import FrozenRepairer
from aecp.storage.meta.model import ExtentRecord, new_extent_id
from aecp.storage.recovery import RecoveryPolicy, Repairer
from aecp.storage.snapshots import SnapshotService
from aecp.store import keys
from aecp.store.memory import MemoryStore
from tests.unit.abskit import BLOCK, EXTENT, Cluster


async def frozen_extent(cluster: Cluster) -> ExtentRecord:
    """Volume ``v`` (one extent, two replicas) snapshotted as ``s1``, then overwritten: the
    first extent is named by ``s1`` alone."""
    await cluster.meta.create_volume("v", EXTENT, replicas=2)
    dev = await cluster.open("v")
    await dev.write(0, b"\x11" * EXTENT)
    await dev.flush()
    await dev.close()
    snaps = SnapshotService(cluster.meta, cluster.pool)
    snap = await snaps.snapshot("v", "s1")
    dev = await cluster.open("v")
    await dev.write(0, b"\x22" * 4096)  # copied on write
    await dev.close()
    vol, _ = await cluster.meta.volume("v")
    assert vol.extents[0] != snap.extents[0]
    return (await cluster.meta.extent(snap.extents[0] or ""))[0]


async def lose(cluster: Cluster, store: MemoryStore, node: str) -> None:
    """The node is gone: it answers nothing and its storage server's record expired."""
    cluster.replicas[node].down = True
    await store.delete(keys.abs_server(node))


def repairer(cluster: Cluster) -> FrozenRepairer:
    return FrozenRepairer(
        cluster.meta, cluster.pool, RecoveryPolicy(grace=60, rate=1e12), cluster.board
    )


async def test_an_extent_only_a_snapshot_names_is_re_replicated_after_its_node_is_lost(
    cluster: Cluster, store: MemoryStore, clock: FakeClock
) -> None:
    ext = await frozen_extent(cluster)
    kept, lost = ext.replicas
    await lose(cluster, store, lost)
    # the volume's own recovery never looks at it: it is no longer in the volume's table
    dev = await cluster.open("v")
    sentences = await Repairer(dev, RecoveryPolicy(60, 1e12), cluster.board).run_pass()
    assert not any(ext.id in s for s in sentences)
    await dev.close()
    rep = repairer(cluster)
    first = await rep.run_pass()
    assert f"{lost} left the cluster" in first[0] and "waiting for" in first[1]
    await clock.advance(61)
    [sentence] = await rep.run_pass()
    third = ({"n1", "n2", "n3"} - {kept, lost}).pop()
    assert f"re-replicated on {third} from {kept}" in sentence and f"in place of {lost}" in sentence
    now, _ = await cluster.meta.extent(ext.id)
    assert sorted(now.replicas) == sorted([kept, third]) and now.stale == {}
    good = await cluster.replicas[kept].store.read(ext.id, 0, EXTENT)
    assert good == b"\x11" * EXTENT
    assert await cluster.replicas[third].store.read(ext.id, 0, EXTENT) == good
    src = await cluster.replicas[kept].store.stat(ext.id)
    assert (await cluster.replicas[third].store.stat(ext.id)).epoch >= src.epoch  # fenced
    assert await rep.run_pass() == []  # healthy now
    assert [r.target for r in cluster.board.puts] == [third] * len(cluster.board.puts)
    assert await cluster.board.held() == []  # the progress record is removed


async def test_a_frozen_extents_node_back_in_time_catches_up_without_a_copy(
    cluster: Cluster, store: MemoryStore
) -> None:
    ext = await frozen_extent(cluster)
    kept, lost = ext.replicas
    server = await store.get(keys.abs_server(lost))
    assert server is not None
    await lose(cluster, store, lost)
    rep = repairer(cluster)
    await rep.run_pass()  # dropped: stale
    cluster.replicas[lost].down = False
    await store.put(keys.abs_server(lost), server.value)
    [sentence] = await rep.run_pass()
    assert f"caught up on {lost} from {kept} (0 bytes)" in sentence
    now, _ = await cluster.meta.extent(ext.id)
    assert sorted(now.replicas) == sorted(ext.replicas) and now.stale == {}


async def test_an_idle_volumes_replica_whose_node_left_is_dropped_by_its_recovery(
    cluster: Cluster, store: MemoryStore
) -> None:
    await cluster.meta.create_volume("v", EXTENT, replicas=2)
    dev = await cluster.open("v")
    await dev.write(0, b"\x11" * EXTENT)
    vol, _ = await cluster.meta.volume("v")
    ext, _ = await cluster.meta.extent(vol.extents[0] or "")
    lost = next(n for n in ext.replicas if n != "n1")
    await lose(cluster, store, lost)
    sentences = await Repairer(dev, RecoveryPolicy(60, 1e12), cluster.board).run_pass()
    assert f"{lost} left the cluster" in sentences[0] and "waiting for" in sentences[1]
    now, _ = await cluster.meta.extent(ext.id)
    assert now.replicas == ["n1"] and lost in now.stale
    await dev.close()


async def test_the_scrubber_repairs_a_corrupt_sector_of_a_frozen_extent(
    cluster: Cluster, tmp_path: Path
) -> None:
    ext = await frozen_extent(cluster)
    victim = ext.replicas[1]
    await cluster.replicas[victim].store.close()
    [data] = list((tmp_path / victim).rglob(f"{ext.id}.data"))
    with data.open("r+b") as f:
        f.seek(4096 * 5 + 11)
        f.write(b"\x00")
    cluster.replicas[victim].store = ReplicaStore(tmp_path / victim, block_size=BLOCK)
    [sentence] = await repairer(cluster).scrub_pass()
    assert f"repaired 1 bad sectors on {victim}" in sentence
    assert await cluster.replicas[victim].store.scrub(ext.id) == []
    assert await cluster.replicas[victim].store.read(ext.id, 0, EXTENT) == b"\x11" * EXTENT


async def test_two_copies_replacing_one_lost_replica_are_never_both_admitted(
    cluster: Cluster, store: MemoryStore
) -> None:
    # admit_copy checked neither that the replaced replica was still stale nor the factor:
    # two leaders (or a leader and a clone's access point) made three replicas of two.
    ext = ExtentRecord(
        id=new_extent_id(), size=EXTENT, replicas=["n1"], stale={"n2": 1}, generation=2
    )
    await store.put(keys.abs_extent(ext.id), ext.dump())
    admitted = await cluster.meta.admit_copy(ext.id, "n3", "n2", factor=2)
    assert admitted.replicas == ["n1", "n3"] and admitted.stale == {}
    with pytest.raises(InvalidState, match="n2 was caught up or replaced meanwhile"):
        await cluster.meta.admit_copy(ext.id, "n4", "n2", factor=2)
    with pytest.raises(InvalidState, match="has its 2 replicas already"):
        await cluster.meta.admit_copy(ext.id, "n4", None, factor=2)
    with pytest.raises(InvalidState, match="n3 is a valid replica already"):
        await cluster.meta.admit_copy(ext.id, "n3", None, factor=3)
    assert (await cluster.meta.extent(ext.id))[0].replicas == ["n1", "n3"]
