"""ReplicaStore on a temporary directory: thin allocation, epochs, checksums, generations,
trim, persistence across close and crash, recovery copies, and request validation."""

from __future__ import annotations

import asyncio
import os
import sys
import tempfile
import textwrap
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from aecp.storage.chunk.api import RawBlocks
from aecp.storage.chunk.errors import (
    ChecksumError,
    ChunkInvalid,
    ChunkIOError,
    ExtentExists,
    ExtentNotFound,
    StaleEpoch,
)
from aecp.storage.chunk.locks import BlockLocks
from aecp.storage.chunk.replica import Replica
from aecp.storage.chunk.store import ReplicaStore
from aecp.storage.chunk.uring import ring_unavailable

KIB = 1024
MIB = 1024 * KIB
BLOCK = 256 * KIB
SECTOR = 4 * KIB


@pytest.fixture
def root(tmp_path: Path) -> Path:
    return tmp_path / "replicas"


@pytest.fixture(params=[True, False], ids=["uring-cached-reads", "threads-only"])
async def store(root: Path, request: pytest.FixtureRequest) -> AsyncIterator[ReplicaStore]:
    """The fast paths (io_uring writes where the kernel has it, page-cache reads on the loop)
    and the plain one (every I/O in a worker thread)."""
    s = ReplicaStore(root, cached_reads=request.param, uring=request.param)
    try:
        yield s
    finally:
        await s.close()


def require_ring() -> None:
    """The fast paths tested here exist only with io_uring, which this project's machines have
    (the thread fallback is tested in test_uring.py): its absence is a failure, not a skip."""
    if ring_unavailable():
        pytest.fail(f"io_uring is expected on this machine: {ring_unavailable()}")


def pattern(n: int, seed: int = 1) -> bytes:
    return bytes((i * 7 + seed) & 0xFF for i in range(n))


def flip_byte(path: Path, offset: int) -> None:
    with path.open("r+b") as f:
        f.seek(offset)
        b = f.read(1)
        f.seek(offset)
        f.write(bytes([b[0] ^ 0xFF]))


async def test_a_4k_write_to_a_64mib_extent_allocates_one_block(
    store: ReplicaStore, root: Path
) -> None:
    await store.create("e1", 64 * MIB)
    await store.write("e1", 10 * MIB, pattern(4 * KIB), epoch=1, generation=1)
    await store.flush("e1")
    st = await store.stat("e1")
    assert (st.size, st.allocated_bytes, st.valid_bytes) == (64 * MIB, BLOCK, 4 * KIB)
    data_file = root / "e1.data"
    assert data_file.stat().st_size == 64 * MIB
    assert data_file.stat().st_blocks * 512 <= BLOCK
    assert await store.read("e1", 10 * MIB, 4 * KIB) == pattern(4 * KIB)
    assert await store.read("e1", 0, 1 * MIB) == bytes(1 * MIB)
    assert await store.read("e1", 10 * MIB + 4 * KIB, 8 * KIB) == bytes(8 * KIB)


async def test_partial_sector_writes_merge_with_what_is_there(store: ReplicaStore) -> None:
    await store.create("e1", 4 * MIB)
    await store.write("e1", 0, pattern(8 * KIB), epoch=0, generation=1)
    await store.write("e1", 100, b"abc", epoch=0, generation=1)
    await store.write("e1", 8 * KIB - 2, b"WXYZ", epoch=0, generation=1)
    expected = bytearray(pattern(8 * KIB) + bytes(4 * KIB))
    expected[100:103] = b"abc"
    expected[8 * KIB - 2 : 8 * KIB + 2] = b"WXYZ"
    assert await store.read("e1", 0, 12 * KIB) == expected
    assert await store.read("e1", 99, 5) == bytes(expected[99:104])
    assert (await store.stat("e1")).valid_bytes == 12 * KIB


