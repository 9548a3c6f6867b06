"""FLUSH on an access point: it answers only once every write acknowledged before it is
durable, also while another FLUSH is in flight, and an extent reclaimed since it was written
does not make every later FLUSH fail."""

from __future__ import annotations

import asyncio

import pytest

from aecp.storage.blockdev import BlockError
from aecp.storage.dirty import DirtyExtents
from aecp.storage.snapshots import SnapshotService
from tests.unit._sync import run_ready
from tests.unit.abskit import EXTENT, Cluster


async def test_a_flush_waits_for_the_flush_in_flight_before_it(cluster: Cluster) -> None:
    await cluster.meta.create_volume("v", EXTENT, replicas=1)
    dev = await cluster.open("v")
    await dev.write(0, b"a" * 4096)  # acknowledged: its extent is dirty
    gate = cluster.replicas["n1"].gate("flush")
    first = asyncio.ensure_future(dev.flush())  # e.g. FLUSH on one NBD connection
    await gate.entered.wait()  # it took the dirty extent and flushes it
    second = asyncio.ensure_future(dev.flush())  # another connection's, sent after the ack
    await run_ready()  # nothing to do but wait for the first: no I/O before that
    assert not second.done(), "answered while the acknowledged write is not durable yet"
    gate.open()
    await asyncio.gather(first, second)
    assert gate.calls >= 1


async def test_a_flush_after_a_failed_flush_in_flight_fails_too_if_it_fails_again(
    cluster: Cluster,
) -> None:
    await cluster.meta.create_volume("v", EXTENT, replicas=1)
    dev = await cluster.open("v")
    await dev.write(0, b"a" * 4096)
    replica = cluster.replicas["n1"]
    gate = replica.gate("flush")
    replica.fail("flush", OSError(5, "Input/output error"))
    first = asyncio.ensure_future(dev.flush())
    await gate.entered.wait()
    second = asyncio.ensure_future(dev.flush())
    await run_ready()  # the second waits for the first
    assert not second.done()
    gate.open()
    results = await asyncio.gather(first, second, return_exceptions=True)
    assert all(isinstance(r, BaseException) for r in results), results
    replica.heal("flush")
    await dev.flush()  # the failed extent is still dirty: this one makes it durable


async def test_a_flush_after_a_copy_on_write_of_a_reclaimed_extent_succeeds(
    cluster: Cluster,
) -> None:
    s = SnapshotService(cluster.meta, cluster.pool)
    await cluster.meta.create_volume("v", EXTENT, replicas=2)
    dev = await cluster.open("v", "n1")
    await dev.write(0, b"0" * EXTENT)  # dirty, not flushed
    await s.snapshot("v", "s", paused_on="n1")
    await s.delete("v", "s")
    await dev.write(0, b"a" * 4096)  # copies on write; the old extent is reclaimed
    for _ in range(2):
        await dev.flush()
    assert await dev.read(0, 8192) == b"a" * 4096 + b"0" * 4096


async def test_flushing_a_fenced_access_point_fails(cluster: Cluster) -> None:
    await cluster.meta.create_volume("v", EXTENT, replicas=1)
    dev = await cluster.open("v", "n1")
    await dev.write(0, b"a" * 4096)
    await cluster.open("v", "n2", takeover=True)
    with pytest.raises(BlockError):
        await dev.write(0, b"b" * 4096)
    with pytest.raises(BlockError):
        await dev.flush()


async def test_a_flush_after_a_cancelled_one_flushes_what_that_one_left() -> None:
    dirty, gate, flushed = DirtyExtents(), asyncio.Event(), []
    dirty.add("x")

    async def flush_one(ext_id: str) -> None:
        await gate.wait()
        flushed.append(ext_id)

    first = asyncio.ensure_future(dirty.flush(flush_one))
    await asyncio.sleep(0)
    dirty.add("y")
    second = asyncio.ensure_future(dirty.flush(flush_one))
    await asyncio.sleep(0)
    first.cancel()
    gate.set()
    with pytest.raises(asyncio.CancelledError):
        await first
    await second  # nothing failed: it answers, having flushed x as well
    assert sorted(flushed) == ["x", "y"] and "x" not in dirty


async def test_a_flush_covers_what_a_failed_flush_before_it_put_back() -> None:
    dirty, fail_first, calls = DirtyExtents(), asyncio.Event(), []

    async def flush_one(ext_id: str) -> None:
        calls.append(ext_id)
        if calls.count("a") == 1 and ext_id == "a":
            await fail_first.wait()
            raise OSError(5, "Input/output error")

    dirty.add("a")  # a write acknowledged before both FLUSHes
    first = asyncio.ensure_future(dirty.flush(flush_one))
    await asyncio.sleep(0)
    dirty.add("b")
    second = asyncio.ensure_future(dirty.flush(flush_one))
    await asyncio.sleep(0)
    fail_first.set()
    with pytest.raises(OSError):
        await first
    await second
    assert calls.count("a") == 2 and "a" not in dirty  # the second made `a` durable itself
