"""The idle lab's footprint: memory and CPU of every process the lab started, from /proc.

Usage (with a lab running, e.g. after ``make run``)::

    .venv/bin/python benchmarks/lab_footprint.py [--root DIR] [--seconds 60] [--interval 2]
                                                 [--json out.json]

The lab's processes are those whose command line names a path under the lab's root (the
center, etcd members, node agents, storage servers, QEMU), plus their descendants. Every
``--interval`` seconds it reads each one's RSS (``VmRSS``) and PSS (``smaps_rollup``: shared
pages divided among the processes that share them, so PSS adds up; RSS counts the Python
interpreter's shared libraries once per process). CPU is the process's user + system time
over the whole window (``/proc/PID/stat``), in percent of one core; the machine's own busy
share over the same window (``/proc/stat``) is printed for comparison.

Prints a Markdown report (per role and per process) on stdout.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

TICK = os.sysconf("SC_CLK_TCK")
PAGE = os.sysconf("SC_PAGE_SIZE")
ROLES = ("center", "etcd", "agent", "storage", "qemu", "other")


def default_root() -> Path:
    env = os.environ.get("AECP_LAB_DIR")
    if env:
        return Path(env)
    state = os.environ.get("XDG_STATE_HOME") or str(Path.home() / ".local" / "state")
    return Path(state) / "aecp" / "lab"


@dataclass
class Proc:
    pid: int
    role: str
    where: str  # cluster/node, or "center"
    argv0: str
    ticks0: int
    ticks1: int = 0
    rss: list[int] = field(default_factory=list)  # bytes
    pss: list[int] = field(default_factory=list)
    gone: bool = False

    def cpu_percent(self, seconds: float) -> float:
        return 100.0 * (self.ticks1 - self.ticks0) / TICK / seconds


def read_argv(pid: int) -> list[str]:
    raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    return [a.decode(errors="replace") for a in raw.split(b"\0") if a]


def stat_fields(pid: int) -> list[str]:
    """The fields of /proc/PID/stat after the command name (which may hold spaces)."""
    text = Path(f"/proc/{pid}/stat").read_text()
    return text[text.rindex(")") + 2 :].split()


def cpu_ticks(pid: int) -> int:
    f = stat_fields(pid)
    return int(f[11]) + int(f[12])  # utime, stime (fields 14 and 15 of stat)


def rss_bytes(pid: int) -> int:
    return int(stat_fields(pid)[21]) * PAGE  # rss (field 24), in pages


def pss_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
        if line.startswith("Pss:"):
            return int(line.split()[1]) * 1024
    return 0


def all_pids() -> list[int]:
    return [int(p.name) for p in Path("/proc").iterdir() if p.name.isdigit()]


def lab_processes(root: Path) -> dict[int, list[str]]:
    """pid -> argv of every process naming a path under ``root``, and their descendants."""
    marker = str(root).rstrip("/") + "/"
    argvs: dict[int, list[str]] = {}
    parent: dict[int, int] = {}
    for pid in all_pids():
        try:
            argvs[pid] = read_argv(pid)
            parent[pid] = int(stat_fields(pid)[1])
        except (OSError, ValueError, IndexError):
            continue
    chosen = {p for p, a in argvs.items() if any(marker in x for x in a)}
    grew = True
    while grew:
        kids = {p for p, pp in parent.items() if pp in chosen and p not in chosen}
        chosen |= kids
        grew = bool(kids)
    return {p: argvs[p] for p in sorted(chosen)}


def classify(argv: list[str], root: Path) -> tuple[str, str]:
    """(role, where) of a lab process from its command line."""
    line = " ".join(argv)
    exe = Path(argv[0]).name if argv else ""
    if "center run" in line:
        role = "center"
    elif exe == "etcd":
        role = "etcd"
    elif "node run" in line:
        role = "agent"
    elif "storage run" in line:
        role = "storage"
    elif exe.startswith("qemu-system"):
        role = "qemu"
    else:
        role = "other"
    where = ""
    marker = str(root).rstrip("/") + "/"
    for a in argv:
        i = a.find(marker)
        if i < 0:
            continue
        rel = a[i + len(marker) :].split("/")
        where = rel[0]  # c1, c2... or center
        if "nodes" in rel[:-1]:
            where += "/" + rel[rel.index("nodes") + 1]
        elif rel[1:2] == ["etcd"] and len(rel) > 2:
            where += "/" + rel[2].removesuffix(".data")
        break
    return role, where


def machine_ticks() -> tuple[int, int]:
    """(busy, total) jiffies of the whole machine."""
    cpu = Path("/proc/stat").read_text().splitlines()[0].split()[1:]
    values = [int(v) for v in cpu[:8]]
    idle = values[3] + values[4]  # idle + iowait
    return sum(values) - idle, sum(values)


def measure(root: Path, seconds: float, interval: float) -> dict[str, Any]:
    found = lab_processes(root)
    if not found:
        raise SystemExit(f"no process of a lab under {root}: start one (make run)")
    procs: list[Proc] = []
    for pid, argv in found.items():
        role, where = classify(argv, root)
        try:
            procs.append(Proc(pid, role, where, Path(argv[0]).name, cpu_ticks(pid)))
        except OSError:
            continue
    busy0, total0 = machine_ticks()
    start = time.monotonic()
    while True:
        for p in procs:
            if p.gone:
                continue
            try:
                p.rss.append(rss_bytes(p.pid))
                p.pss.append(pss_bytes(p.pid))
            except OSError:
                p.gone = True
        left = start + seconds - time.monotonic()
        if left <= 0:
            break
        time.sleep(min(interval, left))
    elapsed = time.monotonic() - start
    for p in procs:
        try:
            p.ticks1 = cpu_ticks(p.pid)
        except OSError:
            p.gone, p.ticks1 = True, p.ticks0
    busy1, total1 = machine_ticks()
    return {
        "root": str(root),
        "seconds": round(elapsed, 1),
        "samples": max(len(p.rss) for p in procs),
        "cpus": os.cpu_count(),
        "machine_busy_percent_of_all_cpus": round(100.0 * (busy1 - busy0) / (total1 - total0), 1),
        "processes": [
            {
                "pid": p.pid,
                "role": p.role,
                "where": p.where,
                "exe": p.argv0,
                "rss_mib_avg": _avg_mib(p.rss),
                "rss_mib_max": round(max(p.rss, default=0) / 2**20, 1),
                "pss_mib_avg": _avg_mib(p.pss),
                "cpu_percent": round(p.cpu_percent(elapsed), 2),
                "exited": p.gone,
            }
            for p in procs
        ],
    }


def _avg_mib(values: list[int]) -> float:
    return round(sum(values) / len(values) / 2**20, 1) if values else 0.0


def report(m: dict[str, Any]) -> str:
    procs = m["processes"]
    out = [
        f"Lab at `{m['root']}`: {len(procs)} processes, measured idle for {m['seconds']} s "
        f"({m['samples']} memory samples), {m['cpus']} CPUs. The machine was "
        f"{m['machine_busy_percent_of_all_cpus']} % busy (all CPUs) meanwhile.",
        "",
        "| role | processes | RSS MiB (sum of avg) | PSS MiB (sum of avg) | CPU % of one core |",
        "|---|---:|---:|---:|---:|",
    ]
    for role in ROLES:
        mine = [p for p in procs if p["role"] == role]
        if mine:
            out.append(_row(role, mine))
    out.append(_row("**total**", procs))
    out += [
        "",
        "| pid | role | where | RSS MiB avg | RSS MiB max | PSS MiB avg | CPU % |",
        "|---:|---|---|---:|---:|---:|---:|",
    ]
    for p in sorted(procs, key=lambda p: (ROLES.index(p["role"]), p["where"])):
        out.append(
            f"| {p['pid']} | {p['role']} | {p['where'] or '-'} | {p['rss_mib_avg']} | "
            f"{p['rss_mib_max']} | {p['pss_mib_avg']} | {p['cpu_percent']}"
            f"{' (exited)' if p['exited'] else ''} |"
        )
    return "\n".join(out)


def _row(name: str, procs: list[dict[str, Any]]) -> str:
    rss = sum(p["rss_mib_avg"] for p in procs)
    pss = sum(p["pss_mib_avg"] for p in procs)
    cpu = sum(p["cpu_percent"] for p in procs)
    return f"| {name} | {len(procs)} | {rss:.1f} | {pss:.1f} | {cpu:.1f} |"


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0] if __doc__ else None)
    ap.add_argument("--root", type=Path, default=default_root(), help="the lab's directory")
    ap.add_argument("--seconds", type=float, default=60.0, help="how long to measure")
    ap.add_argument("--interval", type=float, default=2.0, help="seconds between memory samples")
    ap.add_argument("--json", type=Path, help="also write the figures here")
    args = ap.parse_args(argv)
    m = measure(args.root.resolve(), args.seconds, args.interval)
    if args.json:
        args.json.write_text(json.dumps(m, indent=2) + "\n")
    sys.stdout.write(report(m) + "\n")


if __name__ == "__main__":
    main()
