"""Synchronisation for unit tests, which wait on events and never on wall-clock time."""

from __future__ import annotations

import asyncio

TURNS = 20


async def run_ready(turns: int = TURNS) -> None:
    """Let the other tasks run on until they block: ``turns`` turns of the event loop (each
    ``asyncio.sleep(0)`` lets every task that is ready take one step), never a wall-clock
    wait. For a blocking point that has no event of its own (a task queueing on a lock), to
    be used once an event showed that the task has no I/O left before it; and to show that
    something has *not* happened."""
    for _ in range(turns):
        await asyncio.sleep(0)
