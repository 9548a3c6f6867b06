"""The center's alerts: the rule evaluation as a pure function (an alert opens once, is updated
while its cause lasts, resolves when it is gone, never twice at once; thresholds with a margin;
disabled rules; per-cluster settings over the organization's over the defaults), the loop over a
real database in virtual time, and the API (rules, overrides, notifiers, bad input)."""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncIterator, Awaitable, Iterable
from pathlib import Path
from types import SimpleNamespace
from typing import Any, TypeVar

import httpx
import pytest
from sqlalchemy import func, select
from sqlalchemy.orm import Session as DB
from sqlalchemy.orm import sessionmaker

from aecp.center import alerts as al
from aecp.center import channels, notify
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
from aecp.center.ha import findings as ha_findings
from aecp.center.ha.model import HAStatus, RPOKind, RPOState
from aecp.center.main import bootstrap
from aecp.center.notify import DeliveryError, MemoryChannel, Message, Outbox, Target
from aecp.center.settings import CenterSettings
from aecp.common.clock import FakeClock

T = TypeVar("T")

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


def rpo(kind: RPOKind, behind_s: float | None = None) -> list[Finding]:
    """The HA trio's findings for an RPO (``center.ha.findings``)."""
    status = HAStatus(
        cluster_id="aoc-trio",
        leader="aoc-a",
        epoch=3,
        management_ip="10.231.0.200",
        ip_holders=["aoc-a"],
        rpo=RPOState(kind=kind, behind_s=behind_s),
        automatic_failover=True,
        members=[],
        as_of=1000.0,
    )
    return ha_findings.ha_findings(status)


def test_each_change_of_the_rpo_notifies_its_one_alert_and_a_moving_figure_does_not() -> None:
    sim = Sim()
    assert sim.run(rpo(RPOKind.IN_SYNC)) == []
    (opened,) = sim.run(rpo(RPOKind.DEGRADED, 12))
    assert isinstance(opened, Open) and opened.cause == (
        "AOC is unprotected: degraded: passive 12 s behind"
    )
    (later,) = sim.run(rpo(RPOKind.DEGRADED, 14))  # the same state, a new figure
    assert isinstance(later, Update) and later.event is None
    assert "14 s behind" in later.cause and "state changed" not in later.sentence()
    for kind in (RPOKind.NO_STANDBY, RPOKind.UNKNOWN, RPOKind.DEGRADED):
        (moved,) = sim.run(rpo(kind, 3))
        assert isinstance(moved, Update) and moved.changed and moved.event == "changed", kind
        assert not moved.escalated and "its state changed" in moved.sentence()
    (gone,) = sim.run(rpo(RPOKind.IN_SYNC))
    assert isinstance(gone, Resolve)
    assert sim.opened == [opened.key]  # one alert through every state


def test_a_finding_without_notify_change_updates_its_words_silently() -> None:
    sim = Sim()
    sim.run(vm("web", "error", message="QEMU exited with status 1"))
    (moved,) = sim.run(vm("web", "error", message="no node fits it"))
    assert isinstance(moved, Update) and not moved.changed and moved.event is None


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


class Receivers(MemoryChannel):
    """Webhooks by notifier name: a dead one refuses every message, a stuck one holds the
    message it is given until ``release`` is set (``entered`` says one is held)."""

    def __init__(self) -> None:
        super().__init__()
        self.dead: set[str] = set()
        self.stuck: set[str] = set()
        self.entered = asyncio.Event()
        self.release = asyncio.Event()
        self.cancelled = 0
        self.tried: list[tuple[str, str]] = []  # (notifier, event)

    async def send(self, target: Target, message: Message) -> None:
        self.tried.append((target.name, message.payload["event"]))
        if target.name in self.dead:
            raise DeliveryError("ConnectError")
        if target.name in self.stuck:
            self.entered.set()
            try:
                await self.release.wait()
            except asyncio.CancelledError:
                self.cancelled += 1
                raise
        await super().send(target, message)

    def to(self, name: str) -> list[str]:
        """The events sent to notifier ``name``, in order."""
        return [m.payload["event"] for t, m in self.sent if t.name == name]


