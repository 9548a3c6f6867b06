"""The edges of the cluster API, with every service wired over an in-memory store and real
replica stores: authentication before the body, one error shape for every status, strict types,
404 for a missing template, no server path in an error, and a complete OpenAPI document."""

from __future__ import annotations

import json
import re
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from aecp.cluster.api.app import create_app
from aecp.cluster.api.deps import NodeContext
from aecp.cluster.api.routing import MAX_JSON_BODY
from aecp.cluster.vms import VMService
from aecp.cluster.vmsnapshots import VMSnapshotService
from aecp.cluster.volumes import VolumeService
from aecp.common.apierrors import ErrorBody, error_response, redact_paths
from aecp.common.names import NAME_PATTERN
from aecp.model.operation import Operation
from aecp.model.vm import Placement, VMState, VMStatus
from aecp.storage.snapshots import SnapshotService
from aecp.store import keys
from aecp.store.memory import MemoryStore
from tests.unit.abskit import Cluster
from tests.unit.conftest import add_node, admin_token, dump_store

Api = tuple[httpx.AsyncClient, dict[str, str]]


async def _client(app: Any) -> httpx.AsyncClient:
    transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
    return httpx.AsyncClient(transport=transport, base_url="http://api")


@pytest.fixture
async def api(
    store: MemoryStore, images_dir: Path, tmp_path: Path, cluster: Cluster
) -> AsyncIterator[Api]:
    token = await admin_token(store)
    await add_node(store, "n1")
    svc = VMService(store, images_dir)
    volumes = VolumeService(cluster.meta, cluster.pool)
    vmsnaps = VMSnapshotService(svc, SnapshotService(cluster.meta, cluster.pool))
    node = NodeContext("n1", "http://127.0.9.1:8700", tmp_path / "run", lambda vm: None)
    async with await _client(create_app(svc, node, volumes, vmsnaps)) as client:
        yield client, {"authorization": f"Bearer {token}"}


def _operations(doc: dict[str, Any]) -> list[tuple[str, str, dict[str, Any]]]:
    return [
        (method.upper(), path, op)
        for path, ops in doc["paths"].items()
        for method, op in ops.items()
        if path != "/healthz"
    ]


def _concrete(path: str) -> str:
    return re.sub(r"\{action\}", "start", re.sub(r"\{(name|snap|op_id)\}", "x1", path))


def _error_shaped(r: httpx.Response, status: int) -> dict[str, Any]:
    assert r.status_code == status, r.text
    assert r.headers["content-type"] == "application/json"
    body: dict[str, Any] = r.json()
    ErrorBody.model_validate(body)
    assert isinstance(body["error"], str) and body["error"]
    assert isinstance(body["message"], str) and body["message"]
    return body


async def test_an_unauthenticated_request_with_a_malformed_body_gets_401_not_422(
    api: Api, store: MemoryStore
) -> None:
    client, _ = api
    doc = (await client.get("/openapi.json")).json()
    before = await dump_store(store)
    for method, path, _ in _operations(doc):
        for body in (b"{not json", b'{"name": "\xff"}', b'{"size": true, "vcpus": 1e9}'):
            r = await client.request(
                method, _concrete(path), content=body, headers={"content-type": "application/json"}
            )
            assert r.status_code == 401, f"{method} {path}: {r.status_code} {r.text}"
            assert r.json()["error"] == "unauthorized"
    assert await dump_store(store) == before


async def test_a_wrong_token_with_a_too_large_body_gets_401_not_413(api: Api) -> None:
    client, _ = api
    big = b"{" + b" " * (MAX_JSON_BODY + 10)
    r = await client.post(
        "/v1/volumes",
        content=big,
        headers={"authorization": "Bearer wrong", "content-type": "application/json"},
    )
    _error_shaped(r, 401)


@pytest.mark.parametrize(
    ("content", "ctype", "why"),
    [
        (b"{not json", "application/json", "not valid JSON"),
        (b'{"name": "vm\xff"}', "application/json", "UTF-8"),
    ],
)
async def test_a_body_that_is_not_utf8_json_gets_400_in_the_error_shape(
    api: Api, store: MemoryStore, content: bytes, ctype: str, why: str
) -> None:
    client, auth = api
    before = await dump_store(store)
    r = await client.post("/v1/vms", content=content, headers={**auth, "content-type": ctype})
    body = _error_shaped(r, 400)
    assert body["error"] == "bad_request" and body["field"] == "body" and why in body["message"]
    assert await dump_store(store) == before


