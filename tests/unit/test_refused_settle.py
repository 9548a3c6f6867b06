"""The undo of a refused write that does not settle at once: what it may write (never an
extent a snapshot froze meanwhile), who finishes it (the next access point or the Meta
leader, from its record in Meta; never one that lost the volume, nor at an old epoch on a
replica a newer one claimed), what a snapshot or clone does meanwhile (refused), and how it
runs (Meta told without holding writes back, the range piece by piece, whole sectors)."""

from __future__ import annotations

import asyncio
import functools
from pathlib import Path
from typing import Any

import pytest

from aecp.common.errors import InvalidState, Unavailable
from aecp.storage.access import VolumeDevice
from aecp.storage.attach import open_volume
from aecp.storage.blockdev import Fenced, NoSpace
from aecp.storage.chunk.errors import ReplicaUnavailable, StaleEpoch
from aecp.storage.leader import idle_volumes
from aecp.storage.refused import PIECE, retry
from aecp.storage.snapshots import SnapshotService
from tests.unit.abskit import BLOCK, EXTENT, Cluster
from tests.unit.test_recovery_races import Override
from tests.unit.test_refused_undo import (
    corrupt,
    n1_full,
    no_room,
    refused_once_x_is_dropped,
    repairer,
)
from tests.unit.test_refused_writes import agree, catch_up, hook, written

SECTOR = 4096


async def trim_refused_without_room(cluster: Cluster) -> tuple[VolumeDevice, str, list[str]]:
    """Volume ``v`` (two replicas, blocks 0-1 written with 0x11), then a trim of block 1
    that n1 refuses for want of room, as it refuses the undo's: (the access point, the
    extent, its replicas' nodes). The other replica took the trim; the undo is pending."""
    dev, ext_id, replicas = await written(cluster, data=b"\x11" * 2 * BLOCK)

    async def trim(*args: Any, **kw: Any) -> None:
        raise no_room()

    hook(cluster, "n1", "trim", trim)
    with pytest.raises(NoSpace):
        await dev.trim(BLOCK, BLOCK)
    assert dev.undos
    return dev, ext_id, replicas


def room_again(cluster: Cluster, node: str) -> None:
    cluster.pool.add(node, cluster.replicas[node])  # type: ignore[arg-type]


def third(replicas: list[str]) -> str:
    [node] = {"n1", "n2", "n3"} - set(replicas)
    return node


# ---- a snapshot taken while an undo is pending ------------------------------------------------


async def test_a_snapshot_is_refused_while_a_refused_trim_of_its_volume_is_not_undone(
    cluster: Cluster,
) -> None:
    # The snapshot kept replicas that disagreed on the trim's range, and the undo, once room
    # appeared, wrote into the extent that only the snapshot named by then.
    dev, ext_id, replicas = await trim_refused_without_room(cluster)
    snaps = SnapshotService(cluster.meta, cluster.pool)
    with pytest.raises(InvalidState, match=ext_id):
        await snaps.snapshot("v", "s", paused_on="n1")
    assert await snaps.snapshots("v") == []
    room_again(cluster, "n1")
    [sentence] = await repairer(cluster, dev).run_pass()
    assert "was undone" in sentence
    assert await cluster.meta.unsettled.of("v") == []
    assert await agree(cluster, ext_id, replicas)
    await snaps.snapshot("v", "s", paused_on="n1")
    await dev.close()


async def test_an_undo_never_writes_an_extent_that_a_snapshot_froze_meanwhile(
    cluster: Cluster,
) -> None:
    # The undo could not be recorded, so the snapshot was taken; the VM then wrote, the access
    # point adopted the snapshot's epoch and copied the slot on write. Once room appeared, the
    # undo wrote at that epoch into the old extent, which only the snapshot named.
    real_add = cluster.meta.unsettled.add

    async def add(*args: Any, **kw: Any) -> None:
        raise Unavailable("etcd: deadline exceeded")

    cluster.meta.unsettled.add = add  # type: ignore[method-assign]
    dev, ext_id, _ = await trim_refused_without_room(cluster)
    cluster.meta.unsettled.add = real_add  # type: ignore[method-assign]
    await SnapshotService(cluster.meta, cluster.pool).snapshot("v", "s", paused_on="n1")
    await dev.write(0, b"\x22" * SECTOR)  # the VM again: the slot is copied on write
    assert dev.vol.extents[0] != ext_id
    frozen = await cluster.replicas["n1"].store.read(ext_id, 0, EXTENT)
    room_again(cluster, "n1")
    await retry(dev)
    assert not dev.undos
    assert await cluster.replicas["n1"].store.read(ext_id, 0, EXTENT) == frozen
    await dev.close()


