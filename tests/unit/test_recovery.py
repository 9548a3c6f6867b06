"""Recovery by the access point: a returning replica catches up only what it missed; a replica
gone past the grace period is re-created elsewhere; copies never lose concurrent writes; the
scrubber repairs corrupt sectors from a good replica."""

from __future__ import annotations

import asyncio
import itertools
from pathlib import Path
from typing import Any

import pytest

from aecp.common.clock import FakeClock
from aecp.common.errors import Conflict
from aecp.model.node import MaintenanceState, NodeAdmin
from aecp.storage.meta.model import ExtentRecord
from aecp.storage.recovery import RecoveryPolicy, Repairer
from aecp.store import keys
from aecp.store.memory import MemoryStore
from tests.unit.abskit import BLOCK, EXTENT, Cluster


async def degraded_volume(cluster: Cluster) -> tuple[Repairer, str, str]:
    """A 2-replica volume with one full extent whose second replica was dropped."""
    await cluster.meta.create_volume("v", EXTENT, replicas=2)
    dev = await cluster.open("v")
    await dev.write(0, b"\x11" * EXTENT)
    vol, _ = await cluster.meta.volume("v")
    ext_id = vol.extents[0] or ""
    ext, _ = await cluster.meta.extent(ext_id)
    other = ext.replicas[1]
    cluster.replicas[other].down = True
    await dev.write(3 * BLOCK, b"\x22" * 100)  # dropped here: generation bump
    await dev.write(7 * BLOCK + 5, b"\x33" * BLOCK)  # touches blocks 7 and 8
    cluster.replicas[other].down = False
    return Repairer(dev, RecoveryPolicy(grace=60, rate=1e12), cluster.board), ext_id, other


async def test_a_returning_replica_copies_only_the_blocks_it_missed(cluster: Cluster) -> None:
    rep, ext_id, other = await degraded_volume(cluster)
    [sentence] = await rep.run_pass()
    assert f"{other} caught up" in sentence
    assert rep.copied_last == 3 * BLOCK  # blocks 3, 7 and 8: not the whole extent
    ext, _ = await cluster.meta.extent(ext_id)
    assert sorted(ext.replicas) == sorted(["n1", other]) and ext.stale == {}
    good = await cluster.replicas["n1"].store.read(ext_id, 0, EXTENT)
    assert await cluster.replicas[other].store.read(ext_id, 0, EXTENT) == good
    assert await rep.run_pass() == []  # healthy now


async def test_a_replica_gone_past_the_grace_period_is_recreated_elsewhere(
    cluster: Cluster, clock: FakeClock
) -> None:
    rep, ext_id, other = await degraded_volume(cluster)
    cluster.replicas[other].down = True
    [waiting] = await rep.run_pass()
    assert "waiting for" in waiting
    await clock.advance(61)
    [sentence] = await rep.run_pass()
    third = ({"n1", "n2", "n3"} - {"n1", other}).pop()
    assert f"re-replicated to {third}" in sentence and f"in place of {other}" in sentence
    ext, _ = await cluster.meta.extent(ext_id)
    assert sorted(ext.replicas) == sorted(["n1", third]) and ext.stale == {}
    good = await cluster.replicas["n1"].store.read(ext_id, 0, EXTENT)
    assert await cluster.replicas[third].store.read(ext_id, 0, EXTENT) == good
    assert cluster.board.puts and await cluster.board.held() == []  # removed at the end


