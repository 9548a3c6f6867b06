"""The center in an HA trio, in process and in virtual time, over a fake Patroni and a fake HA
agent: the settings refuse what cannot work, naming the field; the leadership follows
Patroni's ``/primary`` and starts the background work on becoming the leader and stops it at
once on losing it (and starts it afresh next time), while a Patroni that gives no answer (slow,
restarting) keeps the last answer for a grace only; a passive center serves reads and answers
every change with 503 naming the active, and so does an active whose database refuses a write
as read-only or is being demoted (shut down, restarting, connection lost); ``/healthz`` says
the role; ``/v1/ha`` relays the agent's status (404 standalone,
503 without an agent); the console's header shows the last status read; and the active turns
the status into alerts that open once and resolve when their cause is gone."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import httpx
import psycopg.errors
import pytest
from fastapi import FastAPI
from pydantic import SecretStr, ValidationError
from sqlalchemy import select
from sqlalchemy.exc import IntegrityError, InternalError, OperationalError

from aecp.center.alerts import Alerting, AlertSettings
from aecp.center.db.models import Alert
from aecp.center.ha import findings
from aecp.center.ha.gate import Leadership, is_demotion_error, is_read_only_error
from aecp.center.ha.model import HAStatus, Member, Replication, Role, RPOKind, RPOState
from aecp.center.main import CenterLoops, bootstrap
from aecp.center.settings import CenterHA, CenterSettings
from aecp.common.clock import FakeClock

HA = CenterHA(
    patroni_url="http://10.232.0.1:8008",
    management_ip="10.231.0.200",
    status_url="http://10.232.0.1:8009/status",
    status_token="agent-secret",
)
ACTIVE = "http://10.231.0.200:8800"
AOC = "http://aoc"


def status(
    rpo: RPOState | None = None,
    automatic_failover: bool = True,
    note: str = "",
    unreachable: tuple[str, ...] = (),
) -> HAStatus:
    members = [
        Member(name="aoc-a", role=Role.ACTIVE, ha_ip="10.232.0.1", reachable=True, leader=True,
               replication=Replication.LEADER, timeline=3, holds_management_ip=True),
        Member(name="aoc-b", role=Role.PASSIVE, ha_ip="10.232.0.2", reachable=True,
               replication=Replication.IN_SYNC, lag_bytes=0, timeline=3,
               holds_management_ip=False),
        Member(name="aoc-w", role=Role.WITNESS, ha_ip="10.232.0.3", reachable=True),
    ]  # fmt: skip
    for m in members:
        if m.name in unreachable:
            m.reachable, m.holds_management_ip = False, None
    return HAStatus(
        cluster_id="aoc-trio",
        leader="aoc-a",
        epoch=3,
        management_ip="10.231.0.200",
        ip_holders=["aoc-a"],
        rpo=rpo or RPOState(kind=RPOKind.IN_SYNC),
        automatic_failover=automatic_failover,
        failover_note=note,
        members=members,
        as_of=1000.0,
    )


class FakeTrio:
    """The local Patroni (``/primary``) and HA agent (``/status``): what each answers is set
    by the test (a status code, a status, or an exception to raise)."""

    def __init__(self) -> None:
        self.primary: int | type[Exception] = 503
        self.status: HAStatus | int | type[Exception] = status()
        self.asked: list[str] = []

    def handle(self, request: httpx.Request) -> httpx.Response:
        self.asked.append(request.url.path)
        answer = self.primary if request.url.path == "/primary" else self.status
        if request.url.path == "/status" and request.headers.get("authorization") != (
            "Bearer agent-secret"
        ):
            answer = 401
        if isinstance(answer, type):
            raise answer("no answer", request=request)  # type: ignore[call-arg]
        if isinstance(answer, HAStatus):
            return httpx.Response(200, content=answer.model_dump_json())
        return httpx.Response(answer, json={"role": "replica"})

    def client(self) -> httpx.AsyncClient:
        return httpx.AsyncClient(transport=httpx.MockTransport(self.handle))


@dataclass
class FakeDuties:
    calls: list[str] = field(default_factory=list)
    fail_starts: int = 0

    async def start(self) -> None:
        self.calls.append("start")
        if self.fail_starts:
            self.fail_starts -= 1
            raise RuntimeError("the database went away")

    async def stop(self) -> None:
        self.calls.append("stop")


async def until(leadership: Leadership, check: Callable[[Leadership], bool]) -> None:
    await asyncio.wait_for(leadership.until(check), 5)  # a guard: virtual time decides


# ---- settings ---------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("changes", "field"),
    [
        ({"patroni_url": "10.232.0.1:8008"}, "patroni_url"),
        ({"patroni_url": "http://10.232.0.1:8008/primary"}, "patroni_url"),
        ({"status_url": "ftp://10.232.0.1/status"}, "status_url"),
        ({"management_ip": "10.231.0.200/24"}, "management_ip"),
        ({"management_ip": "aoc.example"}, "management_ip"),
        ({"poll_s": 0}, "poll_s"),
        ({"status_every_s": -1}, "status_every_s"),
        ({"leader_url": "http://x"}, "leader_url"),
    ],
)
def test_each_ha_setting_is_checked_and_a_refusal_names_it(
    changes: dict[str, Any], field: str
) -> None:
    with pytest.raises(ValidationError) as e:
        CenterHA.model_validate({**HA.model_dump(), **changes})
    assert e.value.errors()[0]["loc"] == (field,)


def test_ha_needs_postgresql_and_standalone_stays_as_it_was(tmp_path: Path) -> None:
    with pytest.raises(ValidationError, match="database_url: a center of an HA trio needs"):
        CenterSettings(data_dir=tmp_path, ha=HA)
    pg = "postgresql+psycopg://aecp:pw@10.232.0.1:5432/aecp"
    assert CenterSettings(data_dir=tmp_path, ha=HA, database_url=pg).ha == HA
    plain = CenterSettings(data_dir=tmp_path)
    assert plain.ha is None and plain.url == f"sqlite:///{tmp_path / 'center.db'}"
    assert HA.active_url(8800) == ACTIVE
    v6 = CenterHA.model_validate({**HA.model_dump(), "management_ip": "fd00::c8"})
    assert v6.active_url(8800) == "http://[fd00::c8]:8800"


# ---- leadership -------------------------------------------------------------------------------
async def test_the_duties_run_exactly_while_patroni_says_this_node_leads(clock: FakeClock) -> None:
    trio, duties = FakeTrio(), FakeDuties()
    leadership = Leadership(HA, duties, clock, trio.client(), 8800)
    running = asyncio.create_task(leadership.run())
    try:
        await until(leadership, lambda s: s.probes >= 1)
        assert not leadership.leader and duties.calls == []
        trio.primary = 200
        await clock.advance(HA.poll_s)
        await until(leadership, lambda s: s.probes >= 2)
        assert leadership.leader and leadership.role == "active" and duties.calls == ["start"]
        await clock.advance(HA.poll_s)
        await until(leadership, lambda s: s.probes >= 3)
        assert duties.calls == ["start"]  # still the leader: nothing started twice
        for answer in (503, httpx.ConnectTimeout, 500, 200):
            trio.primary = answer
            seen = leadership.probes
            await clock.advance(HA.poll_s)
            await until(leadership, lambda s, n=seen: s.probes > n)
            assert leadership.leader is (answer == 200), answer
        assert duties.calls == ["start", "stop", "start"]
    finally:
        running.cancel()
        await asyncio.gather(running, return_exceptions=True)
    assert duties.calls == ["start", "stop", "start", "stop"]  # stopped with the center
    assert not leadership.leader


async def test_work_that_fails_to_start_leaves_the_center_passive_until_a_later_probe(
    clock: FakeClock,
) -> None:
    trio, duties = FakeTrio(), FakeDuties(fail_starts=1)
    trio.primary = 200
    leadership = Leadership(HA, duties, clock, trio.client(), 8800)
    assert await leadership.probe() is True
    assert not leadership.leader and duties.calls == ["start", "stop"]
    await leadership.probe()
    assert leadership.leader and duties.calls == ["start", "stop", "start"]


async def test_the_status_is_read_every_few_seconds_and_dropped_when_the_agent_is_silent(
    clock: FakeClock,
) -> None:
    trio = FakeTrio()
    leadership = Leadership(HA, FakeDuties(), clock, trio.client(), 8800)
    running = asyncio.create_task(leadership.run())
    try:
        await until(leadership, lambda s: s.readings >= 1)
        assert leadership.status == status() and leadership.badge().rpo == "in sync"
        trio.status = 500
        await clock.advance(HA.poll_s)  # probes go on; no reading before status_every_s
        assert leadership.readings == 1
        await clock.advance(HA.status_every_s)
        await until(leadership, lambda s: s.readings >= 2)
        assert leadership.status is None
        assert "answered 500" in leadership.status_error
        assert leadership.badge().rpo == "status unknown"
        trio.status = status(RPOState(kind=RPOKind.DEGRADED, behind_s=12.2))
        await clock.advance(HA.status_every_s)
        await until(leadership, lambda s: s.readings >= 3)
        badge = leadership.badge()
        assert (badge.rpo, badge.active, badge.tone) == (
            "degraded: passive 12 s behind",
            "aoc-a",
            "bad",
        )
    finally:
        running.cancel()
        await asyncio.gather(running, return_exceptions=True)


async def probe_at(leadership: Leadership, trio: FakeTrio, clock: FakeClock, answer: Any) -> bool:
    """``answer`` from Patroni at the next poll, in virtual time; the leadership after it."""
    trio.primary = answer
    seen = leadership.probes
    await clock.advance(leadership.ha.poll_s)
    await until(leadership, lambda s: s.probes > seen)
    return leadership.leader


async def test_one_slow_probe_or_a_patroni_restart_keeps_the_leadership_and_the_work(
    clock: FakeClock,
) -> None:
    """A probe that times out, or a Patroni restarting (PostgreSQL runs on: nothing refused),
    is no answer: the center stays the active and its work is neither stopped nor restarted
    (which would re-run the tasks it was executing)."""
    trio, duties = FakeTrio(), FakeDuties()
    trio.primary = 200
    leadership = Leadership(HA, duties, clock, trio.client(), 8800)
    assert leadership.unknown_grace_s == 3 * HA.poll_s
    running = asyncio.create_task(leadership.run())
    try:
        await until(leadership, lambda s: s.probes >= 1 and s.leader)
        assert await probe_at(leadership, trio, clock, httpx.ReadTimeout)  # one slow probe
        assert await probe_at(leadership, trio, clock, 200)
        assert leadership.unknown_since is None
        for _ in range(2):  # Patroni restarting: refused connections for a second
            assert await probe_at(leadership, trio, clock, httpx.ConnectError)
        assert await probe_at(leadership, trio, clock, 200)
        assert duties.calls == ["start"]
    finally:
        running.cancel()
        await asyncio.gather(running, return_exceptions=True)


async def test_a_503_drops_the_leadership_at_once(clock: FakeClock) -> None:
    trio, duties = FakeTrio(), FakeDuties()
    trio.primary = 200
    leadership = Leadership(HA, duties, clock, trio.client(), 8800)
    running = asyncio.create_task(leadership.run())
    try:
        await until(leadership, lambda s: s.probes >= 1 and s.leader)
        assert await probe_at(leadership, trio, clock, httpx.ConnectTimeout)
        assert not await probe_at(leadership, trio, clock, 503)  # a definite no, within the grace
        assert duties.calls == ["start", "stop"]
    finally:
        running.cancel()
        await asyncio.gather(running, return_exceptions=True)


async def test_no_answer_for_longer_than_the_grace_drops_the_leadership(clock: FakeClock) -> None:
    trio, duties = FakeTrio(), FakeDuties()
    trio.primary = 200
    leadership = Leadership(HA, duties, clock, trio.client(), 8800, unknown_grace_s=2.0)
    running = asyncio.create_task(leadership.run())
    try:
        await until(leadership, lambda s: s.probes >= 1 and s.leader)
        first = clock.monotonic() + HA.poll_s  # the first probe without an answer
        kept = []
        while await probe_at(leadership, trio, clock, httpx.ConnectTimeout):
            kept.append(clock.monotonic() - first)
        assert kept == [0.0, 0.5, 1.0, 1.5]  # under the grace: still the active
        assert clock.monotonic() - first == 2.0 and duties.calls == ["start", "stop"]
        assert not await probe_at(leadership, trio, clock, httpx.ConnectTimeout)  # stays passive
        assert await probe_at(leadership, trio, clock, 200)  # back: a new term
        assert duties.calls == ["start", "stop", "start"]
    finally:
        running.cancel()
        await asyncio.gather(running, return_exceptions=True)


async def test_a_passive_without_answers_stays_passive(clock: FakeClock) -> None:
    trio, duties = FakeTrio(), FakeDuties()
    trio.primary = httpx.ConnectError
    leadership = Leadership(HA, duties, clock, trio.client(), 8800)
    assert await leadership.probe() is False and duties.calls == []


# ---- the gate ---------------------------------------------------------------------------------
@dataclass
class Center:
    app: FastAPI
    settings: CenterSettings
    trio: FakeTrio
    leadership: Leadership
    http: httpx.AsyncClient
    root: str  # root's session token


@pytest.fixture
async def center(tmp_path: Path, clock: FakeClock) -> AsyncIterator[Center]:
    """A center over SQLite with the HA gate of a trio on (the database itself is no
    standby: the fake Patroni decides who leads). It starts as the active."""
    settings = CenterSettings(data_dir=tmp_path / "aoc")
    app, password = bootstrap(settings, clock)
    trio = FakeTrio()
    loops = CenterLoops(app, settings)
    leadership = loops.leadership = app.state.leadership = Leadership(
        HA, loops, clock, trio.client(), settings.port
    )
    trio.primary = 200
    await leadership.probe()
    transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
    async with httpx.AsyncClient(transport=transport, base_url=AOC) as http:
        r = await http.post("/v1/login", json={"user": "root", "password": password})
        assert r.status_code == 200, r.text
        yield Center(app, settings, trio, leadership, http, r.json()["token"])
    await loops.stop()


def auth(token: str) -> dict[str, str]:
    return {"authorization": f"Bearer {token}"}


async def test_a_passive_center_serves_reads_and_refuses_changes_naming_the_active(
    center: Center,
) -> None:
    c = center
    assert (await c.http.get("/healthz")).json() == {"status": "ok", "ok": True, "role": "active"}
    c.trio.primary = 503
    await c.leadership.probe()
    assert (await c.http.get("/healthz")).json() == {"status": "ok", "ok": True, "role": "passive"}
    assert (await c.http.get("/v1/users", headers=auth(c.root))).status_code == 200
    assert (await c.http.head("/healthz")).status_code in (200, 405)
    body = {"name": "alice", "role": "ADMIN", "password": "Correct-Horse-9"}
    for method, path, kw in (
        ("POST", "/v1/users", {"json": body}),
        ("POST", "/v1/login", {"json": {"user": "root", "password": "x"}}),
        ("DELETE", "/v1/users/root", {}),
        ("PATCH", "/v1/users/root", {"json": {"disabled": True}}),
        ("POST", "/login", {"data": {"user": "root", "password": "x"}}),
    ):
        r = await c.http.request(method, path, headers=auth(c.root), **kw)
        assert r.status_code == 503, f"{method} {path}: {r.text}"
        assert r.json()["error"] == "unavailable"
        assert r.json()["active"] == ACTIVE
        assert f"the active answers at {ACTIVE}" in r.json()["message"]
    users = (await c.http.get("/v1/users", headers=auth(c.root))).json()
    assert [u["name"] for u in users] == ["root"]  # nothing got through
    c.trio.primary = 200
    await c.leadership.probe()
    r = await c.http.post("/v1/users", headers=auth(c.root), json=body)
    assert r.status_code == 201, r.text


async def test_a_write_a_read_only_database_refuses_is_503_and_other_db_errors_stay_500(
    center: Center, monkeypatch: pytest.MonkeyPatch
) -> None:
    c = center
    accounts = c.app.state.center.accounts
    refused = psycopg.errors.ReadOnlySqlTransaction(
        "cannot execute INSERT in a read-only transaction"
    )

    def demoted(*_: Any) -> None:
        raise InternalError("INSERT INTO users ...", {}, refused)

    monkeypatch.setattr(accounts, "create_user", demoted)
    body = {"name": "alice", "role": "ADMIN", "password": "Correct-Horse-9"}
    r = await c.http.post("/v1/users", headers=auth(c.root), json=body)
    assert r.status_code == 503, r.text
    assert r.json()["active"] == ACTIVE and r.json()["error"] == "unavailable"

    def broken(*_: Any) -> None:
        raise OperationalError("INSERT INTO users ...", {}, psycopg.errors.DiskFull("disk full"))

    monkeypatch.setattr(accounts, "create_user", broken)
    r = await c.http.post("/v1/users", headers=auth(c.root), json=body)
    assert r.status_code == 500 and r.json()["error"] == "internal", r.text
    assert is_read_only_error(refused) and not is_read_only_error(RuntimeError("x"))


def _shutdown() -> OperationalError:
    return OperationalError(
        "INSERT INTO users ...",
        {},
        psycopg.errors.AdminShutdown("terminating connection due to administrator command"),
    )


def _starting() -> OperationalError:
    return OperationalError(
        "INSERT INTO users ...", {}, psycopg.errors.CannotConnectNow("the database is starting up")
    )


def _lost() -> OperationalError:
    return OperationalError(
        "INSERT INTO users ...", {}, psycopg.OperationalError("server closed the connection")
    )


def _dropped() -> OperationalError:
    return OperationalError(
        "INSERT INTO users ...", {}, RuntimeError("gone"), connection_invalidated=True
    )


DEMOTION_ERRORS = [_shutdown, _starting, _lost, _dropped]


@pytest.mark.parametrize("make", DEMOTION_ERRORS)
async def test_a_write_that_meets_a_demotion_is_503_naming_the_active(
    center: Center, monkeypatch: pytest.MonkeyPatch, make: Callable[[], OperationalError]
) -> None:
    """A demotion shuts PostgreSQL down and starts it as a standby: a write in between meets
    57P01, 57P03 or a lost connection, never only 25006."""
    c = center

    def demoted(*_: Any) -> None:
        raise make()

    monkeypatch.setattr(c.app.state.center.accounts, "create_user", demoted)
    body = {"name": "alice", "role": "ADMIN", "password": "Correct-Horse-9"}
    r = await c.http.post("/v1/users", headers=auth(c.root), json=body)
    assert r.status_code == 503, r.text
    assert r.json()["active"] == ACTIVE and r.json()["error"] == "unavailable"
    assert is_demotion_error(make())


async def test_a_standalone_center_keeps_500_for_a_shut_down_database(
    tmp_path: Path, clock: FakeClock, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Without a trio no other center takes over: a shut-down database is an error."""
    app, password = bootstrap(CenterSettings(data_dir=tmp_path / "alone"), clock)

    def down(*_: Any) -> None:
        raise _shutdown()

    monkeypatch.setattr(app.state.center.accounts, "create_user", down)
    transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
    async with httpx.AsyncClient(transport=transport, base_url=AOC) as http:
        token = (await http.post("/v1/login", json={"user": "root", "password": password})).json()
        body = {"name": "alice", "role": "ADMIN", "password": "Correct-Horse-9"}
        r = await http.post("/v1/users", headers=auth(token["token"]), json=body)
        assert r.status_code == 500 and r.json()["error"] == "internal", r.text


