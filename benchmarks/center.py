"""The operation center (AOC) with 10 clusters of 1,000 VMs: list latency, requests per second
and inventory lag, each against a baseline of the same run and the issue's goal.

One run starts ``benchmarks/center_replayer.py`` (a process playing ``--clusters`` generated
clusters of ``--vms`` VMs each, one port per cluster, answering what the center's sync reads)
and a real center (``aecp center run`` over SQLite in a temp dir), logs in as root, registers
every cluster through the API (``POST /v1/clusters``) and waits until the center's sync has
read them all (``X-Total-Count`` of ``GET /v1/vms``). Then, through the center's HTTP API with
httpx (keep-alive, as a console or the CLI would):

- latency, one request at a time (``--samples`` each): ``GET /healthz`` (baseline: the HTTP
  stack), ``GET /v1/session`` (baseline: a route with a session lookup and the role check,
  i.e. the least any ``/v1`` read costs), then pages of 100 VMs out of 10,000: filtered by
  state at random offsets (the goal's request), by a name substring, sorted by another column,
  unfiltered, and one VM;
- requests per second, ``--concurrency`` clients for ``--seconds`` each, of the same filtered
  page and of both baselines, with the CPU the center, the replayer and this client used;
- where the time of one filtered page goes: the route called in-process on the center's
  database (no HTTP), its two SQL statements timed alone in SQLite (with their query plans),
  and building and serializing the 100 VMs;
- inventory lag: ``--changes`` times a VM changes state in a cluster (the replayer's feed
  sends the event), and the time until the center's ``GET /v1/clusters/{c}/vms/{name}``
  shows it (polled every 5 ms); idle, then again while the clients load the list; and bursts:
  every VM of one node of one cluster (about 125) in one revision, then of one node in every
  cluster at once.

``--profile`` runs the center under a sampling profiler (every thread's stack every 2 ms,
taken during the load of the filtered page) and prints where its threads spend their time.

Usage: .venv/bin/python benchmarks/center.py [--quick] [--profile] [--samples N]
       [--seconds S] [--concurrency N] [--changes N] [--clusters N] [--vms N]
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import json
import os
import random
import re
import signal
import socket
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import uvloop

HERE = Path(__file__).resolve().parent
TICK = os.sysconf("SC_CLK_TCK")
GOAL_P95_MS = 100.0  # a filtered page of 100 VMs out of 10,000
GOAL_RPS = 500.0  # of that list
GOAL_LAG_S = 2.0  # a change in a cluster, then the same change in the center
FILTERED = "filtered page: state=running, limit=100, random offset"
SORTED = "sorted: sort=-node, limit=100, random offset"
POLL = 0.005  # s, lag polls


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICK


def host_busy() -> float:
    """CPU seconds the whole machine has been busy since boot (/proc/stat, every core)."""
    v = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    return (sum(v) - v[3] - v[4]) / TICK


def pct(values: list[float], q: int) -> float:
    """The q-th percentile (``statistics.quantiles``, inclusive)."""
    if len(values) < 2:
        return values[0] if values else float("nan")
    return statistics.quantiles(values, n=100, method="inclusive")[q - 1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# ---- the two processes --------------------------------------------------------------------
class Replayer:
    """``center_replayer.py`` in a process of its own."""

    def __init__(self, tmp: Path, clusters: int, vms: int) -> None:
        argv = [sys.executable, str(HERE / "center_replayer.py"), "--clusters", str(clusters),
                "--vms", str(vms)]  # fmt: skip
        self.log = tmp / "replayer.log"
        with self.log.open("wb") as err:
            self.proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=err)  # noqa: S603
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"the replayer did not start: {self.log.read_text()[-2000:]}")
        self.ports: dict[str, int] = json.loads(line)["clusters"]
        self.control = f"http://127.0.0.1:{next(iter(self.ports.values()))}"

    def url(self, cluster: str) -> str:
        return f"http://127.0.0.1:{self.ports[cluster]}"

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(timeout=30)


class CenterProcess:
    """``aecp center run`` on ``tmp/aoc``; with ``profile``, under the sampling profiler;
    with ``fixes`` (a what-if, ``WHAT_IF``), with proposed fixes applied from outside."""

    def __init__(self, tmp: Path, profile: Path | None = None, fixes: tuple[str, ...] = ()) -> None:
        self.data_dir = tmp / "aoc"
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = tmp / "center.log"
        run = ["center", "run", "--data-dir", str(self.data_dir), "--port", str(self.port)]
        if profile is None and not fixes:
            argv = [sys.executable, "-m", "aecp", *run]
        else:
            wrap = [sys.executable, __file__, "--wrapped-center", str(profile or "")]
            argv = [*wrap, ",".join(fixes), *run]
        with self.log.open("ab") as out:
            self.proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT)  # noqa: S603
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline:
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(self.url + "/healthz", timeout=1).status_code == 200:
                    return
            if self.proc.poll() is not None:
                break
            time.sleep(0.2)
        raise RuntimeError(f"the center did not start: {self.log.read_text()[-3000:]}")

    def password(self) -> str:
        return (self.data_dir / "root-password").read_text().strip()

    def signal(self, sig: int) -> None:
        os.kill(self.proc.pid, sig)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(timeout=30)


# ---- measuring ------------------------------------------------------------------------------
@dataclass
class Latency:
    what: str
    ms: list[float]

    def p(self, q: int) -> float:
        return pct(self.ms, q)


@dataclass
class Load:
    what: str
    requests: int
    seconds: float
    errors: int
    ms: list[float]
    cpu: dict[str, float] = field(default_factory=dict)  # process -> CPU seconds

    @property
    def rps(self) -> float:
        return self.requests / self.seconds


class Client:
    def __init__(self, base: str, token: str, concurrency: int) -> None:
        limits = httpx.Limits(
            max_connections=concurrency + 4, max_keepalive_connections=concurrency + 4
        )
        self.base = base
        self.http = httpx.AsyncClient(
            base_url=base, timeout=30, limits=limits, headers={"authorization": f"Bearer {token}"}
        )

    async def get(self, path: str) -> httpx.Response:
        r = await self.http.get(path)
        if r.status_code != 200:
            raise RuntimeError(f"GET {path}: {r.status_code} {r.text[:300]}")
        return r

    async def total(self, path: str) -> int:
        return int((await self.get(path)).headers["x-total-count"])


Path_ = Callable[[random.Random], str]


async def latency(client: Client, what: str, path: Path_, samples: int, seed: int) -> Latency:
    rnd = random.Random(seed)
    ms = []
    for _ in range(samples):
        p = path(rnd)
        t0 = time.perf_counter()
        await client.get(p)
        ms.append((time.perf_counter() - t0) * 1000)
    return Latency(what, ms)


async def load(
    client: Client, what: str, path: Path_, concurrency: int, seconds: float, pids: dict[str, int]
) -> Load:
    """``concurrency`` clients, each a request after the other, for ``seconds``."""
    done, errors, ms = 0, 0, []
    end = time.monotonic() + seconds

    async def worker(seed: int) -> None:
        nonlocal done, errors
        rnd = random.Random(seed)
        while time.monotonic() < end:
            p = path(rnd)
            t0 = time.perf_counter()
            try:
                await client.get(p)
            except (RuntimeError, httpx.HTTPError):
                errors += 1
                continue
            ms.append((time.perf_counter() - t0) * 1000)
            done += 1

    before = {k: cpu_seconds(pid) for k, pid in pids.items()}
    host0 = host_busy()
    t0 = time.monotonic()
    await asyncio.gather(*(worker(i) for i in range(concurrency)))
    elapsed = time.monotonic() - t0
    cpu = {k: cpu_seconds(pid) - before[k] for k, pid in pids.items()}
    cpu["others"] = host_busy() - host0 - sum(cpu.values())
    return Load(what, done, elapsed, errors, ms, cpu)


# ---- the run ---------------------------------------------------------------------------------
@dataclass
class Inventory:
    """What the clusters hold: every VM's name and state, by cluster (from the replayer)."""

    vms: dict[str, dict[str, dict[str, Any]]]

    def on_node(self, cluster: str, node: str) -> list[str]:
        return sorted(n for n, v in self.vms[cluster].items() if v["node"] == node)