class World:
    def __init__(
        self,
        app: Any,
        sessions: sessionmaker[DB],
        clock: FakeClock,
        aoc: httpx.AsyncClient,
        token: str,
        loop: Alerting,
        channel: Receivers,
        disk: dict[str, float],
    ) -> None:
        self.app, self.sessions, self.clock, self.aoc, self.token = app, sessions, clock, aoc, token
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
    channel = Receivers()
    outbox = Outbox(sessions, app.state.registry.box, clock, {"webhook": channel}, owner="aoc-1")
    app.state.outbox = outbox  # the one POST /v1/notifiers/{id}/test uses
    used = {"pct": 40.0}

    def usage(path: Path) -> SimpleNamespace:
        assert path == settings.data_dir
        return SimpleNamespace(total=100, used=used["pct"], free=100 - used["pct"])

    loop = Alerting(sessions, settings.data_dir, outbox, clock, AlertSettings(), usage)
    transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
    async with httpx.AsyncClient(transport=transport, base_url="http://aoc") as aoc:
        r = await aoc.post("/v1/login", json={"user": "root", "password": password})
        w = World(app, sessions, clock, aoc, r.json()["token"], loop, channel, used)
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


async def test_the_loop_notifies_each_change_of_the_rpo_once(world: World) -> None:
    w = world
    now = [rpo(RPOKind.IN_SYNC)]
    w.loop.external = lambda: now[0]
    w.loop.external_rules = ha_findings.HA_RULE_NAMES
    for kind, behind in (
        (RPOKind.DEGRADED, 12.0),
        (RPOKind.DEGRADED, 20.0),
        (RPOKind.NO_STANDBY, None),
        (RPOKind.NO_STANDBY, None),
        (RPOKind.UNKNOWN, None),
        (RPOKind.DEGRADED, 2.0),
        (RPOKind.IN_SYNC, None),
    ):
        now[0] = rpo(kind, behind)
        await w.clock.advance(10)
        await w.loop.pass_once()
    trio = ("aoc_unprotected", "aoc-trio")
    assert events(w) == [
        ("opened", *trio),
        ("changed", *trio),  # no standby
        ("changed", *trio),  # unknown
        ("changed", *trio),  # degraded again
        ("resolved", *trio),
    ]
    assert len(w.rows(select(Alert))) == 1  # one alert through it all
    changed = [m for _, m in w.channel.sent if m.payload["event"] == "changed"]
    assert changed[0].payload["alert"]["cause"] == "AOC is unprotected: no standby"
    assert changed[0].subject.startswith("[AECP critical] changed: AOC is unprotected")


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
    await bounded(w.loop.until_passes(1))
    assert len(w.rows(select(Alert))) == 1
    await bounded(w.channel.until(lambda: len(w.channel.sent) == 1))  # woken, not on a tick
    w.put("c1", "vm", "web", {"state": "running", "message": ""})
    await w.clock.advance(AlertSettings().every_s)
    await bounded(w.loop.until_passes(2))
    await bounded(w.channel.until(lambda: len(w.channel.sent) == 2))  # the resolution
    await w.loop.close()
    assert w.rows(select(Alert))[0].state == "resolved"
    assert events(w) == [("opened", "vm_failed", "web"), ("resolved", "vm_failed", "web")]


async def bounded(work: Awaitable[T]) -> T:
    """``work``, which the test expects to end: a hang fails the test instead of stalling it
    (the bound is a safety net, never what the test measures)."""
    return await asyncio.wait_for(work, timeout=60)


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


# ---- delivery apart from evaluation, deadlines, breakers, claims ------------------------------


def outbox_rows(w: World) -> list[Notification]:
    return w.rows(select(Notification).order_by(Notification.id))


async def add_notifier(w: World, name: str, **fields: Any) -> int:
    body = {"name": name, "kind": "webhook", "url": f"http://{name}.invalid/h", **fields}
    r = await w.call("POST", "/v1/notifiers", json=body)
    assert r.status_code == 201, r.text
    return int(r.json()["id"])


async def test_a_receiver_that_never_answers_holds_up_no_evaluation_and_is_cut_at_its_deadline(
    world: World,
) -> None:
    w = world
    w.channel.stuck.add("ops")
    w.disk["pct"] = 95.0
    w.loop.start()
    await bounded(w.channel.entered.wait())  # the opening is being sent, and never answered
    w.disk["pct"] = 40.0
    await w.clock.advance(AlertSettings().every_s)
    await bounded(w.loop.until_passes(2))  # the next evaluation ran all the same
    (a,) = w.rows(select(Alert))
    assert a.state == "resolved"
    await w.clock.advance(notify.SEND_DEADLINE)  # the send's deadline, on the center's clock
    await bounded(w.loop.outbox.settle())
    assert w.channel.cancelled == 1
    opened, resolved = outbox_rows(w)
    assert (opened.state, opened.attempts) == ("pending", 1)
    assert opened.last_error == "TimeoutError: no answer within 30 s"
    assert opened.claimed_by == "" and resolved.attempts == 0  # the order holds
    await w.loop.close()


