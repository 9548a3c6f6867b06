"""``Ring``: Linux io_uring for the disk I/O of the replica store, without a thread hand-off.

The kernel runs the I/O (buffered writes go to its own io-wq workers, so the event-loop thread
never waits for the disk and no Python thread competes for the GIL); this module only fills
submission entries in the shared ring, tells the kernel once per event-loop iteration
(``io_uring_enter``), and resolves futures when the completion ring's eventfd becomes readable.

It speaks the raw system calls through ``ctypes`` and maps the rings with ``mmap``, so it needs
no library beyond libc. ``Ring.probe()`` says whether it can work here: Linux on x86-64 (whose
memory model orders the plain loads and stores this module does on the rings; other
architectures would need barriers), io_uring not disabled (``kernel.io_uring_disabled``), a
kernel with a single ring mapping (5.4+). Callers fall back to threads (``IoPool``) otherwise.

Contract of each operation (``pwrite``, ``pread``): the buffer is pinned until the kernel is
done with it, *even if the awaiting coroutine is cancelled*; short transfers are continued until
complete (a read past the end of the file reads zeros); a failure is an ``OSError`` with the
errno the kernel gave. ``done(result, exc)``, when given, runs on the loop thread before the
future resolves, whether or not it was cancelled (the same contract as ``IoPool.submit``).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import ctypes
import ctypes.util
import errno
import functools
import logging
import mmap
import os
import platform
import struct
from pathlib import Path
from typing import Any, cast

from aecp.storage.chunk.diskio import WRITE_PIECE, pieces
from aecp.storage.chunk.iopool import Done, complete

log = logging.getLogger(__name__)

_SYS_SETUP, _SYS_ENTER, _SYS_REGISTER = 425, 426, 427
_OFF_SQ_RING, _OFF_SQES = 0, 0x10000000
_FEAT_SINGLE_MMAP = 1
#: completions wait for this thread's next system call instead of interrupting it (an IPI
#: and a kernel entry each): the loop makes one every iteration, and when it sleeps in
#: epoll_wait the kernel still wakes it. Measured: the loop's time per 4 KiB write fell from
#: about 60 to 47 µs and the process's CPU per write by about a fifth.
_SETUP_COOP_TASKRUN = 1 << 8
_PARAMS_FLAGS = 8  # byte offset of io_uring_params.flags
_REGISTER_EVENTFD = 4
_OP_READ, _OP_WRITE = 22, 23
_U32 = 0xFFFFFFFF
_RETRY_S = 0.1  # after an unexpected failure of io_uring_enter
_MAX_FAILURES = 50  # in a row: then what is queued fails
_USER_DATA, _USER_DATA_AT = struct.Struct("<Q"), 32  # an SQE's user_data and its offset

# io_uring_params: 7 u32, 3 reserved u32, then the SQ and CQ offsets (8 u32 + 1 u64 each)
_PARAMS = struct.Struct("<7I3I8IQ8IQ")
# io_uring_sqe: opcode, flags, ioprio, fd, off, addr, len, rw_flags, user_data, buf_index,
# personality, splice_fd_in, addr3, pad
_SQE = struct.Struct("<BBHiQQIIQHHiQQ")
_CQE = struct.Struct("<QiI")


@functools.cache
def ring_unavailable() -> str:
    """``Ring.probe()``, asked once per process."""
    reason = Ring.probe()
    if reason:
        log.info("disk I/O goes through threads: %s", reason)
    return reason


class _PyBuffer(ctypes.Structure):
    _fields_ = [
        ("buf", ctypes.c_void_p),
        ("obj", ctypes.c_void_p),
        ("len", ctypes.c_ssize_t),
        ("itemsize", ctypes.c_ssize_t),
        ("readonly", ctypes.c_int),
        ("ndim", ctypes.c_int),
        ("format", ctypes.c_char_p),
        ("shape", ctypes.c_void_p),
        ("strides", ctypes.c_void_p),
        ("suboffsets", ctypes.c_void_p),
        ("internal", ctypes.c_void_p),
    ]


_get_buffer = ctypes.pythonapi.PyObject_GetBuffer
_get_buffer.argtypes = [ctypes.py_object, ctypes.POINTER(_PyBuffer), ctypes.c_int]
_get_buffer.restype = ctypes.c_int
_release_buffer = ctypes.pythonapi.PyBuffer_Release
_release_buffer.argtypes = [ctypes.POINTER(_PyBuffer)]
_release_buffer.restype = None
_PYBUF_SIMPLE, _PYBUF_WRITABLE = 0, 1


def _bytes_data_offset() -> int:
    """Where a ``bytes`` object's data starts, from its address (CPython: after the header),
    checked here on a sample; 0 if the check fails (then bytes are pinned like any buffer).
    A bytes object never moves or changes, so holding a reference keeps its data valid."""
    offset = bytes.__basicsize__ - 1  # the header, then ob_sval (whose 1 byte is counted)
    sample = b"aecp io_uring bytes layout check"
    try:
        ok = ctypes.string_at(id(sample) + offset, len(sample)) == sample
    except Exception:  # pragma: no cover - an interpreter laid out otherwise
        ok = False
    return offset if ok else 0


_BYTES_DATA = _bytes_data_offset()

_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
_syscall = _libc.syscall
_syscall.restype = ctypes.c_long


def _sys(number: int, *args: Any) -> int:
    ret = int(_syscall(number, *args))
    if ret < 0:
        e = ctypes.get_errno()
        raise OSError(e, os.strerror(e))
    return ret


class _Op:
    """One I/O in flight: its pinned buffer and how far it got."""

    __slots__ = ("addr", "done", "fd", "fut", "group", "length", "offset", "op", "pinned", "pos")

    def __init__(
        self,
        op: int,
        fd: int,
        pinned: _PyBuffer | bytes | None,
        addr: int,
        length: int,
        offset: int,
        fut: asyncio.Future[Any] | None,
        done: Done | None,
    ) -> None:
        self.op = op
        self.fd = fd
        self.pinned = pinned  # a held buffer (released when done), a bytes object, or None
        self.addr = addr
        self.length = length
        self.offset = offset
        self.pos = 0
        self.fut = fut
        self.done = done
        self.group: _Pieces | None = None  # set on a piece of a longer write


class _Pieces:
    """A write cut in pieces: the whole, how many pieces are in flight, the first error."""

    __slots__ = ("exc", "left", "whole")

    def __init__(self, whole: _Op, left: int) -> None:
        self.whole = whole
        self.left = left
        self.exc: BaseException | None = None


class Ring:
    """An io_uring serving the event loop it is first used from. ``Ring.probe()`` first."""

    def __init__(self, entries: int = 256) -> None:
        params = ctypes.create_string_buffer(_PARAMS.size)
        struct.pack_into("<I", params, _PARAMS_FLAGS, _SETUP_COOP_TASKRUN)
        try:
            self._fd = _sys(_SYS_SETUP, ctypes.c_uint(entries), params)
        except OSError as e:  # a kernel before 5.19: no such flag
            if e.errno != errno.EINVAL:
                raise
            params = ctypes.create_string_buffer(_PARAMS.size)
            self._fd = _sys(_SYS_SETUP, ctypes.c_uint(entries), params)
        self._closed = False
        self._efd = -1
        try:
            self._map(_PARAMS.unpack(params.raw))
            self._efd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
            efd = ctypes.c_int(self._efd)
            _sys(_SYS_REGISTER, self._fd, _REGISTER_EVENTFD, ctypes.byref(efd), 1)
        except BaseException:
            if self._efd >= 0:
                os.close(self._efd)
            os.close(self._fd)  # the mappings, if made, go with their last reference
            raise
        self._ops: dict[int, _Op] = {}
        self._next = 1
        self._unsubmitted = 0
        self._backlog: collections.deque[_Op] = collections.deque()
        self._enter_handle: asyncio.Handle | None = None  # the next _enter, if scheduled
        self._failures = 0  # io_uring_enter failures in a row
        self._closing = False
        self._loop: asyncio.AbstractEventLoop | None = None
        self._idle: asyncio.Future[None] | None = None

    @staticmethod
    def probe() -> str:
        """Why io_uring cannot be used here, or '' if it can (a ring is set up and closed)."""
        if platform.system() != "Linux" or platform.machine() != "x86_64":
            return f"io_uring is used only on Linux x86-64, not {platform.machine()}"
        disabled = Path("/proc/sys/kernel/io_uring_disabled")
        if disabled.exists() and disabled.read_text().strip() not in ("", "0"):
            return "io_uring is disabled (kernel.io_uring_disabled)"
        try:
            Ring(entries=4).close_now()
        except OSError as e:
            return f"io_uring is not available: {e}"
        return ""

    def _map(self, p: tuple[int, ...]) -> None:
        sq_entries, cq_entries, features = p[0], p[1], p[5]
        if not features & _FEAT_SINGLE_MMAP:
            raise OSError(errno.ENOSYS, "io_uring without a single ring mapping (kernel < 5.4)")
        sq_head, sq_tail, sq_mask, _, _, _, sq_array = p[10:17]
        cq_head, cq_tail, cq_mask, _, _, cqes = p[19:25]
        size = max(sq_array + 4 * sq_entries, cqes + 16 * cq_entries)
        prot = mmap.PROT_READ | mmap.PROT_WRITE
        flags = mmap.MAP_SHARED | mmap.MAP_POPULATE
        self._ring = mmap.mmap(self._fd, size, flags, prot, offset=_OFF_SQ_RING)
        self._sqes = mmap.mmap(self._fd, 64 * sq_entries, flags, prot, offset=_OFF_SQES)
        self._u32 = memoryview(self._ring).cast("I")
        self._sq_head, self._sq_tail = sq_head // 4, sq_tail // 4
        self._sq_mask = self._u32[sq_mask // 4]
        self._cq_head, self._cq_tail = cq_head // 4, cq_tail // 4
        self._cq_mask = self._u32[cq_mask // 4]
        self._cqes = cqes
        self.entries = sq_entries
        self._max_inflight = cq_entries
        for i in range(sq_entries):  # slot i of the SQ array names SQE i, for good
            self._u32[sq_array // 4 + i] = i

    # ---- operations --------------------------------------------------------------------------
    def pwrite(
        self, fd: int, data: Any, offset: int, done: Done | None = None
    ) -> asyncio.Future[int]:
        """Write all of ``data`` (any buffer) at ``offset``; the result is its length."""
        return cast(
            "asyncio.Future[int]", self._start(_OP_WRITE, fd, data, _PYBUF_SIMPLE, offset, done)
        )

    def pwrite_then(self, fd: int, data: Any, offset: int, done: Done) -> None:
        """``pwrite`` without a future: only ``done(length, None)`` or ``done(None, error)``
        (called on the loop thread; it must not raise)."""
        self._start(_OP_WRITE, fd, data, _PYBUF_SIMPLE, offset, done, with_future=False)

    def pread(
        self, fd: int, buf: bytearray, offset: int, done: Done | None = None
    ) -> asyncio.Future[int]:
        """Fill ``buf`` from ``offset`` (zeros past the end of the file); the result is its
        length."""
        return cast(
            "asyncio.Future[int]", self._start(_OP_READ, fd, buf, _PYBUF_WRITABLE, offset, done)
        )

    def _start(
        self,
        op: int,
        fd: int,
        obj: Any,
        flags: int,
        offset: int,
        done: Done | None,
        with_future: bool = True,
    ) -> asyncio.Future[int] | None:
        if self._closed or self._closing:
            raise RuntimeError("the io_uring is closed")
        loop = self._loop
        if loop is None:
            loop = self._loop = asyncio.get_running_loop()
            loop.add_reader(self._efd, self._reap)
        fut: asyncio.Future[int] | None = loop.create_future() if with_future else None
        if type(obj) is bytes and _BYTES_DATA and not flags & _PYBUF_WRITABLE:
            rec = _Op(op, fd, obj, id(obj) + _BYTES_DATA, len(obj), offset, fut, done)
        else:
            pinned = _PyBuffer()
            if _get_buffer(obj, ctypes.byref(pinned), flags) != 0:  # pragma: no cover - raises
                raise TypeError("not a contiguous buffer")
            rec = _Op(op, fd, pinned, int(pinned.buf or 0), int(pinned.len), offset, fut, done)
        if not rec.length:
            self._finish(rec, 0, None)
        elif op == _OP_WRITE and rec.length > WRITE_PIECE:
            self._submit_pieces(rec)
        else:
            self._submit(rec)
        return fut

    def _submit_pieces(self, whole: _Op) -> None:
        """A long write as ``WRITE_PIECE`` writes in flight together (see ``diskio``); the
        whole completes when the last piece does, with the first piece's error if any."""
        cut = pieces(whole.offset, whole.length)
        group = _Pieces(whole, len(cut))
        for start, end in cut:
            piece = _Op(
                whole.op, whole.fd, None, whole.addr + start, end - start,
                whole.offset + start, None, None,
            )  # fmt: skip
            piece.group = group
            self._submit(piece)

    # ---- submission --------------------------------------------------------------------------
    def _submit(self, rec: _Op) -> None:
        """Queue ``rec`` in the submission ring, or in the backlog when the ring is full or
        the completions could overflow. Never enters the kernel itself, so starting an
        operation (all pieces of a write included) cannot fail half-way."""
        if len(self._ops) >= self._max_inflight or self._unsubmitted >= self.entries:
            self._backlog.append(rec)
            self._schedule_enter()
            return
        ud = self._next
        self._next = ud + 1
        self._ops[ud] = rec
        u32 = self._u32
        tail = u32[self._sq_tail]
        n = rec.length - rec.pos
        _SQE.pack_into(
            self._sqes, 64 * (tail & self._sq_mask), rec.op, 0, 0, rec.fd,
            rec.offset + rec.pos, rec.addr + rec.pos, n, 0, ud, 0, 0, 0, 0, 0,
        )  # fmt: skip
        u32[self._sq_tail] = (tail + 1) & _U32  # after the entry: x86 keeps stores in order
        self._unsubmitted += 1
        self._schedule_enter()

    def _schedule_enter(self) -> None:
        if self._enter_handle is None:
            assert self._loop is not None
            self._enter_handle = self._loop.call_soon(self._enter)

    def _enter(self) -> None:
        """Tell the kernel about every queued entry (once per loop iteration), refilling the
        ring from the backlog as it empties. A refused submission is retried: at once for
        EAGAIN/EBUSY, after ``_RETRY_S`` for anything else, up to ``_MAX_FAILURES`` times in
        a row; then every queued operation fails with that error."""
        self._enter_handle = None
        if self._closed:
            return
        while self._unsubmitted:
            try:
                n = _sys(_SYS_ENTER, self._fd, self._unsubmitted, 0, 0, None, 0)
            except OSError as e:
                if e.errno == errno.EINTR:
                    continue
                self._failed_enter(e)
                return
            self._failures = 0
            self._unsubmitted -= n
            self._refill()

    def _failed_enter(self, exc: OSError) -> None:
        assert self._loop is not None
        if self._enter_handle is not None:  # one retry at a time
            self._enter_handle.cancel()
            self._enter_handle = None
        if exc.errno in (errno.EAGAIN, errno.EBUSY):  # the kernel is short of something now
            self._schedule_enter()
            return
        self._failures += 1
        if self._failures < _MAX_FAILURES:
            log.error("io_uring: submitting failed (%s); retrying in %.1f s", exc, _RETRY_S)
            self._enter_handle = self._loop.call_later(_RETRY_S, self._enter)
            return
        log.error("io_uring: submitting failed %d times (%s): failing what is queued",
                  self._failures, exc)  # fmt: skip
        self._failures = 0
        self._fail_queued(exc)

    def _fail_queued(self, exc: OSError) -> None:
        """Take back the entries the kernel never consumed and fail them and the backlog."""
        u32 = self._u32
        tail = u32[self._sq_tail]
        queued = []
        for i in range(self._unsubmitted, 0, -1):
            slot = (tail - i) & self._sq_mask
            (ud,) = _USER_DATA.unpack_from(self._sqes, 64 * slot + _USER_DATA_AT)
            rec = self._ops.pop(ud, None)
            if rec is not None:
                queued.append(rec)
        u32[self._sq_tail] = (tail - self._unsubmitted) & _U32
        self._unsubmitted = 0
        queued += self._backlog
        self._backlog.clear()
        for rec in queued:
            self._finish(rec, None, OSError(exc.errno, exc.strerror))
        self._check_idle()

    def _refill(self) -> None:
        """Move backlogged operations into the ring while it has room."""
        backlog = self._backlog
        while backlog and len(self._ops) < self._max_inflight and self._unsubmitted < self.entries:
            self._submit(backlog.popleft())

    # ---- completion --------------------------------------------------------------------------
    def _reap(self) -> None:
        """On the loop thread, when the eventfd fires: handle every completion posted."""
        with contextlib.suppress(BlockingIOError):
            os.read(self._efd, 8)
        u32 = self._u32
        head, tail = u32[self._cq_head], u32[self._cq_tail]
        got = []
        while head != tail:
            ud, res, _ = _CQE.unpack_from(self._ring, self._cqes + 16 * (head & self._cq_mask))
            got.append((ud, res))
            head = (head + 1) & _U32
        u32[self._cq_head] = head
        for ud, res in got:
            rec = self._ops.pop(ud, None)
            if rec is None:  # pragma: no cover - the kernel echoes our own user_data
                log.error("io_uring: completion for unknown request %d", ud)
                continue
            self._progress(rec, res)
        self._refill()
        self._check_idle()

    def _check_idle(self) -> None:
        if not self._ops and self._idle is not None and not self._idle.done():
            self._idle.set_result(None)

    def _progress(self, rec: _Op, res: int) -> None:
        if res < 0:
            self._finish(rec, None, OSError(-res, os.strerror(-res)))
            return
        rec.pos += res
        if rec.pos >= rec.length:
            self._finish(rec, rec.length, None)
        elif res == 0 and rec.op == _OP_READ:  # end of file: the rest reads as zeros
            ctypes.memset(rec.addr + rec.pos, 0, rec.length - rec.pos)
            self._finish(rec, rec.length, None)
        elif res == 0:
            self._finish(rec, None, OSError(errno.EIO, "io_uring wrote nothing"))
        else:
            self._submit(rec)  # a short transfer: go on from where it stopped

    def _finish(self, rec: _Op, result: int | None, exc: BaseException | None) -> None:
        group = rec.group
        if group is not None:
            group.left -= 1
            group.exc = group.exc or exc
            if group.left:
                return
            rec, exc = group.whole, group.exc
            result = None if exc else rec.length
        pinned = rec.pinned
        if type(pinned) is _PyBuffer:
            _release_buffer(ctypes.byref(pinned))
        complete(rec.fut, rec.done, result, exc)

    # ---- shutdown ----------------------------------------------------------------------------
    async def close(self) -> None:
        """Refuse new work, wait for every operation in flight, then release the ring
        (idempotent; concurrent callers all return once it is released)."""
        if self._closed:
            return
        self._closing = True
        while self._ops or self._backlog:
            if self._idle is None or self._idle.done():
                self._idle = asyncio.get_running_loop().create_future()
            await asyncio.shield(self._idle)
        self.close_now()

    def close_now(self) -> None:
        """Release the ring at once; only when nothing is in flight."""
        if self._closed:
            return
        self._closed = True
        if self._enter_handle is not None:
            self._enter_handle.cancel()
            self._enter_handle = None
        if self._loop is not None and not self._loop.is_closed():
            self._loop.remove_reader(self._efd)
        self._u32.release()
        self._ring.close()
        self._sqes.close()
        os.close(self._efd)
        os.close(self._fd)
