"""ABS (the replicated block store) against qemu-nbd, measured with fio over NBD on a 3-node lab.

One run starts a 3-node lab (subnet 127.0.80, in a temp dir on /tmp; replica connections
authenticated, as always) and, on the same disk, ``qemu-nbd --cache=writeback`` serving raw
files of the same size (the baseline: acknowledged in memory, durable on flush/FUA, as ABS).
Two paths are measured, each against its own baseline:

- the path VMs use: ABS volumes of replication factor 1, 2 and 3 on node1's local Unix
  socket, against qemu-nbd on a Unix socket;
- the outside path: the factor-2 volume exported over TCP with TLS (an export credential,
  ``aecp volume export``), against ``qemu-nbd --tls-creds`` with the same credentials (node1's
  certificate and key, the export's client credential). fio's nbd engine reads the credential
  from ~/.pki/libnbd, so it runs as nobody for these targets.

Every target is first filled end to end with a 1 MiB sequential write, so reads hit allocated
data and writes overwrite allocated extents. Then each fio job (4k random read and write at QD1
and QD32, 1M sequential read and write at QD8) runs against every target, interleaved (the
order rotates per job and round) to reduce drift, each after the page cache is written back
(``settle``: a job does not pay for the writeback of the ones before it); each figure is the
round with the median IOPS (3 rounds; 1 with --quick, which also cuts jobs to 3 s). srv% is the
CPU time of the serving processes (qemu-nbd; all three storage servers for ABS), host% that of
the whole machine (fio included), both in percent of one core over the job. Volumes are 1 GiB
by default (``SIZE_NOTE`` says why). Then, unless --no-encryption, the storage servers restart
with replica encryption on (TLS between them) and the jobs run again on factor 2 and its
baseline: what encryption costs. Last, snapshot and clone creation times of a 1 GiB and a 1 TiB
thin volume (64 MiB written, factor 2), median of 5 each, as seen by an API client.
--profile adds an extra run of 4k randwrite QD32 on factor 2 under py-spy (node1's server);
--profile-job and --profile-factor choose another job or factor.

Usage: .venv/bin/python benchmarks/storage.py [--quick] [--runtime S] [--size-gib N]
       [--rounds N] [--profile] [--no-encryption]
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

from aecp.cli.volume import write_credentials
from aecp.common.pki import grant_credential
from aecp.lab.harness import Lab, LabSpec
from aecp.node.vmdisks import local_uri

SUBNET = "127.0.80"
NODE1 = f"{SUBNET}.1"  # qemu-nbd's TLS port is on node1's address: its certificate names it
NOBODY = 65534
MIB, GIB = 1 << 20, 1 << 30
TICK = os.sysconf("SC_CLK_TCK")
RATE = 200  # py-spy samples per second
JOBS = [  # name, fio rw, block size, queue depth
    ("4k randread QD1", "randread", "4k", 1), ("4k randread QD32", "randread", "4k", 32),
    ("4k randwrite QD1", "randwrite", "4k", 1), ("4k randwrite QD32", "randwrite", "4k", 32),
    ("1M seqread QD8", "read", "1M", 8), ("1M seqwrite QD8", "write", "1M", 8),
]  # fmt: skip
TARGETS = ["qemu-nbd", "abs-f1", "abs-f2", "abs-f3", "qemu-nbd-tls", "abs-f2-tls"]
BASELINE = {  # what each ABS target is compared with
    "abs-f1": "qemu-nbd", "abs-f2": "qemu-nbd", "abs-f3": "qemu-nbd", "abs-f2-tls": "qemu-nbd-tls",
}  # fmt: skip
ENCRYPTED_TARGETS = ["qemu-nbd", "abs-f2"]
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


@dataclass(frozen=True)
class Target:
    uri: str
    pids: list[int]
    home: Path | None = None  # TLS: fio runs as nobody with its credential in here


def fio(target: Target, rw: str, bs: str, qd: int, size: int, runtime: int | None) -> Result:
    """One fio job over NBD; ``runtime`` None runs once over ``size`` (the fill)."""
    uri, pids = target.uri, target.pids
    argv = ["fio", "--name=bench", "--ioengine=nbd", f"--uri={uri}", f"--rw={rw}", f"--bs={bs}",
            f"--iodepth={qd}", f"--size={size}", "--output-format=json"]  # fmt: skip
    if target.home is not None:  # libnbd reads ~/.pki/libnbd for a non-root user
        argv = ["setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups",
                "env", f"HOME={target.home}", *argv]  # fmt: skip
    if runtime is not None:
        argv += ["--time_based", f"--runtime={runtime}"]
    t0, c0, (b0, a0) = time.monotonic(), cpu_seconds(pids), host_ticks()
    cwd = target.home or None
    out = subprocess.run(argv, capture_output=True, text=True, check=False, cwd=cwd)  # noqa: S603
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


def start_qemu_nbd(image: Path, listen: list[str]) -> subprocess.Popen[bytes]:
    """qemu-nbd on ``image`` as export ``disk``; ``listen`` says where (and with what)."""
    argv = ["qemu-nbd", "-t", "--cache=writeback", "-f", "raw", "-x", "disk", *listen, str(image)]
    proc = subprocess.Popen(argv, stderr=subprocess.DEVNULL)  # noqa: S603 - argv list
    return proc


def wait_listening(address: tuple[str, int] | str) -> None:
    family = socket.AF_UNIX if isinstance(address, str) else socket.AF_INET
    for _ in range(100):
        with socket.socket(family) as s:
            if s.connect_ex(address) == 0:
                return
        time.sleep(0.1)
    raise RuntimeError(f"qemu-nbd does not listen on {address}")


def nobody_home(tmp: Path, creds: Path) -> Path:
    """A home directory for fio running as nobody, with ``creds`` in ~/.pki/libnbd."""
    home = tmp / "fio-home"
    target = home / ".pki" / "libnbd"
    target.mkdir(parents=True)
    for f in creds.iterdir():
        (target / f.name).write_bytes(f.read_bytes())
    for path in (tmp, home, home / ".pki", target, *target.iterdir()):
        os.chown(path, NOBODY, NOBODY)
    return home


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

    async def volume(self, lab: Lab, name: str, size: int, replicas: int) -> str:
        """A new volume; its URI on node1's local socket."""
        await self.call(
            "POST", "/v1/volumes", json={"name": name, "size": size, "replicas": replicas}
        )
        return local_uri(lab.node_settings("node1").nbd_socket, name)

    async def export(self, name: str, creds: Path) -> str:
        """Export ``name`` through node1 to a new credential in ``creds``; its nbds:// URI."""
        own_ca, cert, key = grant_credential(f"bench:{name}", days=2)
        body = {"client_ca_certificate": own_ca.decode(), "node": "node1"}
        grant = await self.call("POST", f"/v1/volumes/{name}/export", json=body)
        write_credentials(creds, grant["ca_certificate"].encode() + own_ca, cert, key)
        return str(grant["uri"])


