"""Undoing a write that some replicas refused for want of space.

A replica refuses such a write before changing anything, but the other replicas of the extent
may have taken it. The client is told ENOSPC, so either content is allowed in that range, but
the replicas must agree on one, or a read would return one or the other depending on the
replica it is served from. The replicas that took the write are therefore given back what the
refusing replica holds in the range: its valid sectors are written to them, its invalid ones
trimmed (which also returns the blocks the write had filled). Every write acknowledged before
is on the refusing replica too, so none is lost. The caller holds the extent quiesced (no
write to it runs meanwhile); the writes carry its epoch like any other.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

from aecp.storage.blockdev import NoSpace
from aecp.storage.chunk.errors import ChunkError
from aecp.storage.pool import ReplicaPool

log = logging.getLogger(__name__)


class Refused(NoSpace):
    """Replicas on ``full`` refused a write to ``ext_id`` for want of space; ``took`` are
    those of ``replicas`` whose result (``results``, in the same order) was a success."""

    def __init__(
        self,
        volume: str,
        ext_id: str,
        full: list[str],
        replicas: Sequence[str],
        results: Sequence[object],
    ) -> None:
        super().__init__(f"volume {volume}: no space left for extent {ext_id} on {', '.join(full)}")
        self.ext_id, self.full = ext_id, full
        self.took = [
            n for n, r in zip(replicas, results, strict=False) if not isinstance(r, BaseException)
        ]

    async def undo(
        self, pool: ReplicaPool, offset: int, length: int, epoch: int, generation: int
    ) -> bool:
        """``restore`` the range on the replicas that took the write (extent quiesced)."""
        args = (self.ext_id, offset, length, self.full[0], self.took, epoch, generation)
        return await restore(pool, *args)


async def restore(
    pool: ReplicaPool,
    ext_id: str,
    offset: int,
    length: int,
    source: str,
    targets: list[str],
    epoch: int,
    generation: int,
) -> bool:
    """Make ``targets``' bytes ``[offset, offset+length)`` of ``ext_id`` what ``source`` holds
    there. False (logged) if that failed: the range then differs between replicas until it is
    written again."""
    try:
        src = await pool.client(source)
        data = await src.read(ext_id, offset, length)
        runs = _clip(await src.allocation(ext_id), offset, length)
        for node in targets:
            dst = await pool.client(node)
            for start, n, valid in runs:
                if valid:
                    part = data[start - offset : start - offset + n]
                    await dst.write(ext_id, start, part, epoch=epoch, generation=generation)
                else:
                    await dst.trim(ext_id, start, n, epoch=epoch, generation=generation)
    except ChunkError as exc:
        log.warning(
            "extent %s: a write refused for space on %s stays on %s at %d+%d: %s",
            ext_id,
            source,
            ", ".join(targets),
            offset,
            length,
            exc,
        )
        return False
    log.info(
        "extent %s: a write refused for space on %s was undone on %s",
        ext_id,
        source,
        ", ".join(targets),
    )
    return True


def _clip(
    runs: list[tuple[int, int, bool]], offset: int, length: int
) -> list[tuple[int, int, bool]]:
    """The parts of ``(start, length, valid)`` runs inside ``[offset, offset+length)``."""
    out = []
    end = offset + length
    for start, n, valid in runs:
        lo, hi = max(start, offset), min(start + n, end)
        if lo < hi:
            out.append((lo, hi - lo, valid))
    return out
