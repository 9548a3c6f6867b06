"""In-memory test double of the hypervisor contract (like Nova's ``virt/fake.py``).

``FakeHypervisor`` keeps instances in a dict and emits the same events, in the same order, as the
QEMU driver. Tests drive the "outside world" with ``crash(name)`` (QEMU died) and
``guest_poweroff(name)`` (the guest powered itself off). Failure injection uses named subclasses
(``FailingLaunchHypervisor``, ``GatedStartHypervisor``), never ad-hoc mocks.
"""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

from aecp.common.errors import InvalidState, LaunchError
from aecp.compute.hypervisor import (
    EventKind,
    Hypervisor,
    InstanceEvent,
    InstanceInfo,
    InstanceSpec,
    MigrationParams,
    MigrationStatus,
    RunState,
)

_PIDS = itertools.count(40000)
#: migration listeners of every fake in the process: ``listen`` URI -> (hypervisor, instance)
_LISTENERS: dict[str, tuple[FakeHypervisor, str]] = {}
#: ``migration()`` calls a fake migration stays ``active`` before it pauses at pre-switchover
ACTIVE_POLLS = 2


@dataclass
class FakeInstance:
    """One simulated QEMU process."""

    spec: InstanceSpec
    pid: int
    state: RunState
    boots: int = 1
    listen: str = ""  # an incoming migration's URI
    migration: str = "none"  # QEMU's migration status
    polls: int = 0
    peer: tuple[FakeHypervisor, str] | None = None  # a migration's destination


