"""Maintenance mode's rules, as pure functions of what was read (``docs/design/maintenance.md``).

``precheck`` answers "may node N enter maintenance now?" with *every* failing check and its
reason (an operator fixes them all at once, not one per attempt), and the plan the drain would
follow. The checks (the product's, ``reference/arcfra-features.md`` §1.5):

- ``state``: the node is in use (not already entering, in or leaving maintenance);
- ``one-at-a-time``: no other node of the cluster is in, entering or leaving maintenance;
- ``last-ready-node``: another node is ready and in use (else no VM could run anywhere);
- ``single-replica``: no extent has its only valid replica (among live storage servers) here;
- ``recovery``: no ABS copy (catch-up, re-replication) is in progress;
- ``vm-state``: every VM here is running or stopped: none suspended, ``unknown``, in a
  transition (starting, stopping...), in error, being deleted or with a job in progress;
- ``migratable``: no running VM is pinned to this node (``VMSpec.node``), unless
  ``shutdown_unmigratable`` (then it is powered off instead);
- ``capacity``: the other nodes can take every running VM, largest memory first, each placed
  by ``choose_node`` and reserved (``reserve``) before the next; unless
  ``shutdown_unmigratable`` (then a VM that fits nowhere is powered off instead).

Stopped VMs never fail a check: each is cold-moved where there is room once the running ones
are placed (so a cold move never takes the room a live one needs), and one that cannot move
(pinned here, or no room) stays, stopped. ``plan`` is the drain's order; the drain controller
(``cluster.drain``) calls it on each pass to pick its next move.
"""

from __future__ import annotations

import enum
from collections.abc import Collection, Iterable, Sequence
from dataclasses import dataclass, field

from aecp.cluster.scheduler import choose_node, node_views, reserve
from aecp.common.errors import NoCapacity
from aecp.model.node import MaintenanceState, NodeAdmin, NodeState, NodeView
from aecp.model.vm import Power, VMState
from aecp.storage.meta.model import ExtentRecord, RecoveryRecord, VolumeRecord
from aecp.store.view import ClusterView, VMEntry

NAMES_SHOWN = 5  # objects named in one reason; the rest are counted


class Action(enum.StrEnum):
    LIVE = "live-migrate"  # a running VM, to ``target``
    COLD = "cold-move"  # a stopped VM, to ``target``
    POWER_OFF = "power-off"  # a running VM that cannot move (shutdown_unmigratable)
    STAY = "stay"  # a stopped VM that cannot move: it stays, stopped
    WAIT = "wait"  # a VM in a state the drain cannot handle now (fails check ``vm-state``)
    BLOCKED = "blocked"  # a running VM that cannot move (fails ``migratable``/``capacity``)


@dataclass(frozen=True)
class Failure:
    """One failing pre-check: ``check`` (its name, above) and ``reason`` (for people)."""

    check: str
    reason: str

    def __str__(self) -> str:
        return f"{self.check}: {self.reason}"


@dataclass(frozen=True)
class Move:
    """What the drain does with one VM of the node: ``action`` (to ``target``); ``why`` says
    why, and ``check`` names the pre-check a WAIT or BLOCKED move fails."""

    vm: str
    action: Action
    target: str = ""
    why: str = ""
    check: str = ""
    lasting: bool = False  # a WAIT that will not end by itself (suspended, in error)

    @property
    def blocks(self) -> bool:
        return self.action in (Action.WAIT, Action.BLOCKED)


@dataclass(frozen=True)
class Precheck:
    failures: list[Failure] = field(default_factory=list)
    plan: list[Move] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.failures


@dataclass(frozen=True)
class Storage:
    """What ABS says, for the storage checks: extent records, volumes (to name extents),
    the nodes whose storage server is live (None: unknown, every replica counts) and the
    copies in progress."""

    extents: Sequence[ExtentRecord] = ()
    volumes: Sequence[VolumeRecord] = ()
    servers: Collection[str] | None = None
    recovering: Sequence[RecoveryRecord] = ()


def precheck(
    view: ClusterView, node: str, storage: Storage, shutdown_unmigratable: bool = False
) -> Precheck:
    """Every failing pre-check of ``node`` entering maintenance, and the drain's plan."""
    moves = plan(view, node, shutdown_unmigratable)
    failures = [
        *_node_checks(view, node),
        *_storage_checks(node, storage),
        *(Failure(m.check, m.why) for m in moves if m.blocks),
    ]
    return Precheck(failures=failures, plan=moves)


def check_exit(view: ClusterView, node: str) -> str:
    """Why ``node`` cannot exit maintenance now ("" if it can: it is in maintenance)."""
    state = _admin(view, node).maintenance
    if state is MaintenanceState.MAINTENANCE:
        return ""
    if state is MaintenanceState.ENTERING:
        return f"node {node} is still entering maintenance; wait for it to end"
    return f"node {node} is not in maintenance (it is {state.value})"


# ---- node checks -------------------------------------------------------------------------
def _admin(view: ClusterView, node: str) -> NodeAdmin:
    return view.admin.get(node, NodeAdmin())


def _node_checks(view: ClusterView, node: str) -> list[Failure]:
    out = []
    mine = _admin(view, node).maintenance
    if mine is not MaintenanceState.IN_USE:
        out.append(Failure("state", f"node {node} is already {mine.value}"))
    for other in sorted(view.nodes):
        state = _admin(view, other).maintenance
        if other != node and state is not MaintenanceState.IN_USE:
            out.append(
                Failure(
                    "one-at-a-time",
                    f"node {other} is {state.value}: one node of a cluster at a time",
                )
            )
    ready = [
        v.name
        for v in node_views(view)
        if v.name != node
        and v.state is NodeState.READY
        and v.maintenance is MaintenanceState.IN_USE
    ]
    if not ready:
        out.append(
            Failure(
                "last-ready-node",
                f"node {node} is the last ready node in use: no other node could run VMs",
            )
        )
    return out


