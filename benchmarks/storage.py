"""ABS (the replicated block store) against qemu-nbd, measured with fio over NBD on a 3-node lab.

One run starts a 3-node lab (subnet 127.0.80, in a temp dir on /tmp) and, on the same disk, a
``qemu-nbd --cache=writeback`` serving a raw file of the same size (the baseline: acknowledged in
memory, durable on flush/FUA, as ABS). Volumes with replication factor 1, 2 and 3 are exported
through node1. Every target is first filled end to end with a 1 MiB sequential write, so reads
hit allocated data and writes overwrite allocated extents. Then each fio job (4k random read and
write at QD1 and QD32, 1M sequential read and write at QD8) runs against qemu-nbd and ABS
factor 1, 2, 3, interleaved (the order rotates per job and round) to reduce drift, each after
the page cache is written back (``settle``: a job does not pay for the writeback of the ones
before it); each figure is the round with the median IOPS (3 rounds; 1 with --quick, which
also cuts jobs to 3 s). srv% is the CPU time of the serving processes (qemu-nbd; all three
storage servers for ABS), host% that of the whole machine (fio included), both in percent of one
core over the job. Volumes are 1 GiB by default (``SIZE_NOTE`` says why). Last, snapshot and
clone creation times of a 1 GiB and a 1 TiB thin volume (64 MiB written, factor 2), median of 5
each, as seen by an API client.
--profile adds an extra run of 4k randwrite QD32 on factor 2 under py-spy (node1's server);
--profile-job and --profile-factor choose another job or factor.

Usage: .venv/bin/python benchmarks/storage.py [--quick] [--runtime S] [--size-gib N]
       [--rounds N] [--profile]
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

from aecp.lab.harness import Lab, LabSpec

SUBNET = "127.0.80"
QEMU_HOST = f"{SUBNET}.9"
MIB, GIB = 1 << 20, 1 << 30
TICK = os.sysconf("SC_CLK_TCK")
RATE = 200  # py-spy samples per second
JOBS = [  # name, fio rw, block size, queue depth
    ("4k randread QD1", "randread", "4k", 1), ("4k randread QD32", "randread", "4k", 32),
    ("4k randwrite QD1", "randwrite", "4k", 1), ("4k randwrite QD32", "randwrite", "4k", 32),
    ("1M seqread QD8", "read", "1M", 8), ("1M seqwrite QD8", "write", "1M", 8),
]  # fmt: skip
TARGETS = ["qemu-nbd", "abs-f1", "abs-f2", "abs-f3"]
SIZE_NOTE = """The default size is 1 GiB because the three "nodes" share one page cache. The
kernel starts throttling writers once dirty pages pass (dirty_background_ratio +
dirty_ratio) / 2 of memory, 3.45 GiB here. Three machines would each have that allowance for
their own replica; this one has it once for all three. With 2 GiB volumes a factor-3 write
job leaves up to 6 GiB dirty and is throttled to the disk's writeback speed, which measures
the lab's sharing, not ABS; with 1 GiB it leaves at most 3 GiB. --size-gib 2 reproduces the
earlier runs."""
RANDOM, SEQUENTIAL = (
    ["4k randread QD32", "4k randwrite QD32"],
    ["1M seqread QD8", "1M seqwrite QD8"],
)
GOALS = [  # target, jobs, minimum ratio to qemu-nbd (from the issue)
    ("abs-f1", RANDOM, 1.00), ("abs-f2", RANDOM, 0.50), ("abs-f3", RANDOM, 0.35),
    ("abs-f1", SEQUENTIAL, 0.80), ("abs-f2", SEQUENTIAL, 0.80), ("abs-f3", SEQUENTIAL, 0.80),
]  # fmt: skip


@dataclass
class Result:
    iops: float
    mib: float
    p99_us: float
    cpu: float  # percent of one core used by the serving processes
    host: float  # percent of one core used by the whole machine (fio, etcd, agents, ...)


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def cpu_seconds(pids: list[int]) -> float:
    total = 0
    for pid in pids:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        total += int(fields[11]) + int(fields[12])
    return total / TICK


def host_ticks() -> tuple[int, int]:
    """Busy and total jiffies of all CPUs since boot (/proc/stat)."""
    v = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    return sum(v) - v[3] - v[4], sum(v)


def fio(
    uri: str, rw: str, bs: str, qd: int, size: int, runtime: int | None, pids: list[int]
) -> Result:
    """One fio job over NBD; ``runtime`` None runs once over ``size`` (the fill)."""
    argv = ["fio", "--name=bench", "--ioengine=nbd", f"--uri={uri}", f"--rw={rw}", f"--bs={bs}",
            f"--iodepth={qd}", f"--size={size}", "--output-format=json"]  # fmt: skip
    if runtime is not None:
        argv += ["--time_based", f"--runtime={runtime}"]
    t0, c0, (b0, a0) = time.monotonic(), cpu_seconds(pids), host_ticks()
    out = subprocess.run(argv, capture_output=True, text=True, check=False)  # noqa: S603
    if out.returncode != 0:
        raise RuntimeError(f"fio {rw} {bs} QD{qd} on {uri} failed: {out.stderr[-800:]}")
    cpu = 100 * (cpu_seconds(pids) - c0) / (time.monotonic() - t0)
    (b1, a1), ncpu = host_ticks(), os.cpu_count() or 1
    host = 100 * ncpu * (b1 - b0) / max(1, a1 - a0)
    job = json.loads(out.stdout[out.stdout.index("{") :])["jobs"][0]
    side = job["read"] if "read" in rw else job["write"]
    p99 = side["clat_ns"].get("percentile", {}).get("99.000000", 0) / 1000
    return Result(side["iops"], side["bw_bytes"] / MIB, p99, cpu, host)


def dirty_bytes() -> int:
    """Page-cache bytes dirty or under writeback, machine-wide (/proc/meminfo)."""
    fields = dict(line.split(":", 1) for line in Path("/proc/meminfo").read_text().splitlines())
    return sum(int(fields[k].split()[0]) << 10 for k in ("Dirty", "Writeback"))


def settle(limit: int = 64 * MIB, timeout: float = 120.0) -> None:
    """Write back the page cache (``sync``) and wait until at most ``limit`` bytes are dirty,
    so that every job starts from the same state: the three "nodes" share this machine's page
    cache, and a job would otherwise pay for the writeback of the jobs before it."""
    deadline = time.monotonic() + timeout
    os.sync()
    while dirty_bytes() > limit and time.monotonic() < deadline:
        time.sleep(0.2)


def free_port(host: str) -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        port: int = s.getsockname()[1]
        return port


def start_qemu_nbd(image: Path, port: int) -> subprocess.Popen[bytes]:
    argv = ["qemu-nbd", "-t", "--cache=writeback", "-f", "raw", "--bind", QEMU_HOST,
            "--port", str(port), "-x", "disk", str(image)]  # fmt: skip
    proc = subprocess.Popen(argv, stderr=subprocess.DEVNULL)  # noqa: S603 - argv list
    for _ in range(100):
        with socket.socket() as s:
            if s.connect_ex((QEMU_HOST, port)) == 0:
                return proc
        time.sleep(0.1)
    raise RuntimeError(f"qemu-nbd does not listen on {QEMU_HOST}:{port}")


class Api:
    def __init__(self, lab: Lab) -> None:
        self.base = lab.api_url("node1")
        self.http = httpx.AsyncClient(
            timeout=120, headers={"authorization": f"Bearer {lab.token()}"}
        )

    async def call(self, method: str, path: str, **kw: Any) -> Any:
        r = await self.http.request(method, self.base + path, **kw)
        if r.status_code >= 400:
            raise RuntimeError(f"{method} {path}: {r.status_code} {r.text}")
        return r.json() if r.content else None

    async def timed(self, method: str, path: str, **kw: Any) -> float:
        t0 = time.perf_counter()
        await self.call(method, path, **kw)
        return (time.perf_counter() - t0) * 1000

    async def poll(self, path: str, ok: Callable[[Any], bool], what: str, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with contextlib.suppress(RuntimeError, httpx.HTTPError):
                if ok(await self.call("GET", path)):
                    return
            await asyncio.sleep(0.2)
        raise RuntimeError(f"timed out after {timeout}s waiting for {what}")

    async def volume(self, name: str, size: int, replicas: int) -> str:
        await self.call(
            "POST", "/v1/volumes", json={"name": name, "size": size, "replicas": replicas}
        )
        export = await self.call("GET", f"/v1/volumes/{name}/export", params={"node": "node1"})
        return str(export["uri"])


def run_jobs(
    uris: dict[str, str], pids: dict[str, list[int]], size: int, args: argparse.Namespace
) -> dict[tuple[str, str], Result]:
    results: dict[tuple[str, str], Result] = {}
    for j, (name, rw, bs, qd) in enumerate(JOBS):
        runs: dict[str, list[Result]] = collections.defaultdict(list)
        for r in range(args.rounds):
            k = (j + r) % len(TARGETS)
            for target in TARGETS[k:] + TARGETS[:k]:
                settle()
                x = fio(uris[target], rw, bs, qd, size, args.runtime, pids[target])
                log(f"{name} on {target}: {x.iops:.0f} IOPS, srv {x.cpu:.0f}%, host {x.host:.0f}%")
                runs[target].append(x)
        for target, rs in runs.items():  # the round with the median IOPS
            results[(name, target)] = sorted(rs, key=lambda x: x.iops)[len(rs) // 2]
    return results


def print_table(results: dict[tuple[str, str], Result]) -> None:
    head = f"{'job':<18} {'target':<9} {'IOPS':>7} {'MiB/s':>7} {'p99 us':>7} srv% host%  ratio"
    print(head)
    print("-" * len(head))
    for name, *_ in JOBS:
        base = results[(name, "qemu-nbd")].iops
        for target in TARGETS:
            x = results[(name, target)]
            ratio = f"{x.iops / base:5.2f}" if target != "qemu-nbd" else "    -"
            print(
                f"{name:<18} {target:<9} {x.iops:>7.0f} {x.mib:>7.1f} {x.p99_us:>7.0f}"
                f" {x.cpu:>4.0f} {x.host:>5.0f}  {ratio}"
            )
    print("\nGoals (ABS IOPS / qemu-nbd IOPS, same job, same run):")
    for target, jobs, need in GOALS:
        for name in jobs:
            got = results[(name, target)].iops / results[(name, "qemu-nbd")].iops
            verdict = "MET" if got >= need else "NOT MET"
            print(f"  {target} {name:<18} >= {need:4.0%}: {got:6.1%}  {verdict}")


def profile(
    lab: Lab, uri: str, size: int, runtime: int, pids: list[int], job: str, factor: int
) -> None:
    """py-spy on node1's storage server during an extra run of 4k ``job`` QD32."""
    pyspy = Path(sys.executable).parent / "py-spy"
    if not pyspy.exists():
        pip = [sys.executable, "-m", "pip", "install", "-q", "py-spy"]
        if subprocess.run(pip, check=False).returncode != 0:  # noqa: S603
            print("\nprofile skipped: 'pip install py-spy' failed")
            return
    pid = int((lab.node_dir("node1") / "storage.pid").read_text())
    out = lab.root.parent / "profile.txt"
    argv = [str(pyspy), "record", "--pid", str(pid), "--duration", str(runtime), "--nonblocking",
            "--nolineno", "--threads", "--rate", str(RATE), "--format", "raw",
            "--output", str(out)]  # fmt: skip
    spy = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)  # noqa: S603
    time.sleep(0.5)
    x = fio(uri, job, "4k", 32, size, runtime, pids)
    _, err = spy.communicate(timeout=runtime + 60)
    if spy.returncode != 0 or not out.exists():
        print(f"\nprofile failed: {err.decode(errors='replace').strip()[-400:]}")
        return
    own: collections.Counter[str] = collections.Counter()
    incl: collections.Counter[str] = collections.Counter()
    per_thread: collections.Counter[str] = collections.Counter()
    tids: dict[str, set[str]] = collections.defaultdict(set)
    for line in out.read_text().splitlines():  # "thread (tid): name;frame;...;frame count"
        stack, _, n = line.rpartition(" ")
        thread, *frames = stack.split(";")
        tid, _, tname = thread.partition(": ")
        group = tname.rstrip("0123456789_-") or tname
        per_thread[group] += int(n)
        tids[group].add(tid)
        if frames:
            own[frames[-1]] += int(n)
            for f in set(frames):
                if "aecp/" in f and "aecp/cli" not in f and "__main__" not in f:
                    incl[f] += int(n)
    total = sum(own.values()) or 1
    print(
        f"\nProfile: node1 storage server (pid {pid}), 4k {job} QD32 factor {factor}, {runtime}s,"
    )
    print(f"{x.iops:.0f} IOPS under the profiler; {total} non-idle samples at {RATE} Hz")
    print("  busy share of each thread (non-idle samples / possible samples):")
    for group, hits in per_thread.most_common():
        busy = 100 * hits / (RATE * runtime * len(tids[group]))
        print(f"    {group:<24} x{len(tids[group])}: {busy:5.1f}% busy each")
    for title, counts in (("self time", own), ("inclusive time (aecp code)", incl)):
        print(f"  top functions by {title}, % of non-idle samples:")
        for frame, hits in counts.most_common(12):
            print(f"    {100 * hits / total:5.1f}%  {frame[:110]}")


