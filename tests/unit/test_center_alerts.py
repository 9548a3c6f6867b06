"""The center's alerts: the rule evaluation as a pure function (an alert opens once, is updated
while its cause lasts, resolves when it is gone, never twice at once; thresholds with a margin;
disabled rules; per-cluster settings over the organization's over the defaults), the loop over a
real database in virtual time, and the API (rules, overrides, notifiers, bad input)."""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import AsyncIterator, Callable, Iterable
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import httpx
import pytest
from sqlalchemy import func, select
from sqlalchemy.orm import Session as DB
from sqlalchemy.orm import sessionmaker

from aecp.center import alerts as al
from aecp.center.alerts import (
    Alerting,
    AlertSettings,
    Finding,
    Key,
    Level,
    Open,
    OpenAlert,
    Resolve,
    RuleBook,
    Setting,
    Update,
    evaluate,
)
from aecp.center.db.models import (
    Alert,
    Cluster,
    ClusterSync,
    Datacenter,
    InventoryObject,
    Notification,
    Task,
)
from aecp.center.main import bootstrap
from aecp.center.notify import MemoryChannel, Outbox
from aecp.center.settings import CenterSettings
from aecp.common.clock import FakeClock

# ---- the evaluation, pure ---------------------------------------------------------------------


class Sim:
    """Applies decisions to a set of open alerts, as the store does, to run many passes."""

    def __init__(self, book: RuleBook | None = None) -> None:
        self.book = book or RuleBook()
        self.open: dict[Key, OpenAlert] = {}
        self.opened: list[Key] = []
        self.resolved: list[tuple[Key, str]] = []
        self.settled: set[Key] = set()
        self.next_id = 1

    def run(self, findings: Iterable[Finding]) -> list[al.Decision]:
        decisions = evaluate(findings, self.open.values(), self.book, frozenset(self.settled))
        for d in decisions:
            if isinstance(d, Open):
                assert d.key not in self.open, "a second open alert for one cause"
                self.open[d.key] = OpenAlert(self.next_id, d.key, d.level, d.value, d.cause)
                self.opened.append(d.key)
                self.next_id += 1
            elif isinstance(d, Update):
                self.open[d.key] = OpenAlert(d.id, d.key, d.level, d.value, d.cause)
            else:
                del self.open[d.key]
                self.resolved.append((d.key, d.why))
                if al.RULES[d.key.rule].one_shot:
                    self.settled.add(d.key)
        return decisions


def vm(name: str, state: str, cluster: str = "c1", message: str = "") -> list[Finding]:
    return al.vm_findings(cluster, name, {"state": state, "message": message, "node": "n1"})


def disk(pct: float | None, name: str = "n1", cluster: str = "c1") -> Finding:
    return Finding("node_storage_use", cluster, "node", name, pct)


def test_a_cause_opens_one_alert_however_many_passes_see_it() -> None:
    sim = Sim()
    first = sim.run(vm("web", "error", message="QEMU exited with status 1"))
    assert [type(d) for d in first] == [Open]
    opened = first[0]
    assert isinstance(opened, Open)
    assert opened.level is Level.CRITICAL
    assert opened.cause == "VM web of cluster c1 failed: QEMU exited with status 1"
    assert opened.impact and opened.action
    for _ in range(5):
        assert sim.run(vm("web", "error", message="QEMU exited with status 1")) == []
    assert sim.opened == [Key("vm_failed", "c1", "vm", "web")]


def test_an_open_alert_is_updated_while_its_cause_lasts_and_a_rising_level_is_marked() -> None:
    sim = Sim()
    assert [type(d) for d in sim.run([disk(82.0)])] == [Open]
    (moved,) = sim.run([disk(84.5)])
    assert isinstance(moved, Update) and moved.level is Level.NOTICE and not moved.escalated
    assert moved.value == 84.5 and "84.5% used" in moved.cause
    (rose,) = sim.run([disk(93.0)])
    assert isinstance(rose, Update) and rose.level is Level.CRITICAL and rose.escalated
    assert len(sim.opened) == 1


