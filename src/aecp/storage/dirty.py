"""Which extents of an attached volume hold writes not yet made durable, and the order of
flushes: FLUSH answers only once every write acknowledged before it is durable.

An extent is added when a write to it *completes* (a write still in flight when a flush takes
the set is covered by the next flush). A flush takes the set and flushes those extents; it
answers only after every flush that began before it has ended too (the NBD client may send
FLUSH on several connections, and an earlier flush may still be working on the extents this
one found empty). A flush that fails or is cancelled puts its extents back into the set; a
flush that finds an earlier one did not succeed flushes the set again itself, so it answers
for every write acknowledged before it either way.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable


class DirtyExtents:
    def __init__(self) -> None:
        self._dirty: set[str] = set()
        self._running: set[asyncio.Future[bool]] = set()  # each flush's outcome, once known

    def add(self, ext_id: str) -> None:
        self._dirty.add(ext_id)

    def discard(self, ext_id: str) -> None:
        self._dirty.discard(ext_id)

    def __contains__(self, ext_id: object) -> bool:
        return ext_id in self._dirty

    async def flush(self, flush_one: Callable[[str], Awaitable[None]]) -> None:
        """Flush every dirty extent with ``flush_one``; return once they and every flush begun
        earlier are done (or, where one of those did not succeed, its extents flushed again
        here). Raises the first error of ``flush_one``."""
        dirty, self._dirty = self._dirty, set()
        earlier, mine = list(self._running), asyncio.get_running_loop().create_future()
        self._running.add(mine)
        ok = False
        try:
            results = await asyncio.gather(*map(flush_one, dirty), return_exceptions=True)
            outcomes = await asyncio.gather(*map(asyncio.shield, earlier))
            if not all(outcomes):
                again, self._dirty = self._dirty, set()  # back in the set: its extents too
                dirty |= again
                results += await asyncio.gather(*map(flush_one, again), return_exceptions=True)
            for result in results:
                if isinstance(result, BaseException):
                    raise result
            ok = True
        except BaseException:
            self._dirty |= dirty
            raise
        finally:
            mine.set_result(ok)
            self._running.discard(mine)
