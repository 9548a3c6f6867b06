"""Live updates: ``GET /ui/events``, a stream of server-sent events saying which of the
console's topics changed (``inventory``, ``tasks``, ``alerts``, ``audit``); the page's script
then fetches again the parts that show them.

One ``Poller`` per process reads what the topics' tables hold once a second, in one worker
thread, for every open stream at once, with a few cheap queries (sizes, newest ids and times,
the unfinished tasks: ``read``), and checks the streams' sessions in the same pass; it runs
while a stream is open and stops with the last. Reading the database, rather than hearing
events in memory, shows a change made by any process that shares it (another center of an
HA trio).

A stream names only the topics its caller's role may read (``READERS``), and a role that sees
its own VMs and tasks only (no ``vm.all``) hears of changes to its own only. A topic's version
is an HMAC of what was read under a random key of the process, so it tells nothing of what it
digests. Each event carries the versions as its id: a browser that reconnects sends it back
(``Last-Event-ID``) and hears of what changed meanwhile; a page passes the versions it was
made from (``since``), so nothing that changes between the page and its stream is missed. A
stream lasts a while and then ends (the browser reconnects at once), so it never holds up a
shutdown, and it ends when its session does (the page then goes to the login page).
"""

from __future__ import annotations

import asyncio
import collections
import hashlib
import hmac
import json
import logging
import secrets
from collections.abc import AsyncGenerator, Iterable
from dataclasses import dataclass, field
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Query, Request
from fastapi.responses import StreamingResponse
from sqlalchemy import case, func, select
from sqlalchemy.orm import Session as DB

from aecp.center.accounts import Caller
from aecp.center.api.deps import Center, center
from aecp.center.db.models import Alert, AuditRecord, ClusterSync, InventoryObject, Task, VMOwner
from aecp.center.tasks import TaskState
from aecp.center.web.auth import may, session_token
from aecp.center.web.render import WebRoute
from aecp.common.errors import Unauthorized
from aecp.common.tasks import spawn

log = logging.getLogger(__name__)
router = APIRouter(include_in_schema=False, route_class=WebRoute)
POLL_EVERY = 1.0  # s
STREAM_FOR = 60.0  # s: then the stream ends and the browser opens another
KEEPALIVE = 15.0  # s
AGE_STEP = 15.0  # s: how stale a figure of an object whose kind drifts may get (``settled``)
DRIFTING = ("node", "volume")  # kinds rewritten for figures alone (heartbeats, allocation)
KEY = secrets.token_bytes(32)  # the versions' key: new with every process
# a topic, and the actions of which a role needs one to hear of it
READERS: dict[str, tuple[str, ...]] = {
    "inventory": ("cluster.read", "vm.read"),
    "tasks": ("task.read",),
    "alerts": ("alert.read",),
    "audit": ("audit.read",),
}
TOPICS = tuple(READERS)
UNFINISHED = (TaskState.PENDING.value, TaskState.EXECUTING.value)


def readable(who: Caller) -> list[str]:
    """The topics ``who``'s role may hear of."""
    return [t for t, actions in READERS.items() if any(who.may(a) for a in actions)]


def own_only(who: Caller, topic: str) -> bool:
    """Whether ``who`` hears of its own things of ``topic`` only: its tasks, without
    ``vm.all``; the inventory (its VMs), without ``vm.all`` or ``cluster.read``."""
    if topic == "tasks":
        return not who.may("vm.all")
    if topic == "inventory":
        return not who.may("vm.all") and not who.may("cluster.read")
    return False


# ---- what the topics' tables hold: cheap reads --------------------------------------------------
def _inventory(db: DB, now: float) -> Any:
    """The clusters' sync states, how many objects of each kind each cluster has, the nodes'
    states, the newest copy of a kind that changes only when its objects do (a VM, a template,
    an operation), and that of the kinds whose figures drift (``settled``)."""
    syncs = db.execute(
        select(ClusterSync.cluster, ClusterSync.state, ClusterSync.error).order_by(
            ClusterSync.cluster
        )
    ).all()
    counts = db.execute(
        select(InventoryObject.cluster, InventoryObject.kind, func.count())
        .group_by(InventoryObject.cluster, InventoryObject.kind)
        .order_by(InventoryObject.cluster, InventoryObject.kind)
    ).all()
    nodes = db.execute(
        select(InventoryObject.cluster, InventoryObject.name, InventoryObject.state)
        .where(InventoryObject.kind == "node")
        .order_by(InventoryObject.cluster, InventoryObject.name)
    ).all()
    drifts = InventoryObject.kind.in_(DRIFTING)
    exact, drifting = db.execute(
        select(
            func.max(case((drifts, None), else_=InventoryObject.synced_at)),
            func.max(case((drifts, InventoryObject.synced_at), else_=None)),
        )
    ).one()
    return (
        [tuple(s) for s in syncs],
        [tuple(c) for c in counts],
        [tuple(n) for n in nodes],
        exact,
        settled(drifting, now),
    )


