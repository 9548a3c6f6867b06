"""Which extents of an attached volume hold writes not yet made durable, and the order of
flushes: FLUSH answers only once every write acknowledged before it is durable.

An extent is added when a write to it *completes* (a write still in flight when a flush takes
the set is covered by the next flush). A flush takes the set and flushes those extents; it
runs only after every flush that began before it has ended (the NBD client may send FLUSH on
several connections, and an earlier flush may still be working on the extents a concurrent one
would find clean): flushes run one at a time, each taking the set when its turn comes. A flush
that fails or is cancelled puts its extents back into the set, so the next one covers them.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable


class DirtyExtents:
    def __init__(self) -> None:
        self._dirty: set[str] = set()
        self._turn = asyncio.Lock()  # one flush at a time

    def add(self, ext_id: str) -> None:
        self._dirty.add(ext_id)

    def __contains__(self, ext_id: object) -> bool:
        return ext_id in self._dirty

    async def flush(self, flush_one: Callable[[str], Awaitable[None]]) -> None:
        """Flush, with ``flush_one``, every extent dirty when this flush's turn comes (after
        every flush begun earlier). Raises the first error of ``flush_one``."""
        async with self._turn:
            dirty, self._dirty = self._dirty, set()
            try:
                await asyncio.gather(*map(flush_one, dirty))
            except BaseException:
                self._dirty |= dirty
                raise