async def test_reads_of_an_extent_whose_undo_is_pending_return_what_the_undo_will_leave(
    cluster: Cluster,
) -> None:
    # Reads went to this node's replica first, which had refused the trim: the range read as
    # before the trim until the undo completed, then as trimmed.
    dev, ext_id, replicas = await trim_refused_without_room(cluster)
    assert dev.read_nowait(BLOCK, SECTOR) is None
    assert await dev.read(BLOCK, BLOCK) == bytes(BLOCK)
    assert await dev.read(0, SECTOR) == b"\x11" * SECTOR
    room_again(cluster, "n1")
    await retry(dev)
    assert await dev.read(BLOCK, BLOCK) == bytes(BLOCK)
    assert await agree(cluster, ext_id, replicas)
    await dev.close()


# ---- who finishes it -------------------------------------------------------------------------


async def test_an_undo_pending_when_its_access_point_closes_is_finished_by_the_next_one(
    cluster: Cluster,
) -> None:
    # It lived in the closing access point only: abandoned there, the replicas disagreed for
    # good.
    dev, ext_id, replicas = await trim_refused_without_room(cluster)
    await dev.close()  # tries once more: still no room
    assert [u.extent for u in await cluster.meta.unsettled.of("v")] == [ext_id]
    room_again(cluster, "n1")
    dev2 = await cluster.open("v")
    [sentence] = await repairer(cluster, dev2).run_pass()
    assert "was undone" in sentence
    assert await cluster.meta.unsettled.of("v") == []
    assert await agree(cluster, ext_id, replicas)
    assert await dev2.read(0, 2 * BLOCK) == b"\x11" * BLOCK + bytes(BLOCK)
    await dev2.close()


async def test_the_meta_leader_finishes_the_undo_of_a_volume_nobody_attached(
    cluster: Cluster,
) -> None:
    # Its recovery attached only degraded idle volumes: one whose undo was left unsettled
    # was never looked at. A snapshot or clone of it must wait for it meanwhile.
    dev, ext_id, replicas = await trim_refused_without_room(cluster)
    await dev.close()
    snaps = SnapshotService(cluster.meta, cluster.pool)
    with pytest.raises(InvalidState, match=ext_id):
        await snaps.snapshot("v", "s")
    with pytest.raises(InvalidState, match=ext_id):
        await snaps.clone_volume("v", "c")
    assert await idle_volumes(cluster.meta, degraded_only=True) == ["v"]
    room_again(cluster, "n1")
    lease = await cluster.store.grant_lease(3600)
    repair = await open_volume(cluster.meta, cluster.pool, "n2", "v", lease, purpose="repair")
    [sentence] = await repairer(cluster, repair).run_pass()
    assert "was undone" in sentence
    await repair.close()
    assert await agree(cluster, ext_id, replicas)
    assert await idle_volumes(cluster.meta, degraded_only=True) == []
    await snaps.clone_volume("v", "c")


async def test_deleting_a_volume_forgets_the_undos_it_left_unsettled(cluster: Cluster) -> None:
    dev, _, _ = await trim_refused_without_room(cluster)
    await dev.close()
    await cluster.meta.delete_volume("v")
    assert await cluster.meta.unsettled.volumes() == set()


# ---- an access point that lost the volume ------------------------------------------------------


class Recording:
    """A replica client that notes the epoch of every write and trim sent to it."""

    def __init__(self, client: Any, node: str, sent: list[tuple[str, int]]) -> None:
        self.client, self.node, self.sent = client, node, sent

    def __getattr__(self, name: str) -> Any:
        target = getattr(self.client, name)
        if name not in ("write", "trim"):
            return target

        def call(*args: Any, **kw: Any) -> Any:
            self.sent.append((self.node, kw["epoch"]))
            return target(*args, **kw)

        return call


async def test_an_access_point_that_lost_its_volume_undoes_nothing_when_it_closes(
    cluster: Cluster,
) -> None:
    # Closed after a lost lease, it still retried its undos at its old epoch, although it no
    # longer held the volume: a replica the new holder had not fenced yet took them.
    dev, ext_id, _ = await trim_refused_without_room(cluster)
    room_again(cluster, "n1")
    new = await cluster.open("v", "n2", takeover=True)
    sent: list[tuple[str, int]] = []
    for node in ("n1", "n2", "n3"):
        recording: Any = Recording(cluster.replicas[node], node, sent)
        cluster.pool.add(node, recording)
    await dev.close()
    assert sent == []
    assert [u.extent for u in await cluster.meta.unsettled.of("v")] == [ext_id]
    [sentence] = await repairer(cluster, new).run_pass()  # the holder finishes it
    assert "was undone" in sentence
    assert {epoch for _, epoch in sent} == {new.epoch}
    await new.close()


