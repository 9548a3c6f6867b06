"""Persistence of replica metadata: flush, compaction, and durable epoch/generation changes.

Every persistence job of a replica runs on the replica's ``IoPool`` lane, so journal appends
and compactions happen in the order they were submitted; a flush therefore returns only once
every earlier persistence job of the replica has finished too.

``flush``: capture (on the loop thread) the metadata of the blocks changed since the last flush,
then fsync the data file, append the records to the journal and fsync it. A mutation that
completed before the capture is durable when the flush returns. When the journal outgrew
``Replica.compact_at``, a flush *compacts* instead: with every block of the replica locked, a
new snapshot (serial + 1) replaces the old one and the journal is reset (``files``). The new
journal starts with INTENT records for the blocks written since the previous compaction, so
the blocks a VM is writing stay on the store's fast path (``ReplicaStore.write_nowait`` takes
only blocks already INTENT-logged); a block not written for a whole cycle drops out.

A failed persistence job marks the replica failed (``Replica.failed``): what the disk holds is
then unknown (a failed fsync may have dropped dirty pages), so every later mutation and flush
raises ``ChunkIOError``. Except when the job failed for want of room before changing anything
(``diskio.NotDone``: the journal append was cut away again, or the new snapshot was never
renamed into place): then the records it carried go back where they came from (dirty blocks,
``state_dirty``), the caller gets ``ChunkIOError(ENOSPC)``, and the replica lives on. A full
disk then costs no copy of the data. The records are written by the next flush that succeeds.
A flush that captured its records before such a failure put others back flushes again, so it
covers them too before it returns.
"""

from __future__ import annotations

import asyncio
import errno
from collections.abc import Callable
from typing import Any, TypeVar

from aecp.storage.chunk import files
from aecp.storage.chunk.diskio import NO_ROOM, NotDone
from aecp.storage.chunk.errors import ChunkIOError, ExtentNotFound
from aecp.storage.chunk.iopool import IoPool
from aecp.storage.chunk.journal import ReplicaMeta
from aecp.storage.chunk.replica import Replica

T = TypeVar("T")


async def await_io(fut: asyncio.Future[T]) -> T:
    """The result of an I/O job, an ``OSError`` turned into ``ChunkIOError``."""
    try:
        return await fut
    except OSError as e:
        raise ChunkIOError(str(e), e.errno or errno.EIO) from e


def check_failed(rep: Replica) -> None:
    """``ChunkIOError`` if the replica stopped taking mutations."""
    if rep.failed:
        raise ChunkIOError(f"replica {rep.id} failed earlier ({rep.failed})")


def no_room(exc: BaseException | None) -> bool:
    """Whether an I/O job failed for want of space before changing anything."""
    return isinstance(exc, NotDone) and exc.errno in NO_ROOM


#: a flush whose records were overtaken by a failed earlier job tries again this often
FLUSH_ATTEMPTS = 4


