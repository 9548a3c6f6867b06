"""The operation center's HA trio: failovers under continuous writes, and what synchronous
replication costs, in the same run.

On a lab trio of its own (``aecp.lab.centerha``: etcd, Patroni, PostgreSQL 15, agents and
centers in three network namespaces; root), it measures:

- **failovers**: ``--failovers`` drills in a row (``aecp.lab.drill.run_drill``, the code of
  ``aecp drill center-failover``): writes through the management IP, the active's node
  ``SIGKILL``ed, the RTO as the client saw it (last acknowledged write before the kill to the
  first after), when the management IP moved, the acknowledged writes lost (read back), then
  the old active restarted and waited for until it is the passive, in sync. The active
  alternates. Goals (issue 15): RTO median under 15 s; 0 lost.
- **synchronous replication's cost**, on the same trio: (a) the center's writes through the
  management IP (one client, one write after the other, ``--load-s`` seconds): throughput and
  median latency with the trio whole (every commit waits for the passive) against the same
  center with the passive's node killed (Patroni drops ``synchronous_standby_names``: a single
  PostgreSQL without a standby); (b) raw commit latency on the primary with psycopg:
  ``--commits`` autocommit INSERTs into a scratch table with ``synchronous_commit = on`` (waits
  for the passive) against ``SET synchronous_commit = local`` (the local WAL flush only),
  interleaved in blocks of 50; and the same INSERTs again while the passive is down. Goal:
  synchronous commit at most 2x a local commit.

A measurement, not a test: it exits 0 unless something broke.

Usage: .venv/bin/python benchmarks/center_ha.py [--failovers 10] [--load-s 20] [--commits 500]
       [--quick] [--wait-quiet S]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import shutil
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

import httpx
import psycopg

from aecp.center.ha import patroni as pat
from aecp.center.ha.topology import PG_PORT
from aecp.lab.centerha import Trio, TrioPlan
from aecp.lab.drill import DrillReport, read_status, root_password, run_drill, wait_whole
from aecp.lab.hawriter import Writer

HA_CIDR = "10.232.90.0/24"
MGMT_CIDR = "10.233.90.0/24"
TABLE = "aecp_bench_commit"
BLOCK = 50


def log(msg: str) -> None:
    print(f"  [{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def other_trios(mine: str) -> list[str]:
    """Lab trios' namespaces (``aecp-t*-c*``) that are not this run's."""
    out = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, check=False)
    names = [line.split()[0] for line in out.stdout.splitlines() if line.strip()]
    return [
        n for n in names if n.startswith("aecp-t") and "-c" in n and not n.startswith(mine + "-")
    ]


def wait_for_no_other_trio(mine: str, limit: float) -> list[str]:
    """Wait (up to ``limit`` s, a look every 30 s) until no other lab trio runs: each one
    shares the two cores. The other trios' namespaces at the end."""
    deadline = time.monotonic() + limit
    while True:
        found = other_trios(mine)
        if not found or time.monotonic() > deadline:
            return found
        log(f"other trios run ({', '.join(found)}); waiting")
        time.sleep(30)


def pct(values: list[float], p: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(p / 100 * len(ordered)))]


# ---- failovers ------------------------------------------------------------------------------


async def failovers(trio: Trio, n: int, writes_before: int) -> list[DrillReport]:
    reports = []
    for i in range(1, n + 1):
        report = await run_drill(trio, writes_before=writes_before, restore=True)
        reports.append(report)
        log(
            f"failover {i}/{n}: {report.old_active} -> {report.new_active} (etcd leader "
            f"{report.etcd_leader_before}): "
            f"RTO {_s(report.rto_s)}, IP moved {_s(report.ip_moved_s)}, "
            f"{report.acknowledged} acknowledged, {report.ambiguous} ambiguous, "
            f"{report.lost} lost, IP on two {report.ip_on_two}, "
            f"back in sync: {report.restored}"
        )
        if not report.restored:
            log("the old active did not come back in sync: no more failovers")
            break
    return reports


def _s(v: float | None) -> str:
    return "-" if v is None else f"{v:.1f} s"


# ---- synchronous replication's cost ---------------------------------------------------------


async def write_load(trio: Trio, seconds: float, prefix: str) -> tuple[float, list[float], int]:
    """One client writing through the management IP for ``seconds``: acknowledged writes per
    second, each acknowledged write's latency (ms), and the failed writes."""
    w = Writer(trio.center_url, "root", root_password(trio), prefix=prefix, timeout=10.0)
    latencies: list[float] = []
    async with httpx.AsyncClient() as http:
        await w.login(http)
        for _ in range(20):  # warm-up: connections, the center's caches
            await w.write_once(http)
        n0 = len(w.acked)
        t_end = time.perf_counter() + seconds
        while (t0 := time.perf_counter()) < t_end:
            if await w.write_once(http) is not None:
                latencies.append((time.perf_counter() - t0) * 1000)
        took = seconds + (time.perf_counter() - t_end)
    return (len(w.acked) - n0) / took, latencies, len(w.failures)


