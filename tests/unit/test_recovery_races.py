"""Recovery ordered against everything else the access point sees: a join never admits a
replica that missed a write (a client took the volume over, a snapshot was taken during the
join, an earlier join's lock was still held), and a failure after admission leaves the access
point's view and the recovery loop intact. Each test holds one step of the join open at the
moment another event happens."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from aecp.common.errors import Conflict, InvalidState, Unavailable
from aecp.storage.access import VolumeDevice
from aecp.storage.attach import open_volume
from aecp.storage.chunk.errors import ReplicaUnavailable
from aecp.storage.meta.model import Holder
from aecp.storage.pool import ReplicaPool
from aecp.storage.recovery import RecoveryPolicy, Repairer
from aecp.storage.snapshots import SnapshotService
from tests.unit._sync import run_ready
from tests.unit.abskit import BLOCK, EXTENT, Cluster


async def filled(cluster: Cluster) -> tuple[VolumeDevice, str, str]:
    """Volume ``v`` (two replicas) attached on n1, its extent full of 0x11: (the access point,
    the extent, the node of the replica not on n1)."""
    await cluster.meta.create_volume("v", EXTENT, replicas=2)
    dev = await cluster.open("v", "n1")
    await dev.write(0, b"\x11" * EXTENT)
    vol, _ = await cluster.meta.volume("v")
    ext_id = vol.extents[0] or ""
    ext, _ = await cluster.meta.extent(ext_id)
    return dev, ext_id, next(n for n in ext.replicas if n != "n1")


async def degraded(cluster: Cluster) -> tuple[VolumeDevice, str, str]:
    """``filled``, then the second replica dropped (it missed block 3)."""
    dev, ext_id, other = await filled(cluster)
    cluster.replicas[other].down = True
    await dev.write(3 * BLOCK, b"\x22" * 4096)
    cluster.replicas[other].down = False
    return dev, ext_id, other


class Override:
    """A replica client with one method replaced."""

    def __init__(self, client: Any, name: str, method: Any) -> None:
        self.client, self.name, self.method = client, name, method

    def __getattr__(self, name: str) -> Any:
        return self.method if name == self.name else getattr(self.client, name)


async def snapshot_during_join(
    cluster: Cluster,
) -> tuple[VolumeDevice, str, str, asyncio.Future[list[str]], asyncio.Event]:
    """``degraded``, then a catch-up held before its first copy while a snapshot is taken as
    for a paused VM: (..., the recovery pass running, the event that lets it go on)."""
    dev, ext_id, other = await degraded(cluster)
    copying, go_on = hold_copy(dev)
    repairing = asyncio.ensure_future(
        Repairer(dev, RecoveryPolicy(60, 1e12), cluster.board).run_pass()
    )
    await copying.wait()
    await SnapshotService(cluster.meta, cluster.pool).snapshot("v", "s", paused_on="n1")
    return dev, ext_id, other, repairing, go_on


def hold_copy(dev: VolumeDevice) -> tuple[asyncio.Event, asyncio.Event]:
    """Make ``dev``'s next join stop before its first copy: (copying, go_on)."""
    copying, go_on = asyncio.Event(), asyncio.Event()
    real_copy = dev.copy_range

    async def gated_copy(*args: Any) -> None:
        copying.set()
        await go_on.wait()
        await real_copy(*args)

    dev.copy_range = gated_copy  # type: ignore[method-assign]
    return copying, go_on


async def valid_and_complete(cluster: Cluster, ext_id: str, node: str, block: int) -> bool:
    """True unless ``node`` is a valid replica whose ``block`` differs from n1's."""
    ext, _ = await cluster.meta.extent(ext_id)
    at = block * BLOCK
    good = await cluster.replicas["n1"].store.read(ext_id, at, 4096)
    return (
        node not in ext.replicas
        or await cluster.replicas[node].store.read(ext_id, at, 4096) == good
    )


