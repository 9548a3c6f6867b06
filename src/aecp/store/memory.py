"""The in-memory cluster store: the test double of ``Store``, with etcd v3 semantics in one process.

Owns: a key space with one revision counter (bumped once per write or transaction that changes
something; create/mod revisions and versions per key, like etcd), leases that expire by an
injectable ``Clock``, watches fed through asyncio queues with the full event history (so
``start_revision`` replays), transactions with every ``Compare`` target and operator (and
etcd's limit on their size), and named failure injection: ``set_reachable(False)`` and
``UnreachableMemoryStore``.

Lease expiry happens when a call notices it (every call first expires what is due) or when a
test calls ``expire_leases()``, typically right after ``FakeClock.advance``. Nothing runs in the
background, so an idle store never emits lease DELETE events by itself.

Every call yields to the event loop once before it acts, like a call to a real store would; the
action itself is atomic.
"""

from __future__ import annotations

import asyncio
import builtins
import contextlib
import itertools
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field

from aecp.common.clock import SYSTEM_CLOCK, Clock
from aecp.common.errors import Compacted, LeaseExpired, StoreUnavailable
from aecp.store.base import (
    ChangeKind,
    Compare,
    Delete,
    KeyValue,
    Lease,
    Op,
    Put,
    Store,
    WatchEvent,
)


@dataclass
class _Entry:
    value: bytes
    create_revision: int
    mod_revision: int
    version: int
    lease: int = 0

    def public(self, key: str) -> KeyValue:
        return KeyValue(key, self.value, self.create_revision, self.mod_revision, self.lease)


@dataclass
class _LeaseState:
    ttl: int
    deadline: float
    keys: set[str] = field(default_factory=set)


MAX_TXN_OPS = 128
"""etcd's default ``--max-txn-ops``: the most compares, or operations in one branch, that a
transaction may have."""