def test_an_alert_resolves_by_itself_when_its_cause_is_gone() -> None:
    sim = Sim()
    sim.run(vm("db", "unknown"))
    (gone,) = sim.run(vm("db", "running"))
    assert isinstance(gone, Resolve) and gone.why == "its cause is gone"
    assert sim.open == {}
    # the cause comes back: a new alert, not the old one reopened
    (again,) = sim.run(vm("db", "unknown"))
    assert isinstance(again, Open) and sim.next_id == 3


def test_a_threshold_alert_falls_back_only_a_margin_below_its_threshold() -> None:
    sim = Sim()
    assert sim.run([disk(79.9)]) == []  # below 80: nothing
    sim.run([disk(91.0)])
    assert sim.open[disk(0).key].level is Level.CRITICAL
    sim.run([disk(89.0)])  # under 90 but within the margin: still critical
    assert sim.open[disk(0).key].level is Level.CRITICAL
    sim.run([disk(87.9)])
    assert sim.open[disk(0).key].level is Level.NOTICE
    sim.run([disk(78.5)])  # within the margin of 80: stays open
    assert disk(0).key in sim.open
    (gone,) = sim.run([disk(77.9)])
    assert isinstance(gone, Resolve)


def test_a_value_that_cannot_be_read_keeps_the_open_alert_and_opens_none() -> None:
    sim = Sim()
    sim.run([disk(95.0), disk(96.0, "n2")])
    assert sim.run([disk(None), disk(None, "n2"), disk(None, "n3")]) == []
    assert len(sim.open) == 2


def test_a_disabled_rule_opens_nothing_and_resolves_its_open_alerts() -> None:
    sim = Sim()
    sim.run(vm("a", "unknown"))
    sim.book = RuleBook({"vm_unknown": Setting(enabled=False)})
    (gone,) = sim.run(vm("a", "unknown") + vm("b", "unknown"))
    assert isinstance(gone, Resolve) and gone.why == "its rule is disabled"
    assert sim.run(vm("a", "unknown") + vm("b", "unknown")) == []


def test_a_clusters_setting_wins_over_the_organizations_which_wins_over_the_default() -> None:
    book = RuleBook(
        {"node_storage_use": Setting(thresholds=((Level.NOTICE, 70.0), (Level.CRITICAL, 95.0)))},
        {
            ("c2", "node_storage_use"): Setting(thresholds=((Level.CRITICAL, 50.0),)),
            ("c3", "node_storage_use"): Setting(enabled=False),
            ("c3", "vm_failed"): Setting(level=Level.INFO),
        },
    )
    sim = Sim(book)
    decisions = sim.run(
        [
            disk(75.0, cluster="c1"),
            disk(75.0, cluster="c2"),
            disk(99.0, cluster="c3"),
            *vm("x", "error", "c1"),
            *vm("x", "error", "c3"),
        ]
    )
    levels = {(d.key.rule, d.key.cluster): d.level for d in decisions if isinstance(d, Open)}
    assert levels == {
        ("node_storage_use", "c1"): Level.NOTICE,  # the organization's 70
        ("node_storage_use", "c2"): Level.CRITICAL,  # c2's own 50
        ("vm_failed", "c1"): Level.CRITICAL,  # the default
        ("vm_failed", "c3"): Level.INFO,  # c3's own level; its storage rule is off
    }
    assert RuleBook().rule("node_storage_use").thresholds == (
        (Level.NOTICE, 80.0),
        (Level.CRITICAL, 90.0),
    )


def test_the_centers_own_rule_takes_no_cluster_setting() -> None:
    book = RuleBook(overrides={("", "aoc_disk_use"): Setting(enabled=False)})
    assert book.rule("aoc_disk_use", "").enabled
    sim = Sim(book)
    (opened,) = sim.run([Finding("aoc_disk_use", "", "center", "data", 91.0)])
    assert isinstance(opened, Open) and opened.level is Level.CRITICAL


def test_one_cause_seen_twice_in_a_pass_makes_one_alert_at_the_worse_level() -> None:
    sim = Sim()
    decisions = sim.run([disk(85.0), disk(95.0)])
    assert len(decisions) == 1 and isinstance(decisions[0], Open)
    assert decisions[0].level is Level.CRITICAL


