"""Meta operations over the cluster store. Every change is one etcd transaction guarded by the
revisions it read (compare-and-swap), so concurrent callers on any node cannot corrupt the
metadata: one wins, the others re-read and retry or get a clear error.

Ordering rules (each caller follows them):
- new extent: create its replicas on the chunk servers first, then ``commit_extent`` (a failed
  commit deletes them again); an extent is never named in a volume before its replicas exist;
- drop a replica: ``drop_replica`` (generation bump) before acknowledging the write that failed
  on it, then re-issue that write to the remaining replicas under the new generation, so a
  returning replica finds it among the blocks modified after the generation it missed from.
"""

from __future__ import annotations

import asyncio
import logging
from typing import TypeVar

from aecp.common.clock import SYSTEM_CLOCK, Clock
from aecp.common.errors import (
    AlreadyExists,
    Conflict,
    InvalidInput,
    InvalidState,
    NoCapacity,
    NotFound,
)
from aecp.model.base import Stored, check_name
from aecp.storage.meta.holding import NotHolder as NotHolder  # re-exported
from aecp.storage.meta.holding import held_by
from aecp.storage.meta.model import (
    DEFAULT_EXTENT_SIZE,
    AttachRecord,
    ExtentRecord,
    Holder,
    StorageServer,
    VolumeOwner,
    VolumeRecord,
    default_replicas,
    new_volume_uid,
    slots_for,
    validate_volume,
)
from aecp.storage.meta.owners import VolumeOwners
from aecp.storage.meta.tables import Tables, read_tables
from aecp.storage.meta.unsettled import Unsettled
from aecp.store import keys
from aecp.store.base import Compare, Delete, Lease, Put, Store
from aecp.store.typed import read

log = logging.getLogger(__name__)
M = TypeVar("M", bound=Stored)


class AttachedElsewhere(InvalidState):
    """Another node's access point holds the volume (it may be closing: ``wait_detached``)."""


RETRIES = 8
DEFAULT_OVERCOMMIT = 3.0
#: how long a delete waits for an export that is closing (flushing, then detaching)
CLOSE_WAIT = 30.0
#: how long a delete gives a storage server to notice that a volume's client has left
SETTLE = 2.0