Rounds = dict[tuple[str, str], list[Result]]  # (job, target) -> one result per round


def run_jobs(
    targets: dict[str, Target], names: list[str], size: int, args: argparse.Namespace
) -> Rounds:
    """Every job on every target, ``args.rounds`` times; each round runs every target once
    (in a rotated order), so a target and its baseline of the same round are minutes apart."""
    results: Rounds = collections.defaultdict(list)
    for j, (name, rw, bs, qd) in enumerate(JOBS):
        for r in range(args.rounds):
            k = (j + r) % len(names)
            for target in names[k:] + names[:k]:
                settle()
                x = fio(targets[target], rw, bs, qd, size, args.runtime)
                log(f"{name} on {target}: {x.iops:.0f} IOPS, srv {x.cpu:.0f}%, host {x.host:.0f}%")
                results[(name, target)].append(x)
    return results


def median_round(results: Rounds, job: str, target: str) -> Result:
    """The round with the median IOPS (what the table shows for the target itself)."""
    rs = results[(job, target)]
    return sorted(rs, key=lambda x: x.iops)[len(rs) // 2]


def round_ratios(results: Rounds, job: str, target: str) -> list[float]:
    """The target's IOPS over its baseline's, round by round (the machine's speed drifts by
    tens of percent over minutes: a ratio pairs runs of the same round)."""
    base = results[(job, BASELINE[target])]
    return [x.iops / b.iops for x, b in zip(results[(job, target)], base, strict=True)]


def ratio(results: Rounds, job: str, target: str) -> float:
    """The median of the round ratios."""
    return statistics.median(round_ratios(results, job, target))


def spread(results: Rounds, job: str, target: str) -> str:
    rs = round_ratios(results, job, target)
    return f"{min(rs):.2f}-{max(rs):.2f}" if len(rs) > 1 else ""


def print_table(results: Rounds, names: list[str]) -> None:
    """Every job and target: its median round, and the median (and spread) of its round
    ratios to its baseline (``BASELINE``)."""
    head = (
        f"{'job':<18} {'target':<12} {'IOPS':>7} {'MiB/s':>7} {'p99 us':>7} srv% host%"
        "  ratio  rounds"
    )
    print(head)
    print("-" * len(head))
    for name, *_ in JOBS:
        for target in names:
            x = median_round(results, name, target)
            r = f"{ratio(results, name, target):5.2f}" if target in BASELINE else "    -"
            s = spread(results, name, target) if target in BASELINE else ""
            print(
                f"{name:<18} {target:<12} {x.iops:>7.0f} {x.mib:>7.1f} {x.p99_us:>7.0f}"
                f" {x.cpu:>4.0f} {x.host:>5.0f}  {r}  {s}"
            )


def print_goals(results: Rounds) -> None:
    print("\nGoals (ABS IOPS / qemu-nbd IOPS, same job, same run; the local socket path):")
    for target, jobs, need in GOALS:
        for name in jobs:
            got = ratio(results, name, target)
            verdict = "MET" if got >= need else "NOT MET"
            print(f"  {target} {name:<18} >= {need:4.0%}: {got:6.1%}  {verdict}")
    print("\nThe outside path (NBD over TLS; ABS factor 2 / qemu-nbd --tls-creds):")
    for name, *_ in JOBS:
        print(f"  {name:<18} {ratio(results, name, 'abs-f2-tls'):6.1%}")


def print_encryption(plain: Rounds, enc: Rounds) -> None:
    print("\nReplica encryption (factor 2, local socket; ratio to qemu-nbd in the same pass):")
    print(f"  {'job':<18} {'off':>7} {'on':>7} {'on/off':>7}")
    for name, *_ in JOBS:
        off, on = ratio(plain, name, "abs-f2"), ratio(enc, name, "abs-f2")
        print(f"  {name:<18} {off:7.2f} {on:7.2f} {on / off:7.2f}")


def profile(lab: Lab, target: Target, size: int, runtime: int, job: str, factor: int) -> None:
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
    x = fio(target, job, "4k", 32, size, runtime)
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
        fio(Target(uri_of[vol], []), "write", "1M", 8, 64 * MIB, None)
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
            # each 1 TiB clone provisions 2 TiB of the thin overcommit limit: give it back
            await api.call("DELETE", f"/v1/volumes/{vol}-c{i}")
        rows[label] = (statistics.median(snaps), statistics.median(clones), statistics.median(gets))
    print(f"  {'':<22} {'1 GiB':>8} {'1 TiB':>8}")
    for i, what in enumerate(("snapshot", "clone", "GET volume (reference)")):
        print(f"  {what:<22} {rows['1 GiB'][i]:>8.1f} {rows['1 TiB'][i]:>8.1f}")


async def configure_storage(lab: Lab, api: Api, gib: int, *, encrypt: bool = False) -> None:
    """Restart each storage server with lab settings changed. Capacity: all nodes share one
    disk, and a volume's size x factor may not exceed the cluster's capacity (thin or not), so
    each offers ``gib`` GiB to admit the 1 TiB thin volume. Background work: the lab scrubs
    every 30 s and looks for repairs every 1 s (for tests); a scrub pass reads and verifies
    every replica, so the product defaults (3600 s, 5 s) are used instead. ``encrypt``: replica
    connections in TLS (the agents restart too)."""
    for name in lab.node_names:
        cfg = lab.node_dir(name) / "node.json"
        settings = json.loads(cfg.read_text())
        settings["storage"]["capacity_gib"] = gib
        settings["security"]["replica_encryption"] = encrypt
        for key in ("scrub_interval_s", "recovery_interval_s"):
            settings["storage"].pop(key, None)
        cfg.write_text(json.dumps(settings, indent=2))
        # the agent opens replica connections too (deletes, copies): it must switch with them
        daemons = [lab.storage(name)] + ([lab.agent(name)] if encrypt else [])
        for daemon in daemons:
            daemon.stop()
            daemon.start()
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
    baselines: list[subprocess.Popen[bytes]] = []
    try:
        await api.poll("/v1/storage", lambda st: len(st["servers"]) == 3, "3 servers", 120)
        await configure_storage(lab, api, 1024)
        targets, uri_of = await make_targets(lab, api, tmp, size, baselines)
        for name in TARGETS:
            log(f"filling {name} ({args.size_gib} GiB, 1M sequential writes)")
            x = fio(targets[name], "write", "1M", 8, size, None)
            log(f"filled {name}: {x.mib:.0f} MiB/s")
        for f in (1, 2, 3):
            vol = await api.call("GET", f"/v1/volumes/bench-f{f}")
            where = collections.Counter(",".join(e["replicas"]) for e in vol["extents"])
            print(f"abs-f{f}: {vol['extents_allocated']} extents, replicas on {dict(where)}")
        print(f"\nfio over NBD, --runtime={args.runtime}s, --size={args.size_gib}GiB, "
              f"rounds={args.rounds}\n")  # fmt: skip
        results = run_jobs(targets, TARGETS, size, args)
        print_table(results, TARGETS)
        print_goals(results)
        if args.profile:
            f, job = args.profile_factor, args.profile_job
            profile(lab, targets[f"abs-f{f}"], size, args.runtime, job, f)
        if args.encryption:
            log("restarting the storage servers with replica encryption on")
            await configure_storage(lab, api, 1024, encrypt=True)
            storage = [p for n in lab.node_names if (p := lab.storage(n).pid()) is not None]
            targets["abs-f2"] = Target(targets["abs-f2"].uri, storage)
            encrypted = run_jobs(targets, ENCRYPTED_TARGETS, size, args)
            print("\nWith replica encryption on:\n")
            print_table(encrypted, ENCRYPTED_TARGETS)
            print_encryption(results, encrypted)
        await snapshot_times(api, uri_of)
    except BaseException:
        for name in lab.node_names:
            tail = (lab.node_dir(name) / "storage.log").read_text(errors="replace")[-3000:]
            print(f"--- {name} storage.log (tail) ---\n{tail}", file=sys.stderr)
        raise
    finally:
        await api.http.aclose()
        for proc in baselines:
            os.kill(proc.pid, signal.SIGTERM)
            proc.wait(timeout=30)


async def make_targets(
    lab: Lab, api: Api, tmp: Path, size: int, baselines: list[subprocess.Popen[bytes]]
) -> tuple[dict[str, Target], dict[str, str]]:
    """The volumes, their export, and the two qemu-nbd baselines (on a Unix socket; on TCP
    with TLS and node1's credentials); every target by name, and the snapshot volumes' URIs."""
    storage = [p for n in lab.node_names if (p := lab.storage(n).pid()) is not None]
    targets: dict[str, Target] = {}
    uri_of: dict[str, str] = {}
    for f in (1, 2, 3):
        targets[f"abs-f{f}"] = Target(await api.volume(lab, f"bench-f{f}", size, f), storage)
    for vol, vsize in (("snap-1g", GIB), ("snap-1024g", 1 << 40)):
        uri_of[vol] = await api.volume(lab, vol, vsize, 2)
    creds = tmp / "export-creds"
    tls_uri = await api.export("bench-f2", creds)
    home = nobody_home(tmp, creds)
    targets["abs-f2-tls"] = Target(tls_uri, storage, home)
    images = []
    for name in ("baseline", "baseline-tls"):
        image = tmp / f"{name}.raw"
        image.touch()
        os.truncate(image, size)
        images.append(image)
    sock = tmp / "qemu-nbd.sock"
    baselines.append(start_qemu_nbd(images[0], ["-k", str(sock)]))
    wait_listening(str(sock))
    targets["qemu-nbd"] = Target(f"nbd+unix:///disk?socket={sock}", [baselines[-1].pid])
    server_dir = qemu_server_credentials(lab, creds, tmp / "qemu-tls")
    port = free_port(NODE1)
    x509 = f"tls-creds-x509,id=tls0,endpoint=server,dir={server_dir},verify-peer=on"
    listen = ["--bind", NODE1, "--port", str(port), "--tls-creds", "tls0", "--object", x509]
    baselines.append(start_qemu_nbd(images[1], listen))
    wait_listening((NODE1, port))
    targets["qemu-nbd-tls"] = Target(f"nbds://{NODE1}:{port}/disk", [baselines[-1].pid], home)
    return targets, uri_of


def qemu_server_credentials(lab: Lab, creds: Path, target: Path) -> Path:
    """qemu-nbd's x509 directory with the same credentials as node1's NBD server: node1's
    certificate and key, and as CAs the cluster's and the export credential's."""
    bundle = lab.ca.node_bundle("node1")
    target.mkdir(mode=0o700)
    (target / "server-cert.pem").write_bytes(bundle.cert_file.read_bytes())
    (target / "server-key.pem").write_bytes(bundle.key_file.read_bytes())
    (target / "ca-cert.pem").write_bytes((creds / "ca-cert.pem").read_bytes())
    return target


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
    ap.add_argument(
        "--no-encryption", dest="encryption", action="store_false",
        help="skip the pass with replica encryption on",
    )  # fmt: skip
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
