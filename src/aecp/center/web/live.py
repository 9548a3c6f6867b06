"""Live updates: ``GET /ui/events``, a stream of server-sent events saying which of the
console's topics changed (``inventory``, ``tasks``, ``alerts``, ``audit``); the page's script
then fetches again the parts that show them.

A topic's version is a short digest of what its table holds (counts, newest times, progress),
read from the database once a second in a worker thread, so a change made by any process
that shares the database (another center of an HA trio) shows too. Each event carries the
versions as its id: a browser that reconnects sends it back (``Last-Event-ID``) and hears of
what changed meanwhile; a page passes the versions it was made from (``since``), so nothing
that changes between the page and its stream is missed. A stream lasts a while and then ends
(the browser reconnects at once), so it never holds up a shutdown, and it ends when its
session does (the page then goes to the login page).
"""

from __future__ import annotations

import asyncio
import hashlib
import json
from collections.abc import AsyncIterator, Callable
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Query, Request
from fastapi.responses import StreamingResponse
from sqlalchemy import func, select
from sqlalchemy.orm import Session as DB

from aecp.center.accounts import Caller
from aecp.center.api.deps import center
from aecp.center.db.models import AuditRecord, ClusterSync, InventoryObject, Task
from aecp.center.web.alerts import alerts_version
from aecp.center.web.auth import may, session_token
from aecp.center.web.render import WebRoute
from aecp.common.errors import Unauthorized

router = APIRouter(include_in_schema=False, route_class=WebRoute)
POLL_EVERY = 1.0  # s
STREAM_FOR = 60.0  # s: then the stream ends and the browser opens another
KEEPALIVE = 15.0  # s
AGE_STEP = 15.0  # s: how stale a figure of an object whose state did not change may get


def _digest(*rows: Any) -> str:
    return hashlib.sha256(repr(rows).encode()).hexdigest()[:12]


def _inventory(db: DB) -> str:
    """Which objects there are and their states, the clusters' sync states, and the copy's
    age in steps of ``AGE_STEP`` (a node's heartbeat changes its copy every few seconds:
    figures such as its usage show within a step, a change of state at once)."""
    objects = db.execute(
        select(
            InventoryObject.cluster,
            InventoryObject.kind,
            InventoryObject.name,
            InventoryObject.state,
            InventoryObject.node,
        ).order_by(InventoryObject.cluster, InventoryObject.kind, InventoryObject.name)
    ).all()
    newest = db.scalar(select(func.max(InventoryObject.synced_at))) or 0.0
    syncs = db.execute(
        select(ClusterSync.cluster, ClusterSync.state, ClusterSync.error).order_by(
            ClusterSync.cluster
        )
    ).all()
    return _digest([tuple(o) for o in objects], [tuple(s) for s in syncs], newest // AGE_STEP)


def _tasks(db: DB) -> str:
    row = db.execute(
        select(
            func.count(),
            func.max(Task.created_at),
            func.max(Task.started_at),
            func.max(Task.finished_at),
            func.sum(Task.progress),
            func.sum(func.length(Task.steps)),
        ).select_from(Task)
    ).one()
    return _digest(tuple(row))


def _audit(db: DB) -> str:
    return _digest(db.scalar(select(func.max(AuditRecord.id))))


TOPICS: dict[str, Callable[[DB], str]] = {
    "inventory": _inventory,
    "tasks": _tasks,
    "alerts": alerts_version,
    "audit": _audit,
}


def versions(db: DB) -> dict[str, str]:
    return {topic: version(db) for topic, version in TOPICS.items()}


def encode(v: dict[str, str]) -> str:
    return ",".join(f"{k}:{x}" for k, x in sorted(v.items()))


def decode(raw: str) -> dict[str, str]:
    pairs = (p.partition(":") for p in raw.split(",") if ":" in p)
    return {k: x for k, _, x in pairs if k in TOPICS}


def _event(name: str, data: dict[str, Any], ident: str = "") -> str:
    head = f"id: {ident}\n" if ident else ""
    return f"{head}event: {name}\ndata: {json.dumps(data)}\n\n"


async def changes(request: Request, token: str, since: dict[str, str]) -> AsyncIterator[str]:
    """The stream: ``change`` events naming the topics that changed, ``login`` when the
    session has ended."""
    c = center(request)

    def read() -> dict[str, str] | None:
        with c.sessions() as db:
            try:
                c.accounts.caller(db, token)
            except Unauthorized:
                return None
            return versions(db)

    yield f"retry: {int(POLL_EVERY * 1000)}\n\n"
    started = quiet_since = c.clock.monotonic()
    last = since
    while c.clock.monotonic() - started < STREAM_FOR:
        now = await asyncio.to_thread(read)
        if now is None:
            yield _event("login", {"to": "/login"})
            return
        changed = sorted(t for t in now if last.get(t) != now[t])
        if changed:
            yield _event("change", {"topics": changed}, encode(now))
            quiet_since = c.clock.monotonic()
        elif c.clock.monotonic() - quiet_since >= KEEPALIVE:
            yield ": still here\n\n"
            quiet_since = c.clock.monotonic()
        last = now
        await c.clock.sleep(POLL_EVERY)


@router.get("/ui/events")
def events(
    request: Request,
    who: Annotated[Caller, Depends(may("session.read"))],
    since: Annotated[str, Query(max_length=512)] = "",
) -> StreamingResponse:
    known = decode(request.headers.get("last-event-id") or since)
    if not known:  # nothing to compare with: from now on
        with center(request).sessions() as db:
            known = versions(db)
    return StreamingResponse(
        changes(request, session_token(request), known),
        media_type="text/event-stream",
        headers={"Cache-Control": "no-store", "X-Accel-Buffering": "no"},
    )