async def snapshot_times(api: Api, uri_of: dict[str, str]) -> None:
    print(
        "\nSnapshot and clone creation (ms, API round trip, median of 5; factor 2, 64 MiB written)"
    )
    rows: dict[str, tuple[float, float, float]] = {}
    for label, size in (("1 GiB", GIB), ("1 TiB", 1 << 40)):
        vol = f"snap-{size >> 30}g"
        uri = uri_of[vol]
        fio(uri, "write", "1M", 8, 64 * MIB, None, [])
        # the access point detaches (flush, close) after fio's connection closed
        await api.poll(f"/v1/volumes/{vol}", lambda v: v["attached_to"] is None, "detach", 60)
        snaps, clones, gets = [], [], []
        for i in range(5):
            gets.append(await api.timed("GET", f"/v1/volumes/{vol}"))
            snaps.append(
                await api.timed("POST", f"/v1/volumes/{vol}/snapshots", json={"name": f"s{i}"})
            )
            clones.append(
                await api.timed(
                    "POST", f"/v1/volumes/{vol}/snapshots/s{i}/clone", json={"name": f"{vol}-c{i}"}
                )
            )
        rows[label] = (statistics.median(snaps), statistics.median(clones), statistics.median(gets))
    print(f"  {'':<22} {'1 GiB':>8} {'1 TiB':>8}")
    for i, what in enumerate(("snapshot", "clone", "GET volume (reference)")):
        print(f"  {what:<22} {rows['1 GiB'][i]:>8.1f} {rows['1 TiB'][i]:>8.1f}")


