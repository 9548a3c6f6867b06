"""Principals instead of one token: named tokens with a role, stored hashed, revoked at once;
every route answers 401 without a token and 403 to a role that may not call it; operations
record who asked; the cluster has a stable id in every answer; /healthz tells real health."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest

from aecp.cluster.api.app import create_app
from aecp.cluster.api.deps import NodeContext
from aecp.cluster.principals import first_admin
from aecp.cluster.upgrades import upgrade_records
from aecp.cluster.vms import VMService
from aecp.cluster.vmsnapshots import VMSnapshotService
from aecp.cluster.volumes import VolumeService
from aecp.model.cluster import ClusterInfo, new_cluster_id, new_token
from aecp.model.principal import FIRST_ADMIN, PrincipalRecord, new_principal_token
from aecp.storage.snapshots import SnapshotService
from aecp.store import keys
from aecp.store.memory import MemoryStore
from aecp.store.typed import read
from tests.unit.abskit import Cluster
from tests.unit.conftest import add_node, dump_store
from tests.unit.test_api_edges import _concrete, _operations


class Api:
    """An API client over every service, and the admin's token."""

    def __init__(self, client: httpx.AsyncClient, admin: str, lease: list[bool]) -> None:
        self.client = client
        self.admin = admin
        self.lease = lease

    async def call(self, method: str, path: str, token: str, **kw: object) -> httpx.Response:
        return await self.client.request(
            method,
            path,
            headers={"authorization": f"Bearer {token}"},
            **kw,  # type: ignore[arg-type]
        )

    async def token(self, name: str, role: str) -> str:
        r = await self.call("POST", "/v1/tokens", self.admin, json={"name": name, "role": role})
        assert r.status_code == 201, r.text
        token: str = r.json()["token"]
        return token


@pytest.fixture
async def api(
    store: MemoryStore, images_dir: Path, tmp_path: Path, cluster: Cluster
) -> AsyncIterator[Api]:
    token, digest = new_principal_token(FIRST_ADMIN)
    info = ClusterInfo(name="t", created_at=1, id=new_cluster_id())
    await store.put(keys.CLUSTER, info.dump())
    await store.put(keys.principal(FIRST_ADMIN), first_admin(digest, 1).dump())
    await add_node(store, "n1")
    svc = VMService(store, images_dir)
    volumes = VolumeService(cluster.meta, cluster.pool)
    vmsnaps = VMSnapshotService(svc, SnapshotService(cluster.meta, cluster.pool))
    lease = [True]
    node = NodeContext("n1", "http://127.0.9.1:8700", tmp_path / "run", lambda vm: None,
                       lambda: lease[0])  # fmt: skip
    app = create_app(svc, node, volumes, vmsnaps)
    transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
    async with httpx.AsyncClient(transport=transport, base_url="http://api") as client:
        yield Api(client, token, lease)


async def test_every_route_is_401_without_a_token_and_403_to_a_role_that_may_not_call_it(
    api: Api, store: MemoryStore
) -> None:
    reader = await api.token("auditor", "read-only")
    operator = await api.token("ops", "operator")
    doc = (await api.client.get("/openapi.json")).json()
    before = await dump_store(store)
    walked = 0
    for method, path, _ in _operations(doc):
        url = _concrete(path)
        if path == "/v1/events":  # a stream: ended at once
            url += "?timeout=0.001"
        r = await api.client.request(method, url, json={})
        assert r.status_code == 401, f"{method} {path} without a token: {r.status_code}"
        admin_only = path.startswith("/v1/tokens")
        for token, refused in ((reader, method != "GET" or admin_only), (operator, admin_only)):
            r = await api.call(method, url, token, json={})
            if refused:
                assert r.status_code == 403, f"{method} {path}: {r.status_code} {r.text}"
                assert r.json()["error"] == "forbidden"
            else:
                assert r.status_code != 403, f"{method} {path}: {r.text}"
        walked += 1
    assert walked > 30
    assert await dump_store(store) == before  # nothing refused changed anything


async def test_a_token_is_shown_once_stored_hashed_and_revoked_at_once(
    api: Api, store: MemoryStore
) -> None:
    token = await api.token("ci", "operator")
    assert token.startswith("ci.")
    listed = (await api.call("GET", "/v1/tokens", api.admin)).json()
    assert [p["name"] for p in listed] == ["admin", "ci"]
    assert all("token" not in p and "token_sha256" not in p for p in listed)
    stored = (await dump_store(store))[keys.principal("ci")]
    assert token.encode() not in stored and PrincipalRecord.load(stored).token_ok(token)
    assert (await api.call("GET", "/v1/vms", token)).status_code == 200

    assert (await api.call("DELETE", "/v1/tokens/ci", api.admin)).status_code == 204

    r = await api.call("GET", "/v1/vms", token)
    assert r.status_code == 401 and r.json()["error"] == "unauthorized"