async def test_an_older_epoch_is_refused_and_changes_nothing(store: ReplicaStore) -> None:
    await store.create("e1", 4 * MIB, epoch=3)
    await store.write("e1", 0, pattern(4 * KIB), epoch=3, generation=1)
    for attempt in (
        store.write("e1", 0, b"x" * 4 * KIB, epoch=2, generation=9),
        store.trim("e1", 0, 4 * KIB, epoch=2, generation=9),
        store.write_zeroes("e1", 0, 4 * KIB, epoch=1, generation=9),
        store.fence("e1", 2),
        store.repair("e1", 0, b"x" * 4 * KIB, epoch=2),
        store.delete("e1", epoch=2),  # a leftover another access point fenced since
    ):
        with pytest.raises(StaleEpoch) as err:
            await attempt
        assert err.value.stored == 3
    assert await store.read("e1", 0, 4 * KIB) == pattern(4 * KIB)
    st = await store.stat("e1")
    assert (st.epoch, st.generation) == (3, 1)
    assert await store.modified_since("e1", 1) == []


async def test_a_newer_epoch_is_adopted_and_fences_the_old_one(store: ReplicaStore) -> None:
    await store.create("e1", 4 * MIB, epoch=1)
    await store.write("e1", 0, b"a" * 512, epoch=2, generation=1)
    assert (await store.stat("e1")).epoch == 2
    with pytest.raises(StaleEpoch):
        await store.write("e1", 0, b"b" * 512, epoch=1, generation=1)
    assert await store.fence("e1", 5) == 5
    assert await store.fence("e1", 5) == 5
    with pytest.raises(StaleEpoch):
        await store.write("e1", 0, b"c" * 512, epoch=4, generation=2)
    assert await store.read("e1", 0, 512) == b"a" * 512


async def test_fence_waits_for_writes_of_the_old_epoch_in_flight(store: ReplicaStore) -> None:
    await store.create("e1", 4 * MIB, epoch=1)
    writes = [
        asyncio.ensure_future(
            store.write("e1", i * BLOCK, pattern(BLOCK, i), epoch=1, generation=1)
        )
        for i in range(8)
    ]
    await asyncio.sleep(0)
    await store.fence("e1", 2)
    valid_when_fenced = (await store.stat("e1")).valid_bytes
    results = await asyncio.gather(*writes, return_exceptions=True)
    assert all(r is None or isinstance(r, StaleEpoch) for r in results)
    assert valid_when_fenced == BLOCK * sum(r is None for r in results)
    assert (await store.stat("e1")).valid_bytes == valid_when_fenced


async def test_a_flipped_byte_is_caught_by_read_and_scrub_and_fixed_by_repair(
    store: ReplicaStore, root: Path
) -> None:
    await store.create("e1", 4 * MIB)
    good = pattern(64 * KIB)
    await store.write("e1", BLOCK, good, epoch=0, generation=1)
    await store.flush()
    flip_byte(root / "e1.data", BLOCK + 5 * SECTOR + 17)
    bad_sector = (BLOCK + 5 * SECTOR) // SECTOR
    with pytest.raises(ChecksumError) as err:
        await store.read("e1", BLOCK, 64 * KIB)
    assert err.value.sectors == [bad_sector]
    assert await store.read("e1", BLOCK, 5 * SECTOR) == good[: 5 * SECTOR]
    with pytest.raises(ChecksumError):
        await store.write("e1", BLOCK + 5 * SECTOR + 1, b"z", epoch=0, generation=2)
    assert await store.scrub("e1") == [bad_sector]
    await store.repair("e1", bad_sector * SECTOR, good[5 * SECTOR : 6 * SECTOR])
    assert await store.scrub("e1") == []
    assert await store.read("e1", BLOCK, 64 * KIB) == good


async def test_modified_since_names_only_blocks_written_after_the_generation(
    store: ReplicaStore,
) -> None:
    await store.create("e1", 4 * MIB, generation=1)
    await store.write("e1", 0, b"a" * SECTOR, epoch=0, generation=1)
    await store.write("e1", 2 * BLOCK + 7, b"b", epoch=0, generation=2)
    await store.write("e1", 3 * BLOCK, b"c" * BLOCK, epoch=0, generation=3)
    await store.trim("e1", 9 * BLOCK, SECTOR, epoch=0, generation=3)
    assert await store.modified_since("e1", 0) == [
        (0, BLOCK),
        (2 * BLOCK, 2 * BLOCK),
        (9 * BLOCK, BLOCK),
    ]
    assert await store.modified_since("e1", 1) == [(2 * BLOCK, 2 * BLOCK), (9 * BLOCK, BLOCK)]
    assert await store.modified_since("e1", 2) == [(3 * BLOCK, BLOCK), (9 * BLOCK, BLOCK)]
    assert await store.modified_since("e1", 3) == []
    assert (await store.stat("e1")).generation == 3
    await store.set_generation("e1", 7)
    assert (await store.stat("e1")).generation == 7


