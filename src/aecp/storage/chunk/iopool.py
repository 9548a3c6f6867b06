"""Worker threads for the blocking disk I/O of the replica store.

``IoPool.submit`` runs a function in a thread and returns an asyncio future. It is cheaper than
``run_in_executor`` on the 4 KiB path: jobs go through a ``SimpleQueue`` and finished jobs are
handed back to the event loop in batches (one ``call_soon_threadsafe`` wakes the loop for every
job that finished meanwhile).

Each job may carry a ``done`` callback that runs on the event-loop thread when the function has
returned, *whether or not the awaiting coroutine was cancelled*: the store uses it to apply
metadata and release block locks, so a cancelled request never leaves a half-applied write.

Jobs given a ``lane`` run on that lane's single thread in submission order (the store sends every
metadata persistence job of a replica to one lane so journal appends stay ordered); the others
run on the shared threads in any order. A pool serves the one event loop that first used it.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import queue
import threading
from collections.abc import Callable
from typing import Any, TypeVar

log = logging.getLogger(__name__)

T = TypeVar("T")
Done = Callable[[Any, BaseException | None], None]


def complete(
    fut: asyncio.Future[Any] | None, done: Done | None, result: Any, exc: BaseException | None
) -> None:
    """An I/O finished: run ``done`` (its errors are logged, never raised), then settle
    ``fut`` unless there is none or it was cancelled. On the loop thread."""
    if done is not None:
        try:
            done(result, exc)
        except Exception:
            log.exception("I/O completion callback failed")
    if fut is None or fut.cancelled():
        return
    if exc is None:
        fut.set_result(result)
    else:
        fut.set_exception(exc)


_Job = tuple["asyncio.Future[Any]", Done | None, Callable[..., Any], tuple[Any, ...]]


class IoPool:
    """``threads`` shared workers plus ``lanes`` ordered single-thread lanes."""

    def __init__(self, threads: int, lanes: int, name: str = "chunk-io") -> None:
        if threads < 1 or lanes < 1:
            raise ValueError("an IoPool needs at least one thread and one lane")
        self._shared: queue.SimpleQueue[_Job | None] = queue.SimpleQueue()
        self._lanes: list[queue.SimpleQueue[_Job | None]] = [
            queue.SimpleQueue() for _ in range(lanes)
        ]
        self._finished: collections.deque[tuple[_Job, Any, BaseException | None]] = (
            collections.deque()
        )
        self._wakeup_pending = False
        self._loop: asyncio.AbstractEventLoop | None = None
        self._closed = False
        self._threads = [
            threading.Thread(target=self._work, args=(self._shared,), name=f"{name}-{i}")
            for i in range(threads)
        ] + [
            threading.Thread(target=self._work, args=(q,), name=f"{name}-lane{i}")
            for i, q in enumerate(self._lanes)
        ]
        for t in self._threads:
            t.daemon = True
            t.start()

    @property
    def lanes(self) -> int:
        return len(self._lanes)

    def submit(
        self,
        fn: Callable[..., T],
        *args: Any,
        done: Done | None = None,
        lane: int | None = None,
    ) -> asyncio.Future[T]:
        """Run ``fn(*args)`` in a worker; ``done(result, exception)`` then runs on the loop
        thread before the future resolves. Must be called from the thread of the event loop the
        pool serves (the loop of its first ``submit``; no check is made later, for speed)."""
        if self._closed:
            raise RuntimeError("IoPool is closed")
        loop = self._loop
        if loop is None:
            loop = self._loop = asyncio.get_running_loop()
        fut: asyncio.Future[T] = loop.create_future()
        q = self._shared if lane is None else self._lanes[lane % len(self._lanes)]
        q.put((fut, done, fn, args))
        return fut

    def _work(self, q: queue.SimpleQueue[_Job | None]) -> None:
        while (job := q.get()) is not None:
            try:
                result, exc = job[2](*job[3]), None
            except BaseException as e:  # handed to the awaiting coroutine
                result, exc = None, e
            self._finished.append((job, result, exc))
            if not self._wakeup_pending:
                self._wakeup_pending = True
                self._wake()

    def _wake(self) -> None:
        loop = self._loop
        try:
            if loop is not None:
                loop.call_soon_threadsafe(self._deliver)
        except RuntimeError:  # the loop is closed: nobody is left to deliver to
            self._wakeup_pending = False

    def _deliver(self) -> None:
        """On the loop thread: run ``done`` callbacks and resolve futures of finished jobs."""
        self._wakeup_pending = False
        finished = self._finished
        while finished:
            (fut, done, _, _), result, exc = finished.popleft()
            complete(fut, done, result, exc)

    async def close(self) -> None:
        """Let queued jobs finish, then stop the threads (idempotent)."""
        if self._closed:
            return
        self._closed = True
        for q in [self._shared] * (len(self._threads) - len(self._lanes)) + self._lanes:
            q.put(None)
        await asyncio.to_thread(self._join)
        self._deliver()

    def _join(self) -> None:
        for t in self._threads:
            t.join()
