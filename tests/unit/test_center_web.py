"""The web console, in process: logging in through the form sets an HttpOnly, SameSite=Strict
session cookie (and is audited); pages send a browser without a session to the login page;
a role without a page's action gets 403, and a refused form is audited; a form sent from
another site is refused; the pages render what the center holds; the VM forms make tasks
through the API's own functions, audited with the task's id; the live events name the
topics that changed; and none of it is in the API's OpenAPI document."""

from __future__ import annotations

import asyncio
import re
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi import Response

from aecp.center.accounts import Caller
from aecp.center.db.models import InventoryObject, VMOwner
from aecp.center.main import bootstrap
from aecp.center.settings import CenterSettings
from aecp.center.web import live, remote
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

AOC = "http://aoc"
SAME_SITE = {"origin": AOC}


class Console:
    """A browser on the console (its own cookies) and the API beside it (root's token)."""

    def __init__(self, app: Any, root_password: str, c1: httpx.AsyncClient) -> None:
        self.app, self.root_password, self.c1 = app, root_password, c1
        self.transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
        self.api_token = ""

    def browser(self) -> httpx.AsyncClient:
        return httpx.AsyncClient(transport=self.transport, base_url=AOC, follow_redirects=False)

    async def api(self, method: str, path: str, **kw: Any) -> httpx.Response:
        async with self.browser() as http:
            return await http.request(
                method, path, headers={"authorization": f"Bearer {self.api_token}"}, **kw
            )

    async def login(self, http: httpx.AsyncClient, user: str, password: str) -> httpx.Response:
        form = {"user": user, "password": password, "next": "/"}
        return await http.post("/login", data=form, headers=SAME_SITE)

    async def audit(self, action: str) -> list[dict[str, Any]]:
        r = await self.api("GET", "/v1/audit", params={"action": action})
        assert r.status_code == 200, r.text
        records: list[dict[str, Any]] = r.json()
        return records


@pytest.fixture
async def console(
    tmp_path: Path, clock: FakeClock, store: MemoryStore, images_dir: Path, cluster: Cluster
) -> AsyncIterator[Console]:
    c1_token = await admin_token(store)
    await add_node(store, "n1")
    vms = VMService(store, images_dir)
    c1 = cluster_app(
        vms,
        NodeContext("n1", "", tmp_path, lambda v: None),
        VolumeService(cluster.meta, cluster.pool),
        VMSnapshotService(vms, SnapshotService(cluster.meta, cluster.pool)),
    )
    app, password = bootstrap(
        CenterSettings(data_dir=tmp_path / "aoc"),
        clock,
        lambda: httpx.AsyncClient(transport=OnlyC1(c1)),
    )
    assert password is not None
    c1_client = httpx.AsyncClient(
        transport=httpx.ASGITransport(app=c1),
        base_url=CLUSTER_URL,
        headers={"authorization": f"Bearer {c1_token}"},
    )
    async with c1_client:
        con = Console(app, password, c1_client)
        r = await con.api("POST", "/v1/login", json={"user": "root", "password": password})
        con.api_token = r.json()["token"]
        await con.api("POST", "/v1/datacenters", json={"name": "dc1"})
        body = {"name": "c1", "datacenter": "dc1", "endpoint": CLUSTER_URL, "token": c1_token}
        assert (await con.api("POST", "/v1/clusters", json=body)).status_code == 201
        r = await c1_client.post("/v1/vms", json={"name": "web", "image": "tiny", "start": False})
        assert r.status_code == 202, r.text
        await app.state.inventory.resync("c1")
        yield con


@pytest.fixture
async def root(console: Console) -> AsyncIterator[httpx.AsyncClient]:
    """A browser logged in as root."""
    async with console.browser() as http:
        r = await console.login(http, "root", console.root_password)
        assert r.status_code == 303, r.text
        yield http


@asynccontextmanager
async def user_browser(console: Console, name: str, role: str) -> AsyncIterator[httpx.AsyncClient]:
    """A browser logged in as a new user ``name`` of ``role``."""
    password = "a-long-enough-Passw0rd"
    body = {"name": name, "role": role, "password": password}
    assert (await console.api("POST", "/v1/users", json=body)).status_code == 201
    async with console.browser() as http:
        assert (await console.login(http, name, password)).status_code == 303
        yield http


