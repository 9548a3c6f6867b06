"""Undoing a write (or trim) that some replicas refused for want of space.

A replica refuses such a request before changing anything, but the other replicas of the
extent may have taken it. The client is told ENOSPC, so either content is allowed in that
range, but the replicas must agree on one, or a read would return one or the other depending
on the replica it is served from. So one valid replica's content of the range is given to
every replica of the extent (``restore``): its valid sectors are written, its invalid ones
trimmed. Any valid replica holds every acknowledged write, so none is lost, whichever is
chosen and however late. The *source* is chosen so that the others need no room:

- for a write, a replica that refused it (the others get their blocks back, and the write
  had filled them already, so nothing needs space); if none is valid, one that took it;
- for a trim, a replica that took it: the trim is completed on those that refused it, rather
  than refilling the blocks it emptied on the others (on a full disk that refill would fail).

Sectors of the source that fail their checksum are taken from another candidate that reads
them well; any that none reads well are left as they are, for a read or the scrubber to repair.

Nothing is decided before the extent is quiesced (no write to it runs) and its record read
again: other writes to it may have been in flight, and replicas may have been dropped or have
joined meanwhile. The source must be a valid replica *now*: one dropped meanwhile may lack a
write acknowledged since. Every member, the source and a joining replica included, is given
the content at the extent's current generation. That raises the modification generation of
the range's blocks above the generation any replica dropped so far catches up from, so such
a catch-up copies the range back even if no Meta write below succeeds.

Afterwards Meta is told, in one change, about the replicas that failed the undo (dropped)
and those that took or refused the request and were dropped meanwhile (their catch-up is
lowered to start before the request's generation; ``VolumeDevice.drop`` with
``missed_from``). A member that fails the undo for want of room is *not* dropped: a full disk
fails requests, not replicas.

An undo that did not complete (Meta unreachable, a member without room, no valid replica
answering) is not forgotten: it stays pending in the access point (``Undos``) and is tried
again at every recovery pass (``retry``) and when the access point closes. While one is
pending, every replica of that extent the access point drops, and every replica it catches
up, starts from before the request's generation (``Undos.floor``): a member that still holds
the refused request cannot then keep it through a catch-up. Until then a read of the range
may return either content.

An access point fenced or closed meanwhile undoes nothing: a newer one owns the volume.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass, field
from typing import Protocol

from aecp.common.errors import AecpError, NotFound
from aecp.storage.blockdev import Fenced, NoSpace
from aecp.storage.chunk.api import ReplicaClient
from aecp.storage.chunk.errors import ChecksumError, ChunkError, StaleEpoch
from aecp.storage.fanout import no_space
from aecp.storage.meta.model import ExtentRecord
from aecp.storage.pool import ReplicaPool

log = logging.getLogger(__name__)
SECTOR = 4096


class Refused(NoSpace):
    """Replicas on ``full`` refused a mutation of ``ext_id`` for want of space. Of ``targets``
    (the valid replicas, then any joining one; ``results`` in the same order), ``took`` are
    those that took it and ``unknown`` those that failed otherwise (they may have taken it).
    ``generation``: the one the mutation was sent under."""

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
        outcomes = list(zip(targets, results, strict=True))
        self.took = [n for n, r in outcomes if not isinstance(r, BaseException)]
        self.unknown = [n for n, r in outcomes if isinstance(r, BaseException) and n not in full]

    @property
    def involved(self) -> list[str]:
        """Every node the mutation reached, whatever it did."""
        return [*self.took, *self.unknown, *self.full]


@dataclass(eq=False)
class Undo:
    """One refused mutation to undo: ``[offset, offset+length)`` of ``refused.ext_id``."""

    refused: Refused
    offset: int
    length: int
    trim: bool
    attempts: int = 0
    running: bool = field(default=False)

    @property
    def what(self) -> str:
        return "trim" if self.trim else "write"


class Undos:
    """The undos of one access point that have not completed yet, by extent."""

    def __init__(self) -> None:
        self._pending: dict[str, list[Undo]] = {}

    def __bool__(self) -> bool:
        return bool(self._pending)

    def add(self, u: Undo) -> None:
        self._pending.setdefault(u.refused.ext_id, []).append(u)

    def discard(self, u: Undo) -> None:
        left = [p for p in self._pending.get(u.refused.ext_id, []) if p is not u]
        if left:
            self._pending[u.refused.ext_id] = left
        else:
            self._pending.pop(u.refused.ext_id, None)

    def pending(self) -> list[Undo]:
        return [u for us in self._pending.values() for u in us]

    def floor(self, ext_id: str) -> int | None:
        """The generation replicas of ``ext_id`` must catch up from, at the latest, while an
        undo of it is pending: one before the oldest pending mutation's; None if none is."""
        pending = self._pending.get(ext_id)
        return min(u.refused.generation for u in pending) - 1 if pending else None