def test_a_settled_one_shot_cause_never_opens_again() -> None:
    sim = Sim()
    failed = Finding("task_failed", "c1", "task", "t-1", detail="vm.start web: no capacity")
    (opened,) = sim.run([failed])
    assert isinstance(opened, Open) and opened.level is Level.NOTICE
    sim.run([])  # a later task on its target succeeded: the finding is gone
    assert sim.open == {} and sim.settled == {failed.key}
    assert sim.run([failed]) == []


def test_objects_are_read_into_findings_as_the_cluster_api_shows_them() -> None:
    cap = {"cpus": 4, "memory_mib": 1000, "disk_bytes": 2000}
    ready = {
        "state": "ready",
        "capacity": cap,
        "usage": {"memory_used_mib": 1950, "disk_used_bytes": 100},  # the host's own use
        "reserved_memory_mib": 950,  # what VMs hold of what the node offers
    }
    found = {(f.rule, f.value) for f in al.node_findings("c1", "n1", ready)}
    assert found == {("node_storage_use", 5.0), ("node_memory_use", 95.0)}
    lost = {f.rule for f in al.node_findings("c1", "n1", {"state": "unreachable", "capacity": cap})}
    assert lost == {"node_unreachable", "node_storage_use", "node_memory_use"}
    odd = al.node_findings("c1", "n1", {"state": "draining", "capacity": cap, "usage": None})
    assert odd[0].rule == "node_trouble" and odd[0].detail == "its state is draining"
    assert [f.rule for f in vm("v", "unknown")] == ["vm_unknown"]
    assert vm("v", "running") == vm("v", "stopped") == []
    degraded = {"health": "degraded", "extents": [{"healthy": False, "recovery": ""}]}
    copying = {"health": "degraded", "extents": [{"healthy": False, "recovery": "n2: 40%"}]}
    assert [f.rule for f in al.volume_findings("c1", "v", degraded)] == ["volume_degraded"]
    assert [f.rule for f in al.volume_findings("c1", "v", copying)] == ["volume_recovering"]
    assert al.volume_findings("c1", "v", {"health": "healthy"}) == []


# ---- the loop over a real database, in virtual time -------------------------------------------


class World:
    def __init__(
        self,
        sessions: sessionmaker[DB],
        clock: FakeClock,
        aoc: httpx.AsyncClient,
        token: str,
        loop: Alerting,
        channel: MemoryChannel,
        disk: dict[str, float],
    ) -> None:
        self.sessions, self.clock, self.aoc, self.token = sessions, clock, aoc, token
        self.loop, self.channel, self.disk = loop, channel, disk

    async def call(self, method: str, path: str, **kw: Any) -> httpx.Response:
        auth = {"authorization": f"Bearer {self.token}"}
        return await self.aoc.request(method, path, headers=auth, **kw)

    def add_cluster(self, name: str, state: str = "ok", error: str = "") -> None:
        with self.sessions.begin() as db:
            if db.get(Datacenter, "dc1") is None:
                db.add(Datacenter(name="dc1", created_at=0.0))
                db.flush()
            db.add(
                Cluster(
                    name=name,
                    datacenter="dc1",
                    endpoint=f"http://{name}.invalid:8700",
                    cluster_id=f"id-{name}",
                    token_encrypted="-",
                    created_at=0.0,
                )
            )
            db.flush()
            db.add(
                ClusterSync(
                    cluster=name,
                    position="",
                    last_sync_at=self.clock.wall(),
                    state=state,
                    error=error,
                )
            )

    def put(self, cluster: str, kind: str, name: str, data: dict[str, Any]) -> None:
        with self.sessions.begin() as db:
            row = db.get(InventoryObject, (cluster, kind, name))
            if row is None:
                db.add(
                    InventoryObject(
                        cluster=cluster, kind=kind, name=name, data="", synced_at=self.clock.wall()
                    )
                )
                db.flush()
                row = db.get(InventoryObject, (cluster, kind, name))
            assert row is not None
            row.data = json.dumps(data)

    def sync_state(self, cluster: str, state: str, error: str = "") -> None:
        with self.sessions.begin() as db:
            sync = db.get(ClusterSync, cluster)
            assert sync is not None
            sync.state, sync.error = state, error
            if state == "ok":
                sync.last_sync_at = self.clock.wall()

    def task(self, ident: str, state: str, target: str, created_at: float) -> None:
        with self.sessions.begin() as db:
            db.add(
                Task(
                    id=ident,
                    kind="vm.start",
                    cluster="c1",
                    target=target,
                    user="root",
                    method="POST",
                    path=f"/v1/vms/{target}/start",
                    body="",
                    state=state,
                    error="no node fits it" if state == "failed" else "",
                    created_at=created_at,
                    finished_at=self.clock.wall(),
                )
            )

    def rows(self, q: Any) -> list[Any]:
        with self.sessions() as db:
            return list(db.scalars(q))


