"""Connections to the chunk servers of the cluster, by node name: the node-local replica store
directly, every other node over the replica protocol."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterable

from aecp.storage.chunk.api import ReplicaClient
from aecp.storage.chunk.auth import ReplicaAuth
from aecp.storage.chunk.client import ChunkClient, LocalChunkClient
from aecp.storage.chunk.errors import ChunkError, ExtentNotFound, ReplicaUnavailable
from aecp.storage.chunk.store import ReplicaStore
from aecp.storage.meta.model import ExtentRecord
from aecp.storage.meta.service import MetaService

log = logging.getLogger(__name__)


class ReplicaPool:
    """``client(node)`` gives a ``ReplicaClient`` for ``node`` (``ReplicaUnavailable`` if the
    node has no registered storage server).

    Remote nodes are reached with ``auth`` (this node's credentials); a pool without it serves
    only the clients given to it (``add``, the local store) and says so for any other node."""

    def __init__(
        self,
        meta: MetaService,
        local_node: str | None = None,
        local_store: ReplicaStore | None = None,
        timeout: float = 5.0,
        connections: int = 2,
        *,
        auth: ReplicaAuth | None = None,
        source: str | None = None,
    ) -> None:
        self.meta = meta
        self.auth = auth
        self.source = source  # the address this node connects from
        self.local_node = local_node
        self.timeout = timeout
        self.connections = connections
        self._clients: dict[str, ReplicaClient] = {}
        if local_node and local_store is not None:
            self._clients[local_node] = LocalChunkClient(local_store)
        self._lock = asyncio.Lock()

    def cached(self, node: str) -> ReplicaClient | None:
        """The client of ``node`` if one was made already (no waiting)."""
        return self._clients.get(node)

    async def client(self, node: str) -> ReplicaClient:
        c = self._clients.get(node)
        if c is not None:
            return c
        async with self._lock:
            c = self._clients.get(node)
            if c is None:
                servers = await self.meta.servers()
                srv = servers.get(node)
                if srv is None:
                    raise ReplicaUnavailable(node, "the node has no storage server running")
                if self.auth is None:
                    raise ReplicaUnavailable(node, "this process has no replica credentials")
                c = ChunkClient(
                    srv.address,
                    srv.chunk_port,
                    node=node,
                    auth=self.auth,
                    timeout=self.timeout,
                    connections=self.connections,
                    source=self.source,
                )
                self._clients[node] = c
            return c

    async def delete_replicas(self, extents: Iterable[ExtentRecord]) -> list[str]:
        """Delete every replica (valid or stale) of ``extents`` that Meta no longer names;
        returns ``extent@node`` for those that could not be deleted now (unreachable: their
        node's orphan collector deletes them later, ``storage.collect``)."""
        leftovers = []
        for ext in extents:
            for node in [*ext.replicas, *ext.stale]:
                try:
                    await (await self.client(node)).delete(ext.id)
                except ExtentNotFound:
                    continue
                except ChunkError as exc:
                    log.info("extent %s on %s not deleted now: %s", ext.id, node, exc)
                    leftovers.append(f"{ext.id}@{node}")
        return leftovers

    def add(self, node: str, client: ReplicaClient) -> None:
        """Use ``client`` for ``node`` (a node-local store, or a test double)."""
        self._clients[node] = client

    async def close(self) -> None:
        clients = list(self._clients.values())
        self._clients.clear()
        for c in clients:
            await c.close()
