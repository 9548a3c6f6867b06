"""One open replica (files, metadata, locks, bookkeeping) and the planning of its requests.

A *plan* (``plan_write``, ``plan_read``, ``plan_trim``) is made on the event-loop thread once
the request holds its block locks: it copies the metadata the worker needs and returns a ``Job``
— the ``diskio`` function, its arguments, and the function that applies the result to the
metadata when the job has finished. The ``check_*`` functions validate requests (``ChunkInvalid``
before anything changes).
"""

from __future__ import annotations

from array import array
from collections.abc import Callable
from pathlib import Path
from typing import Any

from aecp.storage.chunk.api import EXTENT_ID, U64_MAX, Buffer, RawBlocks
from aecp.storage.chunk.diskio import Journal, clear_sectors, read_sectors, write_sectors
from aecp.storage.chunk.errors import ChunkInvalid
from aecp.storage.chunk.journal import ReplicaMeta
from aecp.storage.chunk.locks import BlockLocks

#: what a request does once it holds its locks: (worker function, its arguments, apply result)
Job = tuple[Callable[..., Any], tuple[Any, ...], Callable[[Any], None] | None]


class Replica:
    """An open replica: paths, descriptors, metadata, locks and bookkeeping."""

    def __init__(self, root: Path, extent_id: str, meta: ReplicaMeta, lane: int) -> None:
        self.id = extent_id
        self.meta = meta
        self.lane = lane
        self.data_path = root / f"{extent_id}.data"
        self.meta_path = root / f"{extent_id}.meta"
        self.journal_path = root / f"{extent_id}.jrnl"
        self.data_fd = -1
        self.journal = Journal()
        self.locks = BlockLocks()
        #: blocks with an INTENT record in the journal since the last compaction
        self.touched: set[int] = set()
        #: blocks mutated since the last compaction (their INTENTs outlive it: ``compact``)
        self.written: set[int] = set()
        #: bytes of records in the journal (compaction when above ``compact_at``)
        self.journal_size = 0
        self.compact_at = max(2 * meta.snapshot_bytes(), 1 << 20)
        #: data written since the last flush captured the metadata
        self.unsynced = False
        #: persistence jobs submitted and not finished
        self.persisting = 0
        #: why the replica stopped taking mutations (a data write or an fsync failed)
        self.failed: str | None = None
        self.deleted = False
        #: persistence jobs that failed for want of room and put their records back
        self.setbacks = 0
        #: counts every mutation started, fence and re-create: a replica whose count did not
        #: move was left alone meanwhile (the orphan collector deletes only such a one)
        self.version = 0

    def intents_for(self, first_block: int, last_block: int) -> tuple[bytes, list[int]]:
        """INTENT records for the blocks not yet touched since the last compaction, and
        those blocks (counted as touched from now on: ``forget_intents`` if never appended)."""
        touched = self.touched
        if last_block - first_block == 1 and first_block in touched:
            return b"", []
        new = [b for b in range(first_block, last_block) if b not in touched]
        if not new:
            return b"", []
        touched.update(new)
        records = ReplicaMeta.encode_intents(new)
        self.journal_size += len(records)
        return records, new

    def forget_intents(self, records: bytes, blocks: list[int]) -> None:
        """The INTENT ``records`` for ``blocks`` never reached the journal (it was cut back)."""
        self.touched.difference_update(blocks)
        self.journal_size -= len(records)


def plan_write(
    rep: Replica, offset: int, data: Buffer, generation: int, crcs: array[int] | None = None
) -> Job:
    """Write ``data``; partial first/last sectors are merged with their current content.
    ``crcs`` (one per sector of an aligned write) are recorded instead of those computed."""
    meta, sec = rep.meta, rep.meta.sector
    first, end = offset // sec, offset + len(data)
    last = (end - 1) // sec
    head = (meta.is_valid(first), meta.crcs[first]) if offset % sec else None
    tail = None
    if end % sec and not (head is not None and last == first):
        tail = (meta.is_valid(last), meta.crcs[last])
    args = (rep.id, rep.data_fd, offset, data, sec, head, tail)
    if crcs is not None and not offset % sec and len(crcs) * sec == len(data):
        given = crcs
        return write_sectors, args, lambda _: meta.mark_written(first, given, generation)
    return write_sectors, args, lambda sums: meta.mark_written(first, sums, generation)