async def test_smtp_sends_run_in_the_channels_own_threads(monkeypatch: pytest.MonkeyPatch) -> None:
    import threading

    seen: list[str] = []

    def mail(*args: Any) -> None:
        seen.append(threading.current_thread().name)

    monkeypatch.setattr(channels, "_mail", mail)
    channel = notify.SmtpChannel()
    target = Target(1, "mail", "smtp", {})
    try:
        await channel.send(target, notify.message_of("test", TEST_ALERT))
    finally:
        await channel.aclose()
    assert len(seen) == 1 and seen[0].startswith("aecp-smtp"), seen


TEST_ALERT: dict[str, Any] = {
    "id": 1,
    "rule": "vm_failed",
    "level": "critical",
    "cluster": "c1",
    "object": {"kind": "vm", "name": "web"},
    "state": "open",
    "opened_at": 1.0,
    "updated_at": 1.0,
    "resolved_at": 0.0,
    "duration_s": 0.0,
    "value": None,
    "cause": "VM web of cluster c1 failed",
    "impact": "x",
    "action": "y",
    "resolution": "",
}


async def test_a_dead_notifiers_backlog_starves_no_other_notifier(world: World) -> None:
    w = world
    dead = await add_notifier(w, "dead")
    w.channel.dead.add("dead")
    with w.sessions.begin() as db:  # a long backlog, backed off, older than anything else
        for i in range(250):
            db.add(
                Notification(
                    notifier=dead,
                    alert=10_000 + i,
                    event="opened",
                    payload=json.dumps({"event": "opened", "alert": TEST_ALERT}),
                    state="pending",
                    attempts=3,
                    next_at=w.clock.wall() + 300,
                    last_error="ConnectError",
                    created_at=w.clock.wall(),
                )
            )
    w.disk["pct"] = 85.0
    await w.loop.pass_once()
    assert w.channel.to("ops") == ["opened"]
    assert w.channel.tried == [("ops", "opened")]  # the dead one is not due: not tried


async def test_a_failing_notifier_is_backed_off_as_a_whole_and_keeps_its_order(
    world: World,
) -> None:
    w = world
    await add_notifier(w, "dead")
    w.channel.dead.add("dead")
    w.add_cluster("c1")
    w.put("c1", "vm", "a", {"state": "error", "message": "x"})
    w.put("c1", "vm", "b", {"state": "error", "message": "y"})
    await w.loop.evaluate()  # two openings for each notifier, not sent yet
    first = next(m for m in outbox_rows(w) if m.notifier == 2)
    with w.sessions.begin() as db:  # its first message is at its last attempt
        row = db.get(Notification, first.id)
        assert row is not None
        row.attempts = notify.MAX_ATTEMPTS - 1
    await w.loop.outbox.deliver_due()
    given_up, second = [m for m in outbox_rows(w) if m.notifier == 2]
    assert (given_up.state, given_up.attempts) == ("failed", notify.MAX_ATTEMPTS)
    # the next message waits as the notifier does, not from scratch
    wait = notify.backoff(notify.MAX_ATTEMPTS)
    assert (second.state, second.attempts, second.next_at) == ("pending", 0, w.clock.wall() + wait)
    await w.clock.advance(5)
    w.put("c1", "vm", "c", {"state": "error", "message": "z"})
    await w.loop.pass_once()
    assert [t for t in w.channel.tried if t[0] == "dead"] == [("dead", "opened")]
    assert w.channel.to("ops") == ["opened"] * 3  # the others go on meanwhile
    w.channel.dead.clear()
    await w.clock.advance(wait)
    await w.loop.pass_once()
    assert w.channel.to("dead") == ["opened", "opened"]  # the rest, in order
    assert [m.state for m in outbox_rows(w) if m.notifier == 2] == ["failed", "sent", "sent"]


