"""How much of its capacity a replica store uses, and the refusal of writes that would need
more (``ChunkIOError`` with ``ENOSPC``, before anything changes).

Space is counted in whole blocks: a block takes space from its first valid sector until a
trim or a recovery copy empties it again (the data file is sparse and emptied blocks are
punched). The count starts from what the files under the store's root really occupy
(``measure``) and follows every change the store makes; ``measure`` again corrects any drift
(partly written blocks, metadata files), erring on the side of counting too much.

Only a store given a ``capacity`` refuses anything: without one the disk itself is the limit,
and a write the disk refuses fails with ``ENOSPC`` too (``store.ReplicaStore`` does not mark a
replica failed for that, since nothing it holds was lost).
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import os
from pathlib import Path

from aecp.storage.chunk.errors import ChunkIOError


class Space:
    """The used bytes of one store, checked against ``capacity`` (None: no limit here)."""

    def __init__(self, root: Path, capacity: int | None) -> None:
        self.root = root
        self.capacity = capacity
        self.used = disk_usage(root) if capacity is not None else 0
        self._changed = 0  # net bytes counted since the store opened (for ``measure``)

    def reserve(self, extent_id: str, need: int) -> int:
        """Count ``need`` more bytes (blocks a mutation is about to fill), or refuse with
        ``ENOSPC`` if they do not fit; returns what was counted."""
        if need <= 0:
            return 0
        if self.capacity is not None and self.used + need > self.capacity:
            raise ChunkIOError(
                f"extent {extent_id}: no space left: {need} more bytes needed, "
                f"{self.used} of {self.capacity} used",
                errno.ENOSPC,
            )
        self.change(need)
        return need

    def change(self, delta: int) -> None:
        """Blocks were filled (positive) or emptied (negative)."""
        self.used = max(0, self.used + delta)
        self._changed += delta

    async def measure(self) -> int:
        """Count again from the disk; returns the bytes used. Changes made while the files are
        walked may be counted twice until the next measure (never missed)."""
        before = self._changed
        measured = await asyncio.to_thread(disk_usage, self.root)
        self.used = measured + max(0, self._changed - before)
        return self.used

    def free(self) -> int | None:
        """Bytes still free under ``capacity`` (None without one)."""
        return None if self.capacity is None else max(0, self.capacity - self.used)


def disk_usage(root: Path) -> int:
    """Bytes really allocated under ``root`` (sparse files count what they hold)."""
    total = 0
    for dirpath, _, files in os.walk(root):
        for f in files:
            with contextlib.suppress(OSError):
                total += os.stat(os.path.join(dirpath, f)).st_blocks * 512
    return total
