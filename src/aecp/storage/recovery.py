"""Recovery and scrubbing for one attached volume, run by its access point (the only writer, so
copies can be ordered against live writes; see ``VolumeDevice.begin_join``).

For each extent below its factor, ``Repairer.run_pass`` decides one of:

- *catch-up*: a dropped replica's node is back within the grace period → copy only the blocks
  modified after the generation it missed from (and any it changed itself since), then admit it;
- *re-replicate*: the grace period is over (or the node is gone) → create a replica on another
  node (different from the current ones; rack/chassis rules apply), copy every written block,
  admit it in place of the lost one;
- *wait*: the node may still come back.

Then, once per pass and only when no extent needed a copy, *data locality* for a volume
attached for a client's I/O (a VM's disk, ``purpose == "io"``): the first healthy extent (its
factor of valid replicas, none stale, no copy of it on the board) with no replica on the access
point's node, whose storage server has room (``locality_move``), gets one there: the new
replica joins like a re-replication's and is admitted by Meta *in place of* one of the valid
ones in the same change (``MetaService.admit_replica``, ``moving``), so the extent never has
fewer valid replicas than its factor; the replaced one is deleted only after that. A VM that
moved thus reads locally again, one extent per pass, at the recovery rate. Extents shared with
a snapshot or a clone are left where they are (several access points may recover those).

The grace period is ``RecoveryPolicy.grace_for(node)``: ``maintenance_grace`` for a node in
(entering or leaving) maintenance, whose replicas are only temporarily absent
(``docs/design/maintenance.md``), else ``grace``. ``RecoveryPolicy.current`` reads which
nodes those are from their admin keys, once per pass.

Copies go block range by block range under the extent's copy lock (a live write to that extent
waits for at most one range), throttled to ``rate`` bytes/s so VM I/O keeps priority. Each copy
is published (``storage.progress``) before its target is created or written, until it ends; a
copy that cannot be published is not made. ``scrub_pass`` re-verifies every replica's checksums
and repairs bad sectors from a good replica.

The choice (``next_step``) and the throttled copy (``copy_ranges``) are shared with
``storage.frozen``, which repairs the extents no volume names (nothing writes them).
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, replace

from aecp.common.clock import SYSTEM_CLOCK, Clock
from aecp.common.errors import AecpError, InvalidState, NoCapacity
from aecp.model.node import MaintenanceState, NodeAdmin
from aecp.storage.access import VolumeDevice
from aecp.storage.chunk.api import ReplicaClient
from aecp.storage.chunk.errors import ChecksumError, ChunkError
from aecp.storage.meta.model import (
    ExtentRecord,
    RecoveryRecord,
    StorageServer,
    VolumeRecord,
    writable_in_place,
)
from aecp.storage.meta.placement import StorageNode, place
from aecp.storage.pool import ReplicaPool
from aecp.storage.progress import RecoveryBoard, new_copy_id
from aecp.storage.refused import retry
from aecp.store import keys
from aecp.store.base import Store

log = logging.getLogger(__name__)
LOCALITY = "locality"  # the recovery board's kind of a locality move
CHUNK = 1 << 20  # bytes copied per step (a multiple of every block size in use)
SECTOR = 4096


@dataclass(frozen=True)
class RecoveryPolicy:
    grace: float  # seconds a dropped replica's node may take to come back
    rate: float  # bytes per second
    # seconds for a node in maintenance (None: no node's grace is longer than ``grace``)
    maintenance_grace: float | None = None
    in_maintenance: frozenset[str] = frozenset()  # the nodes in, entering or leaving it

    def grace_for(self, node: str) -> float:
        """The grace period of ``node``'s dropped replicas (never shorter than ``grace``)."""
        if self.maintenance_grace is not None and node in self.in_maintenance:
            return max(self.grace, self.maintenance_grace)
        return self.grace

    async def current(self, store: Store) -> RecoveryPolicy:
        """This policy with ``in_maintenance`` as the nodes' admin keys say now (itself,
        without reading, when it has no ``maintenance_grace``)."""
        if self.maintenance_grace is None:
            return self
        nodes = frozenset(
            keys.last_segment(kv.key, keys.NODE_ADMIN)
            for kv in await store.list(keys.NODE_ADMIN)
            if NodeAdmin.load(kv.value).maintenance is not MaintenanceState.IN_USE
        )
        return replace(self, in_maintenance=nodes)


