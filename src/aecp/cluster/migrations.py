"""Migration requests: move a VM to another node, live when it runs, cold when it is stopped.

The API (and the drain controller) only records intent here:

- a **running** VM gets a ``migrate`` job (``model.vmjob``) and a ``vm.migrate`` operation in
  one transaction; the source node's agent carries it out (``node.migration``) and ends both;
- a **stopped** VM whose disks are detached is moved at once: its placement changes by
  compare-and-swap in the transaction that stores the succeeded operation. Nothing is copied;
  its volumes are attached on the new node when it next starts.

A migration is refused, with the reason and nothing changed, when the VM is not in a state it
can move from (suspended, starting, stopping, being deleted, with a job in progress), when the
node named is the VM's own, unknown, not ready, cordoned or in maintenance, or has not the
memory. Without a node, the scheduler picks one (``choose_node``) among the others.

``cancel`` asks for a migration's operation to be cancelled: the flag goes on the operation,
and the source agent decides (before the disk hand-off it cancels and the VM runs on,
unchanged, on the source; after it, it is too late and the migration completes).
"""

from __future__ import annotations

import logging

from aecp.cluster.scheduler import choose_node
from aecp.common.clock import Clock
from aecp.common.errors import Conflict, InvalidInput, InvalidState, NotFound, Unavailable
from aecp.common.requester import REQUESTED_BY
from aecp.model.base import check_name
from aecp.model.node import NodeView
from aecp.model.operation import Operation, new_op_id
from aecp.model.vm import Placement, Power, VMState
from aecp.model.vmjob import OP_KINDS, JobKind, VMJob
from aecp.store import keys
from aecp.store.base import Compare, Put, Store
from aecp.store.typed import read
from aecp.store.view import ClusterView, VMEntry

log = logging.getLogger(__name__)

MIGRATE_KIND = OP_KINDS[JobKind.MIGRATE]
CANCELLABLE = frozenset({MIGRATE_KIND})


async def request_migration(
    store: Store,
    entry: VMEntry,
    view: ClusterView,
    target: str | None,
    clock: Clock,
    *,
    reason: str = "",
    bandwidth_mib_s: int = 0,
) -> Operation:
    """Record the migration of ``entry``'s VM to ``target`` (None: the scheduler's choice)
    and return its ``vm.migrate`` operation (see the module docstring). ``bandwidth_mib_s``
    caps a live migration's bandwidth (0: the source node's setting)."""
    if bandwidth_mib_s < 0:
        raise InvalidInput("bandwidth_mib_s", f"must be 0 or more, got {bandwidth_mib_s}")
    name = entry.spec.name
    state = view.vm_state(name)
    source = _movable(entry, state)
    dest = _destination(entry, view, source, target)
    why = f" ({reason})" if reason else ""
    guard = view.admin_unchanged(dest.name)  # not cordoned nor in maintenance meanwhile
    if state is VMState.STOPPED:
        return await _cold(store, entry, source, dest.name, clock, why, guard)
    return await _live(store, entry, source, dest.name, clock, why, bandwidth_mib_s, guard)


def _movable(entry: VMEntry, state: VMState) -> str:
    """The node the VM is on, if it can move now; ``InvalidState`` saying why not."""
    name = entry.spec.name
    if entry.spec.deleting:
        raise InvalidState(f"VM {name} is being deleted", state=state.value)
    if entry.job is not None:
        raise InvalidState(
            f"VM {name} has a {entry.job.describe()} in progress ({entry.job.op_id}); "
            "wait for it to end",
            operation=entry.job.op_id,
        )
    if entry.node is None:
        raise InvalidState(f"VM {name} is on no node yet", state=state.value)
    if state is VMState.PAUSED or entry.spec.power is Power.PAUSED:
        raise InvalidState(
            f"VM {name} is suspended: resume it to live-migrate it, or power it off to move it",
            state=state.value,
        )
    if state is VMState.RUNNING and entry.spec.power is Power.RUNNING:
        return entry.node
    if state is VMState.STOPPED and entry.spec.power is Power.STOPPED:
        return entry.node
    raise InvalidState(
        f"VM {name} is {state.value}: only a running VM (live) or a stopped one (cold) "
        "can be migrated",
        state=state.value,
    )


def _destination(entry: VMEntry, view: ClusterView, source: str, target: str | None) -> NodeView:
    """The node to move to: ``target`` if it can take the VM, else the scheduler's pick."""
    spec = entry.spec.model_copy(update={"node": None})  # a move re-pins a pinned VM
    if target is None:
        others = [n for n in view.node_views() if n.name != source]
        if not others:
            raise InvalidState(f"VM {spec.name} has no other node to go to")
        return choose_node(spec, others)
    check_name("node", target)
    if target == source:
        raise InvalidInput("node", f"VM {spec.name} already runs on {target}")
    if target not in view.nodes:
        raise NotFound(f"node {target} does not exist", node=target)
    if target not in view.alive:
        raise Unavailable(f"node {target} is not ready (unreachable)", node=target)
    return choose_node(spec, [view.node_view(target)])


