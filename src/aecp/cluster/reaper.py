"""Finished operations are kept for a retention period, then deleted: the controller of the
``operation-reaper`` role (``store.controllers``).

At most once a minute (of the injectable clock), it lists ``/aecp/ops/`` and deletes each
operation that ended more than ``retention`` seconds ago, by compare-and-swap on the revision it
read (a running operation is never deleted, and one changed meanwhile is looked at again next
time). A VM whose last operation was deleted still names it (``last_operation``); asking for
it then answers 404.
"""

from __future__ import annotations

from aecp.common.clock import SYSTEM_CLOCK, Clock
from aecp.model.operation import Operation
from aecp.store import keys
from aecp.store.base import Compare, Delete, Store
from aecp.store.controllers import Decision

EVERY = 60.0  # seconds between two looks


class OperationReaper:
    """Deletes finished operations older than ``retention`` seconds."""

    role = "operation-reaper"

    def __init__(self, store: Store, retention: float, clock: Clock = SYSTEM_CLOCK) -> None:
        self.store, self.retention, self.clock = store, retention, clock
        self._looked: float | None = None

    async def run_pass(self, new_term: bool) -> list[Decision]:
        now = self.clock.monotonic()
        if not new_term and self._looked is not None and now - self._looked < EVERY:
            return []
        self._looked = now
        cutoff = self.clock.wall() - self.retention
        deleted = 0
        for kv in await self.store.list(keys.OPS):
            op = Operation.load(kv.value)
            if not op.state.done or op.updated_at > cutoff:
                continue
            if await self.store.txn([Compare.unchanged(kv.key, kv.mod_revision)], [Delete(kv.key)]):
                deleted += 1
        if not deleted:
            return []
        days = self.retention / 86400
        return [Decision(f"deleted {deleted} operations finished more than {days:g} days ago")]
