"""VM-level snapshots, clones and templates, over ABS volume snapshots: the requests.

A VM snapshot is a snapshot of each of its volumes under one name, taken while the VM is
paused (QEMU drains in-flight I/O when it pauses), so it is crash-consistent across all disks.
Taking one, rolling back to one, cloning a VM and converting it to a template take several
steps and need the VM's node (only it can pause the VM): each request checks what it can, then
records a job for the VM's node agent and its operation in one transaction (``model.vmjob``)
and returns the operation. The agent carries the job out (``node.vmjobs``).

A VM clone is a new VM whose volumes are O(1) clones of the source's; a template is a set of
volumes (``tpl-<T>-boot`` ...) cloned from a stopped VM, which is then deleted;
``vm create --template T`` clones the template's volumes in O(1).
"""

from __future__ import annotations

import contextlib
import logging
import uuid as uuidlib
from typing import Protocol

from pydantic import BaseModel

from aecp.cluster.vmclones import DiskCloner
from aecp.cluster.vms import VMService
from aecp.common.errors import (
    AlreadyExists,
    Conflict,
    InvalidInput,
    InvalidState,
    NotFound,
    Unavailable,
)
from aecp.model.base import check_name
from aecp.model.operation import Operation
from aecp.model.template import TemplateRecord, template_volume
from aecp.model.vm import Power, VMCreate, VMSpec, VMState
from aecp.model.vmjob import OP_KINDS, JobKind, VMJob
from aecp.storage.meta.model import VolumeOwner
from aecp.storage.snapshots import SnapshotService
from aecp.store import keys
from aecp.store.base import Compare, Put
from aecp.store.typed import read
from aecp.store.view import ClusterView, VMEntry

log = logging.getLogger(__name__)


class VMSnapshot(BaseModel):
    vm: str
    name: str
    volumes: list[str]
    created_at: float


