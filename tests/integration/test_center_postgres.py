"""The center over real PostgreSQL 15 (Debian's), as in an HA trio: a primary and a streaming
standby that every commit waits for (``remote_apply``), started here on loopback and removed
after. The migrations make exactly the schema of the models; two centers starting at once
take turns (the advisory lock: they share no data directory) and make one root; the API works
(log in, a user made, the audit read); and a center beside the standby waits until the active
has made the schema, then serves reads, and a write that reaches the standby is a 503 naming
the active, never a 500."""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import os
import shutil
import socket
import subprocess
import tempfile
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import psycopg
import pytest
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from cryptography.fernet import Fernet
from sqlalchemy import func, select

from aecp.center.db.engine import make_engine
from aecp.center.db.models import Base, User
from aecp.center.main import StandbyDatabase, bootstrap, serve, start
from aecp.center.settings import CenterHA, CenterSettings
from aecp.common.clock import FakeClock
from aecp.common.errors import ConfigError
from tests.unit.test_center_ha_gate import FakeTrio, until

pytestmark = pytest.mark.integration
PG_BIN = Path("/usr/lib/postgresql/15/bin")
HA = CenterHA(
    patroni_url="http://127.0.0.1:9", management_ip="10.231.0.200", status_url="http://127.0.0.1:9"
)
STRONG = "Correct-Horse-9"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def as_postgres(*argv: str | Path) -> list[str]:
    """``argv`` run as the ``postgres`` user when the tests run as root (initdb refuses root)."""
    cmd = [str(a) for a in argv]
    return ["runuser", "-u", "postgres", "--", *cmd] if os.geteuid() == 0 else cmd


@dataclass
class Server:
    """One PostgreSQL server started here (its data directory under ``base``)."""

    name: str
    base: Path
    port: int

    @property
    def data(self) -> Path:
        return self.base / self.name

    def url(self, db: str) -> str:
        return f"postgresql+psycopg://postgres@127.0.0.1:{self.port}/{db}"

    def start(self) -> None:
        options = (
            f"-p {self.port} -k {self.base} -c listen_addresses=127.0.0.1 -c fsync=off "
            "-c full_page_writes=off"
        )
        log = self.base / f"{self.name}.log"
        subprocess.run(
            as_postgres(
                PG_BIN / "pg_ctl", "-D", self.data, "-l", log, "-o", options, "-w", "start"
            ),
            check=True,
            capture_output=True,
        )

    def stop(self) -> None:
        subprocess.run(
            as_postgres(PG_BIN / "pg_ctl", "-D", self.data, "-m", "immediate", "-w", "stop"),
            check=False,
            capture_output=True,
        )

    def promote(self) -> None:
        subprocess.run(
            as_postgres(PG_BIN / "pg_ctl", "-D", self.data, "-w", "promote"),
            check=True,
            capture_output=True,
        )

    def sql(self, statement: str, db: str = "postgres") -> Any:
        dsn = f"host=127.0.0.1 port={self.port} user=postgres dbname={db}"
        with psycopg.connect(dsn, autocommit=True) as conn:
            cur = conn.execute(statement)
            return cur.fetchall() if cur.description else None


@dataclass
class Pair:
    primary: Server
    standby: Server
    made: int = 0

    def database(self) -> str:
        """A new, empty database (on both: the standby replays it)."""
        self.made += 1
        name = f"aoc{self.made}"
        self.primary.sql(f"CREATE DATABASE {name}")
        return name