async def setup(
    rep: Replayer, center: CenterProcess, client: Client, args: argparse.Namespace
) -> tuple[float, Inventory]:
    """Data centers, every cluster registered; the seconds until all VMs were in the center."""
    await client.http.post("/v1/datacenters", json={"name": "dc1"})
    await client.http.post("/v1/datacenters", json={"name": "dc2"})
    t0 = time.monotonic()
    for i, name in enumerate(rep.ports):
        body = {"name": name, "datacenter": f"dc{1 + i % 2}", "endpoint": rep.url(name),
                "token": "bench-token"}  # fmt: skip
        r = await client.http.post("/v1/clusters", json=body)
        if r.status_code != 201:
            raise RuntimeError(f"registering {name}: {r.status_code} {r.text}")
    want = args.clusters * args.vms
    deadline = time.monotonic() + 300
    while True:
        got = await client.total("/v1/vms?limit=1")
        if got == want:
            break
        if time.monotonic() > deadline:
            raise RuntimeError(f"after 300 s the center has {got} VMs of {want}")
        await asyncio.sleep(0.05)
    synced = time.monotonic() - t0
    clusters = (await client.get("/v1/clusters")).json()
    bad = [c["name"] for c in clusters if c["sync_state"] != "ok"]
    if bad:
        raise RuntimeError(f"clusters not in sync: {bad}")
    vms: dict[str, dict[str, dict[str, Any]]] = {}
    async with httpx.AsyncClient(headers={"authorization": "Bearer x"}, timeout=30) as direct:
        for name in rep.ports:
            r = await direct.get(rep.url(name) + "/v1/vms")
            vms[name] = {v["name"]: v for v in r.json()}
    return synced, Inventory(vms)


def queries(inv: Inventory, running: int) -> dict[str, Path_]:
    """The API reads measured, each a path made from a random source."""
    clusters = sorted(inv.vms)
    names = {c: sorted(inv.vms[c]) for c in clusters}
    pages = max(1, running - 100)

    def one_vm(r: random.Random) -> str:
        c = r.choice(clusters)
        return f"/v1/clusters/{c}/vms/{r.choice(names[c])}"

    return {
        FILTERED: lambda r: f"/v1/vms?state=running&limit=100&offset={r.randrange(pages)}",
        "name filter: name=<3 digits> (~110 of 10,000), limit=100": (
            lambda r: f"/v1/vms?name={r.randrange(1000):03d}&limit=100"
        ),
        SORTED: lambda r: f"/v1/vms?sort=-node&limit=100&offset={r.randrange(9900)}",
        "unfiltered page: limit=100, random offset": (
            lambda r: f"/v1/vms?limit=100&offset={r.randrange(9900)}"
        ),
        "one VM: /v1/clusters/{c}/vms/{name}": one_vm,
    }


HEALTHZ = "GET /healthz (baseline: HTTP stack)"
BASELINES: dict[str, Path_] = {
    HEALTHZ: lambda r: "/healthz",
    "GET /v1/session (baseline: session + role check)": lambda r: "/v1/session",
}


async def lag_one(
    client: Client, rep: Replayer, control: httpx.AsyncClient, inv: Inventory, rnd: random.Random
) -> float:
    """One VM changes state in its cluster; seconds until the center shows it."""
    cluster = rnd.choice(sorted(inv.vms))
    name = rnd.choice(sorted(inv.vms[cluster]))
    vm = inv.vms[cluster][name]
    state = "stopped" if vm["state"] == "running" else "running"
    t0 = time.perf_counter()
    r = await control.post(
        rep.control + "/_bench/change", json={"cluster": cluster, "vm": name, "state": state}
    )
    r.raise_for_status()
    vm["state"] = state
    while True:
        got = (await client.get(f"/v1/clusters/{cluster}/vms/{name}")).json()
        if got["state"] == state:
            return time.perf_counter() - t0
        if time.perf_counter() - t0 > 60:
            raise RuntimeError(f"{cluster}/{name} not {state} in the center after 60 s")
        await asyncio.sleep(POLL)