async def configure_storage(lab: Lab, api: Api, gib: int) -> None:
    """Restart each storage server (no data yet) with two lab settings changed. Capacity: all
    nodes share one disk, and a volume's size x factor may not exceed the cluster's capacity
    (thin or not), so each offers ``gib`` GiB to admit the 1 TiB thin volume. Background work:
    the lab scrubs every 30 s and looks for repairs every 1 s (for tests); a scrub pass reads and
    verifies every replica, so the product defaults (3600 s, 5 s) are used instead."""
    for name in lab.node_names:
        cfg = lab.node_dir(name) / "node.json"
        settings = json.loads(cfg.read_text())
        settings["storage"]["capacity_gib"] = gib
        for key in ("scrub_interval_s", "recovery_interval_s"):
            settings["storage"].pop(key, None)
        cfg.write_text(json.dumps(settings, indent=2))
        lab.storage(name).stop()
        lab.storage(name).start()
    await api.poll(
        "/v1/storage",
        lambda st: sum(s["capacity_bytes"] >= gib << 30 for s in st["servers"]) == 3,
        f"3 storage servers offering {gib} GiB",
        120,
    )


async def bench(lab: Lab, tmp: Path, args: argparse.Namespace) -> None:
    size = args.size_gib * GIB
    log("starting a 3-node lab on 127.0.80")
    await lab.up(progress=log)
    api = Api(lab)
    qemu: subprocess.Popen[bytes] | None = None
    try:
        await api.poll("/v1/storage", lambda st: len(st["servers"]) == 3, "3 servers", 120)
        await configure_storage(lab, api, 1024)
        uris: dict[str, str] = {}
        for f in (1, 2, 3):
            uris[f"abs-f{f}"] = await api.volume(f"bench-f{f}", size, f)
        for vol, vsize in (("snap-1g", GIB), ("snap-1024g", 1 << 40)):
            uris[vol] = await api.volume(vol, vsize, 2)
        image = tmp / "baseline.raw"
        image.touch()
        os.truncate(image, size)
        port = free_port(QEMU_HOST)
        qemu = start_qemu_nbd(image, port)
        uris["qemu-nbd"] = f"nbd://{QEMU_HOST}:{port}/disk"
        storage = [p for n in lab.node_names if (p := lab.storage(n).pid()) is not None]
        pids = {"qemu-nbd": [qemu.pid], **{f"abs-f{f}": storage for f in (1, 2, 3)}}
        for target in TARGETS:
            log(f"filling {target} ({args.size_gib} GiB, 1M sequential writes)")
            x = fio(uris[target], "write", "1M", 8, size, None, pids[target])
            log(f"filled {target}: {x.mib:.0f} MiB/s")
        for f in (1, 2, 3):
            vol = await api.call("GET", f"/v1/volumes/bench-f{f}")
            where = collections.Counter(",".join(e["replicas"]) for e in vol["extents"])
            print(f"abs-f{f}: {vol['extents_allocated']} extents, replicas on {dict(where)}")
        print(f"\nfio over NBD, --runtime={args.runtime}s, --size={args.size_gib}GiB, "
              f"rounds={args.rounds}\n")  # fmt: skip
        print_table(run_jobs(uris, pids, size, args))
        if args.profile:
            f, job = args.profile_factor, args.profile_job
            profile(lab, uris[f"abs-f{f}"], size, args.runtime, storage, job, f)
        await snapshot_times(api, uris)
    except BaseException:
        for name in lab.node_names:
            tail = (lab.node_dir(name) / "storage.log").read_text(errors="replace")[-3000:]
            print(f"--- {name} storage.log (tail) ---\n{tail}", file=sys.stderr)
        raise
    finally:
        await api.http.aclose()
        if qemu is not None:
            os.kill(qemu.pid, signal.SIGTERM)
            qemu.wait(timeout=30)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runtime", type=int, default=10, help="seconds per fio job")
    ap.add_argument("--quick", action="store_true", help="3 s per fio job")
    ap.add_argument(
        "--size-gib", type=int, default=1, help="volume and baseline file size (see SIZE_NOTE)"
    )
    ap.add_argument("--rounds", type=int, help="runs per job and target, median (default 3)")
    ap.add_argument("--profile", action="store_true", help="py-spy on node1's storage server")
    ap.add_argument("--profile-job", choices=("randwrite", "randread"), default="randwrite")
    ap.add_argument("--profile-factor", type=int, choices=(1, 2, 3), default=2)
    args = ap.parse_args()
    if args.quick:
        args.runtime = 3
    args.rounds = args.rounds or (1 if args.quick else 3)
    with tempfile.TemporaryDirectory(prefix="aecp-bench-", dir="/tmp") as d:
        tmp = Path(d)
        lab = Lab(
            tmp / "lab",
            LabSpec(nodes=3, subnet=SUBNET, accel="tcg", node_memory_mib=2048, extent_mib=256),
        )
        try:
            asyncio.run(bench(lab, tmp, args))
        finally:
            if (lab.root / "lab.json").exists():
                lab.down()


if __name__ == "__main__":
    main()