async def test_a_trim_of_part_of_a_sector_never_written_still_raises_its_blocks_generation(
    store: ReplicaStore,
) -> None:
    # Only valid partial sectors were written with zeros, and only they raised their block's
    # modification generation: a replica behind that held data there kept it through a
    # catch-up from before the trim (the undo of a refused write relies on the raise).
    await store.create("e1", 4 * MIB, generation=1)
    await store.write("e1", 0, b"a" * SECTOR, epoch=0, generation=1)
    await store.trim("e1", 2 * BLOCK + 100, 200, epoch=0, generation=4)
    await store.trim("e1", SECTOR + 10, SECTOR, epoch=0, generation=5)  # two partial ones
    assert await store.modified_since("e1", 3) == [(0, BLOCK), (2 * BLOCK, BLOCK)]
    assert await store.modified_since("e1", 4) == [(0, BLOCK)]
    assert (await store.stat("e1")).generation == 5
    assert await store.allocation("e1") == [(0, SECTOR, True), (SECTOR, 4 * MIB - SECTOR, False)]


async def test_trim_frees_whole_blocks_and_zeroes_partial_sectors(
    store: ReplicaStore, root: Path
) -> None:
    await store.create("e1", 4 * MIB)
    await store.write("e1", 0, pattern(4 * BLOCK), epoch=0, generation=1)
    await store.flush()
    used = (root / "e1.data").stat().st_blocks
    await store.trim("e1", BLOCK, 2 * BLOCK, epoch=0, generation=2)
    await store.write_zeroes("e1", 3 * BLOCK + 10, 20, epoch=0, generation=2)
    st = await store.stat("e1")
    assert st.allocated_bytes == 2 * BLOCK
    assert st.valid_bytes == 2 * BLOCK
    assert (root / "e1.data").stat().st_blocks <= used - 2 * BLOCK // 512
    expected = bytearray(pattern(4 * BLOCK))
    expected[BLOCK : 3 * BLOCK] = bytes(2 * BLOCK)
    expected[3 * BLOCK + 10 : 3 * BLOCK + 30] = bytes(20)
    assert await store.read("e1", 0, 4 * BLOCK) == expected
    assert await store.allocation("e1") == [
        (0, BLOCK, True),
        (BLOCK, 2 * BLOCK, False),
        (3 * BLOCK, BLOCK, True),
        (4 * BLOCK, 4 * MIB - 4 * BLOCK, False),
    ]


async def test_metadata_survives_close_and_reopen(root: Path) -> None:
    async with ReplicaStore(root) as s:
        await s.create("e1", 4 * MIB, epoch=1)
        await s.write("e1", 3 * SECTOR, pattern(3 * BLOCK), epoch=4, generation=6)
        await s.trim("e1", 0, 4 * SECTOR, epoch=4, generation=7)
        before = await s.allocation("e1")
    async with ReplicaStore(root) as s:
        assert await s.list_extents() == ["e1"]
        st = await s.stat("e1")
        assert (st.epoch, st.generation, st.valid_bytes) == (4, 7, 3 * BLOCK - SECTOR)
        assert await s.allocation("e1") == before
        assert await s.read("e1", 4 * SECTOR, 3 * BLOCK - SECTOR) == pattern(3 * BLOCK)[SECTOR:]
        assert await s.modified_since("e1", 6) == [(0, BLOCK)]


