"""The drain controller (role ``drain``, ``store.controllers``): carries out maintenance mode
after the API's request (``docs/design/maintenance.md``).

The API writes ``in_use → entering_maintenance`` (after the pre-checks) and ``maintenance →
exiting_maintenance``; this controller writes every other transition of a node's admin key
(``model.node.NodeAdmin``), always by compare-and-swap on the revision it read, and ends the
request's ``node.maintenance`` operation. Each pass looks at every node and takes at most one
step for it (level-triggered: a restart, or another node taking the role, carries on from what
is stored):

- ``entering_maintenance``: the VM being moved or powered off (``drain_vm``/``drain_op``) is
  waited for: its operation's end is recorded (``evacuated``, ``cold_moved``,
  ``powered_off``). Otherwise the next move of ``maintenance.plan`` is asked for: running VMs
  one at a time, largest memory first, each with its own ``vm.migrate`` operation
  (``cluster.migrations.request_migration``); stopped VMs cold-moved (placement only); with
  ``shutdown_unmigratable``, a VM that cannot move is powered off through the normal VM path
  (``VMService.power``). The node operation's progress names the VM ("migrating web1 to n2
  (2 of 3)"). When only VMs that stay (stopped, pinned or with no room elsewhere) are left:
  ``maintenance``, operation succeeded.
- **A failure ends the entering** (what an operator of the product expects: the request fails
  with the reason and the node is back in use): a migration or power-off that fails or is
  cancelled, a VM that became unmovable (suspended, in error, or no longer fitting elsewhere).
  The node goes back to ``in_use`` with ``maintenance_error`` and the operation failed naming
  the VM and the VMs already moved (they stay where they are). A VM that is only busy for now
  (starting, a job of its own, its node briefly unreachable) is waited for.
- ``exiting_maintenance``: back to ``in_use`` at once (new VMs may go to it again); with
  ``restore_vms``, the VMs of ``evacuated`` are then moved back one at a time (``restoring``),
  each that still exists and runs elsewhere; the operation ends when the last is done, failed
  if any could not be moved back (named, with why).
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from typing import Protocol

from aecp.cluster.maintenance import Action, Move, plan
from aecp.cluster.migrations import request_migration
from aecp.common.clock import SYSTEM_CLOCK, Clock
from aecp.common.errors import AecpError, Conflict, InvalidState, NoCapacity, Unavailable
from aecp.model.node import MaintenanceState, NodeAdmin
from aecp.model.operation import Operation, OpState
from aecp.model.vm import Power, PowerOp, VMState
from aecp.store import keys
from aecp.store.base import Compare, Put, Store
from aecp.store.controllers import Decision
from aecp.store.typed import read, update_op
from aecp.store.view import ClusterView, VMEntry, read_cluster

log = logging.getLogger(__name__)


class MigrateFn(Protocol):
    """``cluster.migrations.request_migration``'s contract."""

    async def __call__(
        self,
        store: Store,
        entry: VMEntry,
        view: ClusterView,
        target: str | None,
        clock: Clock,
        *,
        reason: str = "",
    ) -> Operation: ...


PowerFn = Callable[[str, PowerOp], Awaitable[Operation]]
"""``VMService.power``: a power operation on a VM, through the normal VM path."""

_VERB = {"vm.migrate": "migrating", "vm.poweroff": "powering off"}


