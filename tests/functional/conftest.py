"""The functional tier: a whole cluster in one event loop — node agents' control loops,
reconcilers and job runners, the controllers, the API — on the memory store, the fake
hypervisor and the fake clock, with real ABS metadata and in-process replica stores. Passes
are driven by the test, so every interleaving is deterministic; no test sleeps. A test that
leaves a task running fails."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest

from tests.unit.abskit import cluster as cluster
from tests.unit.conftest import clock as clock
from tests.unit.conftest import images_dir as images_dir
from tests.unit.conftest import store as store


@pytest.fixture(autouse=True)
async def no_leaked_tasks() -> AsyncIterator[None]:
    """Fail the test if a task it started is still running when it ends."""
    before = asyncio.all_tasks()
    yield
    await asyncio.sleep(0)  # let tasks that were just cancelled finish
    leaked = [
        t for t in asyncio.all_tasks() - before if not t.done() and t is not asyncio.current_task()
    ]
    for t in leaked:
        t.cancel()
    await asyncio.gather(*leaked, return_exceptions=True)
    assert not leaked, f"tasks left running: {sorted(t.get_name() for t in leaked)}"