class Persistence:
    """Persists the metadata of replicas, using the lanes of ``pool``."""

    def __init__(self, pool: IoPool) -> None:
        self._pool = pool

    async def state(self, rep: Replica) -> None:
        """Make the replica's epoch and generation durable now. Without room, the next flush
        makes them durable (``ChunkIOError(ENOSPC)`` here)."""
        meta = rep.meta
        record = meta.encode_state()
        rep.journal_size += len(record)

        def undo() -> None:
            rep.journal_size -= len(record)
            meta.state_dirty = True

        await self._persist(
            rep, files.flush_files, rep.data_fd, rep.journal, record, False, undo=undo
        )

    async def flush(self, rep: Replica) -> None:
        """Make every mutation of ``rep`` that completed before this call durable."""
        for _ in range(FLUSH_ATTEMPTS):
            seen = rep.setbacks
            own = await self._flush_once(rep)
            if rep.setbacks == seen + own:
                return
            # another job failed for want of room meanwhile and put its records back: they
            # may be records this flush must cover (captured by an earlier flush)
        raise ChunkIOError(f"replica {rep.id}: no room to persist its metadata", errno.ENOSPC)

    async def _flush_once(self, rep: Replica) -> int:
        """One flush; returns how many setbacks it caused itself (a compaction that found no
        room for its snapshot, after which the records were appended to the journal)."""
        meta = rep.meta
        if rep.deleted:
            return 0
        if not (rep.unsynced or meta.dirty or meta.state_dirty or rep.persisting):
            return 0
        own = 0
        if rep.journal_size >= rep.compact_at:
            try:
                if await self.compact(rep, carry=True):
                    return 0
            except ChunkIOError as exc:  # no room for a new snapshot: append to the journal
                if exc.errno not in NO_ROOM:
                    raise
                own = 1
        blocks, state, sync_data = meta.dirty, meta.state_dirty, rep.unsynced
        records = meta.encode_blocks(blocks)
        if state:
            records += meta.encode_state()
        meta.dirty, meta.state_dirty, rep.unsynced = set(), False, False
        rep.journal_size += len(records)

        def undo() -> None:
            meta.dirty |= blocks
            meta.state_dirty |= state
            rep.unsynced |= sync_data
            rep.journal_size -= len(records)

        await self._persist(
            rep, files.flush_files, rep.data_fd, rep.journal, records, sync_data, undo=undo
        )
        return own

    async def settle(self, rep: Replica) -> None:
        """Persist everything before the replica is closed: a compaction, or without room for
        its snapshot, a flush (the journal then keeps the records)."""
        try:
            await self.compact(rep)
        except ChunkIOError as exc:
            if exc.errno not in NO_ROOM:
                raise
            await self.flush(rep)

    async def compact(self, rep: Replica, carry: bool = False) -> bool:
        """New snapshot and empty journal, with every block of ``rep`` locked. With
        ``carry``, the journal starts with INTENT records for the blocks written since the
        last compaction (a crash then re-verifies them on load, as for any INTENT), and
        nothing is done (False) if another compaction emptied the journal meanwhile.
        Without room for the snapshot, ``ChunkIOError(ENOSPC)`` and nothing changed."""
        meta = rep.meta
        await rep.locks.acquire(0, meta.nblocks, True)
        try:
            if rep.deleted:
                raise ExtentNotFound(rep.id)
            if carry and rep.journal_size < rep.compact_at:
                rep.locks.release(0, meta.nblocks, True)
                return False
            before = (meta.dirty, meta.state_dirty, rep.unsynced)
            kept_before = (rep.touched, rep.written, rep.journal_size)
            meta.serial += 1
            snapshot, header = meta.encode_snapshot(), meta.journal_header()
            meta.dirty, meta.state_dirty, rep.unsynced = set(), False, False
            kept = rep.written & rep.touched if carry else set()
            intents = ReplicaMeta.encode_intents(sorted(kept)) if kept else b""
            rep.touched, rep.written, rep.journal_size = kept, set(), len(intents)
        except BaseException:
            rep.locks.release(0, meta.nblocks, True)
            raise

        def undo() -> None:  # every block is still locked: nothing changed them meanwhile
            meta.serial -= 1
            meta.dirty |= before[0]
            meta.state_dirty |= before[1]
            rep.unsynced |= before[2]
            rep.touched, rep.written, rep.journal_size = kept_before

        unlock = lambda: rep.locks.release(0, meta.nblocks, True)  # noqa: E731
        journal = header + intents
        await self._persist(
            rep, files.compact_files, rep, snapshot, journal, then=unlock, undo=undo
        )
        return True

    async def _persist(
        self,
        rep: Replica,
        fn: Callable[..., None],
        *args: Any,
        then: Callable[[], None] | None = None,
        undo: Callable[[], None] | None = None,
    ) -> None:
        """Run a persistence job on the replica's lane; ``then`` runs on the loop thread when
        it has finished (at once if it never started). A failure marks the replica failed,
        unless it failed for want of room before changing anything (``no_room``): then
        ``undo`` puts back what the job was to persist."""
        if rep.deleted:
            if then is not None:
                then()
            raise ExtentNotFound(rep.id)

        def done(_: object, exc: BaseException | None) -> None:
            rep.persisting -= 1
            if exc is not None:
                if undo is not None and no_room(exc):
                    undo()
                    rep.setbacks += 1
                else:
                    rep.failed = rep.failed or f"persisting metadata failed: {exc}"
            if then is not None:
                then()

        try:
            check_failed(rep)
            fut = self._pool.submit(fn, *args, done=done, lane=rep.lane)
        except BaseException:
            if then is not None:
                then()
            raise
        rep.persisting += 1
        await await_io(fut)
        check_failed(rep)
