"""Making the volumes of a new VM or template as O(1) clones, and storing the record that
owns them only while they are all there.

A clone's or a template's volumes are made before its record is stored, and belong to it from
the start (``VolumeOwner``); until the record is stored their owner does not exist, so the
volume API may delete them: the record is stored only while they are all unchanged. If it is
not stored, the volumes made for it are deleted again.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence

from aecp.cluster.vms import VMService
from aecp.common.errors import AecpError, Conflict
from aecp.model.operation import Operation
from aecp.model.vm import VMSpec
from aecp.storage.meta.model import VolumeOwner, VolumeRecord
from aecp.storage.snapshots import SnapshotService
from aecp.store import keys
from aecp.store.base import Compare, Delete, Put

log = logging.getLogger(__name__)


class DiskCloner:
    def __init__(self, svc: VMService, snaps: SnapshotService) -> None:
        self.svc = svc
        self.snaps = snaps
        self.store = svc.store

    async def clone_volumes(
        self, pairs: list[tuple[str, str]], owner: VolumeOwner, snapshot: str | None = None
    ) -> list[VolumeRecord]:
        """Clone each ``(source, target)`` volume (from its ``snapshot`` if given) as
        ``owner``'s: all of them, or none (those made are deleted again on failure)."""
        made: list[VolumeRecord] = []
        try:
            for src, dst in pairs:
                if snapshot is None:
                    made.append(await self.snaps.clone_volume(src, dst, owner))
                else:
                    made.append(await self.snaps.clone(src, snapshot, dst, owner))
        except BaseException:
            await self.remove_volumes([v.name for v in made], owner)
            raise
        return made

    async def remove_volumes(
        self, volumes: list[str], owner: VolumeOwner, strict: bool = False
    ) -> None:
        """Delete ``owner``'s ``volumes`` made for a record never stored (a volume that is
        not there, or not ``owner``'s, is left alone). Best effort, unless ``strict``: then
        the first volume that cannot be deleted raises (the caller tries again later)."""
        for vol in volumes:
            kv = await self.store.get(keys.abs_volume(vol))
            if kv is None or VolumeRecord.load(kv.value).owner != owner:
                continue
            try:
                await self.snaps.pool.delete_replicas(
                    await self.snaps.meta.delete_volume(vol, owner)
                )
            except AecpError as exc:
                if strict:
                    raise
                log.warning("volume %s of %s left behind: %s", vol, owner, exc)

    async def unchanged(self, made: list[VolumeRecord]) -> list[Compare]:
        """Guards that every volume in ``made`` is still the one made (``Conflict`` if one is
        gone already)."""
        guards = []
        for vol in made:
            kv = await self.store.get(keys.abs_volume(vol.name))
            if kv is None or VolumeRecord.load(kv.value).uid != vol.uid:
                raise Conflict(
                    f"volume {vol.name} was deleted while it was made for {vol.owner}; try again",
                    volume=vol.name,
                )
            guards.append(Compare.unchanged(kv.key, kv.mod_revision))
        return guards

    async def store_vm(
        self,
        spec: VMSpec,
        op: Operation,
        owner: VolumeOwner,
        made: list[VolumeRecord],
        guards: Sequence[Compare] = (),
        also: Sequence[Put | Delete] = (),
    ) -> None:
        """Store the new VM (and ``op``, and ``also``) while its volumes are all there and
        ``guards`` hold. If that fails, its volumes are deleted again, but only once the VM is
        known not to be stored: a store call whose answer was lost may have stored it (then
        this succeeded)."""
        try:
            await self.svc.store_new(
                spec, op, guards=[*await self.unchanged(made), *guards], also=also
            )
        except AecpError:
            key = keys.vm_spec(spec.name)
            if not await self.undo(key, lambda v: VMSpec.load(v).uuid == spec.uuid, made, owner):
                raise

    async def undo(
        self,
        key: str,
        mine: Callable[[bytes], bool],
        made: list[VolumeRecord],
        owner: VolumeOwner,
    ) -> bool:
        """After storing the record at ``key`` failed: True if it was stored after all (the
        value there is ``mine``: the answer was lost). Otherwise delete the volumes ``made``
        for it, if the store says it is not stored, and return False."""
        names = [v.name for v in made]
        try:
            kv = await self.store.get(key)
        except AecpError as exc:
            log.warning(
                "%s: unknown whether it was stored (%s); volumes %s stay (if it was not, "
                "the volume API deletes them)",
                key,
                exc,
                ", ".join(names),
            )
            return False
        if kv is not None and mine(kv.value):
            log.info("%s: stored after all (a store answer was lost)", key)
            return True
        await self.remove_volumes(names, owner)
        return False