async def test_writes_during_a_catch_up_reach_the_returning_replica(cluster: Cluster) -> None:
    rep, ext_id, other = await degraded_volume(cluster)
    dev, real_copy, value = rep.dev, rep.dev.copy_range, itertools.count(1)
    copied: list[int] = []

    async def write(offset: int) -> None:
        await dev.write(offset, bytes([next(value)]) * 4096)

    async def copy_amid_writes(ext: str, src: Any, dst: Any, offset: int, length: int) -> None:
        """Live writes land before each copied range: to a block no range holds, to this
        range, to the range copied before it (or another block no range holds). Others, to
        this range, wait while it is copied (the copy takes the copy lock before it awaits)."""
        for at in (len(copied) * 3 * 4096, offset + 4096, copied[-1] if copied else BLOCK):
            await write(at)
        inside = (offset, offset + length // 2, offset + length - 4096)
        waiting = [asyncio.ensure_future(write(at)) for at in inside]
        await real_copy(ext, src, dst, offset, length)
        await asyncio.gather(*waiting)
        copied.append(offset)

    dev.copy_range = copy_amid_writes  # type: ignore[method-assign]
    await rep.run_pass()
    assert copied  # the catch-up copied ranges, amid live writes
    ext, _ = await cluster.meta.extent(ext_id)
    assert other in ext.replicas
    good = await cluster.replicas["n1"].store.read(ext_id, 0, EXTENT)
    assert await cluster.replicas[other].store.read(ext_id, 0, EXTENT) == good


async def test_the_scrubber_repairs_a_corrupt_sector_from_a_good_replica(
    cluster: Cluster, tmp_path: Path
) -> None:
    await cluster.meta.create_volume("v", EXTENT, replicas=2)
    dev = await cluster.open("v")
    await dev.write(0, b"s" * 65536)
    await dev.flush()
    vol, _ = await cluster.meta.volume("v")
    ext_id = vol.extents[0] or ""
    ext, _ = await cluster.meta.extent(ext_id)
    victim = ext.replicas[1]
    await cluster.replicas[victim].store.close()
    [data] = list((tmp_path / victim).rglob(f"{ext_id}.data"))
    with data.open("r+b") as f:
        f.seek(4096 * 3 + 7)
        f.write(b"\x00")
    from aecp.storage.chunk.store import ReplicaStore

    cluster.replicas[victim].store = ReplicaStore(tmp_path / victim, block_size=BLOCK)
    rep = Repairer(dev, RecoveryPolicy(grace=60, rate=1e12), cluster.board)
    [sentence] = await rep.scrub_pass()
    assert f"repaired 1 bad sectors on {victim}" in sentence
    assert await cluster.replicas[victim].store.scrub(ext_id) == []
    assert await rep.scrub_pass() == []


async def test_one_extents_failure_to_drop_a_lost_replica_does_not_stop_the_pass(
    cluster: Cluster, store: MemoryStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The drop ran outside the pass's error handling: one conflict stopped every extent.
    await cluster.meta.create_volume("v", 2 * EXTENT, replicas=2)
    dev = await cluster.open("v")
    await dev.write(0, b"\x11" * 2 * EXTENT)
    vol, _ = await cluster.meta.volume("v")
    first, second = (x or "" for x in vol.extents)
    lost = next(n for n in (await cluster.meta.extent(first))[0].replicas if n != "n1")
    assert lost in (await cluster.meta.extent(second))[0].replicas  # the freest node, twice
    await store.delete(keys.abs_server(lost))  # gone from the cluster
    real = dev.drop_lost

    async def drop_lost(ext_id: str, nodes: list[str]) -> ExtentRecord:
        if ext_id == first:
            raise Conflict(f"extent {ext_id} keeps changing; try again")
        return await real(ext_id, nodes)

    monkeypatch.setattr(dev, "drop_lost", drop_lost)
    sentences = await Repairer(dev, RecoveryPolicy(60, 1e12), cluster.board).run_pass()
    assert any(first in s and "repair failed, will retry" in s for s in sentences)
    assert any(second in s and f"{lost} left the cluster" in s for s in sentences)
    assert lost in (await cluster.meta.extent(second))[0].stale
    await dev.close()


async def test_a_node_in_maintenance_gets_the_maintenance_grace_before_re_replication(
    cluster: Cluster, clock: FakeClock, store: MemoryStore
) -> None:
    rep, ext_id, other = await degraded_volume(cluster)
    rep.policy = RecoveryPolicy(grace=60, rate=1e12, maintenance_grace=3600)
    admin = NodeAdmin(maintenance=MaintenanceState.MAINTENANCE, maintenance_since=1)
    await store.put(keys.node_admin(other), admin.dump())
    cluster.replicas[other].down = True
    await clock.advance(61)  # past recovery_grace_s, within the maintenance grace
    [waiting] = await rep.run_pass()
    assert waiting == f"extent {ext_id}: waiting for {other} to come back (grace 3600s)"
    assert await cluster.board.held() == []  # no copy started
    cluster.replicas[other].down = False  # back: it catches up, nothing re-replicated
    [sentence] = await rep.run_pass()
    assert f"{other} caught up" in sentence and rep.copied_last == 3 * BLOCK
    ext, _ = await cluster.meta.extent(ext_id)
    assert other in ext.replicas and ext.stale == {}


async def test_a_node_back_in_use_gets_the_ordinary_grace_again(
    cluster: Cluster, clock: FakeClock, store: MemoryStore
) -> None:
    rep, _, other = await degraded_volume(cluster)
    rep.policy = RecoveryPolicy(grace=60, rate=1e12, maintenance_grace=3600)
    await store.put(keys.node_admin(other), NodeAdmin().dump())  # in use
    cluster.replicas[other].down = True
    await clock.advance(61)
    [sentence] = await rep.run_pass()
    assert "re-replicated to" in sentence and f"in place of {other}" in sentence


async def test_grace_for_is_the_longer_one_only_for_nodes_in_maintenance(
    store: MemoryStore,
) -> None:
    for state in MaintenanceState:
        await store.put(keys.node_admin(f"n-{state.value}"), NodeAdmin(maintenance=state).dump())
    policy = await RecoveryPolicy(60, 1, maintenance_grace=3600).current(store)
    assert {n: policy.grace_for(n) for n in sorted(policy.in_maintenance)} == {
        "n-entering_maintenance": 3600,
        "n-exiting_maintenance": 3600,
        "n-maintenance": 3600,
    }
    assert policy.grace_for("n-in_use") == 60 and policy.grace_for("other") == 60
    assert (
        RecoveryPolicy(60, 1, maintenance_grace=10, in_maintenance=frozenset({"a"})).grace_for("a")
        == 60
    )  # never shorter than the ordinary grace
    plain = RecoveryPolicy(60, 1)
    assert await plain.current(store) is plain  # no maintenance grace: nothing read
