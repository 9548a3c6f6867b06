"""Live migration: ``aecp vm migrate`` against a raw QEMU-to-QEMU migration, in the same run.

For a 256 MiB and a 1 GiB tiny guest, idle and with a memory-dirtying workload in the guest
(a shell loop rewriting a 100 MB file in its RAM-backed root), it measures:

- **AECP**: a VM on a two-node loopback lab (disks on ABS, served over NBD by each node's
  storage server), moved with ``POST /v1/vms/{name}/migrate``: QEMU's own total time and
  downtime (``query-migrate``, in the operation's detail) and the request's wall time until
  its operation ended;
- **raw**: the same guest, the same QEMU argv (``compute.qemu.argv``), the same migration
  parameters (``max-bandwidth``, ``downtime-limit`` from the node settings' defaults,
  ``return-path``) and
  NBD disks (one ``qemu-nbd`` serving a copy of the image to both QEMUs, so there is no
  hand-off), migrated by QMP directly, without ``pause-before-switchover``.

Goals (issue 14): AECP's total time at most 1.3x the raw one; its downtime at most the raw
downtime + 50 ms (the disk hand-off). Figures vary run to run on 2 TCG cores; each cell is the
median of ``--rounds`` migrations.

Usage: .venv/bin/python benchmarks/migration.py [--rounds 3] [--sizes 256,1024] [--quick]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import shutil
import signal
import socket
import statistics
import subprocess
import tempfile
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
from qemu.qmp import QMPClient

from aecp.compute.hypervisor import Accel, DiskSpec, InstanceSpec
from aecp.compute.images.tiny import BOOT_MARKER, ensure_tiny_image
from aecp.compute.qemu.argv import RuntimePaths, build_argv
from aecp.conf.settings import ComputeSettings
from aecp.lab.harness import Lab, LabSpec

SUBNET = "127.0.66"
PROMPT = "aecp:/# "
DIRTY = "(while true; do yes d | head -c 100000000 > /tmp/f; done) &"
DEFAULTS = ComputeSettings()
MAX_BANDWIDTH = DEFAULTS.migration_max_bandwidth_mib_s << 20
DOWNTIME_LIMIT = DEFAULTS.migration_downtime_limit_ms


@dataclass
class Run:
    total_ms: float  # QEMU's total-time
    downtime_ms: float  # QEMU's downtime
    wall_ms: float  # from the request to the end as the caller sees it
    handoff_ms: float = 0.0  # AECP: the disk hand-off inside the downtime


# ---- AECP ----------------------------------------------------------------------------------


class Api:
    def __init__(self, lab: Lab) -> None:
        self.lab = lab
        self.http = httpx.AsyncClient(
            timeout=300, headers={"authorization": f"Bearer {lab.token()}"}
        )

    async def call(self, method: str, path: str, node: str = "node1", **kw: Any) -> Any:
        r = await self.http.request(method, self.lab.api_url(node) + path, **kw)
        if r.status_code >= 400:
            raise RuntimeError(f"{method} {path}: {r.status_code} {r.text}")
        return r.json() if r.content else None

    async def op(self, accepted: Any) -> dict[str, Any]:
        op_id = accepted["operation"]["id"]
        while True:
            op: dict[str, Any] = await self.call("GET", f"/v1/operations/{op_id}")
            if op["state"] != "running":
                return op
            await asyncio.sleep(0.02)

    async def console(self, vm: str) -> str:
        r = await self.http.get(self.lab.api_url("node1") + f"/v1/vms/{vm}/console/log")
        return r.text

    async def type(self, vm: str, line: str) -> None:
        from websockets.asyncio.client import connect

        info = await self.call("GET", f"/v1/vms/{vm}")
        url = self.lab.api_url(info["node"]).replace("http://", "ws://")
        headers = {"authorization": f"Bearer {self.lab.token()}"}
        async with connect(f"{url}/v1/vms/{vm}/console", additional_headers=headers) as ws:
            await ws.send(("\n" + line + "\n").encode())


async def until(check: Any, what: str, timeout: float = 180) -> None:
    deadline = time.monotonic() + timeout
    while not await check():
        if time.monotonic() > deadline:
            raise RuntimeError(f"timed out waiting for {what}")
        await asyncio.sleep(0.2)


async def aecp_runs(api: Api, mib: int, dirty: bool, rounds: int) -> list[Run]:
    vm = f"b{mib}{'d' if dirty else 'i'}"
    op = await api.op(await api.call("POST", "/v1/vms", json={"name": vm, "image": "tiny",
                                                                "memory_mib": mib}))  # fmt: skip
    if op["state"] != "succeeded":
        raise RuntimeError(f"create {vm}: {op}")
    marker = f"{BOOT_MARKER} name={vm}"

    async def booted() -> bool:
        log = await api.console(vm)
        return marker in log and PROMPT in log.rsplit(marker, 1)[1]

    await until(booted, f"{vm} at its prompt")
    if dirty:
        await api.type(vm, DIRTY)
    runs = []
    for _ in range(rounds):
        node = (await api.call("GET", f"/v1/vms/{vm}"))["node"]
        dest = "node2" if node == "node1" else "node1"
        t0 = time.perf_counter()
        op = await api.op(await api.call("POST", f"/v1/vms/{vm}/migrate", json={"node": dest}))
        wall = (time.perf_counter() - t0) * 1000
        if op["state"] != "succeeded":
            raise RuntimeError(f"migrate {vm}: {op}")
        d = op["detail"]
        runs.append(Run(float(d["total_time_ms"]), float(d["downtime_ms"]), wall, d["handoff_ms"]))
    await api.op(await api.call("POST", f"/v1/vms/{vm}/actions/poweroff"))
    await api.op(await api.call("DELETE", f"/v1/vms/{vm}"))
    return runs


async def evacuation(api: Api, count: int) -> tuple[float, list[str]]:
    """Put ``count`` running VMs on node1, then time ``maintenance enter node1`` until its
    operation ends (every VM live-migrated off, one at a time); exit again after. Returns the
    time in ms and the nodes the VMs ended on."""
    names = [f"evac{i}" for i in range(count)]
    for name in names:
        body = {"name": name, "image": "tiny", "memory_mib": 128}
        op = await api.op(await api.call("POST", "/v1/vms", json=body))
        if op["state"] != "succeeded":
            raise RuntimeError(f"create {name}: {op}")
    for name in names:
        marker = f"{BOOT_MARKER} name={name}"

        async def booted(name: str = name, marker: str = marker) -> bool:
            log = await api.console(name)
            return marker in log and PROMPT in log.rsplit(marker, 1)[1]

        await until(booted, f"{name} at its prompt")
        if (await api.call("GET", f"/v1/vms/{name}"))["node"] != "node1":
            body = {"node": "node1"}
            op = await api.op(await api.call("POST", f"/v1/vms/{name}/migrate", json=body))
            if op["state"] != "succeeded":
                raise RuntimeError(f"migrate {name} to node1: {op}")
    t0 = time.perf_counter()
    op = await api.op(await api.call("POST", "/v1/nodes/node1/maintenance/enter", json={}))
    took = (time.perf_counter() - t0) * 1000
    if op["state"] != "succeeded":
        raise RuntimeError(f"maintenance enter node1: {op}")
    where = [(await api.call("GET", f"/v1/vms/{n}"))["node"] for n in names]
    await api.op(await api.call("POST", "/v1/nodes/node1/maintenance/exit", json={}))
    for name in names:
        await api.op(await api.call("POST", f"/v1/vms/{name}/actions/poweroff"))
        await api.op(await api.call("DELETE", f"/v1/vms/{name}"))
    return took, where


# ---- raw QEMU -------------------------------------------------------------------------------


class RawGuest:
    """One QEMU process of the raw baseline, its QMP client and console."""

    def __init__(self, base: Path, name: str, spec: InstanceSpec, incoming: bool) -> None:
        self.paths = RuntimePaths.for_instance(base, name)
        self.paths.run_dir.mkdir(parents=True, exist_ok=True)
        self.paths.qmp_socket.parent.mkdir(parents=True, exist_ok=True)
        argv = build_argv(spec, self.paths)
        if incoming:
            argv += ["-incoming", "defer"]
        log = self.paths.qemu_log.open("ab")
        self.proc = subprocess.Popen(argv, stdout=log, stderr=log, stdin=subprocess.DEVNULL)
        self.qmp = QMPClient(name)

    async def connect(self) -> None:
        for _ in range(200):
            with contextlib.suppress(Exception):  # not listening yet
                await self.qmp.connect(str(self.paths.qmp_socket))
                return
            self.qmp = QMPClient(self.qmp.name)
            await asyncio.sleep(0.05)
        raise RuntimeError(f"no QMP on {self.paths.qmp_socket}")

    def type(self, line: str) -> None:
        with socket.socket(socket.AF_UNIX) as s:
            s.connect(str(self.paths.console_socket))
            s.sendall(("\n" + line + "\n").encode())

    async def close(self) -> None:
        with contextlib.suppress(Exception):
            await self.qmp.disconnect()
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait()


async def raw_runs(tmp: Path, image: Path, mib: int, dirty: bool, rounds: int) -> list[Run]:
    disk = tmp / f"raw-{mib}.img"
    shutil.copyfile(image, disk)
    sock = tmp / "raw-nbd.sock"
    nbd = subprocess.Popen(
        ["qemu-nbd", "-t", "--shared=4", "-f", "raw", "--cache=none", "-k", str(sock), str(disk)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        while not sock.exists():
            await asyncio.sleep(0.05)
        spec = InstanceSpec(
            name="raw", uuid=str(uuid.uuid4()), vcpus=1, memory_mib=mib, accel=Accel.TCG,
            disks=(DiskSpec(f"nbd+unix:///?socket={sock}", "raw", boot=True, cache="none"),),
        )  # fmt: skip
        guest = RawGuest(tmp / "raw-a", "raw", spec, incoming=False)
        await guest.connect()
        while PROMPT not in _read(guest.paths.console_log):
            await asyncio.sleep(0.2)
        if dirty:
            guest.type(DIRTY)
            await asyncio.sleep(2)  # let the loop start dirtying (a benchmark, not a test)
        runs = []
        for i in range(rounds):
            dest = RawGuest(tmp / f"raw-{'b' if i % 2 == 0 else 'a'}{i}", "raw", spec, True)
            runs.append(await _raw_migrate(guest, dest))
            await guest.close()
            guest = dest
        await guest.close()
        return runs
    finally:
        nbd.send_signal(signal.SIGTERM)
        nbd.wait()


async def _raw_migrate(src: RawGuest, dst: RawGuest) -> Run:
    await dst.connect()
    port = _free_port()
    rp = [{"capability": "return-path", "state": True}]  # as AECP's driver sets it
    await dst.qmp.execute("migrate-set-capabilities", {"capabilities": rp})
    await dst.qmp.execute("migrate-incoming", {"uri": f"tcp:127.0.0.1:{port}"})
    caps = [{"capability": "events", "state": True}, *rp]
    await src.qmp.execute("migrate-set-capabilities", {"capabilities": caps})
    await src.qmp.execute(
        "migrate-set-parameters",
        {"max-bandwidth": MAX_BANDWIDTH, "downtime-limit": DOWNTIME_LIMIT},
    )
    t0 = time.perf_counter()
    await src.qmp.execute("migrate", {"uri": f"tcp:127.0.0.1:{port}"})
    while True:
        st = await src.qmp.execute("query-migrate")
        if st["status"] == "completed" and st.get("total-time"):
            break
        if st["status"] in ("failed", "cancelled"):
            raise RuntimeError(f"raw migration {st['status']}: {st}")
        await asyncio.sleep(0.01)
    wall = (time.perf_counter() - t0) * 1000
    return Run(float(st["total-time"]), float(st["downtime"]), wall)


def _read(path: Path) -> str:
    return path.read_text(errors="replace") if path.exists() else ""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


# ---- report ---------------------------------------------------------------------------------


def med(runs: list[Run], attr: str) -> float:
    return statistics.median(getattr(r, attr) for r in runs)


def report(rows: list[tuple[int, bool, list[Run], list[Run]]]) -> None:
    print(
        f"\n{'guest':>8} {'load':>6} | {'AECP total':>10} {'raw total':>9} {'ratio':>6} "
        f"{'goal':>6} | {'AECP down':>9} {'raw down':>8} {'diff':>7} {'goal':>8} | "
        f"{'AECP wall':>9} {'raw wall':>8}"
    )
    for mib, dirty, aecp, raw in rows:
        at, rt = med(aecp, "total_ms"), med(raw, "total_ms")
        ad, rd = med(aecp, "downtime_ms"), med(raw, "downtime_ms")
        ratio = at / rt if rt else float("inf")
        print(
            f"{mib:>5}MiB {'dirty' if dirty else 'idle':>6} | {at:>8.0f}ms {rt:>7.0f}ms "
            f"{ratio:>5.2f}x {'<=1.3x':>6} | {ad:>7.0f}ms {rd:>6.0f}ms {ad - rd:>+5.0f}ms "
            f"{'<=+50ms':>8} | {med(aecp, 'wall_ms'):>7.0f}ms {med(raw, 'wall_ms'):>6.0f}ms"
        )


async def bench(lab: Lab, tmp: Path, args: argparse.Namespace) -> None:
    image = ensure_tiny_image()
    print(f"lab: 2 nodes on {SUBNET}.x, TCG; max-bandwidth {MAX_BANDWIDTH >> 20} MiB/s, "
          f"downtime-limit {DOWNTIME_LIMIT} ms; {args.rounds} migrations per cell (median)",
          flush=True)  # fmt: skip
    await lab.up(image=image)
    api = Api(lab)
    rows = []
    try:
        for mib in args.sizes:
            for dirty in (False, True):
                aecp = await aecp_runs(api, mib, dirty, args.rounds)
                raw = await raw_runs(tmp, image, mib, dirty, args.rounds)
                rows.append((mib, dirty, aecp, raw))
                print(
                    f"{mib} MiB {'dirty' if dirty else 'idle'}: AECP "
                    f"{[round(r.total_ms) for r in aecp]} ms total, "
                    f"{[round(r.downtime_ms) for r in aecp]} ms down "
                    f"(hand-off {[round(r.handoff_ms) for r in aecp]} ms); raw "
                    f"{[round(r.total_ms) for r in raw]} ms total, "
                    f"{[round(r.downtime_ms) for r in raw]} ms down",
                    flush=True,
                )
        took, where = await evacuation(api, 3)
    finally:
        await api.http.aclose()
    report(rows)
    print(
        f"\nevacuation of node1 with 3 running 128 MiB VMs (maintenance enter until done): "
        f"{took / 1000:.1f} s; the VMs ended on {where}"
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--sizes", default="256,1024", help="guest memory sizes, MiB")
    ap.add_argument("--quick", action="store_true", help="one round, 256 MiB only")
    args = ap.parse_args()
    args.sizes = [int(s) for s in args.sizes.split(",")]
    if args.quick:
        args.rounds, args.sizes = 1, [256]
    with tempfile.TemporaryDirectory(prefix="aecp-bench-mig-", dir="/tmp") as d:
        tmp = Path(d)
        lab = Lab(
            tmp / "lab",
            LabSpec(nodes=2, subnet=SUBNET, accel="tcg", node_memory_mib=4096),
        )
        try:
            asyncio.run(bench(lab, tmp, args))
        finally:
            if (lab.root / "lab.json").exists():
                lab.down()


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    main()
