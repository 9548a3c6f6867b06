"""The events of an object: what controllers decided about it, newest first, at most
``KEEP`` per object (the oldest go as new ones come).

An event is one key, ``/aecp/events/<kind>/<name>/<stamp>`` (the stamp: wall time in
microseconds and a random suffix, so two writers never collide). Events are ordered by the
store's revision at which they were written, not by the stamp: the nodes' clocks may differ.
An event of a VM or node is written only while the object exists (in one transaction with
that check), and the events of a deleted VM are deleted with it (in the transaction that
deletes its keys), so a later object of the same name starts with none.
"""

from __future__ import annotations

import secrets

from aecp.common.clock import SYSTEM_CLOCK, Clock
from aecp.model.event import ObjectEvent
from aecp.store import keys
from aecp.store.base import Compare, KeyValue, Put, Store

KEEP = 50
EXISTS = {"vm": keys.vm_spec, "node": keys.node}  # an event of these needs its object's key


class History:
    """Records and reads object events; ``node`` names the process's node in each event."""

    def __init__(
        self, store: Store, node: str, clock: Clock = SYSTEM_CLOCK, keep: int = KEEP
    ) -> None:
        self.store, self.node, self.clock, self.keep = store, node, clock, keep

    async def record(self, kind: str, name: str, role: str, sentence: str) -> bool:
        """Add an event to object ``name`` of ``kind``; drop its oldest beyond ``keep``. False
        (nothing written) if it is a VM or node that does not exist."""
        now = self.clock.wall()
        prefix = keys.object_events(kind, name)
        stamp = f"{int(now * 1_000_000):020d}-{secrets.token_hex(3)}"
        event = ObjectEvent(at=now, role=role, node=self.node, sentence=sentence)
        exists = EXISTS.get(kind)
        guard = [Compare(exists(name), "create", ">", 0)] if exists else []
        if not await self.store.txn(guard, [Put(prefix + stamp, event.dump())]):
            return False
        kept = _in_order(await self.store.list(prefix))
        for kv in kept[: max(0, len(kept) - self.keep)]:
            await self.store.delete(kv.key)
        return True

    async def events(self, kind: str, name: str) -> list[ObjectEvent]:
        """The object's events, newest first."""
        kvs = _in_order(await self.store.list(keys.object_events(kind, name)))
        return [ObjectEvent.load(kv.value) for kv in reversed(kvs)]


def _in_order(kvs: list[KeyValue]) -> list[KeyValue]:
    """Oldest first, by the revision that wrote each."""
    return sorted(kvs, key=lambda kv: kv.create_revision)