def _new_op(name: str, message: str, clock: Clock) -> Operation:
    now = clock.wall()
    return Operation(
        id=new_op_id(),
        kind=MIGRATE_KIND,
        target=name,
        message=message,
        requested_by=REQUESTED_BY.get(),
        created_at=now,
        updated_at=now,
    )


async def _live(
    store: Store,
    entry: VMEntry,
    source: str,
    dest: str,
    clock: Clock,
    why: str,
    mib_s: int,
    guard: Compare,
) -> Operation:
    name = entry.spec.name
    op = _new_op(name, f"live migration to {dest} requested{why}: waiting for {source}", clock)
    job = VMJob(
        vm=name,
        vm_uuid=entry.spec.uuid,
        kind=JobKind.MIGRATE,
        op_id=op.id,
        target=dest,
        source=source,
        bandwidth_mib_s=mib_s,
        created_at=clock.wall(),
    )
    ok = await store.txn(
        [
            Compare.unchanged(keys.vm_spec(name), entry.spec_rev),
            Compare.unchanged(keys.vm_placement(name), entry.placement_rev),
            Compare.absent(keys.vm_job(name)),
            Compare(keys.node(dest), "create", ">", 0),
            guard,
        ],
        [Put(keys.vm_job(name), job.dump()), Put(keys.op(op.id), op.dump())],
    )
    if not ok:
        raise Conflict(f"VM {name} changed while the request was made; try again", vm=name)
    log.info("vm %s: live migration %s -> %s requested as %s%s", name, source, dest, op.id, why)
    return op


async def _cold(
    store: Store, entry: VMEntry, source: str, dest: str, clock: Clock, why: str, guard: Compare
) -> Operation:
    """Move a stopped VM: its placement (and pin), if none of its disks is attached."""
    name = entry.spec.name
    guards = []
    for vol in entry.spec.volumes():
        if await store.get(keys.abs_attach(vol)) is not None:
            raise InvalidState(
                f"VM {name} is stopped but its disk {vol} is still attached; try again shortly",
                volume=vol,
            )
        guards.append(Compare.absent(keys.abs_attach(vol)))
    message = f"{name} moved from {source} to {dest} (stopped: nothing copied){why}"
    op = _new_op(name, message, clock).succeed(message, clock.wall())
    puts = [
        Put(keys.vm_placement(name), Placement(node=dest, at=clock.wall()).dump()),
        Put(keys.op(op.id), op.dump()),
    ]
    if entry.spec.node is not None:
        puts.append(Put(keys.vm_spec(name), entry.spec.model_copy(update={"node": dest}).dump()))
    ok = await store.txn(
        [
            Compare.unchanged(keys.vm_spec(name), entry.spec_rev),
            Compare.unchanged(keys.vm_placement(name), entry.placement_rev),
            Compare.absent(keys.vm_job(name)),
            Compare(keys.node(dest), "create", ">", 0),
            guard,
            *guards,
        ],
        puts,
    )
    if not ok:
        raise Conflict(f"VM {name} changed while the request was made; try again", vm=name)
    log.info("vm %s: %s (%s)", name, message, op.id)
    return op


async def cancel(store: Store, op_id: str, clock: Clock) -> Operation:
    """Ask for operation ``op_id`` to be cancelled (see the module docstring). ``NotFound``;
    ``InvalidState`` if it has ended or is of a kind that cannot be cancelled."""
    for _ in range(5):
        got = await read(store, keys.op(op_id), Operation)
        if got is None:
            raise NotFound(f"operation {op_id} does not exist", operation=op_id)
        op, rev = got
        if op.state.done:
            raise InvalidState(f"operation {op_id} has ended ({op.state.value})", operation=op_id)
        if op.kind not in CANCELLABLE:
            kinds = ", ".join(sorted(CANCELLABLE))
            raise InvalidState(
                f"operation {op_id} is a {op.kind}, which cannot be cancelled (only {kinds})",
                operation=op_id,
            )
        if op.cancel_requested:
            return op
        new = op.model_copy(
            update={
                "cancel_requested": True,
                "message": f"cancel requested; {op.message}",
                "updated_at": clock.wall(),
            }
        )
        if await store.replace(keys.op(op_id), new.dump(), mod_revision=rev):
            log.info("operation %s (%s %s): cancel requested", op_id, op.kind, op.target)
            return new
    raise Conflict(f"operation {op_id} keeps changing; try again", operation=op_id)