async def test_an_unknown_route_and_a_wrong_method_get_the_error_shape(api: Api) -> None:
    client, auth = api
    assert _error_shaped(await client.get("/v1/nope", headers=auth), 404)["error"] == "not_found"
    r = await client.patch("/v1/vms", headers=auth)
    assert _error_shaped(r, 405)["error"] == "method_not_allowed"
    assert "GET" in r.headers["allow"] and "POST" in r.headers["allow"]


async def test_every_error_status_of_the_api_has_the_one_error_shape(
    api: Api, store: MemoryStore
) -> None:
    client, auth = api
    _error_shaped(await client.get("/v1/vms"), 401)
    _error_shaped(await client.get("/v1/vms/ghost", headers=auth), 404)
    _error_shaped(await client.post("/v1/vms", json={"name": "v1"}, headers=auth), 422)
    big = b'{"name": "' + b"a" * MAX_JSON_BODY + b'"}'
    r = await client.post(
        "/v1/vms", content=big, headers={**auth, "content-type": "application/json"}
    )
    assert _error_shaped(r, 413)["error"] == "too_large"
    ok = {"name": "v1", "image": "tiny", "start": False}
    assert (await client.post("/v1/vms", json=ok, headers=auth)).status_code == 202
    _error_shaped(await client.post("/v1/vms", json=ok, headers=auth), 409)
    store.set_reachable(False)
    try:
        r = await client.get("/v1/vms", headers=auth)
    finally:
        store.set_reachable(True)
    assert _error_shaped(r, 503)["error"] == "store_unavailable"


class BuggyStore(MemoryStore):
    """A store whose listing fails with an unexpected error naming a server path (a bug)."""

    async def list(self, prefix: str) -> Any:
        if prefix == keys.VMS:
            raise RuntimeError("bug reading /var/lib/aecp/secret/state.db")
        return await super().list(prefix)


async def test_an_unexpected_error_gets_500_in_the_error_shape_without_its_text(
    images_dir: Path, tmp_path: Path
) -> None:
    store = BuggyStore()
    token = await admin_token(store)
    app = create_app(VMService(store, images_dir), NodeContext("n1", "", tmp_path, lambda vm: None))
    async with await _client(app) as client:
        r = await client.get("/v1/vms", headers={"authorization": f"Bearer {token}"})
    body = _error_shaped(r, 500)
    assert body["error"] == "internal" and "/var/lib" not in r.text and "bug" not in r.text


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("vcpus", True),
        ("vcpus", 1.0),
        ("memory_mib", 1e9),
        ("memory_mib", "512"),
        ("data_disks_mib", [1.5]),
        ("data_disks_mib", [True]),
        ("start", "yes"),
        ("start", 1),
    ],
)
async def test_vm_create_refuses_booleans_floats_and_strings_where_it_wants_integers_or_booleans(
    api: Api, store: MemoryStore, field: str, value: object
) -> None:
    client, auth = api
    before = await dump_store(store)
    body = {"name": "v1", "image": "tiny", field: value}
    r = await client.post("/v1/vms", json=body, headers=auth)
    err = _error_shaped(r, 422)
    assert err["field"].split(".")[0] == field and field in err["message"]
    assert await dump_store(store) == before


@pytest.mark.parametrize(
    ("path", "body", "field"),
    [
        ("/v1/volumes", {"name": "vol1", "size": True}, "size"),
        ("/v1/volumes", {"name": "vol1", "size": 1e9}, "size"),
        ("/v1/volumes", {"name": "vol1", "size": 1048576.0}, "size"),
        ("/v1/volumes", {"name": "vol1", "size": "1G", "replicas": True}, "replicas"),
        ("/v1/volumes", {"name": "vol1", "size": "1G", "replica": 2}, "replica"),
        ("/v1/volumes/vol0/resize", {"size": True}, "size"),
        ("/v1/volumes/vol0/resize", {"size": 2e6}, "size"),
    ],
)
async def test_a_volume_size_of_true_or_1e9_is_refused_not_coerced(
    api: Api, store: MemoryStore, path: str, body: dict[str, Any], field: str
) -> None:
    client, auth = api
    r = await client.post("/v1/volumes", json={"name": "vol0", "size": "1M"}, headers=auth)
    assert r.status_code == 201, r.text
    before = await dump_store(store)
    err = _error_shaped(await client.post(path, json=body, headers=auth), 422)
    assert err["field"] == field and field in err["message"]
    assert await dump_store(store) == before


