"""Data centers and cluster registration in the center: the cluster is asked first (its
endpoint must answer as a cluster's API and accept the token) and nothing is stored
otherwise; credentials are kept encrypted; one cluster is registered once; clusters move
between data centers; every refusal names its field and changes nothing."""

from __future__ import annotations

import stat
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from aecp.center.main import bootstrap
from aecp.center.settings import CenterSettings
from aecp.cluster.api.app import create_app as cluster_app
from aecp.cluster.api.deps import NodeContext
from aecp.cluster.vms import VMService
from aecp.common.clock import FakeClock
from aecp.store.memory import MemoryStore
from tests.unit.conftest import add_node, admin_token

CLUSTER_URL = "http://c1.test:8700"


class OnlyC1(httpx.AsyncBaseTransport):
    """The network as the center sees it: cluster c1 answers; any other host does not."""

    def __init__(self, app: Any) -> None:
        self.c1 = httpx.ASGITransport(app=app)

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        if request.url.host != "c1.test":
            raise httpx.ConnectError("connection refused", request=request)
        return await self.c1.handle_async_request(request)


class Aoc:
    def __init__(self, client: httpx.AsyncClient, token: str, data_dir: Path, c1_token: str):
        self.client, self.token, self.data_dir, self.c1_token = client, token, data_dir, c1_token

    async def call(self, method: str, path: str, **kw: Any) -> httpx.Response:
        return await self.client.request(
            method, path, headers={"authorization": f"Bearer {self.token}"}, **kw
        )

    async def register(self, cluster: str, **over: str) -> httpx.Response:
        body = {
            "name": cluster,
            "datacenter": "dc1",
            "endpoint": CLUSTER_URL,
            "token": self.c1_token,
        }
        return await self.call("POST", "/v1/clusters", json={**body, **over})

    async def state(self) -> tuple[Any, ...]:
        clusters = (await self.call("GET", "/v1/clusters")).json()
        dcs = (await self.call("GET", "/v1/datacenters")).json()
        return (clusters, dcs)


@pytest.fixture
async def aoc(
    tmp_path: Path, clock: FakeClock, store: MemoryStore, images_dir: Path
) -> AsyncIterator[Aoc]:
    c1_token = await admin_token(store)
    await add_node(store, "n1")
    c1 = cluster_app(VMService(store, images_dir), NodeContext("n1", "", tmp_path, lambda v: None))
    settings = CenterSettings(data_dir=tmp_path / "aoc")
    app, password = bootstrap(settings, clock, lambda: httpx.AsyncClient(transport=OnlyC1(c1)))
    transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
    async with httpx.AsyncClient(transport=transport, base_url="http://aoc") as client:
        r = await client.post("/v1/login", json={"user": "root", "password": password})
        a = Aoc(client, r.json()["token"], settings.data_dir, c1_token)
        for dc in ("dc1", "dc2"):
            assert (await a.call("POST", "/v1/datacenters", json={"name": dc})).status_code == 201
        yield a


async def test_a_cluster_is_registered_with_its_id_and_its_token_kept_encrypted(aoc: Aoc) -> None:
    r = await aoc.register("c1")
    assert r.status_code == 201, r.text
    body = r.json()
    assert body["endpoint"] == CLUSTER_URL and len(body["cluster_id"]) == 36
    assert "token" not in body
    key = aoc.data_dir / "secret.key"
    assert stat.S_IMODE(key.stat().st_mode) == 0o600
    for f in aoc.data_dir.glob("center.db*"):
        assert aoc.c1_token.encode() not in f.read_bytes(), f
    audit = (await aoc.call("GET", "/v1/audit", params={"action": "cluster.register"})).json()
    assert [a["result"] for a in audit] == ["ok"] and aoc.c1_token not in audit[0]["params"]


@pytest.mark.parametrize(
    ("over", "field"),
    [
        ({"token": "admin.wrong"}, "token"),
        ({"endpoint": "http://nowhere.test:8700"}, "endpoint"),
        ({"endpoint": "ftp://c1.test"}, "endpoint"),
        ({"datacenter": "dc9"}, "datacenter"),
        ({"name": "Bad_Name"}, "name"),
    ],
)
async def test_a_registration_that_fails_a_check_names_the_field_and_stores_nothing(
    aoc: Aoc, over: dict[str, str], field: str
) -> None:
    before = await aoc.state()
    r = await aoc.register("c1", **over)
    assert r.status_code == 422 and r.json()["field"] == field, r.text
    assert await aoc.state() == before


async def test_one_cluster_is_registered_once(aoc: Aoc) -> None:
    assert (await aoc.register("c1")).status_code == 201
    before = await aoc.state()
    again = await aoc.register("c1")
    assert again.status_code == 409 and again.json()["field"] == "name"
    other_name = await aoc.register("c1-again")
    assert other_name.status_code == 409 and other_name.json()["field"] == "endpoint"
    other_url = await aoc.register("c1-other", endpoint="http://C1.test:8700")  # same id
    assert other_url.status_code == 409 and "registered already" in other_url.json()["message"]
    assert await aoc.state() == before


async def test_a_cluster_moves_between_data_centers_and_a_data_center_with_clusters_stays(
    aoc: Aoc,
) -> None:
    await aoc.register("c1")
    r = await aoc.call("PATCH", "/v1/clusters/c1", json={"datacenter": "dc2"})
    assert r.status_code == 200 and r.json()["datacenter"] == "dc2"
    listed = await aoc.call("GET", "/v1/clusters", params={"datacenter": "dc2"})
    assert [c["name"] for c in listed.json()] == ["c1"]
    r = await aoc.call("PATCH", "/v1/clusters/c1", json={"datacenter": "dc9"})
    assert r.status_code == 422 and r.json()["field"] == "datacenter"
    assert (await aoc.call("DELETE", "/v1/datacenters/dc2")).status_code == 409
    assert (await aoc.call("DELETE", "/v1/clusters/c1")).status_code == 204
    assert (await aoc.call("DELETE", "/v1/datacenters/dc2")).status_code == 204
    assert (await aoc.call("GET", "/v1/clusters")).json() == []
