"""Snapshots and clones: O(1) creation, copy-on-write keeps them frozen, independence (delete in
any order), reclaiming extents nobody names, and snapshots of a volume a paused VM holds."""

from __future__ import annotations

import asyncio
import itertools
from typing import Any

import pytest

from aecp.cluster.volumes import VolumeService
from aecp.common.clock import FakeClock
from aecp.common.errors import InvalidState
from aecp.storage.access import VolumeDevice
from aecp.storage.meta.service import SETTLE
from aecp.storage.snapshots import SnapshotService
from aecp.store.memory import MemoryStore
from tests.unit.abskit import EXTENT, Cluster


def snaps(cluster: Cluster) -> SnapshotService:
    return SnapshotService(cluster.meta, cluster.pool)


async def fill(cluster: Cluster, name: str, data: bytes, offset: int = 0) -> None:
    dev = await cluster.open(name)
    await dev.write(offset, data)
    await dev.flush()
    await dev.close()


async def paused_snapshot(cluster: Cluster) -> tuple[SnapshotService, VolumeDevice]:
    """Volume ``v`` (one extent of b"0", two replicas) attached on n1, snapshotted as ``s``
    as for a paused VM; returns the service and the still-attached access point."""
    s = snaps(cluster)
    await cluster.meta.create_volume("v", EXTENT, replicas=2)
    dev = await cluster.open("v", "n1")
    await dev.write(0, b"0" * EXTENT)
    await s.snapshot("v", "s", paused_on="n1")
    return s, dev


async def content(cluster: Cluster, name: str, length: int = 2 * EXTENT) -> bytes:
    dev = await cluster.open(name)
    try:
        return await dev.read(0, length)
    finally:
        await dev.close()


async def test_a_snapshot_stays_frozen_while_the_volume_changes(cluster: Cluster) -> None:
    await cluster.meta.create_volume("v", 2 * EXTENT, replicas=2)
    await fill(cluster, "v", b"A" * EXTENT)
    s = snaps(cluster)
    await s.snapshot("v", "s1")
    await fill(cluster, "v", b"B" * 4096, offset=100)
    await s.clone("v", "s1", "c1")
    assert await content(cluster, "c1", 8192) == b"A" * 8192
    assert await content(cluster, "v", 8192) == b"A" * 100 + b"B" * 4096 + b"A" * 3996
    vol, _ = await cluster.meta.volume("v")
    snap, _ = await s.get("v", "s1")
    assert vol.extents[0] != snap.extents[0]  # copied on write
    assert vol.extents[1] is None and snap.extents[1] is None  # thin stays thin


async def test_snapshot_and_clone_cost_one_transaction_whatever_the_size(
    cluster: Cluster, store: MemoryStore
) -> None:
    s = snaps(cluster)
    costs = []
    for name, size in (("small", 1 << 30), ("huge", 1 << 40)):
        await cluster.meta.create_volume(name, size, replicas=1)
        await fill(cluster, name, b"x" * 4096)
        before = await store.revision()
        await s.snapshot(name, "snap")
        await s.clone(name, "snap", f"{name}-clone")
        costs.append(await store.revision() - before)
    assert costs == [2, 2]


@pytest.mark.parametrize("order", list(itertools.permutations(["v", "s1", "s2", "c1"])))
async def test_volumes_snapshots_and_clones_can_be_deleted_in_any_order(
    cluster: Cluster, order: tuple[str, ...]
) -> None:
    s = snaps(cluster)
    await cluster.meta.create_volume("v", 2 * EXTENT, replicas=2)
    await fill(cluster, "v", b"1" * EXTENT)
    await s.snapshot("v", "s1")
    await fill(cluster, "v", b"2" * EXTENT, offset=EXTENT)
    await s.snapshot("v", "s2")
    await s.clone("v", "s1", "c1")
    await s.clone("v", "s2", "c2")
    expect_c2 = b"1" * EXTENT + b"2" * EXTENT
    for item in order:
        if item == "v":
            for snap in ("s1", "s2"):
                if snap not in order[: order.index("v")]:
                    await s.delete("v", snap)  # a volume goes after its own snapshots
            await VolumeService(cluster.meta, cluster.pool).delete("v")
        elif item in ("s1", "s2"):
            if "v" not in order[: order.index(item)]:
                await s.delete("v", item)
        else:
            assert await content(cluster, "c1") == b"1" * EXTENT + bytes(EXTENT)
            freed = await VolumeService(cluster.meta, cluster.pool).delete("c1")
            assert freed == []  # replicas already deleted with the volume
        assert await content(cluster, "c2") == expect_c2  # untouched by any deletion
    await VolumeService(cluster.meta, cluster.pool).delete("c2")
    assert await cluster.meta.extents() == {}  # every extent reclaimed at the end
    for r in cluster.replicas.values():
        assert await r.store.list_extents() == []


async def test_a_volume_with_snapshots_cannot_be_deleted_first(cluster: Cluster) -> None:
    await cluster.meta.create_volume("v", EXTENT, replicas=1)
    await snaps(cluster).snapshot("v", "s")
    with pytest.raises(InvalidState, match="has snapshots"):
        await cluster.meta.delete_volume("v")


