"""The local replica store of one node: ``ReplicaStore``.

Semantics are those of ``api.ReplicaClient`` (the spec); this module owns how they are carried
out. Files and their formats: ``files`` and ``meta``. Whole-sector writes that need no INTENT
record go to an io_uring (``uring.Ring``, where the kernel has it); other blocking I/O runs in an
``IoPool``. The metadata tables are changed only on the event-loop thread, in the completion
callback of the job that did the I/O, so a cancelled request never leaves metadata and data out
of step.

Reads of at most ``CACHED_READ_MAX`` bytes are first tried on the event-loop thread with
``preadv(RWF_NOWAIT)``, which returns at once (EAGAIN) instead of waiting for the disk: data in
the page cache costs no thread hand-off, anything else goes to a worker as usual. So the loop
never waits for the disk; ``cached_reads=False`` sends every read to a worker.

Request ordering per replica:
1. validate (``ChunkInvalid``, nothing changed);
2. take the block locks (mutations exclusive, reads shared; arrival order where they overlap);
3. check the epoch (``StaleEpoch``, nothing changed; a newer epoch is persisted first);
4. one I/O job (INTENT records, then data); its completion applies metadata, then unlocks.

Durability (``persist``): mutations change data in the page cache and metadata in memory;
``flush`` (and ``fua``) fsyncs data, then the metadata journal. ``close`` compacts. A failed
data write or fsync marks the replica *failed*: later mutations and flushes raise
``ChunkIOError`` (reads still work) until the replica is re-created from a peer. A write, a
journal append or a flush the disk refused for want of space (``ENOSPC``) fails alone: the
replica lost nothing it held (a torn journal append is cut away again, ``diskio.Journal``;
records a flush could not write are written by the next one, ``persist``).

Space (``space``): a store given a ``capacity`` refuses a mutation that would fill more blocks
than fit (``ChunkIOError`` with ``ENOSPC``, checked with the epoch, before anything changes).
"""

from __future__ import annotations

import asyncio
import errno
import logging
import zlib
from array import array
from asyncio import Future
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from aecp.storage.chunk import files
from aecp.storage.chunk.api import U64_MAX, Buffer, RawBlocks, ReplicaStat
from aecp.storage.chunk.diskio import (
    CACHED_READS,
    NO_ROOM,
    NotDone,
    read_blocks,
    sector_crcs,
    write_blocks,
    write_sectors,
)
from aecp.storage.chunk.errors import (
    ChecksumError,
    ChunkError,
    ChunkInvalid,
    ChunkIOError,
    ExtentExists,
    ExtentNotFound,
    ReplicaChanged,
    StaleEpoch,
)
from aecp.storage.chunk.iopool import Done, IoPool
from aecp.storage.chunk.journal import ReplicaMeta
from aecp.storage.chunk.persist import Persistence, await_io, check_failed
from aecp.storage.chunk.replica import (
    Job,
    Replica,
    check_id,
    check_range,
    check_raw,
    check_u64,
    plan_read,
    plan_trim,
    plan_write,
)
from aecp.storage.chunk.space import Space
from aecp.storage.chunk.uring import Ring, ring_unavailable

log = logging.getLogger(__name__)

T = TypeVar("T")

MAX_EXTENT_SIZE = 64 << 30
#: larger reads always go to a worker thread (checksumming them would hold the loop too long)
CACHED_READ_MAX = 64 * 1024
SCRUB_BLOCKS = 16