async def lags(client: Client, rep: Replayer, inv: Inventory, n: int, seed: int) -> list[float]:
    rnd = random.Random(seed)
    out = []
    async with httpx.AsyncClient(timeout=30) as control:
        for _ in range(n):
            out.append(await lag_one(client, rep, control, inv, rnd))
            await asyncio.sleep(rnd.uniform(0.05, 0.25))  # changes at random moments
    return out


async def burst(client: Client, rep: Replayer, inv: Inventory, clusters: list[str], node: str,
                state: str) -> tuple[int, float]:  # fmt: skip
    """Every VM of ``node`` in each of ``clusters`` takes ``state`` (one revision per cluster):
    how many changed, and the seconds until the center shows the last of them."""
    names = {c: inv.on_node(c, node) for c in clusters}
    count = sum(len(v) for v in names.values())
    async with httpx.AsyncClient(timeout=30) as control:
        t0 = time.perf_counter()
        for c in clusters:
            r = await control.post(
                rep.control + "/_bench/burst", json={"cluster": c, "vms": names[c], "state": state}
            )
            r.raise_for_status()
    for c in clusters:
        for n in names[c]:
            inv.vms[c][n]["state"] = state
    where = f"cluster={clusters[0]}&" if len(clusters) == 1 else ""
    path = f"/v1/vms?{where}node={node}&state={state}&limit=1"
    while await client.total(path) < count:
        if time.perf_counter() - t0 > 120:
            raise RuntimeError(f"a burst of {count} changes not in the center after 120 s")
        await asyncio.sleep(0.02)
    return count, time.perf_counter() - t0


# ---- where one filtered page's time goes -----------------------------------------------------
PROPOSED_INDEXES = [  # what-if: a list's filter, then its sort's columns, in that order
    "CREATE INDEX ix_whatif_kind_state_name ON inventory (kind, state, name, cluster)",
    "CREATE INDEX ix_whatif_kind_name_cluster ON inventory (kind, name, cluster)",
    "CREATE INDEX ix_whatif_kind_node_cluster ON inventory (kind, node, cluster, name)",
]


def with_indexes(db_path: Path, copy: Path | None = None) -> Path:
    """``db_path`` (or a consistent copy of it, made with SQLite's backup) with the proposed
    indexes."""
    if copy is not None:
        src, dst = sqlite3.connect(db_path), sqlite3.connect(copy)
        src.backup(dst)
        src.close()
        dst.close()
    target = copy or db_path
    with contextlib.closing(sqlite3.connect(target)) as db:
        for sql in PROPOSED_INDEXES:
            db.execute(sql)
        db.execute("ANALYZE")
        db.commit()
    return target


def breakdown(
    db_path: Path, token: str, running: int, samples: int
) -> tuple[dict[str, float], list[str]]:
    """The filtered page's route called in-process on the center's database (no HTTP, no
    thread pool), and its parts: the SQL statements alone in SQLite, building the VMs from the
    rows, serializing them as FastAPI does, and the session lookup every /v1 route makes.
    Medians in ms, and the statements' query plans."""
    from fastapi import Response
    from pydantic import TypeAdapter
    from sqlalchemy import event
    from sqlalchemy.orm import sessionmaker

    from aecp.center.accounts import Accounts
    from aecp.center.api.objects import VMPublic, list_vms
    from aecp.center.db.engine import make_engine
    from aecp.center.db.models import InventoryObject
    from aecp.model.vm import VMState

    engine = make_engine(f"sqlite:///{db_path}")
    statements: list[tuple[str, Any]] = []

    @event.listens_for(engine, "before_cursor_execute")
    def keep(_conn: Any, _cur: Any, sql: str, params: Any, _ctx: Any, _many: bool) -> None:
        statements.append((sql, params))

    sessions = sessionmaker(engine, expire_on_commit=False)
    accounts = Accounts(3600, 5, 900)
    rnd = random.Random(7)
    offsets = [rnd.randrange(max(1, running - 100)) for _ in range(samples)]
    adapter = TypeAdapter(list[VMPublic])
    parts: dict[str, list[float]] = collections.defaultdict(list)
    for offset in offsets:
        with sessions() as db:
            t0 = time.perf_counter()
            who = accounts.caller(db, token)
            t1 = time.perf_counter()
            statements.clear()
            out = list_vms(db, who, Response(), state=VMState.RUNNING, limit=100, offset=offset)
            t2 = time.perf_counter()
            adapter.dump_json(adapter.validate_python(out))
            t3 = time.perf_counter()
            rows = [db.get(InventoryObject, (vm.cluster, "vm", vm.name)) for vm in out]
            t4 = time.perf_counter()
            [VMPublic.of(row) for row in rows if row is not None]
            t5 = time.perf_counter()
        parts[SESSION].append((t1 - t0) * 1000)
        parts[ROUTE].append((t2 - t1) * 1000)
        parts[OF].append((t5 - t4) * 1000)
        parts[SERIALIZE].append((t3 - t2) * 1000)
    for offset in offsets:  # the proposals: one query for the session, no ORM, no pydantic
        with sessions() as db:
            t0 = time.perf_counter()
            one_query_caller(db, token)
            t1 = time.perf_counter()
            spliced_page(db, offset)
            t2 = time.perf_counter()
        parts[SESSION_1Q].append((t1 - t0) * 1000)
        parts[SPLICED].append((t2 - t1) * 1000)
    count_sql, count_params = statements[0]
    page_sql, page_params = statements[1]
    raw = sqlite3.connect(f"file:{db_path}?mode=ro", uri=True)
    for offset in offsets:
        t0 = time.perf_counter()
        raw.execute(count_sql, count_params).fetchall()
        t1 = time.perf_counter()
        raw.execute(page_sql, (*page_params[:-1], offset)).fetchall()
        t2 = time.perf_counter()
        raw.execute(page_sql.replace(REPEATED, UNREPEATED), (*page_params[:-1], offset)).fetchall()
        t3 = time.perf_counter()
        parts[COUNT].append((t1 - t0) * 1000)
        parts[PAGE].append((t2 - t1) * 1000)
        parts[PAGE_FIXED].append((t3 - t2) * 1000)
    plans = []
    fixed = (page_sql.replace(REPEATED, UNREPEATED), page_params)
    for i, (sql, params) in enumerate([*statements[:2], fixed]):
        plans.append(f"statement {i + 1}: {' '.join(sql.split())}")
        plans += [f"  plan: {r[-1]}" for r in raw.execute("EXPLAIN QUERY PLAN " + sql, params)]
    raw.close()
    engine.dispose()
    return {k: statistics.median(v) for k, v in parts.items()}, plans