async def test_volume_sizes_as_text_or_whole_numbers_are_still_accepted(api: Api) -> None:
    client, auth = api
    r = await client.post("/v1/volumes", json={"name": "v1", "size": "10G"}, headers=auth)
    assert r.status_code == 201 and r.json()["size"] == 10 << 30
    r = await client.post("/v1/volumes", json={"name": "v2", "size": 1 << 20}, headers=auth)
    assert r.status_code == 201 and r.json()["size"] == 1 << 20
    r = await client.post("/v1/volumes/v2/resize", json={"size": "2M"}, headers=auth)
    assert r.status_code == 200 and r.json()["size"] == 2 << 20


async def test_creating_a_vm_from_a_template_that_does_not_exist_is_404_not_422(
    api: Api, store: MemoryStore
) -> None:
    client, auth = api
    before = await dump_store(store)
    r = await client.post("/v1/vms", json={"name": "v1", "template": "nope"}, headers=auth)
    err = _error_shaped(r, 404)
    assert err["error"] == "not_found" and err["template"] == "nope"
    assert _error_shaped(await client.delete("/v1/templates/nope", headers=auth), 404)
    assert await dump_store(store) == before


@pytest.mark.parametrize("name", ["vm1\n", "Bad", "-x", "x" * 64, "a_b"])
async def test_a_name_with_a_trailing_newline_or_off_the_rule_is_refused_everywhere(
    api: Api, store: MemoryStore, name: str
) -> None:
    client, auth = api
    before = await dump_store(store)
    r = await client.post("/v1/vms", json={"name": name, "image": "tiny"}, headers=auth)
    assert "is not a valid name" in _error_shaped(r, 422)["message"]
    r = await client.post("/v1/volumes", json={"name": name, "size": "1M"}, headers=auth)
    assert _error_shaped(r, 422)["field"] == "name"
    assert await dump_store(store) == before


def test_server_paths_in_error_text_are_cut_to_their_last_component() -> None:
    said = "qemu-img: Could not open '/var/lib/aecp/images/.upload-x-1a2b': bad; see /tmp/a/"
    assert redact_paths(said) == "qemu-img: Could not open '.upload-x-1a2b': bad; see a"
    kept = "node at http://127.0.0.1:8700/v1/vms did not answer; sizes 10G/512M; a/b"
    assert redact_paths(kept) == kept


async def test_the_openapi_document_gives_every_operation_its_statuses_with_the_error_shape(
    api: Api,
) -> None:
    client, _ = api
    doc = (await client.get("/openapi.json")).json()
    assert "HTTPValidationError" not in doc["components"]["schemas"]
    error_ref = {"$ref": "#/components/schemas/ErrorBody"}
    for method, path, op in _operations(doc):
        statuses = set(op["responses"])
        has_params = bool(op.get("parameters") or op.get("requestBody"))
        json_body = "application/json" in op.get("requestBody", {}).get("content", {})
        expected = {"401", "500", "503"} | ({"422"} if has_params else set())
        expected |= {"400", "413"} if json_body else set()
        assert expected <= statuses, f"{method} {path}: {sorted(statuses)}"
        if "{name}" in path and method != "PUT":  # PUT makes the object
            assert "404" in statuses, f"{method} {path}"
        for status, resp in op["responses"].items():
            if int(status) >= 400:
                assert resp["content"]["application/json"]["schema"] == error_ref, (method, path)
        assert op["security"] == [{"HTTPBearer": []}], f"{method} {path}"


async def test_the_openapi_document_states_the_name_rule_on_every_name(api: Api) -> None:
    client, _ = api
    doc = (await client.get("/openapi.json")).json()
    for method, path, op in _operations(doc):
        for p in op.get("parameters", []):
            if p["in"] == "path" and p["name"] in ("name", "snap"):
                assert p["schema"]["pattern"] == NAME_PATTERN, f"{method} {path} {p['name']}"
    schemas = doc["components"]["schemas"]
    for model in ("VMCreate", "VolumeCreate", "NewName", "VMClone", "PrincipalCreate"):
        assert schemas[model]["properties"]["name"]["pattern"] == NAME_PATTERN, model
    for field in ("node", "template"):
        shapes = schemas["VMCreate"]["properties"][field]["anyOf"]
        assert shapes[0]["pattern"] == NAME_PATTERN, field


