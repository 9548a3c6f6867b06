"""The cluster API over an in-memory store: authentication, error bodies, OpenAPI."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest

from aecp.cluster.api.app import create_app
from aecp.cluster.api.deps import NodeContext
from aecp.cluster.scheduler import Scheduler
from aecp.cluster.vms import VMService
from aecp.store import keys
from aecp.store.controllers import ControllerHost
from aecp.store.history import History
from aecp.store.memory import MemoryStore
from tests.unit.conftest import add_node, admin_token, dump_store


@pytest.fixture
async def api(
    store: MemoryStore, images_dir: Path, tmp_path: Path
) -> AsyncIterator[tuple[httpx.AsyncClient, str]]:
    token = await admin_token(store)
    await add_node(store, "n1")
    app = create_app(
        VMService(store, images_dir),
        NodeContext("n1", "http://127.0.9.1:8700", tmp_path / "run", lambda vm: None),
    )
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://api") as client:
        yield client, token


async def test_a_call_without_a_token_gets_401_and_changes_nothing(
    api: tuple[httpx.AsyncClient, str], store: MemoryStore
) -> None:
    client, _ = api
    before = await dump_store(store)
    r = await client.post("/v1/vms", json={"name": "vm1", "image": "tiny"})
    assert r.status_code == 401
    assert r.headers["www-authenticate"] == "Bearer"
    r = await client.post(
        "/v1/vms", json={"name": "vm1", "image": "tiny"}, headers={"authorization": "Bearer wrong"}
    )
    assert r.status_code == 401 and r.json()["error"] == "unauthorized"
    assert await dump_store(store) == before


async def test_health_needs_no_token_and_says_nothing_else(
    api: tuple[httpx.AsyncClient, str],
) -> None:
    client, _ = api
    r = await client.get("/healthz")
    assert r.status_code == 200
    assert r.json() == {"status": "ok", "node": "n1", "store": "ok", "lease": "held"}


async def test_create_returns_202_with_an_operation(api: tuple[httpx.AsyncClient, str]) -> None:
    client, token = api
    auth = {"authorization": f"Bearer {token}"}
    r = await client.post("/v1/vms", json={"name": "vm1", "image": "tiny"}, headers=auth)
    assert r.status_code == 202
    op = r.json()["operation"]
    assert op["kind"] == "vm.create" and op["state"] == "running"
    r = await client.get(f"/v1/operations/{op['id']}", headers=auth)
    assert r.status_code == 200
    r = await client.get("/v1/vms/vm1", headers=auth)
    assert r.json()["state"] == "pending"


@pytest.mark.parametrize(
    ("body", "status", "field"),
    [
        ({"name": "vm1", "image": "tiny", "memory_mib": "lots"}, 422, "memory_mib"),
        ({"name": "vm1", "image": "tiny", "colour": "red"}, 422, "colour"),
        ({"image": "tiny"}, 422, "name"),
        ({"name": "vm1", "image": "tiny", "memory_mib": 0}, 422, "memory_mib"),
        ({"name": "VM1", "image": "tiny"}, 422, "name"),
    ],
)
async def test_bad_bodies_get_4xx_naming_the_field(
    api: tuple[httpx.AsyncClient, str],
    store: MemoryStore,
    body: dict[str, object],
    status: int,
    field: str,
) -> None:
    client, token = api
    before = await dump_store(store)
    r = await client.post("/v1/vms", json=body, headers={"authorization": f"Bearer {token}"})
    assert r.status_code == status
    assert r.json()["field"] == field
    assert field in r.json()["message"]
    assert await dump_store(store) == before


async def test_unknown_vm_and_unknown_action_are_404_and_422(
    api: tuple[httpx.AsyncClient, str],
) -> None:
    client, token = api
    auth = {"authorization": f"Bearer {token}"}
    assert (await client.get("/v1/vms/nope", headers=auth)).status_code == 404
    r = await client.post("/v1/vms/nope/actions/explode", headers=auth)
    assert r.status_code == 422 and r.json()["field"] == "action"


async def test_the_openapi_document_covers_every_route_with_an_operation_id(
    api: tuple[httpx.AsyncClient, str],
) -> None:
    client, _ = api
    doc = (await client.get("/openapi.json")).json()
    ops = [op for path in doc["paths"].values() for op in path.values()]
    assert all(op.get("operationId") for op in ops)
    ids = {op["operationId"] for op in ops}
    assert {
        "list_nodes",
        "create_vm",
        "get_vm",
        "vm_action",
        "delete_vm",
        "list_images",
        "upload_image",
        "get_operation",
        "get_console_log",
    } <= ids
    assert "bearer" in str(doc["components"]["securitySchemes"]).lower()


async def test_a_vms_events_say_where_it_was_placed_and_go_with_the_vm(
    api: tuple[httpx.AsyncClient, str], store: MemoryStore
) -> None:
    client, token = api
    auth = {"authorization": f"Bearer {token}"}
    body = {"name": "vm1", "image": "tiny", "start": False}
    await client.post("/v1/vms", json=body, headers=auth)
    host = ControllerHost(store, "n1", History(store, "n1"), [Scheduler(store)])
    await host.run_pass(await store.grant_lease(10))
    r = await client.get("/v1/vms/vm1/events", headers=auth)
    assert r.status_code == 200
    [event] = r.json()
    assert event["role"] == "scheduler" and event["node"] == "n1"
    assert event["sentence"].startswith("placed on n1")
    assert (await client.get("/v1/nodes/n1/events", headers=auth)).json() == []
    for path in ("/v1/vms/nope/events", "/v1/nodes/nope/events"):
        r = await client.get(path, headers=auth)
        assert r.status_code == 404 and r.json()["error"] == "not_found"
    await store.delete_prefix(keys.vm_placement("vm1"))  # never placed: deleted at once
    assert (await client.delete("/v1/vms/vm1", headers=auth)).status_code == 202
    assert await store.list(keys.object_events("vm", "vm1")) == []


async def test_a_cordoned_node_says_so_takes_no_new_vm_and_keeps_it_in_its_events(
    api: tuple[httpx.AsyncClient, str], store: MemoryStore
) -> None:
    client, token = api
    auth = {"authorization": f"Bearer {token}"}
    await add_node(store, "n2")
    for _ in range(2):  # a repeat changes nothing and records no second event
        r = await client.post("/v1/nodes/n1/cordon", json={"reason": "disk swap"}, headers=auth)
        assert r.status_code == 200 and r.json()["cordoned"] and r.json()["cordon_reason"]
    pinned = {"name": "pinned", "image": "tiny", "start": False, "node": "n1"}
    r = await client.post("/v1/vms", json=pinned, headers=auth)
    assert r.status_code >= 400 and "n1: cordoned (disk swap)" in r.json()["message"]
    body = {"name": "vm1", "image": "tiny", "start": False}
    assert (await client.post("/v1/vms", json=body, headers=auth)).status_code == 202
    host = ControllerHost(store, "n1", History(store, "n1"), [Scheduler(store)])
    await host.run_pass(await store.grant_lease(10))
    assert (await client.get("/v1/vms/vm1", headers=auth)).json()["node"] == "n2"
    r = await client.post("/v1/nodes/n1/uncordon", headers=auth)
    assert r.status_code == 200 and not r.json()["cordoned"]
    assert (await client.post("/v1/vms", json=pinned, headers=auth)).status_code == 202
    events = (await client.get("/v1/nodes/n1/events", headers=auth)).json()
    assert [e["sentence"] for e in events] == [
        "uncordoned: VMs may be placed on it again",
        "cordoned: disk swap",
    ]


async def test_cordoning_an_unknown_node_or_with_a_bad_body_changes_nothing(
    api: tuple[httpx.AsyncClient, str], store: MemoryStore
) -> None:
    client, token = api
    auth = {"authorization": f"Bearer {token}"}
    before = await dump_store(store)
    r = await client.post("/v1/nodes/nope/cordon", json={}, headers=auth)
    assert r.status_code == 404 and r.json()["error"] == "not_found"
    for body in ({"reason": "x" * 201}, {"reason": "x", "colour": "red"}, {"reason": 5}):
        r = await client.post("/v1/nodes/n1/cordon", json=body, headers=auth)
        assert r.status_code == 422, body
    assert await dump_store(store) == before