def node(state: str = "ready", disk: float = 10.0, memory: float = 10.0) -> dict[str, Any]:
    cap = {"cpus": 4, "memory_mib": 1000, "disk_bytes": 1000}
    usage = {"memory_used_mib": 2000, "disk_used_bytes": disk * 10}
    return {
        "state": state,
        "capacity": cap,
        "usage": usage if state == "ready" else None,
        "reserved_memory_mib": memory * 10,
    }


@pytest.fixture
async def world(tmp_path: Path, clock: FakeClock) -> AsyncIterator[World]:
    settings = CenterSettings(data_dir=tmp_path / "aoc")
    app, password = bootstrap(settings, clock)
    sessions = app.state.center.sessions
    channel = MemoryChannel()
    outbox = Outbox(sessions, app.state.registry.box, clock, {"webhook": channel})
    used = {"pct": 40.0}

    def usage(path: Path) -> SimpleNamespace:
        assert path == settings.data_dir
        return SimpleNamespace(total=100, used=used["pct"], free=100 - used["pct"])

    loop = Alerting(sessions, settings.data_dir, outbox, clock, AlertSettings(), usage)
    transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
    async with httpx.AsyncClient(transport=transport, base_url="http://aoc") as aoc:
        r = await aoc.post("/v1/login", json={"user": "root", "password": password})
        w = World(sessions, clock, aoc, r.json()["token"], loop, channel, used)
        body = {"name": "ops", "kind": "webhook", "url": "http://hooks.invalid/aecp"}
        assert (await w.call("POST", "/v1/notifiers", json=body)).status_code == 201
        yield w
        await loop.close()


def events(w: World) -> list[tuple[str, str, str]]:
    """(event, rule, object name) of every message sent, in order."""
    out = []
    for _, m in w.channel.sent:
        a = m.payload["alert"]
        out.append((m.payload["event"], a["rule"], a["object"]["name"]))
    return out


async def test_the_loop_opens_updates_and_resolves_alerts_and_notifies_open_and_resolve(
    world: World,
) -> None:
    w = world
    w.add_cluster("c1")
    w.put("c1", "node", "n1", node(disk=85.0))
    w.put("c1", "vm", "web", {"state": "running", "message": ""})
    said = await w.loop.pass_once()
    assert said == ["the disk of node n1 of cluster c1 is 85.0% used (notice): an alert opens"]
    opened_at = w.clock.wall()
    await w.clock.advance(10)
    assert await w.loop.pass_once() == []  # nothing changed: nothing written
    w.put("c1", "node", "n1", node(disk=95.0))
    await w.clock.advance(10)
    await w.loop.pass_once()
    await w.clock.advance(30)
    w.put("c1", "node", "n1", node(disk=20.0))
    await w.loop.pass_once()
    listed = (await w.call("GET", "/v1/alerts")).json()
    assert len(listed) == 1
    a = listed[0]
    assert (a["rule"], a["state"], a["level"], a["value"]) == (
        "node_storage_use",
        "resolved",
        "critical",
        95.0,
    )
    assert a["object"] == {"kind": "node", "name": "n1"} and a["cluster"] == "c1"
    assert a["opened_at"] == opened_at and a["resolved_at"] == opened_at + 50
    assert a["duration_s"] == 50 and a["resolution"] == "its cause is gone"
    assert a["impact"] and a["action"]
    assert events(w) == [
        ("opened", "node_storage_use", "n1"),
        ("escalated", "node_storage_use", "n1"),
        ("resolved", "node_storage_use", "n1"),
    ]