class VMSnapshotService:
    def __init__(self, svc: VMService, snaps: SnapshotService) -> None:
        self.svc = svc
        self.snaps = snaps
        self.cloner = DiskCloner(svc, snaps)

    # ---- snapshots ------------------------------------------------------------------------
    async def snapshot(self, vm: str, name: str) -> Operation:
        """Ask the VM's node for a crash-consistent snapshot ``name`` of all its disks."""
        check_name("name", name)
        entry, view = await self._for_job(vm)
        for vol in entry.spec.volumes():
            if await self.svc.store.get(keys.abs_snapshot(vol, name)) is not None:
                raise AlreadyExists(
                    f"snapshot {name} already exists (on volume {vol})", field="name", volume=vol
                )
        job = self._job(entry, JobKind.SNAPSHOT, snapshot=name)
        return await self._record(entry, view, job)

    async def snapshots(self, vm: str) -> list[VMSnapshot]:
        entry, _ = await self.svc.vm(vm)
        boot = entry.spec.volumes()[0]
        try:
            records = await self.snaps.snapshots(boot)
        except NotFound:
            return []
        busy = entry.job.op_id if entry.job is not None else None
        return [
            VMSnapshot(vm=vm, name=r.name, volumes=entry.spec.volumes(), created_at=r.created_at)
            for r in records
            if not (busy and r.op == busy)  # a job's own, being made: not one yet
        ]

    async def _find(self, spec: VMSpec, name: str) -> VMSnapshot:
        rec, _ = await self.snaps.get(spec.volumes()[0], name)
        return VMSnapshot(
            vm=spec.name, name=name, volumes=spec.volumes(), created_at=rec.created_at
        )

    async def delete(self, vm: str, name: str) -> None:
        """Delete the snapshot from every disk, the boot disk last: it names the VM snapshot,
        so a delete interrupted half-way is finished by the next one."""
        entry, _ = await self.svc.vm(vm)
        rec, _ = await self.snaps.get(entry.spec.volumes()[0], name)
        if entry.job is not None and (entry.job.snapshot == name or rec.op == entry.job.op_id):
            raise InvalidState(
                f"VM {vm}: snapshot {name} is in use by {entry.job.op_id} "
                f"({entry.job.describe()}); wait for it to end",
                operation=entry.job.op_id,
            )
        for vol in reversed(entry.spec.volumes()):
            with contextlib.suppress(NotFound):
                await self.snaps.delete(vol, name)

    async def rollback(self, vm: str, name: str) -> Operation:
        """Ask the VM's node to return every disk of the stopped VM to snapshot ``name``."""
        check_name("name", name)
        entry, view = await self._for_job(vm)
        self._require_stopped(entry, view.vm_state(vm), "roll it back")
        await self._find(entry.spec, name)
        for vol in entry.spec.volumes():  # all disks usable before any is rolled back
            await self.snaps.usable(vol, name)
        job = self._job(entry, JobKind.ROLLBACK, snapshot=name)
        return await self._record(entry, view, job)

    # ---- clones and templates -------------------------------------------------------------
    async def clone(self, vm: str, new: str, start: bool = True) -> Operation:
        """Ask the VM's node for a new VM with the same shape whose disks are O(1) clones of
        ``vm``'s. The operation is the new VM's: it ends when the new VM runs (or is stored,
        stopped, if it is not to start)."""
        entry, view = await self._for_job(vm)
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
        job = self._job(
            entry, JobKind.CLONE, target=new, target_uuid=str(uuidlib.uuid4()), start=start
        )
        return await self._record(entry, view, job)

    async def convert_to_template(self, vm: str, template: str) -> Operation:
        """Ask the VM's node to freeze the stopped VM's disks as template ``template`` and
        delete the VM."""
        check_name("template", template)
        entry, view = await self._for_job(vm)
        self._require_stopped(entry, view.vm_state(vm), "convert it")
        if await read(self.svc.store, keys.template(template), TemplateRecord):
            raise AlreadyExists(f"template {template} already exists", field="template")
        for e in view.vms.values():
            if e.job is not None and e.job.kind is JobKind.TEMPLATE and e.job.target == template:
                raise AlreadyExists(
                    f"template {template} is being made from VM {e.spec.name} ({e.job.op_id})",
                    field="template",
                )
        vols = [template_volume(template, v, vm) for v in entry.spec.volumes()]
        await self._check_template_volumes(template, vols)
        for vol in entry.spec.volumes():  # the VM is deleted after: it must be deletable
            if await self.svc.store.list(keys.abs_snapshots(vol)):
                raise InvalidState(
                    f"VM {vm}: its volume {vol} has snapshots, and the VM is deleted once "
                    "converted; delete them first",
                    volume=vol,
                )
        job = self._job(entry, JobKind.TEMPLATE, target=template)
        return await self._record(entry, view, job)

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
        source = f"template {tpl.name}"
        op = self.svc.new_op("vm.create", req.name, f"created as {source}")
        spec = VMSpec.from_create(req, op.id, self.svc.clock.wall()).model_copy(
            update={"disks_prepared": True, "source": source}
        )
        owner = VolumeOwner.vm(spec.name, spec.uuid)
        pairs = list(zip(tpl.volumes, spec.volumes(), strict=True))
        made = await self.cloner.clone_volumes(pairs, owner)
        await self.cloner.store_vm(spec, op, owner, made)
        return op

    # ---- jobs ---------------------------------------------------------------------------
    async def _for_job(self, vm: str) -> tuple[VMEntry, ClusterView]:
        """The VM, if its node can be asked for a job now: it is placed, has disks, is not
        being deleted and has no job already (``InvalidState`` saying which is not so)."""
        entry, view = await self.svc.vm(vm)
        state = view.vm_state(vm)
        if entry.spec.deleting:
            raise InvalidState(f"VM {vm} is being deleted", state=state.value)
        if entry.job is not None:
            raise InvalidState(
                f"VM {vm} has a {entry.job.describe()} in progress ({entry.job.op_id}); "
                "wait for it to end",
                operation=entry.job.op_id,
            )
        if entry.node is None:
            raise InvalidState(
                f"VM {vm} is {state.value}: it is on no node yet, and its node carries this out",
                state=state.value,
            )
        if entry.node not in view.alive:
            raise Unavailable(
                f"VM {vm}'s node {entry.node} is unreachable, and it carries this out",
                node=entry.node,
            )
        ready = entry.status is not None and entry.status.disks_ready
        if not (ready or entry.spec.disks_prepared):
            raise InvalidState(
                f"VM {vm} has no disks yet (they are made when it first starts)",
                state=state.value,
            )
        return entry, view

    def _job(self, entry: VMEntry, kind: JobKind, **fields: object) -> VMJob:
        return VMJob.model_validate(
            {
                "vm": entry.spec.name,
                "vm_uuid": entry.spec.uuid,
                "kind": kind,
                "op_id": "",
                "created_at": self.svc.clock.wall(),
                **fields,
            }
        )

    async def _record(self, entry: VMEntry, view: ClusterView, job: VMJob) -> Operation:
        """Store ``job`` and its operation while the VM is as read and has no job."""
        target = job.target if job.kind is JobKind.CLONE else job.vm
        op = self.svc.new_op(
            OP_KINDS[job.kind], target, f"{job.describe()}: waiting for node {entry.node}"
        )
        job = job.model_copy(update={"op_id": op.id})
        name = job.vm
        ok = await self.svc.store.txn(
            [
                Compare.unchanged(keys.vm_spec(name), entry.spec_rev),
                await self.svc.job_guard(entry.spec),
            ],
            [Put(keys.vm_job(name), job.dump()), Put(keys.op(op.id), op.dump())],
        )
        if not ok:
            raise Conflict(f"VM {name} changed while the request was made; try again", vm=name)
        log.info("vm %s: %s requested as %s", name, job.describe(), op.id)
        return op

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
    def _require_stopped(entry: VMEntry, state: VMState, what: str) -> None:
        if entry.spec.power is not Power.STOPPED or state is not VMState.STOPPED:
            raise InvalidState(
                f"VM {entry.spec.name} is {state.value}; power it off to {what}", state=state.value
            )


class VolumeDeleter(Protocol):
    async def __call__(self, name: str) -> object: ...
