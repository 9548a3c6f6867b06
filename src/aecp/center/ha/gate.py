"""The center of an HA trio: who may write, and what everyone else is told.

``Leadership`` asks the local Patroni every ``poll_s`` whether this node's PostgreSQL is the
leader (``GET /primary``): 200 yes; 503 or any other answer, no, at once; no answer within
``PROBE_TIMEOUT_S`` or no connection (a slow probe, Patroni restarting while PostgreSQL runs
on): unknown, and the current answer is kept until unknown has lasted ``unknown_grace_s``
(3 x ``poll_s`` by default), then it is no. Keeping "yes" that long is safe: a database that
was demoted meanwhile refuses every write itself, and the gate turns that into the same 503.
On becoming the leader it starts the center's background work (``Duties``: tasks, inventory
sync, alerts); on ceasing to be, it stops it at once. Beside that it reads the local HA agent's
status every ``status_every_s`` and keeps the last reading (``status``; ``None`` while the agent
does not answer) for the console's header and the alert loop, so no request waits for the
agent.

``Gate`` (an ASGI middleware) answers every request but ``GET``, ``HEAD`` and ``OPTIONS``
with ``503`` naming the active (``{"error": "unavailable", "message": ..., "active":
"http://<management IP>:<port>"}``) while this center is not the leader; reads are served from
the local standby. A write that reaches a demoted database all the same gets the same ``503``,
never a ``500`` (``install``): a read-only transaction (SQLSTATE 25006) on any center, and on a
center in a trio also what a demotion does on its way (PostgreSQL shut down and restarted as a
standby: 57P01, 57P02, 57P03, a class 08 error, or a connection lost without a server error).

Everything here takes its clock and its HTTP client from the caller: the tests run it in
virtual time over fake answers.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

import httpx
import psycopg
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from pydantic import ValidationError
from sqlalchemy.exc import DBAPIError
from starlette.types import ASGIApp, Receive, Scope, Send

from aecp.center.ha.model import HAStatus, RPOKind
from aecp.center.settings import CenterHA
from aecp.common.apierrors import error_response
from aecp.common.clock import Clock
from aecp.common.errors import Unavailable
from aecp.common.tasks import cancel, spawn

log = logging.getLogger(__name__)
PROBE_TIMEOUT_S = 1.0  # a Patroni that takes longer gives no answer: "unknown"
UNKNOWN_GRACE_POLLS = 3  # unknown for this many poll_s keeps the last answer; then "no"
STATUS_TIMEOUT_S = 2.0
READS = frozenset({"GET", "HEAD", "OPTIONS"})
READ_ONLY_SQLSTATE = "25006"  # read_only_sql_transaction: a write on a standby
# what a write meets while a demotion shuts PostgreSQL down and starts it as a standby
DEMOTION_SQLSTATES = frozenset(
    {
        "57P01",  # admin_shutdown: "terminating connection due to administrator command"
        "57P02",  # crash_shutdown
        "57P03",  # cannot_connect_now: "the database system is starting up / shutting down"
    }
)


class Duties(Protocol):
    """The work only the leader does. ``start`` and ``stop`` return promptly; ``stop`` cancels
    whatever runs, and a ``start`` after a ``stop`` begins afresh."""

    async def start(self) -> None: ...

    async def stop(self) -> None: ...


async def is_primary(http: httpx.AsyncClient, patroni_url: str) -> bool | None:
    """Whether the Patroni at ``patroni_url`` says its PostgreSQL is the leader: ``True`` for
    200 on ``/primary``, ``False`` for any other answer (503: a replica), ``None`` (unknown)
    for no answer within ``PROBE_TIMEOUT_S``, no connection or a broken exchange."""
    try:
        r = await http.get(f"{patroni_url}/primary", timeout=PROBE_TIMEOUT_S)
    except httpx.HTTPError:
        return None
    return r.status_code == 200


async def fetch_status(http: httpx.AsyncClient, ha: CenterHA) -> HAStatus:
    """The HA agent's status (at ``ha.status_url``, with ``ha.status_token``); ``Unavailable``
    saying why if it gives none."""
    status_url = ha.status_url
    try:
        r = await http.get(status_url, headers=ha.status_headers(), timeout=STATUS_TIMEOUT_S)
        r.raise_for_status()
        return HAStatus.model_validate_json(r.content)
    except httpx.TimeoutException:
        why = f"no answer within {STATUS_TIMEOUT_S:g} s"
    except httpx.HTTPStatusError as exc:
        code = exc.response.status_code
        why = f"it answered {code}" + (": is the agent secret right?" if code == 401 else "")
    except httpx.HTTPError as exc:
        why = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
    except ValidationError as exc:
        why = f"its answer is not an HA status ({exc.error_count()} problems)"
    raise Unavailable(f"the local HA agent gives no status: {why}", status_url=status_url)


@dataclass(frozen=True)
class Badge:
    """What the console's header says of the trio: this center's role, the RPO text, the
    active's name (``none`` without one, empty when unknown), and a tone (``ok``, ``warn``,
    ``bad``: the console's badge classes)."""

    role: str
    rpo: str
    active: str
    tone: str


