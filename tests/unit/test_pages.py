"""List endpoints page (limit + cursor, the next cursor in a header) and filter; a cursor
from another list, or one that is no cursor, is refused naming the field."""

from __future__ import annotations

import base64
import json

import pytest

from aecp.store.memory import MemoryStore
from tests.unit import test_feed
from tests.unit.conftest import dump_store
from tests.unit.test_feed import Api

api = test_feed.api  # the fixture: the API over a memory store


async def pages(api: Api, path: str, limit: int, **params: str) -> list[list[str]]:
    client, auth = api
    out: list[list[str]] = []
    cursor: str | None = None
    while True:
        query = {**params, "limit": str(limit), **({"cursor": cursor} if cursor else {})}
        r = await client.get(path, params=query, headers=auth)
        assert r.status_code == 200, r.text
        out.append([item.get("name") or item.get("id") for item in r.json()])
        cursor = r.headers.get("x-next-cursor")
        if cursor is None:
            return out


async def test_vms_page_by_name_and_every_vm_comes_once_even_if_one_is_made_meanwhile(
    api: Api,
) -> None:
    client, auth = api
    for name in ("e", "a", "d", "b", "c"):
        body = {"name": name, "image": "tiny", "start": False}
        assert (await client.post("/v1/vms", json=body, headers=auth)).status_code == 202
    assert await pages(api, "/v1/vms", 2) == [["a", "b"], ["c", "d"], ["e"]]
    r = await client.get("/v1/vms", params={"limit": 2}, headers=auth)
    body = {"name": "aa", "image": "tiny", "start": False}
    await client.post("/v1/vms", json=body, headers=auth)  # before the cursor: not repeated
    rest = await client.get(
        "/v1/vms", params={"limit": 10, "cursor": r.headers["x-next-cursor"]}, headers=auth
    )
    assert [v["name"] for v in rest.json()] == ["c", "d", "e"]
    assert "x-next-cursor" not in rest.headers


async def test_operations_page_oldest_first_and_filter_by_target_and_state(api: Api) -> None:
    client, auth = api
    for name in ("a", "b", "c"):
        await client.post("/v1/vms", json={"name": name, "image": "tiny"}, headers=auth)
    ops = (await client.get("/v1/operations", headers=auth)).json()
    assert [p for page in await pages(api, "/v1/operations", 2) for p in page] == [
        o["id"] for o in ops
    ]
    only_b = await client.get("/v1/operations", params={"target": "b"}, headers=auth)
    assert [o["target"] for o in only_b.json()] == ["b"]
    done = await client.get("/v1/operations", params={"state": "succeeded"}, headers=auth)
    assert done.json() == []


@pytest.mark.parametrize("cursor", ["not-a-cursor", "eyJsIjoibm9kZXMiLCJhIjpbIm4xIl19"])
async def test_a_cursor_from_another_list_or_none_at_all_is_refused(
    api: Api, store: MemoryStore, cursor: str
) -> None:
    """The second cursor is a real one, of the node list."""
    client, auth = api
    before = await dump_store(store)
    r = await client.get("/v1/vms", params={"cursor": cursor}, headers=auth)
    assert r.status_code == 422 and r.json()["field"] == "cursor", r.text
    assert await dump_store(store) == before


async def test_a_cursor_of_a_list_with_other_filters_is_refused(api: Api) -> None:
    client, auth = api
    for name in ("a", "b"):
        await client.post("/v1/vms", json={"name": name, "image": "tiny"}, headers=auth)
    r = await client.get("/v1/vms", params={"limit": 1}, headers=auth)
    other = await client.get(
        "/v1/vms", params={"state": "pending", "cursor": r.headers["x-next-cursor"]}, headers=auth
    )
    assert other.status_code == 422 and "another list" in other.json()["message"]


@pytest.mark.parametrize("position", [[1], [None], [{}], [1.5, "x"]])
async def test_a_forged_cursor_for_the_right_list_is_422_not_500(
    api: Api, position: list[object]
) -> None:
    client, auth = api
    await client.post("/v1/vms", json={"name": "a", "image": "tiny"}, headers=auth)
    raw = json.dumps({"l": "vms?node=&state=", "a": position}).encode()
    cursor = base64.urlsafe_b64encode(raw).decode().rstrip("=")
    r = await client.get("/v1/vms", params={"cursor": cursor}, headers=auth)
    assert r.status_code == 422 and r.json()["field"] == "cursor", r.text
