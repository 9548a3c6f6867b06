"""The change feed: every change to VMs, nodes, volumes, snapshots, templates and operations,
from a revision of the cluster store, as one ``FeedEvent`` per object changed in a revision.

A feed event says which object changed (or was deleted) and at which revision, not what it
now is: a client reads the object through the API (the stored records are not the API's
schema). A client that keeps the revision of the last event it handled and reconnects with it
misses nothing; a revision the store has compacted since raises ``Compacted`` (the API answers
410): the client then reads every list again and follows from the revision the feed's first
(``sync``) event names.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from typing import Literal

from pydantic import BaseModel

from aecp.common.errors import InvalidInput
from aecp.store import keys
from aecp.store.base import EventKind, Store, WatchEvent

Kind = Literal["vm", "node", "volume", "snapshot", "template", "operation"]


class FeedEvent(BaseModel):
    revision: int
    kind: Kind
    name: str
    volume: str | None = None  # a snapshot's volume
    change: Literal["changed", "deleted"]


# key prefix → the kind of object, and whether deleting the key deletes the object (a VM's
# keys are /aecp/vms/<vm>/<part>: it is deleted with its spec)
_OBJECTS: list[tuple[str, Kind, bool]] = [
    (keys.VMS, "vm", False),
    (keys.VM_JOBS, "vm", False),
    (keys.NODES, "node", True),
    (keys.ALIVE, "node", False),
    (keys.NODE_ADMIN, "node", False),
    (keys.ABS_VOLUMES, "volume", True),
    (keys.ABS_ATTACH, "volume", False),
    (keys.ABS_EXPORTS, "volume", False),
    (keys.ABS_SNAPSHOTS, "snapshot", True),  # /aecp/abs/snapshots/<volume>/<snapshot>
    (keys.TEMPLATES, "template", True),
    (keys.OPS, "operation", True),
]
_TWO_PARTS = (keys.VMS, keys.ABS_SNAPSHOTS)


def classify(ev: WatchEvent) -> FeedEvent | None:
    """The feed event of a store change, or None for a key the feed does not show."""
    for prefix, kind, deletes in _OBJECTS:
        if not ev.key.startswith(prefix):
            continue
        rest = ev.key[len(prefix) :].split("/")
        if len(rest) != (2 if prefix in _TWO_PARTS else 1) or not all(rest):
            return None
        spec = prefix == keys.VMS and rest[1] == "spec"
        gone = ev.kind is EventKind.DELETE and (deletes or spec)
        name, volume = (rest[1], rest[0]) if prefix == keys.ABS_SNAPSHOTS else (rest[0], None)
        return FeedEvent(
            revision=ev.mod_revision,
            kind=kind,
            name=name,
            volume=volume,
            change="deleted" if gone else "changed",
        )
    return None


Opened = tuple[int, contextlib.AsyncExitStack, AsyncIterator[WatchEvent]]


class ChangeFeed:
    def __init__(self, store: Store) -> None:
        self.store = store

    async def start(
        self, since: int | None
    ) -> tuple[int, contextlib.AsyncExitStack, AsyncIterator[WatchEvent]]:
        """Open the feed after revision ``since`` (now, if None): the revision it follows
        from, the stack that closes it, and the store's events. ``InvalidInput`` for a revision
        from the future; ``Compacted`` for one the store no longer keeps."""
        current = await self.store.revision()
        if since is not None and since > current:
            raise InvalidInput(
                "since", f"revision {since} is in the future (the store is at {current})"
            )
        start = current if since is None else since
        stack = contextlib.AsyncExitStack()
        try:
            events = await stack.enter_async_context(
                self.store.watch(keys.ROOT, start_revision=start + 1)
            )
        except BaseException:
            await stack.aclose()
            raise
        return start, stack, events


async def feed_events(events: AsyncIterator[WatchEvent]) -> AsyncIterator[FeedEvent]:
    """``events`` as feed events: one per object and revision (a deletion wins over a change
    of the same object in the same revision only if it comes first: clients read the object
    again either way)."""
    seen: set[tuple[str, str, str | None]] = set()
    revision = 0
    async for ev in events:
        out = classify(ev)
        if out is None:
            continue
        if out.revision != revision:
            revision, seen = out.revision, set()
        key = (out.kind, out.name, out.volume)
        if out.change == "changed" and key in seen:
            continue
        seen.add(key)
        yield out
