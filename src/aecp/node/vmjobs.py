"""Carries out the jobs of the VMs on this node (``model.vmjob``): snapshots, rollbacks,
clones and conversions to templates.

``run`` is the reconciler's action for a VM that has a job: while it runs, the reconciler
leaves the VM alone (its action is in flight). Every run first undoes what an interrupted
run of the same job made (the agent was killed half-way), then does the whole job, and ends
it in one transaction that deletes the job and ends its operation (for a clone: stores the
new VM; for a template: stores the template and marks the VM deleted). A job that fails is
undone and its operation fails with the reason; one that cannot reach the store is left for
the next pass, which undoes and starts again.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import AsyncIterator, Callable, Sequence
from typing import Protocol

from aecp.cluster.vmclones import DiskCloner
from aecp.common.clock import SYSTEM_CLOCK, Clock
from aecp.common.errors import (
    AecpError,
    Conflict,
    InvalidState,
    NotFound,
    StoreUnavailable,
    Unavailable,
)
from aecp.common.failpoints import failpoint
from aecp.compute.hypervisor import Hypervisor, RunState
from aecp.model.operation import Operation
from aecp.model.template import TemplateRecord, template_volume
from aecp.model.vm import VMCreate, VMSpec
from aecp.model.vmjob import JobKind, VMJob, clone_snapshot
from aecp.storage.meta.model import SnapshotRecord, VolumeOwner, VolumeRecord
from aecp.store import keys
from aecp.store.base import Compare, Delete, Put, Store
from aecp.store.opsend import supersede
from aecp.store.typed import read, update_op
from aecp.store.view import VMEntry

log = logging.getLogger(__name__)


class JobNotEnded(AecpError):
    """A job's run ended without ending the job: it is tried again (after a back-off)."""

    code = "job_not_ended"
    http_status = 503


# failures that say nothing about the job itself: it is tried again rather than failed
RETRIED = (StoreUnavailable, Unavailable, JobNotEnded)


class SourceRunner(Protocol):
    async def run_source(self, e: VMEntry) -> None:
        """Carry out ``e``'s migrate job as its source (``node.migration``)."""