async def test_a_notifier_that_heard_of_an_opening_hears_of_the_resolution_below_its_level(
    world: World,
) -> None:
    w = world
    await add_notifier(w, "pager", min_level="critical")
    w.disk["pct"] = 95.0  # critical: the pager hears of it
    await w.loop.pass_once()
    w.disk["pct"] = 85.0  # falls back to notice: nothing to tell
    await w.loop.pass_once()
    w.disk["pct"] = 40.0  # resolved at notice
    await w.loop.pass_once()
    assert w.channel.to("pager") == ["opened", "resolved"]
    assert w.channel.to("ops") == ["opened", "resolved"]
    w.disk["pct"] = 85.0  # a notice alert: never the pager's, nor its resolution
    await w.loop.pass_once()
    w.disk["pct"] = 40.0
    await w.loop.pass_once()
    assert w.channel.to("pager") == ["opened", "resolved"]
    assert w.channel.to("ops") == ["opened", "resolved"] * 2


async def test_a_webhook_url_is_sealed_shown_cut_and_redacted_in_the_audit(world: World) -> None:
    w = world
    url = "https://aoc:Pw-9@hooks.example.com/services/T0/B0/XyZ-Secret?token=abc123"
    r = await w.call("POST", "/v1/notifiers", json={"name": "slack", "kind": "webhook", "url": url})
    assert r.status_code == 201, r.text
    assert r.json()["url"] == "https://hooks.example.com/…"
    shown = [(await w.call("GET", p)).json() for p in ("/v1/notifiers", "/v1/audit")]
    everything = json.dumps(shown)
    for secret in ("XyZ-Secret", "abc123", "Pw-9", "services"):
        assert secret not in everything
    (audited,) = [a for a in shown[1] if a["action"] == "notifier.create"][:1]
    params = json.loads(audited["params"])
    assert params["url"] == "https://[redacted]@hooks.example.com/[redacted]"
    with w.sessions() as db:
        (row,) = [n for n in al.notify.notifiers(db) if n.name == "slack"]
        assert "XyZ-Secret" not in row.config + row.secret_encrypted
    w.disk["pct"] = 85.0
    await w.loop.pass_once()
    (target,) = [t for t, _ in w.channel.sent if t.name == "slack"]
    assert target.url == url  # the channel gets the whole URL


async def test_a_webhook_url_an_older_center_stored_in_clear_is_sealed_at_start(
    world: World, tmp_path: Path
) -> None:
    w = world
    url = "https://hooks.example.com/T0/B0/old-token"
    with w.sessions.begin() as db:
        db.add(
            al.notify.Notifier(
                name="old",
                kind="webhook",
                min_level="info",
                config=json.dumps({"url": url}),
                secret_encrypted="",
                created_at=0.0,
            )
        )
    (shown,) = [n for n in (await w.call("GET", "/v1/notifiers")).json() if n["name"] == "old"]
    assert shown["url"] == "https://hooks.example.com/…"  # not sealed yet, shown cut already
    bootstrap(CenterSettings(data_dir=tmp_path / "aoc"), w.clock)  # the center starts again
    with w.sessions() as db:
        (row,) = [n for n in al.notify.notifiers(db) if n.name == "old"]
        assert "old-token" not in row.config and row.secret_encrypted
        assert al.notify.target_of(row, w.app.state.registry.box).url == url


def test_the_audit_cuts_a_urls_path_and_query_and_keeps_a_bare_endpoint() -> None:
    from aecp.center.audit import redact

    assert redact({"endpoint": "http://10.0.0.1:8700", "name": "c1"}) == {
        "endpoint": "http://10.0.0.1:8700",
        "name": "c1",
    }
    assert redact({"url": "https://h.example.com/"}) == {"url": "https://h.example.com/"}
    assert redact({"webhook": "https://h.example.com/x?t=1", "other_url": "http://h/a"}) == {
        "webhook": "https://h.example.com/[redacted]",
        "other_url": "http://h/[redacted]",
    }
    assert redact({"endpoint": "https://u:p@h:8700"}) == {"endpoint": "https://[redacted]@h:8700"}
    assert redact({"url": "hooks.example.com/T0/token"}) == {"url": "[redacted]"}


async def test_an_smtp_login_without_starttls_is_refused_naming_starttls(world: World) -> None:
    w = world
    body = {
        "name": "mail",
        "kind": "smtp",
        "host": "mail.invalid",
        "sender": "aoc@example.com",
        "recipients": ["ops@example.com"],
        "user": "aoc",
        "password": "Sm7p-Secret-Word",
    }
    for extra in ({}, {"password": ""}, {"starttls": False}):
        r = await w.call("POST", "/v1/notifiers", json=dict(body, **extra))
        assert r.status_code == 422 and r.json()["field"] == "starttls", r.text
    r = await w.call("POST", "/v1/notifiers", json=dict(body, starttls=True))
    assert r.status_code == 201, r.text