class MemoryStore(Store):
    """The ``Store`` contract in memory. ``clock`` decides when leases expire; a transaction
    with more than ``max_txn_ops`` compares, or operations in a branch, is refused
    (``ValueError``, as the etcd adapter reports etcd's refusal)."""

    def __init__(self, clock: Clock = SYSTEM_CLOCK, max_txn_ops: int = MAX_TXN_OPS) -> None:
        self.clock = clock
        self.max_txn_ops = max_txn_ops
        self._data: dict[str, _Entry] = {}
        self._revision = 1  # etcd's first revision, before any write
        self._history: list[WatchEvent] = []
        self._compacted = 0  # watches cannot start before this revision
        self._leases: dict[int, _LeaseState] = {}
        self._lease_ids = itertools.count(0x1000)
        self._watches: set[_MemoryWatch] = set()
        self._reachable = True
        self._closed = False

    # -- failure injection and time --------------------------------------------------------------

    @property
    def reachable(self) -> bool:
        return self._reachable

    def set_reachable(self, reachable: bool) -> None:
        """Cut the store off (every call raises ``StoreUnavailable`` and every open watch breaks)
        or bring it back. Leases keep running on the clock meanwhile, as they would in etcd."""
        self._reachable = reachable
        if not reachable:
            self._break_watches("the store is unreachable")

    def expire_leases(self) -> list[int]:
        """Revoke every lease whose TTL has run out on the clock (deleting its keys); returns
        their ids. Works even while unreachable: expiry happens on the server side."""
        now = self.clock.monotonic()
        due = [lease_id for lease_id, st in self._leases.items() if st.deadline <= now]
        for lease_id in due:
            self._revoke(lease_id)
        return due

    def _check(self, what: str) -> None:
        """Raise ``StoreUnavailable`` if closed or cut off; then expire what is due."""
        if self._closed:
            raise StoreUnavailable(f"memory {what}: the store is closed")
        if not self._reachable:
            raise StoreUnavailable(f"memory {what}: the store is unreachable")
        self.expire_leases()

    async def _enter(self, what: str) -> None:
        await asyncio.sleep(0)
        self._check(what)

    # -- reads -----------------------------------------------------------------------------------

    async def get(self, key: str) -> KeyValue | None:
        await self._enter("get")
        entry = self._data.get(key)
        return None if entry is None else entry.public(key)

    async def list(self, prefix: str) -> list[KeyValue]:
        await self._enter("list")
        return [self._data[k].public(k) for k in sorted(self._data) if k.startswith(prefix)]

    async def revision(self) -> int:
        await self._enter("revision")
        return self._revision

    # -- writes ----------------------------------------------------------------------------------

    async def put(self, key: str, value: bytes, *, lease: Lease | None = None) -> int:
        await self._enter("put")
        self._apply([Put(key, value, lease)])
        return self._revision

    async def create(self, key: str, value: bytes, *, lease: Lease | None = None) -> bool:
        return await self.txn([Compare.absent(key)], [Put(key, value, lease)])

    async def replace(
        self, key: str, value: bytes, *, mod_revision: int, lease: Lease | None = None
    ) -> bool:
        return await self.txn([Compare.unchanged(key, mod_revision)], [Put(key, value, lease)])

    async def delete(self, key: str, *, mod_revision: int | None = None) -> bool:
        guard = [Compare(key, "version", ">", 0)]
        if mod_revision is not None:
            guard.append(Compare.unchanged(key, mod_revision))
        return await self.txn(guard, [Delete(key)])

    async def delete_prefix(self, prefix: str) -> int:
        await self._enter("delete_prefix")
        doomed = [k for k in self._data if k.startswith(prefix)]
        self._apply([Delete(prefix, prefix=True)])
        return len(doomed)

    async def txn(
        self, compare: Sequence[Compare], success: Sequence[Op], failure: Sequence[Op] = ()
    ) -> bool:
        await self._enter("txn")
        if max(len(compare), len(success), len(failure)) > self.max_txn_ops:
            raise ValueError(
                f"memory txn: too many operations in txn request (more than {self.max_txn_ops})"
            )
        held = all(self._holds(c) for c in compare)
        self._apply(success if held else failure)
        return held

    def _holds(self, cmp: Compare) -> bool:
        """etcd's rule: a value compare on an absent key is always false; the other targets of
        an absent key read as 0."""
        if (cmp.target == "value") != isinstance(cmp.operand, bytes):
            raise TypeError(f"compare on {cmp.target!r} needs a matching operand: {cmp.operand!r}")
        entry = self._data.get(cmp.key)
        if entry is None and cmp.target == "value":
            return False
        actual: bytes | int
        if cmp.target == "value":
            actual = entry.value if entry else b""
        elif cmp.target == "mod":
            actual = entry.mod_revision if entry else 0
        elif cmp.target == "create":
            actual = entry.create_revision if entry else 0
        else:
            actual = entry.version if entry else 0
        return _compare(actual, cmp.op, cmp.operand)

    def _apply(self, ops: Sequence[Op]) -> None:
        """Apply ``ops`` atomically at one new revision (none if nothing changes). Every lease
        named must be alive (``LeaseExpired``), and no key may be written twice (``ValueError``,
        as etcd rejects it), both checked before anything changes."""
        _reject_overlaps(ops)
        for op in ops:
            if isinstance(op, Put) and op.lease is not None and op.lease.id not in self._leases:
                raise LeaseExpired(f"memory put {op.key!r}: lease {op.lease.id:x} is gone")
        revision = self._revision + 1
        events = [ev for op in ops for ev in self._apply_one(op, revision)]
        if events:
            self._revision = revision
            self._publish(events)

    def _apply_one(self, op: Op, revision: int) -> builtins.list[WatchEvent]:
        if isinstance(op, Put):
            return [self._put(op, revision)]
        keys = [k for k in self._data if k.startswith(op.key)] if op.prefix else [op.key]
        return [self._delete(k, revision) for k in sorted(keys) if k in self._data]

    def _put(self, op: Put, revision: int) -> WatchEvent:
        old = self._data.get(op.key)
        if old is not None and old.lease:
            self._leases[old.lease].keys.discard(op.key)
        lease_id = op.lease.id if op.lease else 0
        if lease_id:
            self._leases[lease_id].keys.add(op.key)
        self._data[op.key] = _Entry(
            value=op.value,
            create_revision=old.create_revision if old else revision,
            mod_revision=revision,
            version=old.version + 1 if old else 1,
            lease=lease_id,
        )
        return WatchEvent(ChangeKind.PUT, op.key, op.value, revision)

    def _delete(self, key: str, revision: int) -> WatchEvent:
        old = self._data.pop(key)
        if old.lease and old.lease in self._leases:
            self._leases[old.lease].keys.discard(key)
        return WatchEvent(ChangeKind.DELETE, key, None, revision)

    # -- leases ----------------------------------------------------------------------------------

    async def grant_lease(self, ttl: int) -> Lease:
        if ttl < 1:
            raise ValueError(f"a lease TTL is at least 1 s, got {ttl}")
        await self._enter("grant_lease")
        lease_id = next(self._lease_ids)
        self._leases[lease_id] = _LeaseState(ttl, self.clock.monotonic() + ttl)
        return Lease(lease_id, ttl)

    async def refresh_lease(self, lease: Lease) -> int:
        await self._enter("refresh_lease")
        state = self._leases.get(lease.id)
        if state is None:
            raise LeaseExpired(f"memory refresh_lease: lease {lease.id:x} is gone")
        state.deadline = self.clock.monotonic() + state.ttl
        return state.ttl

    async def revoke_lease(self, lease: Lease) -> None:
        await self._enter("revoke_lease")
        self._revoke(lease.id)

    def _revoke(self, lease_id: int) -> None:
        state = self._leases.pop(lease_id, None)
        if state is not None:
            self._apply([Delete(k) for k in sorted(state.keys)])

    # -- watches ---------------------------------------------------------------------------------

    def watch(
        self, prefix: str, *, start_revision: int | None = None
    ) -> contextlib.AbstractAsyncContextManager[AsyncIterator[WatchEvent]]:
        return self._watch(prefix, start_revision)

    @contextlib.asynccontextmanager
    async def _watch(
        self, prefix: str, start_revision: int | None
    ) -> AsyncIterator[AsyncIterator[WatchEvent]]:
        await self._enter("watch")
        first = self._revision + 1 if start_revision is None else start_revision
        if first < self._compacted:
            raise Compacted(
                f"memory watch: the history before revision {self._compacted} is compacted",
                compact_revision=self._compacted,
            )
        watch = _MemoryWatch(prefix, first)
        for event in self._history:
            watch.offer(event)
        self._watches.add(watch)
        try:
            yield watch
        finally:
            self._watches.discard(watch)

    async def compact(self, revision: int) -> None:
        await self._enter("compact")
        if revision > self._revision:  # as etcd answers
            raise ValueError(f"memory compact: revision {revision} is in the future")
        if revision <= self._compacted:
            raise Compacted(f"memory compact: revision {revision} is compacted already")
        self._compacted = revision
        self._history = [e for e in self._history if e.mod_revision >= self._compacted]

    def _publish(self, events: Sequence[WatchEvent]) -> None:
        self._history.extend(events)
        for watch in self._watches:
            for event in events:
                watch.offer(event)

    def _break_watches(self, reason: str) -> None:
        for watch in self._watches:
            watch.fail(StoreUnavailable(f"memory watch: {reason}"))
        self._watches.clear()

    # -- lifecycle -------------------------------------------------------------------------------

    async def close(self) -> None:
        """Mark the store closed: later calls raise ``StoreUnavailable``, open watches break."""
        self._closed = True
        self._break_watches("the store is closed")