class Drain:
    """The ``drain`` controller; see the module docstring."""

    role = "drain"

    def __init__(
        self,
        store: Store,
        power: PowerFn,
        clock: Clock = SYSTEM_CLOCK,
        migrate: MigrateFn = request_migration,
    ) -> None:
        self.store, self.power, self.clock, self.migrate = store, power, clock, migrate

    async def run_pass(self, new_term: bool = False) -> list[Decision]:
        snap = await read_cluster(self.store)
        decisions = []
        for name in sorted(snap.admin):
            if name not in snap.nodes:
                continue
            admin = snap.admin[name]
            if admin.maintenance is MaintenanceState.ENTERING:
                sentence = await self._entering(snap, name, admin)
            elif admin.maintenance is MaintenanceState.EXITING:
                sentence = await self._exiting(snap, name, admin)
            elif admin.restoring or (admin.in_use and admin.drain_op):
                sentence = await self._restoring(snap, name, admin)
            else:
                continue
            decisions.append(Decision(sentence, "node", name))
        return decisions

    # ---- entering ------------------------------------------------------------------------
    async def _entering(self, snap: ClusterView, name: str, admin: NodeAdmin) -> str:
        if admin.drain_op:
            return await self._follow(snap, name, admin)
        moves = plan(snap, name, admin.shutdown_unmigratable)
        stuck = [m for m in moves if m.action is Action.BLOCKED or m.lasting]
        if stuck:
            return await self._fail(snap, name, admin, stuck[0].why)
        todo = [m for m in moves if m.action in (Action.LIVE, Action.COLD, Action.POWER_OFF)]
        waiting = [m for m in moves if m.action is Action.WAIT]
        if todo:
            return await self._start(snap, name, admin, todo[0], len(todo) + len(waiting))
        if waiting:
            message = f"waiting: {waiting[0].why}"
            await update_op(self.store, admin.maintenance_op, message=message, clock=self.clock)
            return message
        return await self._entered(snap, name, admin, [m for m in moves if m.action is Action.STAY])

    async def _start(
        self, snap: ClusterView, name: str, admin: NodeAdmin, move: Move, left: int
    ) -> str:
        """Ask for ``move`` and record it (``left``: the VMs still to handle, this one too)."""
        entry = snap.vms[move.vm]
        done = len(admin.evacuated) + len(admin.cold_moved) + len(admin.powered_off)
        count = f"({done + 1} of {done + left})"
        try:
            op = await self._request(entry, snap, name, move)
        except AecpError as exc:
            if _passing(exc, move):
                return f"{move.action.value} of VM {move.vm} not asked now, will try again: {exc}"
            return await self._fail(snap, name, admin, f"VM {move.vm}: {exc}")
        progress = 5 + 90 * done // (done + left)
        if move.action is Action.COLD or op.state is OpState.SUCCEEDED:
            moved = admin.model_copy(update={"cold_moved": [*admin.cold_moved, move.vm]})
            await self._swap(snap, name, moved)
            message = f"moved stopped VM {move.vm} to {move.target} {count}"
            await self._advance(admin, progress, message)
            return message
        tracking = admin.model_copy(update={"drain_vm": move.vm, "drain_op": op.id})
        await self._swap(snap, name, tracking)
        verb = "powering off" if move.action is Action.POWER_OFF else "migrating"
        to = f" to {move.target}" if move.target else f" ({move.why})"
        message = f"{verb} {move.vm}{to} {count}"
        await self._advance(admin, progress, message)
        return f"{message} as {op.id}"

    async def _request(self, entry: VMEntry, snap: ClusterView, name: str, move: Move) -> Operation:
        if move.action is Action.POWER_OFF:
            return await self.power(move.vm, PowerOp.POWEROFF)
        reason = f"node {name} entering maintenance"
        return await self.migrate(self.store, entry, snap, move.target, self.clock, reason=reason)

    async def _follow(self, snap: ClusterView, name: str, admin: NodeAdmin) -> str:
        """The VM being moved or powered off: still going, done (recorded) or failed."""
        vm, op = admin.drain_vm, await self._op(admin.drain_op)
        verb = _VERB.get(op.kind, op.kind) if op else "moving"
        if op is not None and not op.state.done:
            await self._advance(admin, None, f"{verb} {vm}: {op.message}")
            return f"waiting for {op.kind} of VM {vm} ({op.id}): {op.message}"
        if op is None or op.state is not OpState.SUCCEEDED:
            why = op.error if op else "its operation is gone"
            state = op.state.value if op else "lost"
            return await self._fail(snap, name, admin, f"{verb} {vm} {state}: {why}")
        field = "powered_off" if op.kind == "vm.poweroff" else "evacuated"
        update = {field: [*getattr(admin, field), vm], "drain_vm": "", "drain_op": ""}
        await self._swap(snap, name, admin.model_copy(update=update))
        return f"{op.kind} of VM {vm} succeeded"

    async def _entered(
        self, snap: ClusterView, name: str, admin: NodeAdmin, stay: list[Move]
    ) -> str:
        parts = [
            f"moved live: {', '.join(admin.evacuated)}" if admin.evacuated else "",
            f"moved stopped: {', '.join(admin.cold_moved)}" if admin.cold_moved else "",
            f"powered off: {', '.join(admin.powered_off)}" if admin.powered_off else "",
            f"stay, stopped: {', '.join(m.vm for m in stay)}" if stay else "",
        ]
        detail = "; ".join(p for p in parts if p) or "no VMs to move"
        message = f"{name} is in maintenance ({detail})"
        new = admin.model_copy(
            update={"maintenance": MaintenanceState.MAINTENANCE, "updated_at": self.clock.wall()}
        )
        await self._end(snap, name, new, admin.maintenance_op, message, failed=False)
        return message

    async def _fail(self, snap: ClusterView, name: str, admin: NodeAdmin, why: str) -> str:
        """Entering failed: the node back in use, the operation failed naming why."""
        moved = [*admin.evacuated, *admin.cold_moved]
        stay = f" (moved before, staying where they are: {', '.join(moved)})" if moved else ""
        message = f"entering maintenance failed: {why}; {name} is back in use{stay}"
        new = admin.model_copy(
            update={
                "maintenance": MaintenanceState.IN_USE,
                "maintenance_since": 0.0,
                "maintenance_error": why,
                "drain_vm": "",
                "drain_op": "",
                "updated_at": self.clock.wall(),
            }
        )
        await self._end(snap, name, new, admin.maintenance_op, message, failed=True)
        return message

    # ---- exiting -------------------------------------------------------------------------
    async def _exiting(self, snap: ClusterView, name: str, admin: NodeAdmin) -> str:
        """Back in use at once; the VMs to move back, if asked, become ``restoring``."""
        back = [v for v in admin.evacuated if v in snap.vms] if admin.restore_vms else []
        new = admin.model_copy(
            update={
                "maintenance": MaintenanceState.IN_USE,
                "maintenance_since": 0.0,
                "maintenance_error": "",
                "restoring": back,
                "evacuated": [],
                "cold_moved": [],
                "powered_off": [],
                "updated_at": self.clock.wall(),
            }
        )
        if back:
            await self._swap(snap, name, new)
            message = f"{name} is back in use; moving {len(back)} VMs back: {', '.join(back)}"
            await self._advance(admin, 5, message)
            return message
        message = f"{name} is back in use"
        await self._end(snap, name, new, admin.maintenance_op, message, failed=False)
        return message

    async def _restoring(self, snap: ClusterView, name: str, admin: NodeAdmin) -> str:
        """One step of moving the evacuated VMs back (``restoring``), one at a time; a VM that
        cannot go back is noted in ``maintenance_error`` and the next one is taken; one that no
        longer exists, does not run or is there already is skipped."""
        if admin.drain_op:
            op = await self._op(admin.drain_op)
            if op is not None and not op.state.done:
                await self._advance(admin, None, f"moving {admin.drain_vm} back: {op.message}")
                return f"waiting for VM {admin.drain_vm} to move back ({op.id})"
            failed = "" if op and op.state is OpState.SUCCEEDED else (op.error if op else "lost")
            return await self._restored(snap, name, admin, admin.drain_vm, failed)
        if not admin.restoring:  # a drain_op left by an interrupted step
            return await self._restored(snap, name, admin, "", "")
        vm = admin.restoring[0]
        entry = snap.vms.get(vm)
        skip = _skip_reason(entry, snap, name)
        if skip or entry is None:
            return await self._restored(snap, name, admin, vm, "", skipped=skip)
        reason = f"back to {name} after its maintenance"
        try:
            op = await self.migrate(self.store, entry, snap, name, self.clock, reason=reason)
        except AecpError as exc:
            if type(exc) is Conflict:
                return f"moving VM {vm} back not asked now, will try again: {exc}"
            return await self._restored(snap, name, admin, vm, str(exc))
        await self._swap(snap, name, admin.model_copy(update={"drain_vm": vm, "drain_op": op.id}))
        total = len(admin.restoring)
        await self._advance(admin, None, f"moving {vm} back ({total} left)")
        return f"moving VM {vm} back as {op.id}"

    async def _restored(
        self,
        snap: ClusterView,
        name: str,
        admin: NodeAdmin,
        vm: str,
        failed: str,
        skipped: str = "",
    ) -> str:
        """``vm`` is done with (``failed``: why it could not be moved back; ``skipped``: why
        it was not to be, no failure); the operation ends after the last one."""
        left = [v for v in admin.restoring if v != vm]
        errors = admin.maintenance_error
        if failed:
            errors = f"{errors}; {vm}: {failed}" if errors else f"{vm}: {failed}"
        new = admin.model_copy(
            update={"restoring": left, "drain_vm": "", "drain_op": "", "maintenance_error": errors}
        )
        if left:
            await self._swap(snap, name, new)
            if failed or skipped:
                return f"VM {vm} not moved back: {failed or skipped}"
            return f"VM {vm} moved back"
        new = new.model_copy(update={"maintenance_error": ""})
        if errors:
            message = f"{name} is back in use; not moved back: {errors}"
        else:
            message = f"{name} is back in use; its VMs moved back"
        await self._end(snap, name, new, admin.maintenance_op, message, failed=bool(errors))
        return message

    # ---- store ---------------------------------------------------------------------------
    async def _op(self, op_id: str) -> Operation | None:
        got = await read(self.store, keys.op(op_id), Operation)
        return got[0] if got else None

    async def _advance(self, admin: NodeAdmin, progress: int | None, message: str) -> None:
        await update_op(
            self.store, admin.maintenance_op, progress=progress, message=message, clock=self.clock
        )

    async def _swap(self, snap: ClusterView, name: str, admin: NodeAdmin) -> bool:
        """Write ``admin`` if the node's admin key is still as read (else the next pass
        looks again)."""
        new = admin.model_copy(update={"updated_at": self.clock.wall()})
        return await self.store.txn(
            [snap.admin_unchanged(name)], [Put(keys.node_admin(name), new.dump())]
        )

    async def _end(
        self,
        snap: ClusterView,
        name: str,
        admin: NodeAdmin,
        op_id: str,
        message: str,
        failed: bool,
    ) -> bool:
        """Write ``admin`` and end operation ``op_id`` in one transaction."""
        cmp: list[Compare] = [snap.admin_unchanged(name)]
        puts = [Put(keys.node_admin(name), admin.dump())]
        got = await read(self.store, keys.op(op_id), Operation) if op_id else None
        if got is not None and not got[0].state.done:
            op, rev = got
            now = self.clock.wall()
            ended = op.fail(message, now) if failed else op.succeed(message, now)
            cmp.append(Compare.unchanged(keys.op(op_id), rev))
            puts.append(Put(keys.op(op_id), ended.dump()))
        ok = await self.store.txn(cmp, puts)
        if ok:
            log.info("node %s: %s", name, message)
        return ok


def _passing(exc: AecpError, move: Move) -> bool:
    """Whether a refused request may pass on a later pass: the VM or a node changed
    meanwhile (a plain ``Conflict``), a node is briefly not ready or full; or a cold move's
    refusal (a just-stopped VM's disk not detached yet), the plan re-deciding next pass."""
    if type(exc) is Conflict or isinstance(exc, NoCapacity | Unavailable):
        return True
    return move.action is Action.COLD and isinstance(exc, InvalidState)


def _skip_reason(entry: VMEntry | None, snap: ClusterView, node: str) -> str:
    """Why a VM of ``restoring`` is not to be moved back ("" if it is): only one that still
    exists, runs, and elsewhere, is."""
    if entry is None:
        return "it no longer exists"
    if entry.node == node:
        return f"it is on {node} already"
    state = snap.vm_state(entry.spec.name)
    if state is not VMState.RUNNING or entry.spec.power is not Power.RUNNING:
        return f"it is {state.value}, not running"
    return ""
