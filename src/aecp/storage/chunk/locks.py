"""Block locks of one replica: ``BlockLocks`` orders requests on overlapping blocks.

Reads share a block, mutations hold it alone; a request that must wait is granted in arrival
order relative to the waiters it overlaps (so a whole-replica lock, as compaction takes, is not
starved by a stream of small requests), while requests on other blocks pass it by.
"""

from __future__ import annotations

import asyncio
import collections


class BlockLocks:
    """Reader/writer locks over ranges of blocks ``[first, last)``."""

    def __init__(self) -> None:
        self._held: dict[int, int] = {}  # block -> readers (> 0) or -1 for a writer
        self._waiting: collections.deque[tuple[int, int, bool, asyncio.Future[None]]] = (
            collections.deque()
        )
        self._idle: list[asyncio.Future[None]] = []
        #: requests holding a lock
        self.active = 0

    def try_acquire(self, first: int, last: int, exclusive: bool) -> bool:
        """Take the lock if that needs no waiting."""
        if last - first == 1 and not self._waiting:
            n = self._held.get(first)
            if n is None or (n > 0 and not exclusive):
                self._held[first] = -1 if exclusive else (n or 0) + 1
                self.active += 1
                return True
            return False
        if self._conflicts(first, last, exclusive) or self._queued_over(first, last):
            return False
        self._take(first, last, exclusive)
        return True

    async def acquire(self, first: int, last: int, exclusive: bool) -> None:
        if self.try_acquire(first, last, exclusive):
            return
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        waiter = (first, last, exclusive, fut)
        self._waiting.append(waiter)
        try:
            await fut
        except asyncio.CancelledError:
            if fut.done() and not fut.cancelled():
                self.release(first, last, exclusive)
            else:
                if waiter in self._waiting:  # else ``_grant`` dropped it already
                    self._waiting.remove(waiter)
                self._grant()
            raise

    def release(self, first: int, last: int, exclusive: bool) -> None:
        held = self._held
        for b in range(first, last):
            n = held[b]
            if n == 1 or exclusive:
                del held[b]
            else:
                held[b] = n - 1
        self.active -= 1
        if self._waiting:
            self._grant()
        if self._idle and not self.active:
            idle, self._idle = self._idle, []
            for fut in idle:
                if not fut.done():
                    fut.set_result(None)

    async def drain(self) -> None:
        """Return once no request holds a lock (requests still waiting are not counted)."""
        while self.active:
            fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
            self._idle.append(fut)
            await fut

    def _take(self, first: int, last: int, exclusive: bool) -> None:
        held = self._held
        for b in range(first, last):
            held[b] = -1 if exclusive else held.get(b, 0) + 1
        self.active += 1

    def _conflicts(self, first: int, last: int, exclusive: bool) -> bool:
        held = self._held
        if not held:
            return False
        if last - first <= len(held):
            blocks = ((b, held.get(b)) for b in range(first, last))
        else:
            blocks = ((b, n) for b, n in held.items() if first <= b < last)
        return any(n is not None and (exclusive or n < 0) for _, n in blocks)

    def _queued_over(self, first: int, last: int) -> bool:
        return any(w[0] < last and first < w[1] for w in self._waiting)

    def _grant(self) -> None:
        ahead: list[tuple[int, int]] = []
        for waiter in list(self._waiting):
            first, last, exclusive, fut = waiter
            if fut.done():  # cancelled before its task could withdraw it
                self._waiting.remove(waiter)
                continue
            blocked = any(a < last and first < b for a, b in ahead)
            if blocked or self._conflicts(first, last, exclusive):
                ahead.append((first, last))
                continue
            self._waiting.remove(waiter)
            self._take(first, last, exclusive)
            fut.set_result(None)