class VMJobs:
    """Runs the jobs of node ``node``'s VMs."""

    def __init__(
        self,
        node: str,
        hv: Hypervisor,
        cloner: DiskCloner,
        clock: Clock = SYSTEM_CLOCK,
        migrator: SourceRunner | None = None,
    ) -> None:
        self.node = node
        self.migrator = migrator
        self.hv = hv
        self.cloner = cloner
        self.snaps = cloner.snaps
        self.store = cloner.store
        self.clock = clock
        self._touched = False  # a rollback changed a disk in this run

    async def run(self, e: VMEntry) -> None:
        """Carry out ``e``'s job (see the module docstring), if it is still the job read (a
        view read while the last run ended may still show it: a job ended is never run
        again). A failure ends the job as failed; ``JobNotEnded`` if it could not be ended
        (the store, or a replica, did not answer; a rollback did not reach every disk; what
        a failed run made could not all be undone): the reconciler tries again after a
        back-off."""
        job = e.job
        assert job is not None
        name = e.spec.name
        if not await self._still_pending(e):
            log.debug("vm %s: %s (%s) ended already", name, job.describe(), job.op_id)
            return
        if job.kind is JobKind.MIGRATE:
            if self.migrator is None:
                raise JobNotEnded(f"{job.describe()}: this agent cannot migrate", vm=name)
            await self.migrator.run_source(e)
            return
        log.info("vm %s: %s (%s): starting", name, job.describe(), job.op_id)
        try:
            await self._undo(e.spec, job)
            await self._do(e, job)
        except RETRIED as exc:
            await self._not_ended(job, exc.message)
        except Exception as exc:  # every other failure ends the job, with its reason
            if job.kind is JobKind.ROLLBACK and isinstance(exc, AecpError) and self._touched:
                await self._not_ended(job, exc.message)  # mixed disks: never left so
            error = exc.message if isinstance(exc, AecpError) else f"{type(exc).__name__}: {exc}"
            log.error(
                "vm %s: %s failed: %s",
                name,
                job.describe(),
                error,
                exc_info=not isinstance(exc, AecpError),
            )
            await self._fail(e, job, error)

    async def _still_pending(self, e: VMEntry) -> bool:
        kv = await self.store.get(keys.vm_job(e.spec.name))
        return kv is not None and kv.mod_revision == e.job_rev

    async def _not_ended(self, job: VMJob, why: str) -> None:
        """Say so on the operation (best effort) and raise ``JobNotEnded``."""
        message = f"{job.describe()}: {why}; trying again"
        with contextlib.suppress(AecpError):
            await self._progress(job, 0, message)
        raise JobNotEnded(message, vm=job.vm, operation=job.op_id)

    async def _do(self, e: VMEntry, job: VMJob) -> None:
        self._touched = False
        if job.kind is JobKind.SNAPSHOT:
            await self._snapshot(e, job)
        elif job.kind is JobKind.ROLLBACK:
            await self._rollback(e, job)
        elif job.kind is JobKind.CLONE:
            await self._clone(e, job)
        else:
            await self._template(e, job)

    async def _fail(self, e: VMEntry, job: VMJob, error: str) -> None:
        try:
            await self._undo(e.spec, job)
            why = f"{job.describe()} failed: {error}"
            await self._end(e, job, lambda op: op.fail(why, self._now()))
        except Exception as exc:
            reason = exc.message if isinstance(exc, AecpError) else repr(exc)
            await self._not_ended(job, f"failed ({error}), and could not be ended: {reason}")

    # ---- the jobs -------------------------------------------------------------------------
    async def _snapshot(self, e: VMEntry, job: VMJob) -> None:
        vols = e.spec.volumes()
        async with self._quiesced(e.spec.name) as paused_on:
            await self._take(e.spec.name, job, job.snapshot, vols, paused_on)
        message = f"snapshot {job.snapshot} of {len(vols)} disks taken"
        await self._succeed(e, job, message)
        log.info("vm %s: %s (%s)", e.spec.name, message, job.op_id)

    async def _take(
        self, vm: str, job: VMJob, name: str, vols: list[str], paused_on: str | None
    ) -> None:
        """Snapshot every volume of ``vols`` as ``name``, recording the job's operation."""
        for i, vol in enumerate(vols, 1):
            await self.snaps.snapshot(vol, name, paused_on=paused_on, op=job.op_id)
            log.info("vm %s: snapshot %s: disk %d of %d taken", vm, name, i, len(vols))
            await self._progress(job, 10 + 60 * i // len(vols), f"disk {i} of {len(vols)} taken")
            if i < len(vols):
                await failpoint("vmjob-between-disks")  # tests kill the agent here

    async def _rollback(self, e: VMEntry, job: VMJob) -> None:
        await self._require_stopped(e, "rolled back")
        vols = e.spec.volumes()
        for vol in vols:  # all usable before any is rolled back
            await self.snaps.usable(vol, job.snapshot)
        for i, vol in enumerate(vols, 1):
            self._touched = True  # from here on, a failure is tried again, never left
            await self.snaps.rollback(vol, job.snapshot)
            done = f"disk {i} of {len(vols)} rolled back"
            await self._progress(job, 10 + 80 * i // len(vols), done)
        message = f"rolled back to snapshot {job.snapshot}"
        await self._succeed(e, job, message)
        log.info("vm %s: %s (%s)", e.spec.name, message, job.op_id)

    async def _clone(self, e: VMEntry, job: VMJob) -> None:
        new = new_clone_spec(e.spec, job)
        owner = VolumeOwner.vm(new.name, new.uuid)
        pairs = list(zip(e.spec.volumes(), new.volumes(), strict=True))
        if await self.hv.state(e.spec.name) in (RunState.RUNNING, RunState.PAUSED):
            tmp = clone_snapshot(job.op_id)
            async with self._quiesced(e.spec.name) as paused_on:
                await self._take(e.spec.name, job, tmp, e.spec.volumes(), paused_on)
            try:
                made = await self.cloner.clone_volumes(pairs, owner, snapshot=tmp)
            finally:
                await self._delete_snapshots(e.spec.volumes(), tmp, job.op_id)
        else:
            made = await self.cloner.clone_volumes(pairs, owner)
        op = await self._op(job)
        op = op.advance(80, f"disks cloned from {e.spec.name}; VM {new.name} stored", self._now())
        await self.cloner.store_vm(
            new,
            op,
            owner,
            made,
            guards=[Compare.unchanged(keys.vm_job(job.vm), e.job_rev)],
            also=[Delete(keys.vm_job(job.vm))],
        )
        log.info("vm %s: cloned as VM %s (%s)", e.spec.name, new.name, job.op_id)

    async def _template(self, e: VMEntry, job: VMJob) -> None:
        await self._require_stopped(e, "converted")
        spec = e.spec
        vols = [template_volume(job.target, v, spec.name) for v in spec.volumes()]
        owner = VolumeOwner.template(job.target)
        made = await self.cloner.clone_volumes(list(zip(spec.volumes(), vols, strict=True)), owner)
        rec = TemplateRecord(
            name=job.target,
            vcpus=spec.vcpus,
            memory_mib=spec.memory_mib,
            data_disks_mib=spec.data_disks_mib,
            volumes=vols,
            source_vm=spec.name,
            created_at=self._now(),
            op=job.op_id,
        )
        key = keys.template(job.target)
        try:
            await self._store_template(e, job, rec, made)
        except AecpError:
            ours = lambda v: TemplateRecord.load(v).op == job.op_id  # noqa: E731
            if not await self.cloner.undo(key, ours, made, owner):
                raise
        log.info(
            "vm %s: converted to template %s; deleting the VM (%s)",
            spec.name,
            job.target,
            job.op_id,
        )

    async def _store_template(
        self, e: VMEntry, job: VMJob, rec: TemplateRecord, made: list[VolumeRecord]
    ) -> None:
        """Store the template while its volumes are there, and mark the VM deleted (with the
        job's operation, superseding the VM's own) in the same transaction."""
        key = keys.template(rec.name)
        deleting = e.spec.model_copy(update={"deleting": True, "op_id": job.op_id})
        sup_cmp, sup_puts = await supersede(self.store, e.spec.op_id, job.op_id, self._now())
        message = f"template {rec.name} stored; deleting VM {e.spec.name}"
        ok = await self._end(
            e,
            job,
            lambda op: op.advance(90, message, self._now()),
            cmp=[
                Compare.absent(key),
                Compare.unchanged(keys.vm_spec(e.spec.name), e.spec_rev),
                *await self.cloner.unchanged(made),
                *sup_cmp,
            ],
            puts=[Put(key, rec.dump()), Put(keys.vm_spec(e.spec.name), deleting.dump()), *sup_puts],
        )
        if not ok:
            if await self.store.get(key) is not None:
                raise Conflict(f"template {rec.name} already exists", field="template")
            raise Conflict(f"VM {e.spec.name} or its volumes changed while it was converted")

    # ---- undoing an interrupted run -------------------------------------------------------
    async def _undo(self, spec: VMSpec, job: VMJob) -> None:
        """Remove what a run of ``job`` made and did not finish (nothing, for a new job)."""
        if job.kind is JobKind.SNAPSHOT:
            await self._delete_snapshots(spec.volumes(), job.snapshot, job.op_id)
        elif job.kind is JobKind.CLONE:
            await self._delete_snapshots(spec.volumes(), clone_snapshot(job.op_id), job.op_id)
            new = new_clone_spec(spec, job)
            owner = VolumeOwner.vm(new.name, new.uuid)
            await self.cloner.remove_volumes(new.volumes(), owner, strict=True)
        elif job.kind is JobKind.TEMPLATE:
            if await self.store.get(keys.template(job.target)) is not None:
                return  # another one's (ours is stored with the job's end): its volumes stay
            owner = VolumeOwner.template(job.target)
            for vol in spec.volumes():
                tpl_vol = template_volume(job.target, vol, spec.name)
                got = await read(self.store, keys.abs_volume(tpl_vol), VolumeRecord)
                if got is not None and got[0].source == f"volume {vol}":
                    await self.cloner.remove_volumes([tpl_vol], owner, strict=True)

    async def _delete_snapshots(self, vols: Sequence[str], name: str, op_id: str) -> None:
        """Delete snapshot ``name`` of each volume where operation ``op_id`` took it."""
        for vol in vols:
            got = await read(self.store, keys.abs_snapshot(vol, name), SnapshotRecord)
            if got is not None and got[0].op == op_id:
                with contextlib.suppress(NotFound):
                    await self.snaps.delete(vol, name, expected=got[0])
                log.info("vm %s: snapshot %s of %s undone (%s)", vol, name, vol, op_id)

    # ---- helpers ------------------------------------------------------------------------
    @contextlib.asynccontextmanager
    async def _quiesced(self, vm: str) -> AsyncIterator[str | None]:
        """The VM with its I/O drained for the block: paused if it runs (resumed after),
        as it is if paused or stopped. Yields the node a paused VM's disks are attached on
        (this one), or None if it is not running."""
        state = await self.hv.state(vm)
        if state is RunState.RUNNING:
            await self.hv.pause(vm)
            try:
                yield self.node
            finally:
                await self.hv.resume(vm)
        elif state is RunState.PAUSED:
            yield self.node
        else:
            yield None

    async def _require_stopped(self, e: VMEntry, what: str) -> None:
        """The VM does not run here. Its desired power is not looked at: the API asked for a
        stopped VM, and a start requested since waits for the job (the reconciler runs it
        first)."""
        state = await self.hv.state(e.spec.name)
        if state is not RunState.STOPPED:
            raise InvalidState(
                f"VM {e.spec.name} is {state.value} here: only a stopped VM can be {what}"
            )

    async def _op(self, job: VMJob) -> Operation:
        got = await read(self.store, keys.op(job.op_id), Operation)
        if got is None:
            raise NotFound(f"operation {job.op_id} does not exist", operation=job.op_id)
        return got[0]

    async def _progress(self, job: VMJob, progress: int, message: str) -> None:
        await update_op(self.store, job.op_id, progress=progress, message=message, clock=self.clock)

    async def _end(
        self,
        e: VMEntry,
        job: VMJob,
        end: Callable[[Operation], Operation],
        cmp: Sequence[Compare] = (),
        puts: Sequence[Put | Delete] = (),
    ) -> bool:
        return await end_job(self.store, e, job, end, cmp, puts)

    async def _succeed(self, e: VMEntry, job: VMJob, message: str) -> None:
        if not await self._end(e, job, lambda op: op.succeed(message, self._now())):
            raise Conflict(f"VM {e.spec.name}: its job changed while it ran", vm=e.spec.name)

    def _now(self) -> float:
        return self.clock.wall()


def new_clone_spec(source: VMSpec, job: VMJob) -> VMSpec:
    """The spec of the VM clone ``job`` makes of ``source`` (the same every time: its uuid
    is the job's)."""
    req = VMCreate(
        name=job.target,
        image=source.image,
        vcpus=source.vcpus,
        memory_mib=source.memory_mib,
        data_disks_mib=source.data_disks_mib,
        start=job.start,
    )
    return VMSpec.from_create(req, job.op_id, job.created_at).model_copy(
        update={
            "uuid": job.target_uuid,
            "disks_prepared": True,
            "source": f"clone of {source.name}",
        }
    )


async def end_job(
    store: Store,
    e: VMEntry,
    job: VMJob,
    end: Callable[[Operation], Operation],
    cmp: Sequence[Compare] = (),
    puts: Sequence[Put | Delete] = (),
) -> bool:
    """Delete ``e``'s job and end its operation with ``end`` (and ``puts``, while ``cmp``
    hold) in one transaction, retried while only the operation changed; False if ``cmp`` or
    the job changed."""
    for _ in range(5):
        kv = await store.get(keys.op(job.op_id))
        ops: list[Put | Delete] = [Delete(keys.vm_job(job.vm)), *puts]
        guards = [Compare.unchanged(keys.vm_job(job.vm), e.job_rev), *cmp]
        if kv is not None:
            op = Operation.load(kv.value)
            if not op.state.done:
                guards.append(Compare.unchanged(kv.key, kv.mod_revision))
                ops.append(Put(kv.key, end(op).dump()))
        if await store.txn(guards, ops):
            return True
        op_kv = await store.get(keys.op(job.op_id))
        if op_kv is not None and kv is not None and op_kv.mod_revision != kv.mod_revision:
            continue  # only the operation moved (its progress): again
        return False
    return False
