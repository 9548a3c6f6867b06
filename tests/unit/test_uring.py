"""``Ring`` (io_uring through raw system calls) against real files: writes and reads of any
buffer, short transfers, errors, cancellation, closing; and the fallback when it is missing."""

from __future__ import annotations

import asyncio
import errno
import os
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from aecp.storage.chunk import uring
from aecp.storage.chunk.diskio import WRITE_PIECE, pieces, pwrite_all
from aecp.storage.chunk.store import ReplicaStore
from aecp.storage.chunk.uring import Ring, ring_unavailable

AVAILABLE = not ring_unavailable()


@pytest.fixture
async def ring() -> AsyncIterator[Ring]:
    if not AVAILABLE:  # the store then uses threads: see the last test
        pytest.fail(f"io_uring is expected on this machine: {ring_unavailable()}")
    r = Ring(entries=8)
    try:
        yield r
    finally:
        await r.close()


@pytest.fixture
def fd(tmp_path: Path) -> Iterator[int]:
    fd = os.open(tmp_path / "f", os.O_RDWR | os.O_CREAT, 0o600)
    os.truncate(fd, 1 << 20)
    yield fd
    os.close(fd)


async def test_writes_of_bytes_and_memoryviews_read_back(ring: Ring, fd: int) -> None:
    data = os.urandom(64 * 1024)
    assert await ring.pwrite(fd, data, 4096) == len(data)
    view = memoryview(b"abcdefgh" * 1024)[8:4104]
    await ring.pwrite(fd, view, 200_000)
    assert os.pread(fd, len(data), 4096) == data
    assert os.pread(fd, 4096, 200_000) == bytes(view)
    buf = bytearray(len(data))
    assert await ring.pread(fd, buf, 4096) == len(data)
    assert bytes(buf) == data


async def test_more_requests_than_ring_entries_all_complete(ring: Ring, fd: int) -> None:
    blocks = [os.urandom(4096) for _ in range(100)]  # the ring has 8 entries, 16 completions
    await asyncio.gather(*(ring.pwrite(fd, b, i * 4096) for i, b in enumerate(blocks)))
    assert os.pread(fd, 100 * 4096, 0) == b"".join(blocks)


def test_pieces_are_cut_at_multiples_of_the_piece_size_in_the_file() -> None:
    p = WRITE_PIECE
    assert pieces(0, p) == [(0, p)]
    assert pieces(p, 2 * p) == [(0, p), (p, 2 * p)]
    assert pieces(p - 512, 1024) == [(0, 512), (512, 1024)]
    assert pieces(4096, 2 * p) == [(0, p - 4096), (p - 4096, 2 * p - 4096), (2 * p - 4096, 2 * p)]
    assert pieces(0, 0) == []