# ---- storage checks ----------------------------------------------------------------------
def _storage_checks(node: str, storage: Storage) -> list[Failure]:
    out = []
    single = [x for x in storage.extents if _only_replica_on(x, node, storage.servers)]
    if single:
        owners = _volumes_of([x.id for x in single], storage.volumes)
        out.append(
            Failure(
                "single-replica",
                f"{len(single)} extents have their only valid replica on {node}"
                f"{_listed(' (volumes ', owners, ')')}: wait for recovery to copy them",
            )
        )
    if storage.recovering:
        vols = sorted({r.volume for r in storage.recovering})
        out.append(
            Failure(
                "recovery",
                f"ABS recovery is running: {len(storage.recovering)} copies in progress"
                f"{_listed(' (', vols, ')')}; wait for it to finish",
            )
        )
    return out


def _only_replica_on(ext: ExtentRecord, node: str, servers: Collection[str] | None) -> bool:
    if node not in ext.replicas:
        return False
    return not any(r != node and (servers is None or r in servers) for r in ext.replicas)


def _volumes_of(extent_ids: Iterable[str], volumes: Sequence[VolumeRecord]) -> list[str]:
    wanted = set(extent_ids)
    return sorted({v.name for v in volumes if wanted.intersection(x for x in v.extents if x)})


def _listed(before: str, names: Sequence[str], after: str) -> str:
    if not names:
        return ""
    shown = ", ".join(names[:NAMES_SHOWN])
    more = f" and {len(names) - NAMES_SHOWN} more" if len(names) > NAMES_SHOWN else ""
    return f"{before}{shown}{more}{after}"


# ---- VMs: the drain's plan ---------------------------------------------------------------
def plan(view: ClusterView, node: str, shutdown_unmigratable: bool) -> list[Move]:
    """What to do with each VM placed on ``node``, in the drain's order: running VMs first,
    largest memory first (the hardest to fit are placed while there is most room), then the
    stopped ones, likewise. Each placed VM is reserved on its target before the next."""
    others = [v for v in node_views(view) if v.name != node]
    entries = sorted(view.vms_on(node), key=lambda e: (-e.spec.memory_mib, e.spec.name))
    moves: list[Move] = []
    running, stopped = [], []
    for e in entries:
        state = view.vm_state(e.spec.name)
        why = _unsettled(e, state)
        if why:
            lasting = state in (VMState.PAUSED, VMState.ERROR) or e.spec.power is Power.PAUSED
            moves.append(Move(e.spec.name, Action.WAIT, why=why, check="vm-state", lasting=lasting))
        elif e.spec.power is Power.STOPPED:
            stopped.append(e)
        else:
            running.append(e)
    for e in running:
        move, others = _place_running(e, node, others, shutdown_unmigratable)
        moves.append(move)
    for e in stopped:
        move, others = _place_stopped(e, node, others)
        moves.append(move)
    return moves


def _unsettled(e: VMEntry, state: VMState) -> str:
    """Why VM ``e`` cannot be moved (nor powered off) as it is ("" if it can)."""
    name = e.spec.name
    if e.spec.deleting:
        return f"VM {name} is being deleted: wait for it to go"
    if e.job is not None:
        return f"VM {name} has a {e.job.describe()} in progress: wait for it to end"
    if state is VMState.PAUSED or e.spec.power is Power.PAUSED:
        return f"VM {name} is suspended: resume it or power it off first"
    if state is VMState.UNKNOWN:
        return f"VM {name} is in state unknown: its node does not answer"
    if state is VMState.RUNNING and e.spec.power is Power.RUNNING:
        return ""
    if state is VMState.STOPPED and e.spec.power is Power.STOPPED:
        return ""
    if state is VMState.ERROR:
        return f"VM {name} is in state error: start it again or power it off first"
    return f"VM {name} is {state.value}: wait for it to settle"


def _place_running(
    e: VMEntry, node: str, others: list[NodeView], shutdown: bool
) -> tuple[Move, list[NodeView]]:
    name, spec = e.spec.name, e.spec
    if spec.node == node:
        why = f"VM {name} is pinned to {node}: it cannot run elsewhere"
        if shutdown:
            return Move(name, Action.POWER_OFF, why=why), others
        return Move(name, Action.BLOCKED, why=why, check="migratable"), others
    try:
        target = choose_node(spec.model_copy(update={"node": None}), others)
    except NoCapacity as exc:
        why = (
            f"no other node has room for VM {name} ({spec.vcpus} vCPUs, {spec.memory_mib} MiB): "
            + "; ".join(exc.fields.get("reasons", []))
        )
        if shutdown:
            return Move(name, Action.POWER_OFF, why=why), others
        return Move(name, Action.BLOCKED, why=why, check="capacity"), others
    return Move(name, Action.LIVE, target.name), _reserved(others, target, e)


def _place_stopped(e: VMEntry, node: str, others: list[NodeView]) -> tuple[Move, list[NodeView]]:
    name, spec = e.spec.name, e.spec
    if spec.node == node:
        return Move(
            name, Action.STAY, why=f"VM {name} is pinned to {node}: it stays, stopped"
        ), others
    try:
        target = choose_node(spec, others)
    except NoCapacity:
        why = f"no other node has room for VM {name}: it stays, stopped"
        return Move(name, Action.STAY, why=why), others
    return Move(name, Action.COLD, target.name), _reserved(others, target, e)


def _reserved(others: list[NodeView], target: NodeView, e: VMEntry) -> list[NodeView]:
    return [reserve(v, e.spec) if v.name == target.name else v for v in others]