# ---- sessions -------------------------------------------------------------------------------
async def test_logging_in_sets_an_httponly_strict_session_cookie_and_is_audited(
    console: Console,
) -> None:
    async with console.browser() as http:
        assert (await http.get("/login")).status_code == 200
        r = await console.login(http, "root", console.root_password)
        assert r.status_code == 303 and r.headers["location"] == "/"
        cookie = r.headers["set-cookie"]
        assert cookie.startswith("aoc_session=aoc_")
        attributes = {a.strip().lower() for a in cookie.split(";")[1:]}
        assert {"httponly", "samesite=strict", "path=/"} <= attributes
        page = await http.get("/")
        assert page.status_code == 200 and "Dashboard" in page.text
        assert "aoc_" not in page.text  # the token is never in a page
    [login] = [a for a in await console.audit("session.login") if a["user"] == "root"][:1]
    assert login["result"] == "ok"


async def test_a_wrong_password_goes_back_to_the_login_page_and_is_audited(
    console: Console,
) -> None:
    async with console.browser() as http:
        r = await console.login(http, "root", "not-the-password")
        assert r.status_code == 303 and "aoc_session" not in r.headers.get("set-cookie", "")
        page = await http.get(r.headers["location"])
        assert "wrong user name or password" in page.text
        assert (await http.get("/")).status_code == 303
    results = [a["result"] for a in await console.audit("session.login")]
    assert any(r.startswith("unauthorized") for r in results)


@pytest.mark.parametrize(
    "path",
    ["/", "/ui/clusters/c1", "/ui/clusters/c1/vms/web", "/ui/vms", "/ui/tasks", "/ui/alerts",
     "/ui/users", "/ui/audit", "/ui/events"],
)  # fmt: skip
async def test_a_page_without_a_session_sends_the_browser_to_the_login_page(
    console: Console, path: str
) -> None:
    async with console.browser() as http:
        r = await http.get(path)
        assert r.status_code == 303
        assert r.headers["location"].startswith("/login")
        http.cookies.set("aoc_session", "aoc_made-up")
        assert (await http.get(path)).status_code == 303


async def test_logging_out_ends_the_session(console: Console, root: httpx.AsyncClient) -> None:
    token = root.cookies["aoc_session"]
    r = await root.post("/logout", headers=SAME_SITE)
    assert r.status_code == 303 and r.headers["location"] == "/login"
    async with console.browser() as other:
        other.cookies.set("aoc_session", token)  # the old cookie, kept: it is dead
        assert (await other.get("/")).status_code == 303
    assert [a["result"] for a in await console.audit("session.logout")] == ["ok"]


# ---- roles ----------------------------------------------------------------------------------
async def test_a_role_without_a_pages_action_gets_403_and_a_refused_form_is_audited(
    console: Console,
) -> None:
    async with user_browser(console, "eve", "AUDITOR") as eve:
        assert (await eve.get("/ui/audit")).status_code == 200
        for path in ("/ui/clusters/c1", "/ui/tasks", "/ui/users", "/ui/clusters/c1/vms/web"):
            r = await eve.get(path)
            assert r.status_code == 403, path
            assert "may not" in r.text
        dashboard = await eve.get("/")  # the dashboard shows what the role may read: nothing
        assert dashboard.status_code == 200  # no cluster named (a token may hold "c1")
        assert not re.search(r"\bc1\b", dashboard.text)
        assert 'href="/ui/audit"' in dashboard.text and 'href="/ui/tasks"' not in dashboard.text
        form = {"name": "mallory", "role": "ADMIN", "password": "a-long-enough-Passw0rd"}
        r = await eve.post("/ui/users", data=form, headers=SAME_SITE)
        assert r.status_code == 403
    users = [u["name"] for u in (await console.api("GET", "/v1/users")).json()]
    assert "mallory" not in users
    [refused] = await console.audit("user.write")
    assert refused["user"] == "eve" and refused["result"].startswith("forbidden")


