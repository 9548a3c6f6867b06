"""``/v1/events``: the change feed (``cluster.feed``) as server-sent events.

The stream starts with a ``sync`` event naming the position it follows from, then one event
per change (``id`` is its position ``R.i``: the i-th change of store revision R; ``event``
the kind of object; ``data`` a ``FeedEvent``), and a comment line every ``KEEPALIVE`` seconds
while nothing changes. A client reconnects with ``since=<the last id it handled>`` (or the
SSE ``Last-Event-ID`` header) and misses nothing, even if the stream ended inside a
revision. A revision the store no
longer keeps answers 410 (``compacted``): read every list again, then follow from the
``sync`` revision of a new stream. Should the store compact while a stream runs behind it, or
the store fail, the stream sends an ``error`` event and ends. ``limit`` ends the stream after
that many change events; ``timeout`` after that many seconds.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import AsyncIterator
from typing import Annotated, get_args

from fastapi import Header, Query
from fastapi.responses import StreamingResponse

from aecp.cluster.api.deps import Service
from aecp.cluster.api.routing import api_router
from aecp.cluster.feed import ChangeFeed, FeedEvent, Kind, Position, feed_events
from aecp.common.apierrors import error_responses
from aecp.common.errors import AecpError
from aecp.common.tasks import cancel, spawn
from aecp.store.base import WatchEvent

log = logging.getLogger(__name__)
router = api_router("/v1/events", "events")
KEEPALIVE = 15.0  # s
# one event of the stream (``data`` is JSON: the sync revision, a FeedEvent, or an ErrorBody)
SSE_EVENT = {
    "type": "object",
    "properties": {
        "event": {
            "type": "string",
            "enum": ["sync", "error", *get_args(Kind)],
        },
        "id": {"type": "string", "description": "the event's position: R.i (revision R)"},
        "data": {"type": "string", "contentMediaType": "application/json"},
    },
    "required": ["event", "data"],
}
QUEUE = 1000  # feed events read ahead of a slow client


@router.get(
    "",
    operation_id="follow_events",
    response_class=StreamingResponse,
    responses={
        200: {
            "description": "server-sent events: sync, then one per change (see the module)",
            "content": {"text/event-stream": {"schema": SSE_EVENT}},
        },
        **error_responses(410),
    },
)
async def follow_events(
    svc: Service,
    since: Annotated[
        str | None,
        Query(
            max_length=40,
            description="the id of the last event handled (R.i), or a revision (R) whose "
            "changes were all handled",
        ),
    ] = None,
    last_event_id: Annotated[
        str | None,
        Header(alias="Last-Event-ID", max_length=40, description="as since (SSE reconnects)"),
    ] = None,
    limit: Annotated[int | None, Query(ge=1, le=100_000, description="end after N changes")] = None,
    timeout: Annotated[
        float, Query(gt=0, le=86_400, description="end the stream after this many seconds")
    ] = 3600.0,
) -> StreamingResponse:
    """Every change to VMs, nodes, volumes, snapshots, templates and operations after
    ``since`` (from now without it)."""
    given = since if since is not None else last_event_id
    after = Position.parse(given) if given is not None else None
    start, stack, events = await ChangeFeed(svc.store).start(after)
    return StreamingResponse(
        _stream(start, stack, events, limit, timeout),
        media_type="text/event-stream",
        headers={"cache-control": "no-cache", "x-accel-buffering": "no"},
    )


async def _stream(
    start: Position,
    stack: contextlib.AsyncExitStack,
    events: AsyncIterator[WatchEvent],
    limit: int | None,
    timeout: float,
) -> AsyncIterator[bytes]:
    """The stream's bytes. A pump task moves feed events into a bounded queue (a slow client
    holds the watch back, and the store breaks a watch that falls too far behind), so that
    waiting for the next one can time out for a keepalive without cancelling the feed."""
    queue: asyncio.Queue[tuple[FeedEvent, Position] | AecpError | None] = asyncio.Queue(QUEUE)

    async def pump() -> None:
        try:
            async for item in feed_events(events, start):
                await queue.put(item)
            await queue.put(None)
        except AecpError as exc:
            await queue.put(exc)
        except Exception as exc:
            log.exception("the change feed broke")
            await queue.put(AecpError(f"the change feed broke: {type(exc).__name__}"))

    task = spawn(pump(), name="change-feed")
    sent = 0
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    try:
        yield _event("sync", str(start), {"revision": start.revision})
        while (limit is None or sent < limit) and (left := deadline - loop.time()) > 0:
            try:
                item = await asyncio.wait_for(queue.get(), min(KEEPALIVE, left))
            except TimeoutError:
                yield b": keepalive\n\n"
                continue
            if item is None:
                return
            if isinstance(item, AecpError):
                yield _event("error", None, item.to_dict())
                return
            ev, position = item
            yield _event(ev.kind, str(position), ev.model_dump(exclude_none=True))
            sent += 1
    finally:
        await cancel(task)
        await stack.aclose()


def _event(name: str, ident: str | None, data: object) -> bytes:
    head = f"id: {ident}\n" if ident is not None else ""
    return f"{head}event: {name}\ndata: {json.dumps(data, separators=(',', ':'))}\n\n".encode()
