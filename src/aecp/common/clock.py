"""Injectable time: a monotonic clock and a sleep, so lease and timeout logic runs in virtual time
in tests."""

from __future__ import annotations

import asyncio
import time
from typing import Protocol


class Clock(Protocol):
    """What time-dependent code needs: a monotonic reading, wall time and an awaitable sleep."""

    def monotonic(self) -> float: ...

    def wall(self) -> float: ...

    async def sleep(self, seconds: float) -> None: ...


class SystemClock:
    """The real clock."""

    def monotonic(self) -> float:
        return time.monotonic()

    def wall(self) -> float:
        return time.time()

    async def sleep(self, seconds: float) -> None:
        await asyncio.sleep(seconds)


class FakeClock:
    """A clock that moves only when told (``advance``); ``sleep`` waits for virtual time."""

    def __init__(self, start: float = 1000.0) -> None:
        self.now = start
        self._waiters: list[tuple[float, asyncio.Future[None]]] = []

    def monotonic(self) -> float:
        return self.now

    def wall(self) -> float:
        return self.now

    async def sleep(self, seconds: float) -> None:
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiters.append((self.now + seconds, fut))
        await fut

    def sleeping(self) -> int:
        """How many sleeps are waiting (a test waits for the code under test to sleep)."""
        return sum(1 for _, fut in self._waiters if not fut.done())

    async def until_sleeping(self, count: int = 1) -> None:
        """Return once ``count`` sleeps are waiting (``AssertionError`` if the code under test
        never gets there while the event loop runs everything else)."""
        for _ in range(10_000):
            if self.sleeping() >= count:
                return
            await asyncio.sleep(0)
        raise AssertionError(f"nothing slept on the fake clock ({self.sleeping()} waiting)")

    async def advance(self, seconds: float) -> None:
        """Move time forward, waking every sleeper whose deadline has passed."""
        self.now += seconds
        due = [w for w in self._waiters if w[0] <= self.now]
        self._waiters = [w for w in self._waiters if w[0] > self.now]
        for _, fut in due:
            if not fut.done():
                fut.set_result(None)
        for _ in range(5):
            await asyncio.sleep(0)


SYSTEM_CLOCK = SystemClock()