async def test_a_vm_user_sees_only_its_own_vms(console: Console) -> None:
    async with user_browser(console, "val", "VM_USER") as val:
        assert (await val.get("/ui/clusters/c1/vms/web")).status_code == 404  # not its own
        listed = await val.get("/ui/vms")
        assert listed.status_code == 200 and 'data-vm="web"' not in listed.text


# ---- CSRF -----------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "headers",
    [{"origin": "http://evil.test"}, {"referer": "http://evil.test/form"}, {}, {"origin": "null"}],
)
async def test_a_form_sent_from_another_site_is_refused(
    console: Console, root: httpx.AsyncClient, headers: dict[str, str]
) -> None:
    form = {"name": "mallory", "role": "ADMIN", "password": "a-long-enough-Passw0rd"}
    r = await root.post("/ui/users", data=form, headers=headers)
    assert r.status_code == 403 and "own pages" in r.text
    users = [u["name"] for u in (await console.api("GET", "/v1/users")).json()]
    assert "mallory" not in users
    r = await root.post("/ui/users", data=form, headers={"referer": f"{AOC}/ui/users"})
    assert r.status_code == 303  # the same form from the console's own page is acted on
    assert "mallory" in [u["name"] for u in (await console.api("GET", "/v1/users")).json()]


async def test_a_login_form_from_another_site_is_refused(console: Console) -> None:
    async with console.browser() as http:
        form = {"user": "root", "password": console.root_password}
        r = await http.post("/login", data=form, headers={"origin": "http://evil.test"})
        assert r.status_code == 403 and "aoc_session" not in r.headers.get("set-cookie", "")


# ---- pages ----------------------------------------------------------------------------------
async def test_the_pages_show_what_the_center_holds(root: httpx.AsyncClient) -> None:
    dashboard = (await root.get("/")).text
    assert 'data-cluster="c1"' in dashboard and "Data center dc1" in dashboard
    assert 'data-topics="inventory"' in dashboard and "inventory:" in dashboard
    cluster = (await root.get("/ui/clusters/c1")).text
    assert 'data-node="n1"' in cluster and 'data-vm="web"' in cluster
    assert 'action="/ui/clusters/c1/vms"' in cluster  # root may create VMs
    vm = await root.get("/ui/clusters/c1/vms/web")
    assert vm.status_code == 200, vm.text
    assert "VM web" in vm.text and 'id="console"' in vm.text and "Snapshots" in vm.text
    assert 'action="/ui/clusters/c1/vms/web/actions/start"' in vm.text  # it is stopped
    for path in ("/ui/vms", "/ui/tasks", "/ui/alerts", "/ui/users", "/ui/audit"):
        r = await root.get(path)
        assert r.status_code == 200, f"{path}: {r.text[:500]}"
        assert r.headers["content-security-policy"].startswith("default-src 'self'")
        assert r.headers["x-frame-options"] == "DENY"
    assert (await root.get("/ui/clusters/c9")).status_code == 404


async def test_a_part_of_a_page_is_answered_alone(root: httpx.AsyncClient) -> None:
    part = await root.get("/ui/clusters/c1", params={"part": "vms"})
    assert part.status_code == 200 and 'data-vm="web"' in part.text
    assert "<html" not in part.text
    assert (await root.get("/ui/clusters/c1", params={"part": "nope"})).status_code == 404


async def test_the_static_files_are_served_from_the_package(root: httpx.AsyncClient) -> None:
    js = await root.get("/ui/static/console.js")
    assert js.status_code == 200 and "EventSource" in js.text
    assert (await root.get("/ui/static/console.css")).status_code == 200


async def test_the_console_is_not_in_the_openapi_document(console: Console) -> None:
    doc = (await console.api("GET", "/openapi.json")).json()
    assert not [p for p in doc["paths"] if p.startswith("/ui") or p in ("/", "/login")]