class UnreachableMemoryStore(MemoryStore):
    """A store that cannot be reached: every call raises ``StoreUnavailable`` until a test calls
    ``set_reachable(True)``."""

    def __init__(self, clock: Clock = SYSTEM_CLOCK) -> None:
        super().__init__(clock)
        self.set_reachable(False)


class _MemoryWatch:
    """The iterator of one memory watch: matching events from ``first`` on, or the error that
    broke it (raised on every later ``__anext__``)."""

    def __init__(self, prefix: str, first: int) -> None:
        self.prefix = prefix
        self.first = first
        self._queue: asyncio.Queue[WatchEvent | StoreUnavailable] = asyncio.Queue()
        self._error: StoreUnavailable | None = None

    def offer(self, event: WatchEvent) -> None:
        if event.key.startswith(self.prefix) and event.mod_revision >= self.first:
            self._queue.put_nowait(event)

    def fail(self, error: StoreUnavailable) -> None:
        self._queue.put_nowait(error)

    def __aiter__(self) -> _MemoryWatch:
        return self

    async def __anext__(self) -> WatchEvent:
        if self._error is not None:
            raise self._error
        item = await self._queue.get()
        if isinstance(item, StoreUnavailable):
            self._error = item
            raise item
        return item


def _compare(actual: bytes | int, op: str, operand: bytes | int) -> bool:
    if op == "==":
        return actual == operand
    if op == "!=":
        return actual != operand
    if op == "<":
        return actual < operand  # type: ignore[operator]
    return actual > operand  # type: ignore[operator]


def _reject_overlaps(ops: Sequence[Op]) -> None:
    """etcd refuses a transaction branch that writes one key twice (``duplicate key``)."""
    puts = [op.key for op in ops if isinstance(op, Put)]
    if len(set(puts)) != len(puts):
        raise ValueError("a transaction may not put the same key twice")
    for op in ops:
        if isinstance(op, Delete):
            hit = [k for k in puts if (k.startswith(op.key) if op.prefix else k == op.key)]
            if hit:
                raise ValueError(f"a transaction may not put and delete {hit[0]!r}")
