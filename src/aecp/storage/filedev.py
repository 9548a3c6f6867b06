"""``FileDevice``: a ``BlockDevice`` over a local (sparse) file — the baseline device behind NBD
tests and benchmarks.

I/O runs on a small dedicated thread pool (``_IoPool``) so the event loop never waits for a
disk. Two exceptions, both for requests of at most 64 KiB, where the data is in memory and the
call is a memory copy: reads that ``preadv2(RWF_NOWAIT)`` serves from the page cache (it fails
instead of waiting), and reads and writes of files on a memory file system (tmpfs, ramfs: there
is no device to wait for; ``inline_io`` turns this off or forces it).

Durability: ``flush`` is ``fdatasync``; a FUA write is a ``pwritev2(RWF_DSYNC)``. ``trim`` and
``write_zeroes`` punch holes with ``fallocate(PUNCH_HOLE|KEEP_SIZE)`` (``ZERO_RANGE`` when holes
are not allowed), falling back to writing zeros. ``block_status`` walks ``SEEK_DATA`` and
``SEEK_HOLE``. Several ``FileDevice`` objects may open the same file: they share the page
cache, so ``multi_conn`` holds.
"""

from __future__ import annotations

import asyncio
import collections
import ctypes
import errno
import os
import queue
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

from aecp.common.errors import InvalidInput
from aecp.storage.blockdev import (
    Allocation,
    BlockDevice,
    BlockError,
    NoSpace,
    ReadOnly,
    Span,
    check_range,
)

_T = TypeVar("_T")
_Job = tuple["asyncio.Future[Any]", Callable[..., Any], tuple[Any, ...]]
FALLOC_FL_KEEP_SIZE = 0x01
FALLOC_FL_PUNCH_HOLE = 0x02
FALLOC_FL_ZERO_RANGE = 0x10
INLINE_MAX = 64 * 1024  # I/O up to this size may run on the loop (see the module docstring)
MEMORY_FS = {0x01021994: "tmpfs", 0x858458F6: "ramfs"}  # statfs f_type magic numbers
ZERO_CHUNK = 1 << 20
MAX_SPANS = 1024  # block_status returns at most this many spans per call
_HOLE = Allocation.HOLE | Allocation.ZERO
_NOT_SUPPORTED = (errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL)

_libc = ctypes.CDLL(None, use_errno=True)
_fallocate = _libc.fallocate
_fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]
_fallocate.restype = ctypes.c_int


def fs_type(fd: int) -> int:
    """The file system magic (``statfs.f_type``) of an open file."""
    buf = ctypes.create_string_buffer(256)  # struct statfs; f_type is its first word
    if _libc.fstatfs(fd, buf) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))
    return ctypes.c_long.from_buffer(buf).value


class _IoPool:
    """Worker threads for blocking file calls, cheaper per call than ``run_in_executor``.

    ``submit`` queues ``fn(*args)`` and returns an asyncio future. Workers put results on a
    completion queue and wake the loop once per batch, not once per call. ``close`` waits
    until every submitted call has finished, then stops the threads.
    """

    def __init__(self, workers: int) -> None:
        self._workers = workers
        self._threads: list[threading.Thread] = []
        self._jobs: queue.SimpleQueue[_Job | None] = queue.SimpleQueue()
        self._done: collections.deque[tuple[asyncio.Future[Any], Any, BaseException | None]] = (
            collections.deque()
        )
        self._lock = threading.Lock()
        self._wakeup_pending = False
        self._loop: asyncio.AbstractEventLoop | None = None
        self._pending = 0
        self._idle: asyncio.Future[None] | None = None

    def submit(self, fn: Callable[..., _T], *args: Any) -> asyncio.Future[_T]:
        """Run ``fn(*args)`` on a worker thread."""
        if self._loop is None:
            self._loop = asyncio.get_running_loop()
            for i in range(self._workers):
                t = threading.Thread(target=self._work, name=f"filedev-io-{i}", daemon=True)
                t.start()
                self._threads.append(t)
        fut: asyncio.Future[_T] = self._loop.create_future()
        self._pending += 1
        self._jobs.put((fut, fn, args))
        return fut

    def _work(self) -> None:
        """Take jobs until the sentinel; after a run of jobs, wake the loop (once)."""
        jobs = self._jobs
        while (job := jobs.get()) is not None:
            self._run(job)
            while True:  # drain what queued up meanwhile before waking the loop
                try:
                    job = jobs.get_nowait()
                except queue.Empty:
                    break
                if job is None:
                    jobs.put(None)  # leave the sentinel for the outer loop
                    break
                self._run(job)
            if not self._wake_loop():
                return

    def _run(self, job: _Job) -> None:
        fut, fn, args = job
        try:
            self._done.append((fut, fn(*args), None))
        except BaseException as e:
            self._done.append((fut, None, e))

    def _wake_loop(self) -> bool:
        """Schedule ``_complete`` unless already scheduled; False if the loop is gone."""
        with self._lock:
            if self._wakeup_pending:
                return True
            self._wakeup_pending = True
        assert self._loop is not None
        try:
            self._loop.call_soon_threadsafe(self._complete)
        except RuntimeError:  # the loop is closed; nobody is waiting any more
            return False
        return True

    def _complete(self) -> None:
        """On the loop: settle every finished call."""
        with self._lock:
            self._wakeup_pending = False
        done = self._done
        while done:
            fut, result, exc = done.popleft()
            self._pending -= 1
            if fut.cancelled():
                continue
            if exc is None:
                fut.set_result(result)
            else:
                fut.set_exception(exc)
        if self._pending == 0 and self._idle is not None and not self._idle.done():
            self._idle.set_result(None)

    async def close(self) -> None:
        """Wait for calls in progress (even those whose caller was cancelled); stop workers."""
        if self._pending and self._loop is not None:
            self._idle = self._loop.create_future()
            await asyncio.shield(self._idle)
        for _ in self._threads:
            self._jobs.put(None)
        self._threads.clear()