async def test_an_undo_refused_for_a_newer_access_points_epoch_fences_the_old_one(
    cluster: Cluster,
) -> None:
    # The refusal left the undo pending and resolved nothing: the old access point went on
    # serving and retrying at its old epoch.
    dev, ext_id, replicas = await trim_refused_without_room(cluster)
    room_again(cluster, "n1")
    new = await cluster.open("v", "n2", takeover=True)
    [sentence] = await retry(dev)
    assert "not undone here" in sentence and not dev.undos
    with pytest.raises(Fenced):
        await dev.read(0, SECTOR)
    assert [u.extent for u in await cluster.meta.unsettled.of("v")] == [ext_id]
    [sentence] = await repairer(cluster, new).run_pass()
    assert "was undone" in sentence
    assert await agree(cluster, ext_id, replicas)
    await new.close()


async def test_a_replica_refuses_an_older_access_points_copies_once_a_newer_one_joins_it(
    cluster: Cluster,
) -> None:
    # A joiner was fenced only at its admission, and a raw copy carries no epoch: the old
    # access point's copy and undo still reached a replica the new one was catching up.
    dev, ext_id, replicas = await written(cluster)
    joiner = third(replicas)
    await cluster.replicas[joiner].store.create(ext_id, EXTENT, epoch=dev.epoch)
    await dev.begin_join(ext_id, joiner)
    new = await cluster.open("v", "n2", takeover=True)
    await new.begin_join(ext_id, joiner)
    assert (await cluster.replicas[joiner].store.stat(ext_id)).epoch == new.epoch
    src, dst = await cluster.pool.client(replicas[0]), await cluster.pool.client(joiner)
    with pytest.raises(StaleEpoch):
        await dev.copy_range(ext_id, src, dst, 0, BLOCK)
    await new.end_join(ext_id, None)
    await new.close()
    await dev.close()


async def test_an_old_access_points_undo_never_reaches_a_replica_a_newer_one_catches_up(
    cluster: Cluster,
) -> None:
    # The old access point read the range to undo, then a newer one attached, acknowledged W2
    # and copied it into the joiner, still at the old epoch. The old undo went on: the valid
    # replicas refused its epoch, the joiner took it, and W2 was gone from a replica about to
    # be admitted.
    dev, ext_id, replicas = await trim_refused_without_room(cluster)
    joiner = third(replicas)
    await cluster.replicas[joiner].store.create(ext_id, EXTENT, epoch=dev.epoch)
    await dev.begin_join(ext_id, joiner)
    newer: list[VolumeDevice] = []

    async def taken_over_first(node: str, e: str, offset: int, length: int, **kw: Any) -> None:
        if not newer:  # the undo's first write: a newer access point comes meanwhile
            new = await cluster.open("v", "n2", takeover=True)
            newer.append(new)
            await new.write(BLOCK, b"\x22" * SECTOR)  # W2
            await new.begin_join(ext_id, joiner)
            src, dst = cluster.replicas[replicas[0]], cluster.replicas[joiner]
            await new.copy_range(ext_id, src, dst, 0, EXTENT)  # type: ignore[arg-type]
        await cluster.replicas[node].trim(e, offset, length, **kw)

    for node in replicas:
        hook(cluster, node, "trim", functools.partial(taken_over_first, node))
    await retry(dev)
    assert await cluster.replicas[joiner].store.read(ext_id, BLOCK, SECTOR) == b"\x22" * SECTOR
    with pytest.raises(Fenced):
        await dev.read(0, SECTOR)
    await newer[0].end_join(ext_id, None)
    await newer[0].close()


# ---- how the undo runs -------------------------------------------------------------------------


async def test_a_write_to_the_extent_is_not_held_back_while_its_undo_waits_for_meta(
    cluster: Cluster,
) -> None:
    # Meta was told with the extent quiesced: while etcd was slow, every write to the extent
    # waited for it.
    dev, _, x = await n1_full(cluster)
    rx = cluster.replicas[x]

    async def x_write(e: str, offset: int, data: Any, **kw: Any) -> None:
        if bytes(data[:1]) == b"\x11":  # the undo's: x fails it, and is dropped
            raise ReplicaUnavailable(x, "connection reset")
        await rx.write(e, offset, data, **kw)

    hook(cluster, x, "write", x_write)
    real_drop = cluster.meta.drop_replicas
    taken: list[bool] = []

    async def drop(*args: Any, **kw: Any) -> Any:
        w3 = dev.write_nowait(8192, b"\x33" * SECTOR)  # taken at once: the extent is free
        taken.append(w3 is not None)
        if w3 is not None:
            await w3
        return await real_drop(*args, **kw)

    cluster.meta.drop_replicas = drop  # type: ignore[method-assign]
    with pytest.raises(NoSpace):
        await dev.write(0, b"\x66" * 3 * BLOCK)
    assert taken == [True]
    assert not dev.undos
    assert await dev.read(8192, SECTOR) == b"\x33" * SECTOR
    await dev.close()