def plan_read(rep: Replica, offset: int, length: int) -> Job:
    """Read whole sectors, verify the valid ones, zero the others, cut the range out."""
    meta, sec = rep.meta, rep.meta.sector
    first, end = offset // sec, -(-(offset + length) // sec)
    bits = meta.valid_bits(first, end)
    return (
        read_sectors,
        (rep.id, rep.data_fd, offset, length, sec, first, bits, meta.crcs[first:end]),
        None,
    )


def plan_trim(rep: Replica, offset: int, length: int, generation: int) -> Job:
    """Whole sectors become invalid, valid partial ones get zeros, emptied blocks are punched.
    Every block the range touches gets ``generation``, even where nothing changed (a partial
    sector already invalid): a catch-up from before it then copies the block, whatever the
    replica behind holds there."""
    meta, sec, bs = rep.meta, rep.meta.sector, rep.meta.block_size
    end = offset + length
    whole = (-(-offset // sec), end // sec)
    partials = []
    if offset % sec:
        s = offset // sec
        partials.append((s, offset - s * sec, min(end, (s + 1) * sec) - s * sec))
    if end % sec and (not offset % sec or end // sec != offset // sec):
        s = end // sec
        partials.append((s, max(offset, s * sec) - s * sec, end - s * sec))
    valid = [(s, lo, hi, meta.crcs[s]) for s, lo, hi in partials if meta.is_valid(s)]
    emptied = meta.emptied_by(*whole) if whole[0] < whole[1] else []
    punches = coalesce([(b * bs, bs) for b in emptied])

    def apply(results: list[tuple[int, Any]]) -> None:
        if whole[0] < whole[1]:
            meta.clear(whole[0], whole[1], generation)
        for s, crcs in results:
            meta.mark_written(s, crcs, generation)
        meta.touch(offset // bs, (end - 1) // bs + 1, generation)

    return clear_sectors, (rep.id, rep.data_fd, sec, valid, punches), apply


def check_id(extent_id: str) -> None:
    if not isinstance(extent_id, str) or not EXTENT_ID.fullmatch(extent_id):
        raise ChunkInvalid(f"bad extent id {extent_id!r}", extent_id=str(extent_id)[:80])


def check_u64(**values: int) -> None:
    for name, value in values.items():
        if not isinstance(value, int) or not 0 <= value <= U64_MAX:
            raise ChunkInvalid(f"{name} {value!r} is not an unsigned 64-bit integer")


def check_range(rep: Replica, offset: int, length: int, align: int = 1) -> None:
    """Inside the extent, non-negative, aligned to ``align``."""
    size = rep.meta.size
    if offset < 0 or length < 0 or offset + length > size or offset % align or length % align:
        raise ChunkInvalid(
            f"extent {rep.id}: range {offset}+{length} is outside the extent (size {size})"
            + (f" or not aligned to {align}" if align > 1 else ""),
            extent_id=rep.id,
        )


def check_raw(rep: Replica, raw: RawBlocks) -> None:
    """Same geometry, whole blocks inside the extent, bitmaps and data consistent."""
    meta = rep.meta
    if (raw.block_size, raw.sector) != (meta.block_size, meta.sector):
        raise ChunkInvalid(f"raw blocks of {raw.block_size}/{raw.sector} bytes do not fit")
    check_range(rep, raw.offset, raw.length, align=meta.block_size)
    if len(raw.modgens) != len(raw.bitmaps) or any(not 0 <= b <= meta.full for b in raw.bitmaps):
        raise ChunkInvalid("raw blocks: bad bitmaps")
    check_u64(**{f"modgen[{i}]": g for i, g in enumerate(raw.modgens)})
    if len(raw.data) != meta.sector * sum(b.bit_count() for b in raw.bitmaps):
        raise ChunkInvalid("raw blocks: data does not match the bitmaps")


def coalesce(ranges: list[tuple[int, int]]) -> list[tuple[int, int]]:
    out: list[tuple[int, int]] = []
    for offset, length in ranges:
        if out and out[-1][0] + out[-1][1] == offset:
            out[-1] = (out[-1][0], out[-1][1] + length)
        else:
            out.append((offset, length))
    return out