async def run_killed(root: Path, body: str) -> None:
    """Run ``body`` (the inside of ``async def main()``, with ``s`` a store on ``root``)
    in a child process that then kills itself with SIGKILL."""
    lines = textwrap.indent(textwrap.dedent(body).strip(), "    ")
    child = (
        "import asyncio, os, signal\n"
        "from pathlib import Path\n"
        "from aecp.storage.chunk.store import ReplicaStore\n"
        "async def main():\n"
        f"    s = ReplicaStore(Path({str(root)!r}))\n"
        f"{lines}\n"
        "    os.kill(os.getpid(), signal.SIGKILL)\n"
        "asyncio.run(main())\n"
    )
    proc = await asyncio.create_subprocess_exec(sys.executable, "-c", child)
    assert await proc.wait() == -9


async def test_flushed_writes_survive_a_killed_process_without_checksum_errors(root: Path) -> None:
    """The child flushes some writes, overwrites and trims more without flushing, and is
    SIGKILLed: flushed data must be intact and nothing may fail its checksum."""
    await run_killed(
        root,
        """
        await s.create("e1", 4 * 1024 * 1024)
        await s.write("e1", 0, b"A" * 262144 * 4, epoch=1, generation=1)
        await s.flush()
        await s.write("e1", 0, b"B" * 262144, epoch=1, generation=2)
        await s.write("e1", 262144 + 100, b"C" * 10, epoch=1, generation=2)
        await s.trim("e1", 2 * 262144, 262144, epoch=1, generation=2)
        """,
    )
    async with ReplicaStore(root) as s:
        assert await s.scrub("e1") == []
        assert await s.read("e1", 3 * BLOCK, BLOCK) == b"A" * BLOCK
        assert await s.read("e1", 0, BLOCK) in (b"A" * BLOCK, b"B" * BLOCK)
        assert (await s.stat("e1")).epoch == 1


async def test_compaction_keeps_everything(root: Path) -> None:
    async with ReplicaStore(root) as s:
        await s.create("e1", 4 * MIB)
        rep = s._replicas["e1"]
        rep.compact_at = 1024  # compact at nearly every flush
        for i in range(40):
            await s.write("e1", (i * 37 % 1024) * SECTOR, pattern(SECTOR, i), epoch=0, generation=i)
            await s.flush("e1")
        expected = await s.read("e1", 0, 4 * MIB)
    async with ReplicaStore(root) as s:
        assert await s.read("e1", 0, 4 * MIB) == expected
        assert (await s.stat("e1")).generation == 39


async def test_raw_blocks_copy_data_valid_sectors_and_modgens(root: Path) -> None:
    async with ReplicaStore(root / "a") as a, ReplicaStore(root / "b") as b:
        await a.create("e1", 4 * MIB)
        await b.create("e1", 4 * MIB)
        await a.write("e1", 5 * SECTOR, pattern(3 * SECTOR), epoch=0, generation=4)
        await a.write("e1", 2 * BLOCK, pattern(BLOCK, 3), epoch=0, generation=5)
        await b.write("e1", 0, b"stale" * 1000, epoch=0, generation=1)
        await b.write("e1", 3 * BLOCK, b"stale" * 1000, epoch=0, generation=1)
        raw = await a.read_raw("e1", 0, 4 * BLOCK)
        assert len(raw.data) == 3 * SECTOR + BLOCK
        await b.write_raw("e1", raw)
        assert await b.read("e1", 0, 4 * MIB) == await a.read("e1", 0, 4 * MIB)
        assert await b.allocation("e1") == await a.allocation("e1")
        assert await b.modified_since("e1", 0) == await a.modified_since("e1", 0)
        with pytest.raises(ChunkInvalid):
            await b.write_raw("e1", RawBlocks(0, BLOCK, SECTOR, (1,), (0,), b""))


async def test_a_raw_copy_from_an_older_access_point_is_refused_by_the_replica(root: Path) -> None:
    """A raw write carried no epoch: an old copier's could reach a replica a newer access
    point had claimed (third review of the refused-write undo)."""
    async with ReplicaStore(root / "a") as a, ReplicaStore(root / "b") as b:
        await a.create("e1", 4 * MIB, epoch=3)
        await b.create("e1", 4 * MIB, epoch=3)
        await a.write("e1", 0, pattern(BLOCK, 1), epoch=3, generation=2)
        raw = await a.read_raw("e1", 0, BLOCK)
        await b.fence("e1", 5)  # a newer access point claimed b
        with pytest.raises(StaleEpoch):
            await b.write_raw("e1", raw, 4)
        assert await b.allocation("e1") == [(0, 4 * MIB, False)]
        await b.write_raw("e1", raw, 6)  # a newer epoch is taken, as for a write
        assert (await b.stat("e1")).epoch == 6
        assert await b.read("e1", 0, BLOCK) == pattern(BLOCK, 1)