async def test_no_second_alert_opens_for_a_cause_even_if_the_database_is_asked_to(
    world: World,
) -> None:
    w = world
    w.add_cluster("c1")
    w.put("c1", "vm", "web", {"state": "unknown", "message": "node n1 is unreachable"})
    await w.loop.pass_once()
    key = Key("vm_unknown", "c1", "vm", "web")
    again = Open(key, Level.NOTICE, None, "a duplicate", "", "")
    with pytest.raises(Exception, match="UNIQUE"), w.sessions.begin() as db:
        al.apply(db, [again], w.clock.wall())
    assert len(w.rows(select(Alert))) == 1


async def test_a_cluster_that_stops_answering_alerts_only_after_the_grace(world: World) -> None:
    w = world
    w.add_cluster("c1")
    w.sync_state("c1", "unreachable", "ConnectError: connection refused")
    await w.clock.advance(59)
    assert await w.loop.pass_once() == []
    await w.clock.advance(1)
    (said,) = await w.loop.pass_once()
    assert said.startswith("cluster c1 does not answer the center: ConnectError")
    w.sync_state("c1", "ok")
    await w.loop.pass_once()
    (a,) = (await w.call("GET", "/v1/alerts", params={"cluster": "c1"})).json()
    assert a["rule"] == "cluster_unreachable" and a["level"] == "critical"
    assert a["state"] == "resolved"


async def test_a_failed_task_alerts_once_and_resolves_when_a_later_task_on_its_target_succeeds(
    world: World,
) -> None:
    w = world
    w.add_cluster("c1")
    now = w.clock.wall()
    w.task("t1", "failed", "web", now - 5)
    w.task("t0", "succeeded", "web", now - 50)  # earlier: does not settle it
    await w.loop.pass_once()
    await w.loop.pass_once()
    (a,) = w.rows(select(Alert))
    assert (a.rule, a.object_name, a.state) == ("task_failed", "t1", "open")
    assert a.cause == "task t1 of cluster c1 failed: vm.start web: no node fits it"
    w.task("t2", "succeeded", "web", now + 1)
    await w.loop.pass_once()
    await w.loop.pass_once()
    (a,) = w.rows(select(Alert))
    assert a.state == "resolved"


async def test_an_acknowledged_task_alert_stays_resolved_and_other_alerts_cannot_be(
    world: World,
) -> None:
    w = world
    w.add_cluster("c1")
    w.task("t1", "failed", "web", w.clock.wall())
    w.put("c1", "vm", "db", {"state": "error", "message": "boom"})
    await w.loop.pass_once()
    by_rule = {a["rule"]: a["id"] for a in (await w.call("GET", "/v1/alerts")).json()}
    r = await w.call("POST", f"/v1/alerts/{by_rule['vm_failed']}/acknowledge")
    assert r.status_code == 409, r.text
    r = await w.call("POST", f"/v1/alerts/{by_rule['task_failed']}/acknowledge")
    assert r.status_code == 200 and r.json()["resolution"] == "acknowledged by root", r.text
    for _ in range(3):
        await w.loop.pass_once()
    states = {a.rule: a.state for a in w.rows(select(Alert))}
    assert states == {"task_failed": "resolved", "vm_failed": "open"}
    again = await w.call("POST", f"/v1/alerts/{by_rule['task_failed']}/acknowledge")
    assert again.status_code == 409
    audit = (await w.call("GET", "/v1/audit", params={"action": "alert.acknowledge"})).json()
    assert [x["result"].split(":")[0] for x in audit] == ["invalid_state", "ok", "invalid_state"]


async def test_the_centers_disk_alerts_over_its_thresholds(world: World) -> None:
    w = world
    w.disk["pct"] = 91.0
    await w.loop.pass_once()
    (a,) = (await w.call("GET", "/v1/alerts", params={"state": "open"})).json()
    assert (a["rule"], a["cluster"], a["level"]) == ("aoc_disk_use", "", "critical")


