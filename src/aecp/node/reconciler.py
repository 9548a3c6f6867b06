"""Reconciles the VMs assigned to this node (desired state in the store) with the QEMU
instances it runs, and writes their status back.

``decide`` reads a snapshot and the hypervisor's instances and returns one ``Decision`` per VM:
a sentence and, when something must change, an action. ``run_pass`` starts the actions as
per-VM tasks (a slow ACPI shutdown of one VM never holds up another) and returns the decisions.
Actions never run while the node does not hold its lease.

A failed action leaves the VM in state ``error`` with the reason (``VMActions.record_failure``)
and is retried after a back-off that doubles from ``RETRY_FIRST`` up to ``RETRY_MAX`` seconds
(``next_retry`` says when the earliest is due, so the agent wakes for it); a new request on the
VM (its spec changed), or a different action decided for it, is acted on at once. The request's
operation keeps running while the action is retried ("retrying: <reason> (attempt N, next in
S s)"), so a retry that succeeds ends it as succeeded. After ``RETRY_ATTEMPTS`` failed attempts
of the same action on the same spec the agent gives up: the operation fails, the status says so
(``gave_up``), and the VM is left alone until a new request, also after an agent restart. A VM
whose operation has already ended (a crashed QEMU that cannot be restarted) is retried at the
back-off's bound for as long as it fails: there is nobody to give an answer to. A failure is
logged when its reason changes, not at every retry.
"""

from __future__ import annotations

import asyncio
import dataclasses
import enum
import logging
import math
from collections.abc import Awaitable, Callable
from typing import Protocol

from aecp.common.clock import SYSTEM_CLOCK, Clock
from aecp.common.errors import AecpError
from aecp.common.tasks import spawn
from aecp.compute.hypervisor import EventKind, Hypervisor, InstanceEvent, InstanceInfo, RunState
from aecp.model.vm import Power, VMState, VMStatus
from aecp.model.vmjob import JobKind, VMJob
from aecp.node.vmops import VMActions
from aecp.store.view import ClusterView, VMEntry

log = logging.getLogger(__name__)

Action = Callable[[], Awaitable[None]]


class JobRunner(Protocol):
    async def run(self, e: VMEntry) -> None:
        """Carry out ``e``'s job (``node.vmjobs``); never raises."""


class Receiver(Protocol):
    async def receive(self, e: VMEntry) -> None:
        """Start ``e``'s QEMU here for its migration job (``node.migration``)."""


RETRY_FIRST = 1.0  # s before the first retry of a failed action
RETRY_MAX = 60.0  # s: the back-off stops growing here
RETRY_ATTEMPTS = 10  # failed attempts of a request's action before its operation fails (~4 min)


class Say(enum.Enum):
    """How the agent logs a decision's sentence."""

    ALWAYS = "always"
    ON_CHANGE = "on-change"  # a steady state: only when the VM's last logged sentence differs
    DEBUG = "debug"  # a retry of a failed action (its failure is logged when it changes)


@dataclasses.dataclass(frozen=True)
class Decision:
    vm: str
    sentence: str
    action: Action | None = None
    op_id: str = ""  # the operation the action carries out
    spec_rev: int = 0  # the spec it was decided on
    say: Say = Say.ALWAYS
    kind: str = ""  # what the action does ("start", "stop", ...): a retry repeats the same kind


@dataclasses.dataclass(frozen=True)
class Failure:
    """The last failed action of a VM (``kind``): retried at ``retry_at`` (never, once the agent
    gave up) unless its spec changed or another action is decided."""

    error: str
    spec_rev: int
    kind: str
    attempts: int
    retry_at: float
    gave_up: bool = False