# ---- forms that change things ---------------------------------------------------------------
async def test_creating_a_vm_through_the_form_makes_a_task_audited_with_its_id(
    console: Console, root: httpx.AsyncClient
) -> None:
    form = {"name": "db", "image": "tiny", "vcpus": "1", "memory_mib": "128", "start": "on"}
    r = await root.post("/ui/clusters/c1/vms", data=form, headers=SAME_SITE)
    assert r.status_code == 303, r.text
    m = re.fullmatch(r"/ui/tasks/([0-9a-f]+)", r.headers["location"])
    assert m is not None
    page = await root.get(r.headers["location"])
    assert "vm.create of db" in page.text and "creating VM db" in page.text
    [created] = await console.audit("vm.create")
    assert created["task_id"] == m.group(1) and created["target"] == "c1/db"
    task = (await console.api("GET", f"/v1/tasks/{m.group(1)}")).json()
    assert task["state"] == "pending" and task["user"] == "root"


async def test_a_refused_form_goes_back_with_the_reason_and_changes_nothing(
    console: Console, root: httpx.AsyncClient
) -> None:
    form = {"name": "Bad_Name", "image": "tiny", "memory_mib": "128"}
    back = f"{AOC}/ui/clusters/c1"
    r = await root.post("/ui/clusters/c1/vms", data=form, headers={"referer": back})
    assert r.status_code == 303 and r.headers["location"] == "/ui/clusters/c1"
    page = await root.get("/ui/clusters/c1")
    assert 'class="flash error"' in page.text and "name" in page.text
    assert (await console.api("GET", "/v1/tasks")).json() == []


async def test_a_power_button_makes_a_task(console: Console, root: httpx.AsyncClient) -> None:
    back = f"{AOC}/ui/clusters/c1/vms/web"
    r = await root.post("/ui/clusters/c1/vms/web/actions/start", headers={"referer": back})
    assert r.status_code == 303 and r.headers["location"] == "/ui/clusters/c1/vms/web"
    [task] = (await console.api("GET", "/v1/tasks")).json()
    assert (task["kind"], task["target"]) == ("vm.start", "web")
    r = await root.post("/ui/clusters/c1/vms/web/actions/explode", headers=SAME_SITE)
    assert r.status_code in (303, 422)
    assert len((await console.api("GET", "/v1/tasks")).json()) == 1


async def test_users_and_roles_are_administered_through_the_forms(
    console: Console, root: httpx.AsyncClient
) -> None:
    r = await root.post(
        "/ui/roles", data={"name": "ops", "actions": ["vm.read", "vm.power"]}, headers=SAME_SITE
    )
    assert r.status_code == 303
    form = {"name": "olga", "role": "ops", "password": "a-long-enough-Passw0rd"}
    assert (await root.post("/ui/users", data=form, headers=SAME_SITE)).status_code == 303
    assert (await root.post("/ui/users/olga/disable", headers=SAME_SITE)).status_code == 303
    users = {u["name"]: u for u in (await console.api("GET", "/v1/users")).json()}
    assert users["olga"]["role"] == "ops" and users["olga"]["disabled"]
    assert (await root.post("/ui/users/olga/delete", headers=SAME_SITE)).status_code == 303
    assert (await root.post("/ui/roles/ops/delete", headers=SAME_SITE)).status_code == 303
    actions = [a["action"] for a in (await console.api("GET", "/v1/audit")).json()][::-1]
    assert actions[-5:] == ["role.create", "user.create", "user.update", "user.delete",
                            "role.delete"]  # fmt: skip
    [made] = await console.audit("user.create")
    assert "a-long-enough" not in made["params"]


# ---- live updates ---------------------------------------------------------------------------
def request_of(console: Console) -> Any:
    class Req:  # what ``changes`` reads of a request: the app
        app = console.app

    return Req


async def caller_of(console: Console, http: httpx.AsyncClient) -> Caller:
    c = console.app.state.center
    with c.sessions() as db:
        who: Caller = c.accounts.caller(db, http.cookies["aoc_session"])
    return who


