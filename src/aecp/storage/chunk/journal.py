"""The replica journal: the in-memory tables of one extent replica and their on-disk encoding.

In memory (``ReplicaMeta``), per block: the valid bitmap (``array('Q')``, bit i = sector i of
the block), the modification generation (``array('Q')``), and per sector a CRC-32 (zlib) of its
4 KiB (``array('I')``; 0 for invalid sectors). A block is *allocated* iff its bitmap is not 0.
Only the event-loop thread mutates these tables.

On disk, per replica ``<id>`` (all integers little-endian):

``<id>.meta`` — the snapshot, replaced atomically (written to ``<id>.meta.tmp``, fsynced,
renamed, directory fsynced)::

    header  magic "AECPRMD1" | version u32 = 1 | block_size u32 | sector u32 | reserved u32
            | size u64 | epoch u64 | generation u64 | serial u64 | body_crc u32 | header_crc u32
    body    bitmaps: nblocks x u64 | modgens: nblocks x u64 | crcs: nblocks*spb x u32

``<id>.jrnl`` — the journal of changes since the snapshot, append-only::

    header  magic "AECPRJN1" | serial u64 | crc u32      (serial = the snapshot's serial)
    record  kind u8 | 3 x pad | index u32 | a u64 | b u64 | payload | crc u32 (of all before)
            kind 1 STATE   a = epoch, b = generation
            kind 2 BLOCK   index = block, a = bitmap, b = modgen, payload = spb x u32 crcs
            kind 3 INTENT  index = block: "this block may change" (see below)

Loading replays the records of a journal whose serial matches the snapshot's and stops at the
first torn record (the caller truncates it away); a journal of another serial is stale (a
compaction finished its snapshot but not the journal reset) and is ignored. ``flush`` appends
BLOCK/STATE records for what changed and fsyncs; when the journal outgrows the snapshot, a flush
*compacts* instead: new snapshot with serial + 1, then the journal is reset.

INTENT records are written (without fsync) before the first data write to a block after each
compaction. After a process crash the data file holds writes whose checksums never reached the
journal; loading re-verifies the valid sectors of every block named by an INTENT and adopts the
checksum of what is on disk, so a killed process never leaves false checksum errors. After a
power loss, INTENTs still in the page cache may be lost: such sectors read as ``ChecksumError``
until repaired from a peer (as for media corruption).
"""

from __future__ import annotations

import struct
import sys
import zlib
from array import array
from collections.abc import Iterable, Sequence

from aecp.storage.chunk.errors import ChunkIOError

SNAP_MAGIC = b"AECPRMD1"
JOURNAL_MAGIC = b"AECPRJN1"
VERSION = 1

SNAP_HEAD = struct.Struct("<8sIIIIQQQQI")
CRC = struct.Struct("<I")
JOURNAL_HEAD = struct.Struct("<8sQ")
RECORD = struct.Struct("<B3xIQQ")

KIND_STATE = 1
KIND_BLOCK = 2
KIND_INTENT = 3

_LITTLE = sys.byteorder == "little"
if array("I").itemsize != 4 or array("Q").itemsize != 8:  # pragma: no cover - exotic platforms
    raise ImportError("aecp.storage.chunk needs 4-byte array('I') and 8-byte array('Q')")


def _le(arr: array[int]) -> bytes:
    """The little-endian bytes of ``arr``."""
    if _LITTLE:
        return arr.tobytes()
    copy = array(arr.typecode, arr)  # pragma: no cover - big-endian hosts
    copy.byteswap()  # pragma: no cover
    return copy.tobytes()  # pragma: no cover


def _from_le(typecode: str, data: bytes | memoryview) -> array[int]:
    arr = array(typecode)
    arr.frombytes(data)
    if not _LITTLE:  # pragma: no cover - big-endian hosts
        arr.byteswap()
    return arr


def _with_crc(body: bytes) -> bytes:
    return body + CRC.pack(zlib.crc32(body))


