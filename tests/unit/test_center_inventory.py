"""The center's copy of a cluster: read whole, then kept current from the cluster's change
feed (a change shows after the next follow; a deletion too), read whole again when the
position was compacted, and served with its age when the cluster stops answering."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from aecp.center.inventory import Gone, Inventory
from aecp.center.main import bootstrap
from aecp.center.settings import CenterSettings
from aecp.cluster.api.app import create_app as cluster_app
from aecp.cluster.api.deps import NodeContext
from aecp.cluster.vms import VMService
from aecp.cluster.vmsnapshots import VMSnapshotService
from aecp.cluster.volumes import VolumeService
from aecp.common.clock import FakeClock
from aecp.storage.snapshots import SnapshotService
from aecp.store.memory import MemoryStore
from tests.unit.abskit import Cluster
from tests.unit.conftest import add_node, admin_token
from tests.unit.test_center_registry import CLUSTER_URL, OnlyC1


class World:
    def __init__(self, aoc: httpx.AsyncClient, token: str, c1: httpx.AsyncClient, inv: Inventory):
        self.aoc, self.token, self.c1, self.inventory = aoc, token, c1, inv

    async def get(self, path: str, **kw: Any) -> Any:
        r = await self.aoc.get(path, headers={"authorization": f"Bearer {self.token}"}, **kw)
        assert r.status_code == 200, r.text
        return r.json()

    async def names(self, kind: str) -> list[str]:
        return [o["name"] for o in await self.get(f"/v1/inventory/{kind}")]


@pytest.fixture
async def world(
    tmp_path: Path, clock: FakeClock, store: MemoryStore, images_dir: Path, cluster: Cluster
) -> AsyncIterator[World]:
    c1_token = await admin_token(store)
    await add_node(store, "n1")
    vms = VMService(store, images_dir)
    c1 = cluster_app(
        vms,
        NodeContext("n1", "", tmp_path, lambda v: None),
        VolumeService(cluster.meta, cluster.pool),
        VMSnapshotService(vms, SnapshotService(cluster.meta, cluster.pool)),
    )
    reachable = [True]

    def client() -> httpx.AsyncClient:
        if not reachable[0]:
            raise httpx.ConnectError("the cluster's network is down")
        return httpx.AsyncClient(transport=OnlyC1(c1))

    app, password = bootstrap(CenterSettings(data_dir=tmp_path / "aoc"), clock, client)
    c1_client = httpx.AsyncClient(
        transport=httpx.ASGITransport(app=c1),
        base_url=CLUSTER_URL,
        headers={"authorization": f"Bearer {c1_token}"},
    )
    transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
    async with httpx.AsyncClient(transport=transport, base_url="http://aoc") as aoc, c1_client:
        token = (await aoc.post("/v1/login", json={"user": "root", "password": password})).json()
        auth = {"authorization": f"Bearer {token['token']}"}
        await aoc.post("/v1/datacenters", json={"name": "dc1"}, headers=auth)
        body = {"name": "c1", "datacenter": "dc1", "endpoint": CLUSTER_URL, "token": c1_token}
        assert (await aoc.post("/v1/clusters", json=body, headers=auth)).status_code == 201
        w = World(aoc, token["token"], c1_client, app.state.inventory)
        w.reachable = reachable  # type: ignore[attr-defined]
        yield w


async def test_a_cluster_is_read_whole_then_followed_change_by_change(world: World) -> None:
    assert await world.inventory.resync("c1") >= 1
    assert await world.names("node") == ["n1"] and await world.names("vm") == []
    [c1] = await world.get("/v1/clusters")
    assert c1["sync_state"] == "ok" and c1["last_sync_at"] > 0

    r = await world.c1.post("/v1/vms", json={"name": "web", "image": "tiny", "start": False})
    assert r.status_code == 202, r.text
    assert await world.inventory.follow("c1", wait=0.05) >= 1
    assert await world.names("vm") == ["web"]
    [vm] = await world.get("/v1/inventory/vm", params={"cluster": "c1"})
    assert vm["cluster"] == "c1" and vm["data"]["state"] in ("pending", "stopped")
    assert r.json()["operation"]["id"] in await world.names("operation")

    assert (await world.c1.delete("/v1/vms/web")).status_code == 202  # never placed: at once
    await world.inventory.follow("c1", wait=0.05)
    assert await world.names("vm") == []


async def test_a_compacted_position_means_reading_the_cluster_whole_again(
    world: World, store: MemoryStore
) -> None:
    await world.inventory.resync("c1")
    for name in ("web", "db"):
        await world.c1.post("/v1/vms", json={"name": name, "image": "tiny", "start": False})
    await store.compact(await store.revision())  # the center fell behind the retention
    with pytest.raises(Gone):
        await world.inventory.follow("c1", wait=0.05)
    await world.inventory.resync("c1")
    assert await world.names("vm") == ["db", "web"]


async def test_an_unreachable_cluster_keeps_its_copy_and_says_since_when(world: World) -> None:
    await world.inventory.resync("c1")
    [before] = await world.get("/v1/clusters")
    world.reachable[0] = False  # type: ignore[attr-defined]
    with pytest.raises(httpx.ConnectError):
        await world.inventory.resync("c1")
    world.inventory.unreachable("c1", "ConnectError: the cluster's network is down")
    [after] = await world.get("/v1/clusters")
    assert after["sync_state"] == "unreachable" and "network is down" in after["sync_error"]
    assert after["last_sync_at"] == before["last_sync_at"]
    assert await world.names("node") == ["n1"]  # the last copy is still served


async def test_metrics_count_requests_and_say_how_old_each_copy_is(world: World) -> None:
    await world.inventory.resync("c1")
    await world.get("/v1/clusters")
    r = await world.aoc.get("/metrics", headers={"authorization": f"Bearer {world.token}"})
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
    text = r.text
    assert 'aoc_requests_total{method="GET",route="/v1/clusters",status="200"} 1' in text
    assert 'aoc_request_seconds_count{method="GET",route="/v1/clusters"} 1' in text
    assert 'aoc_cluster_reachable{cluster="c1"} 1' in text
    assert 'aoc_cluster_sync_age_seconds{cluster="c1"} ' in text
    assert 'aoc_tasks{state="executing"} 0' in text
    assert (await world.aoc.get("/metrics")).status_code == 401