async def test_concurrent_overlapping_writes_keep_checksums_consistent(store: ReplicaStore) -> None:
    await store.create("e1", 4 * MIB)
    writes = [
        store.write("e1", 1000 + i * 3, pattern(6000, i), epoch=0, generation=1) for i in range(50)
    ]
    await asyncio.gather(*writes)
    assert await store.scrub("e1") == []
    assert len(await store.read("e1", 0, 16 * KIB)) == 16 * KIB


async def test_a_cancelled_write_leaves_data_and_checksums_in_step(store: ReplicaStore) -> None:
    await store.create("e1", 4 * MIB)
    for i in range(20):
        task = asyncio.ensure_future(store.write("e1", 0, pattern(BLOCK, i), epoch=0, generation=1))
        await asyncio.sleep(0)
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
    assert await store.scrub("e1") == []


async def test_create_is_idempotent_and_delete_removes_everything(
    store: ReplicaStore, root: Path
) -> None:
    await store.create("e1", 4 * MIB)
    await store.create("e1", 4 * MIB)
    with pytest.raises(ExtentExists):
        await store.create("e1", 8 * MIB)
    await store.create("e2", 4 * MIB)
    assert await store.list_extents() == ["e1", "e2"]
    assert await store.exists("e1")
    await store.delete("e1")
    assert not await store.exists("e1")
    assert sorted(p.name for p in root.iterdir()) == ["e2.data", "e2.jrnl", "e2.meta"]
    for call in (store.stat("e1"), store.read("e1", 0, 1), store.delete("e1")):
        with pytest.raises(ExtentNotFound):
            await call


async def test_a_replica_with_damaged_metadata_is_reported_and_can_be_deleted(root: Path) -> None:
    async with ReplicaStore(root) as s:
        await s.create("e1", 4 * MIB)
        await s.create("e2", 4 * MIB)
    flip_byte(root / "e1.meta", 60)
    async with ReplicaStore(root) as s:
        with pytest.raises(ChunkIOError):
            await s.stat("e1")
        assert (await s.stat("e2")).size == 4 * MIB
        await s.delete("e1")
        assert await s.list_extents() == ["e2"]
        with pytest.raises(ExtentNotFound):
            await s.delete("e1")


@pytest.mark.parametrize(
    ("offset", "length"), [(-1, 10), (4 * MIB - 1, 2), (4 * MIB + 1, 0), (0, -5)]
)
async def test_out_of_range_requests_are_refused_and_change_nothing(
    store: ReplicaStore, offset: int, length: int
) -> None:
    await store.create("e1", 4 * MIB)
    await store.write("e1", 0, b"x" * SECTOR, epoch=0, generation=1)
    with pytest.raises(ChunkInvalid):
        await store.read("e1", offset, length)
    with pytest.raises(ChunkInvalid):
        await store.trim("e1", offset, length, epoch=0, generation=2)
    if length >= 0:
        with pytest.raises(ChunkInvalid):
            await store.write("e1", offset, b"y" * length, epoch=0, generation=2)
    assert await store.read("e1", 0, SECTOR) == b"x" * SECTOR
    assert (await store.stat("e1")).generation == 1


@pytest.mark.parametrize("bad_id", ["", "UPPER", "a/b", "../e", "x" * 65, "e.1", "é"])
async def test_bad_extent_ids_are_refused(store: ReplicaStore, bad_id: str) -> None:
    with pytest.raises(ChunkInvalid):
        await store.create(bad_id, 4 * MIB)
    with pytest.raises(ChunkInvalid):
        await store.read(bad_id, 0, 1)
    assert await store.list_extents() == []


