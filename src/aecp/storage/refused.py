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

The range is widened to whole sectors: every write is then of whole sectors, which needs no
read of the target's sector (one torn by a full disk would fail its checksum), and every
block of the range gets the generation of the undo, trimmed sectors included. Sectors of the
source that fail their checksum are taken from another candidate that reads them well; any
that none reads well are left as they are, for a read or the scrubber to repair.

The range is undone piece by piece (``PIECE``), each while the extent is quiesced (no write
to it runs) and decided on the extent's record as this access point holds it then: other
writes may have been in flight, and replicas may have been dropped or have joined meanwhile.
A write waits for one piece at most. The source must be a valid replica *now*: one dropped
meanwhile may lack a write acknowledged since. Every member, the source and a joining replica
included, is given the content at the extent's current generation. That raises the
modification generation of the range's blocks above the generation any replica dropped so far
catches up from, so such a catch-up copies the range back even if no Meta write below
succeeds. Like any mutation, a piece reads the epoch it writes under in the same step that
finds the extent still named by the volume and writable in place; an extent a snapshot or a
clone shares now is never written (it would change what they hold). A replica refusing that
epoch is handled as a request would handle it: a snapshot's epoch is adopted and the piece
decided again, else this access point is fenced.

Afterwards, with the extent no longer quiesced, Meta is told in one change about the replicas
that failed the undo (dropped) and those that took or refused the request and were dropped
meanwhile (their catch-up is lowered to start before the request's generation;
``VolumeDevice.drop`` with ``missed_from``). A member that fails the undo for want of room,
or over a sector it cannot read, is *not* dropped: a full disk fails requests, not replicas.

