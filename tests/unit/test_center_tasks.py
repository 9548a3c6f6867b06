"""The center's tasks, in virtual time, against a scripted cluster API (``FakeCluster``: it
keeps ``Idempotency-Key`` records as the real one does, and can lose an answer, hang, say a
request is still being carried out, or that its outcome is unknown).

A task is answered at once and carried out by the runner: sent with its id as the key,
its operation followed to the end. A lost answer or a center killed mid-request means the
same request again with the same key: never two VMs. Tasks on one object run in order; a
pending task can be cancelled, an executing or finished one cannot. A VM_USER acts on its own
VMs only."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from sqlalchemy import select

from aecp.center.db.models import Cluster, InventoryObject, VMOwner
from aecp.center.main import bootstrap
from aecp.center.settings import CenterSettings
from aecp.center.tasks import Runner
from aecp.common.clock import FakeClock

STRONG = "Correct-Horse-9"
DONE = ("succeeded", "failed", "cancelled")


class FakeCluster:
    """A cluster API as far as tasks need it (logic only; the integration test uses a real
    one)."""

    def __init__(self) -> None:
        self.vms: dict[str, dict[str, Any]] = {}
        self.ops: dict[str, dict[str, Any]] = {}
        self.answers: dict[str, httpx.Response] = {}
        self.script: list[str] = []
        self.keys: list[str] = []
        self.hang = asyncio.Event()
        self.applied = asyncio.Event()  # a change was carried out
        self.down: set[str] = set()  # hosts that do not answer
        self.hosts: list[str] = []  # the host of every request, in order

    async def handle(self, request: httpx.Request) -> httpx.Response:
        path, method = request.url.path, request.method
        self.hosts.append(request.url.host)
        if request.url.host in self.down:
            raise httpx.ConnectError("no route to host", request=request)
        if path == "/v1/cluster":
            return httpx.Response(200, json={"id": "cid-1", "name": "c1"})
        if method == "GET" and path.startswith("/v1/operations/"):
            op = self.ops[path.rsplit("/", 1)[1]]
            if op["state"] == "running":  # each read moves it on
                op["progress"] += 50
                op["message"] = f"{op['progress']}% done"
                if op["progress"] >= 100:
                    op["state"] = "succeeded"
            return httpx.Response(200, json=op)
        if method == "GET":
            return httpx.Response(200, json=[])
        key = request.headers["idempotency-key"]
        self.keys.append(key)
        if key in self.answers:
            return self.answers[key]
        mode = self.script.pop(0) if self.script else "ok"
        if mode == "down":
            raise httpx.ConnectError("connection refused", request=request)
        if mode in ("in_progress", "unknown"):
            body = {"error": "conflict", "message": f"key {mode}", "idempotency": mode}
            return httpx.Response(409, json=body)
        answer = self.apply(method, path, json.loads(request.content or b"{}"))
        self.answers[key] = answer
        self.applied.set()
        if mode == "hang":
            await self.hang.wait()
        if mode == "lose":
            raise httpx.ReadTimeout("the answer was lost", request=request)
        return answer

    def apply(self, method: str, path: str, body: dict[str, Any]) -> httpx.Response:
        if method == "DELETE" and path.startswith("/v1/vms/"):
            self.vms.pop(path.rsplit("/", 1)[1], None)
        if method == "POST" and path == "/v1/vms":
            if body["name"] in self.vms:
                msg = f"VM {body['name']} already exists"
                return httpx.Response(409, json={"error": "already_exists", "message": msg})
            self.vms[body["name"]] = body
        op = {
            "id": f"op-{len(self.ops) + 1}",
            "kind": f"{method} {path}",
            "state": "running",
            "progress": 0,
            "message": "",
            "error": "",
        }
        self.ops[op["id"]] = op
        return httpx.Response(202, json={"operation": op})


class World:
    def __init__(self, app: Any, client: httpx.AsyncClient, clock: FakeClock, fake: FakeCluster):
        self.app, self.client, self.clock, self.fake = app, client, clock, fake
        self.runner: Runner = app.state.runner
        self.token = self.password = ""

    async def call(self, method: str, path: str, token: str = "", **kw: Any) -> httpx.Response:
        auth = {"authorization": f"Bearer {token or self.token}"}
        return await self.client.request(method, path, headers=auth, **kw)

    async def submit(
        self, path: str, token: str = "", method: str = "POST", **kw: Any
    ) -> dict[str, Any]:
        r = await self.call(method, path, token, **kw)
        assert r.status_code == 202, r.text
        task: dict[str, Any] = r.json()
        assert task["state"] == "pending"
        return task

    async def task(self, task_id: str) -> dict[str, Any]:
        r = await self.call("GET", f"/v1/tasks/{task_id}")
        assert r.status_code == 200, r.text
        got: dict[str, Any] = r.json()
        return got

    async def until_ended(self, task_id: str, runner: Runner | None = None) -> dict[str, Any]:
        """Run the runner (and virtual time) until the task ends."""
        runner = runner or self.runner
        for _ in range(2000):
            task = await self.task(task_id)
            if task["state"] in DONE:
                return task
            if not runner.running:
                await runner.pass_once()
            elif self.clock.sleeping():
                await self.clock.advance(1.0)
            else:  # a thread of the runner is at work: until a task ends, or a moment
                await asyncio.wait(set(runner.running.values()), timeout=0.01)
        raise AssertionError(f"task {task_id} never ended: {await self.task(task_id)}")

    async def user(self, name: str, role: str) -> str:
        r = await self.call(
            "POST", "/v1/users", json={"name": name, "role": role, "password": STRONG}
        )
        assert r.status_code == 201, r.text
        r = await self.client.post("/v1/login", json={"user": name, "password": STRONG})
        token: str = r.json()["token"]
        return token


@pytest.fixture
async def world(tmp_path: Path, clock: FakeClock) -> AsyncIterator[World]:
    fake = FakeCluster()

    def client() -> httpx.AsyncClient:
        return httpx.AsyncClient(transport=httpx.MockTransport(fake.handle))

    app, password = bootstrap(CenterSettings(data_dir=tmp_path / "aoc"), clock, client)
    transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
    async with httpx.AsyncClient(transport=transport, base_url="http://aoc") as http:
        w = World(app, http, clock, fake)
        r = await http.post("/v1/login", json={"user": "root", "password": password})
        w.token, w.password = r.json()["token"], password
        assert (await w.call("POST", "/v1/datacenters", json={"name": "dc1"})).status_code == 201
        body = {"name": "c1", "datacenter": "dc1", "endpoint": "http://c1:8700", "token": "t.s"}
        assert (await w.call("POST", "/v1/clusters", json=body)).status_code == 201
        yield w
        await w.runner.close()


VM = {"name": "web", "image": "tiny", "memory_mib": 256}


async def test_a_task_is_answered_at_once_then_sent_with_its_id_as_key_and_followed(
    world: World,
) -> None:
    task = await world.submit("/v1/clusters/c1/vms", json=VM)
    assert task["kind"] == "vm.create" and task["cluster"] == "c1" and task["user"] == "root"
    assert world.fake.vms == {}  # nothing sent before the runner takes it
    done = await world.until_ended(task["id"])
    assert done["state"] == "succeeded" and done["progress"] == 100
    assert world.fake.keys == [task["id"]]
    assert done["cluster_operation"] == "op-1" and done["finished_at"] >= done["started_at"] > 0
    sentences = [s["sentence"] for s in done["steps"]]
    assert any("operation op-1" in s for s in sentences) and "50% done" in sentences
    audit = (await world.call("GET", "/v1/audit", params={"action": "vm.create"})).json()
    assert [(a["task_id"], a["target"]) for a in audit] == [(task["id"], "c1/web")]


async def test_a_lost_answer_sends_the_same_request_again_with_the_same_key(
    world: World,
) -> None:
    world.fake.script = ["down", "lose"]  # not reached; then reached but the answer lost
    task = await world.submit("/v1/clusters/c1/vms", json=VM)
    done = await world.until_ended(task["id"])
    assert done["state"] == "succeeded", done
    assert world.fake.keys == [task["id"]] * 3 and list(world.fake.vms) == ["web"]


async def test_a_center_killed_mid_request_takes_the_task_up_again_and_makes_one_vm(
    world: World, tmp_path: Path
) -> None:
    world.fake.script = ["hang"]
    task = await world.submit("/v1/clusters/c1/vms", json=VM)
    await world.runner.pass_once()
    await asyncio.wait_for(world.fake.applied.wait(), 30)  # the cluster made the VM
    await world.runner.close()  # the center dies before the answer arrives
    assert (await world.task(task["id"]))["state"] == "executing"

    restarted = Runner(
        world.runner.sessions, world.runner.registry, world.runner.client_factory, world.clock
    )
    done = await world.until_ended(task["id"], restarted)
    await restarted.close()
    assert done["state"] == "succeeded", done
    assert list(world.fake.vms) == ["web"] and world.fake.keys == [task["id"]] * 2
    assert any("taken up again" in s["sentence"] for s in done["steps"])


async def test_a_still_running_request_is_asked_again_and_an_unknown_outcome_fails_honestly(
    world: World,
) -> None:
    world.fake.script = ["in_progress"]
    first = await world.submit("/v1/clusters/c1/vms", json=VM)
    assert (await world.until_ended(first["id"]))["state"] == "succeeded"

    world.fake.script = ["unknown"]
    second = await world.submit("/v1/clusters/c1/vms/web/actions/poweroff")
    done = await world.until_ended(second["id"])
    assert done["state"] == "failed"
    assert "cannot tell whether the request took effect" in done["error"] and "web" in done["error"]
    assert world.fake.keys.count(second["id"]) == 1  # never sent again with another key


async def test_a_refusal_by_the_cluster_fails_the_task_with_its_reason(world: World) -> None:
    world.fake.vms["web"] = VM
    task = await world.submit("/v1/clusters/c1/vms", json=VM)
    done = await world.until_ended(task["id"])
    assert done["state"] == "failed" and "VM web already exists" in done["error"]


async def test_tasks_on_one_object_run_in_order_and_only_a_pending_one_can_be_cancelled(
    world: World,
) -> None:
    world.fake.script = ["hang"]
    first = await world.submit("/v1/clusters/c1/vms", json=VM)
    second = await world.submit("/v1/clusters/c1/vms/web/actions/poweroff")
    other = await world.submit("/v1/clusters/c1/vms", json={**VM, "name": "db"})
    started = await world.runner.pass_once()
    assert started == [first["id"], other["id"]]  # web's second waits for its first

    r = await world.call("POST", f"/v1/tasks/{first['id']}/cancel")
    assert r.status_code == 409 and "cannot be cancelled now" in r.json()["message"]
    r = await world.call("POST", f"/v1/tasks/{second['id']}/cancel")
    assert r.status_code == 200 and r.json()["state"] == "cancelled"
    world.fake.hang.set()
    assert (await world.until_ended(first["id"]))["state"] == "succeeded"
    r = await world.call("POST", f"/v1/tasks/{first['id']}/cancel")
    assert r.status_code == 409 and "already ended (succeeded)" in r.json()["message"]
    assert second["id"] not in world.fake.keys  # a cancelled task never reaches the cluster


async def test_a_vm_user_sees_and_acts_on_its_own_vms_only(world: World) -> None:
    carol = await world.user("carol", "VM_USER")
    dave = await world.user("dave", "VM_USER")
    world.fake.vms["prod"] = {"name": "prod"}  # made on the cluster directly: nobody's
    mine = await world.submit("/v1/clusters/c1/vms", carol, json=VM)
    r = await world.call("POST", "/v1/clusters/c1/vms/web/actions/start", carol)
    assert r.status_code == 403  # carol's only once the cluster has accepted the create
    await world.until_ended(mine["id"])

    r = await world.call("POST", "/v1/clusters/c1/vms/web/actions/poweroff", dave)
    assert r.status_code == 403 and "own VMs" in r.json()["message"]
    assert (await world.call("DELETE", "/v1/clusters/c1/vms/web", dave)).status_code == 403
    # asking to create a name that exists wins dave nothing: the cluster refuses it
    stolen = await world.submit("/v1/clusters/c1/vms", dave, json={**VM, "name": "prod"})
    assert (await world.call("DELETE", "/v1/clusters/c1/vms/prod", dave)).status_code == 403
    assert (await world.until_ended(stolen["id"]))["state"] == "failed"
    assert (await world.call("DELETE", "/v1/clusters/c1/vms/prod", dave)).status_code == 403
    assert sorted(world.fake.vms) == ["prod", "web"]

    tasks = (await world.call("GET", "/v1/tasks")).json()
    assert sorted(t["user"] for t in tasks) == ["carol", "dave"]
    assert [t["target"] for t in (await world.call("GET", "/v1/tasks", dave)).json()] == ["prod"]
    assert (await world.call("GET", f"/v1/tasks/{mine['id']}", dave)).status_code == 404
    r = await world.call("GET", "/v1/tasks", dave, params={"user": "carol"})
    assert r.status_code == 200 and r.json() == [] and r.headers["x-total-count"] == "0"
    refused = (await world.call("GET", "/v1/audit", params={"user": "dave"})).json()
    results = [a["result"].split(":")[0] for a in refused if a["action"] != "session.login"]
    assert results == ["forbidden", "forbidden", "ok", "forbidden", "forbidden"]
    r = await world.call("POST", "/v1/clusters/c1/vms/web/actions/poweroff", carol)
    assert r.status_code == 202
    assert (await world.call("GET", "/v1/clusters/c1/proxy/v1/vms", dave)).status_code == 403
    assert (await world.call("GET", "/v1/inventory/vm", dave)).status_code == 403


async def test_owners_follow_what_the_cluster_accepted(world: World) -> None:
    carol = await world.user("carol", "VM_USER")

    async def owners() -> list[tuple[str, str]]:
        with world.runner.sessions() as db:
            return [(o.vm, o.user) for o in db.scalars(select(VMOwner))]

    first = await world.submit("/v1/clusters/c1/vms", carol, json=VM)
    await world.until_ended(first["id"])
    again = await world.submit("/v1/clusters/c1/vms", carol, json=VM)  # refused: exists
    assert (await world.until_ended(again["id"]))["state"] == "failed"
    assert await owners() == [("web", "carol")]  # a failed retry takes nothing away
    gone = await world.submit("/v1/clusters/c1/vms/web", carol, method="DELETE")
    remade = await world.submit("/v1/clusters/c1/vms", carol, json=VM)
    await world.until_ended(gone["id"])
    assert (await world.until_ended(remade["id"]))["state"] == "succeeded"
    assert await owners() == [("web", "carol")]  # the new VM is carol's again

    r = await world.call("DELETE", "/v1/users/carol")
    assert r.status_code == 204
    assert await owners() == []  # a later carol inherits nothing


async def test_bad_input_is_refused_naming_the_field_and_records_no_task(world: World) -> None:
    cases = [
        ("/v1/clusters/c1/vms", {**VM, "memory_mib": 1}, 422, "memory_mib"),
        ("/v1/clusters/c1/vms", {**VM, "name": "Bad Name"}, 422, "name"),
        ("/v1/clusters/nope/vms", VM, 404, "nope"),
        ("/v1/clusters/c1/vms/web/actions/explode", None, 422, "action"),
        ("/v1/clusters/c1/volumes", {"name": "v", "size": "ten"}, 422, "size"),
        ("/v1/clusters/c1/volumes", {"name": "v", "size": 4096, "replicas": 7}, 422, "replicas"),
    ]
    for path, body, code, field in cases:
        r = await world.call("POST", path, json=body)
        assert r.status_code == code, (path, r.text)
        assert field in r.text
    assert (await world.call("GET", "/v1/tasks")).json() == []
    for params in ({"sort": "password"}, {"limit": 0}, {"offset": -1}, {"state": "bogus"}):
        assert (await world.call("GET", "/v1/tasks", params=params)).status_code == 422
    assert (await world.call("GET", "/v1/vms", params={"sort": "data"})).status_code == 422
    r = await world.call("POST", "/v1/tasks/nope/cancel")
    assert r.status_code == 404


async def test_a_node_that_stops_answering_is_replaced_by_another_of_the_same_cluster(
    world: World,
) -> None:
    with world.runner.sessions.begin() as db:  # the copy knows the cluster's two nodes
        for n in ("c1", "n2"):
            data = json.dumps({"name": n, "api_url": f"http://{n}:8700"})
            db.add(InventoryObject(cluster="c1", kind="node", name=n, data=data, synced_at=1.0))
    world.fake.down.add("c1")  # the registered endpoint's node is gone
    task = await world.submit("/v1/clusters/c1/vms", json=VM)
    done = await world.until_ended(task["id"])
    assert done["state"] == "succeeded", done
    assert world.fake.hosts[-1] == "n2" and list(world.fake.vms) == ["web"]
    assert world.runner.registry.in_use == {"c1": "http://n2:8700"}


async def test_a_request_sent_longer_ago_than_the_cluster_keeps_keys_is_not_sent_again(
    world: World,
) -> None:
    world.fake.script = ["hang"]
    task = await world.submit("/v1/clusters/c1/vms", json=VM)
    await world.runner.pass_once()
    await asyncio.wait_for(world.fake.applied.wait(), 30)
    await world.runner.close()  # the center stops; it stays down for a day
    await world.clock.advance(24 * 3600)
    world.fake.answers.clear()  # and the cluster has forgotten the key by then
    r = await world.client.post("/v1/login", json={"user": "root", "password": world.password})
    world.token = r.json()["token"]
    restarted = Runner(
        world.runner.sessions, world.runner.registry, world.runner.client_factory, world.clock
    )
    done = await world.until_ended(task["id"], restarted)
    await restarted.close()
    assert done["state"] == "failed" and "could do it twice" in done["error"]
    assert world.fake.keys == [task["id"]]  # never sent again


async def test_the_token_goes_only_where_the_registered_endpoints_would(world: World) -> None:
    nodes = {
        "n1": "http://c1:8700",  # the registered endpoint itself
        "n2": "http://n2:8700",
        "n3": "https://n3:8700",  # another scheme
        "n4": "http://127.0.0.1:8700",  # loopback, for a cluster registered elsewhere
        "n5": "http://169.254.169.254",  # the clouds' metadata address
    }
    with world.runner.sessions.begin() as db:
        for n, url in nodes.items():
            data = json.dumps({"name": n, "api_url": url})
            db.add(InventoryObject(cluster="c1", kind="node", name=n, data=data, synced_at=1.0))
    with world.runner.sessions() as db:
        c1 = db.get(Cluster, "c1")
        assert c1 is not None
        assert world.runner.registry.addresses(db, c1) == ["http://c1:8700", "http://n2:8700"]