class ReplicaMeta:
    """Metadata of one replica; see the module docstring."""

    __slots__ = (
        "bitmaps",
        "block_size",
        "crcs",
        "dirty",
        "epoch",
        "full",
        "generation",
        "modgens",
        "nblocks",
        "sector",
        "serial",
        "size",
        "spb",
        "state_dirty",
    )

    def __init__(
        self, size: int, block_size: int, sector: int, epoch: int = 0, generation: int = 0
    ) -> None:
        self.size = size
        self.block_size = block_size
        self.sector = sector
        self.spb = block_size // sector
        self.nblocks = size // block_size
        self.full = (1 << self.spb) - 1
        self.epoch = epoch
        self.generation = generation
        self.serial = 0
        self.bitmaps = array("Q", bytes(8 * self.nblocks))
        self.modgens = array("Q", bytes(8 * self.nblocks))
        self.crcs = array("I", bytes(4 * self.nblocks * self.spb))
        #: blocks changed since the last flush captured them
        self.dirty: set[int] = set()
        #: epoch or generation changed since the last flush captured them
        self.state_dirty = False

    # --- queries -------------------------------------------------------------------------

    def is_valid(self, sector: int) -> bool:
        block = sector // self.spb
        return bool(self.bitmaps[block] >> (sector - block * self.spb) & 1)

    def valid_bits(self, first_sector: int, end_sector: int) -> list[bool]:
        """Validity of each sector in ``[first_sector, end_sector)``."""
        spb, out, sector = self.spb, [], first_sector
        while sector < end_sector:
            block = sector // spb
            stop = min(end_sector, (block + 1) * spb)
            bitmap = self.bitmaps[block]
            if bitmap == self.full or not bitmap:
                out += [bool(bitmap)] * (stop - sector)
            else:
                out += [bool(bitmap >> (s - block * spb) & 1) for s in range(sector, stop)]
            sector = stop
        return out

    def emptied_by(self, first_sector: int, end_sector: int) -> list[int]:
        """Blocks holding valid sectors that would hold none once these sectors are cleared."""
        spb, out = self.spb, []
        for block in range(first_sector // spb, (end_sector - 1) // spb + 1):
            lo = max(first_sector, block * spb) - block * spb
            hi = min(end_sector, (block + 1) * spb) - block * spb
            old = self.bitmaps[block]
            if old and not old & ~(((1 << (hi - lo)) - 1) << lo):
                out.append(block)
        return out

    def allocated_blocks(self) -> int:
        return sum(1 for b in self.bitmaps if b)

    def allocated_in(self, first_block: int, last_block: int) -> int:
        """How many of the blocks ``[first_block, last_block)`` hold a valid sector."""
        if last_block - first_block == 1:
            return 1 if self.bitmaps[first_block] else 0
        return sum(1 for b in self.bitmaps[first_block:last_block] if b)

    def valid_sectors(self) -> int:
        return sum(b.bit_count() for b in self.bitmaps)

    def any_valid(self, first_block: int, last_block: int) -> bool:
        return any(self.bitmaps[first_block:last_block])

    def modified_since(self, generation: int) -> list[tuple[int, int]]:
        """Coalesced byte ranges of the blocks whose modgen exceeds ``generation``."""
        out: list[tuple[int, int]] = []
        bs = self.block_size
        for block, modgen in enumerate(self.modgens):
            if modgen <= generation:
                continue
            if out and out[-1][0] + out[-1][1] == block * bs:
                out[-1] = (out[-1][0], out[-1][1] + bs)
            else:
                out.append((block * bs, bs))
        return out

    def runs(self) -> list[tuple[int, int, bool]]:
        """``(offset, length, valid)`` runs covering the extent, coalesced."""
        out: list[tuple[int, int, bool]] = []
        sec, spb, full = self.sector, self.spb, self.full
        for block, bitmap in enumerate(self.bitmaps):
            if bitmap in (0, full):
                _extend(out, block * self.block_size, self.block_size, bitmap == full)
                continue
            for i in range(spb):
                _extend(out, (block * spb + i) * sec, sec, bool(bitmap >> i & 1))
        return out

    # --- mutations (event-loop thread only) ----------------------------------------------

    def mark_written(self, first_sector: int, crcs: array[int], modgen: int | None) -> None:
        """Sectors ``first_sector ..`` (one per crc) now hold data with these crcs; the blocks
        get ``modgen`` (unless None) when it is higher than theirs."""
        end = first_sector + len(crcs)
        self.crcs[first_sector:end] = crcs
        spb, sector = self.spb, first_sector
        while sector < end:
            block = sector // spb
            stop = end if end <= (block + 1) * spb else (block + 1) * spb
            self.bitmaps[block] |= ((1 << (stop - sector)) - 1) << (sector - block * spb)
            if modgen is not None and self.modgens[block] < modgen:
                self.modgens[block] = modgen
            self.dirty.add(block)
            sector = stop
        if modgen is not None and modgen > self.generation:
            self.generation = modgen
            self.state_dirty = True

    def clear(self, first_sector: int, end_sector: int, modgen: int) -> None:
        """Sectors ``[first_sector, end_sector)`` become invalid; touched blocks get
        ``modgen`` (when higher), as does the replica generation."""
        spb, sector = self.spb, first_sector
        while sector < end_sector:
            block = sector // spb
            stop = min(end_sector, (block + 1) * spb)
            mask = ((1 << (stop - sector)) - 1) << (sector - block * spb)
            self.bitmaps[block] &= ~mask & self.full
            self.crcs[sector:stop] = array("I", bytes(4 * (stop - sector)))
            self.modgens[block] = max(self.modgens[block], modgen)
            self.dirty.add(block)
            sector = stop
        if modgen > self.generation:
            self.generation = modgen
            self.state_dirty = True

    def touch(self, first_block: int, last_block: int, modgen: int) -> None:
        """Blocks ``[first_block, last_block)`` get ``modgen`` (when higher), as does the
        replica generation, whatever changed in them (a trim of sectors already invalid)."""
        for block in range(first_block, last_block):
            if self.modgens[block] < modgen:
                self.modgens[block] = modgen
                self.dirty.add(block)
        if modgen > self.generation:
            self.generation = modgen
            self.state_dirty = True

    def set_block(self, block: int, bitmap: int, modgen: int, crcs: array[int]) -> None:
        """Make block ``block`` exactly this (recovery copy)."""
        self.bitmaps[block] = bitmap
        self.modgens[block] = modgen
        self.crcs[block * self.spb : (block + 1) * self.spb] = crcs
        self.dirty.add(block)

    # --- encoding ------------------------------------------------------------------------

    def encode_snapshot(self) -> bytes:
        body = b"".join((_le(self.bitmaps), _le(self.modgens), _le(self.crcs)))
        head = SNAP_HEAD.pack(
            SNAP_MAGIC,
            VERSION,
            self.block_size,
            self.sector,
            0,
            self.size,
            self.epoch,
            self.generation,
            self.serial,
            zlib.crc32(body),
        )
        return _with_crc(head) + body

    @classmethod
    def decode_snapshot(cls, data: bytes) -> ReplicaMeta:
        """Parse a snapshot; ``ChunkIOError`` if it is damaged."""
        hlen = SNAP_HEAD.size + CRC.size
        if len(data) < hlen or CRC.unpack_from(data, SNAP_HEAD.size)[0] != zlib.crc32(
            data[: SNAP_HEAD.size]
        ):
            raise ChunkIOError("replica metadata header is damaged")
        magic, version, bs, sec, _, size, epoch, gen, serial, body_crc = SNAP_HEAD.unpack_from(data)
        if magic != SNAP_MAGIC or version != VERSION or sec <= 0 or bs % sec or size % bs:
            raise ChunkIOError("replica metadata header is not understood")
        meta = cls(size, bs, sec, epoch, gen)
        body = memoryview(data)[hlen:]
        n = meta.nblocks
        if len(body) != n * (16 + 4 * meta.spb) or zlib.crc32(body) != body_crc:
            raise ChunkIOError("replica metadata body is damaged")
        meta.bitmaps = _from_le("Q", body[: 8 * n])
        meta.modgens = _from_le("Q", body[8 * n : 16 * n])
        meta.crcs = _from_le("I", body[16 * n :])
        meta.serial = serial
        return meta

    def snapshot_bytes(self) -> int:
        return SNAP_HEAD.size + CRC.size + self.nblocks * (16 + 4 * self.spb)

    def journal_header(self) -> bytes:
        return _with_crc(JOURNAL_HEAD.pack(JOURNAL_MAGIC, self.serial))

    def encode_state(self) -> bytes:
        return _with_crc(RECORD.pack(KIND_STATE, 0, self.epoch, self.generation))

    def encode_blocks(self, blocks: Iterable[int]) -> bytes:
        spb, out = self.spb, []
        for b in sorted(blocks):
            head = RECORD.pack(KIND_BLOCK, b, self.bitmaps[b], self.modgens[b])
            out.append(_with_crc(head + _le(self.crcs[b * spb : (b + 1) * spb])))
        return b"".join(out)

    @staticmethod
    def encode_intents(blocks: Sequence[int]) -> bytes:
        return b"".join(_with_crc(RECORD.pack(KIND_INTENT, b, 0, 0)) for b in blocks)

    def replay(self, journal: bytes) -> tuple[int, set[int]] | None:
        """Apply the records of ``journal`` (header included). Returns the length of its
        intact prefix and the blocks named by INTENT records, or None if the journal belongs
        to another snapshot (or has no intact header)."""
        hlen = JOURNAL_HEAD.size + CRC.size
        if len(journal) < hlen or journal[:hlen] != self.journal_header():
            return None
        pos, suspects = hlen, set[int]()
        view = memoryview(journal)
        while (size := self._record_size(view, pos)) is not None:
            kind, index, a, b = RECORD.unpack_from(view, pos)
            if kind == KIND_STATE:
                self.epoch, self.generation = a, b
            elif kind == KIND_BLOCK:
                crcs = _from_le("I", view[pos + RECORD.size : pos + size - CRC.size])
                self.set_block(index, a, b, crcs)
            else:
                suspects.add(index)
            pos += size
        self.dirty.clear()
        return pos, suspects

    def _record_size(self, view: memoryview, pos: int) -> int | None:
        """Size of the intact record at ``pos``, or None (end, torn or damaged)."""
        if len(view) - pos < RECORD.size + CRC.size:
            return None
        kind, index, a, _ = RECORD.unpack_from(view, pos)
        payload = 4 * self.spb if kind == KIND_BLOCK else 0
        size = RECORD.size + payload + CRC.size
        if kind not in (KIND_STATE, KIND_BLOCK, KIND_INTENT) or len(view) - pos < size:
            return None
        if kind != KIND_STATE and (index >= self.nblocks or a > self.full):
            return None
        end = pos + size - CRC.size
        if CRC.unpack_from(view, end)[0] != zlib.crc32(view[pos:end]):
            return None
        return size


def _extend(out: list[tuple[int, int, bool]], offset: int, length: int, valid: bool) -> None:
    if out and out[-1][2] == valid:
        out[-1] = (out[-1][0], out[-1][1] + length, valid)
    else:
        out.append((offset, length, valid))