An undo that did not complete (Meta unreachable, a member without room, no valid replica
answering) is not forgotten. It stays pending in the access point (``Undos``) and is tried
again at every recovery pass (``retry``) and when the access point closes while it still
holds the volume. It is also recorded in Meta (``meta.unsettled``) before the refused request
is answered: while it is, the volume is neither snapshotted nor cloned, and the next access
point of the volume (or the Meta leader's repair attachment of an idle one) takes it over.
The record is removed only by the holder of the volume's attachment, once the undo is
durable on every member. While an undo is pending, every replica of that extent the access
point drops, and every replica it catches up, starts from before the request's generation
(``Undos.floor``): a member that still holds the refused request cannot then keep it through
a catch-up. Until then reads of the extent go to the replica the undo copies from first
(``Undos.source``), so they return what it will leave while that replica answers.

An access point fenced meanwhile undoes nothing: a newer one owns the volume and takes the
record over.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
from collections.abc import Mapping, Sequence
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass, field
from typing import Protocol

from aecp.common.errors import AecpError, NotFound
from aecp.storage.blockdev import Fenced, NoSpace
from aecp.storage.chunk.api import ReplicaClient
from aecp.storage.chunk.errors import ChecksumError, ChunkError, StaleEpoch
from aecp.storage.fanout import no_space
from aecp.storage.meta.holding import NotHolder
from aecp.storage.meta.model import (
    ExtentRecord,
    Holder,
    UnsettledUndo,
    VolumeRecord,
    writable_in_place,
)
from aecp.storage.meta.service import MetaService
from aecp.storage.pool import ReplicaPool

log = logging.getLogger(__name__)
SECTOR = 4096
#: bytes undone per hold of the extent's copy lock (a write to the extent waits for one piece)
PIECE = 256 * 1024


class Refused(NoSpace):
    """Replicas on ``full`` refused a mutation of ``ext_id`` (of ``volume``) for want of
    space; ``took`` took it and ``unknown`` failed otherwise (they may have taken it).
    ``generation``: the one the mutation was sent under."""

    def __init__(
        self,
        volume: str,
        ext_id: str,
        full: Sequence[str],
        took: Sequence[str],
        unknown: Sequence[str],
        generation: int,
    ) -> None:
        super().__init__(f"volume {volume}: no space left for extent {ext_id} on {', '.join(full)}")
        self.volume, self.ext_id, self.generation = volume, ext_id, generation
        self.full, self.took, self.unknown = list(full), list(took), list(unknown)

    @classmethod
    def of_fan_out(
        cls,
        volume: str,
        ext_id: str,
        full: list[str],
        targets: Sequence[str],
        results: Sequence[object],
        generation: int,
    ) -> Refused:
        """The refusal of a fan-out to ``targets`` (the valid replicas, then any joining one)
        that gave ``results`` (in the same order)."""
        outcomes = list(zip(targets, results, strict=True))
        took = [n for n, r in outcomes if not isinstance(r, BaseException)]
        unknown = [n for n, r in outcomes if isinstance(r, BaseException) and n not in full]
        return cls(volume, ext_id, full, took, unknown, generation)

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
    id: str = field(default_factory=lambda: secrets.token_hex(8))
    recorded: bool = False  # in Meta (``meta.unsettled``): it outlives this access point
    attempts: int = 0
    running: bool = False

    @property
    def what(self) -> str:
        return "trim" if self.trim else "write"

    def stored(self, at: float) -> UnsettledUndo:
        """What Meta records of it."""
        r = self.refused
        return UnsettledUndo(
            id=self.id,
            extent=r.ext_id,
            offset=self.offset,
            length=self.length,
            trim=self.trim,
            full=r.full,
            took=r.took,
            unknown=r.unknown,
            generation=r.generation,
            at=at,
        )

    @classmethod
    def recorded_as(cls, volume: str, rec: UnsettledUndo) -> Undo:
        """The undo Meta records as ``rec`` (left by this or an earlier access point)."""
        r = Refused(volume, rec.extent, rec.full, rec.took, rec.unknown, rec.generation)
        return cls(r, rec.offset, rec.length, rec.trim, id=rec.id, recorded=True)


class Undos:
    """The undos of one access point that have not completed yet, by extent."""

    def __init__(self) -> None:
        self._pending: dict[str, list[Undo]] = {}
        self.by_extent: Mapping[str, list[Undo]] = self._pending  # read-only, for hot paths

    def __bool__(self) -> bool:
        return bool(self._pending)

    def __contains__(self, u: Undo) -> bool:
        return any(p is u for p in self._pending.get(u.refused.ext_id, []))

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

    def take_over(self, volume: str, recorded: list[UnsettledUndo]) -> int:
        """Add the undos Meta records for ``volume`` that are not held here; how many."""
        held = {u.id for u in self.pending()}
        new = [Undo.recorded_as(volume, rec) for rec in recorded if rec.id not in held]
        for u in new:
            self.add(u)
        return len(new)

    def source(self, ext: ExtentRecord) -> str | None:
        """The replica the oldest pending undo of ``ext`` would give every other one, if it
        answers: reads of the extent go there first, so they return what it will hold."""
        pending = self._pending.get(ext.id)
        best = _candidates(ext, pending[0].refused, pending[0].trim) if pending else []
        return best[0] if best else None

    def floor(self, ext_id: str) -> int | None:
        """The generation replicas of ``ext_id`` must catch up from, at the latest, while an
        undo of it is pending: one before the oldest pending mutation's; None if none is."""
        pending = self._pending.get(ext_id)
        return min(u.refused.generation for u in pending) - 1 if pending else None


class Undoer(Protocol):
    """What ``undo`` needs of the access point (``storage.access.VolumeDevice``)."""

    pool: ReplicaPool
    meta: MetaService
    vol: VolumeRecord
    epoch: int
    undos: Undos

    @property
    def holder(self) -> Holder: ...

    def quiesced(self, ext_id: str) -> AbstractAsyncContextManager[None]: ...

    async def current(self, ext_id: str) -> ExtentRecord: ...

    def held(self, ext_id: str) -> ExtentRecord | None: ...

    def joiner(self, ext_id: str) -> str | None: ...

    def fail_join(self, ext_id: str) -> None: ...

    async def drop(self, ext_id: str, nodes: list[str], missed_from: int | None = None) -> None: ...

    def mark_dirty(self, ext_id: str) -> None: ...

    async def stale_epoch_met(self, why: str, used: int) -> None: ...


async def undo(dev: Undoer, refused: Refused, offset: int, length: int, trim: bool = False) -> None:
    """Make the replicas of the refused mutation's extent agree again on ``[offset,
    offset+length)`` (see the module docstring); if that cannot be completed now, it stays
    pending and is recorded in Meta before this returns (so before the client is answered).
    Failures are logged, never raised: the caller raises ``refused``."""
    if not (refused.took or refused.unknown):
        return  # every replica refused it: none changed
    u = Undo(refused, offset, length, trim)
    dev.undos.add(u)
    await _run(dev, u)
    if u in dev.undos and not u.recorded:
        await _record(dev, u)


async def retry(dev: Undoer) -> list[str]:
    """Try every pending undo of ``dev`` once more, after taking over those Meta records for
    its volume (left by an earlier access point, or not completed here); one sentence each."""
    out = await take_over(dev)
    for u in dev.undos.pending():
        if u.running:
            continue
        out.append(await _run(dev, u))
        if u in dev.undos and not u.recorded:
            await _record(dev, u)
    return out


async def last_try(dev: Undoer) -> bool:
    """``retry`` before ``dev`` closes, only while it still holds the volume's attachment:
    after a lost lease a newer access point may own the volume (it takes the records over),
    and this one's old epoch may still be taken by a replica the newer one has not fenced
    yet. Whether it tried."""
    try:
        att = await dev.meta.attachment(dev.vol.name)
    except AecpError as exc:
        log.warning("volume %s: undos not retried (attachment not read): %s", dev.vol.name, exc)
        return False
    if att is None or not dev.holder.holds(att):
        log.info("volume %s: no longer held here: its undos are left to the holder", dev.vol.name)
        return False
    await retry(dev)
    return True


async def take_over(dev: Undoer) -> list[str]:
    """Hold the undos Meta records for ``dev``'s volume that ``dev`` does not hold yet, so
    that its drops and catch-ups respect their floor and ``retry`` finishes them."""
    try:
        recorded = await dev.meta.unsettled.of(dev.vol.name)
    except AecpError as exc:
        log.warning("volume %s: unsettled undos not read from Meta: %s", dev.vol.name, exc)
        return []
    n = dev.undos.take_over(dev.vol.name, recorded)
    if not n:
        return []
    why = f"volume {dev.vol.name}: took over {n} unsettled undos of refused writes from Meta"
    log.info("%s", why)
    return [why]


async def _record(dev: Undoer, u: Undo) -> None:
    """Record ``u`` in Meta (``meta.unsettled``); a failure is logged (tried again later)."""
    try:
        await dev.meta.unsettled.add(dev.vol.name, u.stored(dev.meta.clock.wall()))
    except AecpError as exc:
        log.warning(
            "extent %s: the undo of a %s refused at %d+%d is not recorded in Meta (tried again "
            "at the next recovery pass): %s",
            u.refused.ext_id,
            u.what,
            u.offset,
            u.length,
            exc,
        )
        return
    u.recorded = True


async def _run(dev: Undoer, u: Undo) -> str:
    """One attempt at ``u``: forgotten once complete (and its record removed), or once the
    access point is fenced (its record is left to the holder), else left pending. Returns
    what happened, as logged."""
    ext_id = u.refused.ext_id
    u.running, u.attempts = True, u.attempts + 1
    try:
        complete, why = await _attempt(dev, u)
        if complete and u.recorded:
            await dev.meta.unsettled.remove(dev.holder, [u.id])
            u.recorded = False
    except (Fenced, NotHolder) as exc:
        if not u.recorded:  # the holder must learn of it
            await _record(dev, u)
        dev.undos.discard(u)
        why = f"extent {ext_id}: refused {u.what} not undone here: {exc}"
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


@dataclass
class _Tally:
    """What the pieces of one attempt did, gathered."""

    outcome: dict[str, str] = field(default_factory=dict)  # member -> worst "why not"
    pieces: int = 0  # pieces undone
    joined: dict[str, int] = field(default_factory=dict)  # joining replica -> pieces it took
    sources: list[str] = field(default_factory=list)
    unread: int = 0  # sectors no replica reads well, left out
    unreadable: bool = False  # no valid replica answered for some piece
    moot: str = ""  # the extent is no longer this volume's to write in place

    def note(self, node: str, why: str) -> None:
        order = ("", "no room", "torn", "failed")
        if order.index(why) >= order.index(self.outcome.get(node, "")):
            self.outcome[node] = why

    def having(self, why: str, nodes: list[str]) -> list[str]:
        return [n for n in nodes if self.outcome.get(n) == why]

    def took_all(self) -> set[str]:
        """The joining replicas that took every piece."""
        return {n for n, k in self.joined.items() if k == self.pieces}


async def _attempt(dev: Undoer, u: Undo) -> tuple[bool, str]:
    """Try ``u`` once, piece by piece: (whether it completed, one sentence)."""
    r, ext_id = u.refused, u.refused.ext_id
    t = _Tally()
    lo, hi = _whole_sectors(u.offset, u.length)
    try:
        await dev.current(ext_id)  # outside the copy lock: writes do not wait for Meta
        for start in range(lo, hi, PIECE):
            await _piece(dev, u, start, min(start + PIECE, hi), t)
            if t.moot or t.unreadable:
                break
            await asyncio.sleep(0)  # a write waiting for the extent goes before the next piece
        ext = dev.held(ext_id) or await dev.current(ext_id)
    except NotFound:
        return True, f"extent {ext_id} is gone: its refused {u.what} needs no undo"
    if t.moot:
        return True, t.moot
    if t.unreadable:
        return False, "no valid replica could be read"
    failed, no_room, torn = (t.having(why, ext.replicas) for why in ("failed", "no room", "torn"))
    gone = [n for n in r.involved if n in ext.stale and n not in t.took_all()]
    dropped = await _tell_meta(dev, ext_id, failed, gone, r.generation - 1)
    durable = await _flushed(dev, ext_id, [n for n in ext.replicas if not t.outcome.get(n)])
    parts = [
        f"extent {ext_id}: a {u.what} refused for space on {', '.join(r.full)} was undone "
        f"from {', '.join(dict.fromkeys(t.sources))} on "
        + (", ".join(n for n, why in t.outcome.items() if not why) or "no replica")
    ]
    if t.unread:
        parts.append(f"{t.unread} sectors no replica reads well are left to repair")
    if failed:
        parts.append(f"{', '.join(failed)} failed" + (" and were dropped" if dropped else ""))
    if no_room:
        parts.append(f"{', '.join(no_room)} have no room for it yet")
    if torn:
        parts.append(f"{', '.join(torn)} could not take it (a sector fails its checksum)")
    if gone:
        parts.append(f"{', '.join(gone)} catch up from generation {r.generation - 1}")
    if not durable:
        parts.append("it is not durable yet")
    # without Meta, a catch-up finds the range only by the generation of its blocks: every
    # block must have been written then, none left out for a sector nobody reads well
    told = dropped or (not failed and not t.unread)
    return not no_room and not torn and told and durable, "; ".join(parts)


async def _piece(dev: Undoer, u: Undo, lo: int, hi: int, t: _Tally) -> None:
    """Undo ``[lo, hi)`` while the extent is quiesced; a replica refusing the epoch is dealt
    with as a request would (``stale_epoch_met``: adopted, then the piece is decided again;
    else ``Fenced``)."""
    ext_id = u.refused.ext_id
    while True:
        async with dev.quiesced(ext_id):
            ext = dev.held(ext_id)
            stale = None if ext is None else await _restore_piece(dev, u, ext, lo, hi, t)
        if ext is None:  # dropped from the cache (a snapshot's epoch adopted): read again
            await dev.current(ext_id)
        elif stale is None:
            t.pieces += 1
            return
        else:
            await dev.stale_epoch_met(str(stale), stale.epoch)


async def _restore_piece(
    dev: Undoer, u: Undo, ext: ExtentRecord, lo: int, hi: int, t: _Tally
) -> StaleEpoch | None:
    """Give ``[lo, hi)`` of one valid replica to every member (the extent quiesced); the
    refusal of a valid replica that answered ``StaleEpoch`` (nothing more is written then)."""
    r, ext_id, vol = u.refused, u.refused.ext_id, dev.vol
    # one step, no await: the extent still this volume's to write in place, and the epoch
    if ext_id not in vol.extents:
        t.moot = f"extent {ext_id} left volume {vol.name}: its refused {u.what} needs no undo"
        return None
    if not writable_in_place(ext, vol):
        t.moot = (
            f"extent {ext_id} is shared with a snapshot or a clone now: the {u.what} refused at "
            f"{u.offset}+{u.length} is not undone there (its replicas may differ in that range)"
        )
        log.error("volume %s: %s", vol.name, t.moot)
        return None
    epoch, joiner = dev.epoch, dev.joiner(ext_id)
    got = await _content(dev.pool, ext_id, _candidates(ext, r, u.trim), lo, hi - lo)
    if got is None:
        t.unreadable = True
        return None
    source, content = got
    for node in ext.replicas:
        if t.outcome.get(node) == "failed":
            continue  # it is dropped afterwards
        why = await _restore_one(dev.pool, ext_id, content, node, epoch, ext.generation)
        if isinstance(why, StaleEpoch):
            return why
        t.note(node, why)
    t.sources.append(source)
    t.unread += len(content.unread)
    if joiner is not None:
        why = await _restore_one(dev.pool, ext_id, content, joiner, epoch, ext.generation)
        if why:  # it lacks the undo (or refuses this epoch): it is not admitted
            dev.fail_join(ext_id)
        else:
            t.joined[joiner] = t.joined.get(joiner, 0) + 1
    dev.mark_dirty(ext_id)
    return None


def _whole_sectors(offset: int, length: int) -> tuple[int, int]:
    """``[offset, offset+length)`` widened to whole sectors."""
    return offset - offset % SECTOR, -(-(offset + length) // SECTOR) * SECTOR


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


async def _flushed(dev: Undoer, ext_id: str, nodes: list[str]) -> bool:
    """Whether the undo is durable on ``nodes`` (flushed): its record in Meta may go then."""
    try:
        for node in nodes:
            await (await dev.pool.client(node)).flush(ext_id)
    except ChunkError as exc:
        log.warning("extent %s: undo not flushed: %s", ext_id, exc)
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
) -> str | StaleEpoch:
    """Make ``node``'s bytes of the range what ``content`` says, under ``generation``:
    "" if done, the refusal if it refused ``epoch``, else why not: "no room", "torn" (a
    sector it holds fails its checksum: left for a repair, then tried again) or "failed"."""
    try:
        await restore(await pool.client(node), ext_id, content, epoch, generation)
    except StaleEpoch as exc:  # a newer access point, or a snapshot not adopted yet
        log.info("extent %s: undo refused by %s: %s", ext_id, node, exc)
        return exc
    except ChecksumError as exc:
        log.warning("extent %s: undo on %s meets a bad sector: %s", ext_id, node, exc)
        return "torn"
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
