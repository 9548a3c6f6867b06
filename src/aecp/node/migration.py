"""Live migration as the node agents carry it out (``docs/design/migration.md``).

Roles, one writer per key:

- the **destination** agent sees a ``migrate`` job naming it (``Reconciler``), starts the
  VM's QEMU waiting for the migration (``receive``) and says where in an ``Incoming`` record;
  its storage server defers the disks' opens until the hand-off (``storage.handoff``);
- the **source** agent runs the job (``run_source``): it waits for the ``Incoming``, has QEMU
  migrate there with ``pause-before-switchover``, and at ``pre-switchover`` (the guest stopped,
  its disks drained and flushed) hands the disks over: the destination's storage server
  attaches them under a new epoch, which fences the source's access point, and only then does
  QEMU switch over. The source then ends the job, moving the placement in the same
  transaction; its own QEMU, no longer placed here, is powered off.

Every end leaves the VM running in exactly one place: a failure or a cancel before the switch-
over leaves it on the source (its disks taken back if they were handed over), after it on the
destination. An agent that restarts mid-migration reads its ``MigrationMark`` and QEMU's
migration status and finishes or undoes accordingly (``_recover``).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
from collections.abc import Callable
from dataclasses import dataclass

from aecp.common.clock import SYSTEM_CLOCK, Clock
from aecp.common.errors import AecpError, Conflict
from aecp.common.failpoints import failpoint
from aecp.compute.hypervisor import Hypervisor, MigrationParams, MigrationStatus, RunState
from aecp.model.migration import Incoming, MigrationMark, Phase
from aecp.model.operation import Operation
from aecp.model.vm import Placement, VMSpec
from aecp.model.vmjob import VMJob
from aecp.node.vmdisks import DiskProvider
from aecp.node.vmjobs import end_job
from aecp.node.vmnics import ensure_taps, remove_taps
from aecp.node.vmops import VMActions, free_port
from aecp.storage.handoff import Handoff, HandoffDone
from aecp.storage.meta.model import AttachRecord
from aecp.store import keys
from aecp.store.base import Compare, Delete, Put, Store
from aecp.store.typed import read
from aecp.store.view import VMEntry

log = logging.getLogger(__name__)

POLL = 0.01  # s between query-migrate calls (the switch-over waits for the next one)
REPORT_EVERY = 0.5  # s between progress writes to the operation (and cancel checks)
INCOMING_WAIT = 120.0  # s for the destination to start its QEMU
HANDOFF_WAIT = 10.0  # s for storage servers to answer a hand-off
SWITCH_WAIT = 60.0  # s for QEMU to complete after migrate-continue


@dataclass(frozen=True)
class MigrationConfig:
    address: str  # where a VM migrating here is received (the storage network's)
    params: MigrationParams
    timeout: float  # s: a migration not completed by then is cancelled


class MigrationFailed(AecpError):
    code = "migration_failed"
    http_status = 409


class Migrator:
    """Both ends of live migrations on node ``node``."""

    def __init__(
        self,
        node: str,
        store: Store,
        hv: Hypervisor,
        actions: VMActions,
        disks: DiskProvider,
        config: MigrationConfig,
        clock: Clock = SYSTEM_CLOCK,
    ) -> None:
        self.node, self.store, self.hv, self.actions = node, store, hv, actions
        self.disks, self.config, self.clock = disks, config, clock

    # ---- destination ------------------------------------------------------------------------
    async def receive(self, e: VMEntry) -> None:
        """Start ``e``'s QEMU here waiting for the migration of its job, once per job (a
        failed start is recorded, never retried: the source then fails the migration)."""
        job = e.job
        assert job is not None
        name = e.spec.name
        got = await read(self.store, keys.vm_incoming(name), Incoming)
        if got is not None and got[0].op == job.op_id:
            return
        now = self.clock.wall()
        try:
            disks = await self.disks.reuse(e.spec)
            port = free_port(self.actions.address)
            listen = f"tcp:{self.config.address}:{free_port(self.config.address)}"
            await ensure_taps(e.spec, self.node)  # QEMU opens them as it starts
            info = await self.hv.start_incoming(
                self.actions.instance_spec(e.spec, disks, port), listen
            )
        except Exception as exc:  # recorded: the source fails the migration with the reason
            why = exc.message if isinstance(exc, AecpError) else f"{type(exc).__name__}: {exc}"
            log.warning("vm %s: cannot receive its migration (%s): %s", name, job.op_id, why)
            rec = Incoming(op=job.op_id, node=self.node, error=why, at=now)
            with contextlib.suppress(Exception):
                await remove_taps(e.spec, self.node)
        else:
            http_url = self.actions.http_url(e.spec, port)
            self.actions.expect_arrival(name, http_url=http_url)
            rec = Incoming(
                op=job.op_id, node=self.node, uri=listen, pid=info.pid, http_url=http_url, at=now
            )
            log.info("vm %s: waiting for its migration on %s (%s)", name, listen, job.op_id)
        await self.store.put(keys.vm_incoming(name), rec.dump())

    # ---- source -----------------------------------------------------------------------------
    async def run_source(self, e: VMEntry) -> None:
        """Carry out ``e``'s migrate job (see the module docstring); never raises for a
        failed migration (the job ends failed); raises only if the job could not be ended
        (the reconciler tries again)."""
        job = e.job
        assert job is not None
        got = await read(self.store, keys.vm_migration(e.spec.name), MigrationMark)
        if got is not None and got[0].op == job.op_id:
            await self._recover(e, job, got[0])
            return
        try:
            await self._migrate(e, job)
        except _Cancelled as exc:
            reason = exc.reason
            await self._end(e, job, lambda op: op.cancel(reason, self.clock.wall()))
        except MigrationFailed as exc:
            await self._fail(e, job, exc.message)
        except AecpError as exc:
            await self._fail(e, job, exc.message)

    async def _migrate(self, e: VMEntry, job: VMJob) -> None:
        name = e.spec.name
        state = await self.hv.state(name)
        if state is not RunState.RUNNING:
            raise MigrationFailed(f"VM {name} is {state.value} here: only a running VM can move")
        await self._progress(job, 2, f"waiting for {job.target} to start the VM's QEMU")
        incoming = await self._wait_incoming(e, job)
        await self._mark(job, Phase.TRANSFERRING)
        params = self.config.params
        if job.bandwidth_mib_s:
            params = dataclasses.replace(params, max_bandwidth=job.bandwidth_mib_s << 20)
        await self.hv.migrate(name, incoming.uri, params)
        log.info("vm %s: migrating to %s over %s (%s)", name, job.target, incoming.uri, job.op_id)
        await self._transfer(e, job)
        await self._switch_over(e, job)

    async def _wait_incoming(self, e: VMEntry, job: VMJob) -> Incoming:
        deadline = self.clock.monotonic() + INCOMING_WAIT
        while True:
            got = await read(self.store, keys.vm_incoming(e.spec.name), Incoming)
            if got is not None and got[0].op == job.op_id:
                if got[0].error:
                    raise MigrationFailed(f"{job.target} cannot receive it: {got[0].error}")
                return got[0]
            await self._check_cancel(job)
            if self.clock.monotonic() > deadline:
                raise MigrationFailed(f"{job.target} did not start the VM's QEMU in time")
            await self.clock.sleep(POLL)

    async def _transfer(self, e: VMEntry, job: VMJob) -> None:
        """Poll the migration until QEMU pauses at pre-switchover, reporting progress;
        a cancel, a failure or the timeout cancels it (the VM runs on here)."""
        name = e.spec.name
        deadline = self.clock.monotonic() + self.config.timeout
        reported = 0.0
        while True:
            st = await self.hv.migration(name)
            if st.status == "pre-switchover":
                return
            if st.status in ("failed", "cancelled", "none"):
                raise MigrationFailed(f"QEMU's migration {st.status}: {st.error or 'no reason'}")
            if self.clock.monotonic() - reported >= REPORT_EVERY:
                reported = self.clock.monotonic()
                await self._report(job, st)
                if await self._cancel_requested(job):
                    await self.hv.migrate_cancel(name)
                    raise _Cancelled(f"cancelled by request: VM {name} runs on {self.node}")
            if self.clock.monotonic() > deadline:
                await self.hv.migrate_cancel(name)
                raise MigrationFailed(
                    f"not done in {self.config.timeout:.0f} s (the guest dirties memory faster "
                    "than it is sent): cancelled, the VM runs on here"
                )
            await self.clock.sleep(POLL)

    async def _switch_over(self, e: VMEntry, job: VMJob) -> None:
        name = e.spec.name
        t0 = self.clock.monotonic()
        mark = MigrationMark(op=job.op_id, phase=Phase.HANDOFF, target=job.target, at=t0)
        error = await self._hand_off(
            e.spec, job, job.target, also=[Put(keys.vm_migration(name), mark.dump())]
        )  # the mark in the same transaction: a restart knows the disks may have moved
        t2 = self.clock.monotonic()
        if error:
            await self._take_back(e.spec, job)  # while the guest is still paused
            await self.hv.migrate_cancel(name)
            raise MigrationFailed(f"disk hand-off to {job.target} failed: {error}")
        await failpoint("migration-after-handoff")  # tests kill the agent here
        await self.hv.migrate_continue(name)
        st = await self._wait_switched(name)
        if st.status != "completed":
            raise MigrationFailed(f"QEMU's migration {st.status} at the switch-over: {st.error}")
        phases: Detail = {
            "handoff_ms": round((t2 - t0) * 1000, 1),
            "completion_ms": round((self.clock.monotonic() - t2) * 1000, 1),
        }
        log.info("vm %s: switch-over %s (%s)", name, phases, job.op_id)
        await self._mark(job, Phase.COMPLETED)
        await self._succeed(e, job, st, phases)

    async def _wait_switched(self, name: str) -> MigrationStatus:
        deadline = self.clock.monotonic() + SWITCH_WAIT
        while True:
            st = await self.hv.migration(name)
            # QEMU says completed a moment before it has summed up the times
            timed = st.status != "completed" or bool(st.total_time_ms)
            if (st.status in ("completed", "failed", "cancelled") and timed) or (
                self.clock.monotonic() > deadline
            ):
                return st
            await self.clock.sleep(POLL)

    # ---- the disk hand-off --------------------------------------------------------------------
    async def _hand_off(
        self,
        spec: VMSpec,
        job: VMJob,
        to: str,
        vols: list[str] | None = None,
        also: list[Put] | None = None,
    ) -> str:
        """Ask node ``to``'s storage server to attach ``vols`` (default: every disk of the VM)
        now; "" once every one answered it did, else why not."""
        vols = spec.volumes() if vols is None else vols
        now = self.clock.wall()
        async with self.store.watch(keys.ABS_HANDOFFS_DONE) as events:
            await self.store.txn(
                [],
                [
                    Put(
                        keys.abs_handoff(v),
                        Handoff(volume=v, to=to, vm=spec.name, op=job.op_id, at=now).dump(),
                    )
                    for v in vols
                ]
                + (also or []),
            )
            answers: dict[str, HandoffDone] = {}
            for v in vols:  # answered before the watch saw it
                got = await read(self.store, keys.abs_handoff_done(v), HandoffDone)
                if got is not None and _answers(got[0], job, to):
                    answers[v] = got[0]
            try:
                async with asyncio.timeout(HANDOFF_WAIT):
                    async for ev in events:
                        if len(answers) == len(vols):
                            break
                        if ev.value is None:
                            continue
                        done = HandoffDone.load(ev.value)
                        if done.volume in vols and _answers(done, job, to):
                            answers[done.volume] = done
                        if len(answers) == len(vols):
                            break
            except TimeoutError:
                missing = sorted(set(vols) - set(answers))
                return f"no answer from {to} for {', '.join(missing)} in {HANDOFF_WAIT:.0f} s"
        failed = [f"{d.volume}: {d.error}" for d in answers.values() if not d.ok]
        return "; ".join(failed)

    async def _settled(self, name: str) -> MigrationStatus | None:
        """QEMU's migration status once it is not between states (``device``: sending the
        last state after the switch-over; ``cancelling``); None if QEMU is gone."""
        deadline = self.clock.monotonic() + SWITCH_WAIT
        while True:
            if await self.hv.state(name) is RunState.STOPPED:
                return None
            st = await self.hv.migration(name)
            if st.status not in ("device", "cancelling") or self.clock.monotonic() > deadline:
                return st
            await self.clock.sleep(POLL)

    async def _take_back(self, spec: VMSpec, job: VMJob) -> None:
        """Attach the VM's disks here again where one is attached elsewhere or nowhere (a
        hand-off that went wholly or partly through, also one whose answer was lost), while
        this node's QEMU still has them open; raises if they could not all be."""
        if await self.hv.state(spec.name) is RunState.STOPPED:
            return  # no QEMU here holds them: its next start attaches them as usual
        handed = []
        for v in spec.volumes():
            got = await read(self.store, keys.abs_attach(v), AttachRecord)
            if got is None or got[0].node != self.node:
                handed.append(v)
        if not handed:
            return
        error = await self._hand_off(spec, job, self.node, handed)
        if error:
            raise Conflict(f"could not take the VM's disks back: {error}")
        log.info("vm %s: disks taken back after the failed migration (%s)", spec.name, job.op_id)

    # ---- recovery after an agent restart ----------------------------------------------------
    async def _recover(self, e: VMEntry, job: VMJob, mark: MigrationMark) -> None:
        name = e.spec.name
        state = await self.hv.state(name)
        st = await self.hv.migration(name) if state is not RunState.STOPPED else None
        log.info(
            "vm %s: agent restarted during its migration (%s): phase %s, QEMU %s",
            name,
            job.op_id,
            mark.phase.value,
            st.status if st else "gone",
        )
        if st is None and mark.phase is Phase.COMPLETED:
            await self._succeed(e, job, st)
            return
        await self._fail(e, job, "the source agent restarted during the migration")

    # ---- ends ---------------------------------------------------------------------------------
    async def _fail(self, e: VMEntry, job: VMJob, error: str) -> None:
        """End a migration that went wrong by what QEMU says of it, never by the error alone:
        completed (the error came after the switch-over) → it succeeded; still sending the
        last state → wait for its end; running or paused before the switch-over → disks taken
        back while the guest is paused, then cancelled. Then the disks are taken back if any
        is attached elsewhere, the guest resumed if left paused, and the job ends failed (the
        VM runs on here)."""
        name = e.spec.name
        st = await self._settled(name)
        if st is not None and st.status == "completed":
            log.info("vm %s: QEMU completed the migration (%s): finishing it", name, job.op_id)
            await self._succeed(e, job, st)
            return
        if st is not None and st.status in ("active", "setup", "pre-switchover"):
            if st.status == "pre-switchover":
                await self._take_back(e.spec, job)  # while the guest is still paused
            await self.hv.migrate_cancel(name)
            st = await self._settled(name)
            if st is not None and st.status == "completed":  # too late to cancel
                await self._succeed(e, job, st)
                return
        await self._take_back(e.spec, job)
        if await self.hv.state(name) is RunState.PAUSED:
            with contextlib.suppress(AecpError):
                await self.hv.resume(name)
        log.warning("vm %s: migration to %s failed: %s (%s)", name, job.target, error, job.op_id)
        why = f"live migration to {job.target} failed: {error}; VM {name} runs on {self.node}"
        await self._end(e, job, lambda op: op.fail(why, self.clock.wall()))

    async def _succeed(
        self, e: VMEntry, job: VMJob, st: MigrationStatus | None, extra: Detail | None = None
    ) -> None:
        """Move the placement (and a pin) to the destination and end the job, in one
        transaction; then power off what is left here."""
        name = e.spec.name
        down = f", downtime {st.downtime_ms} ms" if st and st.downtime_ms is not None else ""
        total = f"in {st.total_time_ms / 1000:.1f} s" if st and st.total_time_ms else ""
        message = f"{name} moved live from {self.node} to {job.target} {total}{down}".strip()
        detail: Detail = {**(_detail(st) if st is not None else {}), **(extra or {})}
        moved = Placement(node=job.target, at=self.clock.wall())
        puts: list[Put | Delete] = [Put(keys.vm_placement(name), moved.dump())]
        cmp = [Compare.unchanged(keys.vm_placement(name), e.placement_rev)]
        got = await read(self.store, keys.vm_spec(name), VMSpec)
        if got is not None and got[0].node is not None:
            pinned = got[0].model_copy(update={"node": job.target})
            puts.append(Put(keys.vm_spec(name), pinned.dump()))
            cmp.append(Compare.unchanged(keys.vm_spec(name), got[1]))
        ok = await self._end(
            e,
            job,
            lambda op: op.advance(100, message, self.clock.wall(), detail).succeed(
                message, self.clock.wall()
            ),
            cmp=cmp,
            puts=puts,
        )
        if not ok:
            raise Conflict(f"VM {name} changed while its migration ended; trying again")
        log.info("vm %s: %s (%s)", name, message, job.op_id)
        with contextlib.suppress(AecpError):
            await self.actions.poweroff(name)  # and its taps here

    async def _end(
        self,
        e: VMEntry,
        job: VMJob,
        end: _OpEnd,
        cmp: list[Compare] | None = None,
        puts: list[Put | Delete] | None = None,
    ) -> bool:
        """Delete the job and its records and end its operation with ``end``, in one
        transaction (retried while only the operation moved)."""
        name = e.spec.name
        cleanup: list[Put | Delete] = [
            Delete(keys.vm_migration(name)),
            Delete(keys.vm_incoming(name)),
            *(Delete(keys.abs_handoff(v)) for v in e.spec.volumes()),
            *(Delete(keys.abs_handoff_done(v)) for v in e.spec.volumes()),
        ]
        return await end_job(self.store, e, job, end, cmp or [], [*cleanup, *(puts or [])])

    # ---- records and progress -----------------------------------------------------------------
    async def _mark(self, job: VMJob, phase: Phase) -> None:
        mark = MigrationMark(op=job.op_id, phase=phase, target=job.target, at=self.clock.wall())
        await self.store.put(keys.vm_migration(job.vm), mark.dump())

    async def _progress(
        self, job: VMJob, progress: int, message: str, detail: Detail | None = None
    ) -> None:
        for _ in range(5):
            got = await read(self.store, keys.op(job.op_id), Operation)
            if got is None or got[0].state.done:
                return
            op, rev = got
            new = op.advance(progress, message, self.clock.wall(), detail)
            if await self.store.replace(keys.op(job.op_id), new.dump(), mod_revision=rev):
                return

    async def _report(self, job: VMJob, st: MigrationStatus) -> None:
        sent = st.ram_transferred
        share = min(1.0, sent / st.ram_total) if st.ram_total else 0.0
        message = (
            f"{st.status}: {sent >> 20} of {st.ram_total >> 20} MiB of RAM sent, pass "
            f"{st.passes}, expected downtime {st.expected_downtime_ms} ms"
        )
        await self._progress(job, 5 + int(85 * share), message, _detail(st))

    async def _cancel_requested(self, job: VMJob) -> bool:
        got = await read(self.store, keys.op(job.op_id), Operation)
        return got is not None and got[0].cancel_requested

    async def _check_cancel(self, job: VMJob) -> None:
        if await self._cancel_requested(job):
            raise _Cancelled(f"cancelled by request: VM {job.vm} runs on {self.node}")


class _Cancelled(Exception):
    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


_OpEnd = Callable[[Operation], Operation]
Detail = dict[str, float | int | str]


def _answers(done: HandoffDone, job: VMJob, to: str) -> bool:
    return done.op == job.op_id and done.node == to


def _detail(st: MigrationStatus) -> dict[str, float | int | str]:
    detail: dict[str, float | int | str] = {
        "status": st.status,
        "ram_total_bytes": st.ram_total,
        "ram_sent_bytes": st.ram_transferred,
        "ram_remaining_bytes": st.ram_remaining,
        "passes": st.passes,
        "dirty_pages_per_s": st.dirty_rate,
        "expected_downtime_ms": st.expected_downtime_ms,
    }
    if st.downtime_ms is not None:
        detail["downtime_ms"] = st.downtime_ms
    if st.total_time_ms is not None:
        detail["total_time_ms"] = st.total_time_ms
    return detail