class Leadership:
    """Whether this center is the active, kept current by ``run`` (see the module).
    ``unknown_grace_s``: how long probes without an answer keep the last answer (default
    ``UNKNOWN_GRACE_POLLS`` x ``ha.poll_s``)."""

    def __init__(
        self,
        ha: CenterHA,
        duties: Duties,
        clock: Clock,
        http: httpx.AsyncClient,
        port: int,
        *,
        unknown_grace_s: float | None = None,
    ) -> None:
        self.ha, self.duties, self.clock, self.http = ha, duties, clock, http
        self.active_url = ha.active_url(port)
        self.unknown_grace_s = (
            UNKNOWN_GRACE_POLLS * ha.poll_s if unknown_grace_s is None else unknown_grace_s
        )
        self.leader = False
        self.unknown_since: float | None = None  # monotonic time of the first unanswered probe
        self.status: HAStatus | None = None
        self.status_error = "not read yet"
        self.probes = 0  # leadership probes done so far
        self.readings = 0  # status readings tried so far
        self._changed = asyncio.Condition()

    @property
    def role(self) -> str:
        return "active" if self.leader else "passive"

    async def run(self) -> None:
        """Probe and read the status until cancelled; then stop the duties if they run."""
        status = spawn(self._read_status_forever(), name="ha-status")
        try:
            while True:
                await self.probe()
                await self.clock.sleep(self.ha.poll_s)
        finally:
            await cancel(status)
            if self.leader:
                self.leader = False
                await self.duties.stop()

    async def probe(self) -> bool:
        """One leadership probe, acted on: the duties start or stop if the answer changed.
        Returns whether this center should lead now: Patroni's answer, or while Patroni gives
        none, the last one until ``unknown_grace_s`` has passed since the first probe without
        an answer (then ``False``)."""
        answer = await is_primary(self.http, self.ha.patroni_url)
        leader = self._judge(answer, self.clock.monotonic())
        await self._become(leader)
        async with self._changed:
            self.probes += 1
            self._changed.notify_all()
        return leader

    def _judge(self, answer: bool | None, now: float) -> bool:
        if answer is not None:
            if self.unknown_since is not None:
                log.info("ha: the local Patroni answers again")
            self.unknown_since = None
            return answer
        if self.unknown_since is None:
            self.unknown_since = now
            log.warning("ha: the local Patroni gives no answer: keeping the last one for now")
        return self.leader and now - self.unknown_since < self.unknown_grace_s

    async def _become(self, leader: bool) -> None:
        """Refuse changes at once when leadership is lost; take them only once the duties
        have started when it is won."""
        if leader == self.leader:
            return
        if not leader:
            self.leader = False
            log.warning("ha: this center's database is not the leader: it is a passive now")
            await self.duties.stop()
            return
        log.info("ha: this center's database is the leader: it becomes the active")
        try:
            await self.duties.start()
        except Exception:  # not the active after all: the next probe tries again
            log.exception("ha: the center's background work did not start")
            await self.duties.stop()
            return
        self.leader = True

    async def _read_status_forever(self) -> None:
        while True:
            await self.read_status()
            await self.clock.sleep(self.ha.status_every_s)

    async def read_status(self) -> HAStatus | None:
        """One reading of the HA agent's status, kept (``None`` if the agent gave none)."""
        try:
            self.status, self.status_error = await fetch_status(self.http, self.ha), ""
        except Unavailable as exc:
            if self.status is not None or self.status_error != exc.message:
                log.warning("ha: %s", exc.message)
            self.status, self.status_error = None, exc.message
        async with self._changed:
            self.readings += 1
            self._changed.notify_all()
        return self.status

    async def until(self, check: Callable[[Leadership], bool]) -> None:
        """Return once ``check(self)`` holds (it is checked after every probe and reading)."""
        async with self._changed:
            await self._changed.wait_for(lambda: check(self))

    def badge(self) -> Badge:
        if self.status is None:
            return Badge(self.role, "status unknown", "", "warn")
        s = self.status
        tone = "ok" if s.rpo.kind is RPOKind.IN_SYNC else "bad"
        return Badge(self.role, s.rpo.text, s.leader or "none", tone)

    def refusal(self) -> JSONResponse:
        """The answer to a change while this center is not the active."""
        return refusal(self.active_url)