@pytest.mark.parametrize(
    "token",
    ["", "admin", "admin.wrong", "nobody.x", "Bad_Name.x", "a" * 300 + ".x", ".x", "admin."],
)
async def test_a_malformed_or_unknown_token_gets_401(api: Api, token: str) -> None:
    r = await api.call("GET", "/v1/vms", token)
    assert r.status_code == 401 and r.json()["error"] == "unauthorized"


async def test_the_last_admin_cannot_be_revoked_and_another_can(
    api: Api, store: MemoryStore
) -> None:
    before = await dump_store(store)
    r = await api.call("DELETE", "/v1/tokens/admin", api.admin)
    assert r.status_code == 409 and "last admin" in r.json()["message"]
    assert await dump_store(store) == before
    second = await api.token("root2", "admin")
    assert (await api.call("DELETE", "/v1/tokens/admin", second)).status_code == 204
    r = await api.call("DELETE", "/v1/tokens/root2", second)
    assert r.status_code == 409  # now root2 is the last one


async def test_an_unknown_role_or_a_taken_name_is_refused_and_changes_nothing(
    api: Api, store: MemoryStore
) -> None:
    before = await dump_store(store)
    r = await api.call("POST", "/v1/tokens", api.admin, json={"name": "x", "role": "root"})
    assert r.status_code == 422 and r.json()["field"] == "role"
    assert "admin, operator, read-only" in r.json()["message"]
    r = await api.call("POST", "/v1/tokens", api.admin, json={"name": "admin", "role": "admin"})
    assert r.status_code == 409 and r.json()["field"] == "name"
    r = await api.call("DELETE", "/v1/tokens/ghost", api.admin)
    assert r.status_code == 404
    assert await dump_store(store) == before


async def test_an_operation_records_the_principal_that_requested_it(api: Api) -> None:
    ops = await api.token("ops", "operator")
    r = await api.call("POST", "/v1/vms", ops, json={"name": "vm1", "image": "tiny"})
    assert r.status_code == 202, r.text
    assert r.json()["operation"]["requested_by"] == "ops"
    op_id = r.json()["operation"]["id"]
    got = (await api.call("GET", f"/v1/operations/{op_id}", api.admin)).json()
    assert got["requested_by"] == "ops"


async def test_every_answer_carries_the_cluster_id_and_cluster_show_has_it(api: Api) -> None:
    cluster = (await api.call("GET", "/v1/cluster", api.admin)).json()
    assert len(cluster["id"]) == 36
    for r in (
        await api.call("GET", "/v1/cluster", api.admin),
        await api.call("GET", "/v1/vms/nope", api.admin),
        await api.client.get("/healthz"),
    ):
        assert r.headers["x-aecp-cluster-id"] == cluster["id"]


async def test_health_fails_with_503_when_the_node_does_not_hold_its_lease(api: Api) -> None:
    assert (await api.client.get("/healthz")).status_code == 200
    api.lease[0] = False
    r = await api.client.get("/healthz")
    assert r.status_code == 503
    assert r.json() == {"status": "failing", "node": "n1", "store": "ok", "lease": "not held"}


async def test_a_cluster_from_before_principals_gets_an_id_and_its_token_becomes_admin(
    store: MemoryStore,
) -> None:
    token, digest = new_token()
    await store.put(keys.CLUSTER, ClusterInfo(name="old", created_at=1, token_sha256=digest).dump())

    await upgrade_records(store)
    await upgrade_records(store)  # every node does it; once is what counts

    info = await read(store, keys.CLUSTER, ClusterInfo)
    assert info is not None and len(info[0].id) == 36
    admin = await read(store, keys.principal(FIRST_ADMIN), PrincipalRecord)
    assert admin is not None and admin[0].role == "admin" and admin[0].token_ok(token)
    again = await read(store, keys.CLUSTER, ClusterInfo)
    assert again is not None and again[0].id == info[0].id


async def test_an_old_clusters_token_used_before_its_upgrade_is_adopted_and_stays_admin(
    store: MemoryStore, images_dir: Path, tmp_path: Path
) -> None:
    """Its first use created an operator, after which the old token (no longer the only
    credential) was refused and the cluster had no admin (review finding)."""
    token, digest = new_token()
    await store.put(keys.CLUSTER, ClusterInfo(name="old", created_at=1, token_sha256=digest).dump())
    app = create_app(VMService(store, images_dir), NodeContext("n1", "", tmp_path, lambda v: None))
    transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
    auth = {"authorization": f"Bearer {token}"}
    async with httpx.AsyncClient(transport=transport, base_url="http://api") as client:
        r = await client.post("/v1/tokens", json={"name": "ci", "role": "operator"}, headers=auth)
        assert r.status_code == 201, r.text
        listed = await client.get("/v1/tokens", headers=auth)
    assert listed.status_code == 200
    assert {(p["name"], p["role"]) for p in listed.json()} == {
        ("admin", "admin"),
        ("ci", "operator"),
    }
