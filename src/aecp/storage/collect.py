"""Garbage collection of ABS space: extent records that no table names, and replicas that no
extent record names on their node (orphans).

Most space comes back at once: deleting a volume or a snapshot, a rollback and a copy on
write delete the records nothing names any more and then their replicas (``MetaService
.collect``, ``ReplicaPool.delete_replicas``). What that leaves is collected here:

- ``collect_unreferenced`` (the Meta leader): records no table names, left by a process that
  stopped between changing a table and collecting, are deleted with their replicas.
- ``OrphanCollector`` (every storage server, for its own store): a replica whose extent has
  no record, or whose record names this node neither as valid nor as stale, and that no
  recovery record is copying into, is an orphan: a replica its node could not be reached to
  delete, the lost replica of a shared extent after a re-replication, or a copy left by a
  failed one. It is deleted once it has been found an orphan, untouched, for ``grace``
  seconds.

A replica is an orphan only for a moment while it is built: its replicas are created before
their extent is committed, and a recovery copy is named valid only when admitted (while it
copies, its recovery record names it: ``storage.progress`` puts the record before the copy
creates its target). "Untouched" is the store's own count of changes (``ReplicaStore
.observe``): every mutation, fence and re-create counts, since a join may fence its copy at
the very epoch the copy was created with, and a copy may write nothing new for a while. The
delete happens only if Meta still names the replica nowhere, looked at just before, and only
if the store finds the replica as observed, checked under its namespace lock
(``delete(unchanged=...)``). The grace period has a floor (``conf.settings``): several
recovery passes plus a store call, the longest a replica being built stays unnamed.
"""

from __future__ import annotations

import logging

from aecp.common.clock import Clock
from aecp.common.errors import AecpError
from aecp.storage.chunk.errors import ChunkError, ExtentNotFound
from aecp.storage.chunk.store import Observed, ReplicaStore
from aecp.storage.meta.model import ExtentRecord, RecoveryRecord
from aecp.storage.meta.service import MetaService
from aecp.storage.pool import ReplicaPool
from aecp.store import keys
from aecp.store.typed import read

log = logging.getLogger(__name__)


async def collect_unreferenced(meta: MetaService, pool: ReplicaPool) -> list[str]:
    """Delete every extent record no volume or snapshot names, and its replicas (those on
    nodes that cannot be reached now are left to their orphan collectors)."""
    freed = await meta.collect(None)
    if not freed:
        return []
    leftovers = await pool.delete_replicas(freed)
    return [
        f"extent {ext.id}: no table named it; its record and replicas were deleted" for ext in freed
    ] + [f"replica {x}: not reachable; its node deletes it as an orphan" for x in leftovers]


class OrphanCollector:
    """The orphan replicas of one node's store (see the module docstring)."""

    def __init__(
        self, store: ReplicaStore, meta: MetaService, node: str, grace: float, clock: Clock
    ) -> None:
        self.store = store
        self.meta = meta
        self.node = node
        self.grace = grace
        self.clock = clock
        self._seen: dict[str, tuple[float, Observed]] = {}  # orphan -> (since, as then)

    def _named(self, ext: ExtentRecord | None, copying: bool) -> bool:
        """Whether Meta names this node's replica (valid or stale) or a copy goes into it."""
        if ext is not None and (self.node in ext.replicas or self.node in ext.stale):
            return True
        return copying

    async def run_pass(self) -> list[str]:
        """One look at every replica of the store; one sentence per replica deleted."""
        local = await self.store.list_extents()  # before Meta: a replica made after is not seen
        t = await self.meta.tables()
        now = self.clock.monotonic()
        out = []
        for ext_id in local:
            if self._named(t.extents.get(ext_id), (ext_id, self.node) in t.recoveries):
                self._seen.pop(ext_id, None)
                continue
            try:
                seen_now = await self.store.observe(ext_id)
            except ChunkError:
                continue
            seen = self._seen.get(ext_id)
            if seen is None or seen[1] != seen_now:
                self._seen[ext_id] = (now, seen_now)  # new, or changed since: someone uses it
                continue
            if now - seen[0] < self.grace:
                continue
            if await self._delete(ext_id, seen_now):
                out.append(
                    f"replica {ext_id}: deleted from {self.node}: no extent record named it "
                    f"for {now - seen[0]:.0f}s"
                )
        for gone in self._seen.keys() - set(local):
            del self._seen[gone]
        return out

    async def _copying_into(self, ext_id: str) -> bool:
        """Whether a recovery record says a copy goes into this node's replica of ``ext_id``:
        ``<extent>/<node>``, or ``<extent>`` alone, as a copier of an older version (before
        records were per target) puts it during a rolling upgrade."""
        base = keys.abs_recovery(ext_id, "")[:-1]
        kvs = await self.meta.store.list(base)
        return any(
            RecoveryRecord.load(kv.value).target == self.node
            for kv in kvs
            if kv.key == base or kv.key.startswith(base + "/")
        )

    async def _delete(self, ext_id: str, seen: Observed) -> bool:
        """Delete the orphan if Meta still does not name it and it is still as ``seen``."""
        try:
            ext = await read(self.meta.store, keys.abs_extent(ext_id), ExtentRecord)
            if self._named(ext[0] if ext else None, await self._copying_into(ext_id)):
                self._seen.pop(ext_id, None)
                return False
            await self.store.delete(ext_id, epoch=max(seen.stat.epoch, 1), unchanged=seen)
        except ExtentNotFound:
            return False
        except AecpError as exc:  # changed or fenced meanwhile, or Meta unreachable
            log.info("replica %s: orphan left for now: %s", ext_id, exc)
            self._seen.pop(ext_id, None)
            return False
        del self._seen[ext_id]
        log.warning("replica %s on %s: deleted, no extent record names it here", ext_id, self.node)
        return True