async def test_a_repair_overtaken_by_a_client_attach_does_not_admit_its_replica(
    cluster: Cluster,
) -> None:
    dev, ext_id, other = await degraded(cluster)
    await dev.flush()
    await dev.close()
    lease = await cluster.store.grant_lease(60)  # the Meta leader repairs the idle volume
    rdev = await open_volume(cluster.meta, cluster.pool, "n1", "v", lease, purpose="repair")
    copying, go_on = hold_copy(rdev)
    repairing = asyncio.ensure_future(
        Repairer(rdev, RecoveryPolicy(60, 1e12), cluster.board).run_pass()
    )
    await copying.wait()
    third = ({"n1", "n2", "n3"} - {"n1", other}).pop()
    client = await cluster.open("v", third)  # the repair attachment yields
    await client.write(12 * BLOCK, b"\x99" * 4096)  # reaches n1 only
    go_on.set()
    [sentence] = await repairing
    assert "failed" in sentence
    assert await valid_and_complete(cluster, ext_id, other, 12)
    await client.close()


async def test_a_snapshot_taken_during_a_join_stays_out_of_the_joining_replica(
    cluster: Cluster,
) -> None:
    dev, ext_id, other, repairing, go_on = await snapshot_during_join(cluster)
    await dev.write(12 * BLOCK, b"A" * 4096)  # copies on write while the join waits
    go_on.set()
    await repairing
    # the extent is the snapshot's now: on every valid replica it still holds the old data
    assert await cluster.replicas["n1"].store.read(ext_id, 12 * BLOCK, 4096) == b"\x11" * 4096
    assert await valid_and_complete(cluster, ext_id, other, 12)


async def test_a_failure_right_after_admission_keeps_writes_reaching_the_admitted_replica(
    cluster: Cluster,
) -> None:
    dev, ext_id, other = await degraded(cluster)
    flaky = cluster.replicas[other]

    async def blip(*args: Any, **kw: Any) -> None:
        raise ReplicaUnavailable(other, "blip right after admission")

    cluster.pool.add(other, Override(flaky, "set_generation", blip))  # type: ignore[arg-type]
    [sentence] = await Repairer(dev, RecoveryPolicy(60, 1e12), cluster.board).run_pass()
    assert "repair failed" in sentence  # a sentence: the recovery loop goes on
    cluster.pool.add(other, flaky)  # type: ignore[arg-type]
    await dev.write(12 * BLOCK, b"\x99" * 4096)
    assert await valid_and_complete(cluster, ext_id, other, 12)


async def test_a_write_still_holding_an_ended_joins_lock_is_waited_for_by_the_next_join(
    cluster: Cluster,
) -> None:
    dev, ext_id, other = await degraded(cluster)
    n1, in_flight, slow = cluster.replicas["n1"], asyncio.Event(), asyncio.Event()

    async def write(ext: str, offset: int, *args: Any, **kw: Any) -> Any:
        if offset == 12 * BLOCK:
            in_flight.set()
            await slow.wait()
        return await n1.write(ext, offset, *args, **kw)

    cluster.pool.add("n1", Override(n1, "write", write))  # type: ignore[arg-type]
    await dev.begin_join(ext_id, other)
    admitting, gate = asyncio.Event(), asyncio.Event()

    async def nothing_admitted() -> Any:
        admitting.set()
        await gate.wait()
        return (await cluster.meta.extent(ext_id))[0]

    ending = asyncio.ensure_future(dev.end_join(ext_id, nothing_admitted))
    await admitting.wait()  # the join's end holds lock 1
    writing = asyncio.ensure_future(dev.write(12 * BLOCK, b"\x99" * 4096))  # waits on lock 1
    await run_ready()  # no I/O before the lock
    assert not in_flight.is_set()
    gate.set()
    await ending
    await in_flight.wait()  # it looked again: in flight, outside any join
    assert not writing.done()
    fenced = asyncio.Event()

    async def fence(*args: Any) -> Any:  # a join's first step: fence its joiner
        epoch = await cluster.replicas[other].fence(*args)
        fenced.set()
        return epoch

    cluster.pool.add(other, Override(cluster.replicas[other], "fence", fence))  # type: ignore[arg-type]
    rep = Repairer(dev, RecoveryPolicy(60, 1e12), cluster.board)  # the next pass: a new join
    repairing = asyncio.ensure_future(rep.run_pass())
    await fenced.wait()  # the new join fenced its joiner: it waits for the write in flight
    await run_ready()
    assert dev.joiner(ext_id) is None, "the next join began with a write still in flight"
    slow.set()
    await asyncio.gather(repairing, writing)
    assert await valid_and_complete(cluster, ext_id, other, 12)


