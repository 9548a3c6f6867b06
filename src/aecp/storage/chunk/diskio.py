"""The blocking disk I/O of the replica store, run in ``IoPool`` worker threads.

Each function touches only what it is given: file descriptors, buffers and copies of metadata.
All metadata changes happen on the event-loop thread, when the job's result comes back.
Mutating functions first append the INTENT records they are handed to the replica's
``Journal`` (see ``meta``), then write.

``NotDone``: a job that failed before changing anything the replica's state depends on (an
append the journal cut away again, a snapshot never renamed into place). The store treats such
a failure for want of space as a refusal, not as a failed replica.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import os
import threading
from array import array

try:  # ISA-L: the same CRC-32 as zlib's, about 4x faster on large buffers
    from isal.isal_zlib import crc32 as crc32
except ImportError:  # pragma: no cover - a platform without an isal wheel
    from zlib import crc32 as crc32

from aecp.storage.chunk.api import Buffer
from aecp.storage.chunk.errors import ChecksumError

_RWF_NOWAIT = getattr(os, "RWF_NOWAIT", 0)
#: whether reads may try the page cache on the event-loop thread (``pread_cached``)
CACHED_READS = bool(_RWF_NOWAIT) and hasattr(os, "preadv")
_FALLOC_FL_KEEP_SIZE = 0x01
_FALLOC_FL_PUNCH_HOLE = 0x02
_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
_fallocate = getattr(_libc, "fallocate64", None) or getattr(_libc, "fallocate", None)
if _fallocate is not None:
    _fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]
    _fallocate.restype = ctypes.c_int


#: the most one ``pwrite`` (or one io_uring write) covers, aligned to its own size. The page
#: cache gives each new write a folio of up to the write's size (Linux 6.16+ with ext4), and
#: ext4 walks every buffer of a folio on each write into it: measured here, a later 4 KiB write
#: costs 22 µs of CPU in a 1 MiB folio, 5 µs in a 64 KiB one, 2.7 µs in a 4 KiB one, while a
#: 1 MiB write costs 156 µs in 64 KiB pieces against 105 µs whole (docs/design/abs.md,
#: "Disk I/O").
WRITE_PIECE = 64 * 1024


def pieces(offset: int, length: int) -> list[tuple[int, int]]:
    """``(start, end)`` positions in a buffer of ``length`` written at file ``offset``, cut at
    multiples of ``WRITE_PIECE`` in the file."""
    out: list[tuple[int, int]] = []
    pos = 0
    while pos < length:
        end = min(length, pos + WRITE_PIECE - (offset + pos) % WRITE_PIECE)
        out.append((pos, end))
        pos = end
    return out


def pwrite_all(fd: int, data: Buffer, offset: int) -> None:
    """Write all of ``data`` at ``offset``, in ``WRITE_PIECE`` pieces."""
    view = memoryview(data).cast("B")
    for start, end in pieces(offset, len(view)):
        piece, at = view[start:end], offset + start
        while piece:
            n = os.pwrite(fd, piece, at)
            piece, at = piece[n:], at + n


def append_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


#: failures that mean "no room", not "the disk is broken"
NO_ROOM = frozenset((errno.ENOSPC, errno.EDQUOT))


class NotDone(OSError):
    """An I/O job failed before it changed anything the replica's state depends on; ``errno``
    is that of the failure."""


class Journal:
    """The journal file of one replica (``fd``), appended to from several worker threads:
    INTENT records before a first write to a block, BLOCK and STATE records at a flush.

    Appends run one at a time, and one that fails (a short write, then ENOSPC on a full disk)
    is cut away again before the next: loading stops at the first torn record and drops every
    record after it, so a torn record left in place would lose the flushed records behind it.
    ``append`` then raises ``NotDone``; if the journal cannot be cut back, ``OSError(EIO)``
    (the replica must stop taking mutations). Where the journal ends is kept (``end``), not
    asked of the kernel at each append: every change to the file goes through this class."""

    __slots__ = ("_lock", "end", "fd")

    def __init__(self) -> None:
        self.fd = -1
        self.end = 0
        self._lock = threading.Lock()

    def open(self, fd: int) -> None:
        """Use ``fd``, the journal opened for appending, as it is now."""
        self.fd = fd
        self.end = os.fstat(fd).st_size

    def cut(self, size: int) -> None:
        """Drop what follows the first ``size`` bytes (a torn tail found when loading)."""
        with self._lock:
            os.ftruncate(self.fd, size)
            self.end = size

    def append(self, data: bytes) -> None:
        with self._lock:
            end = self.end
            try:
                append_all(self.fd, data)
            except OSError as exc:
                try:
                    os.ftruncate(self.fd, end)
                except OSError as cut:
                    raise OSError(
                        errno.EIO, f"journal append failed ({exc}) and was not cut back ({cut})"
                    ) from exc
                raise NotDone(exc.errno or errno.EIO, f"journal append failed: {exc}") from exc
            self.end = end + len(data)

    def reset(self, header: bytes) -> None:
        """Empty the journal and start it with ``header`` (durably)."""
        with self._lock:
            try:
                os.ftruncate(self.fd, 0)
                append_all(self.fd, header)
                os.fdatasync(self.fd)
            finally:  # after a failure, however far it got
                self.end = os.fstat(self.fd).st_size


def pread_full(fd: int, length: int, offset: int) -> bytes:
    data = os.pread(fd, length, offset)
    return data if len(data) == length else data + bytes(length - len(data))


def punch(fd: int, offset: int, length: int) -> None:
    """Deallocate ``[offset, offset+length)``; it reads as zeros afterwards."""
    if _fallocate is not None:
        mode = _FALLOC_FL_PUNCH_HOLE | _FALLOC_FL_KEEP_SIZE
        if _fallocate(fd, mode, offset, length) == 0:
            return
    pwrite_all(fd, bytes(length), offset)  # no hole punching here: write zeros instead


def sector_crcs(buf: Buffer, sector: int) -> array[int]:
    view = memoryview(buf)
    if len(view) == sector:
        return array("I", (crc32(view),))
    return array("I", [crc32(view[i : i + sector]) for i in range(0, len(view), sector)])


def check_sectors(
    raw: bytes, first: int, sector: int, bits: list[bool], crcs: array[int]
) -> tuple[list[int], list[int]]:
    """Verify the valid sectors of ``raw`` (sector ``first`` onwards): (bad sector indexes,
    positions in ``raw`` of invalid sectors)."""
    if len(bits) == 1:
        if not bits[0]:
            return [], [0]
        return ([] if crc32(raw) == crcs[0] else [first]), []
    view = memoryview(raw)
    bad: list[int] = []
    holes: list[int] = []
    for i, valid in enumerate(bits):
        if not valid:
            holes.append(i)
        elif crc32(view[i * sector : (i + 1) * sector]) != crcs[i]:
            bad.append(first + i)
    return bad, holes


def pread_cached(fd: int, length: int, offset: int) -> bytes:
    """``os.pread`` that never waits for the disk: ``BlockingIOError`` unless every byte is in
    the page cache (``preadv`` with ``RWF_NOWAIT``); ``OSError(EOPNOTSUPP)`` if the file
    system cannot tell."""
    buf = bytearray(length)
    if os.preadv(fd, (buf,), offset, _RWF_NOWAIT) != length:
        raise BlockingIOError(errno.EAGAIN, "partly in the page cache")
    return bytes(buf)


def read_sectors(
    extent_id: str,
    fd: int,
    offset: int,
    length: int,
    sector: int,
    first: int,
    bits: list[bool],
    crcs: array[int],
    cached_only: bool = False,
) -> bytes:
    """``length`` bytes at ``offset``, reading whole sectors ``first ..`` (validity ``bits``,
    checksums ``crcs``); invalid sectors read as zeros. With ``cached_only``, raises
    ``BlockingIOError`` rather than wait for the disk (see ``pread_cached``)."""
    start = first * sector
    raw = (pread_cached if cached_only else pread_full)(fd, len(bits) * sector, start)
    bad, holes = check_sectors(raw, first, sector, bits, crcs)
    if bad:
        raise ChecksumError(extent_id, bad)
    lo, hi = offset - start, offset - start + length
    if holes:
        buf = bytearray(raw)
        zero = bytes(sector)
        for i in holes:
            buf[i * sector : (i + 1) * sector] = zero
        with memoryview(buf) as view:
            return bytes(view[lo:hi])
    return raw if lo == 0 and hi == len(raw) else raw[lo:hi]


def old_sector(
    extent_id: str, fd: int, sector_no: int, sector: int, valid: bool, crc: int
) -> bytes:
    """The current content of one sector (zeros if invalid), verified."""
    if not valid:
        return bytes(sector)
    data = pread_full(fd, sector, sector_no * sector)
    if crc32(data) != crc:
        raise ChecksumError(extent_id, [sector_no])
    return data


Partial = tuple[bool, int] | None  # (valid, crc) of a partially written sector


def write_sectors(
    journal: Journal,
    intents: bytes,
    extent_id: str,
    fd: int,
    offset: int,
    data: Buffer,
    sector: int,
    head: Partial,
    tail: Partial,
) -> array[int]:
    """Write ``data`` at ``offset``, merging the partial first/last sectors with their old
    content (``head``/``tail``: their validity and crc, None when fully covered); returns the
    crcs of the sectors written. INTENT records go to the journal first."""
    if intents:
        journal.append(intents)
    first = offset // sector
    start = first * sector
    end = offset + len(data)
    count = -(-end // sector) - first
    buf: Buffer = data
    if head is not None or tail is not None:
        merged = bytearray(count * sector)
        if head is not None:
            merged[:sector] = old_sector(extent_id, fd, first, sector, *head)
        if tail is not None:
            last = first + count - 1
            merged[-sector:] = old_sector(extent_id, fd, last, sector, *tail)
        merged[offset - start : end - start] = data
        buf = merged
    pwrite_all(fd, buf, start)
    return sector_crcs(buf, sector)


def clear_sectors(
    journal: Journal,
    intents: bytes,
    extent_id: str,
    fd: int,
    sector: int,
    partials: list[tuple[int, int, int, int]],
    punch_ranges: list[tuple[int, int]],
) -> list[tuple[int, array[int]]]:
    """Trim: zero the partial sectors ``(sector_no, from, to, crc)`` (all valid), then punch
    ``(offset, length)`` ranges. Returns the new crc of each partial sector."""
    if intents:
        journal.append(intents)
    out: list[tuple[int, array[int]]] = []
    for sector_no, lo, hi, crc in partials:
        buf = bytearray(old_sector(extent_id, fd, sector_no, sector, True, crc))
        buf[lo:hi] = bytes(hi - lo)
        pwrite_all(fd, buf, sector_no * sector)
        out.append((sector_no, sector_crcs(buf, sector)))
    for offset, length in punch_ranges:
        punch(fd, offset, length)
    return out


def runs_of(bitmap: int, spb: int) -> list[tuple[int, int]]:
    """``(first, count)`` runs of set bits."""
    out: list[tuple[int, int]] = []
    i = 0
    while i < spb:
        if bitmap >> i & 1:
            j = i
            while j < spb and bitmap >> j & 1:
                j += 1
            out.append((i, j - i))
            i = j
        else:
            i += 1
    return out


def read_blocks(
    extent_id: str,
    fd: int,
    offset: int,
    block_size: int,
    sector: int,
    bitmaps: list[int],
    crcs: array[int],
) -> bytes:
    """The valid sectors of the blocks from ``offset`` (``bitmaps``, ``crcs`` of those
    blocks), verified and concatenated in order."""
    spb = block_size // sector
    out: list[memoryview] = []
    bad: list[int] = []
    for i, bitmap in enumerate(bitmaps):
        if not bitmap:
            continue
        raw = pread_full(fd, block_size, offset + i * block_size)
        bits = [bool(bitmap >> j & 1) for j in range(spb)]
        first = (offset + i * block_size) // sector
        bad += check_sectors(raw, first, sector, bits, crcs[i * spb : (i + 1) * spb])[0]
        view = memoryview(raw)
        out += [view[a * sector : (a + n) * sector] for a, n in runs_of(bitmap, spb)]
    if bad:
        raise ChecksumError(extent_id, bad)
    return b"".join(out)


def write_blocks(
    journal: Journal,
    intents: bytes,
    fd: int,
    offset: int,
    block_size: int,
    sector: int,
    bitmaps: tuple[int, ...],
    old_bitmaps: list[int],
    data: bytes,
) -> list[array[int]]:
    """Recovery copy: write the valid sectors (``data`` holds them in order) of each block and
    punch blocks left empty; returns each block's crcs (0 for invalid sectors)."""
    if intents:
        journal.append(intents)
    spb = block_size // sector
    view = memoryview(data)
    pos = 0
    result: list[array[int]] = []
    for i, bitmap in enumerate(bitmaps):
        base = offset + i * block_size
        crcs = array("I", bytes(4 * spb))
        if not bitmap and old_bitmaps[i]:
            punch(fd, base, block_size)
        for a, n in runs_of(bitmap, spb):
            chunk = view[pos : pos + n * sector]
            pwrite_all(fd, chunk, base + a * sector)
            crcs[a : a + n] = sector_crcs(chunk, sector)
            pos += n * sector
        result.append(crcs)
    return result
