"""Undoing a write (or trim) that some replicas refused for want of space.

A replica refuses such a write before changing anything, but the other replicas of the extent
may have taken it. The client is told ENOSPC, so either content is allowed in that range, but
the replicas must agree on one, or a read would return one or the other depending on the
replica it is served from. The replicas that took the write are therefore given back what a
refusing replica holds in the range: its valid sectors are written to them, its invalid ones
trimmed (which also returns the blocks the write had filled). Every write acknowledged before
is on the refusing replica too, so none is lost.

Other writes to the extent may have been in flight meanwhile, so nothing is decided before
the extent is quiesced (no write to it runs) and its record read again:

- The source must still be a valid replica. One dropped meanwhile (a later write failed on it
  and was acknowledged by the others alone) no longer holds every acknowledged write: copying
  it would overwrite one. If no refusing replica is valid any more, every valid replica took
  the write, and they agree already.
- The targets are those that took the write and are still valid, or still joining.
- Replicas that took it, or refused it, and were dropped meanwhile differ from the valid ones
  in the range until they catch up, and a catch-up copies only blocks modified after the
  generation they missed from. Their catch-up is therefore made to start before the write's
  generation (``VolumeDevice.drop`` with ``missed_from``). A target that fails the undo, or a
  source that cannot be reached, is dropped the same way.

An access point fenced or closed meanwhile undoes nothing: a newer one owns the volume.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from contextlib import AbstractAsyncContextManager
from typing import Protocol

from aecp.common.errors import AecpError
from aecp.storage.blockdev import Fenced, NoSpace
from aecp.storage.chunk.errors import ChecksumError, ChunkError, StaleEpoch
from aecp.storage.meta.model import ExtentRecord
from aecp.storage.pool import ReplicaPool

log = logging.getLogger(__name__)


class Refused(NoSpace):
    """Replicas on ``full`` refused a mutation of ``ext_id`` for want of space; ``took`` are
    those of ``targets`` (the valid replicas, then any joining one) whose result (``results``,
    in the same order) was a success. ``generation``: the one the mutation was sent under."""

    def __init__(
        self,
        volume: str,
        ext_id: str,
        full: list[str],
        targets: Sequence[str],
        results: Sequence[object],
        generation: int,
    ) -> None:
        super().__init__(f"volume {volume}: no space left for extent {ext_id} on {', '.join(full)}")
        self.ext_id, self.full, self.generation = ext_id, full, generation
        self.took = [
            n for n, r in zip(targets, results, strict=True) if not isinstance(r, BaseException)
        ]


class Undoer(Protocol):
    """What ``undo`` needs of the access point (``storage.access.VolumeDevice``)."""

    pool: ReplicaPool

    def quiesced(self, ext_id: str) -> AbstractAsyncContextManager[None]: ...

    async def current(self, ext_id: str) -> ExtentRecord: ...

    def joiner(self, ext_id: str) -> str | None: ...

    async def drop(self, ext_id: str, nodes: list[str], missed_from: int | None = None) -> None: ...

    def mark_dirty(self, ext_id: str) -> None: ...


async def undo(dev: Undoer, refused: Refused, offset: int, length: int, epoch: int) -> None:
    """Make the replicas of the refused mutation's extent agree again on ``[offset,
    offset+length)`` (see the module docstring). Failures are logged, never raised: the
    caller raises ``refused``."""
    if not refused.took:
        return
    ext_id = refused.ext_id
    try:
        async with dev.quiesced(ext_id):
            await _undo_quiesced(dev, refused, offset, length, epoch)
    except Fenced as exc:
        log.info("extent %s: refused write not undone: %s", ext_id, exc)
    except AecpError as exc:  # Meta unreachable, or nothing left to drop
        log.warning(
            "extent %s: a write refused for space stays at %d+%d on %s: %s",
            ext_id,
            offset,
            length,
            ", ".join(refused.took),
            exc,
        )


async def _undo_quiesced(
    dev: Undoer, refused: Refused, offset: int, length: int, epoch: int
) -> None:
    ext_id, missed = refused.ext_id, refused.generation - 1
    ext = await dev.current(ext_id)
    joiner = dev.joiner(ext_id)
    members = {*ext.replicas, *([joiner] if joiner else [])}
    targets = [n for n in refused.took if n in members]
    gone = [n for n in (*refused.took, *refused.full) if n not in members]
    if gone:  # dropped meanwhile: their catch-up must cover this write's blocks
        await dev.drop(ext_id, gone, missed_from=missed)
    for source in [n for n in refused.full if n in ext.replicas]:
        try:
            content = await _read(dev.pool, ext_id, source, offset, length)
        except ChecksumError as exc:  # a read repairs it from a replica that reads well
            log.warning("extent %s: %s cannot be undone from: %s", ext_id, source, exc)
            continue
        except ChunkError as exc:
            log.warning("extent %s: %s is unreachable: dropped (%s)", ext_id, source, exc)
            await dev.drop(ext_id, [source], missed_from=missed)
            continue
        failed = await restore(dev.pool, ext_id, content, targets, epoch, ext.generation)
        if failed:
            await dev.drop(ext_id, failed, missed_from=missed)
        dev.mark_dirty(ext_id)
        log.info(
            "extent %s: a write refused for space on %s was undone on %s",
            ext_id,
            source,
            ", ".join(n for n in targets if n not in failed) or "no replica",
        )
        return
    log.info("extent %s: no replica that refused the write is valid: all agree", ext_id)


Content = tuple[int, bytes, list[tuple[int, int, bool]]]


async def _read(pool: ReplicaPool, ext_id: str, source: str, offset: int, length: int) -> Content:
    """What ``source`` holds in the range: its data and ``(start, length, valid)`` runs."""
    src = await pool.client(source)
    data = await src.read(ext_id, offset, length)
    return offset, data, _clip(await src.allocation(ext_id), offset, length)


async def restore(
    pool: ReplicaPool,
    ext_id: str,
    content: Content,
    targets: list[str],
    epoch: int,
    generation: int,
) -> list[str]:
    """Make ``targets``' bytes of ``ext_id`` what ``content`` (from ``_read``) says; returns the
    targets that failed (a target that refuses the epoch means a newer access point: none of
    them is returned then)."""
    offset, data, runs = content
    failed = []
    for node in targets:
        try:
            dst = await pool.client(node)
            for start, n, valid in runs:
                if valid:
                    part = data[start - offset : start - offset + n]
                    await dst.write(ext_id, start, part, epoch=epoch, generation=generation)
                else:
                    await dst.trim(ext_id, start, n, epoch=epoch, generation=generation)
        except StaleEpoch as exc:
            log.info("extent %s: refused write not undone: %s", ext_id, exc)
            return []
        except ChunkError as exc:
            log.warning("extent %s: undo on %s failed: %s", ext_id, node, exc)
            failed.append(node)
    return failed


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