async def test_the_live_events_name_the_topics_that_changed(
    console: Console, root: httpx.AsyncClient, clock: FakeClock
) -> None:
    page = (await root.get("/")).text
    m = re.search(r'data-since="([^"]+)"', page)
    assert m is not None
    since = live.decode(m.group(1))
    assert set(since) == set(live.TOPICS)

    Req = request_of(console)

    who = await caller_of(console, root)
    stream = live.changes(Req(), root.cookies["aoc_session"], who, since)
    try:
        assert (await anext(stream)).startswith("retry:")
        form = {"name": "db", "image": "tiny", "memory_mib": "128"}
        await root.post("/ui/clusters/c1/vms", data=form, headers=SAME_SITE)
        event = await anext(stream)
        assert "event: change" in event and '"topics": ["audit", "tasks"]' in event
        ident = event.split("\n")[0].removeprefix("id: ")
        assert live.decode(ident)["tasks"] != since["tasks"]

        await root.post("/logout", headers=SAME_SITE)  # the session ends: so does the stream
        pending = asyncio.ensure_future(anext(stream))
        await clock.until_sleeping()
        await clock.advance(live.POLL_EVERY)
        assert "event: login" in await pending
    finally:
        await stream.aclose()


def test_no_template_has_an_inline_script_or_style() -> None:
    """The pages' Content-Security-Policy allows the console's own files only: an inline
    ``style=`` or ``<script>`` would silently do nothing (a progress bar once did)."""
    templates = Path(live.__file__).parent / "templates"
    found = [
        f"{t.relative_to(templates)}: {m.group(0)}"
        for t in templates.rglob("*.html")
        for m in re.finditer(
            r"style=|<script>|<script(?![^>]*\bsrc=)[^>]*>|\bon[a-z]+=", t.read_text()
        )
    ]
    assert found == []


# ---- what each role may read (review fixes) -------------------------------------------------
async def make_role(console: Console, name: str, *actions: str) -> None:
    body = {"name": name, "actions": ["session.read", *actions]}
    r = await console.api("POST", "/v1/roles", json=body)
    assert r.status_code == 201, r.text


async def test_the_cluster_page_shows_only_what_the_role_may_read(console: Console) -> None:
    """Nodes need ``cluster.read``; VMs ``vm.read`` (a user's own, without ``vm.all``);
    volumes ``volume.read``; templates ``vm.read``: as the API's inventory and ``list_vms``."""
    r = await console.c1.post("/v1/volumes", json={"name": "scratch", "size": 1 << 20})
    assert r.status_code == 201, r.text
    r = await console.c1.post("/v1/vms", json={"name": "mine", "image": "tiny", "start": False})
    assert r.status_code == 202, r.text
    with console.app.state.center.sessions.begin() as db:
        db.add(VMOwner(cluster="c1", vm="mine", user="nic"))
    await console.app.state.inventory.resync("c1")
    await make_role(console, "watcher", "cluster.read")
    await make_role(console, "owner", "cluster.read", "vm.read")
    await make_role(console, "storage", "cluster.read", "volume.read")

    async with user_browser(console, "wes", "watcher") as wes:
        page = await wes.get("/ui/clusters/c1")
        assert page.status_code == 200 and 'data-node="n1"' in page.text
        assert "data-vm=" not in page.text and "data-volume=" not in page.text
        assert "Templates" not in page.text
        for part in ("vms", "volumes"):
            r = await wes.get("/ui/clusters/c1", params={"part": part})
            assert r.status_code == 403 and "data-v" not in r.text, part
    async with user_browser(console, "nic", "owner") as nic:
        page = await nic.get("/ui/clusters/c1")
        assert 'data-vm="mine"' in page.text and 'data-vm="web"' not in page.text
        assert "data-volume=" not in page.text and "Templates" in page.text
        vms = await nic.get("/ui/clusters/c1", params={"part": "vms"})
        assert 'data-vm="mine"' in vms.text and 'data-vm="web"' not in vms.text
    async with user_browser(console, "sam", "storage") as sam:
        page = await sam.get("/ui/clusters/c1")
        assert 'data-volume="scratch"' in page.text and "data-vm=" not in page.text


async def test_a_vm_page_shows_disks_and_cluster_operations_only_to_roles_that_read_them(
    console: Console, root: httpx.AsyncClient
) -> None:
    assert "Cluster operations" in (await root.get("/ui/clusters/c1/vms/web")).text
    await make_role(console, "viewer", "vm.read", "vm.all", "task.read")
    async with user_browser(console, "vic", "viewer") as vic:
        page = await vic.get("/ui/clusters/c1/vms/web")
        assert page.status_code == 200 and "VM web" in page.text
        assert 'id="disks"' not in page.text and "Cluster operations" not in page.text
        assert (
            await vic.get("/ui/clusters/c1/vms/web", params={"part": "disks"})
        ).status_code == 403
        tasks = await vic.get("/ui/clusters/c1/vms/web", params={"part": "tasks"})
        assert tasks.status_code == 200 and "Cluster operations" not in tasks.text