@pytest.mark.parametrize("size", [0, -BLOCK, BLOCK + 1, 100])
async def test_bad_sizes_and_versions_are_refused(store: ReplicaStore, size: int) -> None:
    with pytest.raises(ChunkInvalid):
        await store.create("e1", size)
    await store.create("e2", BLOCK)
    with pytest.raises(ChunkInvalid):
        await store.write("e2", 0, b"x", epoch=-1, generation=0)
    with pytest.raises(ChunkInvalid):
        await store.repair("e2", 1, b"x" * SECTOR)
    with pytest.raises(ChunkInvalid):
        await store.read_raw("e2", SECTOR, BLOCK - SECTOR)
    assert await store.list_extents() == ["e2"]


def test_a_bad_geometry_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ChunkInvalid):
        ReplicaStore(tmp_path, block_size=1024 * KIB, sector=4 * KIB)
    with pytest.raises(ChunkInvalid):
        ReplicaStore(tmp_path, block_size=256 * KIB, sector=3000)


REGION = 1 * MIB

op_strategy = st.tuples(
    st.sampled_from(["write", "trim", "zero", "read"]),
    st.integers(0, REGION - 1),
    st.integers(0, 70_000),
    st.integers(0, 255),
)


@settings(max_examples=25, deadline=None)
@given(st.lists(st.lists(op_strategy, min_size=1, max_size=4), max_size=8), st.booleans())
def test_random_concurrent_operations_match_a_simple_model(
    batches: list[list[tuple[str, int, int, int]]], reopen: bool
) -> None:
    """Batches of operations on disjoint 1 MiB regions run concurrently; afterwards (and after
    a close and reopen) the replica reads exactly like a bytearray that got the same changes."""
    asyncio.run(_run_model(batches, reopen))


async def _run_model(batches: list[list[tuple[str, int, int, int]]], reopen: bool) -> None:
    model = bytearray(4 * MIB)
    with tempfile.TemporaryDirectory() as tmp:
        store = ReplicaStore(Path(tmp))
        try:
            await store.create("e1", 4 * MIB)
            for generation, batch in enumerate(batches, 1):
                calls = []
                for region, (kind, offset, length, seed) in enumerate(batch):
                    start = region * REGION + offset
                    length = min(length, (region + 1) * REGION - start)
                    calls.append(_apply(store, model, kind, start, length, seed, generation))
                await asyncio.gather(*calls)
            if reopen:
                await store.close()
                store = ReplicaStore(Path(tmp))
            assert await store.read("e1", 0, 4 * MIB) == model
            assert await store.scrub("e1") == []
        finally:
            await store.close()


async def _apply(
    store: ReplicaStore, model: bytearray, kind: str, offset: int, length: int, seed: int, gen: int
) -> None:
    if kind == "write":
        data = pattern(length, seed)
        await store.write("e1", offset, data, epoch=0, generation=gen)
        model[offset : offset + length] = data
    elif kind in ("trim", "zero"):
        call = store.trim if kind == "trim" else store.write_zeroes
        await call("e1", offset, length, epoch=0, generation=gen)
        model[offset : offset + length] = bytes(length)
    else:
        assert await store.read("e1", offset, length) == model[offset : offset + length]


async def test_block_locks_grant_overlapping_waiters_in_arrival_order() -> None:
    locks = BlockLocks()
    await locks.acquire(0, 1, False)
    order: list[str] = []

    async def take(first: int, last: int, exclusive: bool, name: str) -> None:
        await locks.acquire(first, last, exclusive)
        order.append(name)

    writer = asyncio.ensure_future(take(0, 4, True, "writer"))
    await asyncio.sleep(0)
    reader = asyncio.ensure_future(take(0, 1, False, "reader"))
    other = asyncio.ensure_future(take(5, 6, True, "other"))
    await asyncio.sleep(0)
    assert order == ["other"]
    locks.release(0, 1, False)
    await writer
    assert order == ["other", "writer"]
    locks.release(0, 4, True)
    await asyncio.gather(reader, other)
    assert order == ["other", "writer", "reader"]
    assert locks.active == 2