class Undoer(Protocol):
    """What ``undo`` needs of the access point (``storage.access.VolumeDevice``)."""

    pool: ReplicaPool
    epoch: int
    undos: Undos

    def quiesced(self, ext_id: str) -> AbstractAsyncContextManager[None]: ...

    async def current(self, ext_id: str) -> ExtentRecord: ...

    def joiner(self, ext_id: str) -> str | None: ...

    def fail_join(self, ext_id: str) -> None: ...

    async def drop(self, ext_id: str, nodes: list[str], missed_from: int | None = None) -> None: ...

    def mark_dirty(self, ext_id: str) -> None: ...


async def undo(dev: Undoer, refused: Refused, offset: int, length: int, trim: bool = False) -> None:
    """Make the replicas of the refused mutation's extent agree again on ``[offset,
    offset+length)`` (see the module docstring); if that cannot be completed now, it stays
    pending. Failures are logged, never raised: the caller raises ``refused``."""
    if not (refused.took or refused.unknown):
        return  # every replica refused it: none changed
    u = Undo(refused, offset, length, trim)
    dev.undos.add(u)
    await _run(dev, u)


async def retry(dev: Undoer) -> list[str]:
    """Try every pending undo of ``dev`` once more; one sentence each."""
    return [await _run(dev, u) for u in dev.undos.pending() if not u.running]


async def _run(dev: Undoer, u: Undo) -> str:
    """One attempt at ``u``: forgotten once complete (or once the access point is fenced),
    else left pending. Returns what happened, as logged."""
    ext_id = u.refused.ext_id
    u.running, u.attempts = True, u.attempts + 1
    try:
        complete, why = await _attempt(dev, u)
    except Fenced as exc:
        dev.undos.discard(u)
        why = f"extent {ext_id}: refused {u.what} not undone: {exc}"
        log.info("%s", why)
        return why
    except (AecpError, OSError) as exc:  # Meta unreachable, a replica store failing
        complete, why = False, str(exc)
    finally:
        u.running = False
    if complete:
        dev.undos.discard(u)
        log.info("%s", why)
        return why
    why = (
        f"extent {ext_id}: a {u.what} refused for space at {u.offset}+{u.length} is not undone "
        f"yet (attempt {u.attempts}; retried at the next recovery pass): {why}"
    )
    log.warning("%s", why)
    return why


@dataclass
class Content:
    """What a replica holds in ``[offset, offset+len(data))``: its bytes, its ``(start,
    length, valid)`` runs, and the sectors no candidate read well (``unread``: left out)."""

    offset: int
    data: bytes
    runs: list[tuple[int, int, bool]]
    unread: set[int]


async def _attempt(dev: Undoer, u: Undo) -> tuple[bool, str]:
    """Try ``u`` once, quiesced: (whether it completed, one sentence)."""
    r, ext_id = u.refused, u.refused.ext_id
    async with dev.quiesced(ext_id):
        try:
            ext = await dev.current(ext_id)
        except NotFound:
            return True, f"extent {ext_id} is gone: its refused {u.what} needs no undo"
        epoch, joiner = dev.epoch, dev.joiner(ext_id)
        got = await _content(dev.pool, ext_id, _candidates(ext, r, u.trim), u.offset, u.length)
        if got is None:
            return False, "no valid replica could be read"
        source, content = got
        members = [*ext.replicas, *([joiner] if joiner else [])]
        outcome = {
            n: await _restore_one(dev.pool, ext_id, content, n, epoch, ext.generation)
            for n in members
        }
        dev.mark_dirty(ext_id)
        if joiner is not None and outcome[joiner]:
            dev.fail_join(ext_id)  # it lacks the undo: it is not admitted
        failed, no_room, stale = (
            [n for n in ext.replicas if outcome[n] == why]
            for why in ("failed", "no room", "stale epoch")
        )
        gone = [n for n in r.involved if n not in members and n in ext.stale]
        dropped = await _tell_meta(dev, ext_id, failed, gone, r.generation - 1)
    parts = [
        f"extent {ext_id}: a {u.what} refused for space on {', '.join(r.full)} was undone "
        f"from {source} on {', '.join(n for n in members if not outcome[n]) or 'no replica'}"
    ]
    if content.unread:
        parts.append(f"{len(content.unread)} sectors no replica reads well are left to repair")
    if failed:
        parts.append(f"{', '.join(failed)} failed" + (" and were dropped" if dropped else ""))
    if no_room:
        parts.append(f"{', '.join(no_room)} have no room for it yet")
    if stale:
        parts.append(f"{', '.join(stale)} refused the epoch")
    if gone:
        parts.append(f"{', '.join(gone)} catch up from generation {r.generation - 1}")
    return not no_room and not stale and (dropped or not failed), "; ".join(parts)


def _candidates(ext: ExtentRecord, r: Refused, trim: bool) -> list[str]:
    """The valid replicas the undo may copy from, best first (see the module docstring)."""
    refusers = [n for n in r.full if n in ext.replicas]
    takers = [n for n in r.took if n in ext.replicas]
    first = [*takers, *refusers] if trim else [*refusers, *takers]
    return [*first, *(n for n in ext.replicas if n not in first)]