async def test_a_large_undo_lets_writes_to_its_extent_through_between_its_pieces(
    cluster: Cluster,
) -> None:
    # The whole range was restored under one hold of the copy lock, on every member: a write
    # to the extent waited for all of it.
    dev, ext_id, x = await n1_full(cluster)
    rx = cluster.replicas[x]
    w3: list[asyncio.Future[None]] = []
    done_before_the_next_piece: list[bool] = []

    async def x_write(e: str, offset: int, data: Any, **kw: Any) -> None:
        if bytes(data[:1]) == b"\x11" and not w3:  # the undo's first piece
            w3.append(asyncio.ensure_future(dev.write(8192, b"\x33" * SECTOR)))
        await rx.write(e, offset, data, **kw)

    async def x_trim(e: str, offset: int, length: int, **kw: Any) -> None:
        if offset >= PIECE:  # the undo's second piece
            done_before_the_next_piece.append(w3[0].done())
        await rx.trim(e, offset, length, **kw)

    both: Any = Override(Override(rx, "write", x_write), "trim", x_trim)
    cluster.pool.add(x, both)
    with pytest.raises(NoSpace):
        await dev.write(0, b"\x66" * (PIECE + BLOCK))  # blocks 2-4 are new: refused by n1
    assert done_before_the_next_piece == [True]
    await w3[0]
    assert not dev.undos
    assert await agree(cluster, ext_id, ["n1", x])
    assert await dev.read(0, BLOCK) == b"\x11" * 8192 + b"\x33" * SECTOR + b"\x11" * (
        BLOCK - 8192 - SECTOR
    )
    await dev.close()


async def test_an_undo_over_a_sector_a_replica_cannot_read_rewrites_it_and_drops_nobody(
    cluster: Cluster, tmp_path: Path
) -> None:
    # The undo wrote the edges of the refused range as parts of sectors. On a replica whose
    # edge sector failed its checksum (torn by a full disk), that read-modify-write failed
    # and the replica was dropped: a full disk cost a copy.
    dev, ext_id, x = await n1_full(cluster)
    rx = cluster.replicas[x]

    async def x_write(e: str, offset: int, data: Any, **kw: Any) -> None:
        await rx.write(e, offset, data, **kw)
        if bytes(data[:1]) == b"\x66":  # the refused write landed; its first sector tears
            corrupt(tmp_path / x, ext_id, 2 * BLOCK - SECTOR + 10)

    hook(cluster, x, "write", x_write)
    with pytest.raises(NoSpace):
        await dev.write(2 * BLOCK - 100, b"\x66" * 300)  # into block 2, new on n1: refused
    assert not dev.undos
    ext, _ = await cluster.meta.extent(ext_id)
    assert sorted(ext.replicas) == sorted(["n1", x]) and ext.stale == {}
    assert await rx.store.scrub(ext_id) == []
    assert await agree(cluster, ext_id, ["n1", x])
    await dev.close()


async def test_a_replica_dropped_before_an_undo_copies_back_a_refused_write_to_part_of_a_sector(
    cluster: Cluster,
) -> None:
    # The refused write covered part of a sector the refusing replica never wrote: the undo
    # trimmed just that part there, which changed nothing and so raised no generation. With
    # Meta failing to lower the dropped replica's catch-up, it then skipped the block and
    # kept the refused bytes.
    dev, ext_id, x = await n1_full(cluster)
    await refused_once_x_is_dropped(cluster, dev, x, 2 * BLOCK + 100, 200)  # block 2
    assert not dev.undos
    await dev.close()
    cluster.replicas["n1"].store.space.capacity = None
    rx = cluster.replicas[x]
    [sentence] = await catch_up(cluster)
    assert f"{x} caught up" in sentence
    assert await rx.store.read(ext_id, 2 * BLOCK, SECTOR) == bytes(SECTOR)
    assert await rx.store.read(ext_id, 8192, SECTOR) == b"\x77" * SECTOR