def write_costs(
    db_path: Path, copy: Path, cluster: str, vms: dict[str, dict[str, Any]], n: int
) -> list[float]:
    """What the sync writes for one feed event, alone (no other writer): ``Inventory._keep``
    (the object) and ``Inventory._mark`` (the position), each its own transaction, on a copy
    of the center's database; median ms of each over ``n`` events."""
    from sqlalchemy.orm import sessionmaker

    from aecp.center.db.engine import make_engine
    from aecp.center.inventory import Inventory

    src, dst = sqlite3.connect(db_path), sqlite3.connect(copy)
    src.backup(dst)
    src.close()
    dst.close()
    engine = make_engine(f"sqlite:///{copy}")
    inv = Inventory(sessionmaker(engine, expire_on_commit=False), None, None)  # type: ignore[arg-type]
    names = sorted(vms)
    keep, mark = [], []
    for i in range(n):
        item = dict(vms[names[i % len(names)]], state="stopped" if i % 2 else "running")
        t0 = time.perf_counter()
        inv._keep(cluster, "vm", item["name"], item, time.time())
        t1 = time.perf_counter()
        inv._mark(cluster, f"{10**6 + i}.0")
        t2 = time.perf_counter()
        keep.append((t1 - t0) * 1000)
        mark.append((t2 - t1) * 1000)
    engine.dispose()
    return [statistics.median(keep), statistics.median(mark)]


def app_share(
    data_dir: Path, copy: Path, token: str, paths: list[str], n: int
) -> list[tuple[str, float, float, float]]:
    """The center's app in this process (``bootstrap`` on a copy of its data dir) on an
    asyncio loop of its own (as ``aecp center run``), called through ASGI without a network:
    for each of ``paths``, the thread-pool hops per request and the CPU per request (the
    app's and the httpx client's), with the hops in threads as always, then with each hop's
    function called in the loop's thread instead (what the work costs without the pool)."""
    import shutil

    import anyio.to_thread

    from aecp.center.main import bootstrap
    from aecp.center.settings import CenterSettings

    shutil.copytree(data_dir, copy, ignore=shutil.ignore_patterns("center.db*", "*.lock"))
    src, dst = sqlite3.connect(data_dir / "center.db"), sqlite3.connect(copy / "center.db")
    src.backup(dst)
    src.close()
    dst.close()
    app, _ = bootstrap(CenterSettings(data_dir=copy))
    real = anyio.to_thread.run_sync
    hops, inline = 0, False

    async def hop(func: Callable[..., Any], *args: Any, **kw: Any) -> Any:
        nonlocal hops
        hops += 1
        return func(*args) if inline else await real(func, *args, **kw)

    async def run() -> list[tuple[str, float, float, float]]:
        nonlocal hops, inline
        out = []
        transport = httpx.ASGITransport(app=app)
        headers = {"authorization": f"Bearer {token}"}
        async with httpx.AsyncClient(
            transport=transport, base_url="http://c", headers=headers
        ) as c:
            for path in paths:
                cpu = []
                for mode in (False, True):
                    inline = mode
                    for _ in range(20):
                        (await c.get(path)).raise_for_status()
                    hops, t0 = 0, time.process_time()
                    for _ in range(n):
                        await c.get(path)
                    cpu.append(1000 * (time.process_time() - t0) / n)
                out.append((path, hops / n, cpu[0], cpu[1]))
        return out

    anyio.to_thread.run_sync = hop  # type: ignore[assignment]
    try:
        return asyncio.run(run())
    finally:
        anyio.to_thread.run_sync = real


def one_query_caller(db: Any, token: str) -> tuple[str, str, str] | None:
    """Proposed: the session, its user and the role's actions in one Core query."""
    from sqlalchemy import select

    from aecp.center.accounts import token_digest
    from aecp.center.db.models import Role, User
    from aecp.center.db.models import Session as Sess

    q = (
        select(User.name, User.role, Role.actions)
        .join(Sess, Sess.user == User.name)
        .join(Role, Role.name == User.role, isouter=True)
        .where(Sess.token_sha256 == token_digest(token), Sess.expires_at > time.time())
        .where(~User.disabled)
    )
    row = db.execute(q).first()
    return None if row is None else (row[0], row[1], row[2] or "")


def spliced_page(db: Any, offset: int) -> bytes:
    """Proposed: the page's rows as Core tuples and its body spliced from the stored JSON
    (each VM's ``data`` with its cluster and read time put in front), no ORM object, no model;
    the count as the route does it."""
    from sqlalchemy import func, select

    from aecp.center.db.models import InventoryObject as Inv

    where = (Inv.kind == "vm", Inv.state == "running")
    db.scalar(select(func.count()).select_from(Inv).where(*where))
    q = select(Inv.cluster, Inv.synced_at, Inv.data).where(*where)
    rows = db.execute(q.order_by(Inv.name, Inv.cluster).limit(100).offset(offset)).all()
    dumps = json.dumps
    items = [f'{{"cluster":{dumps(c)},"synced_at":{t!r},{d[1:]}' for c, t, d in rows]
    return ("[" + ",".join(items) + "]").encode()


