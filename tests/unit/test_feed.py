"""The change feed: one event per object changed in a revision (VMs, nodes, volumes,
snapshots, templates, operations), from any revision the store keeps; a reconnect from the
last revision handled misses nothing; a compacted revision is 410, a future one 422."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from aecp.cluster.api.app import create_app
from aecp.cluster.api.deps import NodeContext
from aecp.cluster.feed import FeedEvent, classify
from aecp.cluster.principals import first_admin
from aecp.cluster.vms import VMService
from aecp.model.cluster import ClusterInfo, new_cluster_id
from aecp.model.principal import FIRST_ADMIN, new_principal_token
from aecp.store import keys
from aecp.store.base import ChangeKind, WatchEvent
from aecp.store.memory import MemoryStore
from tests.unit.conftest import add_node, dump_store

Api = tuple[httpx.AsyncClient, dict[str, str]]


@pytest.fixture
async def api(store: MemoryStore, images_dir: Path, tmp_path: Path) -> AsyncIterator[Api]:
    token, digest = new_principal_token(FIRST_ADMIN)
    await store.put(keys.CLUSTER, ClusterInfo(name="t", created_at=1, id=new_cluster_id()).dump())
    await store.put(keys.principal(FIRST_ADMIN), first_admin(digest, 1).dump())
    await add_node(store, "n1")
    app = create_app(VMService(store, images_dir), NodeContext("n1", "", tmp_path, lambda vm: None))
    transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
    async with httpx.AsyncClient(transport=transport, base_url="http://api") as client:
        yield client, {"authorization": f"Bearer {token}"}


def parse(body: str) -> list[tuple[str, str | None, dict[str, Any]]]:
    """(event, id, data) of each server-sent event."""
    out = []
    for block in body.strip().split("\n\n"):
        fields = dict(line.split(": ", 1) for line in block.splitlines() if ": " in line)
        if "event" in fields:
            out.append((fields["event"], fields.get("id"), json.loads(fields["data"])))
    return out


async def follow(api: Api, **params: object) -> list[tuple[str, str | None, dict[str, Any]]]:
    client, auth = api
    r = await client.get("/v1/events", params=params, headers=auth)
    assert r.status_code == 200, r.text
    assert r.headers["content-type"].startswith("text/event-stream")
    return parse(r.text)


def ev(key: str, kind: ChangeKind = ChangeKind.PUT, rev: int = 7) -> WatchEvent:
    return WatchEvent(kind, key, None if kind is ChangeKind.DELETE else b"{}", rev)


@pytest.mark.parametrize(
    ("key", "kind", "expected"),
    [
        ("/aecp/vms/web/spec", ChangeKind.PUT, ("vm", "web", None, "changed")),
        ("/aecp/vms/web/spec", ChangeKind.DELETE, ("vm", "web", None, "deleted")),
        ("/aecp/vms/web/status", ChangeKind.DELETE, ("vm", "web", None, "changed")),
        ("/aecp/vm-jobs/web", ChangeKind.DELETE, ("vm", "web", None, "changed")),
        ("/aecp/nodes/n1", ChangeKind.DELETE, ("node", "n1", None, "deleted")),
        ("/aecp/alive/n1", ChangeKind.DELETE, ("node", "n1", None, "changed")),
        ("/aecp/abs/volumes/db", ChangeKind.DELETE, ("volume", "db", None, "deleted")),
        ("/aecp/abs/attach/db", ChangeKind.DELETE, ("volume", "db", None, "changed")),
        ("/aecp/abs/snapshots/db/s1", ChangeKind.PUT, ("snapshot", "s1", "db", "changed")),
        ("/aecp/templates/gold", ChangeKind.DELETE, ("template", "gold", None, "deleted")),
        ("/aecp/ops/op-1", ChangeKind.PUT, ("operation", "op-1", None, "changed")),
    ],
)
def test_a_store_change_is_the_change_of_one_object(
    key: str, kind: ChangeKind, expected: tuple[str, str, str | None, str]
) -> None:
    got = classify(ev(key, kind))
    assert got is not None
    assert (got.kind, got.name, got.volume, got.change) == expected and got.revision == 7


@pytest.mark.parametrize(
    "key",
    ["/aecp/abs/extents/e1", "/aecp/events/vm/web/1", "/aecp/principals/admin", "/aecp/cluster",
     "/aecp/vms/web", "/aecp/abs/snapshots/db", "/aecp/leaders/scheduler"],
)  # fmt: skip
def test_keys_that_are_not_api_objects_are_not_in_the_feed(key: str) -> None:
    assert classify(ev(key)) is None


async def test_the_feed_replays_from_a_revision_and_a_reconnect_misses_nothing(
    api: Api, store: MemoryStore
) -> None:
    client, auth = api
    since = await store.revision()
    r = await client.post("/v1/vms", json={"name": "web", "image": "tiny"}, headers=auth)
    op = r.json()["operation"]["id"]

    first = await follow(api, since=since, limit=2)

    assert first[0] == ("sync", str(since), {"revision": since})
    changes = [(e, d["name"], d["change"]) for e, _, d in first[1:]]
    assert sorted(changes) == [("operation", op, "changed"), ("vm", "web", "changed")]
    last = first[-1][1]
    await client.post("/v1/nodes/n1/cordon", json={"reason": "disk"}, headers=auth)

    again = await follow(api, since=last, limit=1)

    assert [(e, d["name"]) for e, _, d in again[1:]] == [("node", "n1")]
    assert all(isinstance(FeedEvent.model_validate(d), FeedEvent) for _, _, d in again[1:])


async def test_a_stream_that_ends_inside_a_revision_resumes_at_the_change_after(
    api: Api, store: MemoryStore
) -> None:
    """A VM create changes the VM and its operation in one revision; a stream ended after
    the first of them lost the second when it resumed from the revision (review finding)."""
    client, auth = api
    since = await store.revision()
    await client.post("/v1/vms", json={"name": "web", "image": "tiny"}, headers=auth)

    first = await follow(api, since=since, limit=1)
    resumed = await follow(api, since=first[-1][1], limit=1)
    by_header = await api[0].get(
        "/v1/events",
        params={"limit": 1},
        headers={**auth, "last-event-id": first[-1][1]},  # type: ignore[dict-item]
    )

    got = [(e, i) for e, i, _ in first[1:] + resumed[1:]]
    assert [e for e, _ in got] == ["vm", "operation"] or [e for e, _ in got] == ["operation", "vm"]
    assert {i for _, i in got} == {f"{since + 1}.0", f"{since + 1}.1"}
    assert parse(by_header.text)[1:] == resumed[1:]


@pytest.mark.parametrize("since", ["x", "-1", "1.", "1.2.3", "1e3"])
async def test_a_since_that_is_no_position_is_422(api: Api, since: str) -> None:
    client, auth = api
    r = await client.get("/v1/events", params={"since": since}, headers=auth)
    assert r.status_code == 422 and r.json()["field"] == "since", r.text


async def test_a_compacted_revision_is_410_and_a_future_one_422(
    api: Api, store: MemoryStore
) -> None:
    client, auth = api
    old = await store.revision()
    await store.put(keys.op("op-x"), b"{}")
    await store.compact(await store.put(keys.op("op-x"), b"{}"))
    before = await dump_store(store)

    r = await client.get("/v1/events", params={"since": old}, headers=auth)
    assert r.status_code == 410 and r.json()["error"] == "compacted", r.text
    future = await store.revision() + 10
    r = await client.get("/v1/events", params={"since": future}, headers=auth)
    assert r.status_code == 422 and r.json()["field"] == "since", r.text
    assert "in the future" in r.json()["message"]
    assert await dump_store(store) == before


async def test_a_query_parameter_a_route_does_not_take_is_refused_not_ignored(api: Api) -> None:
    client, auth = api
    for url in ("/v1/events?bogus=1", "/v1/vms?sort=name", "/v1/events?=x"):
        r = await client.get(url, headers=auth)
        assert r.status_code == 422 and "unknown query parameter" in r.json()["message"], url