PRIVATE_URLS = (
    "http://127.0.0.1:9000/h",
    "http://127.1/h",
    "http://2130706433/h",
    "http://localhost/h",
    "http://LocalHost./h",
    "http://api.localhost/h",
    "http://[::1]/h",
    "http://[::ffff:127.0.0.1]/h",
    "http://0.0.0.0/h",
    "http://169.254.169.254/latest/meta-data",
    "http://[fe80::1%25eth0]/h",
    "http://[fd00:ec2::254]/h",
)


async def test_a_webhook_on_a_loopback_or_link_local_address_is_refused_unless_allowed(
    world: World,
) -> None:
    w = world
    before = (await w.call("GET", "/v1/notifiers")).json()
    for i, url in enumerate(PRIVATE_URLS):
        r = await w.call(
            "POST", "/v1/notifiers", json={"name": f"p{i}", "kind": "webhook", "url": url}
        )
        assert r.status_code == 422 and r.json()["field"] == "url", (url, r.text)
    assert (await w.call("GET", "/v1/notifiers")).json() == before
    for url in ("http://10.1.2.3/h", "https://hooks.example.com/h", "http://[fd00::1]/h"):
        assert not notify.private_host(notify.urlsplit(url).hostname or ""), url
    w.app.state.alert_settings = AlertSettings(allow_private_webhooks=True)
    r = await w.call(
        "POST", "/v1/notifiers", json={"name": "lab", "kind": "webhook", "url": PRIVATE_URLS[0]}
    )
    assert r.status_code == 201, r.text


