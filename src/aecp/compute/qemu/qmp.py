"""The QMP adapter: the only module that imports ``qemu.qmp``.

``QmpConnection`` is a small state machine over ``qemu.qmp.QMPClient``::

    DISCONNECTED --connect()--> CONNECTED --disconnect() / QEMU hung up--> CLOSED

A failed ``connect`` leaves it DISCONNECTED (it may be retried); CLOSED is final. While connected,
an event pump task hands every QMP event to ``on_event(name, data)`` in arrival order, and a
watcher task notices when QEMU hangs up: it drains the events still queued, closes the client
and calls ``on_lost()`` once. Errors leave as ``HypervisorError`` subclasses, never as
``qemu.qmp`` ones.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import logging
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from qemu.qmp import ExecInterruptedError, ExecuteError, QMPClient, QMPError, Runstate

from aecp.common.errors import HypervisorError
from aecp.common.tasks import cancel, spawn

log = logging.getLogger(__name__)

EventCallback = Callable[[str, dict[str, Any]], None]


class QmpCommandError(HypervisorError):
    """QEMU answered a command with an error (``error_class`` names it, e.g. GenericError)."""


class QmpDisconnected(HypervisorError):
    """The QMP connection is not (or no longer) established."""


class QmpState(enum.StrEnum):
    DISCONNECTED = "disconnected"
    CONNECTED = "connected"
    CLOSED = "closed"


class QmpConnection:
    """One QMP session with one QEMU process (see the module docstring for the states)."""

    def __init__(
        self,
        name: str,
        on_event: EventCallback | None = None,
        on_lost: Callable[[], None] | None = None,
    ) -> None:
        self.name = name
        self._on_event = on_event
        self._on_lost = on_lost
        self._client = QMPClient(name)
        self._listener = self._client.events  # the default listener: it queues every event
        self._state = QmpState.DISCONNECTED
        self._pump: asyncio.Task[None] | None = None
        self._watch: asyncio.Task[None] | None = None

    @property
    def state(self) -> QmpState:
        return self._state

    async def connect(
        self, socket_path: Path, within: float, *, alive: Callable[[], bool] | None = None
    ) -> None:
        """Connect to ``socket_path``, retrying until ``within`` s have passed.

        ``alive`` is asked between attempts; once it returns False the wait is given up. Raises
        ``QmpDisconnected`` with the last error if no session was established.
        Post-condition on success: CONNECTED, event pump and hang-up watcher running.
        """
        self._require(QmpState.DISCONNECTED)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + within
        last: Exception = FileNotFoundError(f"{socket_path} does not exist")
        while loop.time() < deadline and (alive is None or alive()):
            if not socket_path.exists():
                await asyncio.sleep(0.02)
                continue
            try:
                await asyncio.wait_for(self._client.connect(str(socket_path)), 5)
            except (QMPError, OSError, TimeoutError) as exc:
                last = exc
                await asyncio.sleep(0.05)
                continue
            self._started()
            return
        raise QmpDisconnected(
            f"{self.name}: no QMP session on {socket_path}: {last}", socket=str(socket_path)
        )

    def _started(self) -> None:
        self._state = QmpState.CONNECTED
        self._pump = spawn(self._pump_events(), f"qmp-events-{self.name}")
        self._watch = spawn(self._watch_hangup(), f"qmp-watch-{self.name}")

    async def execute(self, cmd: str, args: Mapping[str, object] | None = None) -> Any:
        """Run one QMP command and return its ``return`` value.

        Raises ``QmpCommandError`` if QEMU refused it, ``QmpDisconnected`` if the connection is
        not established or broke before the answer (e.g. QEMU exited).
        """
        self._require(QmpState.CONNECTED)
        try:
            return await self._client.execute(cmd, args)
        except ExecuteError as exc:
            raise QmpCommandError(
                f"{self.name}: {cmd} failed: {exc.error.error.desc}",
                command=cmd,
                error_class=exc.error_class,
            ) from exc
        except (ExecInterruptedError, QMPError, EOFError, OSError) as exc:
            raise QmpDisconnected(f"{self.name}: {cmd} interrupted: {exc!r}", command=cmd) from exc

    async def disconnect(self) -> None:
        """Close the session (idempotent). Never raises: after ``quit`` the client reports the
        server's hang-up as EOFError, which is expected and swallowed. Post-condition: CLOSED."""
        if self._state is QmpState.CONNECTED:
            self._state = QmpState.CLOSED
            await cancel(self._watch, self._pump)
            await self._close_client()
            return
        self._state = QmpState.CLOSED
        watch = self._watch  # QEMU hung up: let the watcher finish closing the client
        if watch is not None and not watch.done() and watch is not asyncio.current_task():
            await asyncio.wait([watch])

    def _require(self, state: QmpState) -> None:
        if self._state is not state:
            raise QmpDisconnected(f"{self.name}: QMP is {self._state}, not {state}")

    async def _pump_events(self) -> None:
        while True:
            self._dispatch(await self._listener.get())

    def _dispatch(self, msg: Mapping[str, Any]) -> None:
        name = str(msg.get("event", ""))
        data = dict(msg.get("data") or {})
        log.debug("%s: QMP event %s %s", self.name, name, data)
        if self._on_event is not None:
            try:
                self._on_event(name, data)
            except Exception:
                log.exception("%s: handler of QMP event %s failed", self.name, name)

    async def _watch_hangup(self) -> None:
        """Wait until the client leaves RUNNING on its own (QEMU hung up), then close."""
        while self._client.runstate is Runstate.RUNNING:
            await self._client.runstate_changed()
        if self._state is not QmpState.CONNECTED:
            return
        self._state = QmpState.CLOSED
        await cancel(self._pump)
        for msg in self._listener.clear():
            self._dispatch(msg)
        await self._close_client()
        log.debug("%s: QMP connection lost", self.name)
        if self._on_lost is not None:
            self._on_lost()

    async def _close_client(self) -> None:
        with contextlib.suppress(QMPError, EOFError, OSError):
            await self._client.disconnect()
