"""How operations end when their object moves on without them: a later request supersedes
the object's current operation, the object is deleted, or an operation was left running by an
older version (a stray).

``supersede`` and ``succeed`` return the guards and writes for the caller's own transaction
(the one storing the new desired state, or deleting the object), so an operation is ended
exactly when the change that ends it is stored. The guards fail that transaction if the
operation changed since it was read (its carrier finished it meanwhile, say): the caller
re-reads and tries again, so no race leaves an operation running, and no finished operation
is changed.

Strays are ended one compare-and-swap each (``end_strays``, ``sweep_strays``), never inside
another transaction: a VM can have any number of them, and etcd refuses a transaction of more
than 128 operations. A VM has one current operation, the one its spec names, and the
operation of its job if it has one (``model.vmjob``: a clone's names the new VM); every other
operation on it still running is a stray (the request that followed it would have cancelled
it), and so is every one on a VM that no longer exists. Each stray is ended only while the
VM's spec is still the one read, so an operation that became current meanwhile is never
touched.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable

from aecp.model.operation import Operation
from aecp.model.vm import VMSpec
from aecp.model.vmjob import VMJob
from aecp.store import keys
from aecp.store.base import Compare, KeyValue, Put, Store

log = logging.getLogger(__name__)

Guarded = tuple[list[Compare], list[Put]]


async def supersede(store: Store, op_id: str, by: str, now: float) -> Guarded:
    """Cancel operation ``op_id`` as ``superseded by <by>`` if it is still running."""
    return await _end(store, op_id, lambda op: op.superseded(by, now))


async def succeed(store: Store, op_id: str, message: str, now: float) -> Guarded:
    """Succeed operation ``op_id`` with ``message`` if it is still running."""
    return await _end(store, op_id, lambda op: op.succeed(message, now))


async def _end(store: Store, op_id: str, end: Callable[[Operation], Operation]) -> Guarded:
    if not op_id:
        return [], []
    kv = await store.get(keys.op(op_id))
    if kv is None:
        return [], []
    op = Operation.load(kv.value)
    if op.state.done:
        return [], []
    return [Compare.unchanged(kv.key, kv.mod_revision)], [Put(kv.key, end(op).dump())]


def _open_on_vms(kvs: Iterable[KeyValue]) -> dict[str, list[tuple[Operation, int]]]:
    """The running ``vm.*`` operations among ``kvs``, with their revisions, by VM."""
    out: dict[str, list[tuple[Operation, int]]] = {}
    for kv in kvs:
        op = Operation.load(kv.value)
        if op.kind.startswith("vm.") and not op.state.done:
            out.setdefault(op.target, []).append((op, kv.mod_revision))
    return out


async def _job_ops(store: Store) -> set[str]:
    """The operations of the VM jobs (``model.vmjob``) of VMs that exist: their agents end
    them (a job left by a VM deleted before jobs existed is nobody's: its operation is a
    stray)."""
    out = set()
    for kv in await store.list(keys.VM_JOBS):
        job = VMJob.load(kv.value)
        spec = await store.get(keys.vm_spec(job.vm))
        if spec is not None and VMSpec.load(spec.value).uuid == job.vm_uuid:
            out.add(job.op_id)
    return out


async def end_strays(store: Store, vm: str, now: float) -> int:
    """End every stray operation on VM ``vm`` (see the module docstring); returns how many.
    Operations must be read before the jobs and the spec: an operation created after them
    would look like a stray."""
    ops = _open_on_vms(await store.list(keys.OPS)).get(vm, [])
    if not ops:
        return 0
    jobs = await _job_ops(store)
    return await _end_strays(store, vm, [o for o in ops if o[0].id not in jobs], now)


async def sweep_strays(store: Store, now: float) -> int:
    """End the stray operations of every VM, existing or not; returns how many."""
    ended = 0
    open_ops = _open_on_vms(await store.list(keys.OPS))
    jobs = await _job_ops(store)
    for vm, ops in sorted(open_ops.items()):
        ended += await _end_strays(store, vm, [o for o in ops if o[0].id not in jobs], now)
    return ended


async def _end_strays(store: Store, vm: str, ops: list[tuple[Operation, int]], now: float) -> int:
    kv = await store.get(keys.vm_spec(vm))
    spec = VMSpec.load(kv.value) if kv else None
    guard = Compare.unchanged(kv.key, kv.mod_revision) if kv else Compare.absent(keys.vm_spec(vm))
    ended = 0
    for op, rev in ops:
        if spec is not None and op.id == spec.op_id:
            continue  # the current operation: its carrier ends it
        if spec is None or spec.deleting:
            new = op.cancel(f"VM {vm} was deleted", now)
        elif spec.op_id:
            new = op.superseded(spec.op_id, now)
        else:
            new = op.cancel(f"VM {vm} has moved on without it", now)
        if await store.txn(
            [guard, Compare.unchanged(keys.op(op.id), rev)], [Put(keys.op(op.id), new.dump())]
        ):
            ended += 1
            log.info("operation %s (%s %s) ended: %s", op.id, op.kind, vm, new.error)
    return ended
