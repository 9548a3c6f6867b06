"""Reconciles the VMs assigned to this node (desired state in the store) with the QEMU
instances it runs, and writes their status back.

``decide`` reads a snapshot and the hypervisor's instances and returns one ``Decision`` per VM:
a sentence and, when something must change, an action. ``run_pass`` starts the actions as
per-VM tasks (a slow ACPI shutdown of one VM never holds up another) and returns the sentences.
Actions never run while the node does not hold its lease.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from aecp.common.clock import SYSTEM_CLOCK, Clock
from aecp.common.tasks import spawn
from aecp.compute.hypervisor import Hypervisor, InstanceInfo, RunState
from aecp.model.vm import Power, VMState, VMStatus
from aecp.node.vmops import VMActions
from aecp.store.snapshot import Snapshot, VMEntry

log = logging.getLogger(__name__)

Action = Callable[[], Awaitable[None]]


@dataclass(frozen=True)
class Decision:
    vm: str
    sentence: str
    action: Action | None = None


class Reconciler:
    """Per-node VM control loop body."""

    def __init__(
        self, node: str, hv: Hypervisor, actions: VMActions, clock: Clock = SYSTEM_CLOCK
    ) -> None:
        self.node = node
        self.hv = hv
        self.actions = actions
        self.clock = clock
        self.inflight: dict[str, asyncio.Task[None]] = {}
        self.retry_at: dict[str, float] = {}
        self.guest_off: set[str] = set()
        self.held: set[str] = set()  # VMs paused for a snapshot: leave them alone

    def note_guest_poweroff(self, name: str) -> None:
        """The guest of ``name`` powered itself off: record that, do not restart it."""
        self.guest_off.add(name)

    def run_pass(self, snap: Snapshot, lease_held: bool) -> list[str]:
        """Decide and start the actions; returns one sentence per decision."""
        if not lease_held:
            return ["this node does not hold its lease: changing nothing"]
        decisions = self.decide(snap, {i.name: i for i in self.hv.instances()})
        for d in decisions:
            if d.action is not None:
                self.inflight[d.vm] = spawn(self._run(d), name=f"vm-action-{d.vm}")
        return [d.sentence for d in decisions]

    async def _run(self, d: Decision) -> None:
        try:
            await d.action()  # type: ignore[misc]
            self.retry_at.pop(d.vm, None)
        except Exception as exc:
            log.exception("vm %s: action failed: %s", d.vm, exc)
            self.retry_at[d.vm] = self.clock.monotonic() + 15
            await self.actions.record_failure(d.vm, str(exc))
        finally:
            self.inflight.pop(d.vm, None)

    def decide(self, snap: Snapshot, instances: dict[str, InstanceInfo]) -> list[Decision]:
        mine = {e.spec.name: e for e in snap.vms_on(self.node)}
        out = [self._decide_vm(e, instances.get(n)) for n, e in sorted(mine.items())]
        for name in sorted(set(instances) - set(mine)):
            if name not in self.inflight:
                out.append(self._orphan(name))
        return out

    def _orphan(self, name: str) -> Decision:
        return Decision(
            name,
            f"{name} runs here but is not assigned to this node: powering it off",
            lambda: self.actions.poweroff(name),
        )

    def _decide_vm(self, e: VMEntry, inst: InstanceInfo | None) -> Decision:
        name = e.spec.name
        if name in self.inflight:
            return Decision(name, f"{name} has an action in progress: waiting for it")
        if name in self.held:
            return Decision(name, f"{name} is paused for a snapshot: waiting for it")
        if self.clock.monotonic() < self.retry_at.get(name, 0):
            return Decision(name, f"{name} failed recently: retrying later")
        state = inst.state if inst else RunState.STOPPED
        if name in self.guest_off and not e.spec.deleting:
            return Decision(
                name,
                f"{name} powered itself off from inside: recording it as stopped",
                lambda: self._guest_off(name),
            )
        if e.spec.deleting:
            return Decision(
                name,
                f"{name} is being deleted: powering off and removing its disks",
                lambda: self.actions.delete(e),
            )
        if e.spec.power is Power.STOPPED:
            return self._want_stopped(e, state)
        if state in (RunState.STOPPED, RunState.CRASHED):
            verb = "restarting it" if state is RunState.CRASHED else "starting it"
            return Decision(
                name,
                f"{name} should run and is {state.value}: {verb}",
                lambda: self.actions.start(e),
            )
        if state is RunState.SHUTDOWN:
            return Decision(name, f"{name}'s guest has powered off: waiting for QEMU to exit")
        if e.spec.power is Power.PAUSED:
            if state is RunState.RUNNING:
                return Decision(
                    name,
                    f"{name} should be suspended and is running: pausing it",
                    lambda: self.actions.pause(e),
                )
            return self._in_sync(e, inst, VMState.PAUSED)
        if state is RunState.PAUSED:
            return Decision(
                name,
                f"{name} should run and is paused: resuming it",
                lambda: self.actions.resume(e),
            )
        done = e.status.reboot_seq if e.status else 0
        if e.spec.reboot_seq > done:
            return Decision(
                name, f"{name} has a reboot request: rebooting it", lambda: self.actions.reboot(e)
            )
        return self._in_sync(e, inst, VMState.RUNNING)

    async def _guest_off(self, name: str) -> None:
        log.info("vm %s: %s", name, await self.actions.guest_powered_off(name))
        self.guest_off.discard(name)

    def _want_stopped(self, e: VMEntry, state: RunState) -> Decision:
        name = e.spec.name
        if state in (RunState.RUNNING, RunState.PAUSED, RunState.SHUTDOWN, RunState.CRASHED):
            if e.spec.stop_mode == "hard" or state is not RunState.RUNNING:
                return Decision(
                    name,
                    f"{name} should be off and is {state.value}: powering it off",
                    lambda: self.actions.stop(e, hard=True),
                )
            return Decision(
                name,
                f"{name} should be off and is running: pressing its ACPI "
                f"power button (hard power-off after {e.spec.shutdown_timeout:.0f}s)",
                lambda: self.actions.stop(e, hard=False),
            )
        return self._in_sync(e, None, VMState.STOPPED)

    def _in_sync(self, e: VMEntry, inst: InstanceInfo | None, state: VMState) -> Decision:
        name = e.spec.name
        st = e.status
        pid = inst.pid if inst else None
        if st is None or st.state is not state or st.pid != pid or st.node != self.node:
            return Decision(
                name,
                f"{name} is {state.value} as desired: recording its status",
                lambda: self.actions.record(e, state, pid),
            )
        if e.spec.op_id and not self.actions.op_done(e.spec.op_id):
            return Decision(
                name,
                f"{name} is {state.value} as desired: finishing its operation",
                lambda: self.actions.finish_op(e),
            )
        return Decision(name, f"{name} is {state.value} as desired")


def status_changed(old: VMStatus | None, new: VMStatus) -> bool:
    if old is None:
        return True
    return old.model_copy(update={"updated_at": 0}) != new.model_copy(update={"updated_at": 0})