async def test_a_replica_admitted_after_a_snapshot_refuses_the_old_epoch_like_the_others(
    cluster: Cluster,
) -> None:
    dev, ext_id, other, repairing, go_on = await snapshot_during_join(cluster)
    go_on.set()
    [sentence] = await repairing  # nothing written during the join: admitted
    assert "caught up" in sentence
    await dev.write(12 * BLOCK, b"A" * 4096)  # still under the old epoch: copies on write
    assert await cluster.replicas["n1"].store.read(ext_id, 12 * BLOCK, 4096) == b"\x11" * 4096
    assert await valid_and_complete(cluster, ext_id, other, 12)


async def test_a_failed_re_replication_leaves_nothing_a_later_one_would_admit(
    cluster: Cluster,
) -> None:
    await cluster.meta.create_volume("v", EXTENT, replicas=2)
    dev = await cluster.open("v", "n1")
    await dev.write(0, b"\x11" * 4096)  # block 12 never written: the source has no copy
    vol, _ = await cluster.meta.volume("v")
    ext_id = vol.extents[0] or ""
    ext, _ = await cluster.meta.extent(ext_id)
    other = next(n for n in ext.replicas if n != "n1")
    target = ({"n1", "n2", "n3"} - {"n1", other}).pop()
    cluster.replicas[other].down = True
    await dev.write(BLOCK, b"\x22" * 4096)  # drops `other`
    policy = RecoveryPolicy(0, 1e12)  # no grace: re-replicate to `target`
    copying, go_on = hold_copy(dev)
    first = asyncio.ensure_future(Repairer(dev, policy, cluster.board).run_pass())
    await copying.wait()
    snaps = SnapshotService(cluster.meta, cluster.pool)
    await snaps.snapshot("v", "s", paused_on="n1")
    await dev.write(12 * BLOCK, b"A" * 4096)  # refused by n1, taken by the joiner
    go_on.set()
    assert "failed" in (await first)[0]
    await dev.close()
    await snaps.clone("v", "s", "c")
    clone = await cluster.open("c", target)  # the clone's repair re-replicates to `target`
    await Repairer(clone, policy, cluster.board).run_pass()
    assert await clone.read(12 * BLOCK, 4096) == bytes(4096)
    assert await valid_and_complete(cluster, ext_id, target, 12)


async def test_a_join_that_fails_after_its_last_copy_is_reported_as_failed(
    cluster: Cluster,
) -> None:
    dev, ext_id, other = await degraded(cluster)
    real_copy, writes = dev.copy_range, []

    async def refuse(*args: Any, **kw: Any) -> None:
        raise ReplicaUnavailable(other, "the joiner blips for one live write")

    async def copy(*args: Any) -> None:
        if not writes:  # a live write waits on the copy lock; the joiner fails it
            cluster.pool.add(other, Override(cluster.replicas[other], "write", refuse))  # type: ignore[arg-type]
            writes.append(asyncio.ensure_future(dev.write(12 * BLOCK, b"\x99" * 4096)))
        await real_copy(*args)

    dev.copy_range = copy  # type: ignore[method-assign]
    [sentence] = await Repairer(dev, RecoveryPolicy(60, 1e12), cluster.board).run_pass()
    await asyncio.gather(*writes)
    ext, _ = await cluster.meta.extent(ext_id)
    assert other not in ext.replicas and "failed" in sentence, sentence


async def shared_and_degraded(cluster: Cluster) -> tuple[str, str]:
    """``filled``, detached; its extent shared by volume v, snapshot s and clone c, and its
    second replica dropped: (the extent, the dropped replica's node)."""
    dev, ext_id, other = await filled(cluster)
    await dev.flush()
    await dev.close()
    snaps = SnapshotService(cluster.meta, cluster.pool)
    await snaps.snapshot("v", "s")
    await snaps.clone("v", "s", "c")
    await cluster.meta.drop_replica(ext_id, other)
    return ext_id, other


def fence_fails(cluster: Cluster, nodes: set[str]) -> ReplicaPool:
    """A pool (the snapshot's view) in which fencing fails on ``nodes``."""
    pool = ReplicaPool(cluster.meta)

    async def blip(*args: Any, **kw: Any) -> Any:
        raise ReplicaUnavailable("-", "blip during the snapshot's fence")

    for node, client in cluster.replicas.items():
        pool.add(node, Override(client, "fence", blip) if node in nodes else client)  # type: ignore[arg-type]
    return pool


