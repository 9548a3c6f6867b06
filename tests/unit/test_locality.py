"""Data locality after a VM moves: the repair pass of a volume attached for a client's I/O
moves one replica per extent per pass to the access point's node, never leaving an extent
with fewer valid replicas than its factor, losing no write made during the copy, and deleting
the replaced replica only once Meta names the new set."""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import Sequence
from typing import Any

import pytest

from aecp.cluster.volumes import VolumeService
from aecp.common.clock import FakeClock
from aecp.storage.access import VolumeDevice
from aecp.storage.attach import open_volume
from aecp.storage.chunk.errors import ExtentNotFound
from aecp.storage.meta.model import ExtentRecord, StorageServer
from aecp.storage.recovery import LOCALITY, RecoveryPolicy, Repairer, locality_move
from aecp.store import keys
from aecp.store.base import Compare, Put
from aecp.store.memory import MemoryStore
from tests.unit.abskit import EXTENT, Cluster

SLOTS = 4


def pattern(size: int) -> bytearray:
    """4 KiB blocks, each of one byte value that differs from its neighbours' and from the
    same block's in another extent."""
    per = EXTENT // 4096
    return bytearray(
        b"".join(bytes([1 + (b * 7 + b // per * 31) % 251]) * 4096 for b in range(size // 4096))
    )


async def moved_vm(cluster: Cluster) -> tuple[VolumeDevice, bytearray]:
    """A 2-replica volume of 4 extents written from n3 (its extents on n3 and n1), then
    attached on n2 as after a live migration: n2 holds none of its replicas."""
    await cluster.meta.create_volume("v", SLOTS * EXTENT, replicas=2)
    data = pattern(SLOTS * EXTENT)
    first = await cluster.open("v", node="n3")
    await first.write(0, bytes(data))
    await first.flush()
    await first.close()
    dev = await cluster.open("v", node="n2")
    for ext in await extents(cluster):
        assert sorted(ext.replicas) == ["n1", "n3"]
    return dev, data


async def extents(cluster: Cluster) -> list[ExtentRecord]:
    vol, _ = await cluster.meta.volume("v")
    return [(await cluster.meta.extent(x))[0] for x in vol.extents if x]


def watch_extent_records(store: MemoryStore, monkeypatch: pytest.MonkeyPatch) -> list[list[str]]:
    """Every replica set stored for an extent from now on (every change goes through
    ``txn``: ``replace`` and ``create`` too)."""
    seen: list[list[str]] = []
    txn = store.txn

    async def noting_txn(
        compare: Sequence[Compare], success: Sequence[Any], failure: Sequence[Any] = ()
    ) -> bool:
        ok = await txn(compare, success, failure)
        for op in success if ok else failure:
            if isinstance(op, Put) and op.key.startswith(keys.ABS_EXTENTS):
                seen.append(ExtentRecord.load(op.value).replicas)
        return ok

    monkeypatch.setattr(store, "txn", noting_txn)
    return seen


def repairer(cluster: Cluster, dev: VolumeDevice) -> Repairer:
    return Repairer(dev, RecoveryPolicy(grace=60, rate=1e12), cluster.board)


async def test_repair_passes_move_one_replica_per_extent_to_the_vms_new_node(
    cluster: Cluster, store: MemoryStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    dev, data = await moved_vm(cluster)
    stored = watch_extent_records(store, monkeypatch)
    rep = repairer(cluster, dev)
    for done in range(1, SLOTS + 1):
        [sentence] = await rep.run_pass()
        assert "locality: replica moved from n3 to n2" in sentence  # n3: the least free
        exts = await extents(cluster)
        assert all(len(e.replicas) >= 2 and not e.stale for e in exts)
        assert sum("n2" in e.replicas for e in exts) == done
    assert all(len(r) >= 2 for r in stored)  # at every change Meta recorded
    assert stored.count(["n1", "n2"]) == SLOTS  # n2 admitted in n3's place, in one change
    assert await rep.run_pass() == []  # every extent is local now: nothing more
    for ext in await extents(cluster):
        assert sorted(ext.replicas) == ["n1", "n2"]
        with pytest.raises(ExtentNotFound):  # deleted once Meta named the new set
            await cluster.replicas["n3"].store.stat(ext.id)
        for node in ("n1", "n2"):
            assert await cluster.replicas[node].store.read(ext.id, 0, EXTENT) == bytes(
                data[(await slot_of(cluster, ext.id)) * EXTENT :][:EXTENT]
            )
    assert await dev.read(0, SLOTS * EXTENT) == bytes(data)
    assert {p.kind for p in cluster.board.puts} == {LOCALITY}
    assert await cluster.board.held() == []
    await dev.close()


async def slot_of(cluster: Cluster, ext_id: str) -> int:
    vol, _ = await cluster.meta.volume("v")
    return vol.extents.index(ext_id)


async def test_writes_during_a_locality_copy_are_on_every_replica_afterwards(
    cluster: Cluster,
) -> None:
    dev, data = await moved_vm(cluster)
    real_copy, value = dev.copy_range, itertools.count(1)
    copied: list[int] = []

    async def write(offset: int) -> None:
        chunk = bytes([next(value) % 256]) * 4096
        data[offset : offset + 4096] = chunk
        await dev.write(offset, chunk)

    async def copy_amid_writes(ext: str, src: Any, dst: Any, offset: int, length: int) -> None:
        """Live writes before the range is copied (into it and elsewhere in the extent) and
        while it is copied (they wait for the copy lock)."""
        base = (await slot_of(cluster, ext)) * EXTENT
        for at in (offset + 4096, offset + length - 8192):
            await write(base + at)
        waiting = [asyncio.ensure_future(write(base + at)) for at in (offset, length // 2)]
        await real_copy(ext, src, dst, offset, length)
        await asyncio.gather(*waiting)
        copied.append(offset)

    dev.copy_range = copy_amid_writes  # type: ignore[method-assign]
    [sentence] = await repairer(cluster, dev).run_pass()
    assert "locality" in sentence and copied
    [moved] = [e for e in await extents(cluster) if "n2" in e.replicas]
    assert sorted(moved.replicas) == ["n1", "n2"]
    want = bytes(data[(await slot_of(cluster, moved.id)) * EXTENT :][:EXTENT])
    for node in moved.replicas:
        assert await cluster.replicas[node].store.read(moved.id, 0, EXTENT) == want
    dev.copy_range = real_copy  # type: ignore[method-assign]
    assert await dev.read(0, SLOTS * EXTENT) == bytes(data)
    await dev.close()


async def test_a_move_whose_replaced_replica_failed_meanwhile_is_not_admitted(
    cluster: Cluster,
) -> None:
    dev, data = await moved_vm(cluster)
    real_copy = dev.copy_range

    async def copy_as_n3_fails(ext: str, src: Any, dst: Any, offset: int, length: int) -> None:
        """The copy is made; then, before the admission, n3 fails (dropped: stale) and a
        write goes to the replica left and the joining one."""
        await real_copy(ext, src, dst, offset, length)
        cluster.replicas["n3"].down = True
        await dev.drop(ext, ["n3"])
        base = (await slot_of(cluster, ext)) * EXTENT
        await dev.write(base, b"\x5a" * 4096)
        data[base : base + 4096] = b"\x5a" * 4096

    dev.copy_range = copy_as_n3_fails  # type: ignore[method-assign]
    [sentence] = await repairer(cluster, dev).run_pass()
    assert "locality move to n2 failed, will retry" in sentence
    assert "n3 is no longer a valid replica" in sentence
    [ext] = [e for e in await extents(cluster) if e.stale]
    assert ext.replicas == ["n1"] and "n3" in ext.stale  # degraded by the failure, not the move
    with pytest.raises(ExtentNotFound):  # the copy on n2 was deleted again
        await cluster.replicas["n2"].store.stat(ext.id)
    assert await cluster.board.held() == []
    dev.copy_range = real_copy  # type: ignore[method-assign]
    cluster.replicas["n3"].down = False
    [caught_up] = await repairer(cluster, dev).run_pass()  # recovery first, no move this pass
    assert "n3 caught up" in caught_up
    assert await dev.read(0, SLOTS * EXTENT) == bytes(data)
    await dev.close()


async def test_a_locality_copy_is_throttled_and_on_the_recovery_board_meanwhile(
    cluster: Cluster, clock: FakeClock
) -> None:
    dev, data = await moved_vm(cluster)
    rep = Repairer(dev, RecoveryPolicy(grace=60, rate=EXTENT / 10), cluster.board)
    passing = asyncio.ensure_future(rep.run_pass())
    await clock.until_sleeping()  # 1 MiB at a tenth of it per second: 10 s
    [rec] = await cluster.board.held()
    assert (rec.kind, rec.target, rec.volume) == (LOCALITY, "n2", "v")
    assert "n2" not in (await cluster.meta.extent(rec.extent))[0].replicas  # not yet
    await clock.advance(10)
    [sentence] = await passing
    assert "locality" in sentence and await cluster.board.held() == []
    assert "n2" in (await cluster.meta.extent(rec.extent))[0].replicas
    assert await dev.read(0, SLOTS * EXTENT) == bytes(data)
    await dev.close()


async def test_a_volume_whose_node_holds_every_extent_does_nothing(cluster: Cluster) -> None:
    await cluster.meta.create_volume("v", SLOTS * EXTENT, replicas=2)
    dev = await cluster.open("v", node="n2")
    await dev.write(0, bytes(pattern(SLOTS * EXTENT)))
    before = await extents(cluster)
    assert all("n2" in e.replicas for e in before)
    assert await repairer(cluster, dev).run_pass() == []
    assert await extents(cluster) == before and cluster.board.puts == []
    await dev.close()


async def test_a_volume_attached_only_for_repair_is_not_moved(
    cluster: Cluster, store: MemoryStore
) -> None:
    dev, _ = await moved_vm(cluster)
    await dev.close()
    lease = await store.grant_lease(3600)
    repair = await open_volume(cluster.meta, cluster.pool, "n2", "v", lease, purpose="repair")
    assert await repairer(cluster, repair).run_pass() == []
    assert all("n2" not in e.replicas for e in await extents(cluster))
    await repair.close()


async def test_volume_show_tells_how_many_extents_are_local_and_the_move_in_progress(
    cluster: Cluster,
) -> None:
    dev, _ = await moved_vm(cluster)
    svc = VolumeService(cluster.meta, cluster.pool)
    shown = await svc.show("v")
    assert (shown.local_extents, shown.locality) == (0, "0 of 4 extents on n2")
    real_copy, during = dev.copy_range, []

    async def copy_and_look(ext: str, src: Any, dst: Any, offset: int, length: int) -> None:
        await real_copy(ext, src, dst, offset, length)
        during.append(await svc.show("v"))

    dev.copy_range = copy_and_look  # type: ignore[method-assign]
    await repairer(cluster, dev).run_pass()
    [ext_id] = {r.split(":")[0] for r in during[0].recoveries}
    assert f"{ext_id}: locality to n2:" in during[0].recoveries[0]
    [health] = [h for h in during[0].extents if h.id == ext_id]
    assert health.recovery.startswith("locality to n2") and health.healthy
    shown = await svc.show("v")
    assert shown.locality == "1 of 4 extents on n2" and shown.recoveries == []
    await dev.close()
    assert (await svc.show("v")).locality == ""


def server(node: str, free: int, rack: str = "") -> StorageServer:
    return StorageServer(
        node=node,
        address="127.0.9.9",
        chunk_port=1,
        nbd_port=2,
        capacity_bytes=1 << 40,
        free_bytes=free,
        rack=rack,
    )


def test_the_replaced_replica_keeps_the_racks_apart_before_it_frees_space() -> None:
    ext = ExtentRecord(id="e", size=EXTENT, replicas=["a", "b", "c"])
    servers = {
        "a": server("a", 1 << 30, rack="r1"),
        "b": server("b", 1 << 31, rack="r2"),
        "c": server("c", 1 << 32, rack="r3"),
        "d": server("d", 1 << 33, rack="r2"),
    }
    assert locality_move(ext, servers, "d", 3) == "b"  # a has less room, but shares no rack
    untagged = {n: s.model_copy(update={"rack": ""}) for n, s in servers.items()}
    assert locality_move(ext, untagged, "d", 3) == "a"  # the least free space
    assert locality_move(ext, untagged, "a", 3) is None  # local already
    assert locality_move(ext, untagged, "e", 3) is None  # no storage server there
    full = {**untagged, "d": server("d", EXTENT - 1)}
    assert locality_move(ext, full, "d", 3) is None  # no room
    stale = ext.model_copy(update={"replicas": ["a", "b"], "stale": {"c": 1}})
    assert locality_move(stale, untagged, "d", 2) is None  # not healthy
