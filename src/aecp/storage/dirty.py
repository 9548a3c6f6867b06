"""Which extents of an attached volume hold writes not yet made durable, and the order of
flushes: FLUSH answers only once every write acknowledged before it is durable.

An extent is added when a write to it *completes* (a write still in flight when a flush takes
the set is covered by the next flush). A flush takes the set and flushes those extents; it
answers only after every flush that began before it has ended too (the NBD client may send
FLUSH on several connections, and an earlier flush may still be working on the extents this
one found empty), and fails if any of them failed: the extents of a failed flush go back into
the set, so the client's next FLUSH covers them.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

from aecp.storage.blockdev import BlockError


class DirtyExtents:
    def __init__(self) -> None:
        self._dirty: set[str] = set()
        self._last: asyncio.Future[bool] | None = None  # outcome of the newest flush running

    def add(self, ext_id: str) -> None:
        self._dirty.add(ext_id)

    def discard(self, ext_id: str) -> None:
        self._dirty.discard(ext_id)

    def __contains__(self, ext_id: object) -> bool:
        return ext_id in self._dirty

    async def flush(self, flush_one: Callable[[str], Awaitable[None]]) -> None:
        """Flush every dirty extent with ``flush_one``; return once they and every flush begun
        earlier are done. Raises what ``flush_one`` raised, or ``BlockError`` if an earlier
        flush failed."""
        dirty, self._dirty = self._dirty, set()
        before, mine = self._last, asyncio.get_running_loop().create_future()
        self._last = mine
        ok = False
        try:
            await asyncio.gather(*(flush_one(x) for x in dirty))
            if before is not None and not await asyncio.shield(before):
                raise BlockError("an earlier flush failed; its writes are not durable yet")
            ok = True
        except BaseException:
            self._dirty |= dirty
            raise
        finally:
            mine.set_result(ok)
            if self._last is mine:
                self._last = None
