"""The access point: one attached volume as a ``BlockDevice``, over its extents' replicas.

Write path: each piece of a write goes to every valid replica of its extent in parallel and is
acknowledged only when all of them have it. A replica that cannot be reached is dropped from the
valid set by Meta (generation bump) and the piece is written again, under the new generation, to
the replicas left — so a returning replica finds it among the blocks modified after the
generation it missed from. A replica answering ``StaleEpoch`` means a newer access point attached
the volume: this one is fenced and fails every later request.

Read path: the local replica first, then the others; a checksum failure is served from another
replica and the bad sectors are repaired from the good data.

A write (or trim) that a replica refuses for want of space fails with ENOSPC, drops nobody
for it, and is undone: the replicas are made to agree on its range (``storage.refused``).
Recovery copies and repairs are ordered against the writes by ``storage.joins``.

Extents are allocated on the first write to their slot (thin): replicas created first
(``storage.newextent``), then committed to the volume's table (see ``meta.service`` for the
ordering rules).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
from collections.abc import Awaitable, Callable

from aecp.common.errors import AecpError, NotFound
from aecp.storage.blockdev import (
    Allocation,
    BlockDevice,
    BlockError,
    Fenced,
    Span,
    check_range,
)
from aecp.storage.chunk.api import Buffer, ReplicaClient
from aecp.storage.chunk.diskio import sector_crcs
from aecp.storage.chunk.errors import (
    ChecksumError,
    ChunkError,
    ChunkIOError,
    ExtentNotFound,
    ReplicaUnavailable,
    StaleEpoch,
)
from aecp.storage.dirty import DirtyExtents
from aecp.storage.fanout import (
    FanIn,
    Piece,
    ReplicaOp,
    as_block_error,
    clip_runs,
    fan_out,
    fence_op,
    flush_op,
    no_space,
    split,
    unavailable,
)
from aecp.storage.joins import Joins
from aecp.storage.meta.model import (
    ExtentRecord,
    Holder,
    VolumeRecord,
    writable_in_place,
)
from aecp.storage.meta.service import MetaService, NotHolder
from aecp.storage.newextent import copy_written, create_replicas
from aecp.storage.pool import ReplicaPool
from aecp.storage.refused import Refused, Undos, last_try, undo

log = logging.getLogger(__name__)
SECTOR = 4096


class VolumeDevice(BlockDevice):
    """An attached volume. Create with ``open_volume``."""

    def __init__(
        self,
        meta: MetaService,
        pool: ReplicaPool,
        node: str,
        vol: VolumeRecord,
        epoch: int,
        ap: str = "",
    ) -> None:
        self.meta = meta
        self.pool = pool
        self.node = node
        self.vol = vol
        self._vol_rev = 0  # store revision of ``vol`` (0: as attached, older than any read)
        self.epoch = epoch
        self.size = vol.size
        self._extents: dict[str, ExtentRecord] = {}
        self._slot_locks: dict[int, asyncio.Lock] = {}
        self._dirty = DirtyExtents()
        self._fenced: str = ""
        # recovery (see ``begin_join``, ``storage.joins``): writes in flight per extent, the
        # copy lock of an extent being repaired, and the replica joining it (receives live
        # writes while it copies); the dicts are the ``Joins``' own, named here for the hot path
        self._joins = Joins()
        self._active = self._joins.active
        self._copy_locks = self._joins.copy_locks
        self._joining = self._joins.joining
        self._join_failed = self._joins.failed
        self._background = self._joins.background  # write_nowait redos, late join endings
        self.undos = Undos()  # refused writes and trims whose undo is not complete yet
        self._undoing = self.undos.by_extent  # extents with one, for the hot path
        self.ap = ap

    # ---- reads --------------------------------------------------------------------------
    async def read(self, offset: int, length: int) -> bytes:
        self._check_live()
        check_range(self, offset, length)
        pieces = list(split(offset, length, self.vol.extent_size))
        if len(pieces) == 1:
            return await self._read_piece(pieces[0])
        parts = await asyncio.gather(*(self._read_piece(p) for p in pieces))
        return b"".join(parts)

    def read_nowait(self, offset: int, length: int) -> bytes | None:
        """The usual read done at once: inside one extent, never written (zeros) or served by
        this node's replica from the page cache. None in every other case (an extent with an
        undo pending among them: ``_read_order``): await ``read``."""
        esize = self.vol.extent_size
        slot, inside = divmod(offset, esize)
        if self._fenced or length <= 0 or offset < 0 or inside + length > esize:
            return None
        if offset + length > self.size:
            return None
        ext_id = self.vol.extents[slot]
        if ext_id is None:
            return bytes(length)
        ext = self._extents.get(ext_id)
        if ext is None or self.node not in ext.replicas or ext_id in self._undoing:
            return None
        client = self.pool.cached(self.node)
        return None if client is None else client.read_nowait(ext_id, inside, length)

    async def _read_piece(self, p: Piece) -> bytes:
        """Read ``p`` from the first replica that answers. A replica deleted between the
        choice and the read (moved for locality, an undone copy-on-write) answers "not
        found": the next one is tried, and if none had it, Meta's record is read again
        once (the extent moved meanwhile)."""
        ext_id = self.vol.extents[p.slot]
        if ext_id is None:
            return bytes(p.length)
        ext = await self._extent(ext_id)
        try:
            return await self._read_replicas(ext, p)
        except _AllGone:
            return await self._read_replicas(await self.current(ext_id), p, last=True)

    async def _read_replicas(self, ext: ExtentRecord, p: Piece, last: bool = False) -> bytes:
        ext_id = ext.id
        bad: list[tuple[str, ChecksumError]] = []
        gone = 0
        for node in self._read_order(ext):
            try:
                data = await (await self.pool.client(node)).read(ext_id, p.offset, p.length)
            except ChecksumError as exc:
                log.warning(
                    "volume %s: extent %s on %s failed its checksum: %s",
                    self.vol.name,
                    ext_id,
                    node,
                    exc,
                )
                bad.append((node, exc))
                continue
            except ReplicaUnavailable:
                continue
            except ExtentNotFound:
                gone += 1
                continue
            if bad:
                await self._repair(ext_id, node, bad)
            return data
        if gone and not bad and not last:
            raise _AllGone(ext_id)
        raise BlockError(f"volume {self.vol.name}: no replica of extent {ext_id} could be read")

    def _read_order(self, ext: ExtentRecord) -> list[str]:
        """This node's replica first; while an undo of the extent is pending, the one it
        copies from before it (reads then return what every replica will hold)."""
        first = self.undos.source(ext) if ext.id in self._undoing else None
        return sorted(ext.replicas, key=lambda n: (n != first, n != self.node))

    async def _repair(self, ext_id: str, good: str, bad: list[tuple[str, ChecksumError]]) -> None:
        async with self.quiesced(ext_id):  # else a write could land between read and repair
            await self._repair_now(ext_id, good, bad)

    async def _repair_now(
        self, ext_id: str, good: str, bad: list[tuple[str, ChecksumError]]
    ) -> None:
        if good not in await self.replicas_of(ext_id):
            log.info(
                "volume %s: %s dropped from %s meanwhile: no repair", self.vol.name, good, ext_id
            )
            return
        src = await self.pool.client(good)
        for node, exc in bad:
            sectors = exc.sectors
            try:
                dst = await self.pool.client(node)
                for s in sectors:
                    data = await src.read(ext_id, s * SECTOR, SECTOR)
                    await dst.repair(ext_id, s * SECTOR, data, self.epoch)
                await dst.flush(ext_id)
                log.info(
                    "volume %s: repaired %d sectors of extent %s on %s from %s",
                    self.vol.name,
                    len(sectors),
                    ext_id,
                    node,
                    good,
                )
            except ChunkError as err:
                log.error(
                    "volume %s: repair of %s on %s failed: %s", self.vol.name, ext_id, node, err
                )

    # ---- writes -------------------------------------------------------------------------
    async def write(self, offset: int, data: bytes | bytearray, fua: bool = False) -> None:
        self._check_live()
        check_range(self, offset, len(data))
        esize = self.vol.extent_size
        slot, inside = divmod(offset, esize)
        if inside + len(data) <= esize:  # the usual case: one extent
            await self._write_piece(slot, inside, data, fua)
            return
        view = memoryview(data)
        await asyncio.gather(
            *(
                self._write_piece(p.slot, p.offset, view[p.at : p.at + p.length], fua)
                for p in split(offset, len(data), esize)
            )
        )

    def write_nowait(self, offset: int, data: bytes | bytearray) -> asyncio.Future[None] | None:
        """The usual write started without a task: inside one extent that is writable in
        place and not being recovered, every replica's client already made, this access
        point not fenced. The future is set once every replica has the data. If any replica
        write fails, the whole write is redone by ``write`` (in a task: it drops unreachable
        replicas, adopts a new epoch or fences, as usual; rewriting the same bytes where
        they already landed is harmless) and the future gets its outcome. None, having done
        nothing, in every other case: await ``write``."""
        length = len(data)
        slot, inside = divmod(offset, self.vol.extent_size)
        if (
            self._fenced
            or not length
            or offset < 0
            or inside + length > self.vol.extent_size
            or offset + length > self.size
        ):
            return None
        ext_id = self._writable_now(slot)
        if ext_id is None or ext_id in self._copy_locks or ext_id in self._joining:
            return None
        ext = self._extents[ext_id]
        cached = self.pool.cached
        clients = [cached(node) for node in ext.replicas]
        if None in clients:
            return None
        loop = asyncio.get_running_loop()
        done: asyncio.Future[None] = loop.create_future()
        fan_in = FanIn(len(clients), self._written, (ext_id, slot, inside, data, done))
        epoch, generation = self.epoch, ext.generation
        crcs = sector_crcs(data, SECTOR) if not (inside | length) % SECTOR else None
        for client in clients:
            assert client is not None
            try:
                aw = client.write(
                    ext_id, inside, data, epoch=epoch, generation=generation, crcs=crcs
                )
                fut = aw if isinstance(aw, asyncio.Future) else asyncio.ensure_future(aw)
            except Exception as exc:  # a client that fails at once fails this replica
                fut = loop.create_future()
                fut.set_exception(exc)
            fut.add_done_callback(fan_in.one_done)
        self._active[ext_id] = self._active.get(ext_id, 0) + 1
        return done

    def _written(
        self,
        failed: bool,
        ext_id: str,
        slot: int,
        inside: int,
        data: bytes,
        done: asyncio.Future[None],
    ) -> None:
        """Every replica write of a ``write_nowait`` is done: settle ``done`` or redo."""
        self._active[ext_id] -= 1
        if not failed:
            self._dirty.add(ext_id)  # before the answer: the next flush covers this write
        if done.done():
            return
        if not failed:
            done.set_result(None)
            return
        redo = asyncio.ensure_future(self._write_piece(slot, inside, data, False))
        self._background.add(redo)
        redo.add_done_callback(functools.partial(self._redone, done))

    def _redone(self, done: asyncio.Future[None], redo: asyncio.Future[None]) -> None:
        self._background.discard(redo)
        if done.done():
            return
        if redo.cancelled():
            done.cancel()
        elif (exc := redo.exception()) is not None:
            done.set_exception(exc)
        else:
            done.set_result(None)

    async def _write_piece(self, slot: int, offset: int, chunk: Buffer, fua: bool) -> None:
        while True:
            ext_id = self._writable_now(slot)
            if ext_id is None:
                await self._ensure_writable(slot)
                continue  # decide again without awaiting, together with the epoch below
            epoch = self.epoch
            op = self._write_op(ext_id, offset, chunk, fua, epoch)
            try:
                return await self._replicate(ext_id, op)
            except _Reepoched:
                continue  # a snapshot was taken: the slot may now need copy-on-write
            except Refused as exc:  # the replicas that took it get back what the full one has
                await undo(self, exc, offset, len(chunk))
                raise

    async def trim(self, offset: int, length: int) -> None:
        await self._clear(offset, length)

    async def write_zeroes(
        self, offset: int, length: int, fua: bool = False, may_trim: bool = True
    ) -> None:
        await self._clear(offset, length)
        if fua:
            await self.flush()

    async def _clear(self, offset: int, length: int) -> None:
        self._check_live()
        check_range(self, offset, length)
        for p in split(offset, length, self.vol.extent_size):
            while self.vol.extents[p.slot] is not None:  # never written: already zeros
                ext_id = self._writable_now(p.slot)
                if ext_id is None:
                    await self._ensure_writable(p.slot)
                    continue
                epoch = self.epoch
                try:
                    await self._replicate(ext_id, self._trim_op(ext_id, p, epoch))
                    break
                except _Reepoched:
                    continue
                except Refused as exc:  # a disk refused it (a full one may refuse even a trim)
                    await undo(self, exc, p.offset, p.length, trim=True)
                    raise

    # A mutation carries the epoch under which its extent was found writable in place, read in
    # the same step (no await between): after a snapshot the replicas accept the new epoch, so a
    # write deciding on the old table but sending the new epoch would change the snapshot.
    @staticmethod
    def _write_op(ext_id: str, offset: int, chunk: Buffer, fua: bool, epoch: int) -> ReplicaOp:
        def op(c: ReplicaClient, e: ExtentRecord) -> Awaitable[object]:
            return c.write(ext_id, offset, chunk, epoch=epoch, generation=e.generation, fua=fua)

        return op

    @staticmethod
    def _trim_op(ext_id: str, p: Piece, epoch: int) -> ReplicaOp:
        def op(c: ReplicaClient, e: ExtentRecord) -> Awaitable[object]:
            return c.trim(ext_id, p.offset, p.length, epoch=epoch, generation=e.generation)

        return op

    async def flush(self) -> None:
        self._check_live()
        await self._dirty.flush(self._flush_extent)

    async def _flush_extent(self, ext_id: str) -> None:
        try:
            await self._replicate(ext_id, flush_op(ext_id), dirty=False)
        except NotFound:  # reclaimed since (copied on write, then its snapshot deleted)
            log.info("volume %s: extent %s is gone: nothing to flush", self.vol.name, ext_id)

    async def _replicate(self, ext_id: str, op: ReplicaOp, dirty: bool = True) -> None:
        """Run ``op`` on every valid replica; drop the unreachable ones and redo ``op`` on the
        rest under the new generation. Raises ``Fenced`` on a stale epoch, ``BlockError`` if no
        replica is left. Mutations (``dirty``) also go to a joining replica, and wait while a
        recovery copy of the extent holds its copy lock."""
        if not dirty:
            return await self._replicate_now(ext_id, op, joining=False)
        while (lock := self._copy_locks.get(ext_id)) is not None:
            async with lock:
                if self._copy_locks.get(ext_id) is lock:  # else that join ended: look again
                    await self._replicate_now(ext_id, op, joining=True)
                    break
        else:
            self._active[ext_id] = self._active.get(ext_id, 0) + 1
            try:
                await self._replicate_now(ext_id, op, joining=True)
            finally:
                self._active[ext_id] -= 1
        self._dirty.add(ext_id)  # once done: the next flush covers it, whatever began before

    async def _replicate_now(self, ext_id: str, op: ReplicaOp, joining: bool) -> None:
        while True:
            ext = self._extents.get(ext_id) or await self._extent(ext_id)
            targets = ext.replicas
            joiner = self._joining.get(ext_id) if joining else None
            if joiner is not None:
                targets = [*targets, joiner]
            clients = [self.pool.cached(n) or await self._client_or_none(n) for n in targets]
            results = await fan_out([op(c, ext) if c else unavailable() for c in clients])
            if joiner is not None and any(isinstance(r, BaseException) for r in results):
                # the joiner failed, or has what the others refused (a newer epoch: this
                # write is redone elsewhere, e.g. copied on write after a snapshot)
                self._join_failed.add(ext_id)
            failed, full = [], []
            for node, res in zip(ext.replicas, results, strict=False):
                if isinstance(res, StaleEpoch):
                    await self._stale_epoch(str(res), res.epoch)
                elif no_space(res):
                    full.append(node)
                elif isinstance(res, ReplicaUnavailable | ChunkIOError):
                    failed.append(node)
                elif isinstance(res, BaseException):
                    raise as_block_error(res)
            if full:  # a full replica is not a failed one: the request fails, it is not dropped
                if joiner is not None:  # it may hold what the others refused
                    self._join_failed.add(ext_id)
                refused = Refused.of_fan_out(
                    self.vol.name, ext_id, full, targets, results, ext.generation
                )
                if failed:  # they may have taken it: they catch it up, or the undo restores them
                    try:
                        await self.drop(ext_id, failed, missed_from=ext.generation - 1)
                    except Fenced:
                        raise
                    except AecpError as exc:  # Meta unreachable: they stay members for the undo
                        log.warning("volume %s: %s not dropped: %s", self.vol.name, failed, exc)
                raise refused
            if not failed:
                return
            if len(failed) == len(ext.replicas):
                raise BlockError(
                    f"volume {self.vol.name}: every replica of extent {ext_id} "
                    f"is unreachable ({', '.join(failed)})"
                )
            await self.drop(ext_id, failed)

    async def drop(self, ext_id: str, nodes: list[str], missed_from: int | None = None) -> None:
        """Drop the replicas on ``nodes`` (they failed) while this access point holds the
        volume, else it is fenced. They catch up the blocks modified after ``missed_from``
        (default: the current generation): lower for replicas that may hold a write the
        others lack, which lowers it for those already stale too. While an undo of the extent
        is pending, no later than its floor (``refused.Undos.floor``)."""
        missed_from = self._floored(ext_id, missed_from)
        try:
            self._keep(
                await self.meta.drop_replicas(
                    ext_id, nodes, missed_from=missed_from, holder=self.holder
                )
            )
        except NotHolder as exc:  # taken over or detached meanwhile
            self._fence(exc.message)

    def _floored(self, ext_id: str, missed_from: int | None) -> int | None:
        """``missed_from`` for a drop, no later than a pending undo's floor."""
        floor = self.undos.floor(ext_id)
        if floor is None:
            return missed_from
        return floor if missed_from is None else min(missed_from, floor)

    # ---- recovery support (used by ``storage.recovery`` and ``storage.refused``) ---------
    async def drop_lost(self, ext_id: str, nodes: list[str]) -> ExtentRecord:
        """Drop the replicas of ``ext_id`` on ``nodes`` (gone from the cluster) as a write
        that failed on them would; returns the extent as now held."""
        await self.drop(ext_id, nodes)
        return self._extents[ext_id]

    async def begin_join(self, ext_id: str, node: str) -> None:
        """From now on live writes of the extent also go to ``node``; returns once every write
        that started before is done (so a copy listed afterwards misses nothing). ``node`` is
        fenced at this epoch first: it refuses what an older access point still sends."""
        self._check_live()
        await (await self.pool.client(node)).fence(ext_id, self.epoch)
        await self._joins.begin(ext_id, node)

    async def copy_range(
        self, ext_id: str, src: ReplicaClient, dst: ReplicaClient, offset: int, length: int
    ) -> None:
        """Copy whole blocks from ``src`` to ``dst`` while no live write touches the extent
        (``StaleEpoch`` once a newer access point claimed ``dst``)."""
        self._check_live()
        await self._joins.copy_range(ext_id, src, dst, offset, length, self.epoch)

    def join_failed(self, ext_id: str) -> bool:
        return ext_id in self._join_failed

    def fail_join(self, ext_id: str) -> None:
        """The joining replica of ``ext_id`` missed a change: its join fails."""
        if ext_id in self._joining:
            self._join_failed.add(ext_id)

    def mark_dirty(self, ext_id: str) -> None:
        """The extent changed outside a write (an undo): the next flush covers it."""
        self._dirty.add(ext_id)

    def joiner(self, ext_id: str) -> str | None:
        """The node of the replica joining ``ext_id`` now, if any."""
        return self._joining.get(ext_id)

    def held(self, ext_id: str) -> ExtentRecord | None:
        """The extent's record as this access point holds it now (None: not held)."""
        return self._extents.get(ext_id)

    async def stale_epoch_met(self, why: str, used: int) -> None:
        """A replica refused epoch ``used`` outside a request (an undo): returns once a
        snapshot's epoch is adopted (decide again); ``Fenced`` if another holds the volume."""
        with contextlib.suppress(_Reepoched):
            await self._stale_epoch(why, used)

    async def end_join(
        self, ext_id: str, admit: Callable[[], Awaitable[ExtentRecord]] | None
    ) -> None:
        """Stop sending live writes to the joining replica. ``admit`` (run while no write can
        touch the extent) records it as valid and returns the new extent record; None aborts.
        A join that failed, or an access point fenced or closed meanwhile, admits nothing.
        Ending a join that already ended does nothing."""

        async def admitting() -> None:
            assert admit is not None
            self._check_live()
            if ext_id in self._join_failed:
                node = self._joining.get(ext_id, "?")
                raise ChunkError(f"extent {ext_id}: {node} failed while joining")
            await self._admit_under_lock(ext_id, admit)

        await self._joins.end(ext_id, admitting if admit is not None else None)

    def refresh(self, vol: VolumeRecord, rev: int, extents: dict[str, ExtentRecord]) -> None:
        """Adopt the metadata Meta held when read (the recovery loop reads it every pass):
        the volume record (store revision ``rev``) and extent records, each unless older
        than the one held (a read that was overtaken by a change made here is ignored)."""
        self._adopt(vol, rev)
        for ext_id in self._extents.keys() & extents.keys():
            if ext_id not in self._copy_locks:
                self._keep(extents[ext_id])

    async def _admit_under_lock(
        self, ext_id: str, admit: Callable[[], Awaitable[ExtentRecord]]
    ) -> None:
        try:
            self._keep(await admit())
        except Exception:  # Meta may have admitted it before the failure: read what it holds
            try:
                self._extents[ext_id] = (await self.meta.extent(ext_id))[0]
            except AecpError:
                self._extents.pop(ext_id, None)
            raise
        except BaseException:
            self._extents.pop(ext_id, None)
            raise

    def quiesced(self, ext_id: str) -> contextlib.AbstractAsyncContextManager[None]:
        """Inside the block no write to the extent runs (they wait): for repairs, which read
        good data from one replica and write it to another. A closed or fenced access point
        raises ``Fenced`` once the writes have drained: it is no longer the writer to order
        with."""
        return self._joins.quiesced(ext_id, self._check_live)

    async def replicas_of(self, ext_id: str) -> list[str]:
        """The extent's valid replicas as this access point (its only writer) knows them."""
        return list((await self._extent(ext_id)).replicas)

    async def current(self, ext_id: str) -> ExtentRecord:
        """The extent's record as Meta holds it now (kept, unless the one held is newer)."""
        return self._keep((await self.meta.extent(ext_id))[0])

    def _keep(self, ext: ExtentRecord) -> ExtentRecord:
        """Hold ``ext`` unless the record held for that extent is newer (a higher generation:
        replies from Meta may arrive out of order); returns the record held."""
        held = self._extents.get(ext.id)
        if held is not None and held.generation > ext.generation:
            return held
        self._extents[ext.id] = ext
        return ext

    def _adopt(self, vol: VolumeRecord, rev: int) -> None:
        """Hold ``vol``, read at store revision ``rev``, unless a newer read is held."""
        if rev >= self._vol_rev:
            self.vol, self._vol_rev = vol, rev

    async def _client_or_none(self, node: str) -> ReplicaClient | None:
        try:
            return await self.pool.client(node)
        except ReplicaUnavailable:
            return None

    # ---- extent allocation ---------------------------------------------------------------
    async def _extent(self, ext_id: str) -> ExtentRecord:
        ext = self._extents.get(ext_id)
        if ext is None:
            ext = self._keep((await self.meta.extent(ext_id))[0])
        return ext

    def _writable_now(self, slot: int) -> str | None:
        """The extent of ``slot`` if it is known to be writable in place, without waiting."""
        ext_id = self.vol.extents[slot]
        if ext_id is None:
            return None
        ext = self._extents.get(ext_id)
        return ext_id if ext is not None and writable_in_place(ext, self.vol) else None

    async def _ensure_writable(self, slot: int) -> str:
        """The extent of ``slot`` this volume may write in place: allocated on first write,
        copied first when it is shared with a snapshot or another volume."""
        ext_id = self.vol.extents[slot]
        if ext_id is not None and writable_in_place(await self._extent(ext_id), self.vol):
            return ext_id
        lock = self._slot_locks.setdefault(slot, asyncio.Lock())
        async with lock:
            ext_id = self.vol.extents[slot]
            if ext_id is None:
                return await self._allocate(slot)
            ext = await self._extent(ext_id)
            if writable_in_place(ext, self.vol):
                return ext_id
            return await self._copy_on_write(slot, ext)

    async def _copy_on_write(self, slot: int, shared: ExtentRecord) -> str:
        """Copy the shared extent's written blocks into a new extent owned by this volume and
        put it in ``slot`` (the snapshot keeps the old one)."""
        new = await create_replicas(self.meta, self.pool, self.vol, self.node, self.epoch)
        dsts = [await self.pool.client(n) for n in new.replicas]
        try:
            copied = await self._copy_into(shared, new, dsts)
        except BaseException as exc:  # named by nobody yet: its replicas go again
            await asyncio.gather(*(d.delete(new.id) for d in dsts), return_exceptions=True)
            if no_space(exc):
                raise as_block_error(exc) from exc
            raise
        # only a definite "no" deletes: a failure here may come after the change was committed
        if not await self.meta.replace_extent(self.vol.name, slot, shared.id, new):
            await asyncio.gather(*(d.delete(new.id) for d in dsts), return_exceptions=True)
        self._adopt(*await self.meta.volume(self.vol.name))
        ext_id = self.vol.extents[slot]
        assert ext_id is not None
        self._extents.pop(shared.id, None)
        log.info(
            "volume %s: slot %d copied on write: %s -> %s (%d bytes)",
            self.vol.name,
            slot,
            shared.id,
            ext_id,
            copied,
        )
        await self.pool.delete_replicas(await self.meta.collect({shared.id}))
        return ext_id

    async def _copy_into(
        self, shared: ExtentRecord, new: ExtentRecord, dsts: list[ReplicaClient]
    ) -> int:
        """Copy the written blocks of ``shared`` to ``new``'s replicas, durably; bytes copied."""
        src, _ = await self._readable(shared)
        async with self.quiesced(shared.id):  # a write to it still in flight lands first
            copied = await copy_written(src, shared.id, new.id, dsts)
        await asyncio.gather(*(d.flush(new.id) for d in dsts))
        return copied

    async def _readable(self, ext: ExtentRecord) -> tuple[ReplicaClient, str]:
        for node in self._read_order(ext):
            try:
                client = await self.pool.client(node)
                await client.ping()
            except ChunkError:
                continue
            return client, node
        raise BlockError(f"volume {self.vol.name}: no replica of extent {ext.id} answers")

    async def _allocate(self, slot: int) -> str:
        """Create the replicas of a new extent for ``slot`` (skipping nodes that do not answer)
        and commit it; returns the extent id now in the slot (ours or a concurrent one)."""
        ext = await create_replicas(self.meta, self.pool, self.vol, self.node, self.epoch)
        if not await self.meta.commit_extent(self.vol.name, slot, ext):
            clients = [await self.pool.client(n) for n in ext.replicas]
            await asyncio.gather(*(c.delete(ext.id) for c in clients), return_exceptions=True)
        self._adopt(*await self.meta.volume(self.vol.name))
        ext_id = self.vol.extents[slot]
        assert ext_id is not None
        log.info(
            "volume %s: slot %d allocated as extent %s on %s",
            self.vol.name,
            slot,
            ext_id,
            ", ".join(ext.replicas),
        )
        return ext_id

    # ---- status -------------------------------------------------------------------------
    async def block_status(self, offset: int, length: int) -> list[Span]:
        self._check_live()
        check_range(self, offset, length)
        p = next(split(offset, length, self.vol.extent_size))
        ext_id = self.vol.extents[p.slot]
        if ext_id is None:
            return [Span(p.length, Allocation.HOLE | Allocation.ZERO)]
        ext = await self._extent(ext_id)
        runs: list[tuple[int, int, bool]] = []
        for node in self._read_order(ext):
            try:
                runs = await (await self.pool.client(node)).allocation(ext_id)
                break
            except ReplicaUnavailable:
                continue
        return clip_runs(runs, p.offset, p.length)

    # ---- fencing ------------------------------------------------------------------------
    async def _stale_epoch(self, why: str, used: int) -> None:
        """A replica refused epoch ``used``: if the attachment is still this access point's
        (a snapshot re-epoched it), adopt its epoch — once, however many requests in flight
        hit the same refusal — and make the caller retry; else this access point is fenced.
        (A replica the snapshot could not fence, which may take what the others refuse, was
        dropped by the snapshot itself.)"""
        att = await self.meta.attachment(self.vol.name)
        if att is not None and self.ap and att.ap == self.ap and att.epoch > used:
            if att.epoch > self.epoch:
                # read after the attachment, the table is at least as new as its epoch; the
                # epoch and the table change together (no await between), or a write could
                # find an extent the snapshot shares writable and send it under the new epoch
                vol, rev = await self.meta.volume(self.vol.name)
                if att.epoch > self.epoch:
                    self._adopt(vol, rev)
                    self.epoch = att.epoch
                    self._extents.clear()  # the snapshot may have dropped unfenced replicas
                    log.info("volume %s: adopted epoch %d after a snapshot", vol.name, att.epoch)
            raise _Reepoched
        self._fence(why)

    def _fence(self, why: str) -> None:
        if not self._fenced:
            log.warning(
                "volume %s: access point on %s fenced (epoch %d): %s",
                self.vol.name,
                self.node,
                self.epoch,
                why,
            )
        self._fenced = why or "a newer access point attached the volume"
        raise Fenced(f"volume {self.vol.name}: this access point was fenced: {self._fenced}")

    def _check_live(self) -> None:
        if self._fenced:
            raise Fenced(f"volume {self.vol.name}: this access point was fenced: {self._fenced}")

    async def fence_replicas(self) -> None:
        """Claim every extent this volume writes in place for this epoch (older access points
        get StaleEpoch). Shared extents are never written in place: nothing to fence."""
        for ext_id in {x for x in self.vol.extents if x}:
            if not writable_in_place(await self._extent(ext_id), self.vol):
                continue
            await self._replicate(ext_id, fence_op(ext_id, self.epoch), dirty=False)

    @property
    def holder(self) -> Holder:
        """This access point as its attachment record names it."""
        return Holder(self.vol.name, self.node, self.epoch, self.ap)

    async def close(self) -> None:
        """Detach (unless fenced) after a last try at the pending undos, made only while this
        access point still holds the attachment (``refused.last_try``); every later request,
        and any join, fails."""
        if not self._fenced and self.undos and await last_try(self):
            with contextlib.suppress(AecpError):
                await self.flush()
            if self.undos:  # recorded in Meta: the next access point of the volume takes them
                log.warning("volume %s: closed with refused writes not undone", self.vol.name)
        if not self._fenced:
            await self.meta.detach(self.vol.name, self.node, self.epoch, self.ap)
        self._fenced = self._fenced or "it was closed"


class _AllGone(Exception):
    """Every replica a read tried answered "not found": the extent moved meanwhile."""


class _Reepoched(Exception):
    """The access point adopted a newer epoch: redo the request from the start."""