async def test_the_openapi_document_is_complete_without_the_optional_services(
    api: Api, store: MemoryStore, images_dir: Path, tmp_path: Path
) -> None:
    client, _ = api
    full = (await client.get("/openapi.json")).json()
    bare = create_app(
        VMService(store, images_dir), NodeContext("n1", "", tmp_path, lambda vm: None)
    )
    async with await _client(bare) as c:
        assert (await c.get("/openapi.json")).json() == full


async def test_a_route_of_a_service_the_node_lacks_answers_503(
    store: MemoryStore, images_dir: Path, tmp_path: Path
) -> None:
    token = await admin_token(store)
    bare = create_app(
        VMService(store, images_dir), NodeContext("n1", "", tmp_path, lambda vm: None)
    )
    async with await _client(bare) as c:
        r = await c.get("/v1/volumes", headers={"authorization": f"Bearer {token}"})
    assert _error_shaped(r, 503)["error"] == "unavailable"


def test_an_error_whose_fields_do_not_fit_the_shape_keeps_its_code_and_message() -> None:
    r = error_response(409, {"error": "conflict", "message": "at /srv/x/y", "field": object()})
    assert r.status_code == 409
    assert json.loads(bytes(r.body)) == {"error": "conflict", "message": "at y"}


async def test_a_failed_vm_and_its_operation_tell_why_without_server_paths(
    api: Api, store: MemoryStore
) -> None:
    client, auth = api
    r = await client.post("/v1/vms", json={"name": "v1", "image": "tiny"}, headers=auth)
    op = Operation.model_validate(r.json()["operation"])
    why = "QEMU failed: could not open '/srv/aecp/run/v1/disk0.sock': Permission denied"
    await store.put(keys.vm_placement("v1"), Placement(node="n1", at=1).dump())
    await store.put(keys.vm_status("v1"), VMStatus(state=VMState.ERROR, message=why).dump())
    await store.put(keys.op(op.id), op.fail(why, 2).dump())
    shown = "QEMU failed: could not open 'disk0.sock': Permission denied"
    assert (await client.get("/v1/vms/v1", headers=auth)).json()["message"] == shown
    got = (await client.get(f"/v1/operations/{op.id}", headers=auth)).json()
    assert got["error"] == shown and got["message"] == shown
    listed = (await client.get("/v1/operations", headers=auth)).json()
    assert [o["error"] for o in listed if o["id"] == op.id] == [shown]


async def test_a_caller_with_a_bad_token_learns_nothing_of_the_store_when_it_is_down(
    api: Api, store: MemoryStore
) -> None:
    """503 says the token cannot be checked; no endpoints, no store error (review finding)."""
    client, _ = api
    store.set_reachable(False)
    try:
        r = await client.get("/v1/vms", headers={"authorization": "Bearer x"})
    finally:
        store.set_reachable(True)
    assert r.status_code == 503
    assert set(r.json()) == {"error", "message"} and "unreachable" not in r.json()["message"]


async def test_a_path_after_unix_or_file_is_redacted_too() -> None:
    """QEMU repeats its -qmp unix:<path> argument in launch errors (review finding)."""
    text = "qemu: -qmp unix:/var/lib/aecp/run/.sock/x.qmp,server=on: cannot bind; file:/srv/a/b"
    assert redact_paths(text) == "qemu: -qmp unix:x.qmp,server=on: cannot bind; file:b"


async def test_a_huge_invalid_body_gets_a_bounded_error_body(api: Api) -> None:
    client, auth = api
    body = {"name": "a", "data_disks_mib": [1.5] * 5000}
    r = await client.post("/v1/vms", json=body, headers=auth)
    assert r.status_code == 422 and len(r.json()["details"]) <= 20
    assert len(r.content) < 10_000


async def test_a_utf16_json_body_is_refused_as_not_utf8(api: Api) -> None:
    client, auth = api
    raw = '{"name": "a", "size": "1M"}'.encode("utf-16")
    r = await client.post(
        "/v1/volumes", content=raw, headers={**auth, "content-type": "application/json"}
    )
    assert r.status_code == 400 and r.json()["field"] == "body"