class ReplicaStore:
    """The replicas of one node under ``root``. Use from one event loop; ``close`` when done.

    Each public method has the semantics of the ``api.ReplicaClient`` method of the same name.
    ``threads`` worker threads run data I/O (plus ``threads // 2`` ordered lanes for metadata
    persistence); blocks hold ``block_size // sector`` sectors (at most 64)."""

    def __init__(
        self,
        root: Path,
        *,
        block_size: int = 256 * 1024,
        sector: int = 4096,
        threads: int = 4,
        cached_reads: bool = True,
        uring: bool = True,
        capacity: int | None = None,
    ) -> None:
        if sector < 512 or sector & (sector - 1) or block_size % sector:
            raise ChunkInvalid(f"bad geometry: blocks of {block_size}, sectors of {sector}")
        if not 1 <= block_size // sector <= 64:
            raise ChunkInvalid("a block holds 1 to 64 sectors")
        self.root = Path(root)
        self.block_size = block_size
        self.sector = sector
        self._pool = IoPool(threads, lanes=max(1, threads // 2))
        self._persistence = Persistence(self._pool)
        self._replicas: dict[str, Replica] = {}
        self._namespace = asyncio.Lock()
        self._closed = False
        self._cached_reads = cached_reads and CACHED_READS
        self._ring = Ring() if uring and not ring_unavailable() else None
        #: bytes used, and the ``capacity`` (None: the disk's) beyond which writes are refused
        self.space = Space(self.root, capacity, block_size)

    async def __aenter__(self) -> ReplicaStore:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    # --- replicas ------------------------------------------------------------------------

    async def create(
        self, extent_id: str, size: int, *, epoch: int = 0, generation: int = 0
    ) -> None:
        check_id(extent_id)
        check_u64(epoch=epoch, generation=generation)
        if not 0 < size <= MAX_EXTENT_SIZE or size % self.block_size:
            raise ChunkInvalid(f"extent size {size} is not a positive multiple of the block size")
        async with self._namespace:
            try:
                rep = await self._load(extent_id)
            except ExtentNotFound:
                pass
            else:
                if rep.meta.size != size:
                    raise ExtentExists(extent_id, f"exists with size {rep.meta.size}, not {size}")
                rep.version += 1  # someone builds on it again: not left alone
                return
            meta = ReplicaMeta(size, self.block_size, self.sector, epoch, generation)
            rep = Replica(self.root, extent_id, meta, self._lane(extent_id))

            def register(_: object, exc: BaseException | None) -> None:
                if exc is None:
                    self._replicas[extent_id] = rep

            await self._run(files.create_files, rep, lane=rep.lane, done=register)
        log.info("replica %s created (%d bytes, epoch %d)", extent_id, size, epoch)

    async def delete(
        self, extent_id: str, epoch: int = 0, *, unchanged: Observed | None = None
    ) -> None:
        """``api.ReplicaClient.delete``; with ``unchanged`` (this store's own callers: the
        orphan collector), only if the replica is still as ``observe`` saw it: not mutated,
        fenced or created again since (``ReplicaChanged`` otherwise, nothing deleted)."""
        check_id(extent_id)
        check_u64(epoch=epoch)
        async with self._namespace:
            try:
                rep = await self._load(extent_id)
            except (ChunkIOError, ChunkInvalid) as e:  # damaged or foreign metadata
                if unchanged is not None:
                    raise
                log.warning("replica %s: deleting it although it is damaged (%s)", extent_id, e)
                await self._run(files.remove_files, self.root, extent_id)
                return
            if epoch and epoch < rep.meta.epoch:  # checked and marked in one step (``fence``)
                raise StaleEpoch(extent_id, epoch, rep.meta.epoch)
            if unchanged is not None and self._observe(rep) != unchanged:
                raise ReplicaChanged(extent_id)
            rep.deleted = True
            await rep.locks.drain()
            self._replicas.pop(extent_id, None)
            await self._run(files.delete_files, rep, lane=rep.lane)
            self.space.change(-rep.meta.allocated_blocks() * rep.meta.block_size)
        log.info("replica %s deleted", extent_id)

    async def exists(self, extent_id: str) -> bool:
        """Whether a replica of ``extent_id`` is stored here."""
        check_id(extent_id)
        self._check_open()
        rep = self._replicas.get(extent_id)
        if rep is not None:
            return not rep.deleted
        return await self._run(files.meta_exists, self.root, extent_id)

    async def list_extents(self) -> list[str]:
        self._check_open()
        ids = await self._run(files.list_ids, self.root)
        return [i for i in ids if not ((r := self._replicas.get(i)) and r.deleted)]

    async def stat(self, extent_id: str) -> ReplicaStat:
        return _stat((await self._get(extent_id)).meta)

    async def observe(self, extent_id: str) -> Observed:
        """The replica's stat and how often it was changed (mutations, fences and creates
        counted as they start): equal observations mean nobody touched it in between."""
        return self._observe(await self._get(extent_id))

    @staticmethod
    def _observe(rep: Replica) -> Observed:
        return Observed(_stat(rep.meta), rep.version)

    # --- I/O -----------------------------------------------------------------------------

    async def write(
        self,
        extent_id: str,
        offset: int,
        data: Buffer,
        *,
        epoch: int,
        generation: int,
        fua: bool = False,
        crcs: array[int] | None = None,
    ) -> None:
        if not fua:
            started = self.write_nowait(
                extent_id, offset, data, epoch=epoch, generation=generation, crcs=crcs
            )
            if started is not None:
                return await started
        rep = self._replicas.get(extent_id)
        if rep is None or rep.deleted:
            rep = await self._get(extent_id)
        view = data if type(data) is bytes else memoryview(data).cast("B")
        length = len(view)
        if not (offset >= 0 and offset + length <= rep.meta.size):
            check_range(rep, offset, length)
        if not (0 <= epoch <= U64_MAX and 0 <= generation <= U64_MAX):
            check_u64(epoch=epoch, generation=generation)
        if length:
            plan = lambda: plan_write(rep, offset, view, generation, crcs)  # noqa: E731
            await self._locked(rep, offset, length, True, epoch, plan, _fills_all)
        else:
            await self._admit(rep, epoch)
        if fua:
            await self._persistence.flush(rep)

    def write_nowait(
        self,
        extent_id: str,
        offset: int,
        data: Buffer,
        *,
        epoch: int,
        generation: int,
        crcs: array[int] | None = None,
    ) -> Future[None] | None:
        """``write`` (without ``fua``) started at once, when nothing stands in its way: the
        replica is open and healthy, ``epoch`` is its current one, the range covers whole
        sectors of blocks already INTENT-logged and none of them is locked, and the io_uring
        is in use. Returns a future set when the data is in the page cache with its checksums
        recorded (``ChunkIOError`` if the write failed; cancelling it does not stop the
        write). Returns None, having changed nothing, when any of that does not hold: then
        call ``write``, which validates and waits where needed. ``crcs``, one per sector of
        ``data`` (else ignored), are recorded as they are instead of computed here."""
        ring = self._ring
        rep = self._replicas.get(extent_id)
        if ring is None or rep is None or rep.deleted or rep.failed:
            return None
        meta = rep.meta
        sec = meta.sector
        view = data if type(data) is bytes else memoryview(data).cast("B")
        length = len(view)
        if (
            not length
            or offset % sec
            or length % sec
            or offset < 0
            or offset + length > meta.size
            or epoch != meta.epoch
            or not 0 <= generation <= U64_MAX
        ):
            return None
        first, last = self._blocks(offset, length)
        touched = rep.touched
        if not (first in touched if last - first == 1 else touched.issuperset(range(first, last))):
            return None
        bitmaps = meta.bitmaps  # a block still empty takes space: ``write`` counts it
        if not (bitmaps[first] if last - first == 1 else all(bitmaps[first:last])):
            return None
        locks = rep.locks
        if not locks.try_acquire(first, last, True):
            return None
        rep.version += 1
        if last - first == 1:
            rep.written.add(first)
        else:
            rep.written.update(range(first, last))
        fut: Future[None] = asyncio.get_running_loop().create_future()
        if crcs is not None and len(crcs) * sec != length:
            crcs = None

        def written(_: object, exc: BaseException | None) -> None:
            try:
                if exc is None:
                    sums = sector_crcs(view, sec) if crcs is None else crcs
                    meta.mark_written(offset // sec, sums, generation)
                    rep.unsynced = True
                    if not fut.done():
                        fut.set_result(None)
                    return
                code = exc.errno if isinstance(exc, OSError) else None
                if code not in NO_ROOM:  # out of space: this write failed, nothing was lost
                    rep.failed = rep.failed or f"write failed: {exc}"
                if not fut.done():
                    fut.set_exception(ChunkIOError(str(exc), code or errno.EIO))
            finally:
                locks.release(first, last, True)

        try:
            ring.pwrite_then(rep.data_fd, view, offset, written)
        except BaseException:
            locks.release(first, last, True)
            raise
        return fut

    async def read(self, extent_id: str, offset: int, length: int) -> bytes:
        rep = self._replicas.get(extent_id)
        if rep is None or rep.deleted:
            rep = await self._get(extent_id)
        if not (offset >= 0 and length >= 0 and offset + length <= rep.meta.size):
            check_range(rep, offset, length)
        bs = self.block_size
        if not length or not rep.meta.any_valid(offset // bs, (offset + length - 1) // bs + 1):
            return bytes(length)
        if self._cached_reads and length <= CACHED_READ_MAX:
            cached = self._read_cached(rep, offset, length)
            if cached is not None:
                return cached
        plan = lambda: plan_read(rep, offset, length)  # noqa: E731
        data: bytes = await self._locked(rep, offset, length, False, None, plan)
        return data

    def read_nowait(self, extent_id: str, offset: int, length: int) -> bytes | None:
        """``read`` done at once if it needs no waiting: the replica is open, the range valid,
        and its data unwritten or in the page cache (``_read_cached``). None otherwise, and
        for anything ``read`` would raise (a checksum mismatch included): call ``read``."""
        rep = self._replicas.get(extent_id)
        if rep is None or rep.deleted or length <= 0 or length > CACHED_READ_MAX:
            return None
        if offset < 0 or offset + length > rep.meta.size:
            return None
        bs = self.block_size
        if not rep.meta.any_valid(offset // bs, (offset + length - 1) // bs + 1):
            return bytes(length)
        if not self._cached_reads:
            return None
        try:
            return self._read_cached(rep, offset, length)
        except ChunkError:
            return None

    def _read_cached(self, rep: Replica, offset: int, length: int) -> bytes | None:
        """The read done at once on this thread if its blocks are not locked and its data is
        in the page cache (``diskio.pread_cached`` never waits for the disk), else None."""
        first, last = self._blocks(offset, length)
        if rep.deleted or not rep.locks.try_acquire(first, last, False):
            return None
        try:
            fn, args, _ = plan_read(rep, offset, length)
            data: bytes = fn(*args, cached_only=True)
            return data
        except BlockingIOError:
            return None
        except OSError as e:
            if e.errno != errno.EOPNOTSUPP:
                raise ChunkIOError(str(e), e.errno or errno.EIO) from e
            self._cached_reads = False  # this file system cannot say: always use threads
            return None
        finally:
            rep.locks.release(first, last, False)

    async def trim(
        self, extent_id: str, offset: int, length: int, *, epoch: int, generation: int
    ) -> None:
        rep = await self._get(extent_id)
        check_range(rep, offset, length)
        check_u64(epoch=epoch, generation=generation)
        if not length:
            await self._admit(rep, epoch)
            return
        plan = lambda: plan_trim(rep, offset, length, generation)  # noqa: E731
        await self._locked(rep, offset, length, True, epoch, plan)

    async def write_zeroes(
        self, extent_id: str, offset: int, length: int, *, epoch: int, generation: int
    ) -> None:
        await self.trim(extent_id, offset, length, epoch=epoch, generation=generation)

    async def flush(self, extent_id: str | None = None) -> None:
        if extent_id is not None:
            await self._persistence.flush(await self._get(extent_id))
            return
        self._check_open()
        await asyncio.gather(*(self._persistence.flush(r) for r in list(self._replicas.values())))

    # --- epochs and generations ----------------------------------------------------------

    async def fence(self, extent_id: str, epoch: int) -> int:
        rep = await self._get(extent_id)
        check_u64(epoch=epoch)
        if epoch < rep.meta.epoch:
            raise StaleEpoch(extent_id, epoch, rep.meta.epoch)
        rep.version += 1  # even at the same epoch: a joiner claims it (``delete(unchanged)``)
        if epoch > rep.meta.epoch:
            rep.meta.epoch = epoch
            await self._persistence.state(rep)
            await rep.locks.drain()
            if rep.deleted:  # deleted meanwhile by a caller that had the newer epoch
                raise ExtentNotFound(extent_id)
            log.info("replica %s fenced at epoch %d", extent_id, epoch)
        return rep.meta.epoch

    async def set_generation(self, extent_id: str, generation: int) -> None:
        rep = await self._get(extent_id)
        check_u64(generation=generation)
        rep.version += 1
        rep.meta.generation = generation
        await self._persistence.state(rep)

    async def modified_since(self, extent_id: str, generation: int) -> list[tuple[int, int]]:
        return (await self._get(extent_id)).meta.modified_since(generation)

    async def allocation(self, extent_id: str) -> list[tuple[int, int, bool]]:
        return (await self._get(extent_id)).meta.runs()

    # --- recovery ------------------------------------------------------------------------

    async def read_raw(self, extent_id: str, offset: int, length: int) -> RawBlocks:
        rep = await self._get(extent_id)
        check_range(rep, offset, length, align=self.block_size)
        first, last = self._blocks(offset, length)
        meta, bs, sec = rep.meta, self.block_size, self.sector
        if not length:
            return RawBlocks(offset, bs, sec, (), (), b"")
        seen: list[tuple[tuple[int, ...], tuple[int, ...]]] = []

        def plan() -> Job:
            bitmaps = meta.bitmaps[first:last].tolist()
            seen.append((tuple(bitmaps), tuple(meta.modgens[first:last])))
            crcs = meta.crcs[first * meta.spb : last * meta.spb]
            return read_blocks, (rep.id, rep.data_fd, offset, bs, sec, bitmaps, crcs), None

        data = await self._locked(rep, offset, length, False, None, plan)
        return RawBlocks(offset, bs, sec, seen[0][0], seen[0][1], data)

    async def write_raw(self, extent_id: str, raw: RawBlocks, epoch: int | None = None) -> None:
        rep = await self._get(extent_id)
        check_raw(rep, raw)
        if not raw.bitmaps:
            return
        meta, first = rep.meta, raw.offset // self.block_size

        def plan() -> Job:
            old = meta.bitmaps[first : first + len(raw.bitmaps)].tolist()
            args = (rep.data_fd, raw.offset, self.block_size, self.sector, raw.bitmaps, old)
            return write_blocks, (*args, raw.data), apply

        def apply(crcs: list[Any]) -> None:
            for i, block_crcs in enumerate(crcs):
                meta.set_block(first + i, raw.bitmaps[i], raw.modgens[i], block_crcs)

        def fills(meta: ReplicaMeta, first: int, last: int) -> int:
            old = meta.bitmaps[first:last]
            return sum(1 for i, b in enumerate(raw.bitmaps) if b and not old[i])

        await self._locked(rep, raw.offset, raw.length, True, epoch, plan, fills)

    async def scrub(self, extent_id: str) -> list[int]:
        rep = await self._get(extent_id)
        bad: list[int] = []
        bs = self.block_size
        for first in range(0, rep.meta.nblocks, SCRUB_BLOCKS):
            last = min(rep.meta.nblocks, first + SCRUB_BLOCKS)
            if rep.meta.any_valid(first, last):
                try:
                    await self.read_raw(extent_id, first * bs, (last - first) * bs)
                except ChecksumError as e:
                    bad += e.sectors
        if bad:
            log.warning("replica %s: scrub found %d bad sectors", extent_id, len(bad))
        return bad

    async def repair(self, extent_id: str, offset: int, data: Buffer, epoch: int = 0) -> None:
        rep = await self._get(extent_id)
        check_u64(epoch=epoch)
        view = data if isinstance(data, bytes) else memoryview(data).cast("B")
        check_range(rep, offset, len(view), align=self.sector)
        if not view:
            return
        first = offset // self.sector

        def plan() -> Job:
            args = (rep.id, rep.data_fd, offset, view, self.sector, None, None)
            return write_sectors, args, lambda crcs: rep.meta.mark_written(first, crcs, None)

        await self._locked(rep, offset, len(view), True, epoch or None, plan, _fills_all)
        log.info("replica %s: repaired %d bytes at %d", extent_id, len(view), offset)

    async def close(self) -> None:
        """Wait for in-flight requests, compact every replica, release files and threads."""
        if self._closed:
            return
        self._closed = True
        for rep in list(self._replicas.values()):
            meta = rep.meta
            changed = rep.journal_size or rep.unsynced or meta.dirty or meta.state_dirty
            try:
                if changed and not rep.deleted and not rep.failed:
                    await self._persistence.settle(rep)
            except ChunkError as e:
                log.error("replica %s: not persisted at close: %s", rep.id, e)
            await rep.locks.drain()
            rep.deleted = True
            await self._run(files.close_files, rep, lane=rep.lane)
        self._replicas.clear()
        await self._pool.close()
        if self._ring is not None:
            await self._ring.close()

    # --- machinery -----------------------------------------------------------------------

    async def _get(self, extent_id: str) -> Replica:
        rep = self._replicas.get(extent_id)
        if rep is not None:
            if rep.deleted:
                raise ExtentNotFound(extent_id)
            return rep
        check_id(extent_id)
        async with self._namespace:
            return await self._load(extent_id)

    async def _load(self, extent_id: str) -> Replica:
        """The open replica, loading it from disk if needed (namespace lock held)."""
        self._check_open()
        rep = self._replicas.get(extent_id)
        if rep is not None:
            return rep

        def register(result: tuple[Replica, int] | None, exc: BaseException | None) -> None:
            if result is not None:
                self._replicas[extent_id] = result[0]
                if result[1]:
                    log.warning(
                        "replica %s: %d sectors re-checksummed after a crash", extent_id, result[1]
                    )

        lane = self._lane(extent_id)
        args = (self.root, extent_id, self.block_size, self.sector, lane)
        loaded: tuple[Replica, int] = await self._run(
            files.load_files, *args, lane=lane, done=register
        )
        return loaded[0]

    async def _locked(
        self,
        rep: Replica,
        offset: int,
        length: int,
        mutate: bool,
        epoch: int | None,
        prepare: Callable[[], Job],
        fills: Callable[[ReplicaMeta, int, int], int] | None = None,
    ) -> Any:
        """Run the job ``prepare`` plans under the block locks of the byte range (see the
        module docstring for the order). The locks are released by the job's completion.
        A mutation's space is counted by how many blocks it leaves allocated; ``fills``
        (meta, first, last) says how many empty blocks it may fill, which must fit first."""
        first, last = self._blocks(offset, length)
        locks = rep.locks
        if mutate:  # from here on, waiting for its blocks too: a delete of it as it was fails
            rep.version += 1
        if not locks.try_acquire(first, last, mutate):
            await locks.acquire(first, last, mutate)
        try:
            if rep.deleted:
                raise ExtentNotFound(rep.id)
            if mutate:
                check_failed(rep)
            if epoch is not None and epoch != rep.meta.epoch:
                await self._admit(rep, epoch)
            meta, space = rep.meta, self.space
            had = meta.allocated_in(first, last) if mutate else 0
            need = fills(meta, first, last) * meta.block_size if fills is not None else 0
            reserved = space.reserve(rep.id, need)
            try:
                fn, args, apply = prepare()
            except BaseException:
                space.settle(reserved, 0)
                raise
            intents: tuple[bytes, list[int]] = (b"", [])
            if mutate:
                intents = rep.intents_for(first, last)
                args = (rep.journal, intents[0], *args)
                rep.written.update(range(first, last))

            def done(result: Any, exc: BaseException | None) -> None:
                try:
                    if exc is None:
                        if apply is not None:
                            apply(result)
                        if mutate:
                            rep.unsynced = True
                            grown = meta.allocated_in(first, last) - had
                            space.settle(reserved, grown * meta.block_size)
                        return
                    space.settle(reserved, 0)
                    if isinstance(exc, NotDone):  # the journal was cut back: no INTENT there
                        rep.forget_intents(*intents)
                    if mutate and isinstance(exc, OSError) and exc.errno not in NO_ROOM:
                        rep.failed = rep.failed or f"write failed: {exc}"
                finally:
                    locks.release(first, last, mutate)

            try:
                fut = self._submit(fn, args, done)
            except BaseException:
                space.settle(reserved, 0)
                if mutate:
                    rep.forget_intents(*intents)
                raise
        except BaseException:
            locks.release(first, last, mutate)
            raise
        try:
            return await fut
        except OSError as e:
            raise ChunkIOError(str(e), e.errno or errno.EIO) from e

    def _submit(self, fn: Callable[..., Any], args: tuple[Any, ...], done: Done) -> Future[Any]:
        """Start the job: a whole-sector write that needs no INTENT record goes to the io_uring
        (its checksums are computed on this thread when it is done), the rest to a worker."""
        ring = self._ring
        if ring is None or fn is not write_sectors:
            return self._pool.submit(fn, *args, done=done)
        _, intents, _, fd, offset, data, sector, head, tail = args
        if intents or head is not None or tail is not None:
            return self._pool.submit(fn, *args, done=done)

        def written(_: object, exc: BaseException | None) -> None:
            if exc is not None:
                done(None, exc)
                return
            try:
                crcs = sector_crcs(data, sector)
            except Exception as e:  # pragma: no cover - a buffer that cannot be sliced
                done(None, e)
                return
            done(crcs, None)

        return ring.pwrite(fd, data, offset, done=written)

    async def _admit(self, rep: Replica, epoch: int) -> None:
        """``StaleEpoch`` unless ``epoch`` is current; a newer epoch is persisted first."""
        if epoch < rep.meta.epoch:
            raise StaleEpoch(rep.id, epoch, rep.meta.epoch)
        if epoch > rep.meta.epoch:
            rep.meta.epoch = epoch
            await self._persistence.state(rep)
            if epoch < rep.meta.epoch:  # a fence overtook this request meanwhile
                raise StaleEpoch(rep.id, epoch, rep.meta.epoch)

    async def _run(
        self,
        fn: Callable[..., T],
        *args: Any,
        lane: int | None = None,
        done: Callable[[Any, BaseException | None], None] | None = None,
    ) -> T:
        return await await_io(self._pool.submit(fn, *args, done=done, lane=lane))

    # --- checks --------------------------------------------------------------------------

    def _lane(self, extent_id: str) -> int:
        return zlib.crc32(extent_id.encode()) % self._pool.lanes

    def _blocks(self, offset: int, length: int) -> tuple[int, int]:
        """The blocks ``[first, last)`` a byte range touches (at least one)."""
        first = offset // self.block_size
        return first, ((offset + length - 1) // self.block_size + 1 if length else first + 1)

    def _check_open(self) -> None:
        if self._closed:
            raise ChunkError("the replica store is closed")


@dataclass(frozen=True)
class Observed:
    """A replica as ``ReplicaStore.observe`` saw it."""

    stat: ReplicaStat
    version: int


def _stat(meta: ReplicaMeta) -> ReplicaStat:
    return ReplicaStat(
        size=meta.size,
        epoch=meta.epoch,
        generation=meta.generation,
        allocated_bytes=meta.allocated_blocks() * meta.block_size,
        valid_bytes=meta.valid_sectors() * meta.sector,
    )


def _fills_all(meta: ReplicaMeta, first: int, last: int) -> int:
    """A write or repair fills every block it touches: those still empty need space."""
    return (last - first) - meta.allocated_in(first, last)