async def test_a_pass_that_fails_is_logged_and_the_next_one_works(
    world: World, caplog: pytest.LogCaptureFixture
) -> None:
    w = world
    w.add_cluster("c1")
    w.put("c1", "vm", "web", {"state": "error", "message": "boom"})
    real = al.open_alerts

    def broken(db: DB) -> list[OpenAlert]:
        raise RuntimeError("the database fell over")

    al.open_alerts = broken  # type: ignore[assignment]
    try:
        with caplog.at_level(logging.ERROR, logger="aecp.center.alerts"):
            assert await w.loop.pass_once() == []
        assert "this evaluation failed" in caplog.text
    finally:
        al.open_alerts = real
    assert len(await w.loop.pass_once()) == 1


async def test_the_loop_runs_on_its_clock_until_closed(world: World) -> None:
    w = world
    w.add_cluster("c1")
    w.put("c1", "vm", "web", {"state": "error", "message": "boom"})
    w.loop.start()
    await until(lambda: w.clock.sleeping() == 1)
    assert len(w.rows(select(Alert))) == 1
    w.put("c1", "vm", "web", {"state": "running", "message": ""})
    await w.clock.advance(AlertSettings().every_s)
    await until(lambda: len(w.channel.sent) == 2)  # the resolution, written and sent
    await w.loop.close()
    assert w.rows(select(Alert))[0].state == "resolved"
    assert events(w) == [("opened", "vm_failed", "web"), ("resolved", "vm_failed", "web")]


async def until(check: Callable[[], bool], within: float = 10.0) -> None:
    deadline = time.monotonic() + within
    while not check():
        assert time.monotonic() < deadline, "the condition did not come true in time"
        await asyncio.sleep(0.01)


# ---- the API ----------------------------------------------------------------------------------


async def test_alerts_are_listed_newest_first_filtered_and_paged(world: World) -> None:
    w = world
    w.add_cluster("c1")
    w.add_cluster("c2")
    w.put("c1", "vm", "a", {"state": "error", "message": "x"})
    await w.loop.pass_once()
    await w.clock.advance(1)
    w.put("c2", "vm", "b", {"state": "unknown", "message": "y"})
    await w.loop.pass_once()
    names = [a["object"]["name"] for a in (await w.call("GET", "/v1/alerts")).json()]
    assert names == ["b", "a"]
    crit = (await w.call("GET", "/v1/alerts", params={"level": "critical"})).json()
    assert [a["object"]["name"] for a in crit] == ["a"]
    c2 = (await w.call("GET", "/v1/alerts", params={"cluster": "c2", "state": "open"})).json()
    assert [a["object"]["name"] for a in c2] == ["b"]
    page = (await w.call("GET", "/v1/alerts", params={"limit": 1, "offset": 1})).json()
    assert [a["object"]["name"] for a in page] == ["a"]
    one = await w.call("GET", f"/v1/alerts/{crit[0]['id']}")
    assert one.status_code == 200 and one.json()["id"] == crit[0]["id"]
    assert (await w.call("GET", "/v1/alerts/999")).status_code == 404
    bad = await w.call("GET", "/v1/alerts", params={"state": "closed"})
    assert bad.status_code == 422 and bad.json()["field"] == "state"