# ---- live updates: one poller, keyed versions, each role its topics -------------------------
async def test_a_role_hears_only_of_the_topics_it_may_read(
    console: Console, root: httpx.AsyncClient
) -> None:
    async with user_browser(console, "eve", "AUDITOR") as eve:
        page = (await eve.get("/ui/audit")).text
        m = re.search(r'data-since="([^"]*)"', page)
        assert m is not None
        since = live.decode(m.group(1))
        assert set(since) == {"audit"}
        who = await caller_of(console, eve)
        stream = live.changes(request_of(console), eve.cookies["aoc_session"], who, since)
        try:
            assert (await anext(stream)).startswith("retry:")
            form = {"name": "db", "image": "tiny", "memory_mib": "128"}
            await root.post("/ui/clusters/c1/vms", data=form, headers=SAME_SITE)  # tasks, audit
            event = await anext(stream)
            assert '"topics": ["audit"]' in event, event
            assert set(live.decode(event.split("\n")[0].removeprefix("id: "))) == {"audit"}
        finally:
            await stream.aclose()
    async with user_browser(console, "val", "VM_USER") as val:
        page = (await val.get("/ui/vms")).text
        m = re.search(r'data-since="([^"]*)"', page)
        assert m is not None and set(live.decode(m.group(1))) == {"inventory", "tasks"}


