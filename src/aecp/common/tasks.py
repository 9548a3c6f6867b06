"""Guarded background tasks: every long-lived asyncio task is created here, named, and an
unexpected exit is logged instead of vanishing."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Coroutine
from typing import Any

log = logging.getLogger(__name__)

_LIVE: set[asyncio.Task[Any]] = set()


def spawn(coro: Coroutine[Any, Any, Any], name: str) -> asyncio.Task[Any]:
    """Start ``coro`` as a task called ``name``; log if it ends with an exception.

    The task is referenced until done, so it is never garbage-collected mid-flight.
    """
    task = asyncio.get_running_loop().create_task(coro, name=name)
    _LIVE.add(task)
    task.add_done_callback(_finished)
    return task


def _finished(task: asyncio.Task[Any]) -> None:
    _LIVE.discard(task)
    if task.cancelled():
        return
    exc = task.exception()
    if exc is not None:
        log.error("task %s died: %r", task.get_name(), exc, exc_info=exc)


async def cancel(*tasks: asyncio.Task[Any] | None) -> None:
    """Cancel the given tasks and wait until they are done (never raises their errors)."""
    live = [t for t in tasks if t is not None and not t.done()]
    for t in live:
        t.cancel()
    if live:
        await asyncio.gather(*live, return_exceptions=True)