async def test_a_webhook_name_that_resolves_to_loopback_is_refused_at_send(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import socket

    async def resolve(host: str, port: int, **kw: Any) -> list[Any]:
        assert host == "hooks.example.com"
        return [(socket.AF_INET, socket.SOCK_STREAM, 6, "", ("127.0.0.1", port))]

    monkeypatch.setattr(asyncio.get_running_loop(), "getaddrinfo", resolve)
    channel = notify.WebhookChannel()
    target = Target(1, "h", "webhook", {}, "https://hooks.example.com/x")
    with pytest.raises(DeliveryError, match="resolves to a loopback"):
        await channel.send(target, notify.message_of("test", TEST_ALERT))
    await channel.aclose()


async def test_old_sent_messages_and_old_resolved_alerts_are_deleted_in_batches(
    world: World, monkeypatch: pytest.MonkeyPatch
) -> None:
    w = world
    now, day = w.clock.wall(), 86400.0
    with w.sessions.begin() as db:
        alerts = []
        for state, at in [("resolved", 91), ("resolved", 92), ("resolved", 93), ("resolved", 89),
                          ("open", 100)]:  # fmt: skip
            a = Alert(
                rule="aoc_disk_use", level="critical", cluster="", object_kind="center",
                object_name="data", state=state,
                open_key=None if state == "resolved" else "aoc_disk_use||center|data",
                opened_at=now - at * day, updated_at=now - at * day,
                resolved_at=now - at * day if state == "resolved" else 0.0,
                value=None, cause="c", impact="i", action="a", resolution="",
            )  # fmt: skip
            db.add(a)
            db.flush()
            alerts.append(a.id)
        rows = [  # (alert, state, age in days)
            (alerts[3], "sent", 31),  # deleted
            (alerts[3], "failed", 40),  # deleted
            (alerts[3], "sent", 29),  # kept: recent
            (alerts[3], "pending", 31),  # kept: not sent yet
            (alerts[4], "sent", 31),  # kept: its alert is open (its resolution goes there)
        ]
        for alert, state, age in rows:
            db.add(
                Notification(
                    notifier=1, alert=alert, event="opened", payload="{}", state=state,
                    attempts=1, next_at=now + day, last_error="", created_at=now - age * day,
                )
            )  # fmt: skip
    w.disk["pct"] = 95.0  # the open alert stays open
    monkeypatch.setattr(al, "PRUNE_BATCH", 2)
    await w.loop.evaluate_pass()
    assert len(w.rows(select(Alert))) == 3  # two of the three old ones: a batch
    await w.loop.evaluate_pass()  # the batch was full: again at once
    assert sorted(a.id for a in w.rows(select(Alert))) == alerts[3:]
    kept = [(m.state, round((now - m.created_at) / day)) for m in outbox_rows(w)]
    assert kept == [("sent", 29), ("pending", 31), ("sent", 31)]
    assert 90 * day == al.KEEP_RESOLVED_S and 30 * day == notify.KEEP_SENT_S


async def test_a_webhook_channel_keeps_one_client_and_closes_it_with_the_loop(
    world: World,
) -> None:
    w = world
    made: list[httpx.AsyncClient] = []
    bodies: list[dict[str, Any]] = []

    def answer(request: httpx.Request) -> httpx.Response:
        bodies.append(json.loads(request.content))
        return httpx.Response(204)

    def client() -> httpx.AsyncClient:
        made.append(httpx.AsyncClient(transport=httpx.MockTransport(answer)))
        return made[-1]

    w.loop.outbox.channels["webhook"] = notify.WebhookChannel(client, allow_private=True)
    w.add_cluster("c1")
    for name in ("a", "b", "c"):
        w.put("c1", "vm", name, {"state": "error", "message": "x"})
    await w.loop.pass_once()
    assert len(bodies) == 3 and len(made) == 1
    await w.loop.close()
    assert made[0].is_closed


async def test_two_centers_on_one_database_send_a_message_once_and_in_order(
    world: World,
) -> None:
    w = world
    other = Receivers()
    second = Outbox(
        w.sessions, w.app.state.registry.box, w.clock, {"webhook": other}, owner="aoc-2"
    )
    w.channel.stuck.add("ops")
    w.add_cluster("c1")
    w.put("c1", "vm", "a", {"state": "error", "message": "x"})
    await w.loop.evaluate()
    w.put("c1", "vm", "b", {"state": "error", "message": "y"})
    await w.loop.evaluate()
    first = asyncio.create_task(w.loop.outbox.deliver_due())
    await bounded(w.channel.entered.wait())  # center 1 sends a's opening
    assert await second.deliver_due() == 0  # center 2 neither sends it nor b's before it
    assert other.tried == []
    w.channel.release.set()
    assert await bounded(first) == 2
    assert await second.deliver_due() == 0
    assert [m.state for m in outbox_rows(w)] == ["sent", "sent"]
    assert [m.payload["alert"]["object"]["name"] for _, m in w.channel.sent] == ["a", "b"]
    # a center that died holding a claim: the other sends once the claim has lapsed
    w.put("c1", "vm", "a", {"state": "running", "message": ""})
    await w.loop.evaluate()
    (resolved,) = [m for m in outbox_rows(w) if m.event == "resolved"]
    with w.sessions.begin() as db:
        row = db.get(Notification, resolved.id)
        assert row is not None
        row.claimed_by, row.claimed_until = "aoc-dead", w.clock.wall() + notify.CLAIM_S
    assert await second.deliver_due() == 0
    await w.clock.advance(notify.CLAIM_S)
    assert await second.deliver_due() == 1 and other.to("ops") == ["resolved"]
    await second.aclose()


async def test_a_pass_that_loses_a_race_to_open_an_alert_decides_again_and_keeps_the_rest(
    world: World, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    w = world
    w.add_cluster("c1")
    w.put("c1", "vm", "a", {"state": "error", "message": "x"})
    w.put("c1", "vm", "b", {"state": "error", "message": "y"})
    real = al.apply
    raced: list[bool] = []

    def apply(db: DB, decisions: Iterable[al.Decision], now: float) -> None:
        if not raced:  # another center's pass opens a's alert first
            raced.append(True)
            decided = [d for d in decisions if isinstance(d, Open) and d.key.name == "a"]
            with w.sessions.begin() as other:
                real(other, decided, now)
        real(db, decisions, now)

    monkeypatch.setattr(al, "apply", apply)
    with caplog.at_level(logging.INFO, logger="aecp.center.alerts"):
        said = await w.loop.pass_once()
    assert "this evaluation failed" not in caplog.text
    assert "deciding again" in caplog.text
    assert [s.split(":")[0] for s in said] == ["VM b of cluster c1 failed"]
    opened = sorted((a.object_name, a.state) for a in w.rows(select(Alert)))
    assert opened == [("a", "open"), ("b", "open")]
    assert sorted(events(w)) == [("opened", "vm_failed", "a"), ("opened", "vm_failed", "b")]
