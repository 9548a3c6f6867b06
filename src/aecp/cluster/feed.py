"""The change feed: every change to VMs, nodes, volumes, snapshots, templates and operations,
from a revision of the cluster store, as one ``FeedEvent`` per object changed in a revision.

A feed event says which object changed (or was deleted) and at which revision, not what it
now is: a client reads the object through the API (the stored records are not the API's
schema). A client that keeps the position of the last event it handled (``Position``) and
reconnects with it misses nothing; a revision the store has compacted since raises
``Compacted`` (the API answers 410): the client then reads every list again and follows from
the revision the feed's first (``sync``) event names.
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Literal

from pydantic import BaseModel

from aecp.common.errors import InvalidInput
from aecp.store import keys
from aecp.store.base import ChangeKind, Store, WatchEvent

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
        gone = ev.kind is ChangeKind.DELETE and (deletes or spec)
        name, volume = (rest[1], rest[0]) if prefix == keys.ABS_SNAPSHOTS else (rest[0], None)
        return FeedEvent(
            revision=ev.mod_revision,
            kind=kind,
            name=name,
            volume=volume,
            change="deleted" if gone else "changed",
        )
    return None


@dataclass(frozen=True)
class Position:
    """Where a client is in the feed: every change up to ``revision`` handled, or, with
    ``index``, the changes of ``revision`` up to that one (a stream may end inside a
    revision: one transaction often changes several objects). Written ``R`` or ``R.i``: the
    ``id`` of each event is its position."""

    revision: int
    index: int | None = None

    @classmethod
    def parse(cls, text: str, field: str = "since") -> Position:
        m = _POSITION.match(text)
        if m is None:
            raise InvalidInput(field, "must be a revision (R) or an event id (R.i) of the feed")
        return cls(int(m["rev"]), None if m["index"] is None else int(m["index"]))

    def __str__(self) -> str:
        return str(self.revision) if self.index is None else f"{self.revision}.{self.index}"

    def first_revision(self) -> int:
        """The revision the feed resumes at."""
        return self.revision if self.index is not None else self.revision + 1


_POSITION = re.compile(r"^(?P<rev>[0-9]{1,18})(?:\.(?P<index>[0-9]{1,9}))?$")
Opened = tuple[Position, contextlib.AsyncExitStack, AsyncIterator[WatchEvent]]


class ChangeFeed:
    def __init__(self, store: Store) -> None:
        self.store = store

    async def start(self, since: Position | None) -> Opened:
        """Open the feed after ``since`` (now, if None): the position it follows from, the
        stack that closes it, and the store's events. ``InvalidInput`` for a revision from
        the future; ``Compacted`` for one the store no longer keeps."""
        current = await self.store.revision()
        if since is not None and since.revision > current:
            raise InvalidInput(
                "since", f"revision {since.revision} is in the future (the store is at {current})"
            )
        start = since if since is not None else Position(current)
        stack = contextlib.AsyncExitStack()
        try:
            events = await stack.enter_async_context(
                self.store.watch(keys.ROOT, start_revision=start.first_revision())
            )
        except BaseException:
            await stack.aclose()
            raise
        return start, stack, events


async def feed_events(
    events: AsyncIterator[WatchEvent], after: Position
) -> AsyncIterator[tuple[FeedEvent, Position]]:
    """``events`` as feed events with their positions: one per object and revision (a
    deletion wins over a change of the same object in the same revision only if it comes
    first: clients read the object again either way), those up to ``after`` left out. The
    same revision gives the same events in the same order every time it is read."""
    seen: set[tuple[str, str, str | None]] = set()
    revision, index = 0, -1
    async for ev in events:
        out = classify(ev)
        if out is None:
            continue
        if out.revision != revision:
            revision, index, seen = out.revision, -1, set()
        key = (out.kind, out.name, out.volume)
        if out.change == "changed" and key in seen:
            continue
        seen.add(key)
        index += 1
        handled = after.index is not None and revision == after.revision and index <= after.index
        if not handled:
            yield out, Position(revision, index)