async def test_a_long_write_goes_in_pieces_and_completes_once(
    ring: Ring, fd: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    submitted: list[int] = []
    submit = ring._submit
    monkeypatch.setattr(ring, "_submit", lambda rec: (submitted.append(rec.length), submit(rec)))
    data = os.urandom(3 * WRITE_PIECE)  # 4 pieces from offset 4096
    seen: list[object] = []
    assert await ring.pwrite(fd, data, 4096, done=lambda r, e: seen.append(r)) == len(data)
    assert seen == [len(data)]
    assert submitted == [WRITE_PIECE - 4096, WRITE_PIECE, WRITE_PIECE, 4096]
    assert os.pread(fd, len(data), 4096) == data
    writes = [ring.pwrite(fd, os.urandom(3 * WRITE_PIECE), i * 3 * WRITE_PIECE) for i in range(5)]
    assert await asyncio.gather(*writes) == [3 * WRITE_PIECE] * 5  # 15 pieces, 8 entries


async def test_a_long_write_that_fails_reports_one_error(ring: Ring, fd: int) -> None:
    seen: list[object] = []
    ro = os.open(f"/proc/self/fd/{fd}", os.O_RDONLY)
    try:
        with pytest.raises(OSError) as info:
            await ring.pwrite(ro, bytes(3 * WRITE_PIECE), 0, done=lambda r, e: seen.append(e))
    finally:
        os.close(ro)
    assert info.value.errno == errno.EBADF
    assert seen == [info.value]


@pytest.mark.parametrize("error", [errno.EAGAIN, errno.ENOMEM])
async def test_a_long_write_survives_a_failed_submission(
    ring: Ring, fd: int, monkeypatch: pytest.MonkeyPatch, error: int
) -> None:
    """More pieces than ring entries, and the kernel refuses the first submission: starting
    the write never fails half-way, no entry is overwritten, and the write completes once."""
    real, calls = uring._sys, [0]

    def refuse_once(number: int, *args: object) -> int:
        if number == uring._SYS_ENTER:
            calls[0] += 1
            if calls[0] == 1:
                raise OSError(error, "refused by the test")
        return real(number, *args)

    monkeypatch.setattr(uring, "_sys", refuse_once)
    data = bytearray(os.urandom(12 * WRITE_PIECE))  # 12 pieces, 8 entries
    seen: list[object] = []
    write = ring.pwrite(fd, data, 0, done=lambda r, e: seen.append(r))
    assert await asyncio.wait_for(write, 30) == len(data)  # an overwritten entry: never
    assert seen == [len(data)]
    assert os.pread(fd, len(data), 0) == data
    data.extend(b"x")  # released: a pinned bytearray cannot be resized


async def test_submissions_refused_for_good_fail_what_is_queued(
    ring: Ring, fd: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A kernel that keeps refusing (not EAGAIN) gets a few retries, then every queued
    operation fails with its error; the ring then works again."""
    real, refusing = uring._sys, [True]

    def refuse(number: int, *args: object) -> int:
        if number == uring._SYS_ENTER and refusing[0]:
            raise OSError(errno.ENOMEM, "refused by the test")
        return real(number, *args)

    monkeypatch.setattr(uring, "_sys", refuse)
    monkeypatch.setattr(uring, "_RETRY_S", 0.001)
    monkeypatch.setattr(uring, "_MAX_FAILURES", 3)
    writes = [ring.pwrite(fd, b"q" * 4096, i * 4096) for i in range(12)]  # 8 entries
    results = await asyncio.wait_for(asyncio.gather(*writes, return_exceptions=True), 30)
    assert all(isinstance(r, OSError) and r.errno == errno.ENOMEM for r in results)
    refusing[0] = False
    assert await ring.pwrite(fd, b"r" * 4096, 0) == 4096
    assert os.pread(fd, 4096, 0) == b"r" * 4096


async def test_close_waits_for_work_started_while_it_waits_and_then_refuses_more(
    fd: int,
) -> None:
    ring = Ring(entries=8)
    first = ring.pwrite(fd, b"a" * 4096, 0)
    late: list[object] = []

    async def chain() -> None:
        await first  # woken by the same completion that lets close() go on
        try:
            late.append(await ring.pwrite(fd, b"b" * 4096, 4096))
        except RuntimeError as e:
            late.append(e)

    task = asyncio.create_task(chain())
    await asyncio.sleep(0)
    await asyncio.gather(ring.close(), ring.close())  # concurrent callers both return
    await task
    assert isinstance(late[0], RuntimeError), "no new work once closing started"
    assert not ring._ops and not ring._backlog


def test_pwrite_all_writes_any_buffer_whole(fd: int) -> None:
    data = bytearray(os.urandom(WRITE_PIECE + 5000))
    pwrite_all(fd, data, 1000)
    pwrite_all(fd, memoryview(data)[:3000], 900_000)
    assert os.pread(fd, len(data), 1000) == data
    assert os.pread(fd, 3000, 900_000) == data[:3000]


async def test_a_read_past_the_end_of_the_file_gives_zeros(ring: Ring, fd: int) -> None:
    os.pwrite(fd, b"\xff" * 4096, (1 << 20) - 4096)
    buf = bytearray(b"\x01" * 8192)
    assert await ring.pread(fd, buf, (1 << 20) - 4096) == 8192
    assert bytes(buf) == b"\xff" * 4096 + bytes(4096)


async def test_errors_carry_the_kernels_errno_and_call_done(ring: Ring, fd: int) -> None:
    seen: list[object] = []
    ro = os.open(f"/proc/self/fd/{fd}", os.O_RDONLY)
    try:
        with pytest.raises(OSError) as info:
            await ring.pwrite(ro, b"x" * 512, 0, done=lambda r, e: seen.append(e))
    finally:
        os.close(ro)
    assert info.value.errno == errno.EBADF
    assert seen == [info.value]


async def test_done_runs_even_when_the_waiter_was_cancelled(ring: Ring, fd: int) -> None:
    seen: list[object] = []
    fut = ring.pwrite(fd, b"y" * 4096, 0, done=lambda r, e: seen.append(r))
    fut.cancel()
    await ring.close()  # waits for the I/O in flight
    assert seen == [4096]
    assert os.pread(fd, 4096, 0) == b"y" * 4096


async def test_an_empty_buffer_completes_at_once(ring: Ring, fd: int) -> None:
    assert await ring.pwrite(fd, b"", 0) == 0


async def test_a_closed_ring_refuses_work(fd: int) -> None:
    r = Ring(entries=4)
    await r.close()
    with pytest.raises(RuntimeError, match="closed"):
        r.pwrite(fd, b"z", 0)


async def test_the_store_uses_the_ring_only_where_the_kernel_has_it(tmp_path: Path) -> None:
    async with ReplicaStore(tmp_path / "a") as s:
        assert (s._ring is not None) == AVAILABLE
        await s.create("e1", 1 << 20)
        await s.write("e1", 0, b"q" * 8192, epoch=0, generation=1)
        await s.write("e1", 0, b"r" * 8192, epoch=0, generation=1)  # no INTENT: the ring
        assert await s.read("e1", 0, 8192) == b"r" * 8192
        assert await s.scrub("e1") == []
    async with ReplicaStore(tmp_path / "b", uring=False) as s:
        assert s._ring is None