def test_other_database_errors_are_no_demotion() -> None:
    full = OperationalError("INSERT ...", {}, psycopg.errors.DiskFull("disk full"))
    unique = IntegrityError("INSERT ...", {}, psycopg.errors.UniqueViolation("duplicate"))
    assert not is_demotion_error(full) and not is_demotion_error(unique)
    assert not is_demotion_error(RuntimeError("x"))
    assert is_demotion_error(
        InternalError("INSERT ...", {}, psycopg.errors.ReadOnlySqlTransaction("read-only"))
    )


async def test_v1_ha_relays_the_agents_status_and_says_why_when_it_cannot(
    center: Center, tmp_path: Path, clock: FakeClock
) -> None:
    c = center
    r = await c.http.get("/v1/ha", headers=auth(c.root))
    assert r.status_code == 200, r.text
    assert HAStatus.model_validate(r.json()) == status()
    c.trio.status = httpx.ConnectError
    r = await c.http.get("/v1/ha", headers=auth(c.root))
    assert r.status_code == 503 and "the local HA agent gives no status" in r.json()["message"]
    c.trio.status = 200  # not a status at all
    r = await c.http.get("/v1/ha", headers=auth(c.root))
    assert r.status_code == 503 and "not an HA status" in r.json()["message"]
    c.leadership.ha = HA.model_copy(update={"status_token": SecretStr("wrong")})
    r = await c.http.get("/v1/ha", headers=auth(c.root))
    assert r.status_code == 503 and "answered 401: is the agent secret right?" in r.text
    assert "wrong" not in repr(c.leadership.ha)
    assert (await c.http.get("/v1/ha")).status_code == 401
    standalone, password = bootstrap(CenterSettings(data_dir=tmp_path / "alone"), clock)
    transport = httpx.ASGITransport(app=standalone, raise_app_exceptions=False)
    async with httpx.AsyncClient(transport=transport, base_url=AOC) as http:
        token = (await http.post("/v1/login", json={"user": "root", "password": password})).json()
        r = await http.get("/v1/ha", headers=auth(token["token"]))
        assert r.status_code == 404 and "standalone" in r.json()["message"]
        assert (await http.get("/healthz")).json()["role"] == "standalone"