@contextlib.contextmanager
def running_pair() -> Iterator[Pair]:
    """A primary and its synchronous standby, stopped and removed after."""
    assert (PG_BIN / "initdb").exists(), "PostgreSQL 15 is missing: make deps installs it"
    base = Path(tempfile.mkdtemp(prefix="aecp-pg-"))
    if os.geteuid() == 0:
        shutil.chown(base, "postgres", "postgres")
    primary, standby = Server("primary", base, free_port()), Server("standby", base, free_port())
    try:
        initdb = (PG_BIN / "initdb", "-D", primary.data, "-A", "trust", "-U", "postgres")
        subprocess.run(as_postgres(*initdb, "--no-sync"), check=True, capture_output=True)
        primary.start()
        backup = (PG_BIN / "pg_basebackup", "-h", "127.0.0.1", "-p", str(primary.port))
        subprocess.run(
            as_postgres(*backup, "-U", "postgres", "-D", standby.data, "-R", "-X", "stream"),
            check=True,
            capture_output=True,
        )
        standby.start()
        # from now on every commit returns once the standby has applied it
        primary.sql("ALTER SYSTEM SET synchronous_standby_names = '*'")
        primary.sql("ALTER SYSTEM SET synchronous_commit = 'remote_apply'")
        primary.sql("SELECT pg_reload_conf()")
        yield Pair(primary, standby)
    finally:
        standby.stop()
        primary.stop()
        shutil.rmtree(base, ignore_errors=True)


@pytest.fixture(scope="module")
def pg() -> Iterator[Pair]:
    with running_pair() as pair:
        yield pair


def settings(data_dir: Path, url: str, ha: CenterHA | None = None) -> CenterSettings:
    return CenterSettings(data_dir=data_dir, database_url=url, ha=ha)


def test_the_migrations_make_exactly_the_schema_of_the_models(pg: Pair, tmp_path: Path) -> None:
    url = pg.primary.url(pg.database())
    _, password = bootstrap(settings(tmp_path / "a", url))
    assert password is not None
    _, again = bootstrap(settings(tmp_path / "a", url))  # at head already: nothing to do
    assert again is None
    engine = make_engine(url)
    with engine.connect() as conn:
        assert compare_metadata(MigrationContext.configure(conn), Base.metadata) == []
    engine.dispose()


def test_two_centers_starting_at_once_upgrade_once_and_make_one_root(
    pg: Pair, tmp_path: Path
) -> None:
    """They share no data directory (no lock file between them): the advisory lock it is."""
    url = pg.primary.url(pg.database())
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        made = list(pool.map(lambda d: bootstrap(settings(tmp_path / d, url))[1], ("a", "b")))
    assert sum(p is not None for p in made) == 1
    engine = make_engine(url)
    with engine.connect() as conn:
        assert conn.scalar(select(func.count()).select_from(User)) == 1
    engine.dispose()


async def login(http: httpx.AsyncClient, user: str, password: str) -> dict[str, str]:
    r = await http.post("/v1/login", json={"user": user, "password": password})
    assert r.status_code == 200, r.text
    return {"authorization": f"Bearer {r.json()['token']}"}


@pytest.fixture
async def active(pg: Pair, tmp_path: Path) -> AsyncIterator[tuple[httpx.AsyncClient, str, str]]:
    """A center on the primary (no gate: standalone settings over PostgreSQL): its client,
    root's password, and the database's name."""
    db = pg.database()
    app, password = bootstrap(settings(tmp_path / "active", pg.primary.url(db)))
    assert password is not None
    transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
    async with httpx.AsyncClient(transport=transport, base_url="http://aoc") as http:
        yield http, password, db


async def test_the_api_works_on_postgresql(active: tuple[httpx.AsyncClient, str, str]) -> None:
    http, password, _ = active
    root = await login(http, "root", password)
    body = {"name": "alice", "role": "ADMIN", "password": STRONG}
    r = await http.post("/v1/users", headers=root, json=body)
    assert r.status_code == 201, r.text
    assert (await http.post("/v1/users", headers=root, json=body)).status_code == 409
    alice = await login(http, "alice", STRONG)
    names = [u["name"] for u in (await http.get("/v1/users", headers=alice)).json()]
    assert names == ["alice", "root"]
    records = (await http.get("/v1/audit", headers=root)).json()
    assert [(a["action"], a["target"], a["result"]) for a in records[:4]] == [
        ("session.login", "alice", "ok"),
        ("user.create", "alice", "already_exists: user alice already exists"),
        ("user.create", "alice", "ok"),
        ("session.login", "root", "ok"),
    ]