class MetaService:
    """Volume and extent metadata for one cluster. ``owners`` answers whether a volume's owner
    exists and which names are reserved for one (ABS does not know what owners are)."""

    def __init__(
        self,
        store: Store,
        extent_size: int = DEFAULT_EXTENT_SIZE,
        clock: Clock = SYSTEM_CLOCK,
        overcommit_ratio: float = DEFAULT_OVERCOMMIT,
        *,
        owners: VolumeOwners,
    ) -> None:
        self.store = store
        self.extent_size = extent_size
        self.clock = clock
        #: volumes may provision (size x replicas) up to this many times the raw capacity, if
        #: no storage server publishes its ratio (``cluster_overcommit``)
        self.overcommit_ratio = overcommit_ratio
        self.owners = owners
        self.unsettled = Unsettled(store)  # undos of refused writes not settled yet

    # ---- reads -------------------------------------------------------------------------------
    async def servers(self) -> dict[str, StorageServer]:
        kvs = await self.store.list(keys.ABS_SERVERS)
        return {s.node: s for s in (StorageServer.load(kv.value) for kv in kvs)}

    async def volume(self, name: str) -> tuple[VolumeRecord, int]:
        check_name("volume", name)
        got = await read(self.store, keys.abs_volume(name), VolumeRecord)
        if got is None:
            raise NotFound(f"volume {name} does not exist", volume=name)
        return got

    async def volumes(self) -> list[VolumeRecord]:
        return [VolumeRecord.load(kv.value) for kv in await self.store.list(keys.ABS_VOLUMES)]

    async def extent(self, extent_id: str) -> tuple[ExtentRecord, int]:
        got = await read(self.store, keys.abs_extent(extent_id), ExtentRecord)
        if got is None:
            raise NotFound(f"extent {extent_id} does not exist", extent=extent_id)
        return got

    async def extents(self) -> dict[str, ExtentRecord]:
        kvs = await self.store.list(keys.ABS_EXTENTS)
        return {e.id: e for e in (ExtentRecord.load(kv.value) for kv in kvs)}

    async def attachment(self, volume: str) -> AttachRecord | None:
        got = await read(self.store, keys.abs_attach(volume), AttachRecord)
        return got[0] if got else None

    # ---- volume lifecycle ----------------------------------------------------------------------
    async def create_volume(
        self,
        name: str,
        size: int,
        replicas: int | None = None,
        extent_size: int | None = None,
        owner: VolumeOwner | None = None,
    ) -> VolumeRecord:
        """Validate and store a new, empty (thin) volume belonging to ``owner`` (None: a
        standalone volume; its name must not be one reserved for a VM's disks)."""
        servers = await self.servers()
        factor = replicas if replicas is not None else default_replicas(len(servers))
        validate_volume(name, size, factor, len(servers))
        esize = extent_size or self.extent_size
        await self.check_provisioning("size", size, factor, servers)
        guards = await self.name_guards(name, owner)
        vol = VolumeRecord(
            name=name,
            size=size,
            replicas=factor,
            extent_size=esize,
            extents=[None] * slots_for(size, esize),
            created_at=self.clock.wall(),
            uid=new_volume_uid(),
            owner=owner,
        )
        key = keys.abs_volume(name)
        if not await self.store.txn([Compare.absent(key), *guards], [Put(key, vol.dump())]):
            await self.name_taken(name, owner)
        log.info(
            "volume %s: created (%d bytes, %d replicas, thin, %s)",
            name,
            size,
            factor,
            f"a disk of {owner}" if owner else "standalone",
        )
        return vol

    async def name_guards(self, name: str, owner: VolumeOwner | None) -> list[Compare]:
        """The guards a transaction creating volume ``name`` for ``owner`` needs: a name may be
        reserved for the disks of an owner that exists (``x-boot`` for VM ``x``).
        ``AlreadyExists`` naming that owner if it is reserved now."""
        return await self.owners.reserve(name, owner)

    async def name_taken(self, name: str, owner: VolumeOwner | None) -> None:
        """Raise the reason a transaction guarded by ``Compare.absent(volume)`` and
        ``name_guards`` failed: the volume exists, or a VM claimed the name meanwhile."""
        if await self.store.get(keys.abs_volume(name)) is not None:
            raise AlreadyExists(f"volume {name} already exists", field="name", volume=name)
        await self.name_guards(name, owner)
        raise Conflict(f"volume {name}: the cluster changed meanwhile; try again", volume=name)

    def cluster_overcommit(self, servers: dict[str, StorageServer]) -> float:
        """The cluster's overcommit ratio: the lowest the storage servers publish (each its own
        ``storage.overcommit_ratio``), so every node answers admissions alike; this node's own
        setting only if none publishes one."""
        ratios = [s.overcommit_ratio for s in servers.values() if s.overcommit_ratio]
        return min(ratios) if ratios else self.overcommit_ratio

    async def provisioned(self) -> int:
        """Bytes the volumes may come to hold: size x replicas, summed (thin: not written)."""
        return sum(v.size * v.replicas for v in await self.volumes())

    async def check_provisioning(
        self,
        field: str | None,
        size: int,
        factor: int,
        servers: dict[str, StorageServer] | None = None,
    ) -> None:
        """Refuse unless ``size`` x ``factor`` more bytes keep the provisioned total within
        ``cluster_overcommit`` x the storage servers' raw capacity: ``InvalidInput`` naming
        ``field`` (the size asked for), else ``NoCapacity`` (a clone: its size is its
        source's). A check, not a reservation: two requests at one instant may both pass."""
        servers = await self.servers() if servers is None else servers
        raw = sum(s.capacity_bytes for s in servers.values())
        ratio = self.cluster_overcommit(servers)
        limit = int(raw * ratio)
        now = await self.provisioned()
        if now + size * factor <= limit:
            return
        why = (
            f"{size} bytes x {factor} replicas would provision {now + size * factor} bytes; "
            f"the limit is {limit} bytes ({ratio:g} x {raw} bytes of raw "
            f"capacity) and {now} bytes are provisioned already"
        )
        if field is None:
            raise NoCapacity(why, provisioned=now, limit=limit)
        raise InvalidInput(field, why)

    async def adopt_volume(self, name: str, owner: VolumeOwner) -> VolumeRecord:
        """Record ``owner`` on volume ``name``, which has none (made before volumes recorded
        owners): compare-and-swap, so it happens once. A volume that is already ``owner``'s is
        returned as it is; one that belongs to anyone else is refused (``InvalidState``). The
        caller decides that the volume really is ``owner``'s."""
        for _ in range(RETRIES):
            vol, rev = await self.volume(name)
            if vol.owner == owner:
                return vol
            if vol.owner is not None:
                raise InvalidState(
                    f"volume {name} belongs to {vol.owner}, not to {owner}: left alone",
                    volume=name,
                )
            new = vol.model_copy(update={"owner": owner})
            if await self.store.replace(keys.abs_volume(name), new.dump(), mod_revision=rev):
                log.info("volume %s: owner recorded: %s (it had none)", name, owner)
                return new
        raise Conflict(f"volume {name} keeps changing; try again")

    async def resize(self, name: str, size: int) -> VolumeRecord:
        """Grow a volume; shrinking is refused."""
        for _ in range(RETRIES):
            vol, rev = await self.volume(name)
            if size < vol.size:
                raise InvalidInput("size", f"volumes only grow: {size} < current {vol.size}")
            if size % 512:
                raise InvalidInput("size", "must be a multiple of 512 bytes")
            await self.check_provisioning("size", size - vol.size, vol.replicas)
            slots = slots_for(size, vol.extent_size)
            new = vol.model_copy(
                update={"size": size, "extents": vol.extents + [None] * (slots - vol.slots)}
            )
            if await self.store.replace(keys.abs_volume(name), new.dump(), mod_revision=rev):
                return new
        raise Conflict(f"volume {name} keeps changing; try again")

    async def delete_volume(
        self, name: str, owner: VolumeOwner | None = None, close_wait: float = CLOSE_WAIT
    ) -> list[ExtentRecord]:
        """Remove a volume that nobody has attached and that has no snapshots; returns the
        extents no other volume or snapshot names (their replicas are for the caller to
        delete). ``owner``: the caller deletes it as that owner's disk (``InvalidState`` if the
        volume is not its). Without one (the volume API), a disk of a VM or template that
        still exists is refused (``InvalidState``): delete the VM or the template instead.
        An export that is closing (its last client left; it flushes, then detaches) is
        waited for, up to ``close_wait`` seconds."""
        for _ in range(RETRIES):
            vol, rev = await self.volume(name)
            guards = await self._deletable_by(vol, owner)
            if not await self.wait_detached(name, close_wait, settle=min(SETTLE, close_wait)):
                raise InvalidState(
                    f"volume {name} is in use (attached); detach it first", volume=name
                )
            if await self.store.list(keys.abs_snapshots(name)):
                raise InvalidState(f"volume {name} has snapshots; delete them first", volume=name)
            ok = await self.store.txn(
                [
                    Compare.unchanged(keys.abs_volume(name), rev),
                    Compare.absent(keys.abs_attach(name)),
                    *guards,
                ],
                [
                    Delete(keys.abs_volume(name)),
                    Delete(keys.abs_export(name)),
                    self.unsettled.delete(name),  # its extents go: nothing left to undo
                ],
            )
            if ok:
                freed = await self.collect({e for e in vol.extents if e})
                log.info("volume %s: deleted, %d extents freed", name, len(freed))
                return freed
        raise Conflict(f"volume {name} keeps changing; try again")

    async def wait_detached(self, name: str, wait: float = CLOSE_WAIT, settle: float = 0.0) -> bool:
        """Whether ``name`` is unattached, waiting up to ``wait`` seconds while it is attached
        by an export that is closing (``mark_closing``). Any other attachment is waited on
        for ``settle`` seconds only: a client that has just exited may not have been seen
        leaving by its storage server yet. Time is this service's clock's."""
        key = keys.abs_attach(name)
        start = self.clock.monotonic()
        deadline, settled = start + wait, start + min(settle, wait)
        while (kv := await self.store.get(key)) is not None:
            closing = AttachRecord.load(kv.value).closing
            left = (deadline if closing else settled) - self.clock.monotonic()
            if left <= 0:
                return False
            if closing:
                log.info("volume %s: waiting for its closing export to detach", name)
            await self._changed(key, kv.mod_revision, left)  # then look again
        return True

    async def _changed(self, key: str, revision: int, seconds: float) -> None:
        """Return once ``key`` changes after ``revision``, or after ``seconds``."""
        change = asyncio.ensure_future(self._watch_change(key, revision))
        timer = asyncio.ensure_future(self.clock.sleep(seconds))
        try:
            await asyncio.wait({change, timer}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            change.cancel()
            timer.cancel()
            await asyncio.gather(change, timer, return_exceptions=True)
        if not change.cancelled() and (exc := change.exception()) is not None:
            raise exc

    async def _watch_change(self, key: str, revision: int) -> None:
        async with self.store.watch(key, start_revision=revision + 1) as events:
            async for ev in events:
                if ev.key == key:  # the prefix also matches longer names
                    return

    async def _deletable_by(self, vol: VolumeRecord, owner: VolumeOwner | None) -> list[Compare]:
        """The guards under which ``owner`` (None: the volume API) may delete ``vol``, or
        ``InvalidState`` saying why it may not."""
        if owner is not None:
            if vol.owner != owner:
                raise InvalidState(
                    f"volume {vol.name} belongs to {vol.owner or 'nobody'}, not to {owner}: "
                    "left alone",
                    volume=vol.name,
                )
            return []
        if vol.owner is None:
            return []
        alive, guard = await self.owners.alive(vol.owner)
        if alive:
            raise InvalidState(
                f"volume {vol.name} is a disk of {vol.owner}; delete the {vol.owner.kind} "
                "instead (its disks go with it)",
                volume=vol.name,
                owner=str(vol.owner),
            )
        return [guard]

    async def mark_closing(self, holder: Holder) -> None:
        """Record that ``holder``'s export is closing: its last client left, and it flushes,
        then detaches. A delete meanwhile waits for that instead of answering "in use"."""
        key = keys.abs_attach(holder.volume)
        kv = await self.store.get(key)
        if kv is None:
            return
        rec = AttachRecord.load(kv.value)
        if holder.holds(rec) and not rec.closing:
            new = rec.model_copy(update={"closing": True})
            await self.store.txn(
                [Compare.unchanged(key, kv.mod_revision)],
                [Put(key, new.dump(), lease=Lease(kv.lease, 0) if kv.lease else None)],
            )

    async def tables(self) -> Tables:
        """Every volume, snapshot, extent and recovery record, read at one revision."""
        return await read_tables(self.store)

    async def collect(self, candidates: set[str] | None = None) -> list[ExtentRecord]:
        """Delete the records of the ``candidates`` (None: every extent) no table names any
        more, judged on the tables of one revision (reference counting by derivation:
        nothing to drift); returns them so their replicas can be deleted."""
        if candidates is not None and not candidates:
            return []
        t = await self.tables()
        pool = set(t.extents) if candidates is None else candidates & set(t.extents)
        freed = []
        for ext_id in sorted(pool - t.referenced()):
            key = keys.abs_extent(ext_id)
            if await self.store.delete(key, mod_revision=t.extent_revs[ext_id]):
                freed.append(t.extents[ext_id])
        return freed

    # ---- attach (single writer) ------------------------------------------------------------
    async def attach(
        self,
        name: str,
        node: str,
        lease: Lease,
        takeover: bool = False,
        purpose: str = "io",
        ap: str = "",
    ) -> tuple[VolumeRecord, int]:
        """Become the volume's access point under a new epoch (on ``lease``).

        Refused (``InvalidState``) if another node holds it for I/O, unless ``takeover``: then
        the new epoch fences the old access point (its replicas reject the older epoch). An
        attachment held only for repair always yields to a client.
        """
        for _ in range(RETRIES):
            (vol, rev), current, (epoch, epoch_cmp, epoch_put) = await asyncio.gather(
                self.volume(name), self.attachment(name), self.next_epoch()
            )  # read at once: an attach at a migration's switch-over is inside its downtime
            if current is not None and _refused(current, node, takeover, purpose):
                raise AttachedElsewhere(
                    f"volume {name} is attached on {current.node}", volume=name, node=current.node
                )
            new = vol.model_copy(update={"epoch": epoch})
            rec = AttachRecord(
                volume=name, node=node, epoch=epoch, at=self.clock.wall(), purpose=purpose, ap=ap
            )
            ok = await self.store.txn(
                [Compare.unchanged(keys.abs_volume(name), rev), epoch_cmp],
                [
                    Put(keys.abs_volume(name), new.dump()),
                    Put(keys.abs_attach(name), rec.dump(), lease=lease),
                    epoch_put,
                ],
            )
            if ok:
                log.info("volume %s: attached on %s with epoch %d", name, node, epoch)
                return new, epoch
        raise Conflict(f"volume {name} keeps changing; try again")

    async def next_epoch(self) -> tuple[int, Compare, Put]:
        """The next attach epoch, cluster-wide (extents can be shared between volumes, so
        epochs must be comparable across them), with the guard and write that claim it in the
        caller's transaction."""
        kv = await self.store.get(keys.ABS_EPOCH)
        current = int(kv.value) if kv else 0
        guard = (
            Compare.unchanged(keys.ABS_EPOCH, kv.mod_revision)
            if kv
            else Compare.absent(keys.ABS_EPOCH)
        )
        return current + 1, guard, Put(keys.ABS_EPOCH, str(current + 1).encode())

    async def detach(self, name: str, node: str, epoch: int, ap: str = "") -> None:
        """Release the attachment if it is still ours: the same access point instance (``ap``;
        a snapshot may have raised its epoch since), else the same node and epoch."""
        key = keys.abs_attach(name)
        kv = await self.store.get(key)
        if kv is None:
            return
        if Holder(name, node, epoch, ap).holds(AttachRecord.load(kv.value)):
            await self.store.delete(key, mod_revision=kv.mod_revision)

    # ---- extents ---------------------------------------------------------------------------
    async def commit_extent(self, volume: str, slot: int, ext: ExtentRecord) -> bool:
        """Name the new extent ``ext`` (replicas already created) in ``volume``'s empty slot.
        False if the slot was filled meanwhile (the caller deletes its replicas)."""
        return await self.replace_extent(volume, slot, None, ext)

    async def replace_extent(
        self, volume: str, slot: int, old: str | None, new: ExtentRecord
    ) -> bool:
        """Name ``new`` (replicas created, and filled for a copy-on-write) in ``slot`` where
        ``old`` is now (None: an empty slot). False if the slot changed meanwhile."""
        for _ in range(RETRIES):
            vol, rev = await self.volume(volume)
            if vol.extents[slot] != old:
                return False
            table = list(vol.extents)
            table[slot] = new.id
            ok = await self.store.txn(
                [
                    Compare.unchanged(keys.abs_volume(volume), rev),
                    Compare.absent(keys.abs_extent(new.id)),
                ],
                [
                    Put(keys.abs_volume(volume), vol.model_copy(update={"extents": table}).dump()),
                    Put(keys.abs_extent(new.id), new.dump()),
                ],
            )
            if ok:
                return True
        raise Conflict(f"volume {volume} keeps changing; try again")

    async def drop_replica(
        self, extent_id: str, node: str, holder: Holder | None = None
    ) -> ExtentRecord:
        """Remove ``node`` from the valid replicas (it failed) and bump the generation; its
        catch-up copies the blocks modified after the current generation (whose writes it may
        have missed). With a ``holder``, only while that access point holds its volume's
        attachment (``InvalidState`` otherwise: a fenced access point changes nothing)."""
        return await self.drop_replicas(extent_id, [node], holder=holder)

    async def drop_replicas(
        self,
        extent_id: str,
        nodes: list[str],
        missed_from: int | None = None,
        holder: Holder | None = None,
    ) -> ExtentRecord:
        """Remove ``nodes`` from the valid replicas in one change (one generation bump). Each
        catches up the blocks modified after ``missed_from`` (default: the current generation)
        — lower it for replicas that may have taken writes under a generation the others
        refused; ``nodes`` already stale then catch up from there too, if that is lower than
        where they were to start. ``InvalidState`` if that would leave no valid replica, or if
        ``holder`` no longer holds its attachment."""
        for _ in range(RETRIES):
            ext, rev = await self.extent(extent_id)
            cmp = [Compare.unchanged(keys.abs_extent(extent_id), rev)]
            if holder is not None:
                cmp.append(await self._held_by(holder, extent_id))
            gone = [n for n in ext.replicas if n in nodes]
            since = ext.generation if missed_from is None else min(missed_from, ext.generation)
            lower = {n: since for n in nodes if n in ext.stale and ext.stale[n] > since}
            if not gone and not lower:
                return ext
            if len(gone) == len(ext.replicas):
                raise InvalidState(f"extent {extent_id}: cannot drop its last valid replica")
            now = self.clock.wall()
            new = ext.model_copy(
                update={
                    "replicas": [r for r in ext.replicas if r not in gone],
                    "stale": {**ext.stale, **lower, **dict.fromkeys(gone, since)},
                    "stale_since": {**ext.stale_since, **dict.fromkeys(gone, now)},
                    "generation": ext.generation + 1 if gone else ext.generation,
                }
            )
            if await self.store.txn(cmp, [Put(keys.abs_extent(extent_id), new.dump())]):
                log.warning(
                    "extent %s: replicas on %s dropped, on %s to catch up from generation %d; "
                    "generation %d -> %d; valid: %s",
                    extent_id,
                    ", ".join(gone) or "none",
                    ", ".join(lower) or "none",
                    since,
                    ext.generation,
                    new.generation,
                    ", ".join(new.replicas),
                )
                return new
        raise Conflict(f"extent {extent_id} keeps changing; try again")

    async def _held_by(self, holder: Holder, extent_id: str) -> Compare:
        """The guard that ``holder`` still holds its volume's attachment as now stored;
        ``NotHolder`` if it does not hold it now."""
        return await held_by(self.store, holder, f"extent {extent_id} left as it is")

    async def admit_replica(
        self,
        extent_id: str,
        node: str,
        holder: Holder,
        epoch: int,
        replaces: str | None = None,
        catch_up: bool = False,
        factor: int | None = None,
        since: int | None = None,
        moving: bool = False,
    ) -> ExtentRecord:
        """Make ``node`` a valid replica again after it copied what it lacked (catch-up), or as
        a new replica that ``replaces`` a lost one (re-replication). Bumps the generation.
        Refused (``InvalidState``) unless ``node`` is still stale (catch-up) and still to catch
        up from no earlier than ``since`` (the generation its copy started from), ``replaces``
        is still stale, and the extent is still below ``factor``: another recoverer may have
        done it meanwhile, or the undo of a refused write lowered it (``check_admission``).

        ``moving`` (a locality move, ``storage.recovery``): ``replaces`` is a *valid* replica;
        ``node`` takes its place in the same change, so the extent keeps as many valid
        replicas as it had. Refused unless ``replaces`` is still valid and the extent still
        has its ``factor`` replicas, none stale. The caller deletes the replaced copy only
        after this returns.

        Only the access point that ordered the copy against the live writes may admit it: the
        change is made only while ``holder`` still holds its volume's attachment at ``epoch``
        (the epoch the new replica was fenced at); otherwise ``InvalidState``: a client that
        attached since may have written what the copy lacks, and a snapshot since may have
        made older-epoch writes unwelcome on the other replicas only."""
        for _ in range(RETRIES):
            ext, rev = await self.extent(extent_id)
            att = await self.store.get(keys.abs_attach(holder.volume))
            rec = AttachRecord.load(att.value) if att else None
            check_admission(ext, node, replaces, catch_up, factor, since, moving)
            if att is None or rec is None or not holder.holds(rec) or rec.epoch != epoch:
                raise InvalidState(
                    f"volume {holder.volume}: no longer attached by this access point; "
                    f"replica of extent {extent_id} on {node} not admitted"
                )
            new = _admitted(ext, node, replaces)
            cmp = [
                Compare.unchanged(keys.abs_extent(extent_id), rev),
                Compare.unchanged(keys.abs_attach(holder.volume), att.mod_revision),
            ]
            if await self.store.txn(cmp, [Put(keys.abs_extent(extent_id), new.dump())]):
                return _log_admitted(new, node, replaces, moving)
        raise Conflict(f"extent {extent_id} keeps changing; try again")

    async def admit_copy(
        self,
        extent_id: str,
        node: str,
        replaces: str | None = None,
        catch_up: bool = False,
        factor: int | None = None,
        since: int | None = None,
    ) -> ExtentRecord:
        """``admit_replica`` for an extent nothing writes (no volume names it; snapshots
        only): no access point orders the copy, so none is checked. The copy on ``node`` was
        fenced at the valid replicas' epoch before it was made. Checked as there: two
        leaders, or a leader and a clone's access point, never admit more than ``factor``."""
        for _ in range(RETRIES):
            ext, rev = await self.extent(extent_id)
            check_admission(ext, node, replaces, catch_up, factor, since)
            new = _admitted(ext, node, replaces)
            if await self.update_extent(new, rev):
                return _log_admitted(new, node, replaces)
        raise Conflict(f"extent {extent_id} keeps changing; try again")

    async def update_extent(self, ext: ExtentRecord, rev: int) -> bool:
        return await self.store.replace(keys.abs_extent(ext.id), ext.dump(), mod_revision=rev)


def check_admission(
    ext: ExtentRecord,
    node: str,
    replaces: str | None,
    catch_up: bool,
    factor: int | None,
    since: int | None = None,
    moving: bool = False,
) -> None:
    """``InvalidState`` unless admitting ``node`` still makes sense: a catch-up's node is still
    stale, and not to catch up from before ``since`` (where its copy started: the undo of a
    refused write may have lowered it meanwhile, and the copy then lacks that write's range),
    the replica a new one ``replaces`` is still stale (not caught up or replaced by another
    recoverer), the node is not valid already, and the extent is below ``factor``. A move
    (``moving``) instead needs ``replaces`` still valid and the extent still healthy: its
    ``factor`` valid replicas, none stale (``check_move``)."""
    if moving:
        check_move(ext, node, replaces, factor)
        return
    if catch_up and node not in ext.stale:  # admitted or replaced by another since
        raise InvalidState(f"extent {ext.id}: {node} is no longer a stale replica")
    if catch_up and since is not None and ext.stale[node] < since:
        raise InvalidState(
            f"extent {ext.id}: {node} must catch up from generation {ext.stale[node]}, "
            f"its copy started from {since}: not admitted"
        )
    if node in ext.replicas:
        raise InvalidState(f"extent {ext.id}: {node} is a valid replica already")
    if replaces is not None and replaces not in ext.stale:
        raise InvalidState(
            f"extent {ext.id}: {replaces} was caught up or replaced meanwhile; "
            f"the copy on {node} is not admitted"
        )
    if factor is not None and len(ext.replicas) >= factor:
        raise InvalidState(
            f"extent {ext.id}: has its {factor} replicas already; "
            f"the copy on {node} is not admitted"
        )


def check_move(ext: ExtentRecord, node: str, moved: str | None, factor: int | None) -> None:
    """``InvalidState`` unless ``node`` may take the place of the valid replica on ``moved``
    (a locality move): ``node`` is not valid already, ``moved`` still is, and the extent has
    not lost a replica meanwhile (its ``factor`` valid ones, none stale): the move never
    leaves it with fewer valid replicas than it has now, nor while it is degraded."""
    if node in ext.replicas:
        raise InvalidState(f"extent {ext.id}: {node} is a valid replica already")
    if moved is None or moved not in ext.replicas:
        raise InvalidState(
            f"extent {ext.id}: {moved} is no longer a valid replica; "
            f"the copy on {node} is not admitted in its place"
        )
    if ext.stale or (factor is not None and len(ext.replicas) < factor):
        raise InvalidState(
            f"extent {ext.id}: lost a replica meanwhile; the copy on {node} is not admitted "
            f"in place of {moved}"
        )


def _admitted(ext: ExtentRecord, node: str, replaces: str | None) -> ExtentRecord:
    """``ext`` with ``node`` valid and ``replaces`` gone (no longer stale, or, a locality
    move, no longer valid: ``node`` takes its place in the same change), one generation on."""
    gone = {node, replaces} - {None}
    return ext.model_copy(
        update={
            "replicas": [*[r for r in ext.replicas if r not in gone], node],
            "stale": {k: v for k, v in ext.stale.items() if k not in gone},
            "stale_since": {k: v for k, v in ext.stale_since.items() if k not in gone},
            "generation": ext.generation + 1,
        }
    )


def _log_admitted(
    new: ExtentRecord, node: str, replaces: str | None, moving: bool = False
) -> ExtentRecord:
    log.info(
        "extent %s: replica on %s admitted%s; generation %d; valid: %s",
        new.id,
        node,
        f" in place of {'valid replica ' if moving else ''}{replaces}" if replaces else "",
        new.generation,
        ", ".join(new.replicas),
    )
    return new


def _refused(current: AttachRecord, node: str, takeover: bool, purpose: str) -> bool:
    """Whether an attach must be refused while ``current`` holds the volume."""
    if purpose == "repair":
        return True  # repair never preempts anyone
    if current.node == node or current.purpose == "repair":
        return False
    return not takeover