async def test_a_waiter_cancelled_as_the_lock_is_released_is_skipped() -> None:
    locks = BlockLocks()
    await locks.acquire(0, 1, True)
    first = asyncio.ensure_future(locks.acquire(0, 1, True))
    second = asyncio.ensure_future(locks.acquire(0, 1, True))
    await asyncio.sleep(0)
    first.cancel()  # its task has not run yet when the holder releases
    locks.release(0, 1, True)
    await second
    assert first.cancelled()
    assert locks.active == 1
    locks.release(0, 1, True)
    assert locks.active == 0


async def test_write_nowait_starts_only_writes_that_need_no_waiting(root: Path) -> None:
    require_ring()
    store = ReplicaStore(root)
    try:
        await store.create("e1", 4 * MIB, epoch=3)
        assert store.write_nowait("e1", 0, pattern(SECTOR), epoch=3, generation=1) is None, (
            "a block never written needs its INTENT record first"
        )
        await store.write("e1", 0, pattern(SECTOR), epoch=3, generation=1)
        declined = [
            ("e1", 512, pattern(SECTOR), 3),  # not sector-aligned
            ("e1", 0, pattern(1000), 3),  # not whole sectors
            ("e1", 0, pattern(SECTOR), 2),  # an older epoch: ``write`` raises StaleEpoch
            ("e1", 0, pattern(SECTOR), 4),  # a newer one: ``write`` persists it first
            ("e1", 4 * MIB, pattern(SECTOR), 3),  # past the end
            ("nope", 0, pattern(SECTOR), 3),  # no such replica
        ]
        for ext, offset, data, epoch in declined:
            assert store.write_nowait(ext, offset, data, epoch=epoch, generation=2) is None
        assert await store.read("e1", 0, SECTOR) == pattern(SECTOR)
        assert await store.modified_since("e1", 1) == []

        first = store.write_nowait("e1", SECTOR, pattern(SECTOR, 2), epoch=3, generation=2)
        assert first is not None
        # the same block is locked until the first write completes
        assert store.write_nowait("e1", 0, pattern(SECTOR, 3), epoch=3, generation=2) is None
        await first
        second = store.write_nowait("e1", 0, pattern(SECTOR, 3), epoch=3, generation=2)
        assert second is not None
        await second
        assert await store.read("e1", 0, 2 * SECTOR) == pattern(SECTOR, 3) + pattern(SECTOR, 2)
        assert await store.modified_since("e1", 1) == [(0, BLOCK)]
        assert await store.scrub("e1") == []
    finally:
        await store.close()


async def two_blocks_written(s: ReplicaStore) -> Replica:
    """Extent e1 with one sector written in each of blocks 0 and 1 (so INTENT-logged)."""
    require_ring()
    await s.create("e1", 4 * MIB)
    for block in (0, 1):
        await s.write("e1", block * BLOCK, pattern(SECTOR), epoch=0, generation=1)
    return s._replicas["e1"]


async def test_blocks_being_written_stay_on_the_fast_path_across_a_compaction(
    root: Path,
) -> None:
    """A compaction keeps INTENT records for the blocks written since the previous one, so
    writes to them need no new INTENT (``write_nowait`` takes them); a block left alone for a
    whole cycle drops out; a clean close keeps none (a clean load re-verifies nothing)."""
    async with ReplicaStore(root) as s:
        rep = await two_blocks_written(s)
        rep.compact_at = 0  # every flush compacts
        await s.flush("e1")
        assert rep.touched == {0, 1}
        started = s.write_nowait("e1", 0, pattern(SECTOR, 2), epoch=0, generation=2)
        assert started is not None, "written in the last cycle: still INTENT-logged"
        await started
        await s.flush("e1")  # block 1 was not written in this cycle
        assert rep.touched == {0}
        assert s.write_nowait("e1", BLOCK, pattern(SECTOR, 3), epoch=0, generation=3) is None
        assert await s.read("e1", 0, SECTOR) == pattern(SECTOR, 2)
    async with ReplicaStore(root) as s:
        assert await s.read("e1", 0, SECTOR) == pattern(SECTOR, 2)
        assert s._replicas["e1"].touched == set()