async def _tell_meta(
    dev: Undoer, ext_id: str, failed: list[str], gone: list[str], missed: int
) -> bool:
    """Drop the members that ``failed`` the undo and lower the catch-up of those ``gone``
    meanwhile, in one change; whether Meta took it (``Fenced`` if this access point no
    longer holds the volume)."""
    if not failed and not gone:
        return True
    try:
        await dev.drop(ext_id, [*failed, *gone], missed_from=missed)
    except Fenced:
        raise
    except AecpError as exc:
        log.warning(
            "extent %s: replicas %s not dropped nor lowered to generation %d: %s",
            ext_id,
            ", ".join([*failed, *gone]),
            missed,
            exc,
        )
        return False
    return True


async def _content(
    pool: ReplicaPool, ext_id: str, candidates: list[str], offset: int, length: int
) -> tuple[str, Content] | None:
    """What the first of ``candidates`` that answers holds in the range, and its node; its
    sectors that fail their checksum are taken from the next candidates that read them well.
    None if no candidate answers."""
    for i, node in enumerate(candidates):
        try:
            src = await pool.client(node)
            data, bad = await _read_good(src, ext_id, offset, length)
            runs = _clip(await src.allocation(ext_id), offset, length)
        except ChunkError as exc:
            log.warning("extent %s: %s cannot be read to undo from: %s", ext_id, node, exc)
            continue
        content = Content(offset, data, runs, bad)
        if bad:
            await _patch(pool, ext_id, content, candidates[i + 1 :])
        return node, content
    return None


async def _read_good(
    src: ReplicaClient, ext_id: str, offset: int, length: int
) -> tuple[bytes, set[int]]:
    """The range as ``src`` holds it, and the sectors failing their checksum there (zeros in
    the bytes returned)."""
    bad: set[int] = set()
    while True:
        buf = bytearray(length)
        try:
            for lo, hi in _between(offset, offset + length, bad):
                buf[lo - offset : hi - offset] = await src.read(ext_id, lo, hi - lo)
        except ChecksumError as exc:
            if not set(exc.sectors) - bad:
                raise
            bad |= set(exc.sectors)
            continue
        return bytes(buf), bad


async def _patch(pool: ReplicaPool, ext_id: str, content: Content, others: list[str]) -> None:
    """Fill ``content``'s unread sectors from ``others`` where they read well."""
    buf = bytearray(content.data)
    end = content.offset + len(buf)
    for node in others:
        if not content.unread:
            break
        try:
            src = await pool.client(node)
            for s in sorted(content.unread):
                lo, hi = max(s * SECTOR, content.offset), min((s + 1) * SECTOR, end)
                try:
                    part = await src.read(ext_id, lo, hi - lo)
                except ChecksumError:
                    continue
                buf[lo - content.offset : hi - content.offset] = part
                content.unread.discard(s)
        except ChunkError:
            continue
    content.data = bytes(buf)


async def _restore_one(
    pool: ReplicaPool,
    ext_id: str,
    content: Content,
    node: str,
    epoch: int,
    generation: int,
) -> str:
    """Make ``node``'s bytes of the range what ``content`` says, under ``generation``:
    "" if done, else why not ("failed", "no room", "stale epoch")."""
    try:
        await restore(await pool.client(node), ext_id, content, epoch, generation)
    except StaleEpoch as exc:  # a newer access point, or a snapshot not adopted yet
        log.info("extent %s: undo refused by %s: %s", ext_id, node, exc)
        return "stale epoch"
    except ChunkError as exc:
        log.warning("extent %s: undo on %s failed: %s", ext_id, node, exc)
        return "no room" if no_space(exc) else "failed"
    return ""


async def restore(
    dst: ReplicaClient, ext_id: str, content: Content, epoch: int, generation: int
) -> None:
    """Write ``content``'s valid sectors (but its unread ones) to ``dst`` and trim its invalid
    ones, under ``epoch`` and ``generation``."""
    offset, data = content.offset, content.data
    for start, n, valid in content.runs:
        if not valid:
            await dst.trim(ext_id, start, n, epoch=epoch, generation=generation)
            continue
        for lo, hi in _between(start, start + n, content.unread):
            part = data[lo - offset : hi - offset]
            await dst.write(ext_id, lo, part, epoch=epoch, generation=generation)


def _between(start: int, end: int, skip: set[int]) -> list[tuple[int, int]]:
    """The ``(lo, hi)`` parts of ``[start, end)`` outside the sectors in ``skip``."""
    out, pos = [], start
    for s in sorted(skip):
        lo, hi = max(s * SECTOR, start), min((s + 1) * SECTOR, end)
        if lo >= hi:
            continue
        if pos < lo:
            out.append((pos, lo))
        pos = max(pos, hi)
    if pos < end:
        out.append((pos, end))
    return out


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
