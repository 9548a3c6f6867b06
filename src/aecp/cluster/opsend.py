"""How operations end when their object moves on without them: a later request supersedes
the object's current operation, or the object is deleted with operations still open.

Both return the guards and writes for the caller's own transaction (the one storing the new
desired state, or deleting the object), so an operation is ended exactly when the change that
ends it is stored. The guards fail that transaction if one of these operations changed since it
was read (its carrier finished it meanwhile, say): the caller re-reads and tries again, so no
race leaves an operation running, and no finished operation is changed.
"""

from __future__ import annotations

from collections.abc import Callable

from aecp.model.operation import Operation
from aecp.store import keys
from aecp.store.base import Compare, Put, Store

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


async def end_with_vm(store: Store, vm: str, reason: str, now: float, keep: set[str]) -> Guarded:
    """Cancel, with ``reason``, every running operation on VM ``vm`` except those in ``keep``
    (it is being deleted)."""
    cmp: list[Compare] = []
    puts: list[Put] = []
    for kv in await store.list(keys.OPS):
        op = Operation.load(kv.value)
        on_vm = op.target == vm and op.kind.startswith("vm.")
        if on_vm and not op.state.done and op.id not in keep:
            cmp.append(Compare.unchanged(kv.key, kv.mod_revision))
            puts.append(Put(kv.key, op.cancel(reason, now).dump()))
    return cmp, puts
