"""Snapshots and clones of volumes: O(1) metadata operations (redirect-on-write).

A snapshot copies the volume's extent table into a snapshot record and bumps the volume's
``cow_epoch``: every extent from before is now shared, and the first write to it copies it into
a new extent owned by the volume (``access.VolumeDevice._copy_on_write``). A clone is a new
volume whose table is the snapshot's (its extents are owned by another volume, so shared too).
Snapshots and clones are independent: no chains; an extent lives while any volume or snapshot
table names it (``MetaService.collect``), so any of them can be deleted in any order.

Snapshotting a volume that is attached for I/O is allowed only for the node whose VM uses it,
after pausing the VM (QEMU drains in-flight I/O on pause): the snapshot then re-epochs the
access point (same instance, newer epoch, fenced on the replicas), so its next write learns of
the snapshot from the replicas and copies on write. Any other attached volume is refused: a
write in flight could land on one replica before the snapshot and on another after it.

A snapshot or clone of a volume is also refused while the undo of a write its replicas refused
for want of space is not settled (``meta.unsettled``): the replicas may then differ in that
range, and the snapshot would keep the difference for good.
"""

from __future__ import annotations

import asyncio
import logging
import secrets

from aecp.common.errors import (
    AecpError,
    AlreadyExists,
    Conflict,
    InvalidInput,
    InvalidState,
    NotFound,
    Unavailable,
)
from aecp.model.base import check_name
from aecp.storage.chunk.errors import ChunkError
from aecp.storage.meta.model import (
    AttachRecord,
    ExtentRecord,
    SnapshotRecord,
    VolumeOwner,
    VolumeRecord,
    new_volume_uid,
    writable_in_place,
)
from aecp.storage.meta.service import RETRIES, SETTLE, MetaService
from aecp.storage.pool import ReplicaPool
from aecp.store import keys
from aecp.store.base import Compare, Delete, Lease, Put
from aecp.store.typed import read

log = logging.getLogger(__name__)