async def test_the_console_header_shows_the_last_status_read_and_nothing_standalone(
    center: Center, tmp_path: Path, clock: FakeClock
) -> None:
    c = center
    await c.leadership.read_status()
    page = await c.http.get("/ui/users", headers={"cookie": f"aoc_session={c.root}"})
    assert page.status_code == 200, page.text
    assert "HA: in sync · active: aoc-a" in page.text
    assert "read-only" not in page.text
    c.trio.status = status(RPOState(kind=RPOKind.NO_STANDBY))
    c.trio.primary = 503
    await c.leadership.read_status()
    await c.leadership.probe()
    asked = len(c.trio.asked)
    page = await c.http.get("/ui/users", headers={"cookie": f"aoc_session={c.root}"})
    assert "HA: no standby · active: aoc-a · this center is read-only" in page.text
    assert len(c.trio.asked) == asked  # the page asked nobody
    standalone, password = bootstrap(CenterSettings(data_dir=tmp_path / "alone"), clock)
    transport = httpx.ASGITransport(app=standalone, raise_app_exceptions=False)
    async with httpx.AsyncClient(transport=transport, base_url=AOC) as http:
        token = (await http.post("/v1/login", json={"user": "root", "password": password})).json()
        page = await http.get("/ui/users", headers={"cookie": f"aoc_session={token['token']}"})
        assert page.status_code == 200 and "HA:" not in page.text


