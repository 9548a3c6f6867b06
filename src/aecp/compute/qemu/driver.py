"""``QemuHypervisor``: the QEMU process lifecycle behind the ``Hypervisor`` contract.

One QEMU process per instance, in its own session so that it outlives the agent.
Pre-launch makes ``run_dir/<name>/`` and removes stale sockets and pidfile; launch is
``os.posix_spawnp`` of the argv list with stdout+stderr appended to ``qemu.log`` (not ``Popen``: a
Popen let go of while running warns ResourceWarning, and an asyncio subprocess transport kills its
child on close); post-launch connects QMP (retrying until it answers or the process dies), reads
the status and starts a monitor task. A launch failure kills the process, removes the runtime
files except the logs, and raises ``LaunchError`` (exit code, argv, this launch's ``qemu.log``).

QEMU runs with ``-no-shutdown``: a guest power-off leaves it alive in status ``shutdown``; the QMP
event handler then quits it (GUEST_SHUTDOWN, then STOPPED) unless a ``reboot`` is in progress,
which resets and continues the same process. Before ``shutdown`` or ``reboot`` presses the ACPI
power button the driver writes ``acpi-pressed`` in the instance's directory (removed with the
other runtime files once the process is gone): a driver that re-attaches while the guest is
still acting on the press reports the power-off as requested, not as the guest's own decision.
Whatever ends the process, the monitor reaps it if it is our child, removes the runtime files
and emits STOPPED once. The event loop never blocks: exits are found by ``waitpid(WNOHANG)``
and pid polling.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import shutil
import signal
from collections.abc import AsyncIterator, Coroutine
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from aecp.common.errors import HypervisorError, InvalidInput, InvalidState, LaunchError
from aecp.common.proc import kill, pid_alive, pid_cmdline, read_pidfile
from aecp.common.tasks import cancel, spawn
from aecp.compute.hypervisor import (
    Accel,
    EventKind,
    Hypervisor,
    InstanceEvent,
    InstanceInfo,
    InstanceSpec,
    MigrationParams,
    MigrationStatus,
    RunState,
)
from aecp.compute.qemu.argv import RuntimePaths, build_argv, name_option
from aecp.compute.qemu.qmp import QmpConnection, QmpDisconnected
from aecp.conf.settings import MAX_SOCKET_PATH

log = logging.getLogger(__name__)

QMP_CONNECT_TIMEOUT = 15.0  # s from spawn until QMP must answer
QUIT_TIMEOUT = 5.0  # s for QEMU to exit after ``quit`` (then SIGKILL), and after SIGKILL
POLL_INTERVAL = 0.1  # s between liveness checks of a QEMU process
PRESS_EVERY = 5.0  # s between ACPI power-button presses while waiting for a guest to power off

# the destination tells the source whether it loaded the state: "completed" then means the
# guest can run there (without it, a destination failing to load still reads as completed)
_RETURN_PATH = [{"capability": "return-path", "state": True}]

_STATUS: dict[str, RunState] = {
    "running": RunState.RUNNING,
    "shutdown": RunState.SHUTDOWN,
    "guest-panicked": RunState.CRASHED,
    "internal-error": RunState.CRASHED,
    "io-error": RunState.CRASHED,
}  # every other QMP status (paused, prelaunch, postmigrate, ...) means PAUSED


@dataclass(eq=False)
class _Instance:
    """What the driver knows about one QEMU process."""

    name: str
    pid: int
    paths: RuntimePaths
    qmp: QmpConnection = field(init=False)  # set right after: its callbacks need the instance
    state: RunState = RunState.RUNNING
    exited: bool = False
    exit_code: int | None = None  # known only if we reaped it (our child)
    rebooting: bool = False
    stopping: bool = False  # shutdown() pressed the power button: a power-off is ours
    powered_off: asyncio.Event = field(default_factory=asyncio.Event)  # guest SHUTDOWN seen
    gone: asyncio.Event = field(default_factory=asyncio.Event)  # exited and cleaned up
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)  # serialises stopping
    monitor: asyncio.Task[None] | None = None


class QemuHypervisor(Hypervisor):
    """Runs instances as QEMU processes under ``run_dir`` (see the module docstring).

    ``accel``, when given, is what this host can do (see ``probe_accel``) and overrides
    ``InstanceSpec.accel`` for every launch.
    """

    def __init__(
        self,
        run_dir: Path,
        *,
        qemu_binary: str = "qemu-system-x86_64",
        accel: Accel | None = None,
    ) -> None:
        self.run_dir = run_dir
        self._qemu_binary = qemu_binary
        self._accel = accel
        self._instances: dict[str, _Instance] = {}
        self._events: asyncio.Queue[InstanceEvent] = asyncio.Queue()
        self._actions: set[asyncio.Task[Any]] = set()

    # --- launch ---------------------------------------------------------------------------------

    async def start(self, spec: InstanceSpec) -> InstanceInfo:
        return await self._launch(spec, incoming=None)

    async def start_incoming(self, spec: InstanceSpec, listen: str) -> InstanceInfo:
        return await self._launch(spec, incoming=listen)

    async def _launch(self, spec: InstanceSpec, incoming: str | None) -> InstanceInfo:
        paths = RuntimePaths.for_instance(self.run_dir, spec.name)
        if spec.name in self._instances or _live_qemu_pid(paths, spec.name) is not None:
            raise InvalidState(f"{spec.name} is already running", name=spec.name)
        if self._accel is not None:
            spec = replace(spec, accel=self._accel)
        argv = build_argv(spec, paths, self._qemu_binary)
        if incoming is not None:
            argv += ["-incoming", "defer"]
        _prelaunch(paths, argv)
        log_offset = paths.qemu_log.stat().st_size if paths.qemu_log.exists() else 0
        pid = _spawn(argv, paths)
        inst = self._new_instance(spec.name, pid, paths)
        try:
            await self._postlaunch(inst)
            if incoming is not None:
                await inst.qmp.execute("migrate-set-capabilities", {"capabilities": _RETURN_PATH})
                await inst.qmp.execute("migrate-incoming", {"uri": incoming})
        except BaseException as exc:
            await self._abort_launch(inst)
            if not isinstance(exc, HypervisorError):
                raise
            output = _read_from(paths.qemu_log, log_offset)
            log.warning("%s: QEMU failed to launch (exit code %s)", spec.name, inst.exit_code)
            msg = f"QEMU failed to launch {spec.name}: {exc.message}"
            raise LaunchError(msg, exit_code=inst.exit_code, argv=argv, output=output) from exc
        self._instances[spec.name] = inst
        log.info("%s: QEMU started, pid %d, %s", spec.name, pid, inst.state)
        self._emit(inst, EventKind.STARTED, pid=pid)
        return self._info(inst)

    def _new_instance(self, name: str, pid: int, paths: RuntimePaths) -> _Instance:
        inst = _Instance(name, pid, paths)
        inst.qmp = QmpConnection(name, on_event=lambda ev, d: self._on_qmp_event(inst, ev, d))
        return inst

    async def _postlaunch(self, inst: _Instance) -> None:
        """Connect QMP, read the status, start watching the process."""
        await inst.qmp.connect(
            inst.paths.qmp_socket, QMP_CONNECT_TIMEOUT, alive=lambda: _alive(inst)
        )
        inst.state = await self._query(inst)
        inst.monitor = spawn(self._monitor(inst), f"qemu-monitor-{inst.name}")

    async def _abort_launch(self, inst: _Instance) -> None:
        await inst.qmp.disconnect()
        if _alive(inst):
            kill(inst.pid, signal.SIGKILL)
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(QUIT_TIMEOUT):
                    while _alive(inst):  # noqa: ASYNC110 - polling a pid
                        await asyncio.sleep(POLL_INTERVAL / 2)
        _cleanup(inst.paths)

    async def attach_all(self) -> list[InstanceInfo]:
        for pidfile in sorted(self.run_dir.glob("*/qemu.pid")):
            name = pidfile.parent.name
            if name not in self._instances:
                await self._attach(name)
        return self.instances()

    async def _attach(self, name: str) -> None:
        paths = RuntimePaths.for_instance(self.run_dir, name)
        older = RuntimePaths.before_sockets_moved(self.run_dir, name)
        if not paths.qmp_socket.exists() and older.qmp_socket.exists():
            paths = older  # started by an agent from before the sockets moved
        pid = _live_qemu_pid(paths, name)
        if pid is None:
            log.info("%s: no live QEMU behind %s: removing its runtime files", name, paths.pidfile)
            _cleanup(paths)
            return
        inst = self._new_instance(name, pid, paths)
        inst.stopping = paths.acpi_pressed.exists()  # an agent before us pressed the button
        try:
            await self._postlaunch(inst)
        except HypervisorError as exc:
            await inst.qmp.disconnect()
            log.warning("%s: QEMU pid %d is alive but cannot be attached: %s", name, pid, exc)
            return
        self._instances[name] = inst
        log.info("%s: re-attached to QEMU pid %d, %s", name, pid, inst.state)
        if inst.state is RunState.SHUTDOWN:  # the guest powered off while nobody was attached
            self._guest_powered_off(inst, {"guest": True, "reason": "while-detached"})

    # --- observe --------------------------------------------------------------------------------

    def instances(self) -> list[InstanceInfo]:
        return [self._info(inst) for inst in self._instances.values()]

    async def state(self, name: str) -> RunState:
        inst = self._instances.get(name)
        if inst is None:
            return RunState.STOPPED
        try:
            return await self._query(inst)
        except QmpDisconnected:
            return inst.state if _alive(inst) else RunState.STOPPED

    async def events(self) -> AsyncIterator[InstanceEvent]:
        while True:
            yield await self._events.get()

    async def _query(self, inst: _Instance) -> RunState:
        status = await inst.qmp.execute("query-status")
        return _STATUS.get(str(status["status"]), RunState.PAUSED)

    # --- power ----------------------------------------------------------------------------------

    async def _press_until_off(self, inst: _Instance, timeout: float) -> bool:
        """Press the ACPI power button, again every ``PRESS_EVERY`` s (a guest still booting
        misses an early press), until the guest powers off or ``timeout`` passes.
        True if the guest powered off."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        if inst.state is not RunState.SHUTDOWN:
            inst.powered_off.clear()
        while True:
            if inst.state is not RunState.SHUTDOWN and not inst.powered_off.is_set():
                with contextlib.suppress(QmpDisconnected):
                    await inst.qmp.execute("system_powerdown")
            left = deadline - loop.time()
            if left <= 0:
                return inst.powered_off.is_set()
            if await _wait_first(min(PRESS_EVERY, left), inst.powered_off, inst.gone):
                return inst.powered_off.is_set()

    async def shutdown(self, name: str, timeout: float) -> bool:
        inst = self._require(name)
        inst.stopping = True
        _mark_pressed(inst.paths)
        clean = await self._press_until_off(inst, timeout)
        if not clean:
            log.warning("%s: no power-off within %.0f s: powering off hard", name, timeout)
        await self._stop(inst)
        return clean

    async def poweroff(self, name: str) -> None:
        inst = self._instances.get(name)
        if inst is not None:
            await self._stop(inst)

    async def reboot(self, name: str, timeout: float) -> bool:
        inst = self._require(name)
        inst.rebooting = True
        _mark_pressed(inst.paths)
        try:
            clean = await self._press_until_off(inst, timeout)
            self._require(name)
            await inst.qmp.execute("system_reset")
            if await self._query(inst) is not RunState.RUNNING:
                await inst.qmp.execute("cont")
            inst.state = RunState.RUNNING
        finally:
            inst.rebooting = False
            inst.paths.acpi_pressed.unlink(missing_ok=True)
        log.info("%s: rebooted (%s)", name, "clean" if clean else "hard reset after timeout")
        return clean

    async def pause(self, name: str) -> None:
        inst = self._require(name, RunState.RUNNING)
        await inst.qmp.execute("stop")
        self._set_state(inst, RunState.PAUSED, EventKind.PAUSED)

    async def resume(self, name: str) -> None:
        inst = self._require(name, RunState.PAUSED)
        await inst.qmp.execute("cont")
        self._set_state(inst, RunState.RUNNING, EventKind.RESUMED)

    # --- live migration -------------------------------------------------------------------------

    async def migrate(self, name: str, uri: str, params: MigrationParams) -> None:
        inst = self._require(name, RunState.RUNNING)
        caps = [
            {"capability": "pause-before-switchover", "state": True},
            {"capability": "events", "state": True},
            *_RETURN_PATH,
        ]
        await inst.qmp.execute("migrate-set-capabilities", {"capabilities": caps})
        await inst.qmp.execute(
            "migrate-set-parameters",
            {"max-bandwidth": params.max_bandwidth, "downtime-limit": params.downtime_limit_ms},
        )
        await inst.qmp.execute("migrate", {"uri": uri})
        log.info("%s: migrating to %s", name, uri)

    async def migration(self, name: str) -> MigrationStatus:
        inst = self._require(name)
        return _migration_status(await inst.qmp.execute("query-migrate"))

    async def migrate_continue(self, name: str) -> None:
        inst = self._require(name)
        await inst.qmp.execute("migrate-continue", {"state": "pre-switchover"})

    async def migrate_cancel(self, name: str) -> None:
        inst = self._instances.get(name)
        if inst is None or inst.gone.is_set():
            return
        with contextlib.suppress(QmpDisconnected):
            await inst.qmp.execute("migrate_cancel")

    async def remove_files(self, name: str) -> None:
        paths = RuntimePaths.for_instance(self.run_dir, name)
        if paths.run_dir.parent != self.run_dir or not name or name.startswith("."):
            raise InvalidInput("name", f"{name!r} is not an instance name")
        if name in self._instances or _live_qemu_pid(paths, name) is not None:
            raise InvalidState(f"{name} is running: its files stay", name=name)
        _cleanup(paths)
        try:
            await asyncio.to_thread(_remove_tree, paths.run_dir)
        except OSError as exc:
            raise HypervisorError(f"{name}: cannot remove {paths.run_dir}: {exc}") from exc
        log.info("%s: runtime directory and logs removed", name)

    async def close(self) -> None:
        await cancel(*self._actions)
        for inst in list(self._instances.values()):
            await cancel(inst.monitor)
            await inst.qmp.disconnect()
        self._instances.clear()

    async def _stop(self, inst: _Instance) -> None:
        """``quit``, wait, SIGKILL if needed, wait for the monitor's cleanup. Idempotent."""
        async with inst.lock:
            if inst.gone.is_set():
                return
            with contextlib.suppress(QmpDisconnected):
                await inst.qmp.execute("quit")
            if await _wait_first(QUIT_TIMEOUT, inst.gone):
                return
            log.warning("%s: QEMU pid %d ignored quit: SIGKILL", inst.name, inst.pid)
            kill(inst.pid, signal.SIGKILL)
            if not await _wait_first(QUIT_TIMEOUT, inst.gone):
                raise HypervisorError(f"{inst.name}: QEMU pid {inst.pid} survived SIGKILL")

    # --- process and QMP events -----------------------------------------------------------------

    async def _monitor(self, inst: _Instance) -> None:
        """Poll until the process is gone, then clean up and emit STOPPED (exactly once)."""
        while _alive(inst):  # noqa: ASYNC110 - polling a pid; nothing to wait on instead
            await asyncio.sleep(POLL_INTERVAL)
        inst.state = RunState.STOPPED
        await inst.qmp.disconnect()
        _cleanup(inst.paths)
        if self._instances.get(inst.name) is inst:
            del self._instances[inst.name]
        inst.gone.set()
        log.info("%s: QEMU pid %d exited (code %s)", inst.name, inst.pid, inst.exit_code)
        self._emit(inst, EventKind.STOPPED, exit_code=inst.exit_code)

    def _on_qmp_event(self, inst: _Instance, event: str, data: dict[str, Any]) -> None:
        """Turn one QMP event into state and contract events (runs in the QMP pump task)."""
        if event == "SHUTDOWN" and data.get("guest"):
            self._guest_powered_off(inst, data)
        elif event == "STOP" and inst.state is RunState.RUNNING and not inst.rebooting:
            self._set_state(inst, RunState.PAUSED, EventKind.PAUSED)
        elif event == "RESUME" and not inst.rebooting:
            self._set_state(inst, RunState.RUNNING, EventKind.RESUMED)
        elif event == "RESET":
            self._emit(inst, EventKind.RESET, **data)
        elif event == "GUEST_PANICKED":
            self._set_state(inst, RunState.CRASHED, EventKind.CRASHED, **data)

    def _guest_powered_off(self, inst: _Instance, data: dict[str, Any]) -> None:
        inst.state = RunState.SHUTDOWN
        inst.powered_off.set()
        if inst.rebooting:
            return  # reboot() resets the same process; not a power-off to report
        self._emit(inst, EventKind.GUEST_SHUTDOWN, **data, requested=inst.stopping)
        self._act(self._stop(inst), f"qemu-quit-{inst.name}")

    def _set_state(self, inst: _Instance, state: RunState, kind: EventKind, **detail: Any) -> None:
        if inst.state is not state:
            inst.state = state
            self._emit(inst, kind, **detail)

    def _emit(self, inst: _Instance, kind: EventKind, **detail: Any) -> None:
        self._events.put_nowait(InstanceEvent(inst.name, kind, detail))

    def _act(self, coro: Coroutine[Any, Any, None], name: str) -> None:
        task = spawn(coro, name)
        self._actions.add(task)
        task.add_done_callback(self._actions.discard)

    def _require(self, name: str, *states: RunState) -> _Instance:
        inst = self._instances.get(name)
        if inst is None or inst.gone.is_set():
            raise InvalidState(f"{name} is not running", name=name)
        if states and inst.state not in states:
            raise InvalidState(
                f"{name} is {inst.state}, not {'/'.join(states)}", name=name, state=inst.state
            )
        return inst

    def _info(self, inst: _Instance) -> InstanceInfo:
        paths = inst.paths
        return InstanceInfo(
            inst.name, inst.pid, inst.state, paths.console_log, paths.console_socket
        )