@dataclass(frozen=True)
class Step:
    """What to do for a degraded extent now: ``kind`` "catch-up" (``node`` copies what it
    missed since generation ``since``), "re-replicate" (a new replica on ``node`` replaces
    ``lost``), or "" (nothing now; ``why`` says why). A healthy extent's "locality" move is
    chosen by ``locality_move`` instead."""

    kind: str
    node: str = ""
    since: int = 0
    lost: str | None = None
    why: str = ""


async def next_step(
    ext: ExtentRecord,
    servers: dict[str, StorageServer],
    now: float,
    grace: float | Callable[[str], float],
    answers: Callable[[str], Awaitable[bool]],
) -> Step:
    """The step for ``ext``, below its factor: a stale node back within its grace period
    (``grace``, or ``grace(node)``: ``RecoveryPolicy.grace_for``) catches up; once no stale
    node may still come back, a new replica goes to the node the placement rules pick."""
    grace_of = grace if callable(grace) else (lambda _node: grace)

    def in_grace(node: str) -> bool:
        return now - ext.stale_since.get(node, now) < grace_of(node)

    for node, gen in sorted(ext.stale.items()):
        if node in servers and in_grace(node) and await answers(node):
            return Step("catch-up", node, since=gen)
    waiting = sorted(n for n in ext.stale if in_grace(n))
    if waiting:
        graces = ", ".join(f"{grace_of(n):.0f}s" for n in waiting)
        return Step(
            "",
            why=f"extent {ext.id}: waiting for {', '.join(waiting)} to come back (grace {graces})",
        )
    lost = min(ext.stale, key=lambda n: ext.stale_since.get(n, 0)) if ext.stale else None
    nodes = [StorageNode(s.node, s.free_bytes, s.rack, s.chassis) for s in servers.values()]
    try:
        [target] = place(1, nodes, ext.size, exclude=[*ext.replicas, *ext.stale])
    except NoCapacity:
        return Step("", why=f"extent {ext.id}: no node can take a new replica; it stays degraded")
    return Step("re-replicate", target, lost=lost)


def locality_move(
    ext: ExtentRecord, servers: dict[str, StorageServer], local: str, factor: int
) -> str | None:
    """The valid replica of the healthy extent ``ext`` that a new one on ``local`` (the access
    point's node) should replace, or None: ``ext`` has one on ``local`` already, is not
    healthy (fewer than ``factor`` valid replicas, or a stale one), a replica's node has no
    storage server registered, or ``local`` has none or no room (``place``, as for a new
    replica). Of the valid replicas, the one whose replacement leaves the fewest replicas
    sharing a rack, then a chassis, then the one on the node with the least free space
    (then by name): deterministic."""
    if local in ext.replicas or ext.stale or len(ext.replicas) < factor:
        return None
    if local not in servers or any(n not in servers for n in ext.replicas):
        return None
    nodes = [StorageNode(s.node, s.free_bytes, s.rack, s.chassis) for s in servers.values()]
    try:
        target = place(1, nodes, ext.size, prefer=local, exclude=ext.replicas)
    except NoCapacity:
        return None
    if target != [local]:
        return None

    def rank(node: str) -> tuple[int, int, int, str]:
        kept = [servers[local], *(servers[n] for n in ext.replicas if n != node)]
        return (_sharing(kept, "rack"), _sharing(kept, "chassis"), servers[node].free_bytes, node)

    return min(ext.replicas, key=rank)