SESSION = "session lookup (Accounts.caller: 3 ORM gets)"
ROUTE = "route in-process (list_vms: 2 SQL statements, ORM rows, 100 VMPublic.of)"
COUNT = "  of which: SQL count (X-Total-Count), in SQLite alone"
PAGE = "  of which: SQL page (ORDER BY, LIMIT/OFFSET), in SQLite alone"
PAGE_FIXED = "  (SQL page with ORDER BY name, cluster: no repeated column)"
OF = "  of which: 100 x VMPublic.of (json.loads + model)"
SERIALIZE = "response: validate + dump_json of 100 VMPublic"
SESSION_1Q = "proposed: session, user and role in one Core query"
SPLICED = "proposed: the page as Core rows, the body spliced from stored JSON"


# ---- the profile (--profile) -----------------------------------------------------------------
IDLE = {  # a thread whose innermost frame is one of these waits for work
    ("selectors.py", "select"), ("threading.py", "wait"), ("queue.py", "get"),
    ("_asyncio.py", "run"), ("thread.py", "_worker"), ("base_events.py", "_run_once"),
}  # fmt: skip


WHAT_IF = {  # a proposed fix, applied from outside the center's code
    "orderby": "the route's ORDER BY without its repeated column (name, cluster, name), and "
    "its tie-breakers in the direction of the sort (node DESC, cluster DESC, name DESC)",
    "uvloop": "the center's event loop is uvloop's (uvicorn's, not asyncio.run's)",
}
REPEATED = "ORDER BY inventory.name, inventory.cluster, inventory.name"
UNREPEATED = "ORDER BY inventory.name, inventory.cluster"
DESCENDING = re.compile(r"(ORDER BY inventory\.\w+) DESC, inventory\.cluster, inventory\.name")


def wrapped_center(out: str, fixes: str, argv: list[str]) -> None:
    """``aecp ARGV`` with the what-ifs named in ``fixes`` (``WHAT_IF``), and if ``out`` names
    a file, a sampling profiler: between SIGUSR1 and SIGUSR2 every thread's stack is taken
    every 2 ms; SIGUSR2 writes the counts to ``out`` (JSON)."""
    if "uvloop" in fixes:
        import uvloop

        uvloop.install()  # asyncio.run (aecp.center.main.run) then makes a uvloop loop
    if "orderby" in fixes:
        from sqlalchemy import event
        from sqlalchemy.engine import Engine

        @event.listens_for(Engine, "before_cursor_execute", retval=True)
        def orderby(*a: Any) -> tuple[str, Any]:
            sql = a[2].replace(REPEATED, UNREPEATED)
            return DESCENDING.sub(r"\1 DESC, inventory.cluster DESC, inventory.name DESC", sql), a[
                3
            ]

    if not out:
        sys.argv = ["aecp", *argv]
        from aecp.cli.main import main as aecp

        aecp()
        return
    counts: collections.Counter[str] = collections.Counter()
    on = threading.Event()
    taken = 0

    def sample() -> None:
        nonlocal taken
        me = threading.get_ident()
        while True:
            on.wait()
            names = {t.ident: t.name for t in threading.enumerate()}
            for tid, frame in sys._current_frames().items():
                if tid == me:
                    continue
                stack = []
                f: Any = frame
                while f is not None:
                    code = f.f_code
                    stack.append(f"{Path(code.co_filename).name}:{code.co_name}")
                    f = f.f_back
                group = names.get(tid, "?").rstrip("0123456789_-() ") or "?"
                counts[group + ";" + ";".join(reversed(stack))] += 1
            taken += 1
            time.sleep(0.002)

    def start(*_: Any) -> None:
        counts.clear()
        on.set()

    def stop(*_: Any) -> None:
        on.clear()
        Path(out).write_text(json.dumps({"samples": taken, "stacks": counts}))

    signal.signal(signal.SIGUSR1, start)
    signal.signal(signal.SIGUSR2, stop)
    threading.Thread(target=sample, name="sampler", daemon=True).start()
    sys.argv = ["aecp", *argv]
    from aecp.cli.main import main as aecp

    aecp()


def print_profile(path: Path, what: str) -> None:
    got = json.loads(path.read_text())
    stacks: dict[str, int] = got["stacks"]
    by_thread: collections.Counter[str] = collections.Counter()
    busy_thread: collections.Counter[str] = collections.Counter()
    own: collections.Counter[str] = collections.Counter()
    incl: collections.Counter[str] = collections.Counter()
    for stack, n in stacks.items():
        group, *frames = stack.split(";")
        by_thread[group] += n
        top = tuple(frames[-1].split(":", 1)) if frames else ("", "")
        if top in IDLE:
            continue
        busy_thread[group] += n
        own[frames[-1]] += n
        for f in set(frames):
            incl[f] += n
    busy = sum(busy_thread.values()) or 1
    print(f"\nProfile of the center ({what}; {got['samples']} samplings):")
    print("  busy samples by thread group (busy / all samples of the group):")
    for group, n in busy_thread.most_common():
        print(f"    {group:<28} {n:>6} / {by_thread[group]:>6}")
    for title, counts in (("self", own), ("inclusive", incl)):
        print(f"  top functions by {title} samples, % of busy samples:")
        for frame, n in counts.most_common(22 if title == "inclusive" else 14):
            print(f"    {100 * n / busy:5.1f}%  {frame}")


# ---- printing --------------------------------------------------------------------------------
def verdict(ok: bool) -> str:
    return "MET" if ok else "NOT MET"


