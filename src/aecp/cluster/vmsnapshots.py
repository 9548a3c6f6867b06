"""VM-level snapshots, clones and templates, over ABS volume snapshots.

A VM snapshot is a snapshot of each of its volumes under one name, taken while the VM is
paused (QEMU drains in-flight I/O when it pauses), so it is crash-consistent across all disks.
Only the VM's node can pause it: requests about a running VM elsewhere raise ``RunsElsewhere``
and the API forwards them to that node.

A VM clone is a new VM whose volumes are O(1) clones of the source's; a template is a set of
volumes (``tpl-<T>-boot`` ...) cloned from a stopped VM, which is then deleted;
``vm create --template T`` clones the template's volumes in O(1).
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from typing import Protocol

from pydantic import BaseModel

from aecp.cluster.service import ClusterService
from aecp.common.errors import (
    AecpError,
    AlreadyExists,
    Conflict,
    InvalidInput,
    InvalidState,
    NotFound,
)
from aecp.model.base import check_name
from aecp.model.operation import Operation
from aecp.model.template import TemplateRecord, template_volume
from aecp.model.vm import Power, VMCreate, VMSpec, VMState
from aecp.storage.meta.model import VolumeOwner, VolumeRecord
from aecp.storage.snapshots import SnapshotService
from aecp.store import keys
from aecp.store.base import Compare, Put
from aecp.store.typed import read
from aecp.store.view import VMEntry

log = logging.getLogger(__name__)
LIVE = {VMState.RUNNING, VMState.PAUSED, VMState.STARTING, VMState.REBOOTING, VMState.STOPPING}


class RunsElsewhere(AecpError):
    """The VM runs on ``node``: only that node can pause it for a snapshot."""

    code = "runs_elsewhere"
    http_status = 421

    def __init__(self, vm: str, node: str) -> None:
        super().__init__(f"VM {vm} runs on {node}", node=node)
        self.node = node


class VMPauser(Protocol):
    def paused(self, vm: str) -> AbstractAsyncContextManager[None]:
        """Pause the local QEMU of ``vm`` (I/O drained) for the block, resume after."""


class VMSnapshot(BaseModel):
    vm: str
    name: str
    volumes: list[str]
    created_at: float


class VMSnapshotService:
    def __init__(
        self, svc: ClusterService, snaps: SnapshotService, node: str, pauser: VMPauser | None
    ) -> None:
        self.svc = svc
        self.snaps = snaps
        self.node = node
        self.pauser = pauser

    # ---- snapshots ------------------------------------------------------------------------
    async def snapshot(self, vm: str, name: str) -> VMSnapshot:
        check_name("name", name)
        entry, _ = await self.svc.vm(vm)
        made: list[str] = []
        try:
            async with self._quiesced(entry):
                paused_on = self.node if self._live(entry) else None
                for vol in entry.spec.volumes():
                    await self.snaps.snapshot(vol, name, paused_on=paused_on)
                    made.append(vol)
        except BaseException:
            for vol in made:  # all disks or none
                with contextlib.suppress(AecpError):
                    await self.snaps.delete(vol, name)
            raise
        log.info("vm %s: snapshot %s of %d disks taken", vm, name, len(made))
        return await self._find(entry.spec, name)

    async def snapshots(self, vm: str) -> list[VMSnapshot]:
        entry, _ = await self.svc.vm(vm)
        boot = entry.spec.volumes()[0]
        try:
            records = await self.snaps.snapshots(boot)
        except NotFound:
            return []
        return [
            VMSnapshot(vm=vm, name=r.name, volumes=entry.spec.volumes(), created_at=r.created_at)
            for r in records
        ]

    async def _find(self, spec: VMSpec, name: str) -> VMSnapshot:
        rec, _ = await self.snaps.get(spec.volumes()[0], name)
        return VMSnapshot(
            vm=spec.name, name=name, volumes=spec.volumes(), created_at=rec.created_at
        )

    async def delete(self, vm: str, name: str) -> None:
        entry, _ = await self.svc.vm(vm)
        await self._find(entry.spec, name)
        for vol in entry.spec.volumes():
            with contextlib.suppress(NotFound):
                await self.snaps.delete(vol, name)

    async def rollback(self, vm: str, name: str) -> VMSnapshot:
        entry, snap = await self.svc.vm(vm)
        self._require_stopped(entry, snap.vm_state(vm), "roll it back")
        found = await self._find(entry.spec, name)
        for vol in entry.spec.volumes():  # all disks usable before any is rolled back
            await self.snaps.usable(vol, name)
        for vol in entry.spec.volumes():
            await self.snaps.rollback(vol, name)
        log.info("vm %s: rolled back to snapshot %s", vm, name)
        return found

    # ---- clones and templates -------------------------------------------------------------
    # A clone's or a template's volumes are made here, before its record is stored, and belong
    # to it from the start (``VolumeOwner``); the record is stored only while they are all still
    # there (until then their owner does not exist, so the volume API may delete them). If the
    # record is not stored, the volumes made so far are deleted again.

    async def clone(self, vm: str, new: str, start: bool = True) -> Operation:
        """A new VM with the same shape whose disks are O(1) clones of ``vm``'s."""
        entry, _ = await self.svc.vm(vm)
        spec = entry.spec
        req = VMCreate(
            name=new,
            image=spec.image,
            vcpus=spec.vcpus,
            memory_mib=spec.memory_mib,
            data_disks_mib=spec.data_disks_mib,
            start=start,
        )
        await self.svc.validate_new(req, image=False)
        op, new_spec = self._new_spec(req, f"clone of {vm}")
        pairs = list(zip(spec.volumes(), new_spec.volumes(), strict=True))
        owner = VolumeOwner.vm(new_spec.name, new_spec.uuid)
        if self._live(entry):
            tmp = f"clone-{new}"
            await self.snapshot(vm, tmp)
            try:
                made = await self._clone_volumes(pairs, owner, snapshot=tmp)
            finally:
                await self.delete(vm, tmp)
        else:
            made = await self._clone_volumes(pairs, owner)
        await self._store_clone(new_spec, op, owner, made)
        return op

    async def convert_to_template(self, vm: str, template: str) -> TemplateRecord:
        """Freeze a stopped VM's disks as template ``template`` and delete the VM."""
        check_name("template", template)
        entry, snap = await self.svc.vm(vm)
        self._require_stopped(entry, snap.vm_state(vm), "convert it")
        if await read(self.svc.store, keys.template(template), TemplateRecord):
            raise AlreadyExists(f"template {template} already exists", field="template")
        spec = entry.spec
        vols = [template_volume(template, v, vm) for v in spec.volumes()]
        await self._check_template_volumes(template, vols)
        owner = VolumeOwner.template(template)
        made = await self._clone_volumes(list(zip(spec.volumes(), vols, strict=True)), owner)
        rec = TemplateRecord(
            name=template,
            vcpus=spec.vcpus,
            memory_mib=spec.memory_mib,
            data_disks_mib=spec.data_disks_mib,
            volumes=vols,
            source_vm=vm,
            created_at=self.svc.clock.wall(),
        )
        await self._store_template(rec, owner, made)
        await self.svc.delete_vm(vm)
        log.info("vm %s: converted to template %s", vm, template)
        return rec

    async def _check_template_volumes(self, template: str, vols: list[str]) -> None:
        """Every volume name of the template is valid and free (before anything is made)."""
        for vol in vols:
            try:
                check_name("template", vol)
            except InvalidInput:
                raise InvalidInput(
                    "template",
                    f"{template!r} is too long: its volume {vol!r} would break the "
                    "63-character name rule (template names leave room for tpl-<name>-data4)",
                ) from None
            if await self.svc.store.get(keys.abs_volume(vol)) is not None:
                raise AlreadyExists(
                    f"volume {vol} already exists; choose another template name",
                    field="template",
                    volume=vol,
                )

    async def create_from_template(self, req: VMCreate) -> Operation:
        assert req.template is not None
        tpl = await self.template(req.template)
        given = req.model_fields_set
        req = req.model_copy(
            update={
                "vcpus": req.vcpus if "vcpus" in given else tpl.vcpus,
                "memory_mib": req.memory_mib if "memory_mib" in given else tpl.memory_mib,
                "data_disks_mib": tpl.data_disks_mib,
            }
        )
        await self.svc.validate_new(req, image=False)
        op, spec = self._new_spec(req, f"template {tpl.name}")
        owner = VolumeOwner.vm(spec.name, spec.uuid)
        made = await self._clone_volumes(list(zip(tpl.volumes, spec.volumes(), strict=True)), owner)
        await self._store_clone(spec, op, owner, made)
        return op

    def _new_spec(self, req: VMCreate, source: str) -> tuple[Operation, VMSpec]:
        op = self.svc.new_op("vm.create", req.name, f"created as {source}")
        spec = VMSpec.from_create(req, op.id, self.svc.clock.wall()).model_copy(
            update={"disks_prepared": True, "source": source}
        )
        return op, spec

    async def _clone_volumes(
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
            await self._remove_volumes([v.name for v in made], owner)
            raise
        return made

    async def _remove_volumes(self, volumes: list[str], owner: VolumeOwner) -> None:
        """Best effort: delete ``owner``'s ``volumes`` made for a record never stored."""
        for vol in volumes:
            try:
                await self.snaps.pool.delete_replicas(
                    await self.snaps.meta.delete_volume(vol, owner)
                )
            except AecpError as exc:
                log.warning("volume %s of %s left behind: %s", vol, owner, exc)

    async def _unchanged(self, made: list[VolumeRecord]) -> list[Compare]:
        """Guards that every volume in ``made`` is still the one made: until the record that
        owns them is stored, their owner does not exist and the volume API may delete them, so
        that record is stored only while they are all there (``Conflict`` if one is gone)."""
        guards = []
        for vol in made:
            kv = await self.svc.store.get(keys.abs_volume(vol.name))
            if kv is None or VolumeRecord.load(kv.value).uid != vol.uid:
                raise Conflict(
                    f"volume {vol.name} was deleted while it was made for {vol.owner}; try again",
                    volume=vol.name,
                )
            guards.append(Compare.unchanged(kv.key, kv.mod_revision))
        return guards

    async def _store_clone(
        self, spec: VMSpec, op: Operation, owner: VolumeOwner, made: list[VolumeRecord]
    ) -> None:
        """Store the new VM while its volumes are all there. If that fails, its volumes are
        deleted again, but only once the VM is known not to be stored: a store call whose
        answer was lost may have stored it (then the request succeeded)."""
        try:
            await self.svc.store_new(spec, op, guards=await self._unchanged(made))
        except AecpError:
            key = keys.vm_spec(spec.name)
            if not await self._undo(key, lambda v: VMSpec.load(v).uuid == spec.uuid, made, owner):
                raise

    async def _store_template(
        self, rec: TemplateRecord, owner: VolumeOwner, made: list[VolumeRecord]
    ) -> None:
        """Store template ``rec`` while its volumes are all there (as ``_store_clone``)."""
        key = keys.template(rec.name)
        try:
            guards = await self._unchanged(made)
            if await self.svc.store.txn([Compare.absent(key), *guards], [Put(key, rec.dump())]):
                return
            if await self.svc.store.get(key) is not None:
                raise AlreadyExists(f"template {rec.name} already exists", field="template")
            raise Conflict(f"template {rec.name}: its volumes changed while it was made")
        except AecpError:
            if not await self._undo(key, lambda v: TemplateRecord.load(v) == rec, made, owner):
                raise

    async def _undo(
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
            kv = await self.svc.store.get(key)
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
        await self._remove_volumes(names, owner)
        return False

    async def template(self, name: str) -> TemplateRecord:
        check_name("template", name)
        got = await read(self.svc.store, keys.template(name), TemplateRecord)
        if got is None:
            raise NotFound(f"template {name} does not exist", template=name)
        return got[0]

    async def templates(self) -> list[TemplateRecord]:
        return [TemplateRecord.load(kv.value) for kv in await self.svc.store.list(keys.TEMPLATES)]

    async def delete_template(self, name: str, delete_volume: VolumeDeleter) -> None:
        """Delete the template and its volumes. Every volume is checked first (``InvalidState``
        if one has snapshots or is attached): the record is not deleted while a volume could
        not be, which would leave that volume owned by a template that no longer exists."""
        tpl = await self.template(name)
        for vol in tpl.volumes:
            if await self.svc.store.list(keys.abs_snapshots(vol)):
                raise InvalidState(
                    f"template {name}: its volume {vol} has snapshots; delete them first",
                    volume=vol,
                )
            if await self.snaps.meta.attachment(vol) is not None:
                raise InvalidState(f"template {name}: its volume {vol} is in use", volume=vol)
        await self.svc.store.delete(keys.template(name))
        for vol in tpl.volumes:
            with contextlib.suppress(NotFound):
                await delete_volume(vol)

    # ---- helpers ------------------------------------------------------------------------
    @staticmethod
    def _live(entry: VMEntry) -> bool:
        return entry.status is not None and entry.status.state in LIVE

    @asynccontextmanager
    async def _quiesced(self, entry: VMEntry) -> AsyncIterator[None]:
        if not self._live(entry):
            yield
            return
        if entry.node != self.node or self.pauser is None:
            raise RunsElsewhere(entry.spec.name, entry.node or "?")
        async with self.pauser.paused(entry.spec.name):
            yield

    @staticmethod
    def _require_stopped(entry: VMEntry, state: VMState, what: str) -> None:
        if entry.spec.power is not Power.STOPPED or state is not VMState.STOPPED:
            raise InvalidState(
                f"VM {entry.spec.name} is {state.value}; power it off to {what}", state=state.value
            )


class VolumeDeleter(Protocol):
    async def __call__(self, name: str) -> object: ...
