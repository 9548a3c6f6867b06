"""How much of its capacity a replica store uses, and the refusal of writes that would need
more (``ChunkIOError`` with ``ENOSPC``, before anything changes).

Space is counted in whole blocks: a block takes space from its first valid sector until a
trim or a recovery copy empties it again (the data file is sparse and emptied blocks are
punched). This overstates what a sparsely written block occupies on disk, on purpose: a block
may fill up later without asking for space again. The count starts from the files under the
store's root (``usage``) and follows every change the store makes; ``measure`` counts again
to correct any drift. Both count in the same unit: every block of a data file that holds any
data counts whole, plus what the metadata files (snapshots, journals) occupy. Counting the
sectors on disk instead (``st_blocks``) would undercount sparse blocks and let the store
exceed its capacity many times over.

Only a store given a ``capacity`` refuses anything: without one the disk itself is the limit,
and a write the disk refuses fails with ``ENOSPC`` too (``store.ReplicaStore`` does not mark a
replica failed for that, since nothing it holds was lost).
"""

from __future__ import annotations

import asyncio
import errno
import os
from pathlib import Path

from aecp.storage.chunk.errors import ChunkIOError


class Space:
    """The used bytes of one store, checked against ``capacity`` (None: no limit here)."""

    def __init__(self, root: Path, capacity: int | None, block_size: int) -> None:
        self.root = root
        self.capacity = capacity
        self.block_size = block_size
        self.used = usage(root, block_size) if capacity is not None else 0
        self._changed = 0  # net bytes counted since the store opened (for ``measure``)
        self._pending = 0  # reserved by mutations that have not finished yet

    def reserve(self, extent_id: str, need: int) -> int:
        """Count ``need`` more bytes (blocks a mutation is about to fill), or refuse with
        ``ENOSPC`` if they do not fit; returns what was counted (``settle`` it)."""
        if need <= 0:
            return 0
        if self.capacity is not None and self.used + need > self.capacity:
            raise ChunkIOError(
                f"extent {extent_id}: no space left: {need} more bytes needed, "
                f"{self.used} of {self.capacity} used",
                errno.ENOSPC,
            )
        self._pending += need
        self.change(need)
        return need

    def settle(self, reserved: int, grown: int) -> None:
        """A mutation that reserved ``reserved`` bytes is over, having filled ``grown`` bytes of
        blocks (negative: emptied; 0 if it failed)."""
        self._pending -= reserved
        self.change(grown - reserved)

    def change(self, delta: int) -> None:
        """Blocks were filled (positive) or emptied (negative)."""
        self.used = max(0, self.used + delta)
        self._changed += delta

    async def measure(self) -> int:
        """Count again from the disk; returns the bytes used. Changes made while the files are
        walked, and blocks reserved but not yet written, may be counted twice until the next
        measure (never missed)."""
        before, pending = self._changed, self._pending
        measured = await asyncio.to_thread(usage, self.root, self.block_size)
        self.used = measured + pending + max(0, self._changed - before)
        return self.used

    def free(self) -> int | None:
        """Bytes still free under ``capacity`` (None without one)."""
        return None if self.capacity is None else max(0, self.capacity - self.used)


def usage(root: Path, block_size: int) -> int:
    """Bytes used under ``root`` as ``Space`` counts them: each ``block_size`` block of a
    ``.data`` file holding any data counts whole; other files count what they occupy."""
    total = 0
    for dirpath, _, names in os.walk(root):
        for name in names:
            path = os.path.join(dirpath, name)
            try:
                if name.endswith(".data"):
                    total += data_blocks(path, block_size) * block_size
                else:
                    total += os.stat(path).st_blocks * 512
            except FileNotFoundError:  # deleted meanwhile
                continue
    return total


def data_blocks(path: str, block_size: int) -> int:
    """How many ``block_size`` blocks of the sparse file at ``path`` hold any data."""
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        st = os.fstat(fd)
        blocks, pos, counted = 0, 0, -1  # counted: the last block already counted
        while pos < st.st_size:
            try:
                start = os.lseek(fd, pos, os.SEEK_DATA)
            except OSError as exc:
                if exc.errno == errno.ENXIO:  # no data after pos
                    break
                if exc.errno == errno.EINVAL:  # the file system cannot say: all of it
                    return -(-st.st_size // block_size)
                raise
            end = os.lseek(fd, start, os.SEEK_HOLE)
            first, last = max(start // block_size, counted + 1), (end - 1) // block_size
            if last >= first:
                blocks += last - first + 1
                counted = last
            pos = end
        return blocks
    finally:
        os.close(fd)