class FileDevice(BlockDevice):
    """A regular file as a block device; its size (a multiple of 512) is fixed at open."""

    multi_conn = True

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        read_only: bool = False,
        workers: int = 4,
        inline_io: bool | None = None,
    ) -> None:
        """Open ``path``; ``inline_io``: small I/O on the loop (None: only on tmpfs/ramfs)."""
        self.path = Path(path)
        self.read_only = read_only
        flags = (os.O_RDONLY if read_only else os.O_RDWR) | os.O_CLOEXEC
        self._fd = os.open(self.path, flags)
        try:
            size = os.fstat(self._fd).st_size
            if size % 512:
                raise InvalidInput("path", f"{self.path} is {size} bytes, not a multiple of 512")
            memory = fs_type(self._fd) in MEMORY_FS
        except BaseException:
            os.close(self._fd)
            raise
        self.size = size
        self._pool = _IoPool(workers)
        self._inline = memory if inline_io is None else inline_io
        self._nowait = True
        self._closed = False

    @classmethod
    async def open(cls, path: str | os.PathLike[str], **kwargs: Any) -> FileDevice:
        """Open without blocking the event loop."""
        return await asyncio.to_thread(cls, path, **kwargs)

    def __repr__(self) -> str:
        return f"FileDevice({str(self.path)!r}, size={self.size})"

    async def read(self, offset: int, length: int) -> bytes:
        self._check(offset, length)
        if length <= INLINE_MAX:
            data = self._read_inline(offset, length)
            if data is not None:
                return data
        return await self._run(_pread, self._fd, offset, length)

    def _read_inline(self, offset: int, length: int) -> bytes | None:
        """The data if it can be had without waiting, else None (never blocks)."""
        try:
            if self._inline:
                return _pread(self._fd, offset, length)
            if not self._nowait:
                return None
            buf = bytearray(length)
            n = os.preadv(self._fd, [buf], offset, os.RWF_NOWAIT)
        except BlockingIOError:
            return None
        except OSError as e:
            if e.errno in _NOT_SUPPORTED and not self._inline:
                self._nowait = False  # this file system cannot say "not now": use the pool
                return None
            raise _block_error(e, "read", offset) from e
        return bytes(buf) if n == length else None

    async def write(self, offset: int, data: bytes | bytearray, fua: bool = False) -> None:
        self._check(offset, len(data), write=True)
        flags = os.RWF_DSYNC if fua else 0
        if self._inline and len(data) <= INLINE_MAX:
            try:
                return _pwrite(self._fd, offset, data, flags)
            except OSError as e:
                raise _block_error(e, "write", offset) from e
        await self._run(_pwrite, self._fd, offset, data, flags)

    async def flush(self) -> None:
        self._check(0, 0)
        if not self.read_only:
            await self._run(os.fdatasync, self._fd)

    async def trim(self, offset: int, length: int) -> None:
        self._check(offset, length, write=True)
        await self._run(_punch_or_zero, self._fd, offset, length, True, False)

    async def write_zeroes(
        self, offset: int, length: int, fua: bool = False, may_trim: bool = True
    ) -> None:
        self._check(offset, length, write=True)
        await self._run(_punch_or_zero, self._fd, offset, length, may_trim, True)
        if fua:
            await self._run(os.fdatasync, self._fd)

    async def block_status(self, offset: int, length: int) -> list[Span]:
        self._check(offset, length)
        return await self._run(_extents, self._fd, offset, length, self.size)

    async def close(self) -> None:
        """Wait for I/O in progress, stop the workers, close the file (idempotent)."""
        if self._closed:
            return
        self._closed = True
        await self._pool.close()
        os.close(self._fd)

    def _check(self, offset: int, length: int, write: bool = False) -> None:
        if self._closed:
            raise BlockError(f"{self.path} is closed")
        if write and self.read_only:
            raise ReadOnly(f"{self.path} is open read-only")
        check_range(self, offset, length)

    async def _run(self, fn: Callable[..., _T], *args: Any) -> _T:
        try:
            return await self._pool.submit(fn, *args)
        except OSError as e:
            raise _block_error(e, fn.__name__, args[1] if len(args) > 1 else None) from e