class FakeHypervisor(Hypervisor):
    """Honours the ``Hypervisor`` contract without processes.

    ``guest_cooperates`` decides whether an ACPI power-button press makes the guest power off
    (``shutdown``/``reboot`` then return True) or is ignored (they return False after the
    timeout, which is not actually waited for). ``persistent`` is the "still running" world
    shared with a new object over the same ``run_dir``, to simulate an agent restart.
    """

    def __init__(
        self,
        run_dir: Path = Path("/nonexistent/aecp-fake"),
        *,
        guest_cooperates: bool = True,
        persistent: dict[str, FakeInstance] | None = None,
    ) -> None:
        self.run_dir = run_dir
        self.guest_cooperates = guest_cooperates
        self.world: dict[str, FakeInstance] = {} if persistent is None else persistent
        self.files: set[str] = set()  # instances whose runtime directory (logs) exists
        self._tracked: dict[str, FakeInstance] = {}
        self._events: asyncio.Queue[InstanceEvent] = asyncio.Queue()
        self.calls: list[tuple[str, str]] = []  # (method, name), for assertions
        self.active_polls = ACTIVE_POLLS  # a migration stays active this many polls

    # --- the contract -------------------------------------------------------------------------

    async def start(self, spec: InstanceSpec) -> InstanceInfo:
        self.calls.append(("start", spec.name))
        if spec.name in self.world:
            raise InvalidState(f"{spec.name} is already running", name=spec.name)
        self._launch(spec)
        inst = FakeInstance(spec, next(_PIDS), RunState.RUNNING)
        self.world[spec.name] = self._tracked[spec.name] = inst
        self.files.add(spec.name)
        self._emit(spec.name, EventKind.STARTED)
        return self._info(inst)

    def _launch(self, spec: InstanceSpec) -> None:
        """Hook for failure-injecting subclasses; the fake launch always works."""

    async def attach_all(self) -> list[InstanceInfo]:
        self._tracked.update(self.world)
        return self.instances()

    def instances(self) -> list[InstanceInfo]:
        return [self._info(i) for i in self._tracked.values()]

    async def state(self, name: str) -> RunState:
        inst = self._tracked.get(name)
        return RunState.STOPPED if inst is None else inst.state

    async def shutdown(self, name: str, timeout: float) -> bool:
        self.calls.append(("shutdown", name))
        inst = self._require(name)
        clean = self.guest_cooperates and inst.state is RunState.RUNNING
        if clean:
            self.guest_poweroff(name, requested=True)
        elif name in self._tracked:
            self._gone(name)
        return clean

    async def poweroff(self, name: str) -> None:
        self.calls.append(("poweroff", name))
        if name in self._tracked:
            self._gone(name)

    async def reboot(self, name: str, timeout: float) -> bool:
        self.calls.append(("reboot", name))
        inst = self._require(name)
        clean = self.guest_cooperates and inst.state is RunState.RUNNING
        inst.boots += 1
        inst.state = RunState.RUNNING
        self._emit(name, EventKind.RESET)
        return clean

    async def pause(self, name: str) -> None:
        self.calls.append(("pause", name))
        inst = self._require(name, RunState.RUNNING)
        inst.state = RunState.PAUSED
        self._emit(name, EventKind.PAUSED)

    async def resume(self, name: str) -> None:
        self.calls.append(("resume", name))
        inst = self._require(name, RunState.PAUSED)
        inst.state = RunState.RUNNING
        self._emit(name, EventKind.RESUMED)

    # --- live migration: a fake migrates to another fake of this process ----------------------

    async def start_incoming(self, spec: InstanceSpec, listen: str) -> InstanceInfo:
        self.calls.append(("start_incoming", spec.name))
        if spec.name in self.world:
            raise InvalidState(f"{spec.name} is already running", name=spec.name)
        self._launch(spec)
        inst = FakeInstance(spec, next(_PIDS), RunState.PAUSED, listen=listen)
        self.world[spec.name] = self._tracked[spec.name] = inst
        self.files.add(spec.name)
        _LISTENERS[listen] = (self, spec.name)
        self._emit(spec.name, EventKind.STARTED)
        return self._info(inst)

    async def migrate(self, name: str, uri: str, params: MigrationParams) -> None:
        self.calls.append(("migrate", name))
        inst = self._require(name, RunState.RUNNING)
        inst.peer = _LISTENERS.get(uri)
        inst.migration = "active" if inst.peer is not None else "failed"
        inst.polls = 0

    async def migration(self, name: str) -> MigrationStatus:
        inst = self._require(name)
        if inst.migration in ("active", "pre-switchover") and not self._peer_alive(inst):
            self._end_migration(inst, "failed")
        elif inst.migration == "active":
            inst.polls += 1
            if inst.polls >= self.active_polls:
                inst.migration = "pre-switchover"
                inst.state = RunState.PAUSED
                self._emit(name, EventKind.PAUSED)
        total = inst.spec.memory_mib << 20
        sent = total if inst.migration in ("pre-switchover", "completed") else total // 2
        done = inst.migration == "completed"
        return MigrationStatus(
            status=inst.migration,
            ram_total=total,
            ram_transferred=sent,
            ram_remaining=total - sent,
            passes=inst.polls,
            downtime_ms=5 if done else None,
            total_time_ms=50 if done else None,
        )

    async def migrate_continue(self, name: str) -> None:
        self.calls.append(("migrate_continue", name))
        inst = self._require(name)
        if inst.migration != "pre-switchover":
            raise InvalidState(f"{name}: no migration waits at pre-switchover")
        if not self._peer_alive(inst):
            self._end_migration(inst, "failed")
            return
        assert inst.peer is not None
        hv, dest = inst.peer
        inst.migration = "completed"
        incoming = hv._tracked[dest]
        incoming.state = RunState.RUNNING
        incoming.migration = "completed"
        _LISTENERS.pop(incoming.listen, None)
        hv._emit(dest, EventKind.RESUMED)

    async def migrate_cancel(self, name: str) -> None:
        self.calls.append(("migrate_cancel", name))
        inst = self._tracked.get(name)
        if inst is not None and inst.migration in ("active", "pre-switchover"):
            self._end_migration(inst, "cancelled")

    @staticmethod
    def _peer_alive(inst: FakeInstance) -> bool:
        return inst.peer is not None and inst.peer[1] in inst.peer[0]._tracked

    def _end_migration(self, inst: FakeInstance, status: str) -> None:
        """The migration failed or was cancelled: the guest runs on here."""
        inst.migration = status
        if inst.state is RunState.PAUSED:
            inst.state = RunState.RUNNING
            self._emit(inst.spec.name, EventKind.RESUMED)

    async def remove_files(self, name: str) -> None:
        self.calls.append(("remove_files", name))
        if name in self._tracked:
            raise InvalidState(f"{name} is running", name=name)
        self.files.discard(name)

    async def events(self) -> AsyncIterator[InstanceEvent]:
        while True:
            yield await self._events.get()

    async def close(self) -> None:
        self._tracked.clear()

    # --- the outside world --------------------------------------------------------------------

    def crash(self, name: str) -> None:
        """QEMU died (killed from outside): the instance is gone, STOPPED is emitted."""
        self._require(name)
        self._gone(name, reason="process-exited")

    def guest_poweroff(self, name: str, requested: bool = False) -> None:
        """The guest powered itself off (``requested``: in answer to ``shutdown``):
        GUEST_SHUTDOWN, then (QEMU quit) STOPPED."""
        self._require(name).state = RunState.SHUTDOWN
        self._emit(name, EventKind.GUEST_SHUTDOWN, requested=requested)
        self._gone(name)

    def pending_events(self) -> list[InstanceEvent]:
        """Every event not consumed yet (drains the queue), for synchronous assertions."""
        out: list[InstanceEvent] = []
        while not self._events.empty():
            out.append(self._events.get_nowait())
        return out

    # --- helpers ------------------------------------------------------------------------------

    def _require(self, name: str, *states: RunState) -> FakeInstance:
        inst = self._tracked.get(name)
        if inst is None:
            raise InvalidState(f"{name} is not running", name=name)
        if states and inst.state not in states:
            raise InvalidState(f"{name} is {inst.state}, not {'/'.join(states)}", name=name)
        return inst

    def _gone(self, name: str, reason: str = "quit") -> None:
        inst = self._tracked.pop(name, None)
        if inst is not None and inst.listen:
            _LISTENERS.pop(inst.listen, None)
        self.world.pop(name, None)
        self._emit(name, EventKind.STOPPED, reason=reason)

    def _emit(self, name: str, kind: EventKind, **detail: object) -> None:
        self._events.put_nowait(InstanceEvent(name, kind, dict(detail)))

    def _info(self, inst: FakeInstance) -> InstanceInfo:
        d = self.run_dir / inst.spec.name
        return InstanceInfo(
            name=inst.spec.name,
            pid=inst.pid,
            state=inst.state,
            console_log=d / "console.log",
            console_socket=d / "console.sock",
        )


class FailingLaunchHypervisor(FakeHypervisor):
    """Every ``start`` fails as QEMU would on a bad disk: ``LaunchError`` with exit code 1."""

    def _launch(self, spec: InstanceSpec) -> None:
        raise LaunchError(
            f"QEMU failed to launch {spec.name}",
            exit_code=1,
            argv=["qemu-system-x86_64", "-name", f"guest={spec.name}"],
            output=f"qemu-system-x86_64: Could not open '{_first_disk(spec)}'",
        )


class GatedStartHypervisor(FakeHypervisor):
    """``start`` sets ``entered`` and then waits for ``gate`` before launching: a test acts
    while a start is in flight (QEMU launching), then lets it finish."""

    def __init__(self, *args: object, **kw: object) -> None:
        super().__init__(*args, **kw)  # type: ignore[arg-type]
        self.entered = asyncio.Event()
        self.gate = asyncio.Event()

    async def start(self, spec: InstanceSpec) -> InstanceInfo:
        self.entered.set()
        await self.gate.wait()
        return await super().start(spec)


def _first_disk(spec: InstanceSpec) -> str:
    return spec.disks[0].path if spec.disks else ""
