"""The replicas of a new extent, created before any table names the extent (the ordering rule
of ``meta.service``): placed by the placement rules with the writing node first, always at the
volume's full factor (new data never starts under-replicated), skipping nodes that do not
answer; ``NoSpace`` when no set of nodes can take it. A copy-on-write new extent is filled
from the shared one by ``copy_written``."""

from __future__ import annotations

import asyncio

from aecp.common.errors import NoCapacity
from aecp.storage.blockdev import NoSpace
from aecp.storage.chunk.api import ReplicaClient
from aecp.storage.chunk.errors import ChunkError, ChunkIOError, ReplicaUnavailable
from aecp.storage.fanout import as_block_error
from aecp.storage.meta.model import ExtentRecord, VolumeRecord, new_extent_id
from aecp.storage.meta.placement import StorageNode, place
from aecp.storage.meta.service import MetaService
from aecp.storage.pool import ReplicaPool


async def create_replicas(
    meta: MetaService, pool: ReplicaPool, vol: VolumeRecord, node: str, epoch: int
) -> ExtentRecord:
    """A full replica set for a new extent of ``vol``, written from ``node`` at ``epoch``."""
    excluded: list[str] = []
    while True:
        servers = await meta.servers()
        nodes = [StorageNode(s.node, s.free_bytes, s.rack, s.chassis) for s in servers.values()]
        try:
            chosen = place(vol.replicas, nodes, vol.extent_size, prefer=node, exclude=excluded)
        except NoCapacity as exc:
            raise NoSpace(f"volume {vol.name}: cannot place a new extent: {exc.message}") from None
        ext = ExtentRecord(
            id=new_extent_id(),
            size=vol.extent_size,
            replicas=chosen,
            owner=vol.owner_id,
            owner_epoch=vol.cow_epoch,
        )
        results = await asyncio.gather(
            *(_create_on(pool, n, ext, epoch) for n in chosen), return_exceptions=True
        )
        failed = [n for n, r in zip(chosen, results, strict=True) if r is not None]
        if not failed:
            return ext
        excluded += failed
        for n, r in zip(chosen, results, strict=True):
            if r is None:
                await (await pool.client(n)).delete(ext.id)
            elif not isinstance(r, ReplicaUnavailable | ChunkIOError):
                raise as_block_error(r)


async def _create_on(
    pool: ReplicaPool, node: str, ext: ExtentRecord, epoch: int
) -> BaseException | None:
    try:
        client = await pool.client(node)
        await client.create(ext.id, ext.size, epoch=epoch, generation=ext.generation)
    except ChunkError as exc:
        return exc
    return None


COPY_CHUNK = 1 << 20


async def copy_written(
    src: ReplicaClient, src_id: str, new_id: str, dsts: list[ReplicaClient]
) -> int:
    """Copy the written blocks of extent ``src_id`` (from ``src``) into the new extent
    ``new_id`` on every client of ``dsts``; bytes copied. Not durable until the caller
    flushes ``new_id``. The caller keeps writes to ``src_id`` out meanwhile; ``new_id`` is
    named by no table yet, so its raw writes carry no epoch."""
    copied = 0
    for offset, length in await src.modified_since(src_id, 0):
        pos = offset
        while pos < offset + length:
            n = min(COPY_CHUNK, offset + length - pos)
            raw = await src.read_raw(src_id, pos, n)
            await asyncio.gather(*(d.write_raw(new_id, raw) for d in dsts))
            pos += n
            copied += n
    return copied