async def test_an_attached_volume_is_snapshotted_only_for_its_paused_vm(
    cluster: Cluster, clock: FakeClock
) -> None:
    s = snaps(cluster)
    await cluster.meta.create_volume("v", EXTENT, replicas=2)
    dev = await cluster.open("v", "n1")
    await dev.write(0, b"old!" * 1024)
    snapping = asyncio.ensure_future(s.snapshot("v", "s"))
    await clock.until_sleeping()
    await clock.advance(SETTLE)  # it waits as long for a client that may have just left
    with pytest.raises(InvalidState, match="attached on n1"):
        await snapping
    await s.snapshot("v", "s", paused_on="n1")
    await dev.write(0, b"new!" * 1024)  # adopts the new epoch, copies on write
    assert await dev.read(0, 4096) == b"new!" * 1024
    await dev.close()
    await s.clone("v", "s", "c")
    assert await content(cluster, "c", 4096) == b"old!" * 1024


async def test_rollback_restores_a_detached_volume(cluster: Cluster, clock: FakeClock) -> None:
    s = snaps(cluster)
    await cluster.meta.create_volume("v", EXTENT, replicas=1)
    await fill(cluster, "v", b"a" * 4096)
    await s.snapshot("v", "s")
    await fill(cluster, "v", b"b" * 4096)
    dev = await cluster.open("v")
    rolling = asyncio.ensure_future(s.rollback("v", "s"))
    await clock.until_sleeping()
    await clock.advance(SETTLE)  # it waits as long for a client that may have just left
    with pytest.raises(InvalidState, match="attached"):
        await rolling
    await dev.close()
    await s.rollback("v", "s")
    assert await content(cluster, "v", 4096) == b"a" * 4096


async def test_many_writes_in_flight_after_a_snapshot_all_adopt_the_new_epoch(
    cluster: Cluster,
) -> None:
    # Regression: every write in flight met StaleEpoch; the first adopted the new epoch, the
    # others then saw no newer epoch and fenced the access point (I/O errors in the guest).
    import asyncio

    s, dev = await paused_snapshot(cluster)
    await asyncio.gather(*(dev.write(i * 4096, bytes([i]) * 4096) for i in range(32)))
    assert await dev.read(31 * 4096, 4096) == bytes([31]) * 4096
    await dev.close()
    await s.clone("v", "s", "c")
    assert await content(cluster, "c", 4096) == b"0" * 4096


@pytest.mark.parametrize("path", ["write_nowait", "write"])
async def test_writes_started_while_a_snapshot_epoch_is_adopted_never_land_in_the_snapshot(
    cluster: Cluster, monkeypatch: pytest.MonkeyPatch, path: str
) -> None:
    # Regression (a VM's rolled-back disk held data written after its snapshot): the access
    # point took the new epoch, then awaited the volume record; a write started in between
    # still saw the old table (extent writable in place) and went out under the new epoch,
    # which the snapshot's fenced replicas accept.
    import asyncio

    s, dev = await paused_snapshot(cluster)
    reading, go_on = asyncio.Event(), asyncio.Event()
    real_volume = cluster.meta.volume

    async def slow_volume(name: str) -> Any:
        reading.set()
        await go_on.wait()
        return await real_volume(name)

    monkeypatch.setattr(cluster.meta, "volume", slow_volume)
    first = asyncio.ensure_future(dev.write(0, b"a" * 4096))  # meets StaleEpoch, adopts
    await reading.wait()
    second: Any = dev.write_nowait(4096, b"b" * 4096) if path == "write_nowait" else None
    if second is None:
        second = asyncio.ensure_future(dev.write(4096, b"b" * 4096))
    for _ in range(10):
        await asyncio.sleep(0)
    go_on.set()
    await asyncio.gather(first, second)
    assert await dev.read(0, 2 * 4096) == b"a" * 4096 + b"b" * 4096
    await dev.close()
    await s.clone("v", "s", "c")
    assert await content(cluster, "c", EXTENT) == b"0" * EXTENT


async def test_a_recovery_read_overtaken_by_a_snapshot_does_not_bring_back_the_old_table(
    cluster: Cluster,
) -> None:
    # The recovery loop reads the volume, then hands it to the access point: if a snapshot
    # was adopted in between, that older table must not make shared extents writable again.
    s = snaps(cluster)
    await cluster.meta.create_volume("v", EXTENT, replicas=2)
    dev = await cluster.open("v", "n1")
    await dev.write(0, b"0" * EXTENT)
    before, rev = await cluster.meta.volume("v")
    exts = await cluster.meta.extents()
    await s.snapshot("v", "s", paused_on="n1")
    await dev.write(0, b"a" * 4096)  # adopts the snapshot's epoch, copies on write
    dev.refresh(before, rev, exts)
    assert dev.vol.cow_epoch > before.cow_epoch
    await dev.write(4096, b"b" * 4096)
    await dev.close()
    await s.clone("v", "s", "c")
    assert await content(cluster, "c", EXTENT) == b"0" * EXTENT