def connect(trio: Trio, leader: str) -> psycopg.Connection[tuple[object, ...]]:
    """The superuser on the primary's PostgreSQL, the center's database, autocommit."""
    k = [n.name for n in trio.topology().nodes].index(leader) + 1
    return psycopg.connect(
        host=trio.plan.address("ha", k),
        port=PG_PORT,
        user="postgres",
        password=trio.secrets().superuser,
        dbname=pat.CENTER_DB,
        autocommit=True,
        connect_timeout=5,
    )


def commits(
    conn: psycopg.Connection[tuple[object, ...]], n: int, modes: tuple[str, ...]
) -> dict[str, list[float]]:
    """``n`` autocommit INSERTs per ``synchronous_commit`` mode, interleaved in blocks of
    ``BLOCK``; each one's latency (ms) per mode."""
    out: dict[str, list[float]] = {m: [] for m in modes}
    for _ in range(max(1, n // BLOCK)):
        for mode in modes:
            conn.execute(f"SET synchronous_commit = {mode}")
            for i in range(BLOCK):
                t0 = time.perf_counter()
                conn.execute(f"INSERT INTO {TABLE} (v) VALUES (%s)", (i,))
                out[mode].append((time.perf_counter() - t0) * 1000)
    return out


def synchronous_names(conn: psycopg.Connection[tuple[object, ...]]) -> str:
    row = conn.execute("SHOW synchronous_standby_names").fetchone()
    return "" if row is None else str(row[0])


async def sync_cost(trio: Trio, args: argparse.Namespace) -> dict[str, object]:
    async with httpx.AsyncClient() as http:
        st = await read_status(trio, http)
    leader = st.leader
    assert leader is not None
    passive = next(n.name for n in trio.topology().data_nodes if n.name != leader)
    k_passive = [n.name for n in trio.topology().nodes].index(passive) + 1
    conn = connect(trio, leader)
    try:
        conn.execute(f"CREATE TABLE IF NOT EXISTS {TABLE} (id bigserial PRIMARY KEY, v int)")
        names = synchronous_names(conn)
        log(f"{leader} is the primary, synchronous_standby_names = {names!r}")
        log(f"(a) {args.load_s:.0f} s of writes through the management IP, the trio whole")
        sync_tput, sync_lat, sync_fail = await write_load(trio, args.load_s, "bench-sync")
        log(f"(b) {args.commits} commits each: synchronous_commit on / local")
        raw = await asyncio.to_thread(commits, conn, args.commits, ("on", "local"))
        log(f"killing {passive}, the passive; waiting until {leader} has no synchronous standby")
        trio.kill_node(k_passive)
        t_kill = time.monotonic()
        while synchronous_names(conn) != "":
            if time.monotonic() - t_kill > 120:
                raise RuntimeError("synchronous_standby_names was not cleared in 120 s")
            await asyncio.sleep(0.2)
        dropped = time.monotonic() - t_kill
        log(f"synchronous_standby_names cleared {dropped:.1f} s after the kill")
        log(f"(a) {args.load_s:.0f} s of writes, no standby")
        single_tput, single_lat, single_fail = await write_load(trio, args.load_s, "bench-one")
        log(f"(b) {args.commits} commits, no standby")
        alone = await asyncio.to_thread(commits, conn, args.commits, ("on",))
        conn.execute(f"DROP TABLE {TABLE}")
    finally:
        conn.close()
    log(f"restarting {passive}; waiting until it is in sync again")
    trio.start_node(k_passive)
    if await wait_whole(trio, leader, 240) is None:
        log(f"warning: {passive} did not come back in sync in 240 s")
    return {
        "sync_tput": sync_tput, "sync_lat": sync_lat, "sync_fail": sync_fail,
        "single_tput": single_tput, "single_lat": single_lat, "single_fail": single_fail,
        "commit_on": raw["on"], "commit_local": raw["local"], "commit_alone": alone["on"],
        "dropped_s": dropped,
    }  # fmt: skip


# ---- report ---------------------------------------------------------------------------------


def report(reports: list[DrillReport], cost: dict[str, object], timing: pat.Timing) -> None:
    rtos = [r.rto_s for r in reports if r.rto_s is not None]
    moved = [r.ip_moved_s for r in reports if r.ip_moved_s is not None]
    lost = sum(r.lost for r in reports)
    print(
        f"\nfailovers: {len(reports)} (Patroni ttl {timing.ttl} s, loop_wait "
        f"{timing.loop_wait} s, retry_timeout {timing.retry_timeout} s)"
    )
    print(f"  RTOs (s): {[round(x, 1) for x in rtos]}")
    if len(rtos) < len(reports):
        print(f"  {len(reports) - len(rtos)} failovers with no write acknowledged after the kill")
    print(f"{'figure':>34} | {'this run':>9} | goal")
    if rtos:
        print(f"{'RTO median (client)':>34} | {statistics.median(rtos):>7.1f} s | < 15 s")
        print(f"{'RTO worst (client)':>34} | {max(rtos):>7.1f} s |")
    if moved:
        print(f"{'management IP moved, median':>34} | {statistics.median(moved):>7.1f} s |")
    for same, label in ((True, "etcd leader on the killed node"), (False, "etcd leader elsewhere")):
        part = [
            r.rto_s
            for r in reports
            if r.rto_s is not None and (r.etcd_leader_before == r.old_active) is same
        ]
        if part:
            print(
                f"{'RTO median, ' + label:>34} | {statistics.median(part):>7.1f} s | ({len(part)})"
            )
    print(f"{'lost acknowledged writes':>34} | {lost:>9} | 0")
    print(f"{'management IP on two (samples)':>34} | {sum(r.ip_on_two for r in reports):>9} | 0")
    print(f"{'ambiguous writes (all failovers)':>34} | {sum(r.ambiguous for r in reports):>9} |")
    print(f"{'old active back in sync':>34} | {sum(bool(r.restored) for r in reports):>9} |")
    if not cost:
        return
    lat = {k: v for k, v in cost.items() if isinstance(v, list)}
    num = {k: v for k, v in cost.items() if isinstance(v, float | int)}
    print(
        f"\nsynchronous replication's cost (passive down: synchronous_standby_names cleared "
        f"{num['dropped_s']:.1f} s after its kill)"
    )
    print(f"{'figure':>38} | {'synchronous':>11} | {'baseline':>9} | {'ratio':>6} | goal")
    rows = [
        ("writes through the IP, per s", num["sync_tput"], num["single_tput"], "/s", ""),
        ("write latency p50 (no standby)", statistics.median(lat["sync_lat"]),
         statistics.median(lat["single_lat"]), "ms", ""),
        ("write latency p95 (no standby)", pct(lat["sync_lat"], 95),
         pct(lat["single_lat"], 95), "ms", ""),
        ("commit p50 (vs local, same session)", statistics.median(lat["commit_on"]),
         statistics.median(lat["commit_local"]), "ms", "<= 2x"),
        ("commit p95 (vs local, same session)", pct(lat["commit_on"], 95),
         pct(lat["commit_local"], 95), "ms", ""),
        ("commit p50 (vs no standby)", statistics.median(lat["commit_on"]),
         statistics.median(lat["commit_alone"]), "ms", ""),
    ]  # fmt: skip
    for name, figure, base, unit, goal in rows:
        ratio = figure / base if base else float("inf")
        print(
            f"{name:>38} | {figure:>8.2f} {unit:<2} | {base:>6.2f} {unit:<2} | "
            f"{ratio:>5.2f}x | {goal}"
        )
    print(
        f"  writes measured: {len(lat['sync_lat'])} synchronous ({num['sync_fail']} failed), "
        f"{len(lat['single_lat'])} without a standby ({num['single_fail']} failed); commits: "
        f"{len(lat['commit_on'])} on, {len(lat['commit_local'])} local, "
        f"{len(lat['commit_alone'])} without a standby"
    )


async def bench(root: Path, args: argparse.Namespace) -> None:
    lab_id = "t" + os.urandom(1).hex()
    plan = TrioPlan(lab_id, HA_CIDR, MGMT_CIDR)
    others = wait_for_no_other_trio(f"aecp-{lab_id}", args.wait_quiet)
    print(
        f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}; {os.cpu_count()} CPUs; "
        f"trio {lab_id} on {HA_CIDR} / {MGMT_CIDR}; other lab trios running: "
        f"{', '.join(others) or 'none'}",
        flush=True,
    )
    trio = Trio(root / "trio", plan)
    try:
        log("creating and starting the trio")
        await trio.create()
        await trio.start()
        st = await trio.wait_ready(180)
        log(f"ready: {st.leader} active, {st.rpo.text}")
        reports = await failovers(trio, args.failovers, args.writes_before)
        cost = await sync_cost(trio, args) if args.load_s > 0 else {}
    finally:
        log("destroying the trio")
        await trio.destroy()
    report(reports, cost, pat.Timing())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--failovers", type=int, default=10)
    ap.add_argument("--writes-before", type=int, default=50, help="acks before each kill")
    ap.add_argument("--load-s", type=float, default=20.0, help="seconds per write load")
    ap.add_argument("--commits", type=int, default=500, help="INSERTs per commit mode")
    ap.add_argument("--quick", action="store_true", help="2 failovers, 5 s loads, 100 commits")
    ap.add_argument(
        "--wait-quiet", type=float, default=0.0, metavar="S",
        help="first wait up to S seconds until no other lab trio (aecp-t*-c*) runs",
    )  # fmt: skip
    ap.add_argument("--keep", action="store_true", help="keep the trio's directory (logs)")
    args = ap.parse_args()
    if os.geteuid() != 0:
        raise SystemExit("the HA trio needs root (network namespaces)")
    if args.quick:
        args.failovers, args.load_s, args.commits = 2, 5.0, 100
    root = Path(tempfile.mkdtemp(prefix="aecp-bench-ha-", dir="/tmp"))
    os.chmod(root, 0o755)  # PostgreSQL runs as user postgres
    try:
        asyncio.run(bench(root, args))
    finally:
        if args.keep:
            print(f"kept {root}")
        else:
            with contextlib.suppress(OSError):
                shutil.rmtree(root)


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    main()
