"""Idle footprint of a running lab: CPU (percent of one core) and resident memory of its node
agents, etcd members and QEMU processes, sampled over a window.

Usage: .venv/bin/python benchmarks/lab_idle.py [--seconds 20] [--root LAB_DIR]
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

from aecp.lab.harness import Lab

TICK = os.sysconf("SC_CLK_TCK")


def cpu_ticks(pid: int) -> int:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return int(fields[11]) + int(fields[12])


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def groups(lab: Lab) -> dict[str, list[int]]:
    out: dict[str, list[int]] = {"agents": [], "storage": [], "etcd": [], "qemu": []}
    for name in lab.node_names:
        if (pid := lab.agent(name).pid()) is not None:
            out["agents"].append(pid)
        if (pid := lab.storage(name).pid()) is not None:
            out["storage"].append(pid)
        out["qemu"] += [int(pf.read_text()) for pf in lab.qemu_pidfiles(name)]
    out["etcd"] = [p for m in lab.etcd_cluster().members if (p := m.pid()) is not None]
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seconds", type=float, default=20)
    ap.add_argument("--root", type=Path, default=None)
    args = ap.parse_args()
    lab = Lab.open(args.root)
    g = groups(lab)
    before = {k: sum(cpu_ticks(p) for p in pids) for k, pids in g.items()}
    time.sleep(args.seconds)
    for k, pids in g.items():
        used = (sum(cpu_ticks(p) for p in pids) - before[k]) / TICK
        rss = sum(rss_mib(p) for p in pids)
        print(
            f"{k:7s} n={len(pids)}  cpu={100 * used / args.seconds:5.1f}% of one core  "
            f"rss={rss:7.1f} MiB"
        )


if __name__ == "__main__":
    main()
