"""Placement: which node runs a new VM.

``choose_node`` is the pure rule: among ready nodes in use (not cordoned, not in or entering
or leaving maintenance: ``model.node.MaintenanceState``) that have room (free
memory >= the VM's memory, vCPUs <= the node's CPUs), the one with the most free memory; ties
go to the name that sorts first. Free memory is capacity minus the memory of every VM placed on
the node (running or not: a VM's disk lives on its node, so its place is kept).

``Scheduler`` is the controller of the ``scheduler`` role (``store.controllers``): each pass
reads the cluster (``store.view``), places every unplaced VM and returns one decision per VM;
the first pass of a term also ends the operations an earlier version left running
(``sweep_strays``). A VM that fits nowhere stays pending (state ``unschedulable``, its
operation still running with the reason as its message) and is placed as soon as a node can
take it — a pinned node coming back or uncordoned, memory freed by a delete.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

from aecp.common.clock import SYSTEM_CLOCK, Clock
from aecp.common.errors import NoCapacity
from aecp.model.node import MaintenanceState, NodeAdmin, NodeState, NodeView
from aecp.model.vm import Placement, VMSpec, VMState, VMStatus
from aecp.store import keys
from aecp.store.base import Compare, Put, Store
from aecp.store.controllers import Decision
from aecp.store.opsend import sweep_strays
from aecp.store.typed import update_op
from aecp.store.view import ClusterView, VMEntry, read_cluster

log = logging.getLogger(__name__)


def choose_node(spec: VMSpec, nodes: Sequence[NodeView]) -> NodeView:
    """The node for ``spec``; ``NoCapacity`` naming why each node was ruled out."""
    reasons = []
    fits = []
    for n in nodes:
        why = _unfit_reason(spec, n)
        if why:
            reasons.append(f"{n.name}: {why}")
        else:
            fits.append(n)
    if not fits:
        detail = "; ".join(reasons) if reasons else "the cluster has no nodes"
        raise NoCapacity(
            f"no node can run VM {spec.name} ({spec.vcpus} vCPUs, {spec.memory_mib} MiB): {detail}",
            reasons=reasons,
        )
    return min(fits, key=lambda n: (-n.free_memory_mib, n.name))


def node_views(snap: ClusterView) -> list[NodeView]:
    """The nodes of ``snap`` as placement sees them, maintenance state included."""
    return [v.under(snap.admin.get(v.name, NodeAdmin())) for v in snap.node_views()]


def _unfit_reason(spec: VMSpec, n: NodeView) -> str:
    if spec.node is not None and n.name != spec.node:
        return f"the VM is pinned to {spec.node}"
    if n.maintenance is not MaintenanceState.IN_USE:
        return f"in maintenance mode ({n.maintenance.value})"
    if n.cordoned:
        return f"cordoned ({n.cordon_reason})" if n.cordon_reason else "cordoned"
    if n.state is not NodeState.READY:
        return "unreachable"
    if spec.vcpus > n.capacity.cpus:
        return f"has {n.capacity.cpus} CPUs"
    if spec.memory_mib > n.free_memory_mib:
        return f"{n.free_memory_mib} MiB free"
    return ""


def reserve(view: NodeView, spec: VMSpec) -> NodeView:
    """``view`` after placing ``spec`` on it (so one pass can place several VMs)."""
    return view.model_copy(
        update={
            "reserved_memory_mib": view.reserved_memory_mib + spec.memory_mib,
            "reserved_vcpus": view.reserved_vcpus + spec.vcpus,
            "vms": view.vms + 1,
        }
    )


class Scheduler:
    """Places unplaced VMs. Run only by the holder of the scheduler role."""

    role = "scheduler"

    def __init__(self, store: Store, clock: Clock = SYSTEM_CLOCK) -> None:
        self.store = store
        self.clock = clock

    async def run_pass(self, new_term: bool = False) -> list[Decision]:
        decisions = []
        if new_term:  # once per term: operations older versions left running
            ended = await sweep_strays(self.store, self.clock.wall())
            decisions.append(Decision(f"took the role; {ended} stray operations ended"))
        snap = await read_cluster(self.store)
        views = {v.name: v for v in node_views(snap)}
        for entry in sorted(snap.vms.values(), key=lambda e: (e.spec.created_at, e.spec.name)):
            if entry.placement is not None or entry.spec.deleting:
                continue
            sentence = await self._place(entry, views, snap)
            decisions.append(Decision(sentence, "vm", entry.spec.name))
        return decisions

    async def _place(self, entry: VMEntry, views: dict[str, NodeView], snap: ClusterView) -> str:
        spec = entry.spec
        try:
            chosen = choose_node(spec, list(views.values()))
        except NoCapacity as exc:
            return await self._unschedulable(entry, exc.message)
        placement = Placement(node=chosen.name, at=self.clock.wall())
        placed = await self.store.txn(
            [
                Compare.absent(keys.vm_placement(spec.name)),
                Compare.unchanged(keys.vm_spec(spec.name), entry.spec_rev),
                snap.admin_unchanged(chosen.name),  # not cordoned nor in maintenance since read
            ],
            [Put(keys.vm_placement(spec.name), placement.dump())],
        )
        if not placed:
            return "it or its node changed while being placed: will look again"
        views[chosen.name] = reserve(chosen, spec)
        await update_op(
            self.store,
            spec.op_id,
            progress=20,
            message=f"placed on {chosen.name}",
            clock=self.clock,
        )
        return (
            f"placed on {chosen.name}: most free memory "
            f"({chosen.free_memory_mib} MiB) among ready nodes"
        )

    async def _unschedulable(self, entry: VMEntry, reason: str) -> str:
        spec = entry.spec
        current = entry.status
        if (
            current is None
            or current.state is not VMState.UNSCHEDULABLE
            or current.message != reason
        ):
            status = VMStatus(
                state=VMState.UNSCHEDULABLE, message=reason, updated_at=self.clock.wall()
            )
            await self.store.put(keys.vm_status(spec.name), status.dump())
            await update_op(
                self.store, spec.op_id, message=f"waiting for a node: {reason}", clock=self.clock
            )
        return f"cannot be placed now: {reason}"