async def test_two_flushes_that_both_find_a_long_journal_compact_once(root: Path) -> None:
    async with ReplicaStore(root) as s:
        rep = await two_blocks_written(s)
        await s.flush("e1")
        rep.compact_at = rep.journal_size  # the next flush compacts
        serial = rep.meta.serial
        await s.write("e1", BLOCK, pattern(SECTOR, 3), epoch=0, generation=2)  # to flush
        in_flight = s.write_nowait("e1", 0, pattern(SECTOR, 2), epoch=0, generation=2)
        assert in_flight is not None  # holds block 0: both compactions wait for its lock
        await asyncio.gather(s.flush("e1"), s.flush("e1"), in_flight)
        assert rep.meta.serial == serial + 1, "the second found the journal short again"
        assert rep.touched == {0, 1}, "and kept what the first carried over"


async def test_a_crash_after_a_write_into_a_carried_block_loses_no_checksum(root: Path) -> None:
    """The child compacts (keeping block 0's INTENT), overwrites block 0 on the fast path
    without a flush, and is SIGKILLed: loading re-verifies block 0, so no checksum error."""
    await run_killed(
        root,
        """
        await s.create("e1", 4 * 1024 * 1024)
        await s.write("e1", 0, b"A" * 262144, epoch=1, generation=1)
        s._replicas["e1"].compact_at = 0
        await s.flush()
        fut = s.write_nowait("e1", 0, b"B" * 8192, epoch=1, generation=2)
        assert fut is not None
        await fut
        """,
    )
    async with ReplicaStore(root) as s:
        assert await s.scrub("e1") == []
        assert await s.read("e1", 0, 3 * SECTOR) == b"B" * 8192 + b"A" * SECTOR


async def test_a_failed_write_nowait_raises_chunk_io_error_and_fails_the_replica(
    root: Path,
) -> None:
    require_ring()
    store = ReplicaStore(root)
    try:
        await store.create("e1", 4 * MIB)
        await store.write("e1", 0, pattern(SECTOR), epoch=0, generation=1)
        rep = store._replicas["e1"]
        good_fd = rep.data_fd
        rep.data_fd = os.open(os.devnull, os.O_RDONLY)  # writes to it fail with EBADF
        try:
            started = store.write_nowait("e1", 0, pattern(SECTOR, 9), epoch=0, generation=2)
            assert started is not None
            with pytest.raises(ChunkIOError):
                await started
        finally:
            os.close(rep.data_fd)
            rep.data_fd = good_fd
        assert rep.failed
        assert store.write_nowait("e1", 0, pattern(SECTOR), epoch=0, generation=3) is None
        with pytest.raises(ChunkIOError):
            await store.write("e1", 0, pattern(SECTOR), epoch=0, generation=3)
        assert await store.read("e1", 0, SECTOR) == pattern(SECTOR)
    finally:
        await store.close()


async def test_read_nowait_answers_from_the_page_cache_or_leaves_it_to_read(root: Path) -> None:
    store = ReplicaStore(root)
    try:
        await store.create("e1", 4 * MIB)
        assert store.read_nowait("e1", 0, SECTOR) == bytes(SECTOR), "never written: zeros"
        await store.write("e1", 0, pattern(2 * SECTOR), epoch=0, generation=1)
        await store.flush("e1")
        assert store.read_nowait("e1", 100, SECTOR) == pattern(2 * SECTOR)[100 : 100 + SECTOR]
        for ext, offset, length in (("nope", 0, 1), ("e1", -1, 1), ("e1", 4 * MIB - 1, 2)):
            assert store.read_nowait(ext, offset, length) is None
        # a block being written is left to ``read``, which waits for the write
        started = store.write_nowait("e1", 0, pattern(SECTOR, 5), epoch=0, generation=2)
        if started is not None:
            assert store.read_nowait("e1", 0, SECTOR) is None
            await started
        await store.close()
        flip_byte(
            root / "e1.data" if (root / "e1.data").exists() else next(root.rglob("e1.data")), 10
        )
        store = ReplicaStore(root)
        assert store.read_nowait("e1", 0, SECTOR) is None, "not loaded yet: left to read"
        with pytest.raises(ChecksumError):
            await store.read("e1", 0, SECTOR)
        assert store.read_nowait("e1", 0, SECTOR) is None, "a bad checksum is left to read"
    finally:
        await store.close()