def refusal(active_url: str | None) -> JSONResponse:
    """``503``, naming the active when it is known."""
    where = f": the active answers at {active_url}" if active_url else ""
    body: dict[str, Any] = {
        "error": "unavailable",
        "message": f"this center is not the active (its database is not the leader){where}",
    }
    if active_url:
        body["active"] = active_url
    return error_response(503, body)


def leadership_of(app: Any) -> Leadership | None:
    """The app's ``Leadership``; ``None`` for a standalone center."""
    found: Leadership | None = getattr(app.state, "leadership", None)
    return found


class Gate:
    """ASGI middleware: changes get ``503`` while the app's ``Leadership`` is not the leader
    (a standalone app has none: everything passes)."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["method"] not in READS:
            leadership = leadership_of(scope["app"])
            if leadership is not None and not leadership.leader:
                await leadership.refusal()(scope, receive, send)
                return
        await self.app(scope, receive, send)


def _chain(exc: BaseException) -> list[BaseException]:
    """``exc`` and what it wraps (SQLAlchemy's ``orig``, then ``__cause__``), five deep."""
    out: list[BaseException] = []
    seen: BaseException | None = exc
    while seen is not None and len(out) < 5:
        out.append(seen)
        seen = getattr(seen, "orig", None) or seen.__cause__
    return out


def is_read_only_error(exc: BaseException) -> bool:
    """Whether ``exc`` (or what it wraps) is PostgreSQL refusing a write on a standby."""
    return any(getattr(e, "sqlstate", None) == READ_ONLY_SQLSTATE for e in _chain(exc))


def is_demotion_error(exc: BaseException) -> bool:
    """Whether ``exc`` (or what it wraps) is what a write meets while PostgreSQL is demoted:
    read-only (25006), shut down or restarting (57P01, 57P02, 57P03), a connection error
    (class 08), a connection SQLAlchemy found lost, or a psycopg ``OperationalError`` with
    no server error (the connection failed). Other errors, a full disk (53100) say, are not."""
    for e in _chain(exc):
        state = getattr(e, "sqlstate", None)
        if state == READ_ONLY_SQLSTATE or state in DEMOTION_SQLSTATES:
            return True
        if isinstance(state, str) and state.startswith("08"):
            return True
        if isinstance(e, DBAPIError) and e.connection_invalidated:
            return True
        if isinstance(e, psycopg.OperationalError) and state is None:
            return True
    return False


async def _database_error(request: Request, exc: Exception) -> Response:
    leadership = leadership_of(request.app)
    refused = is_demotion_error(exc) if leadership is not None else is_read_only_error(exc)
    if not refused:
        raise exc  # the app's own answer to an unexpected error (500, logged)
    log.warning(
        "%s %s: the database refuses writes now (%s)",
        request.method,
        request.url.path,
        type(getattr(exc, "orig", None) or exc).__name__,
    )
    return refusal(leadership.active_url if leadership is not None else None)


def install(app: FastAPI) -> None:
    """Gate ``app``'s changes on its ``app.state.leadership`` (set one for HA; none: the app
    behaves as without the gate), and answer a write refused by a read-only database with
    ``503`` (in HA also one refused by a database being demoted: ``is_demotion_error``)."""
    app.add_middleware(Gate)
    app.add_exception_handler(DBAPIError, _database_error)


def health(app: Any) -> dict[str, str | bool]:
    """What ``/healthz`` adds: ``ok`` and this center's role (``standalone`` without HA)."""
    leadership = leadership_of(app)
    return {"ok": True, "role": leadership.role if leadership is not None else "standalone"}