def _block_error(e: OSError, op: str, offset: object = None) -> BlockError:
    """The ``BlockError`` an OS error maps to (ENOSPC, EDQUOT, EFBIG → ``NoSpace``)."""
    message = f"{op} at {offset}: {e.strerror or e}"
    if e.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
        return NoSpace(message, offset=offset)
    if e.errno == errno.EROFS:
        return ReadOnly(message, offset=offset)
    return BlockError(message, offset=offset, errno_name=errno.errorcode.get(e.errno or 0))


# --- blocking helpers, run on the pool ----------------------------------------------------


def _pread(fd: int, offset: int, length: int) -> bytes:
    data = os.pread(fd, length, offset)
    if len(data) == length:
        return data
    parts, got = [data], len(data)
    while got < length:
        chunk = os.pread(fd, length - got, offset + got)
        if not chunk:
            raise OSError(errno.EIO, "short read: the file shrank")
        parts.append(chunk)
        got += len(chunk)
    return b"".join(parts)


def _pwrite(fd: int, offset: int, data: bytes | bytearray, flags: int) -> None:
    view = memoryview(data)
    while view:
        n = os.pwritev(fd, [view], offset, flags) if flags else os.pwrite(fd, view, offset)
        view, offset = view[n:], offset + n


def _punch_or_zero(fd: int, offset: int, length: int, may_trim: bool, must_zero: bool) -> None:
    """Deallocate (``may_trim``) or zero the range; with ``must_zero`` it reads back as zeros
    whatever the file system supports, else (trim) unsupported file systems are left as is."""
    modes = [FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE] if may_trim else []
    if must_zero:
        modes.append(FALLOC_FL_ZERO_RANGE | FALLOC_FL_KEEP_SIZE)
    for mode in modes:
        if _fallocate(fd, mode, offset, length) == 0:
            return
        err = ctypes.get_errno()
        if err not in _NOT_SUPPORTED:
            raise OSError(err, os.strerror(err))
    if must_zero:
        zeros = bytes(min(length, ZERO_CHUNK))
        end = offset + length
        while offset < end:
            n = min(len(zeros), end - offset)
            _pwrite(fd, offset, zeros[:n] if n < len(zeros) else zeros, 0)
            offset += n


def _extents(fd: int, offset: int, length: int, size: int) -> list[Span]:
    """Data and hole spans from ``offset`` (at most ``length`` bytes, ``MAX_SPANS`` spans)."""
    end = offset + length
    spans: list[Span] = []
    pos = offset
    while pos < end and len(spans) < MAX_SPANS:
        try:
            data = os.lseek(fd, pos, os.SEEK_DATA)
        except OSError as e:
            if e.errno == errno.ENXIO:  # only a hole up to the end of the file
                data = size
            elif e.errno in _NOT_SUPPORTED:
                return [Span(length, Allocation.DATA)]
            else:
                raise
        if data > pos:
            nxt, flags = min(data, end), _HOLE
        else:
            nxt, flags = min(os.lseek(fd, pos, os.SEEK_HOLE), end), Allocation.DATA
        if nxt <= pos:  # the file changed under us; report the rest as data
            nxt, flags = end, Allocation.DATA
        spans.append(Span(nxt - pos, flags))
        pos = nxt
    return spans
