"""Idempotency keys: a mutating request with an Idempotency-Key is carried out at most once,
a retry gets the first answer, the key reused for another request is 422, a request still
running under the key is 409, and one left by a process that died is taken over."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest

from aecp.cluster.api.app import create_app
from aecp.cluster.api.deps import NodeContext
from aecp.cluster.idempotency import HOLD_TTL, IdempotencyKeys, fingerprint
from aecp.cluster.principals import PrincipalService, first_admin
from aecp.cluster.vms import VMService
from aecp.common.clock import FakeClock
from aecp.model.cluster import ClusterInfo, new_cluster_id
from aecp.model.principal import FIRST_ADMIN, new_principal_token
from aecp.store import keys
from aecp.store.memory import MemoryStore
from tests.unit.conftest import add_node, dump_store


class Api:
    def __init__(self, client: httpx.AsyncClient, token: str, other: str) -> None:
        self.client, self.token, self.other = client, token, other

    async def post(
        self, path: str, body: object, key: str | None, token: str | None = None
    ) -> httpx.Response:
        headers = {"authorization": f"Bearer {token or self.token}"}
        if key is not None:
            headers["idempotency-key"] = key
        return await self.client.post(path, json=body, headers=headers)


@pytest.fixture
async def api(
    store: MemoryStore, images_dir: Path, tmp_path: Path, clock: FakeClock
) -> AsyncIterator[Api]:
    token, digest = new_principal_token(FIRST_ADMIN)
    await store.put(keys.CLUSTER, ClusterInfo(name="t", created_at=1, id=new_cluster_id()).dump())
    await store.put(keys.principal(FIRST_ADMIN), first_admin(digest, 1).dump())
    other = (await PrincipalService(store).create("aoc", "operator", "t")).token
    await add_node(store, "n1")
    app = create_app(
        VMService(store, images_dir, clock), NodeContext("n1", "", tmp_path, lambda vm: None)
    )
    transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
    async with httpx.AsyncClient(transport=transport, base_url="http://api") as client:
        yield Api(client, token, other)


VM = {"name": "web", "image": "tiny", "start": False}


async def vm_specs(store: MemoryStore) -> list[str]:
    return [kv.key for kv in await store.list(keys.VMS) if kv.key.endswith("/spec")]


async def test_a_retried_create_makes_one_vm_and_gets_the_first_answer(
    api: Api, store: MemoryStore
) -> None:
    first = await api.post("/v1/vms", VM, "create-web-1")
    again = await api.post("/v1/vms", VM, "create-web-1")

    assert first.status_code == again.status_code == 202
    assert again.json() == first.json()  # the same operation
    assert again.headers["idempotent-replayed"] == "true"
    assert "idempotent-replayed" not in first.headers
    assert await vm_specs(store) == ["/aecp/vms/web/spec"]
    without = await api.post("/v1/vms", VM, None)
    assert without.status_code == 409  # a request without a key runs as ever


async def test_the_key_reused_for_another_request_is_422_and_changes_nothing(
    api: Api, store: MemoryStore
) -> None:
    await api.post("/v1/vms", VM, "k1")
    before = await dump_store(store)

    r = await api.post("/v1/vms", {**VM, "name": "web2"}, "k1")

    assert r.status_code == 422 and r.json()["field"] == "Idempotency-Key", r.text
    assert "another request" in r.json()["message"]
    assert await dump_store(store) == before


@pytest.mark.parametrize("key", ["", "a" * 129, "has space", "semi;colon"])
async def test_a_malformed_key_is_422(api: Api, store: MemoryStore, key: str) -> None:
    before = await dump_store(store)
    r = await api.client.post(
        "/v1/vms",
        json=VM,
        headers={"authorization": f"Bearer {api.token}", "idempotency-key": key},
    )
    assert r.status_code == 422 and r.json()["field"] == "Idempotency-Key", r.text
    assert await dump_store(store) == before


async def test_a_refusal_is_an_answer_too_and_is_replayed(api: Api) -> None:
    await api.post("/v1/vms", VM, None)
    first = await api.post("/v1/vms", VM, "dup")
    again = await api.post("/v1/vms", VM, "dup")
    assert first.status_code == again.status_code == 409
    assert again.json() == first.json() and again.headers["idempotent-replayed"] == "true"


async def test_keys_are_per_principal(api: Api, store: MemoryStore) -> None:
    await api.post("/v1/vms", VM, "same")
    r = await api.post("/v1/vms", {**VM, "name": "web2"}, "same", token=api.other)
    assert r.status_code == 202 and "idempotent-replayed" not in r.headers
    assert len(await vm_specs(store)) == 2


async def test_a_request_still_running_is_409_and_one_whose_server_died_is_never_run_again(
    api: Api, store: MemoryStore, clock: FakeClock
) -> None:
    """A takeover after a fixed age ran a slow request a second time (review finding): a
    request's hold is a lease it keeps alive; once it expires unanswered, the outcome is
    unknown and the key refuses every retry."""
    body = b'{"reason":"disk"}'
    path = "/v1/nodes/n1/cordon"
    held = await IdempotencyKeys(store, clock).claim(
        FIRST_ADMIN, "busy", fingerprint("POST", path, "", body)
    )
    assert held.replay is None and held.hold is not None
    headers = {
        "authorization": f"Bearer {api.token}",
        "idempotency-key": "busy",
        "content-type": "application/json",
    }

    r = await api.client.post(path, content=body, headers=headers)

    assert r.status_code == 409 and "still being carried out" in r.json()["message"]
    await clock.advance(HOLD_TTL + 1)  # its server died: the hold was not kept alive
    store.expire_leases()
    r = await api.client.post(path, content=body, headers=headers)
    assert r.status_code == 409 and "is unknown" in r.json()["message"], r.text
    assert await store.get(keys.node_admin("n1")) is None  # never carried out by a retry


async def test_the_same_json_in_another_order_is_the_same_request(api: Api) -> None:
    client = api.client
    headers = {
        "authorization": f"Bearer {api.token}",
        "idempotency-key": "k",
        "content-type": "application/json",
    }
    first = await client.post("/v1/vms", content=b'{"name":"w","image":"tiny"}', headers=headers)
    again = await client.post(
        "/v1/vms", content=b'{ "image": "tiny",  "name": "w" }', headers=headers
    )
    assert first.status_code == 202 and again.headers["idempotent-replayed"] == "true"


async def test_an_upload_takes_no_key(api: Api, store: MemoryStore) -> None:
    """Its body is not compared: another image under the key would have been replayed."""
    r = await api.client.put(
        "/v1/images/other",
        content=b"\0" * 4096,
        headers={"authorization": f"Bearer {api.token}", "idempotency-key": "k"},
    )
    assert r.status_code == 422 and r.json()["field"] == "Idempotency-Key", r.text


async def test_a_request_whose_answer_holds_a_secret_takes_no_key(
    api: Api, store: MemoryStore
) -> None:
    """The new token was kept in the store in plain text for the replay (review finding)."""
    before = await dump_store(store)
    r = await api.post("/v1/tokens", {"name": "ci", "role": "operator"}, "k")
    assert r.status_code == 422 and r.json()["field"] == "Idempotency-Key", r.text
    assert await dump_store(store) == before
    r = await api.post("/v1/tokens", {"name": "ci", "role": "operator"}, None)
    token = r.json()["token"]
    assert all(token.encode() not in v for v in (await dump_store(store)).values())


async def test_a_body_the_api_refuses_releases_the_key(api: Api, store: MemoryStore) -> None:
    """A 422 of the request's own validation ran nothing: the key was left 'unknown' and every
    retry refused (review finding)."""
    bad = {**VM, "bogus": 1}
    first = await api.post("/v1/vms", bad, "k")
    again = await api.post("/v1/vms", bad, "k")
    assert first.status_code == again.status_code == 422, again.text
    assert await store.list(keys.IDEMPOTENCY) == []