def settled(newest: float | None, now: float) -> Any:
    """The newest copy of a drifting kind as a version: while copies keep coming (a node's
    heartbeat rewrites it every few seconds) its step of ``AGE_STEP`` seconds, so a page
    shows its figures within a step and is not fetched again at every heartbeat; once none
    came for a step, the time itself, so a last change is never lost in its step."""
    if newest is None:
        return None
    return ("settled", newest) if now - newest >= AGE_STEP else ("step", newest // AGE_STEP)


def _own_inventory(db: DB, user: str) -> Any:
    """How many of the VMs ``user`` owns are in the copy, and the newest copy of one (read
    from the owner's VMs: an outer join, so that SQLite never scans the inventory)."""
    row = db.execute(
        select(func.count(InventoryObject.name), func.max(InventoryObject.synced_at))
        .select_from(VMOwner)
        .outerjoin(
            InventoryObject,
            (InventoryObject.cluster == VMOwner.cluster)
            & (InventoryObject.kind == "vm")
            & (InventoryObject.name == VMOwner.vm),
        )
        .where(VMOwner.user == user)
    ).one()
    return tuple(row)


def _tasks(db: DB, user: str | None = None) -> Any:
    """The newest task, and the unfinished ones by state: how many, their progress, steps,
    errors and starts (a task that finishes leaves them)."""
    newest = select(func.max(Task.seq))
    unfinished = (
        select(
            Task.state,
            func.count(),
            func.sum(Task.progress),
            func.sum(func.length(Task.steps)),
            func.sum(func.length(Task.error)),
            func.max(Task.started_at),
            func.sum(Task.attempts),
        )
        .where(Task.state.in_(UNFINISHED))
        .group_by(Task.state)
        .order_by(Task.state)
    )
    if user is not None:
        newest, unfinished = newest.where(Task.user == user), unfinished.where(Task.user == user)
    return db.scalar(newest), [tuple(r) for r in db.execute(unfinished)]


def _alerts(db: DB) -> Any:
    """The newest alert, and the open ones: how many, the newest change of one (an update,
    or one resolved: it leaves them)."""
    newest = db.scalar(select(func.max(Alert.id)))
    opened = db.execute(
        select(func.count(), func.max(Alert.updated_at)).where(Alert.state == "open")
    ).one()
    return newest, tuple(opened)


def _audit(db: DB) -> Any:
    return db.scalar(select(func.max(AuditRecord.id)))


@dataclass(frozen=True)
class Reading:
    """One read of the topics: for everyone (``shared``), for each user who hears of its own
    things only (``own``), and the sessions checked (token → caller; ``None``: ended)."""

    shared: dict[str, Any] = field(default_factory=dict)
    own: dict[str, dict[str, Any]] = field(default_factory=dict)
    callers: dict[str, Caller | None] = field(default_factory=dict)


def read(db: DB, now: float, users: Iterable[str] = ()) -> Reading:
    """What the topics hold at ``now``, for everyone and for ``users`` (their own things)."""
    shared = {"inventory": _inventory(db, now), "tasks": _tasks(db), "alerts": _alerts(db)}
    shared["audit"] = _audit(db)
    own = {u: {"inventory": _own_inventory(db, u), "tasks": _tasks(db, u)} for u in set(users)}
    return Reading(shared, own)


def sign(topic: str, raw: Any) -> str:
    return hmac.new(KEY, repr((topic, raw)).encode(), hashlib.sha256).hexdigest()[:16]


def versions_of(reading: Reading, who: Caller) -> dict[str, str]:
    """The versions of the topics ``who`` may hear of, out of ``reading``."""
    found = {}
    for topic in readable(who):
        held = reading.own.get(who.user, {}) if own_only(who, topic) else reading.shared
        if topic in held:
            found[topic] = sign(topic, held[topic])
    return found


def needs_own(who: Caller) -> bool:
    return any(own_only(who, t) for t in readable(who))


def versions(db: DB, who: Caller, now: float) -> dict[str, str]:
    """The versions of the topics ``who`` may hear of, read at ``now``."""
    return versions_of(read(db, now, [who.user] if needs_own(who) else []), who)


def encode(v: dict[str, str]) -> str:
    return ",".join(f"{k}:{x}" for k, x in sorted(v.items()))


def decode(raw: str) -> dict[str, str]:
    pairs = (p.partition(":") for p in raw.split(",") if ":" in p)
    return {k: x for k, _, x in pairs if k in TOPICS}


# ---- one poller for every stream ------------------------------------------------------------
class Poller:
    """Reads the topics and checks the streams' sessions once every ``every`` seconds, in one
    worker thread, while a stream is open (``subscribe``/``unsubscribe``); a stream waits for
    each new ``Reading`` (``next``)."""

    def __init__(self, c: Center, every: float = POLL_EVERY) -> None:
        self.center, self.every = c, every
        self._streams: collections.Counter[str] = collections.Counter()  # token → streams
        self._task: asyncio.Task[None] | None = None
        self._fresh = asyncio.Event()
        self.latest = Reading()

    @property
    def running(self) -> bool:
        return self._task is not None and not self._task.done()

    def subscribe(self, token: str) -> None:
        self._streams[token] += 1
        if not self.running:
            self._task = spawn(self._run(), "console live poller")

    def unsubscribe(self, token: str) -> None:
        self._streams[token] -= 1
        if self._streams[token] <= 0:
            del self._streams[token]
        if not self._streams and self._task is not None:  # the last stream: the poller too
            self._task.cancel()
            self._task = None

    async def next(self) -> Reading:
        """The next reading (within ``every`` seconds)."""
        fresh = self._fresh
        await fresh.wait()
        return self.latest

    def _read(self, tokens: list[str]) -> Reading:
        c = self.center
        with c.sessions() as db:
            callers: dict[str, Caller | None] = {}
            for token in tokens:
                try:
                    callers[token] = c.accounts.caller(db, token)
                except Unauthorized:
                    callers[token] = None
            users = [w.user for w in callers.values() if w is not None and needs_own(w)]
            found = read(db, c.clock.wall(), users)
        return Reading(found.shared, found.own, callers)

    async def _run(self) -> None:
        while self._streams:
            try:
                reading = await asyncio.to_thread(self._read, sorted(self._streams))
            except Exception:  # the database: the streams wait for the next read
                log.warning("console: reading the live topics failed", exc_info=True)
                reading = Reading(self.latest.shared, self.latest.own)
            self.latest, fresh, self._fresh = reading, self._fresh, asyncio.Event()
            fresh.set()
            await self.center.clock.sleep(self.every)


def poller(request: Request) -> Poller:
    p: Poller = request.app.state.live
    return p


def _event(name: str, data: dict[str, Any], ident: str = "") -> str:
    head = f"id: {ident}\n" if ident else ""
    return f"{head}event: {name}\ndata: {json.dumps(data)}\n\n"


async def changes(
    request: Request, token: str, who: Caller, since: dict[str, str]
) -> AsyncGenerator[str, None]:
    """The stream: ``change`` events naming the topics (of those ``who`` may hear of) that
    changed, ``login`` when the session has ended."""
    c, shared = center(request), poller(request)
    yield f"retry: {int(POLL_EVERY * 1000)}\n\n"
    started = quiet_since = c.clock.monotonic()
    last = since
    shared.subscribe(token)
    try:
        while c.clock.monotonic() - started < STREAM_FOR:
            reading = await shared.next()
            if token in reading.callers:  # checked in this reading (its role may change)
                now_who = reading.callers[token]
                if now_who is None:
                    yield _event("login", {"to": "/login"})
                    return
                who = now_who
            now = versions_of(reading, who)
            changed = sorted(t for t in now if last.get(t) != now[t])
            merged = {**last, **now}  # a topic not read this time keeps its version
            last = {t: merged[t] for t in readable(who) if t in merged}
            if changed:
                yield _event("change", {"topics": changed}, encode(last))
                quiet_since = c.clock.monotonic()
            elif c.clock.monotonic() - quiet_since >= KEEPALIVE:
                yield ": still here\n\n"
                quiet_since = c.clock.monotonic()
    finally:
        shared.unsubscribe(token)


@router.get("/ui/events")
def events(
    request: Request,
    who: Annotated[Caller, Depends(may("session.read"))],
    since: Annotated[str, Query(max_length=512)] = "",
) -> StreamingResponse:
    known = decode(request.headers.get("last-event-id") or since)
    if not known:  # nothing to compare with: from now on
        c = center(request)
        with c.sessions() as db:
            known = versions(db, who, c.clock.wall())
    return StreamingResponse(
        changes(request, session_token(request), who, known),
        media_type="text/event-stream",
        headers={"Cache-Control": "no-store", "X-Accel-Buffering": "no"},
    )