async def test_a_replica_a_snapshot_could_not_fence_is_dropped_by_the_snapshot(
    cluster: Cluster,
) -> None:
    # Left valid, it would take the access point's next write (still under the old epoch)
    # that the fenced replicas refuse: the snapshot would differ between its replicas.
    dev, ext_id, other = await filled(cluster)
    await SnapshotService(cluster.meta, fence_fails(cluster, {other})).snapshot(
        "v", "s", paused_on="n1"
    )
    ext, _ = await cluster.meta.extent(ext_id)
    assert ext.replicas == ["n1"] and ext.stale[other] == ext.generation - 2  # diverged
    await dev.write(12 * BLOCK, b"A" * 4096)  # n1 refuses the old epoch: copied on write
    assert await cluster.replicas["n1"].store.read(ext_id, 12 * BLOCK, 4096) == b"\x11" * 4096
    await dev.close()
    await SnapshotService(cluster.meta, cluster.pool).clone("v", "s", "c")
    clone = await cluster.open("c", "n1")  # the extent is in the clone's table: it repairs it
    await Repairer(clone, RecoveryPolicy(60, 1e12), cluster.board).run_pass()  # `other` catches up
    ext, _ = await cluster.meta.extent(ext_id)
    assert other in ext.replicas
    assert await cluster.replicas[other].store.read(ext_id, 12 * BLOCK, 4096) == b"\x11" * 4096


async def test_a_snapshot_that_can_fence_no_replica_of_an_extent_fails_and_is_gone(
    cluster: Cluster,
) -> None:
    dev, _, other = await filled(cluster)
    snaps = SnapshotService(cluster.meta, fence_fails(cluster, {"n1", other}))
    with pytest.raises(Unavailable, match="no replica could be fenced"):
        await snaps.snapshot("v", "s", paused_on="n1")
    assert await snaps.snapshots("v") == []
    await dev.write(12 * BLOCK, b"A" * 4096)  # goes on (after adopting the epoch)
    assert await dev.read(12 * BLOCK, 4096) == b"A" * 4096


async def test_a_join_after_a_snapshot_keeps_every_healthy_replica(cluster: Cluster) -> None:
    # The joiner is fenced at the attachment's epoch, which the access point may not have
    # adopted yet (it wrote only to extents allocated after the snapshot): its next write
    # meets StaleEpoch on the joiner alone, adopts, and goes on; nobody is dropped.
    await cluster.meta.create_volume("v", 2 * EXTENT, replicas=2)
    dev = await cluster.open("v", "n1")
    await dev.write(0, b"\x11" * 4096)
    await SnapshotService(cluster.meta, cluster.pool).snapshot("v", "s", paused_on="n1")
    await dev.write(EXTENT, b"\x22" * 4096)  # a new extent: no refusal, the epoch stays old
    vol, _ = await cluster.meta.volume("v")
    ext, _ = await cluster.meta.extent(vol.extents[1] or "")
    other = next(n for n in ext.replicas if n != "n1")
    cluster.replicas[other].down = True
    await dev.write(EXTENT + 3 * BLOCK, b"\x33" * 4096)  # drops `other`
    cluster.replicas[other].down = False
    await Repairer(dev, RecoveryPolicy(60, 1e12), cluster.board).run_pass()  # catches it up
    await dev.write(EXTENT + 5 * BLOCK, b"\x44" * 4096)
    ext, _ = await cluster.meta.extent(ext.id)
    assert sorted(ext.replicas) == sorted(["n1", other]) and not ext.stale


async def test_a_re_replication_never_deletes_the_lost_replica_another_one_caught_up(
    cluster: Cluster,
) -> None:
    ext_id, other = await shared_and_degraded(cluster)
    v = await cluster.open("v", "n1")
    copying, go_on = hold_copy(v)
    v_pass = asyncio.ensure_future(Repairer(v, RecoveryPolicy(0, 1e12), cluster.board).run_pass())
    await copying.wait()  # v re-replicates in place of `other` ...
    c = await cluster.open("c", ({"n2", "n3"} - {other}).pop())
    await Repairer(c, RecoveryPolicy(60, 1e12), cluster.board).run_pass()  # ... c catches it up
    go_on.set()
    await v_pass
    ext, _ = await cluster.meta.extent(ext_id)
    assert other in ext.replicas and await cluster.replicas[other].store.exists(ext_id)