async def test_rules_are_set_for_the_organization_and_per_cluster(world: World) -> None:
    w = world
    w.add_cluster("c1")
    rules = {r["name"]: r for r in (await w.call("GET", "/v1/alert-rules")).json()}
    assert set(rules) == set(al.RULES)
    assert rules["node_memory_use"]["thresholds"] == {"notice": 80.0, "critical": 90.0}
    assert rules["vm_unknown"]["level"] == "notice" and rules["vm_unknown"]["enabled"]
    r = await w.call("PATCH", "/v1/alert-rules/vm_unknown", json={"level": "critical"})
    assert r.status_code == 200 and r.json()["level"] == "critical", r.text
    r = await w.call("PUT", "/v1/clusters/c1/alert-rules/vm_unknown", json={"enabled": False})
    assert r.status_code == 200, r.text
    assert r.json()["enabled"] is False and r.json()["level"] == "critical"
    assert r.json()["overrides"] == [
        {"cluster": "c1", "enabled": False, "level": None, "thresholds": None}
    ]
    w.put("c1", "vm", "v", {"state": "unknown", "message": ""})
    assert await w.loop.pass_once() == []  # off in c1
    r = await w.call("DELETE", "/v1/clusters/c1/alert-rules/vm_unknown")
    assert r.status_code == 204, r.text
    (said,) = await w.loop.pass_once()
    assert "(critical)" in said  # the organization's level
    r = await w.call("PATCH", "/v1/alert-rules/vm_unknown", json={"level": None})
    assert r.json()["level"] == "notice"  # back to the default
    r = await w.call(
        "PATCH", "/v1/alert-rules/node_storage_use", json={"thresholds": {"critical": 70}}
    )
    assert r.status_code == 200 and r.json()["thresholds"] == {"critical": 70.0}, r.text
    per_cluster = (await w.call("GET", "/v1/clusters/c1/alert-rules")).json()
    assert "aoc_disk_use" not in {x["name"] for x in per_cluster}


BAD_SETTINGS: list[tuple[str, str, Any, int, str | None]] = [
    ("PATCH", "/v1/alert-rules/vm_failed", {"thresholds": {"notice": 50}}, 422, "thresholds"),
    ("PATCH", "/v1/alert-rules/node_storage_use", {"level": "info"}, 422, "level"),
    (
        "PATCH",
        "/v1/alert-rules/node_storage_use",
        {"thresholds": {"notice": 90, "critical": 80}},
        422,
        "thresholds",
    ),
    (
        "PATCH",
        "/v1/alert-rules/node_storage_use",
        {"thresholds": {"notice": 120}},
        422,
        "thresholds.notice",
    ),
    ("PATCH", "/v1/alert-rules/nope", {"enabled": False}, 404, None),
    ("PUT", "/v1/clusters/c1/alert-rules/aoc_disk_use", {"enabled": False}, 422, "name"),
    ("PUT", "/v1/clusters/c9/alert-rules/vm_failed", {"enabled": False}, 404, None),
    ("DELETE", "/v1/clusters/c1/alert-rules/vm_failed", None, 404, None),
]


async def test_a_bad_rule_setting_is_refused_naming_the_field_and_changes_nothing(
    world: World,
) -> None:
    w = world
    w.add_cluster("c1")
    before = (await w.call("GET", "/v1/alert-rules")).json()
    for method, path, body, status, field in BAD_SETTINGS:
        kw = {"json": body} if body is not None else {}
        r = await w.call(method, path, **kw)
        assert r.status_code == status, (path, body, r.text)
        if field is not None:
            assert r.json()["field"] == field, (path, body, r.text)
    assert (await w.call("GET", "/v1/alert-rules")).json() == before


async def test_a_webhook_url_that_is_not_http_is_refused_naming_it_and_nothing_is_stored(
    world: World,
) -> None:
    w = world
    before = (await w.call("GET", "/v1/notifiers")).json()
    refused = ("ftp://hooks.invalid/x", "hooks.invalid/x", "http://", "file:///etc/passwd")
    for url in (*refused, "http://hooks.invalid:99999/x", "http://[::1/x"):
        body = {"name": "bad", "kind": "webhook", "url": url}
        r = await w.call("POST", "/v1/notifiers", json=body)
        assert r.status_code == 422 and r.json()["field"] == "url", r.text
    assert (await w.call("GET", "/v1/notifiers")).json() == before
    audit = (await w.call("GET", "/v1/audit", params={"action": "notifier.create"})).json()
    assert [a["result"].split(":")[0] for a in audit][:6] == ["invalid_input"] * 6