def _sharing(servers: list[StorageServer], domain: str) -> int:
    """How many pairs of ``servers`` share a (tagged) ``domain``: "rack" or "chassis"."""
    values = [getattr(s, domain) for s in servers if getattr(s, domain)]
    return sum(values.count(v) * (values.count(v) - 1) // 2 for v in set(values))


THROTTLE_MIN = 0.001  # s: a copy this little ahead of its rate does not pause


async def copy_ranges(
    ranges: list[tuple[int, int]],
    step: Callable[[int, int], Awaitable[None]],
    rate: float,
    progress: Callable[[int], Awaitable[None]],
    clock: Clock = SYSTEM_CLOCK,
) -> int:
    """Copy ``ranges`` (offset, length) ``CHUNK`` by ``CHUNK`` with ``step`` at no more than
    ``rate`` bytes/s (on ``clock``); ``progress(copied)`` at most twice a second. Returns
    bytes copied."""
    copied, last_report, started = 0, clock.monotonic(), clock.monotonic()
    for offset, length in ranges:
        pos = offset
        while pos < offset + length:
            n = min(CHUNK, offset + length - pos)
            await step(pos, n)
            pos += n
            copied += n
            ahead = copied / rate - (clock.monotonic() - started)
            if ahead > THROTTLE_MIN:
                await clock.sleep(ahead)  # throttle: VM I/O keeps priority
            if clock.monotonic() - last_report > 0.5:
                last_report = clock.monotonic()
                await progress(copied)
    return copied


def new_record(
    volume: str, ext: ExtentRecord, target: str, kind: str, clock: Clock = SYSTEM_CLOCK
) -> RecoveryRecord:
    """The record of a copy about to start (its size is not known yet)."""
    return RecoveryRecord(
        volume=volume,
        extent=ext.id,
        kind=kind,
        target=target,
        total_bytes=0,
        copied_bytes=0,
        started_at=clock.wall(),
        id=new_copy_id(),
    )


@contextlib.asynccontextmanager
async def published(board: RecoveryBoard, rec: RecoveryRecord) -> AsyncIterator[None]:
    """``rec`` is published for the block (raises, before it, if it cannot be)."""
    await board.put(rec)
    try:
        yield
    finally:
        await board.clear(rec)


class Repairer:
    def __init__(self, dev: VolumeDevice, policy: RecoveryPolicy, board: RecoveryBoard) -> None:
        self.dev = dev
        self.meta = dev.meta
        self.pool = dev.pool
        self.policy = policy
        self.board = board
        self.copied_last = 0  # bytes copied by the last catch-up or re-replication (tests)
        self._fenced_at: dict[str, int] = {}  # epoch a joiner was fenced at for admission
        self._repairing = False  # this pass tried a catch-up or re-replication

    async def run_pass(self) -> list[str]:
        """Look at every allocated extent once; returns one sentence per degraded extent. A
        replica whose node has no storage server registered (its lease expired) is dropped
        first, as a write to it would have dropped it. Undos of refused writes still pending
        are tried again before (``refused.retry``). Then, if no extent needed a copy, at most
        one locality move (``_locality``)."""
        self._repairing = False
        out = await retry(self.dev)
        self.policy = await self.policy.current(self.meta.store)
        vol, rev = await self.meta.volume(self.dev.vol.name)
        exts = await self.meta.extents()
        mine = {x: exts[x] for x in vol.extents if x and x in exts}
        self.dev.refresh(vol, rev, mine)
        servers = await self.meta.servers()
        for ext in mine.values():
            try:  # one extent's trouble (a conflict, Meta unreachable) stops only that one
                gone = [n for n in ext.replicas if n not in servers]
                if gone and len(gone) < len(ext.replicas):  # an idle volume's writes never tell
                    ext = await self.dev.drop_lost(ext.id, gone)
                    out.append(f"extent {ext.id}: {', '.join(gone)} left the cluster: stale")
                if len(ext.replicas) < vol.replicas:
                    out.append(await self._repair(ext))
            except (AecpError, OSError) as exc:
                self._repairing = True
                out.append(f"extent {ext.id}: repair failed, will retry: {exc}")
        if not self._repairing:
            out += await self._locality(vol, list(mine.values()), servers)
        return out

    async def _repair(self, ext: ExtentRecord) -> str:
        servers = await self.meta.servers()
        now = self.meta.clock.wall()
        step = await next_step(ext, servers, now, self.policy.grace_for, self._answers)
        self._repairing = self._repairing or bool(step.kind)
        if step.kind == "catch-up":
            return await self._catch_up(ext, step.node)
        if step.kind == "re-replicate":
            return await self._rereplicate(ext, step.node, step.lost)
        return step.why

    async def _answers(self, node: str) -> bool:
        return await answers(self.pool, node)

    async def _catch_up(self, ext: ExtentRecord, node: str) -> str:
        src, src_node = await self._source(ext)
        dst = await self.pool.client(node)
        since = -1

        async def ranges() -> list[tuple[int, int]]:
            nonlocal since  # read now that the join has begun, not as the pass began
            since = await self._catch_up_from(ext.id, node)
            return union(
                await src.modified_since(ext.id, since), await dst.modified_since(ext.id, since)
            )

        rec = new_record(self.dev.vol.name, ext, node, "catch-up", self.meta.clock)
        async with published(self.board, rec):
            copied = await self._join(ext, node, src, dst, ranges, rec, None, lambda: since)
        self._fenced_at.pop(ext.id, None)
        return (
            f"extent {ext.id}: {node} caught up from {src_node}: copied {copied} bytes "
            f"modified since generation {since}"
        )

    async def _catch_up_from(self, ext_id: str, node: str) -> int:
        """The generation ``node`` catches ``ext_id`` up from, read once its join has begun:
        what Meta records for it, or a pending undo's floor if lower (``refused.Undos``).
        Writes and undos still run during the join (each between two copied ranges), but
        from its beginning they reach ``node`` too; an undo that lowers the start after this
        read makes the admission fail (``MetaService.admit_replica``, ``since``)."""
        ext, _ = await self.meta.extent(ext_id)
        if node not in ext.stale:
            raise InvalidState(f"extent {ext_id}: {node} was caught up or replaced meanwhile")
        floor = self.dev.undos.floor(ext_id)
        return ext.stale[node] if floor is None else min(ext.stale[node], floor)

    async def _rereplicate(self, ext: ExtentRecord, target: str, lost: str | None) -> str:
        src, src_node = await self._source(ext)
        dst = await self.pool.client(target)

        async def ranges() -> list[tuple[int, int]]:
            # the target's own blocks too: an earlier attempt may have left some behind
            return union(await src.modified_since(ext.id, 0), await dst.modified_since(ext.id, 0))

        rec = new_record(self.dev.vol.name, ext, target, "re-replicate", self.meta.clock)
        async with published(self.board, rec):  # names the target before it exists
            await dst.create(ext.id, ext.size, epoch=self.dev.epoch, generation=0)
            copied = await self._join(ext, target, src, dst, ranges, rec, lost, lambda: 0)
        if lost and self._sole_recoverer(ext):
            await self._delete_quietly(lost, ext.id, self._fenced_at.pop(ext.id, self.dev.epoch))
        return f"extent {ext.id}: re-replicated to {target} from {src_node} ({copied} bytes)" + (
            f" in place of {lost}" if lost else ""
        )

    async def _join(
        self,
        ext: ExtentRecord,
        node: str,
        src: ReplicaClient,
        dst: ReplicaClient,
        ranges: Callable[[], Awaitable[list[tuple[int, int]]]],
        rec: RecoveryRecord,
        replaces: str | None,
        since: Callable[[], int],
    ) -> int:
        """Let ``node`` join the extent: live writes reach it from now on, the listed ranges
        are copied to it, then it is admitted (or, on any failure, the join is undone).
        ``since()``: the generation the copy started from, once ``ranges()`` has run."""
        await self.dev.begin_join(ext.id, node)
        admitted = False
        try:
            copied = await self._copy(ext, src, dst, await ranges(), rec)
            kind = rec.kind
            await self.dev.end_join(
                ext.id, lambda: self._admit(ext.id, node, dst, replaces, kind, since())
            )
            admitted = True
        finally:
            if not admitted:
                await self.dev.end_join(ext.id, None)
                if rec.kind in ("re-replicate", LOCALITY) and self._sole_recoverer(ext):
                    await self._drop_leftover(ext.id, node)
                self._fenced_at.pop(ext.id, None)
        self.copied_last = copied
        return copied

    async def _admit(
        self,
        ext_id: str,
        node: str,
        dst: ReplicaClient,
        replaces: str | None,
        kind: str,
        since: int,
    ) -> ExtentRecord:
        """Make the copy valid: fenced at the attachment's epoch (a snapshot taken during the
        join fenced only the valid replicas), durable, then admitted by Meta while this access
        point still holds that attachment at that epoch, and (a catch-up) while Meta still has
        it catch up from no earlier than ``since``; a locality move (``kind``) in place of the
        valid replica ``replaces``, in the same change."""
        att = await self.meta.attachment(self.dev.vol.name)
        if att is None or not self.dev.holder.holds(att):
            raise ChunkError(f"extent {ext_id}: the volume is no longer attached here")
        await dst.fence(ext_id, att.epoch)
        self._fenced_at[ext_id] = att.epoch
        await dst.flush(ext_id)
        new = await self.meta.admit_replica(
            ext_id,
            node,
            self.dev.holder,
            epoch=att.epoch,
            replaces=replaces,
            catch_up=kind == "catch-up",
            factor=self.dev.vol.replicas,
            since=since,
            moving=kind == LOCALITY,
        )
        await dst.set_generation(ext_id, new.generation)
        return new

    # ---- data locality --------------------------------------------------------------------
    async def _locality(
        self, vol: VolumeRecord, exts: list[ExtentRecord], servers: dict[str, StorageServer]
    ) -> list[str]:
        """Move one replica of the first extent (in slot order) that ``locality_move`` picks
        to this access point's node; nothing unless the volume is attached here for a
        client's I/O. Skipped: extents shared with a snapshot or clone (not writable in place:
        another access point may recover them), and extents being joined, copied (a record on
        the board) or undone. One sentence, or none when nothing is to move."""
        local = self.dev.node
        if not await self._serves_io(vol.name):
            return []
        for ext in exts:
            if not writable_in_place(ext, vol) or self.dev.joiner(ext.id) is not None:
                continue
            if self.dev.undos.floor(ext.id) is not None:
                continue
            moved = locality_move(ext, servers, local, vol.replicas)
            if moved is None or await self._being_copied(ext.id):
                continue
            if not await self._answers(local):
                return []
            try:
                return [await self._relocate(ext, moved)]
            except (AecpError, OSError) as exc:
                return [f"extent {ext.id}: locality move to {local} failed, will retry: {exc}"]
        return []

    async def _serves_io(self, volume: str) -> bool:
        """Whether this access point holds ``volume``'s attachment for a client's I/O (not
        one held only for repair)."""
        att = await self.meta.attachment(volume)
        return att is not None and att.purpose == "io" and self.dev.holder.holds(att)

    async def _being_copied(self, ext_id: str) -> bool:
        """Whether any copier has a copy of ``ext_id`` on the recovery board now."""
        return bool(await self.meta.store.list(keys.abs_recovery(ext_id, "")))

    async def _relocate(self, ext: ExtentRecord, moved: str) -> str:
        """Copy ``ext`` to this node as a re-replication would (the replica joins: live
        writes reach it from the start of the copy; throttled; on the board as "locality"),
        have Meta admit it in place of the valid replica on ``moved`` in one change, and only
        then delete the one on ``moved``. A failure before the admission deletes the copy
        (``_join``) and leaves the extent as it was."""
        local = self.dev.node
        src, src_node = await self._source(ext)
        dst = await self.pool.client(local)

        async def ranges() -> list[tuple[int, int]]:
            # the target's own blocks too: an earlier attempt may have left some behind
            return union(await src.modified_since(ext.id, 0), await dst.modified_since(ext.id, 0))

        rec = new_record(self.dev.vol.name, ext, local, LOCALITY, self.meta.clock)
        async with published(self.board, rec):  # names the target before it exists
            await dst.create(ext.id, ext.size, epoch=self.dev.epoch, generation=0)
            copied = await self._join(ext, local, src, dst, ranges, rec, moved, lambda: 0)
        if self._sole_recoverer(ext):
            await self._drop_leftover(ext.id, moved)  # Meta names it no more: deleted
        self._fenced_at.pop(ext.id, None)
        return (
            f"extent {ext.id}: locality: replica moved from {moved} to {local} "
            f"(copied {copied} bytes from {src_node})"
        )

    async def _source(self, ext: ExtentRecord) -> tuple[ReplicaClient, str]:
        order = sorted(ext.replicas, key=lambda n: n != self.dev.node)
        for node in order:
            if await self._answers(node):
                return await self.pool.client(node), node
        raise ChunkError(f"extent {ext.id}: no valid replica answers")

    async def _copy(
        self,
        ext: ExtentRecord,
        src: ReplicaClient,
        dst: ReplicaClient,
        ranges: list[tuple[int, int]],
        rec: RecoveryRecord,
    ) -> int:
        rec = rec.model_copy(update={"total_bytes": sum(n for _, n in ranges)})
        await self.board.put(rec)

        async def step(pos: int, n: int) -> None:
            await self.dev.copy_range(ext.id, src, dst, pos, n)
            if self.dev.join_failed(ext.id):
                raise ChunkError(f"extent {ext.id}: {rec.target} failed while joining")

        async def progress(copied: int) -> None:
            await self.board.put(rec.model_copy(update={"copied_bytes": copied}))

        return await copy_ranges(ranges, step, self.policy.rate, progress, self.meta.clock)

    def _sole_recoverer(self, ext: ExtentRecord) -> bool:
        """Whether only this access point recovers ``ext``: the extent is this volume's own,
        not shared with a snapshot or clone whose access point could be recovering it too.
        Only then are replicas deleted (a lost one, or a failed copy): elsewhere the other
        one's join could have made that very replica valid meanwhile. What is not deleted is
        deleted later by its node's orphan collector (``storage.collect``), once no extent
        record names it there."""
        if writable_in_place(ext, self.dev.vol):
            return True
        log.info("extent %s is shared: its old copies are left in place", ext.id)
        return False

    async def _drop_leftover(self, ext_id: str, node: str) -> None:
        """Delete what a failed re-replication or locality move left on ``node``, or the
        replica a locality move replaced, unless Meta names it (valid: a failure after the
        admission; or stale)."""
        try:
            ext, _ = await self.meta.extent(ext_id)
        except AecpError as exc:
            log.info("extent %s: copy on %s left as it is (%s)", ext_id, node, exc)
            return
        # named nowhere (and not fenced since by another access point's join: the epoch)
        if node not in ext.replicas and node not in ext.stale:
            await self._delete_quietly(node, ext_id, self._fenced_at.pop(ext_id, self.dev.epoch))

    async def _delete_quietly(self, node: str, ext_id: str, epoch: int = 0) -> None:
        try:
            await (await self.pool.client(node)).delete(ext_id, epoch)
        except ChunkError as exc:
            log.info(
                "extent %s: old replica on %s not deleted (%s); left for later", ext_id, node, exc
            )

    # ---- scrubbing ------------------------------------------------------------------------
    async def scrub_pass(self) -> list[str]:
        """Verify every replica of every allocated extent; repair bad sectors from a good
        replica. Returns one sentence per repair."""
        exts = await self.meta.extents()
        mine = [exts[x] for x in {x for x in self.dev.vol.extents if x and x in exts}]
        return await scrub(self.pool, mine, self._repair_sectors)

    async def _repair_sectors(self, ext: ExtentRecord, node: str, sectors: list[int]) -> str:
        async with self.dev.quiesced(ext.id):  # else a write could land between read and repair
            return await self._repair_sectors_now(ext, node, sectors)

    async def _repair_sectors_now(self, ext: ExtentRecord, node: str, sectors: list[int]) -> str:
        valid = await self.dev.replicas_of(ext.id)  # now, not as the pass began
        return await repair_sectors(self.pool, ext.id, node, sectors, valid, self.dev.epoch)


Repair = Callable[[ExtentRecord, str, list[int]], Awaitable[str]]


async def scrub(pool: ReplicaPool, extents: list[ExtentRecord], repair: Repair) -> list[str]:
    """Verify every valid replica of ``extents``; ``repair(ext, node, sectors)`` each one
    that has bad sectors. One sentence per repair."""
    out = []
    for ext in extents:
        for node in ext.replicas:
            try:
                bad = await (await pool.client(node)).scrub(ext.id)
            except ChunkError:
                continue
            if bad:
                out.append(await repair(ext, node, bad))
    return out


async def repair_sectors(
    pool: ReplicaPool, ext_id: str, node: str, sectors: list[int], valid: list[str], epoch: int
) -> str:
    """Copy ``sectors`` of ``ext_id`` to ``node``'s replica from the first other ``valid``
    replica that reads them well (the repair carries ``epoch``)."""
    dst = await pool.client(node)
    for good in (n for n in valid if n != node):
        src = await pool.client(good)
        try:
            for s in sectors:
                data = await src.read(ext_id, s * SECTOR, SECTOR)
                await dst.repair(ext_id, s * SECTOR, data, epoch)
            await dst.flush(ext_id)
        except (ChecksumError, ChunkError):
            continue
        log.warning(
            "extent %s: scrub repaired %d sectors on %s from %s", ext_id, len(sectors), node, good
        )
        return f"extent {ext_id}: repaired {len(sectors)} bad sectors on {node} from {good}"
    return f"extent {ext_id}: {len(sectors)} bad sectors on {node} and no good copy answered"


async def answers(pool: ReplicaPool, node: str) -> bool:
    """Whether ``node``'s chunk server answers now."""
    try:
        await (await pool.client(node)).ping()
    except ChunkError:
        return False
    return True


def union(a: list[tuple[int, int]], b: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """Merge two sorted lists of (offset, length) ranges into coalesced ranges."""
    out: list[tuple[int, int]] = []
    for off, n in sorted(a + b):
        if out and off <= out[-1][0] + out[-1][1]:
            last_off, last_n = out[-1]
            out[-1] = (last_off, max(last_n, off + n - last_off))
        else:
            out.append((off, n))
    return out