async def test_a_failed_re_replication_never_deletes_a_copy_another_access_point_admits(
    cluster: Cluster,
) -> None:
    ext_id, other = await shared_and_degraded(cluster)
    target = ({"n1", "n2", "n3"} - {"n1", other}).pop()
    policy = RecoveryPolicy(0, 1e12)  # no grace: both re-replicate to `target`
    v = await cluster.open("v", "n1")
    pool, held, go_on = ReplicaPool(cluster.meta), asyncio.Event(), asyncio.Event()
    for node, client in cluster.replicas.items():
        pool.add(node, client)  # type: ignore[arg-type]
    tgt = cluster.replicas[target]

    async def flush_then_hold(*args: Any) -> Any:  # c's admission: fenced, flushed, not in Meta
        await tgt.flush(*args)
        held.set()
        await go_on.wait()

    pool.add(target, Override(tgt, "flush", flush_then_hold))  # type: ignore[arg-type]
    c = await open_volume(cluster.meta, pool, "n3", "c", await cluster.store.grant_lease(3600))
    c_pass = asyncio.ensure_future(Repairer(c, policy, cluster.board).run_pass())
    await held.wait()
    await Repairer(v, policy, cluster.board).run_pass()  # fails: StaleEpoch
    go_on.set()
    await c_pass
    ext, _ = await cluster.meta.extent(ext_id)
    assert target in ext.replicas and await tgt.store.exists(ext_id)


async def test_replicas_a_snapshot_could_not_fence_all_catch_up_what_they_took(
    cluster: Cluster,
) -> None:
    await cluster.meta.create_volume("v", EXTENT, replicas=3)
    dev = await cluster.open("v", "n1")
    await dev.write(0, b"\x11" * EXTENT)
    vol, _ = await cluster.meta.volume("v")
    ext_id = vol.extents[0] or ""
    snaps = SnapshotService(cluster.meta, fence_fails(cluster, {"n2", "n3"}))
    await snaps.snapshot("v", "s", paused_on="n1")
    await dev.write(12 * BLOCK, b"A" * 4096)  # old epoch: n1 refuses, n2 and n3 may take it
    await dev.close()
    await SnapshotService(cluster.meta, cluster.pool).clone("v", "s", "c")
    clone = await cluster.open("c", "n1")
    for _ in range(2):  # one catch-up per pass
        await Repairer(clone, RecoveryPolicy(60, 1e12), cluster.board).run_pass()
    ext, _ = await cluster.meta.extent(ext_id)
    assert sorted(ext.replicas) == ["n1", "n2", "n3"]
    for node in ext.replicas:
        got = await cluster.replicas[node].store.read(ext_id, 12 * BLOCK, 4096)
        assert got == b"\x11" * 4096, node


async def test_a_snapshot_whose_failure_cannot_be_undone_is_left_unusable(
    cluster: Cluster, monkeypatch: pytest.MonkeyPatch
) -> None:
    _, _, other = await filled(cluster)
    snaps = SnapshotService(cluster.meta, fence_fails(cluster, {"n1", other}))

    async def store_blip(*args: Any, **kw: Any) -> int:
        raise Conflict("the store did not answer")

    monkeypatch.setattr(snaps, "delete", store_blip)
    with pytest.raises(Unavailable):
        await snaps.snapshot("v", "s", paused_on="n1")
    [left] = await snaps.snapshots("v")
    assert not left.ready
    with pytest.raises(InvalidState, match="incomplete"):
        await snaps.clone("v", "s", "c")


async def test_a_shared_extent_re_replicated_keeps_its_lost_replica_on_disk(
    cluster: Cluster,
) -> None:
    # Another volume sharing it could be catching that replica up right now.
    ext_id, other = await shared_and_degraded(cluster)
    v = await cluster.open("v", "n1")
    [sentence] = await Repairer(v, RecoveryPolicy(0, 1e12), cluster.board).run_pass()
    assert f"in place of {other}" in sentence
    assert await cluster.replicas[other].store.exists(ext_id)


async def test_an_access_point_taken_over_cannot_drop_a_replica(cluster: Cluster) -> None:
    dev, ext_id, other = await filled(cluster)
    before, _ = await cluster.meta.extent(ext_id)
    with pytest.raises(InvalidState, match="no longer attached"):
        await cluster.meta.drop_replica(ext_id, other, Holder("v", "n1", dev.epoch, "not-it"))
    await cluster.open("v", "n2", takeover=True)
    with pytest.raises(InvalidState, match="no longer attached"):
        await cluster.meta.drop_replica(ext_id, other, dev.holder)
    assert (await cluster.meta.extent(ext_id))[0] == before
