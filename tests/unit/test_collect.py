"""Space comes back: extents nothing names are collected (judged on tables of one moment, so a
clone made meanwhile keeps its extents), replicas no extent record names are deleted by their
node after a grace period (never one being built or caught up), and a volume delete or
snapshot waits for an export that is closing instead of answering "in use"."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from aecp.cluster.volumes import VolumeService
from aecp.common.clock import FakeClock
from aecp.common.errors import ConfigError, InvalidState, Unavailable
from aecp.conf.settings import parse
from aecp.storage.chunk.errors import ReplicaChanged
from aecp.storage.collect import OrphanCollector, collect_unreferenced
from aecp.storage.meta.model import ExtentRecord, Holder, RecoveryRecord, new_extent_id
from aecp.storage.meta.service import CLOSE_WAIT, SETTLE, MetaService
from aecp.storage.recovery import RecoveryPolicy, Repairer, new_record
from aecp.storage.snapshots import SnapshotService
from aecp.store import keys
from aecp.store.memory import MemoryStore
from tests.unit.abskit import BLOCK, EXTENT, Cluster
from tests.unit.test_settings import good


async def fill(cluster: Cluster, name: str, data: bytes) -> None:
    dev = await cluster.open(name)
    await dev.write(0, data)
    await dev.flush()
    await dev.close()


async def test_old_copies_are_collected_once_the_snapshot_naming_them_is_deleted(
    cluster: Cluster,
) -> None:
    await cluster.meta.create_volume("v", EXTENT, replicas=2)
    await fill(cluster, "v", b"A" * EXTENT)
    snaps = SnapshotService(cluster.meta, cluster.pool)
    snap = await snaps.snapshot("v", "s1")
    await fill(cluster, "v", b"B" * EXTENT)  # copy on write: the old extent is the snapshot's
    old = snap.extents[0] or ""
    stores = [r.store for r in cluster.replicas.values()]
    before = sum(s.space.used for s in stores)
    assert await snaps.delete("v", "s1") == 1
    assert sum(s.space.used for s in stores) == before - 2 * EXTENT
    assert not any([await s.exists(old) for s in stores])


async def test_a_clone_made_while_extents_are_collected_keeps_its_extents(
    cluster: Cluster, store: MemoryStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Read one table after the other, a clone of the snapshot made between the reads, with
    # the snapshot deleted, left an extent the clone names and neither read showed.
    await cluster.meta.create_volume("v", EXTENT, replicas=2)
    await fill(cluster, "v", b"A" * EXTENT)
    snaps = SnapshotService(cluster.meta, cluster.pool)
    snap = await snaps.snapshot("v", "s1")
    await fill(cluster, "v", b"B" * 4096)
    old = snap.extents[0] or ""
    real_list = store.list
    raced = False

    async def racing_list(prefix: str) -> Any:
        nonlocal raced
        got = await real_list(prefix)
        if not raced and keys.ABS_VOLUMES.startswith(prefix):
            raced = True  # right after the collector's read: clone, then drop the snapshot
            await snaps.clone("v", "s1", "c")
            await store.delete(keys.abs_snapshot("v", "s1"))
        return got

    monkeypatch.setattr(store, "list", racing_list)
    await cluster.meta.collect({old})
    assert raced
    monkeypatch.setattr(store, "list", real_list)
    assert (await cluster.meta.extent(old))[0].id == old
    dev = await cluster.open("c")
    assert await dev.read(0, 4096) == b"A" * 4096
    await dev.close()


async def test_an_extent_record_no_table_names_is_collected_with_its_replicas(
    cluster: Cluster, store: MemoryStore
) -> None:
    ext = ExtentRecord(id=new_extent_id(), size=EXTENT, replicas=["n1", "n2"])
    for n in ext.replicas:
        await cluster.replicas[n].store.create(ext.id, EXTENT)
    await store.put(keys.abs_extent(ext.id), ext.dump())  # a crash before it was collected
    [sentence] = await collect_unreferenced(cluster.meta, cluster.pool)
    assert ext.id in sentence
    assert await store.get(keys.abs_extent(ext.id)) is None
    assert not await cluster.replicas["n1"].store.exists(ext.id)


def orphans(cluster: Cluster, clock: FakeClock, node: str = "n2") -> OrphanCollector:
    return OrphanCollector(cluster.replicas[node].store, cluster.meta, node, 60, clock)


async def test_a_replica_no_extent_record_names_is_deleted_after_the_grace_period(
    cluster: Cluster, clock: FakeClock
) -> None:
    # e.g. a replica whose node was down when its volume was deleted
    n2 = cluster.replicas["n2"].store
    ext_id = new_extent_id()
    await n2.create(ext_id, EXTENT)
    await n2.write(ext_id, 0, b"x" * BLOCK, epoch=3, generation=1)
    gc = orphans(cluster, clock)
    assert await gc.run_pass() == []  # found
    await clock.advance(30)
    assert await gc.run_pass() == []  # not long enough
    await n2.write(ext_id, BLOCK, b"y" * BLOCK, epoch=3, generation=2)
    await clock.advance(40)
    assert await gc.run_pass() == []  # it changed: someone may be building it
    await clock.advance(61)
    [sentence] = await gc.run_pass()
    assert ext_id in sentence and "deleted from n2" in sentence
    assert not await n2.exists(ext_id)
    assert n2.space.used == 0


async def test_valid_stale_and_joining_replicas_are_never_collected(
    cluster: Cluster, store: MemoryStore, clock: FakeClock
) -> None:
    n2 = cluster.replicas["n2"].store
    valid, stale, joining = new_extent_id(), new_extent_id(), new_extent_id()
    for ext_id in (valid, stale, joining):
        await n2.create(ext_id, EXTENT)
    records = [
        ExtentRecord(id=valid, size=EXTENT, replicas=["n1", "n2"]),
        ExtentRecord(id=stale, size=EXTENT, replicas=["n1"], stale={"n2": 1}),
        ExtentRecord(id=joining, size=EXTENT, replicas=["n1"]),
    ]
    for rec in records:
        await store.put(keys.abs_extent(rec.id), rec.dump())
    copy = RecoveryRecord(
        volume="v",
        extent=joining,
        kind="re-replicate",
        target="n2",
        total_bytes=EXTENT,
        copied_bytes=0,
        started_at=0,
    )
    await store.put(keys.abs_recovery(joining, "n2"), copy.dump())
    gc = orphans(cluster, clock)
    for _ in range(3):
        assert await gc.run_pass() == []
        await clock.advance(61)
    assert all([await n2.exists(x) for x in (valid, stale, joining)])


async def test_the_lost_copy_of_a_shared_extent_is_deleted_by_its_nodes_orphan_collector(
    cluster: Cluster, store: MemoryStore, clock: FakeClock
) -> None:
    # A re-replication of an extent shared with a snapshot leaves the lost replica in place
    # (another access point may be recovering it too): only its node's collector reclaims it.
    await cluster.meta.create_volume("v", EXTENT, replicas=2)
    await fill(cluster, "v", b"A" * EXTENT)
    await SnapshotService(cluster.meta, cluster.pool).snapshot("v", "s1")  # shares the extent
    vol, _ = await cluster.meta.volume("v")
    ext, _ = await cluster.meta.extent(vol.extents[0] or "")
    lost = next(n for n in ext.replicas if n != "n1")
    server = await store.get(keys.abs_server(lost))
    assert server is not None
    cluster.replicas[lost].down = True
    await store.delete(keys.abs_server(lost))  # its lease expired
    dev = await cluster.open("v")
    rep = Repairer(dev, RecoveryPolicy(grace=60, rate=1e12), cluster.board)
    await rep.run_pass()  # dropped: stale
    await clock.advance(61)
    [sentence] = await rep.run_pass()
    assert f"in place of {lost}" in sentence
    await dev.close()
    cluster.replicas[lost].down = False  # the node comes back, its old copy with it
    await store.put(keys.abs_server(lost), server.value)
    leftover = cluster.replicas[lost].store
    assert await leftover.exists(ext.id)
    gc = orphans(cluster, clock, lost)
    assert await gc.run_pass() == []
    await clock.advance(61)
    [collected] = await gc.run_pass()
    assert ext.id in collected and not await leftover.exists(ext.id)
    assert leftover.space.used == 0


async def test_a_copy_fenced_at_the_epoch_it_was_created_with_is_not_collected(
    cluster: Cluster, clock: FakeClock
) -> None:
    # A re-replication creates its target at the access point's epoch and fences it at the
    # same epoch before admitting it: the epoch guard of the delete did not see the join.
    n2 = cluster.replicas["n2"].store
    ext_id = new_extent_id()
    await n2.create(ext_id, EXTENT, epoch=7)
    gc = orphans(cluster, clock)
    assert await gc.run_pass() == []  # found, unnamed
    await clock.advance(61)
    await n2.fence(ext_id, 7)  # a join claims it (same epoch), then is admitted
    assert await gc.run_pass() == []
    assert await n2.exists(ext_id)


async def test_a_replica_changed_after_it_was_observed_is_not_deleted_as_an_orphan(
    cluster: Cluster,
) -> None:
    # Nothing re-checked the replica at the delete: a join starting in between lost its copy.
    n2 = cluster.replicas["n2"].store
    ext_id = new_extent_id()
    await n2.create(ext_id, EXTENT, epoch=7)
    for claim in (
        lambda: n2.fence(ext_id, 7),
        lambda: n2.create(ext_id, EXTENT, epoch=7),
        lambda: n2.write(ext_id, 0, b"x" * 4096, epoch=7, generation=1),
    ):
        seen = await n2.observe(ext_id)
        await claim()
        with pytest.raises(ReplicaChanged):
            await n2.delete(ext_id, 7, unchanged=seen)
        assert await n2.exists(ext_id)
    await n2.delete(ext_id, 7, unchanged=await n2.observe(ext_id))
    assert not await n2.exists(ext_id)


async def test_a_mutation_waiting_for_its_block_locks_keeps_its_replica_from_the_collector(
    cluster: Cluster,
) -> None:
    # A mutation was counted only once it had its block locks: one queued behind a read
    # left the replica "unchanged", and the orphan collector deleted it under the write.
    n2 = cluster.replicas["n2"].store
    ext_id = new_extent_id()
    await n2.create(ext_id, EXTENT, epoch=7)
    seen = await n2.observe(ext_id)
    locks = n2._replicas[ext_id].locks  # a read holds block 0
    await locks.acquire(0, 1, False)
    write = asyncio.ensure_future(n2.write(ext_id, 0, b"x" * 4096, epoch=7, generation=1))
    await asyncio.sleep(0)
    assert not write.done()  # it waits for the read
    deleting = asyncio.ensure_future(n2.delete(ext_id, 7, unchanged=seen))
    await asyncio.sleep(0)
    locks.release(0, 1, False)
    with pytest.raises(ReplicaChanged):
        await deleting
    await write
    assert await n2.read(ext_id, 0, 4096) == b"x" * 4096


async def test_a_replica_an_older_copier_starts_copying_into_is_not_collected(
    cluster: Cluster, store: MemoryStore, clock: FakeClock
) -> None:
    # The look at Meta just before the delete knew only <extent>/<target> records: a copier
    # of the version before, during a rolling upgrade, puts <extent> alone.
    n2 = cluster.replicas["n2"].store
    ext_id = new_extent_id()
    await n2.create(ext_id, EXTENT)
    gc = orphans(cluster, clock)
    assert await gc.run_pass() == []  # found
    await clock.advance(61)
    copy = new_record(
        "v", ExtentRecord(id=ext_id, size=EXTENT, replicas=["n1"]), "n2", "re-replicate"
    )
    real_tables = cluster.meta.tables

    async def tables() -> Any:  # the older copier starts right after the collector's look
        t = await real_tables()
        await store.put(keys.ABS_RECOVERY + ext_id, copy.dump())
        return t

    cluster.meta.tables = tables  # type: ignore[method-assign]
    assert await gc.run_pass() == []
    assert await n2.exists(ext_id)


async def test_volume_show_lists_every_copy_of_an_extent_in_progress(
    cluster: Cluster, store: MemoryStore
) -> None:
    # Copies were keyed by extent: of two copies of one extent, one was shown.
    await cluster.meta.create_volume("v", EXTENT, replicas=2)
    await fill(cluster, "v", b"A" * BLOCK)
    vol, _ = await cluster.meta.volume("v")
    ext, _ = await cluster.meta.extent(vol.extents[0] or "")
    for target, copied in (("n3", BLOCK), ("n4", 0)):
        rec = new_record("v", ext, target, "re-replicate")
        rec = rec.model_copy(update={"total_bytes": 2 * BLOCK, "copied_bytes": copied})
        await store.put(keys.abs_recovery(ext.id, target), rec.dump())
    shown = await VolumeService(cluster.meta, cluster.pool).show("v")
    assert shown.extents[0].recovery == (
        f"re-replicate to n3: 50% of {2 * BLOCK} bytes; re-replicate to n4: 0% of {2 * BLOCK} bytes"
    )


async def test_copies_of_one_extent_to_two_targets_each_keep_their_target_named(
    cluster: Cluster, clock: FakeClock
) -> None:
    # Records were keyed by extent: a second copier's record replaced the first one's, and
    # the first one's end deleted the second one's, leaving its target to the collector.
    ext_id = new_extent_id()
    for node in ("n2", "n3"):
        await cluster.replicas[node].store.create(ext_id, EXTENT)

    def copy(target: str, volume: str) -> RecoveryRecord:
        ext = ExtentRecord(id=ext_id, size=EXTENT, replicas=["n1"])
        return new_record(volume, ext, target, "re-replicate")

    to_n2, to_n3 = copy("n2", "v"), copy("n3", "c")
    await cluster.board.put(to_n2)
    await cluster.board.put(to_n3)
    again = copy("n2", "c")  # a third copier, into n2 as well
    await cluster.board.put(again)
    await cluster.board.clear(to_n2)  # the first ends: the record is not its own any more
    collectors = [orphans(cluster, clock, n) for n in ("n2", "n3")]
    for _ in range(3):
        for gc in collectors:
            assert await gc.run_pass() == []
        await clock.advance(61)
    assert {(r.target, r.volume) for r in await cluster.board.held()} == {("n2", "c"), ("n3", "c")}
    await cluster.board.clear(again)
    await cluster.board.clear(to_n3)
    assert await cluster.board.held() == []


async def test_a_re_replication_whose_copy_cannot_be_published_makes_no_copy(
    cluster: Cluster, store: MemoryStore, clock: FakeClock, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The failure to publish was swallowed: the copy went on with no record naming its target.
    await cluster.meta.create_volume("v", EXTENT, replicas=2)
    dev = await cluster.open("v")
    await dev.write(0, b"\x11" * BLOCK)
    vol, _ = await cluster.meta.volume("v")
    ext, _ = await cluster.meta.extent(vol.extents[0] or "")
    lost = next(n for n in ext.replicas if n != "n1")
    third = ({"n1", "n2", "n3"} - set(ext.replicas)).pop()
    cluster.replicas[lost].down = True
    await store.delete(keys.abs_server(lost))
    rep = Repairer(dev, RecoveryPolicy(grace=60, rate=1e12), cluster.board)
    await rep.run_pass()
    await clock.advance(61)

    async def unavailable(rec: RecoveryRecord) -> None:
        raise Unavailable("the store is unreachable")

    monkeypatch.setattr(cluster.board, "put", unavailable)
    [sentence] = await rep.run_pass()
    assert "repair failed, will retry" in sentence and "unreachable" in sentence
    assert not await cluster.replicas[third].store.exists(ext.id)
    await dev.close()


def test_the_orphan_grace_period_has_a_floor_of_several_recovery_passes() -> None:
    # 0 was accepted: a replica being built would be deleted before anything named it.
    for storage, floor in (
        ({"orphan_grace_s": 0.5}, 60),
        ({"orphan_grace_s": 100, "recovery_interval_s": 30}, 125),
    ):
        with pytest.raises(ConfigError) as err:
            parse(good() | {"storage": storage})
        [problem] = err.value.fields["problems"]
        assert problem.startswith(f"storage.orphan_grace_s: must be at least {floor} s")
    assert parse(good() | {"storage": {"orphan_grace_s": 60}}).storage.orphan_grace_s == 60


# ---- a delete while an export closes ---------------------------------------------------------


async def attached(meta: MetaService, store: MemoryStore) -> Holder:
    await meta.create_volume("v", EXTENT, replicas=1)
    lease = await store.grant_lease(3600)
    _, epoch = await meta.attach("v", "n1", lease, ap="ap1")
    return Holder("v", "n1", epoch, "ap1")


async def test_a_delete_during_an_exports_closing_flush_waits_for_the_detach(
    cluster: Cluster, store: MemoryStore
) -> None:
    holder = await attached(cluster.meta, store)
    await cluster.meta.mark_closing(holder)
    deleting = asyncio.ensure_future(cluster.meta.delete_volume("v"))
    for _ in range(20):
        await asyncio.sleep(0)
    assert not deleting.done()  # waiting, not "in use"
    await cluster.meta.detach("v", holder.node, holder.epoch, holder.ap)
    assert await deleting == []
    assert await store.get(keys.abs_volume("v")) is None


async def test_a_delete_just_after_the_client_left_waits_for_its_server_to_notice(
    cluster: Cluster, store: MemoryStore
) -> None:
    # the client has exited, but its storage server has not yet marked the export closing
    holder = await attached(cluster.meta, store)
    deleting = asyncio.ensure_future(cluster.meta.delete_volume("v"))
    for _ in range(20):
        await asyncio.sleep(0)
    assert not deleting.done()
    await cluster.meta.mark_closing(holder)
    await cluster.meta.detach("v", holder.node, holder.epoch, holder.ap)
    assert await deleting == []


async def test_a_delete_of_a_volume_in_use_or_closing_too_long_is_refused(
    cluster: Cluster, store: MemoryStore, clock: FakeClock
) -> None:
    holder = await attached(cluster.meta, store)
    deleting = asyncio.ensure_future(cluster.meta.delete_volume("v"))
    await clock.until_sleeping()
    await clock.advance(SETTLE - 0.1)
    assert not deleting.done()  # the client may have just left: waiting for its server
    await clock.advance(0.1)
    with pytest.raises(InvalidState, match="in use"):  # not closing: a client holds it
        await deleting
    await cluster.meta.mark_closing(holder)
    deleting = asyncio.ensure_future(cluster.meta.delete_volume("v"))
    await clock.until_sleeping()
    await clock.advance(CLOSE_WAIT - 0.1)
    assert not deleting.done()  # closing: waiting for its flush and detach
    await clock.advance(0.1)
    with pytest.raises(InvalidState, match="in use"):  # the close took too long
        await deleting
    assert await store.get(keys.abs_volume("v")) is not None


async def test_a_snapshot_taken_as_the_last_client_leaves_waits_for_the_detach(
    cluster: Cluster, store: MemoryStore
) -> None:
    holder = await attached(cluster.meta, store)
    await cluster.meta.mark_closing(holder)
    snapping = asyncio.ensure_future(SnapshotService(cluster.meta, cluster.pool).snapshot("v", "s"))
    for _ in range(20):
        await asyncio.sleep(0)
    assert not snapping.done()  # waiting, not "attached on n1"
    await cluster.meta.detach("v", holder.node, holder.epoch, holder.ap)
    assert (await snapping).ready
