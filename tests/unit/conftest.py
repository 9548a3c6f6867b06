"""Fixtures for unit tests: an in-memory store, a fake clock, nodes and an image in the store."""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from aecp.cluster.principals import first_admin
from aecp.common.clock import FakeClock
from aecp.model.cluster import ClusterInfo, new_cluster_id
from aecp.model.image import ImageFormat, ImageRecord
from aecp.model.node import Capacity, NodeHeartbeat, NodeRecord, Usage
from aecp.model.principal import FIRST_ADMIN, new_principal_token
from aecp.store import keys
from aecp.store.base import Lease
from aecp.store.memory import MemoryStore


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def store(clock: FakeClock) -> MemoryStore:
    return MemoryStore(clock)


async def add_node(
    store: MemoryStore, name: str, memory_mib: int = 4096, cpus: int = 4, alive: bool = True
) -> Lease | None:
    """Register a node record (and a heartbeat on a fresh lease when ``alive``)."""
    rec = NodeRecord(
        name=name,
        address="127.0.9.1",
        api_url="http://127.0.9.1:8700",
        capacity=Capacity(cpus=cpus, memory_mib=memory_mib, disk_bytes=10**10),
        registered_at=1.0,
    )
    await store.put(keys.node(name), rec.dump())
    if not alive:
        return None
    lease = await store.grant_lease(10)
    hb = NodeHeartbeat(name=name, at=1.0, usage=Usage(), accel="tcg")
    await store.put(keys.alive(name), hb.dump(), lease=lease)
    return lease


@pytest.fixture
async def images_dir(tmp_path: Path, store: MemoryStore) -> Path:
    """An images directory holding image ``tiny`` (1 MiB of raw zeros), registered."""
    d = tmp_path / "images"
    d.mkdir()
    data = b"\0" * (1 << 20)
    (d / "tiny.raw").write_bytes(data)
    rec = ImageRecord(
        name="tiny",
        format=ImageFormat.RAW,
        file="tiny.raw",
        size_bytes=len(data),
        virtual_size=len(data),
        sha256=hashlib.sha256(data).hexdigest(),
        created_at=1.0,
    )
    await store.put(keys.image("tiny"), rec.dump())
    return d


async def dump_store(store: MemoryStore) -> dict[str, bytes]:
    """Everything stored, to check that a refused request changed nothing."""
    return {kv.key: kv.value for kv in await store.list("/")}


from tests.unit.abskit import cluster as cluster  # noqa: E402 - the fixture, re-exported


async def admin_token(store: MemoryStore) -> str:
    """A cluster record and its first admin principal; that admin's token."""
    token, digest = new_principal_token(FIRST_ADMIN)
    await store.put(keys.CLUSTER, ClusterInfo(name="t", created_at=1, id=new_cluster_id()).dump())
    await store.put(keys.principal(FIRST_ADMIN), first_admin(digest, 1).dump())
    return token


@pytest.fixture(autouse=True)
async def no_leaked_tasks() -> AsyncIterator[None]:
    """Fail a test that leaves a task it started running (cancelled and awaited first)."""
    before = asyncio.all_tasks()
    yield
    await asyncio.sleep(0)
    me = asyncio.current_task()
    leaked = [t for t in asyncio.all_tasks() - before if not t.done() and t is not me]
    for t in leaked:
        t.cancel()
    await asyncio.gather(*leaked, return_exceptions=True)
    assert not leaked, f"tasks left running: {sorted(t.get_name() for t in leaked)}"
