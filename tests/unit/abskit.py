"""Shared fixtures for access-point and recovery tests: three nodes' real replica stores in
temporary directories, switchable off, over an in-memory cluster store."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from aecp.cluster.volumeowners import ClusterOwners
from aecp.common.clock import Clock, FakeClock
from aecp.storage.access import VolumeDevice
from aecp.storage.attach import open_volume
from aecp.storage.chunk.fake import FakeReplica
from aecp.storage.chunk.store import ReplicaStore
from aecp.storage.meta.model import MIB, RecoveryRecord, StorageServer
from aecp.storage.meta.service import MetaService
from aecp.storage.pool import ReplicaPool
from aecp.storage.progress import RecoveryBoard
from aecp.store import keys
from aecp.store.memory import MemoryStore

EXTENT = 1 * MIB
BLOCK = 64 * 1024


class RecordingBoard(RecoveryBoard):
    """The store's board of copies in progress (records without a lease), remembering every
    record it was asked to publish (``puts``)."""

    def __init__(self, store: MemoryStore) -> None:
        super().__init__(store)
        self.puts: list[RecoveryRecord] = []

    async def put(self, rec: RecoveryRecord) -> None:
        self.puts.append(rec)
        await super().put(rec)

    async def held(self) -> list[RecoveryRecord]:
        """The records in the store now."""
        return [RecoveryRecord.load(kv.value) for kv in await self.store.list(keys.ABS_RECOVERY)]


class Cluster:
    def __init__(self, store: MemoryStore, stores: dict[str, ReplicaStore], clock: Clock) -> None:
        self.meta = MetaService(store, extent_size=EXTENT, clock=clock, owners=ClusterOwners(store))
        self.store = store
        self.replicas = {n: FakeReplica(s, n) for n, s in stores.items()}
        self.pool = ReplicaPool(self.meta)
        for n, f in self.replicas.items():
            self.pool.add(n, f)  # type: ignore[arg-type]
        self.board = RecordingBoard(store)

    async def open(self, name: str, node: str = "n1", takeover: bool = False) -> VolumeDevice:
        lease = await self.store.grant_lease(3600)  # outlives the tests' clock advances
        return await open_volume(self.meta, self.pool, node, name, lease, takeover=takeover)


@pytest.fixture
async def cluster(store: MemoryStore, tmp_path: Path, clock: FakeClock) -> AsyncIterator[Cluster]:
    stores = {}
    for i in (1, 2, 3):
        n = f"n{i}"
        stores[n] = ReplicaStore(tmp_path / n, block_size=64 * 1024)
        rec = StorageServer(
            node=n,
            address="127.0.9.9",
            chunk_port=1,
            nbd_port=2,
            capacity_bytes=1 << 42,
            free_bytes=(1 << 42) - i,
        )
        await store.put(keys.abs_server(n), rec.dump())
    yield Cluster(store, stores, clock)
    for s in stores.values():
        await s.close()