class SteppedClock(FakeClock):
    """A fake clock that says when someone sleeps on it."""

    def __init__(self) -> None:
        super().__init__()
        self.slept = asyncio.Event()

    async def sleep(self, seconds: float) -> None:
        self.slept.set()
        await super().sleep(seconds)


async def test_a_center_whose_database_is_not_there_yet_waits_then_prepares_it(
    pg: Pair, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    (tmp_path / "a").mkdir(mode=0o700)
    (tmp_path / "a" / "secret.key").write_bytes(Fernet.generate_key())
    clock = SteppedClock()
    waiting = asyncio.create_task(
        start(settings(tmp_path / "a", pg.primary.url("late"), HA), clock)
    )
    await asyncio.wait_for(clock.slept.wait(), 30)
    assert not waiting.done()
    assert 'database "late" does not exist' in caplog.text
    pg.primary.sql("CREATE DATABASE late")
    await clock.advance(HA.poll_s)
    app, password = await asyncio.wait_for(waiting, 30)
    assert password is not None and app.state.leadership.role == "passive"  # until Patroni says
    await app.state.leadership.http.aclose()


async def test_a_ha_center_without_the_shared_key_refuses_to_start(
    pg: Pair, tmp_path: Path
) -> None:
    with pytest.raises(ConfigError, match=r"secret\.key is missing: both data nodes"):
        await start(settings(tmp_path / "a", pg.primary.url(pg.database()), HA), FakeClock())


async def test_a_center_beside_the_standby_waits_for_the_schema_then_serves_reads_only(
    pg: Pair, tmp_path: Path
) -> None:
    db = pg.database()
    key = Fernet.generate_key()
    for side in ("a", "b"):  # the deployment gives both data nodes' centers one key
        (tmp_path / side).mkdir(mode=0o700)
        (tmp_path / side / "secret.key").write_bytes(key)
    passive = settings(tmp_path / "b", pg.standby.url(db), HA)
    with pytest.raises(StandbyDatabase):
        bootstrap(passive)
    clock = SteppedClock()
    waiting = asyncio.create_task(start(passive, clock))
    await asyncio.wait_for(clock.slept.wait(), 30)
    assert not waiting.done()  # an empty standby: nothing to serve yet

    app_a, password = await asyncio.to_thread(
        bootstrap, settings(tmp_path / "a", pg.primary.url(db))
    )
    assert password is not None
    clock.slept.clear()
    await clock.advance(HA.poll_s)
    slept = asyncio.create_task(clock.slept.wait())
    done, _ = await asyncio.wait({waiting, slept}, timeout=30, return_when="FIRST_COMPLETED")
    slept.cancel()
    assert waiting in done, "the passive's center did not see the schema the active made"
    app_b, none = waiting.result()
    assert none is None and not (tmp_path / "b" / "root-password").exists()

    a = httpx.AsyncClient(transport=httpx.ASGITransport(app=app_a), base_url="http://a")
    b_transport = httpx.ASGITransport(app=app_b, raise_app_exceptions=False)
    b = httpx.AsyncClient(transport=b_transport, base_url="http://b")
    async with a, b:
        root = await login(a, "root", password)
        assert (
            await a.post(
                "/v1/users",
                headers=root,
                json={"name": "alice", "role": "ADMIN", "password": STRONG},
            )
        ).status_code == 201
        assert (await b.get("/healthz")).json()["role"] == "passive"
        users = (await b.get("/v1/users", headers=root)).json()  # root's session, replicated
        assert [u["name"] for u in users] == ["alice", "root"]
        body = {"name": "bob", "role": "ADMIN", "password": STRONG}
        r = await b.post("/v1/users", headers=root, json=body)
        assert r.status_code == 503 and r.json()["active"] == "http://10.231.0.200:8800"
        # Patroni already says "leader" but PostgreSQL is still a standby: the database refuses
        app_b.state.leadership.leader = True
        r = await b.post("/v1/users", headers=root, json=body)
        assert r.status_code == 503, r.text
        assert r.json()["active"] == "http://10.231.0.200:8800"
        assert "not the active" in r.json()["message"]
        app_b.state.leadership.leader = False
    await app_b.state.leadership.http.aclose()


async def test_a_failover_makes_the_passive_center_the_active_and_the_old_one_passive(
    tmp_path: Path,
) -> None:
    """Both centers served as ``aecp center run`` serves them (``serve``), each over its own
    PostgreSQL and its own (fake) Patroni; the standby is promoted and Patroni says so."""
    with running_pair() as pair:
        db = pair.database()
        key = Fernet.generate_key()
        sides = {}
        for side, server in (("a", pair.primary), ("b", pair.standby)):
            (tmp_path / side).mkdir(mode=0o700)
            (tmp_path / side / "secret.key").write_bytes(key)
            sides[side] = settings(tmp_path / side, server.url(db), HA).model_copy(
                update={"port": free_port()}
            )
        clock = FakeClock()
        app_a, password = await start(sides["a"], clock)
        app_b, none = await start(sides["b"], clock)  # the schema replicated already
        assert password is not None and none is None
        la, lb = app_a.state.leadership, app_b.state.leadership
        trio_a, trio_b = FakeTrio(), FakeTrio()
        trio_a.primary = 200
        for leadership, trio in ((la, trio_a), (lb, trio_b)):
            await leadership.http.aclose()
            leadership.http = trio.client()
        stop = asyncio.Event()
        serving = [
            asyncio.create_task(serve(app_a, sides["a"], stop)),
            asyncio.create_task(serve(app_b, sides["b"], stop)),
        ]
        a = httpx.AsyncClient(transport=httpx.ASGITransport(app=app_a), base_url="http://a")
        b = httpx.AsyncClient(transport=httpx.ASGITransport(app=app_b), base_url="http://b")
        try:
            await until(la, lambda s: s.leader)
            await until(lb, lambda s: s.probes >= 1)
            assert la.duties.running and not lb.duties.running
            root = await login(a, "root", password)
            alice = {"name": "alice", "role": "ADMIN", "password": STRONG}
            assert (await a.post("/v1/users", headers=root, json=alice)).status_code == 201
            bob = {"name": "bob", "role": "ADMIN", "password": STRONG}
            assert (await b.post("/v1/users", headers=root, json=bob)).status_code == 503

            await asyncio.to_thread(pair.primary.stop)  # the active's node fails
            await asyncio.to_thread(pair.standby.promote)
            trio_a.primary, trio_b.primary = httpx.ConnectError, 200
            seen_a, seen_b = la.probes, lb.probes
            await clock.advance(HA.poll_s)
            await until(la, lambda s: s.probes > seen_a)
            await until(lb, lambda s: s.probes > seen_b)
            assert lb.leader and lb.duties.running
            # a Patroni that does not answer is "unknown" for a grace: a stays the leader, but
            # its stopped PostgreSQL makes a write a 503, not a 500
            assert la.leader
            assert (await a.post("/v1/users", headers=root, json=bob)).status_code == 503
            while la.leader:  # past the grace, no answer counts as "not the leader"
                seen_a = la.probes
                await clock.advance(HA.poll_s)
                await until(la, lambda s, n=seen_a: s.probes > n)
            assert not la.duties.running
            assert (await b.get("/healthz")).json()["role"] == "active"
            assert (await b.post("/v1/users", headers=root, json=bob)).status_code == 201
            names = [u["name"] for u in (await b.get("/v1/users", headers=root)).json()]
            assert names == ["alice", "bob", "root"]  # nothing the old active said done is lost
            assert (await a.get("/healthz")).json()["role"] == "passive"
            r = await a.post("/v1/users", headers=root, json=bob)
            assert r.status_code == 503  # each center names the active at its own port
            assert r.json()["active"] == f"http://10.231.0.200:{sides['a'].port}"
        finally:
            stop.set()
            await asyncio.wait_for(asyncio.gather(*serving), 30)
            await a.aclose()
            await b.aclose()
        assert not lb.duties.running and lb.http.is_closed