async def test_an_smtp_notifiers_password_is_never_shown_nor_audited(world: World) -> None:
    w = world
    secret = "Sm7p-Secret-Word"
    body = {
        "name": "mail",
        "kind": "smtp",
        "host": "mail.invalid",
        "port": 587,
        "sender": "aoc@example.com",
        "recipients": ["ops@example.com"],
        "starttls": True,
        "user": "aoc",
        "password": secret,
    }
    r = await w.call("POST", "/v1/notifiers", json=body)
    assert r.status_code == 201, r.text
    shown = r.json()
    assert shown["password_set"] is True and "password" not in shown
    assert (shown["host"], shown["port"], shown["recipients"]) == (
        "mail.invalid",
        587,
        ["ops@example.com"],
    )
    everything = json.dumps(
        [(await w.call("GET", p)).json() for p in ("/v1/notifiers", "/v1/audit")]
    )
    assert secret not in everything
    with w.sessions() as db:
        (row,) = [n for n in al.notify.notifiers(db) if n.name == "mail"]
        assert secret not in row.config + row.secret_encrypted
    bad = dict(body, name="mail2", recipients=["not an address"])
    r = await w.call("POST", "/v1/notifiers", json=bad)
    assert r.status_code == 422 and r.json()["field"] == "recipients"
    dup = await w.call("POST", "/v1/notifiers", json=body)
    assert dup.status_code == 409
    gone = await w.call("DELETE", f"/v1/notifiers/{shown['id']}")
    assert gone.status_code == 204
    assert (await w.call("DELETE", f"/v1/notifiers/{shown['id']}")).status_code == 404


async def test_a_notifiers_messages_wait_in_the_outbox_and_are_retried_with_backoff(
    world: World,
) -> None:
    w = world
    w.channel.fail_first = 2
    w.disk["pct"] = 85.0
    await w.loop.pass_once()  # opens; the first attempt fails
    (msg,) = w.rows(select(Notification))
    assert (msg.state, msg.attempts, msg.next_at) == ("pending", 1, w.clock.wall() + 5)
    await w.clock.advance(4)
    await w.loop.pass_once()  # not due yet
    assert w.rows(select(Notification))[0].attempts == 1
    await w.clock.advance(1)
    await w.loop.pass_once()  # the second attempt fails: 10 s now
    (msg,) = w.rows(select(Notification))
    assert (msg.attempts, msg.next_at) == (2, w.clock.wall() + 10)
    (shown,) = (await w.call("GET", "/v1/notifiers")).json()
    assert shown["pending"] == 1 and "attempt 2 refused" in shown["last_error"]
    await w.clock.advance(10)
    await w.loop.pass_once()
    (msg,) = w.rows(select(Notification))
    assert (msg.state, msg.attempts) == ("sent", 3)
    assert events(w) == [("opened", "aoc_disk_use", "data")]
    with w.sessions() as db:
        assert db.scalar(select(func.count()).select_from(Notification)) == 1


def test_backoff_doubles_from_five_seconds_up_to_ten_minutes() -> None:
    from aecp.center.notify import backoff

    assert [backoff(n) for n in (1, 2, 3, 4)] == [5.0, 10.0, 20.0, 40.0]
    assert backoff(20) == 600.0


class BrokenChannel(MemoryChannel):
    """A channel with a bug: every send raises something no channel should."""

    async def send(self, target: Any, message: Any) -> None:
        raise KeyError("a bug")


async def test_a_channel_that_breaks_fails_its_attempt_and_holds_up_no_other_notifier(
    world: World, caplog: pytest.LogCaptureFixture
) -> None:
    w = world
    r = await w.call(
        "POST", "/v1/notifiers", json={"name": "mail", "kind": "smtp", "host": "mail.invalid",
                                       "sender": "a@example.com", "recipients": ["b@example.com"]},
    )  # fmt: skip
    assert r.status_code == 201, r.text
    w.loop.outbox.channels["smtp"] = BrokenChannel()
    w.disk["pct"] = 95.0
    with caplog.at_level(logging.ERROR, logger="aecp.center.notify"):
        await w.loop.pass_once()
    assert "the smtp channel failed" in caplog.text
    states = {m.notifier: (m.state, m.last_error) for m in w.rows(select(Notification))}
    assert states == {1: ("sent", ""), r.json()["id"]: ("pending", "internal error (KeyError)")}