class Reconciler:
    """Per-node VM control loop body."""

    def __init__(
        self,
        node: str,
        hv: Hypervisor,
        actions: VMActions,
        clock: Clock = SYSTEM_CLOCK,
        jobs: JobRunner | None = None,
        receiver: Receiver | None = None,
    ) -> None:
        self.node = node
        self.hv = hv
        self.actions = actions
        self.clock = clock
        self.jobs = jobs  # None: this reconciler carries out no jobs (a test of the rest)
        self.receiver = receiver  # None: no VM migrates to this node
        self.inflight: dict[str, asyncio.Task[None]] = {}
        self.failures: dict[str, Failure] = {}
        self.guest_off: set[str] = set()

    def note_guest_poweroff(self, name: str) -> None:
        """The guest of ``name`` powered itself off: record that, do not restart it."""
        self.guest_off.add(name)

    def note_event(self, ev: InstanceEvent) -> None:
        """A hypervisor event. A guest power-off is the guest's own decision (to record as
        the desired state) unless it answered our ACPI press: that one is a shutdown already
        asked for, and must not override a request made since (a start, say)."""
        if ev.kind is EventKind.GUEST_SHUTDOWN and not ev.detail.get("requested"):
            self.note_guest_poweroff(ev.name)

    def run_pass(self, snap: ClusterView, lease_held: bool) -> list[Decision]:
        """Decide and start the actions; returns one decision (a sentence) per VM."""
        if not lease_held:
            return [Decision("", "this node does not hold its lease: changing nothing")]
        decisions = self.decide(snap, {i.name: i for i in self.hv.instances()})
        for d in decisions:
            if d.action is not None:
                self.inflight[d.vm] = spawn(self._run(d), name=f"vm-action-{d.vm}")
        return decisions

    async def _run(self, d: Decision) -> None:
        assert d.action is not None
        try:
            await d.action()
            last = self.failures.get(d.vm)
            if last is not None and (d.kind != "job" or last.kind == "job"):
                del self.failures[d.vm]  # a job's run says nothing of the VM's other actions
        except Exception as exc:
            await self._failed(d, exc)
        finally:
            self.inflight.pop(d.vm, None)

    async def _failed(self, d: Decision, exc: Exception) -> None:
        """Back off (or give up), log the failure if its reason changed, and record it."""
        error = str(exc) if isinstance(exc, AecpError) else f"{type(exc).__name__}: {exc}"
        last = self.failures.get(d.vm)
        same = last is not None and (last.spec_rev, last.kind) == (d.spec_rev, d.kind)
        attempts = last.attempts + 1 if last is not None and same else 1
        delay = min(RETRY_FIRST * 2 ** (attempts - 1), RETRY_MAX)
        failure = Failure(error, d.spec_rev, d.kind, attempts, self.clock.monotonic() + delay)
        self.failures[d.vm] = failure
        if d.kind == "job":  # the VM itself is fine: its job's operation says why
            log.warning("vm %s: %s (next try in %.0f s)", d.vm, error, delay)
            return
        if last is None or last.error != error:
            log.error(
                "vm %s: action failed: %s (retrying after a back-off of %.0f s, growing to %.0f s)",
                d.vm,
                error,
                delay,
                RETRY_MAX,
                exc_info=not isinstance(exc, AecpError),  # a bug: its traceback, once
            )
        else:
            log.debug("vm %s: action failed again (attempt %d): %s", d.vm, attempts, error)
        try:
            gave_up = await self.actions.record_failure(
                d.vm, d.op_id, error, attempts, delay, give_up=attempts >= RETRY_ATTEMPTS
            )
        except AecpError as rec_exc:
            log.warning("vm %s: could not record the failure: %s", d.vm, rec_exc)
            return
        if gave_up:
            self.failures[d.vm] = dataclasses.replace(failure, gave_up=True, retry_at=math.inf)
            log.error(
                "vm %s: gave up after %d attempts (operation %s failed): %s",
                d.vm,
                attempts,
                d.op_id,
                error,
            )

    def next_retry(self) -> float | None:
        """When (``clock.monotonic``) the earliest back-off ends; None if no retry is due."""
        return min((f.retry_at for f in self.failures.values() if not f.gave_up), default=None)

    def wait_before_pass(self, resync: float) -> float:
        """Seconds until the next pass is due without a change to wake it: ``resync``, or
        less when a back-off ends before that."""
        due = self.next_retry()
        return resync if due is None else min(resync, max(0.0, due - self.clock.monotonic()))

    def decide(self, snap: ClusterView, instances: dict[str, InstanceInfo]) -> list[Decision]:
        mine = {e.spec.name: e for e in snap.vms_on(self.node)}
        for gone in set(self.failures) - set(mine) - set(instances):
            del self.failures[gone]  # deleted, or moved away: nothing left to retry here
        out = [self._decide_vm(e, instances.get(n)) for n, e in sorted(mine.items())]
        incoming = {n: e for n, e in snap.vms.items() if self._migrating_here(e)}
        out += [self._incoming(e, instances.get(n)) for n, e in sorted(incoming.items())]
        for name in sorted(set(instances) - set(mine) - set(incoming)):
            if name not in self.inflight:
                orphan = self._orphan(name)
                out.append(self._backing_off(name, 0, orphan.kind) or orphan)
        return out

    def _migrating_here(self, e: VMEntry) -> bool:
        job = e.job
        return (
            job is not None
            and job.kind is JobKind.MIGRATE
            and job.target == self.node
            and e.node != self.node
            and not e.spec.deleting
        )

    def _incoming(self, e: VMEntry, inst: InstanceInfo | None) -> Decision:
        """A VM migrating here (its placement is still its source's): its QEMU is started
        waiting for the migration, and left alone while the job lasts (when the job ends
        without moving the VM here, it is an orphan and powered off)."""
        name = e.spec.name
        assert e.job is not None
        what = f"{e.job.describe()} ({e.job.op_id})"
        if name in self.inflight:
            return Decision(name, f"{name} is being received here: waiting", say=Say.ON_CHANGE)
        if inst is not None:
            sentence = f"{name} is migrating here, {what}: its QEMU waits for it"
            return Decision(name, sentence, say=Say.ON_CHANGE)
        if self.receiver is None:
            sentence = f"{name} is to migrate here, {what}, and this agent receives none"
            return Decision(name, sentence, say=Say.ON_CHANGE)
        receiver = self.receiver
        return Decision(
            name,
            f"{name} is to migrate here, {what}: starting its QEMU to receive it",
            lambda: receiver.receive(e),
            say=Say.DEBUG,
            kind="receive",
        )

    def _backing_off(self, name: str, spec_rev: int, kind: str) -> Decision | None:
        """A decision to wait if ``name``'s last action of ``kind`` failed on this same spec
        and its back-off has not passed (or the agent gave up on it); a changed spec (a new
        request) or a different action forgets the failure."""
        failure = self.failures.get(name)
        if failure is None:
            return None
        if (failure.spec_rev, failure.kind) != (spec_rev, kind):
            del self.failures[name]
            return None
        why = failure.error.splitlines()[0][:200] if failure.error else "?"
        if failure.gave_up:
            return self._given_up(name, why)
        if self.clock.monotonic() < failure.retry_at:
            return Decision(name, f"{name} failed ({why}): retrying later", say=Say.ON_CHANGE)
        return None

    @staticmethod
    def _given_up(name: str, why: str) -> Decision:
        return Decision(
            name,
            f"{name} failed ({why}) and its request failed: leaving it until a new request",
            say=Say.ON_CHANGE,
        )

    def _orphan(self, name: str) -> Decision:
        return Decision(
            name,
            f"{name} runs here but is not assigned to this node: powering it off",
            lambda: self.actions.poweroff_orphan(name),
            kind="orphan",
        )

    def _decide_vm(self, e: VMEntry, inst: InstanceInfo | None) -> Decision:
        """The decision for one VM of this node, with its action bound to this spec's
        operation (a retry of a failed action is logged at debug level only)."""
        name = e.spec.name
        if name in self.inflight:
            return Decision(
                name, f"{name} has an action in progress: waiting for it", say=Say.ON_CHANGE
            )
        if e.job is not None and not e.spec.deleting:
            return self._has_job(e, e.job)
        st = e.status
        if st is not None and st.gave_up and e.spec.op_id and st.failed_op == e.spec.op_id:
            return self._given_up(name, st.message.splitlines()[0][:200] if st.message else "?")
        d = self._decide_change(e, inst)
        if d.action is not None:
            waiting = self._backing_off(name, e.spec_rev, d.kind)
            if waiting is not None:
                return waiting
        retry = name in self.failures and d.action is not None
        return dataclasses.replace(
            d,
            op_id=e.spec.op_id,
            spec_rev=e.spec_rev,
            say=Say.DEBUG if retry else d.say,
        )

    def _has_job(self, e: VMEntry, job: VMJob) -> Decision:
        """A job comes before any other change (the VM is left alone while it runs); a
        request made meanwhile (a start after a rollback) is carried out after it."""
        name = e.spec.name
        what = f"{job.describe()} ({job.op_id})"
        if self.jobs is None:
            sentence = f"{name} has a job, {what}, and this agent runs none"
            return Decision(name, sentence, say=Say.ON_CHANGE)
        failure = self.failures.get(name)
        retry = failure is not None and (failure.spec_rev, failure.kind) == (e.job_rev, "job")
        if retry and failure is not None and self.clock.monotonic() < failure.retry_at:
            return Decision(name, f"{name}'s job, {what}, is tried again later", say=Say.ON_CHANGE)
        jobs = self.jobs
        return Decision(
            name,
            f"{name} has a job, {what}: carrying it out",
            lambda: jobs.run(e),
            spec_rev=e.job_rev,
            say=Say.DEBUG if failure is not None and failure.kind == "job" else Say.ALWAYS,
            kind="job",
        )

    def _decide_change(self, e: VMEntry, inst: InstanceInfo | None) -> Decision:
        """The first situation that applies to the VM, in order (one method each)."""
        state = inst.state if inst else RunState.STOPPED
        for situation in (
            self._powered_off_from_inside,
            self._being_deleted,
            self._should_be_off,
            self._should_run_and_is_down,
            self._guest_is_shutting_down,
            self._should_be_suspended,
            self._should_run_and_is_paused,
            self._reboot_requested,
        ):
            d = situation(e, state, inst)
            if d is not None:
                return d
        return self._in_sync(e, inst, VMState.RUNNING)

    def _powered_off_from_inside(
        self, e: VMEntry, state: RunState, inst: InstanceInfo | None
    ) -> Decision | None:
        name = e.spec.name
        if name not in self.guest_off or e.spec.deleting:
            return None
        return Decision(
            name,
            f"{name} powered itself off from inside: recording it as stopped",
            lambda: self._guest_off(name),
            kind="guest-off",
        )

    def _being_deleted(
        self, e: VMEntry, state: RunState, inst: InstanceInfo | None
    ) -> Decision | None:
        if not e.spec.deleting:
            return None
        return Decision(
            e.spec.name,
            f"{e.spec.name} is being deleted: powering off and removing its disks",
            lambda: self.actions.delete(e),
            kind="delete",
        )

    def _should_be_off(
        self, e: VMEntry, state: RunState, inst: InstanceInfo | None
    ) -> Decision | None:
        return self._want_stopped(e, state) if e.spec.power is Power.STOPPED else None

    def _should_run_and_is_down(
        self, e: VMEntry, state: RunState, inst: InstanceInfo | None
    ) -> Decision | None:
        if state not in (RunState.STOPPED, RunState.CRASHED):
            return None
        verb = "restarting it" if state is RunState.CRASHED else "starting it"
        return Decision(
            e.spec.name,
            f"{e.spec.name} should run and is {state.value}: {verb}",
            lambda: self.actions.start(e),
            kind="start",
        )

    def _guest_is_shutting_down(
        self, e: VMEntry, state: RunState, inst: InstanceInfo | None
    ) -> Decision | None:
        if state is not RunState.SHUTDOWN:
            return None
        return Decision(
            e.spec.name,
            f"{e.spec.name}'s guest has powered off: waiting for QEMU to exit",
            say=Say.ON_CHANGE,
        )

    def _should_be_suspended(
        self, e: VMEntry, state: RunState, inst: InstanceInfo | None
    ) -> Decision | None:
        if e.spec.power is not Power.PAUSED:
            return None
        if state is not RunState.RUNNING:
            return self._in_sync(e, inst, VMState.PAUSED)
        return Decision(
            e.spec.name,
            f"{e.spec.name} should be suspended and is running: pausing it",
            lambda: self.actions.pause(e),
            kind="pause",
        )

    def _should_run_and_is_paused(
        self, e: VMEntry, state: RunState, inst: InstanceInfo | None
    ) -> Decision | None:
        if state is not RunState.PAUSED:
            return None
        return Decision(
            e.spec.name,
            f"{e.spec.name} should run and is paused: resuming it",
            lambda: self.actions.resume(e),
            kind="resume",
        )

    def _reboot_requested(
        self, e: VMEntry, state: RunState, inst: InstanceInfo | None
    ) -> Decision | None:
        done = e.status.reboot_seq if e.status else 0
        if e.spec.reboot_seq <= done:
            return None
        return Decision(
            e.spec.name,
            f"{e.spec.name} has a reboot request: rebooting it",
            lambda: self.actions.reboot(e),
            kind="reboot",
        )

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
                    kind="stop",
                )
            return Decision(
                name,
                f"{name} should be off and is running: pressing its ACPI "
                f"power button (hard power-off after {e.spec.shutdown_timeout:.0f}s)",
                lambda: self.actions.stop(e, hard=False),
                kind="stop",
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
                kind="record",
            )
        if e.spec.op_id and not self.actions.op_done(e.spec.op_id):
            return Decision(
                name,
                f"{name} is {state.value} as desired: finishing its operation",
                lambda: self.actions.finish_op(e),
                kind="record",
            )
        return Decision(name, f"{name} is {state.value} as desired", say=Say.ON_CHANGE)


def status_changed(old: VMStatus | None, new: VMStatus) -> bool:
    if old is None:
        return True
    return old.model_copy(update={"updated_at": 0}) != new.model_copy(update={"updated_at": 0})