class SnapshotService:
    def __init__(self, meta: MetaService, pool: ReplicaPool) -> None:
        self.meta = meta
        self.store = meta.store
        self.pool = pool

    async def snapshot(
        self, volume: str, name: str, paused_on: str | None = None, op: str = ""
    ) -> SnapshotRecord:
        """Snapshot ``volume`` as ``name``. ``paused_on``: the node whose paused VM has the
        volume attached (the only attached case allowed); ``op``: the VM operation taking it
        (recorded, so that an interrupted one finds what it made)."""
        check_name("snapshot", name)
        # an export that is closing: after its flush (a paused VM's disks stay attached)
        await self.meta.wait_detached(volume, settle=0 if paused_on else SETTLE)
        for _ in range(RETRIES):
            vol, rev = await self.meta.volume(volume)
            att_kv = await self.store.get(keys.abs_attach(volume))
            att = AttachRecord.load(att_kv.value) if att_kv else None
            if att is not None and (att.node != paused_on or att.purpose != "io"):
                raise InvalidState(
                    f"volume {volume} is attached on {att.node}; snapshot the VM that uses it "
                    "(it pauses I/O) or stop the client first",
                    volume=volume,
                    node=att.node,
                )
            settled = await self.meta.unsettled.settled(volume)  # its replicas agree
            snap = SnapshotRecord(
                volume=volume,
                name=name,
                size=vol.size,
                replicas=vol.replicas,
                extent_size=vol.extent_size,
                extents=list(vol.extents),
                created_at=self.meta.clock.wall(),
                ready=att is None,
                uid=secrets.token_hex(8),
                op=op,
            )
            epoch = vol.epoch
            cmp: list[Compare] = []
            ops: list[Put | Delete] = []
            if att is not None:
                epoch, guard, claim = await self.meta.next_epoch()
                cmp.append(guard)
                ops.append(claim)
            new = vol.model_copy(update={"cow_epoch": vol.cow_epoch + 1, "epoch": epoch})
            cmp += [
                Compare.unchanged(keys.abs_volume(volume), rev),
                Compare.absent(keys.abs_snapshot(volume, name)),
                settled,
            ]
            ops += [
                Put(keys.abs_volume(volume), new.dump()),
                Put(keys.abs_snapshot(volume, name), snap.dump()),
            ]
            if att is not None and att_kv is not None:
                cmp.append(Compare.unchanged(keys.abs_attach(volume), att_kv.mod_revision))
                ops.append(
                    Put(
                        keys.abs_attach(volume),
                        att.model_copy(update={"epoch": epoch}).dump(),
                        lease=Lease(att_kv.lease, 0),
                    )
                )
            if await self.store.txn(cmp, ops):
                if att is not None:
                    snap = await self._fence_and_complete(vol, snap, epoch)
                log.info(
                    "volume %s: snapshot %s taken (%d extents shared)",
                    volume,
                    name,
                    sum(1 for x in vol.extents if x),
                )
                return snap
            if await self.store.get(keys.abs_snapshot(volume, name)):
                raise AlreadyExists(f"snapshot {volume}@{name} already exists", field="name")
        raise Conflict(f"volume {volume} keeps changing; try again")

    async def _fence_and_complete(
        self, before: VolumeRecord, snap: SnapshotRecord, epoch: int
    ) -> SnapshotRecord:
        """Fence, then mark the snapshot ready. On failure it is deleted again; if even that
        fails, it stays not ready: listed, refused for clones and rollbacks, deletable."""
        key = keys.abs_snapshot(snap.volume, snap.name)
        try:
            await self._fence_all(before, epoch)
            _, rev = await self._this_one(snap)
            ready = snap.model_copy(update={"ready": True})
            if not await self.store.replace(key, ready.dump(), mod_revision=rev):
                raise Conflict(f"snapshot {snap.volume}@{snap.name} changed while it was made")
            return ready
        except AecpError:
            try:
                await self.delete(snap.volume, snap.name, expected=snap)
            except AecpError as exc:
                log.error("snapshot %s@%s left incomplete: %s", snap.volume, snap.name, exc)
            raise

    async def _fence_all(self, before: VolumeRecord, epoch: int) -> None:
        """Raise the replicas of every extent the volume could write in place before the
        snapshot to ``epoch`` (the access point's next write there meets StaleEpoch, adopts the
        epoch and copies on write). ``Unavailable`` if some extent has no replica fenced."""
        exts = await self.meta.extents()
        owned = [exts[x] for x in {x for x in before.extents if x and x in exts}]
        owned = [e for e in owned if e.owner == before.owner_id]
        # an earlier snapshot that completed fenced what it shares; what a failed one left
        # shared is unfenced, and the access point may still write it in place
        fenced = {x for s in await self.snapshots(before.name) if s.ready for x in s.extents}
        await asyncio.gather(
            *(
                self._fence_extent(e, epoch)
                for e in owned
                if writable_in_place(e, before) or e.id not in fenced
            )
        )

    async def _fence_extent(self, ext: ExtentRecord, epoch: int) -> None:
        """Fence every valid replica of ``ext``. One that does not answer keeps the old epoch
        and could take a write the fenced ones refuse, changing the snapshot on it alone: it
        is dropped (it catches up later, from the generation before). If none answers, the
        snapshot cannot be made safe: ``Unavailable``."""
        fenced = await asyncio.gather(*(self._fence(node, ext.id, epoch) for node in ext.replicas))
        if not any(fenced):
            raise Unavailable(
                f"extent {ext.id}: no replica could be fenced for the snapshot; try again "
                "once its nodes answer"
            )
        missed = [node for node, ok in zip(ext.replicas, fenced, strict=True) if not ok]
        if missed:  # writes under this generation are what they may have taken
            await self.meta.drop_replicas(ext.id, missed, missed_from=ext.generation - 1)

    async def _fence(self, node: str, ext_id: str, epoch: int) -> bool:
        try:
            await (await self.pool.client(node)).fence(ext_id, epoch)
        except ChunkError as exc:
            log.warning("extent %s on %s not fenced for a snapshot: %s", ext_id, node, exc)
            return False
        return True

    async def snapshots(self, volume: str) -> list[SnapshotRecord]:
        await self.meta.volume(volume)
        kvs = await self.store.list(keys.abs_snapshots(volume))
        return sorted((SnapshotRecord.load(kv.value) for kv in kvs), key=lambda s: s.created_at)

    async def get(self, volume: str, name: str) -> tuple[SnapshotRecord, int]:
        check_name("snapshot", name)
        got = await read(self.store, keys.abs_snapshot(volume, name), SnapshotRecord)
        if got is None:
            raise NotFound(f"snapshot {volume}@{name} does not exist", snapshot=name)
        return got

    async def _this_one(self, snap: SnapshotRecord) -> tuple[SnapshotRecord, int]:
        """The stored record of ``snap`` if it is still that very snapshot (its readiness may
        differ), not a namesake taken since; else ``Conflict``."""
        got, rev = await self.get(snap.volume, snap.name)
        if got.uid != snap.uid:
            raise Conflict(f"snapshot {snap.volume}@{snap.name} was replaced meanwhile")
        return got, rev

    async def usable(self, volume: str, name: str) -> tuple[SnapshotRecord, int]:
        """The snapshot, if clones and rollbacks may use it (``InvalidState`` if not ready)."""
        snap, rev = await self.get(volume, name)
        if not snap.ready:
            raise InvalidState(
                f"snapshot {volume}@{name} is incomplete (its replicas could not all be "
                "fenced); delete it and take it again",
                snapshot=name,
            )
        return snap, rev

    async def delete(self, volume: str, name: str, expected: SnapshotRecord | None = None) -> int:
        """Delete a snapshot; returns how many extents were reclaimed. Clones made from it are
        not affected (they do not depend on it). ``expected``: only if it is still that
        record (``Conflict`` otherwise: a namesake taken since is left alone)."""
        snap, rev = await (self.get(volume, name) if expected is None else self._this_one(expected))
        if not await self.store.delete(keys.abs_snapshot(volume, name), mod_revision=rev):
            raise Conflict(f"snapshot {volume}@{name} changed; try again")
        return await self._reclaim({x for x in snap.extents if x})

    async def clone(
        self, volume: str, name: str, new_volume: str, owner: VolumeOwner | None = None
    ) -> VolumeRecord:
        """A new volume (belonging to ``owner``) with the snapshot's content, in O(1): its
        table is the snapshot's."""
        check_name("name", new_volume)
        snap, rev = await self.usable(volume, name)
        guards = await self.meta.name_guards(new_volume, owner)
        servers = await self.meta.servers()
        if snap.replicas > len(servers):
            raise InvalidInput("replicas", f"{snap.replicas} replicas need as many nodes")
        await self.meta.check_provisioning(None, snap.size, snap.replicas, servers)
        vol = VolumeRecord(
            name=new_volume,
            size=snap.size,
            replicas=snap.replicas,
            extent_size=snap.extent_size,
            extents=list(snap.extents),
            created_at=self.meta.clock.wall(),
            source=f"snapshot {volume}@{name}",
            uid=new_volume_uid(),
            owner=owner,
        )
        ok = await self.store.txn(
            [
                Compare.unchanged(keys.abs_snapshot(volume, name), rev),
                Compare.absent(keys.abs_volume(new_volume)),
                *guards,
            ],
            [Put(keys.abs_volume(new_volume), vol.dump())],
        )
        if not ok:
            if await self.store.get(keys.abs_volume(new_volume)):
                raise AlreadyExists(f"volume {new_volume} already exists", field="name")
            await self.meta.name_guards(new_volume, owner)
            raise Conflict(f"snapshot {volume}@{name} changed; try again")
        log.info("volume %s: cloned from %s@%s", new_volume, volume, name)
        return vol

    async def clone_volume(
        self, source: str, new_volume: str, owner: VolumeOwner | None = None
    ) -> VolumeRecord:
        """Clone a detached volume directly (O(1)): the new volume (belonging to ``owner``)
        takes its table and the source's extents become shared (the source copies on its next
        write too)."""
        check_name("name", new_volume)
        await self.meta.wait_detached(source, settle=SETTLE)
        for _ in range(RETRIES):
            guards = await self.meta.name_guards(new_volume, owner)
            vol, rev = await self.meta.volume(source)
            await self.meta.check_provisioning(None, vol.size, vol.replicas)
            settled = await self.meta.unsettled.settled(source)  # its replicas agree
            clone = VolumeRecord(
                name=new_volume,
                size=vol.size,
                replicas=vol.replicas,
                extent_size=vol.extent_size,
                extents=list(vol.extents),
                created_at=self.meta.clock.wall(),
                source=f"volume {source}",
                uid=new_volume_uid(),
                owner=owner,
            )
            ok = await self.store.txn(
                [
                    Compare.unchanged(keys.abs_volume(source), rev),
                    Compare.absent(keys.abs_attach(source)),
                    Compare.absent(keys.abs_volume(new_volume)),
                    settled,
                    *guards,
                ],
                [
                    Put(
                        keys.abs_volume(source),
                        vol.model_copy(update={"cow_epoch": vol.cow_epoch + 1}).dump(),
                    ),
                    Put(keys.abs_volume(new_volume), clone.dump()),
                ],
            )
            if ok:
                return clone
            if await self.store.get(keys.abs_volume(new_volume)):
                raise AlreadyExists(f"volume {new_volume} already exists", field="name")
            if await self.meta.attachment(source) is not None:
                raise InvalidState(
                    f"volume {source} is attached; stop its VM or client first", volume=source
                )
        raise Conflict(f"volume {source} keeps changing; try again")

    async def rollback(self, volume: str, name: str) -> VolumeRecord:
        """Make a detached volume hold the snapshot's content again (O(1))."""
        snap, srev = await self.usable(volume, name)
        await self.meta.wait_detached(volume, settle=SETTLE)
        for _ in range(RETRIES):
            vol, rev = await self.meta.volume(volume)
            if await self.meta.attachment(volume) is not None:
                raise InvalidState(
                    f"volume {volume} is attached; stop its VM or client first", volume=volume
                )
            new = vol.model_copy(
                update={
                    "extents": list(snap.extents),
                    "size": snap.size,
                    "cow_epoch": vol.cow_epoch + 1,
                }
            )
            ok = await self.store.txn(
                [
                    Compare.unchanged(keys.abs_volume(volume), rev),
                    Compare.unchanged(keys.abs_snapshot(volume, name), srev),
                    Compare.absent(keys.abs_attach(volume)),
                ],
                # the extents it names leave the volume: nothing left to undo there
                [Put(keys.abs_volume(volume), new.dump()), self.meta.unsettled.delete(volume)],
            )
            if ok:
                await self._reclaim({x for x in vol.extents if x})
                log.info("volume %s: rolled back to snapshot %s", volume, name)
                return new
        raise Conflict(f"volume {volume} keeps changing; try again")

    async def _reclaim(self, candidates: set[str]) -> int:
        freed = await self.meta.collect(candidates)
        await self.pool.delete_replicas(freed)
        return len(freed)
