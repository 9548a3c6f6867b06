"""Recovery of *frozen* extents: those that snapshots name and no volume does.

A volume writes in place only extents it names, and a table that names an extent again later
(a clone, a rollback) only shares it. So nothing writes a frozen extent any more, and its copy
needs no access point to order it against writes. Recovery by volume (``storage.recovery``)
never reaches these extents: no volume's table lists them. The elected Meta leader repairs them
here, extent by extent, with the same choices (``recovery.next_step``): a stale replica back
within the grace period catches up what it missed; after it, a new replica is copied to
another node and admitted in its place.

Nothing writes a frozen extent, so nothing notices that a replica's node is gone: a replica
whose node has no storage server registered (its lease expired) is dropped here, as a failed
write drops one, and is caught up if the node comes back in time.

Before its copy, the new (or returning) replica is fenced at the valid replicas' epoch: a write
still in flight from the access point that wrote the extent before the snapshot carries an
older epoch, and the fenced replicas refuse it, so this one must too. The copy is published
(``storage.progress``) before its target is created, and admitted only while the extent is
still below its factor and the replica it replaces still stale. A failed copy, and the lost
replica after a re-replication, are not deleted here: another recoverer (the access point
of a clone that names the extent again) may be making that very copy valid. Each node's
orphan collector (``storage.collect``) deletes them once no extent record names them.
"""

from __future__ import annotations

import logging

from aecp.common.errors import AecpError
from aecp.storage.chunk.api import ReplicaClient
from aecp.storage.chunk.errors import ChunkError
from aecp.storage.meta.model import ExtentRecord
from aecp.storage.meta.service import MetaService
from aecp.storage.meta.tables import Tables
from aecp.storage.pool import ReplicaPool
from aecp.storage.progress import RecoveryBoard
from aecp.storage.recovery import (
    RecoveryPolicy,
    answers,
    copy_ranges,
    new_record,
    next_step,
    published,
    repair_sectors,
    scrub,
    union,
)

log = logging.getLogger(__name__)


class FrozenRepairer:
    """Repairs the degraded frozen extents of the cluster (run by the Meta leader)."""

    def __init__(
        self, meta: MetaService, pool: ReplicaPool, policy: RecoveryPolicy, board: RecoveryBoard
    ) -> None:
        self.meta = meta
        self.pool = pool
        self.policy = policy
        self.board = board

    async def run_pass(self, tables: Tables | None = None) -> list[str]:
        """One look at every frozen extent below its factor; one sentence per extent."""
        t = tables or await self.meta.tables()
        servers = await self.meta.servers()
        out = []
        for ext, factor, label in t.snapshot_only().values():
            try:
                gone = [n for n in ext.replicas if n not in servers]
                if gone and len(gone) < len(ext.replicas):  # nothing writes it to notice
                    ext = await self.meta.drop_replicas(ext.id, gone)
                    out.append(f"extent {ext.id}: {', '.join(gone)} left the cluster: stale")
                if len(ext.replicas) < factor:
                    out.append(await self._repair(ext, factor, label))
            except (AecpError, OSError) as exc:
                out.append(f"extent {ext.id} (snapshot {label}): repair failed, will retry: {exc}")
        return out

    async def _repair(self, ext: ExtentRecord, factor: int, label: str) -> str:
        servers = await self.meta.servers()
        now = self.meta.clock.wall()
        step = await next_step(ext, servers, now, self.policy.grace_for, self._answers)
        if not step.kind:
            return step.why
        src, src_node = await self._source(ext)
        dst = await self.pool.client(step.node)
        catch_up = step.kind == "catch-up"
        since = step.since if catch_up else 0
        rec = new_record(f"snapshot {label}", ext, step.node, step.kind, self.meta.clock)
        async with published(self.board, rec):  # names the target before it exists
            if not catch_up:
                await dst.create(ext.id, ext.size, generation=0)
            epoch = max((await src.stat(ext.id)).epoch, (await dst.stat(ext.id)).epoch)
            await dst.fence(ext.id, epoch)  # before the copy: an older write must miss it too
            # the target's own blocks too: it may have changed them, or kept an earlier attempt's
            ranges = union(
                await src.modified_since(ext.id, since), await dst.modified_since(ext.id, since)
            )
            sized = rec.model_copy(update={"total_bytes": sum(n for _, n in ranges)})
            await self.board.put(sized)
            copied = await copy_ranges(
                ranges,
                lambda pos, n: self._copy(ext.id, src, dst, pos, n),
                self.policy.rate,
                lambda done: self.board.put(sized.model_copy(update={"copied_bytes": done})),
                self.meta.clock,
            )
            await dst.flush(ext.id)
            new = await self.meta.admit_copy(
                ext.id, step.node, step.lost, catch_up=catch_up, factor=factor, since=since
            )
            await dst.set_generation(ext.id, new.generation)
        how = "caught up" if catch_up else "re-replicated"
        return (
            f"extent {ext.id} (snapshot {label}): {how} on {step.node} from {src_node} "
            f"({copied} bytes)" + (f" in place of {step.lost}" if step.lost else "")
        )

    async def scrub_pass(self) -> list[str]:
        """Verify every valid replica of every frozen extent and repair bad sectors from a
        good replica (nothing writes them: no ordering needed). One sentence per repair."""
        frozen = [ext for ext, _, _ in (await self.meta.tables()).snapshot_only().values()]

        async def repair(ext: ExtentRecord, node: str, sectors: list[int]) -> str:
            return await repair_sectors(self.pool, ext.id, node, sectors, ext.replicas, 0)

        return await scrub(self.pool, frozen, repair)

    @staticmethod
    async def _copy(
        ext_id: str, src: ReplicaClient, dst: ReplicaClient, offset: int, length: int
    ) -> None:
        await dst.write_raw(ext_id, await src.read_raw(ext_id, offset, length))

    async def _answers(self, node: str) -> bool:
        return await answers(self.pool, node)

    async def _source(self, ext: ExtentRecord) -> tuple[ReplicaClient, str]:
        for node in ext.replicas:
            if await self._answers(node):
                return await self.pool.client(node), node
        raise ChunkError(f"extent {ext.id}: no valid replica answers")