def print_latencies(rows: list[Latency], base: Latency) -> None:
    head = f"{'request (one at a time)':<60} {'p50':>7} {'p95':>7} {'p99':>7}  p95/healthz  goal"
    print(head)
    print("-" * len(head))
    for x in rows:
        goal = ""
        if x.what == FILTERED:
            goal = f"p95 < {GOAL_P95_MS:.0f} ms: {verdict(x.p(95) < GOAL_P95_MS)}"
        ratio = x.p(95) / base.p(95)
        print(f"{x.what:<60} {x.p(50):7.1f} {x.p(95):7.1f} {x.p(99):7.1f}  {ratio:11.1f}  {goal}")
    print("(ms, client side, over HTTP keep-alive)")


def print_loads(rows: list[Load], base: Load, concurrency: int) -> None:
    print(f"\nRequests per second, {concurrency} concurrent clients (httpx, one process):")
    head = (f"{'request':<60} {'req/s':>7} {'/healthz':>8} {'p50':>6} {'p95':>6} "
            f"{'center':>6} {'client':>6} {'others':>6} {'ms CPU':>6}  goal")  # fmt: skip
    print(head)
    print("-" * len(head))
    for x in rows:
        goal = ""
        if x.what == FILTERED:
            goal = f">= {GOAL_RPS:.0f}/s: {verdict(x.rps >= GOAL_RPS)}"
        center = 100 * x.cpu["center"] / x.seconds
        client = 100 * x.cpu["client"] / x.seconds
        others = 100 * max(0.0, x.cpu["others"]) / x.seconds
        per = 1000 * x.cpu["center"] / max(1, x.requests)
        print(f"{x.what:<60} {x.rps:7.0f} {x.rps / base.rps:8.2f} {pct(x.ms, 50):6.1f} "
              f"{pct(x.ms, 95):6.1f} {center:5.0f}% {client:5.0f}% {others:5.0f}% {per:6.2f}"
              f"  {goal}"
              + (f"  ({x.errors} errors)" if x.errors else ""))  # fmt: skip
    print("(center, client: CPU of the process in % of one core; others: the rest of the machine "
          "(200% = both cores);\n ms CPU: the center's CPU per request; p50/p95: ms under the "
          "load)")  # fmt: skip


def print_lag(what: str, values: list[float], goal: bool) -> None:
    ms = [v * 1000 for v in values]
    g = f"  max < {GOAL_LAG_S:.0f} s: {verdict(max(values) < GOAL_LAG_S)}" if goal else ""
    print(f"  {what:<44} n={len(ms):<3} p50 {pct(ms, 50):7.1f}  p95 {pct(ms, 95):7.1f}  "
          f"max {max(ms):7.1f} ms{g}")  # fmt: skip


# ---- what-if: the same center, restarted with a proposed fix ----------------------------------
@dataclass
class Variant:
    what: str
    latency: Latency
    sort: Latency
    list_load: Load
    health_load: Load


async def restart(
    tmp: Path, center: CenterProcess, token: str, concurrency: int, fixes: tuple[str, ...]
) -> tuple[CenterProcess, Client]:
    """Stop the center, start it again on the same data (and session), wait until it has
    read every cluster again."""
    center.stop()
    since = time.time()
    center = CenterProcess(tmp, fixes=fixes)
    client = Client(center.url, token, concurrency)
    deadline = time.monotonic() + 300
    while True:
        clusters = (await client.get("/v1/clusters")).json()
        if all(c["sync_state"] == "ok" and c["last_sync_at"] >= since for c in clusters):
            return center, client
        if time.monotonic() > deadline:
            raise RuntimeError("the restarted center did not read its clusters again")
        await asyncio.sleep(0.2)


def measure_variant_from(lat: Latency, sort: Latency, listed: Load, health: Load) -> Variant:
    return Variant("as is (the figures above)", lat, sort, listed, health)


async def measure_variant(
    what: str, client: Client, pids: dict[str, int], qs: dict[str, Path_], args: argparse.Namespace
) -> Variant:
    path = qs[FILTERED]
    await latency(client, "warm-up", path, 30, 0)
    lat = await latency(client, what, path, args.samples, 2)
    sort = await latency(client, what, qs[SORTED], args.samples, 2)
    health = await load(client, what, BASELINES[HEALTHZ], args.concurrency, args.seconds, pids)
    listed = await load(client, what, path, args.concurrency, args.seconds, pids)
    return Variant(what, lat, sort, listed, health)


def print_variants(rows: list[Variant]) -> None:
    print("\nWhat-if: the center restarted on the same data with a proposed fix, the filtered "
          "page measured again\n(latency: one request at a time; req/s and the center's CPU per "
          "request: the same clients as above):")  # fmt: skip
    head = (f"  {'center':<36} {'p50':>6} {'p95':>6} {'p99':>6} {'req/s':>6} {'center':>6} "
            f"{'ms CPU':>6} {'/healthz':>8} {'sort p95':>8}  goals")  # fmt: skip
    print(head)
    for v in rows:
        x, lst = v.latency, v.list_load
        per = 1000 * lst.cpu["center"] / max(1, lst.requests)
        goals = (f"p95 {verdict(x.p(95) < GOAL_P95_MS)}, req/s "
                 f"{verdict(lst.rps >= GOAL_RPS)}")  # fmt: skip
        busy = 100 * lst.cpu["center"] / lst.seconds
        print(f"  {v.what:<36} {x.p(50):6.1f} {x.p(95):6.1f} {x.p(99):6.1f} {lst.rps:6.0f} "
              f"{busy:5.0f}% {per:6.2f} {v.health_load.rps:8.0f} {v.sort.p(95):8.1f}  "
              f"{goals}")  # fmt: skip
    print("  the indexes: " + "; ".join(i.split(" ON ")[1] for i in PROPOSED_INDEXES))
    for name, what in WHAT_IF.items():
        print(f"  {name}: {what}")


