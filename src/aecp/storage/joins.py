"""How one access point orders recovery copies and repairs against its own live writes, per
extent: the writes in flight, the copy lock of a copy or repair, and the replica joining.

A write either is counted in flight (``active``) or holds the copy lock that is *current*
(``copy_locks``). A join registers a copy lock for its whole length (``begin``), waits for the
writes in flight, and from then on live writes also go to the joining replica (``joining``); each
range is copied while the lock is held (``copy_range``), so a write waits for at most one range.
A write that waited on the lock of a join that has since ended looks again, so the next join
waits for it. A repair holds the lock once the writes have drained (``quiesced``). The
``VolumeDevice`` (``storage.access``) decides what the writes do; this class only orders them.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable

from aecp.storage.chunk.api import ReplicaClient


class Joins:
    """The ordering state of one access point's extents (see the module docstring)."""

    def __init__(self) -> None:
        self.active: dict[str, int] = {}  # writes in flight per extent
        self.copy_locks: dict[str, asyncio.Lock] = {}
        self.joining: dict[str, str] = {}  # extent -> the replica's node that joins it
        self.failed: set[str] = set()  # extents whose joiner failed a live write
        self.background: set[asyncio.Future[None]] = set()  # late join endings, write redos

    async def take(self, ext_id: str) -> tuple[asyncio.Lock, bool]:
        """Acquire the extent's current copy lock, registering a new one if there is none:
        (the lock, whether this call registered it). A lock acquired after its owner dropped
        it is released and the current one sought again. The caller releases the lock, and
        unregisters one it registered, when done."""
        while True:
            lock = self.copy_locks.get(ext_id)
            mine = lock is None
            if lock is None:
                lock = self.copy_locks[ext_id] = asyncio.Lock()
            try:
                await lock.acquire()
            except BaseException:
                if mine:
                    self.unregister(ext_id, lock)
                raise
            if self.copy_locks.get(ext_id) is lock:
                return lock, mine
            lock.release()

    def unregister(self, ext_id: str, lock: asyncio.Lock) -> None:
        if self.copy_locks.get(ext_id) is lock:
            del self.copy_locks[ext_id]

    async def drained(self, ext_id: str) -> None:
        while self.active.get(ext_id, 0):  # noqa: ASYNC110 - a few in-flight writes
            await asyncio.sleep(0.001)

    @contextlib.asynccontextmanager
    async def quiesced(self, ext_id: str, check: Callable[[], None]) -> AsyncIterator[None]:
        """Inside the block no write to the extent runs (they wait); ``check`` runs once the
        writes have drained (it raises if the caller may no longer go on)."""
        lock, mine = await self.take(ext_id)
        try:
            await self.drained(ext_id)
            check()
            yield
        finally:
            if mine:
                self.unregister(ext_id, lock)
            lock.release()

    async def begin(self, ext_id: str, node: str) -> None:
        """From now on live writes of the extent also go to ``node``; returns once every write
        that started before is done (so a copy listed afterwards misses nothing)."""
        lock, mine = await self.take(ext_id)
        try:
            await self.drained(ext_id)
        except BaseException:
            if mine:
                self.unregister(ext_id, lock)
            raise
        finally:
            lock.release()
        self.failed.discard(ext_id)
        self.joining[ext_id] = node

    async def copy_range(
        self,
        ext_id: str,
        src: ReplicaClient,
        dst: ReplicaClient,
        offset: int,
        length: int,
        epoch: int,
    ) -> None:
        """Copy whole blocks from ``src`` to ``dst`` while no live write touches the extent.
        The raw write carries the copier's ``epoch``: ``StaleEpoch`` if a newer access point
        claimed ``dst`` meanwhile, checked by the replica in the same step as the write. ``dst``
        is also fenced at ``epoch`` first: a server of an earlier version ignores the raw
        write's epoch, and the fence narrows the window there (a rolling upgrade)."""
        async with self.copy_locks[ext_id]:
            raw = await src.read_raw(ext_id, offset, length)
            await dst.fence(ext_id, epoch)
            await dst.write_raw(ext_id, raw, epoch)

    async def end(self, ext_id: str, admit: Callable[[], Awaitable[None]] | None) -> None:
        """Stop sending live writes to the joining replica; ``admit`` runs first, while no
        write can touch the extent. Ending a join that already ended does nothing."""
        if ext_id not in self.joining:
            return
        lock = self.copy_locks[ext_id]
        try:
            await lock.acquire()
        except BaseException:  # cancelled while a repair holds it: end the join after that
            later = asyncio.ensure_future(self._end_later(ext_id, lock))
            self.background.add(later)
            later.add_done_callback(self.background.discard)
            raise
        try:
            if admit is not None:
                await admit()
        finally:
            self._ended(ext_id, lock)

    async def _end_later(self, ext_id: str, lock: asyncio.Lock) -> None:
        await lock.acquire()
        self._ended(ext_id, lock)

    def _ended(self, ext_id: str, lock: asyncio.Lock) -> None:
        """The join that registered ``lock`` is over (``lock`` held): no more live writes to
        the joiner."""
        if self.copy_locks.get(ext_id) is lock:
            self.joining.pop(ext_id, None)
            self.failed.discard(ext_id)
            del self.copy_locks[ext_id]
        lock.release()