async def test_each_term_of_leadership_starts_the_work_afresh(center: Center) -> None:
    c = center
    loops = c.leadership.duties
    assert isinstance(loops, CenterLoops) and loops.running
    first = c.app.state.runner
    assert c.app.state.syncer is not None
    c.trio.primary = 503
    await c.leadership.probe()
    assert not loops.running and c.app.state.syncer is None
    c.trio.primary = 200
    await c.leadership.probe()
    assert loops.running and loops.terms == 2
    assert c.app.state.runner is not first  # the old one would skip the tasks it started


# ---- alerts -----------------------------------------------------------------------------------
async def test_the_trios_troubles_open_alerts_once_and_resolve_when_gone(
    tmp_path: Path, clock: FakeClock
) -> None:
    settings = CenterSettings(data_dir=tmp_path / "aoc")
    app, _ = bootstrap(settings, clock)
    sessions = app.state.center.sessions
    now: list[HAStatus | None] = [status()]

    def usage(path: Path) -> SimpleNamespace:
        return SimpleNamespace(total=100, used=10, free=90)

    loop = Alerting(sessions, settings.data_dir, app.state.outbox, clock, AlertSettings(), usage)
    loop.external = findings.source(lambda: now[0])
    loop.external_rules = findings.HA_RULE_NAMES

    def open_alerts() -> dict[tuple[str, str], tuple[str, str]]:
        with sessions() as db:
            rows = db.scalars(select(Alert).where(Alert.state == "open"))
            return {(a.rule, a.object_name): (a.level, a.cause) for a in rows}

    try:
        assert await loop.pass_once() == [] and open_alerts() == {}
        now[0] = status(
            RPOState(kind=RPOKind.NO_STANDBY),
            automatic_failover=False,
            note="the witness is lost: one more loss stops the center",
            unreachable=("aoc-b", "aoc-w"),
        )
        assert len(await loop.pass_once()) == 4
        assert open_alerts() == {
            ("aoc_unprotected", "aoc-trio"): ("critical", "AOC is unprotected: no standby"),
            ("aoc_failover_off", "aoc-trio"): (
                "notice",
                "automatic failover disabled: the witness is lost: one more loss stops the center",
            ),
            ("aoc_member_unreachable", "aoc-b"): (
                "notice",
                "AOC member aoc-b does not answer: the passive at 10.232.0.2 is unreachable",
            ),
            ("aoc_member_unreachable", "aoc-w"): (
                "notice",
                "AOC member aoc-w does not answer: the witness at 10.232.0.3 is unreachable",
            ),
        }
        assert await loop.pass_once() == []  # opened once
        now[0] = None  # the agent gives no status: the alerts stay as they are
        await clock.advance(10)
        assert await loop.pass_once() == [] and len(open_alerts()) == 4
        now[0] = status(RPOState(kind=RPOKind.DEGRADED, behind_s=12), unreachable=("aoc-w",))
        said = await loop.pass_once()
        assert sum("resolved" in s for s in said) == 2, said
        assert open_alerts()[("aoc_unprotected", "aoc-trio")] == (
            "critical",
            "AOC is unprotected: degraded: passive 12 s behind",
        )
        now[0] = status()
        await loop.pass_once()
        assert open_alerts() == {}
        with sessions() as db:
            assert len(list(db.scalars(select(Alert)))) == 4  # each opened once, all resolved
    finally:
        await loop.close()