# ---- main ------------------------------------------------------------------------------------
def wait_quiet(limit: float) -> float:
    """Wait (up to ``limit`` seconds) until the machine is nearly idle: others' load moves
    every figure here. The share of one core it was busy over the last 2 s."""
    deadline = time.monotonic() + limit
    while True:
        b0 = host_busy()
        time.sleep(2)
        busy = 100 * (host_busy() - b0) / 2
        if busy < 25 or time.monotonic() > deadline:
            return busy
        log(f"the machine is busy ({busy:.0f}% of one core); waiting")


async def bench(tmp: Path, args: argparse.Namespace) -> None:
    before = wait_quiet(args.wait_quiet)
    print(f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}; {os.cpu_count()} CPUs; the "
          f"machine was {before:.0f}% busy (of one core) before the start")  # fmt: skip
    log(f"starting the replayer ({args.clusters} clusters of {args.vms} VMs)")
    rep = Replayer(tmp, args.clusters, args.vms)
    profile = tmp / "profile.json" if args.profile else None
    center: CenterProcess | None = None
    client: Client | None = None
    try:
        log("starting the center")
        center = CenterProcess(tmp, profile)
        async with httpx.AsyncClient(base_url=center.url, timeout=30) as anon:
            r = await anon.post("/v1/login", json={"user": "root", "password": center.password()})
            r.raise_for_status()
            token = r.json()["token"]
        client = Client(center.url, token, args.concurrency)
        log("registering the clusters; waiting for their VMs in the center")
        synced, inv = await setup(rep, center, client, args)
        total = await client.total("/v1/vms?limit=1")
        running = await client.total("/v1/vms?state=running&limit=1")
        rows = (await client.get("/v1/inventory/volume")).json()
        print(f"\n{args.clusters} clusters registered; {total} VMs ({running} running) and "
              f"{len(rows)} volumes in the center {synced:.1f} s after the first "
              "registration\n")  # fmt: skip
        pids = {"center": center.proc.pid, "replayer": rep.proc.pid, "client": os.getpid()}
        qs = queries(inv, running)
        log("warming up")
        for path in [*BASELINES.values(), *qs.values()]:
            await latency(client, "warm-up", path, 30, 0)

        log(f"latency, one request at a time ({args.samples} each)")
        base_lat = [await latency(client, w, p, args.samples, 1) for w, p in BASELINES.items()]
        lat = [await latency(client, w, p, args.samples, 2) for w, p in qs.items()]
        print_latencies(base_lat + lat, base_lat[0])

        log(f"requests per second ({args.concurrency} clients, {args.seconds:.0f} s each)")
        loads = []
        for what, path in [*BASELINES.items(), (FILTERED, qs[FILTERED])]:
            sampled = what == FILTERED and args.profile == "list"
            if sampled:
                center.signal(signal.SIGUSR1)
            loads.append(await load(client, what, path, args.concurrency, args.seconds, pids))
            if sampled:
                center.signal(signal.SIGUSR2)
        print_loads(loads, loads[0], args.concurrency)

        log("where one filtered page's time goes")
        db_path = center.data_dir / "center.db"
        now, plans = breakdown(db_path, token, running, args.samples)
        indexed = with_indexes(db_path, tmp / "indexed.db")
        then, plans_then = breakdown(indexed, token, running, args.samples)
        print(f"\nWhere one filtered page's time goes: in-process on the center's database, no "
              f"HTTP, no thread pool;\nmedian ms of {args.samples}, as is and on a copy with the "
              f"proposed indexes ({len(PROPOSED_INDEXES)}, see PROPOSED_INDEXES):")  # fmt: skip
        print(f"  {'':<74} {'as is':>7} {'indexes':>7}")
        for what in (SESSION, ROUTE, COUNT, PAGE, OF, SERIALIZE, PAGE_FIXED, SESSION_1Q, SPLICED):
            print(f"  {what:<74} {now[what]:7.2f} {then[what]:7.2f}")
        print("  as is:")
        print("\n".join(f"    {line}" for line in plans))
        print("  with the proposed indexes:")
        print("\n".join(f"    {line}" for line in plans_then if "plan:" in line))
        middle = f"/v1/vms?state=running&limit=100&offset={running // 2}"
        asgi = ["/healthz", "/v1/session", middle]
        share = await asyncio.to_thread(
            app_share, center.data_dir, tmp / "aoc-copy", token, asgi, args.samples
        )
        print("  the whole app in-process through ASGI, one request at a time (no network, no "
              "uvicorn; httpx's client side\n  included), ms CPU per request with its "
              "thread-pool hops as always, then with the hops' functions run inline:")  # fmt: skip
        for url, hops, threads, inline in share:
            print(f"    GET {url:<52} {hops:3.0f} hops  {threads:6.2f} ms  inline {inline:6.2f} ms")

        log(f"inventory lag ({args.changes} changes)")
        idle = await lags(client, rep, inv, args.changes, 3)
        loaded_task = asyncio.ensure_future(
            load(client, "lag load", qs[FILTERED], args.concurrency, 3600, pids)
        )
        await asyncio.sleep(1)
        try:
            busy = await lags(client, rep, inv, args.changes, 4)
        finally:
            loaded_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await loaded_task
        bursts = []
        c0 = sorted(inv.vms)[len(inv.vms) // 2]
        for state in ("unknown", "running"):
            bursts.append((f"one node of {c0} -> {state}", *await burst(
                client, rep, inv, [c0], "node3", state)))  # fmt: skip
        if args.profile == "burst":
            center.signal(signal.SIGUSR1)
        for state in ("unknown", "running"):
            bursts.append((f"one node of every cluster -> {state}", *await burst(
                client, rep, inv, sorted(inv.vms), "node5", state)))  # fmt: skip
        if args.profile == "burst":
            center.signal(signal.SIGUSR2)
        print(f"\nInventory lag: a VM changes state in its cluster, until the center's "
              f"GET /v1/clusters/{{c}}/vms/{{name}} shows it (polled every "
              f"{POLL * 1000:.0f} ms):")  # fmt: skip
        print_lag("idle", idle, True)
        print_lag(f"while {args.concurrency} clients load the filtered page", busy, True)
        print("  bursts (one revision per cluster; until the last change shows):")
        for what, count, secs in bursts:
            print(f"    {what:<42} {count:>5} changes  {secs * 1000:8.0f} ms  "
                  f"({1000 * secs / count:.2f} ms per change)")  # fmt: skip
        keep, mark = write_costs(db_path, tmp / "writes.db", "c01", inv.vms["c01"], 200)
        print(f"  one event's two write transactions alone, in-process (no other writer): "
              f"_keep {keep:.2f} ms, _mark {mark:.2f} ms (median of 200)")  # fmt: skip
        stats = (await client.http.get(rep.control + "/_bench/stats")).json()
        reads: collections.Counter[str] = collections.Counter()
        for k, n in stats.items():
            reads[k.split(" ", 1)[1]] += n
        print("  what the center read of the clusters in this run: "
              + ", ".join(f"{k} x{n}" for k, n in sorted(reads.items())))  # fmt: skip

        f = next(x for x in lat if x.what == FILTERED)
        fl = next(x for x in loads if x.what == FILTERED)
        worst = max(idle + busy)
        print("\nGoals (issue 13):")
        print(f"  p95 of a filtered page of 100 VMs out of {total}: {f.p(95):7.1f} ms   "
              f"goal < {GOAL_P95_MS:.0f} ms   {verdict(f.p(95) < GOAL_P95_MS)}"
              f"   (baseline /healthz p95 {base_lat[0].p(95):.1f} ms)")  # fmt: skip
        print(f"  requests/s of that list ({args.concurrency} clients): {fl.rps:9.0f}/s     "
              f"goal >= {GOAL_RPS:.0f}/s  {verdict(fl.rps >= GOAL_RPS)}"
              f"   (baseline /healthz {loads[0].rps:.0f}/s, /v1/session "
              f"{loads[1].rps:.0f}/s)")  # fmt: skip
        print(f"  inventory lag, worst of {len(idle + busy)}: {worst * 1000:20.0f} ms   "
              f"goal < {GOAL_LAG_S * 1000:.0f} ms  {verdict(worst < GOAL_LAG_S)}"
              f"   (p50 idle {pct(idle, 50) * 1000:.0f} ms)")  # fmt: skip
        if args.what_if:
            log("what-if: the SQL fixes; then with uvloop too")
            sorted_lat = next(x for x in lat if x.what == SORTED)
            variants = [measure_variant_from(f, sorted_lat, fl, loads[0])]
            center.stop()
            with_indexes(db_path)
            for label, fixes in (
                ("+ indexes, ORDER BY fixed", ("orderby",)),
                ("+ indexes, ORDER BY fixed, uvloop", ("orderby", "uvloop")),
            ):
                await client.http.aclose()
                center, client = await restart(tmp, center, token, args.concurrency, fixes)
                pids["center"] = center.proc.pid
                variants.append(await measure_variant(label, client, pids, qs, args))
            print_variants(variants)
        if profile is not None:
            phases = {"list": "the filtered-page load", "burst": "the bursts in every cluster"}
            print_profile(profile, phases[args.profile])
    except BaseException:
        if center is not None:
            print(f"--- center.log (tail) ---\n{center.log.read_text()[-3000:]}", file=sys.stderr)
        print(f"--- replayer.log (tail) ---\n{rep.log.read_text()[-2000:]}", file=sys.stderr)
        raise
    finally:
        if client is not None:
            await client.http.aclose()
        if center is not None:
            center.stop()
        rep.stop()


def lighten_httpx() -> None:
    """httpcore asks ``sniffio`` which async library runs, 4 times per request; sniffio is
    not installed here (anyio 4.16 no longer needs it), so each is a failed import that
    searches sys.path again. The client answers for itself: asyncio. (The center pays.)"""
    import importlib.util

    import httpcore._synchronization as sync

    if importlib.util.find_spec("sniffio") is None:
        sync.current_async_library = lambda: "asyncio"


def main() -> None:
    if len(sys.argv) > 3 and sys.argv[1] == "--wrapped-center":
        wrapped_center(sys.argv[2], sys.argv[3], sys.argv[4:])
        return
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--clusters", type=int, default=10)
    ap.add_argument("--vms", type=int, default=1000, help="VMs per cluster")
    ap.add_argument("--samples", type=int, default=500, help="requests per latency figure")
    ap.add_argument("--seconds", type=float, default=10.0, help="seconds per load figure")
    ap.add_argument("--concurrency", type=int, default=4, help="clients of the load figures")
    ap.add_argument("--changes", type=int, default=50, help="changes per lag figure")
    ap.add_argument("--quick", action="store_true", help="100 samples, 3 s, 10 changes")
    ap.add_argument(
        "--profile", choices=("list", "burst"),
        help="sample the center's stacks under the filtered-page load, or the bursts",
    )  # fmt: skip
    ap.add_argument("--keep", action="store_true", help="keep the temp dir (logs, database)")
    ap.add_argument(
        "--wait-quiet", type=float, default=0.0, metavar="S",
        help="first wait up to S seconds for the machine to be idle",
    )  # fmt: skip
    ap.add_argument(
        "--no-what-if", dest="what_if", action="store_false",
        help="skip the restarts with the proposed indexes and uvloop",
    )  # fmt: skip
    args = ap.parse_args()
    if args.quick:
        args.samples, args.seconds, args.changes = 100, 3.0, 10
    lighten_httpx()  # the client: as little of the machine as it can (docs/benchmarks.md)
    with contextlib.ExitStack() as stack:
        if args.keep:
            d = tempfile.mkdtemp(prefix="aecp-bench-center-", dir="/tmp")
            log(f"keeping {d}")
        else:
            d = stack.enter_context(tempfile.TemporaryDirectory(prefix="aecp-bench-center-"))
        with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
            runner.run(bench(Path(d), args))


if __name__ == "__main__":
    main()