# --- process helpers (module level: no instance state) ------------------------------------------


def _prelaunch(paths: RuntimePaths, argv: list[str]) -> None:
    """Make the instance directory and remove what a previous run left behind."""
    for sock in paths.sockets():
        if len(os.fsencode(sock)) > MAX_SOCKET_PATH:
            msg = f"socket path too long for a unix socket: {sock}"
            raise LaunchError(msg, exit_code=None, argv=argv, output=msg)
    paths.run_dir.mkdir(parents=True, exist_ok=True)
    paths.qmp_socket.parent.mkdir(parents=True, exist_ok=True)
    _cleanup(paths)


def _spawn(argv: list[str], paths: RuntimePaths) -> int:
    """Start QEMU in a new session (it outlives us); output goes to ``qemu.log``."""
    logfd = os.open(paths.qemu_log, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    try:
        return os.posix_spawnp(
            argv[0],
            argv,
            dict(os.environ),
            file_actions=[
                (os.POSIX_SPAWN_OPEN, 0, os.devnull, os.O_RDONLY, 0),
                (os.POSIX_SPAWN_DUP2, logfd, 1),
                (os.POSIX_SPAWN_DUP2, logfd, 2),
            ],
            setsid=True,
        )
    except OSError as exc:
        raise LaunchError(
            f"cannot execute {argv[0]}: {exc}", exit_code=None, argv=argv, output=str(exc)
        ) from exc
    finally:
        os.close(logfd)


def _mark_pressed(paths: RuntimePaths) -> None:
    """Record, before pressing the ACPI button, that a power-off now answers our press."""
    try:
        paths.acpi_pressed.write_text("")
    except OSError as exc:
        raise HypervisorError(f"cannot write {paths.acpi_pressed}: {exc}") from exc


def _alive(inst: _Instance) -> bool:
    """Is the process still there? Reaps it (recording the exit code) if it is our child.

    For our child only ``waitpid`` counts: while a multi-threaded QEMU exits, its main thread is
    a zombie before the process can be reaped, and giving up then would leave a zombie behind.
    """
    if inst.exited:
        return False
    try:
        done, status = os.waitpid(inst.pid, os.WNOHANG)
    except ChildProcessError:  # not our child (attached), so poll the pid
        inst.exited = not pid_alive(inst.pid)
        return not inst.exited
    if done == inst.pid:
        inst.exited = True
        inst.exit_code = os.waitstatus_to_exitcode(status)
    return not inst.exited


async def _wait_first(within: float, *events: asyncio.Event) -> bool:
    """Wait until any of ``events`` is set; False on timeout."""
    waiters = [asyncio.ensure_future(e.wait()) for e in events]
    try:
        done, _ = await asyncio.wait(waiters, timeout=within, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for w in waiters:
            w.cancel()
        await asyncio.gather(*waiters, return_exceptions=True)
    return bool(done)


def _migration_status(raw: dict[str, Any]) -> MigrationStatus:
    """``query-migrate``'s answer as a ``MigrationStatus``."""
    ram = raw.get("ram") or {}
    return MigrationStatus(
        status=str(raw.get("status", "none")),
        ram_total=int(ram.get("total", 0)),
        ram_transferred=int(ram.get("transferred", 0)),
        ram_remaining=int(ram.get("remaining", 0)),
        passes=int(ram.get("dirty-sync-count", 0)),
        dirty_rate=int(ram.get("dirty-pages-rate", 0)),
        expected_downtime_ms=int(raw.get("expected-downtime", 0)),
        downtime_ms=_opt_int(raw.get("downtime")),
        total_time_ms=_opt_int(raw.get("total-time")),
        setup_time_ms=_opt_int(raw.get("setup-time")),
        error=str(raw.get("error-desc", "")),
    )


def _opt_int(value: object) -> int | None:
    return int(value) if isinstance(value, int | float) else None


def _live_qemu_pid(paths: RuntimePaths, name: str) -> int | None:
    """The pid in the pidfile if it is alive and really this instance's QEMU, else None."""
    pid = read_pidfile(paths.pidfile)
    if pid is None or name_option(name) not in pid_cmdline(pid):
        return None
    return pid


def _cleanup(paths: RuntimePaths) -> None:
    for path in paths.transient():
        path.unlink(missing_ok=True)


def _remove_tree(path: Path) -> None:
    with contextlib.suppress(FileNotFoundError):
        shutil.rmtree(path)


def _read_from(path: Path, offset: int) -> str:
    try:
        with path.open("rb") as f:
            f.seek(offset)
            return f.read().decode(errors="replace")
    except OSError:
        return ""