async def test_the_versions_are_keyed_digests_under_a_random_key_of_the_process(
    console: Console, root: httpx.AsyncClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    who = await caller_of(console, root)
    c = console.app.state.center
    with c.sessions() as db:
        first = live.versions(db, who, c.clock.wall())
        monkeypatch.setattr(live, "KEY", b"another key of 32 bytes, really")
        second = live.versions(db, who, c.clock.wall())
    assert set(first) == set(live.TOPICS) == set(second)
    assert all(first[t] != second[t] for t in first)  # nothing in them but the key's digest
    assert all(re.fullmatch("[0-9a-f]{16}", v) for v in first.values())


async def test_the_inventory_version_says_a_change_at_once_and_drifting_figures_by_step(
    console: Console, root: httpx.AsyncClient, clock: FakeClock
) -> None:
    """A node's heartbeat rewrites its copy every few seconds: its figures count in steps of
    ``AGE_STEP`` (and are never lost in one); a node's state, a VM, at once."""
    who = await caller_of(console, root)
    c = console.app.state.center

    def version() -> str:
        with c.sessions() as db:
            return live.versions(db, who, clock.wall())["inventory"]

    def rewrite(kind: str, name: str, **changes: Any) -> None:
        with c.sessions.begin() as db:
            row = db.get(InventoryObject, ("c1", kind, name))
            row.synced_at = clock.wall()
            for column, value in changes.items():
                setattr(row, column, value)

    assert clock.wall() % live.AGE_STEP < live.AGE_STEP - 3  # the steps below stay in one
    first = version()
    await clock.advance(1)
    rewrite("node", "n1")  # a heartbeat, within the step
    assert version() == first
    rewrite("node", "n1", state="unreachable")
    second = version()
    assert second != first
    await clock.advance(1)
    rewrite("vm", "web", state="running")
    third = version()
    assert third != second
    await clock.advance(live.AGE_STEP)  # no copy came for a step: the last one shows
    settled = version()
    assert settled != third
    await clock.advance(live.AGE_STEP)
    assert version() == settled


async def test_one_poller_reads_the_versions_for_every_stream_and_stops_with_the_last(
    console: Console, root: httpx.AsyncClient, clock: FakeClock, monkeypatch: pytest.MonkeyPatch
) -> None:
    reads: list[int] = []
    original = live.read

    def counted(*args: Any, **kw: Any) -> Any:
        reads.append(1)
        return original(*args, **kw)

    monkeypatch.setattr(live, "read", counted)
    who = await caller_of(console, root)
    token = root.cookies["aoc_session"]
    poller: live.Poller = console.app.state.live
    streams = [live.changes(request_of(console), token, who, {}) for _ in range(5)]
    try:
        for s in streams:
            assert (await anext(s)).startswith("retry:")
        events = await asyncio.gather(*(anext(s) for s in streams))
        assert all("event: change" in e for e in events)
        assert len(reads) == 1  # one read of the database for the five streams
        assert poller.running
        pending = [asyncio.ensure_future(anext(s)) for s in streams]
        await clock.until_sleeping()
        await clock.advance(live.POLL_EVERY)  # one more read, nothing changed: no event yet
        for _ in range(1000):  # until the poller has read and sleeps again
            if len(reads) >= 2 and clock.sleeping():
                break
            await asyncio.to_thread(lambda: None)  # a hop behind the poller's thread work
        assert len(reads) == 2 and not any(p.done() for p in pending)
        for p in pending:
            p.cancel()
        await asyncio.gather(*pending, return_exceptions=True)
    finally:
        for s in streams:
            await s.aclose()
    assert not poller.running  # the last stream gone: so is the poller


async def test_the_script_lets_go_of_its_stream_and_falls_back_to_a_slow_refresh(
    root: httpx.AsyncClient,
) -> None:
    """A browser opens 6 connections to a host: a page must not hold one once it is gone or
    hidden, and must still refresh (slowly) when its stream cannot be opened."""
    js = (await root.get("/ui/static/console.js")).text
    assert "pagehide" in js and "visibilitychange" in js and ".close()" in js
    assert "FALLBACK_EVERY" in js and "document.hidden" in js
    vm = (await root.get("/ui/clusters/c1/vms/web")).text
    assert 'data-every="5"' in vm and 'data-every="2"' not in vm  # the console log: 5 s


# ---- input that once made a 500 ---------------------------------------------------------------
async def test_numbers_out_of_range_are_refused_not_a_500(root: httpx.AsyncClient) -> None:
    r = await root.post("/ui/alerts/9223372036854775808/acknowledge", headers=SAME_SITE)
    assert r.status_code in (404, 422), r.status_code
    r = await root.post("/ui/alerts/0/acknowledge", headers=SAME_SITE)
    assert r.status_code in (404, 422), r.status_code
    for before in ("1e30", "9223372036854775808", "0"):
        r = await root.get("/ui/audit", params={"before": before})
        assert r.status_code == 422, (before, r.status_code)


@pytest.mark.parametrize(
    ("body", "media_type"),
    [
        (b"{not json", "application/json"),
        (b'{"snapshots": 1}', "application/json"),
        (b"3", "application/json"),
        (b"a page of text", "text/plain"),
    ],
)
async def test_a_cluster_answer_of_an_unexpected_shape_is_said_not_a_500(
    root: httpx.AsyncClient, monkeypatch: pytest.MonkeyPatch, body: bytes, media_type: str
) -> None:
    async def answer(cluster: str, path: str, request: Any) -> Response:
        return Response(body, media_type=media_type)

    monkeypatch.setattr(remote, "read_cluster", answer)
    page = await root.get("/ui/clusters/c1/vms/web")
    assert page.status_code == 200, page.text[-2000:]
    assert "unreadable" in page.text


async def test_snapshots_with_missing_or_odd_fields_are_shown_as_far_as_they_go(
    root: httpx.AsyncClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    odd = b'[{"name": "s1"}, {"name": "s2", "volumes": 5, "created_at": "soon"}, 3, null]'

    async def answer(cluster: str, path: str, request: Any) -> Response:
        if "snapshots" in path:
            return Response(odd, media_type="application/json")
        return Response(b'{"log": "not text"}', media_type="application/json")

    monkeypatch.setattr(remote, "read_cluster", answer)
    page = await root.get("/ui/clusters/c1/vms/web")
    assert page.status_code == 200, page.text[-2000:]
    assert "<td>s1</td>" in page.text and "<td>s2</td>" in page.text
    part = await root.get("/ui/clusters/c1/vms/web", params={"part": "console"})
    assert part.status_code == 200 and "unreadable" in part.text
