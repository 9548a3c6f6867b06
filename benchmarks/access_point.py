"""One access point measured alone: fio over NBD against an ABS volume served by this process,
and against ``qemu-nbd`` on a raw file in the same directory, in the same run.

This process plays node1 (NBD server on a Unix socket, as for a VM; access point; local replica
store); node2 and node3 are chunk servers in child processes (``chunk_store.py --serve``;
replica connections authenticated as in the product); Meta runs over the in-memory
store (no etcd, no agents, no recovery or scrub loops). It isolates the data path from the
rest of the lab, starts in about a second, and can profile this process (``--profile``:
cProfile, the top functions by own time).
``make bench-storage`` remains the measurement of record; this one is for finding where the
time goes.

Usage: .venv/bin/python benchmarks/access_point.py [--factor 1] [--job randwrite]
       [--qd 32] [--bs 4k] [--seconds 5] [--size-mib 512] [--uvloop] [--profile]
       [--no-baseline]
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import io
import json
import os
import pstats
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from chunk_store import auth  # the sibling script

from aecp.cluster.volumeowners import ClusterOwners
from aecp.common.clock import SYSTEM_CLOCK
from aecp.node.storage_server import tune_gc, tune_malloc
from aecp.storage.attach import open_volume
from aecp.storage.blockdev import BlockDevice
from aecp.storage.chunk.store import ReplicaStore
from aecp.storage.frontends.nbd.server import NbdServer
from aecp.storage.meta.model import MIB, StorageServer
from aecp.storage.meta.service import MetaService
from aecp.storage.pool import ReplicaPool
from aecp.store import keys
from aecp.store.memory import MemoryStore

HOST = "127.0.0.1"
VOLUME = "bench"


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def fio_argv(uri: str, args: argparse.Namespace, fill: bool) -> list[str]:
    size = args.size_mib * MIB
    if fill:
        return ["fio", "--name=fill", "--ioengine=nbd", f"--uri={uri}", "--rw=write",
                "--bs=1M", "--iodepth=8", f"--size={size}", "--output-format=json"]  # fmt: skip
    return ["fio", "--name=bench", "--ioengine=nbd", f"--uri={uri}", f"--rw={args.job}",
            f"--bs={args.bs}", f"--iodepth={args.qd}", f"--size={size}", "--time_based",
            f"--runtime={args.seconds}", "--output-format=json"]  # fmt: skip


async def fio(uri: str, args: argparse.Namespace, pids: list[int], fill: bool = False) -> str:
    """Run fio (without blocking this loop); a line of figures."""
    c0 = [cpu_seconds(p) for p in pids]
    t0, l0 = time.monotonic(), time.thread_time()
    proc = await asyncio.create_subprocess_exec(
        *fio_argv(uri, args, fill), stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    out, err = await proc.communicate()
    if proc.returncode:
        raise RuntimeError(f"fio failed: {err.decode()[-800:]}")
    wall = time.monotonic() - t0
    each = [100 * (cpu_seconds(p) - c) / wall for p, c in zip(pids, c0, strict=True)]
    cpu = sum(each)
    loop = 100 * (time.thread_time() - l0) / wall
    text = out.decode()
    job = json.loads(text[text.index("{") :])["jobs"][0]
    side = job["write"] if "write" in (args.job if not fill else "write") else job["read"]
    p99 = side["clat_ns"].get("percentile", {}).get("99.000000", 0) / 1000
    return (
        f"{side['iops']:9.0f} IOPS {side['bw_bytes'] / MIB:7.1f} MiB/s p99 {p99:7.0f} µs "
        f"srv {cpu:4.0f}% ({'+'.join(f'{c:.0f}' for c in each)}) loop {loop:3.0f}% "
        f"({1e4 * loop / max(side['iops'], 1):.0f} µs/op)"
    )


async def child_servers(
    root: Path, n: int, like_daemon: bool
) -> list[tuple[asyncio.subprocess.Process, int]]:
    """``n`` chunk servers; ``like_daemon``: on uvloop with the GC tuned, as in production."""
    out = []
    for i in range(n):
        node = f"n{i + 2}"
        auth(root, node, False)  # the child's credentials exist before it reads them
        argv = [str(Path(__file__).with_name("chunk_store.py")), "--serve", str(root / node)]
        argv += ["--node", node]
        argv += ["--uvloop"] if like_daemon else []
        child = await asyncio.create_subprocess_exec(sys.executable, *argv, stdout=subprocess.PIPE)
        assert child.stdout is not None
        out.append((child, int(await child.stdout.readline())))
    return out


async def register(store: MemoryStore, node: str, port: int) -> None:
    rec = StorageServer(
        node=node,
        address=HOST,
        chunk_port=port,
        nbd_port=0,
        capacity_bytes=1 << 40,
        free_bytes=(1 << 40) - int(node[1:]),
    )
    await store.put(keys.abs_server(node), rec.dump())


async def baseline(root: Path, args: argparse.Namespace) -> None:
    image = root / "baseline.raw"
    image.touch()
    os.truncate(image, args.size_mib * MIB)
    sock = root / "qemu-nbd.sock"
    argv = ["qemu-nbd", "-t", "--cache=writeback", "-f", "raw", "-k", str(sock),
            "-x", "disk", str(image)]  # fmt: skip
    qemu = subprocess.Popen(argv, stderr=subprocess.DEVNULL)  # noqa: S603, ASYNC220
    try:
        await asyncio.sleep(0.5)
        uri = f"nbd+unix:///disk?socket={sock}"
        await fio(uri, args, [qemu.pid], fill=True)
        print(f"qemu-nbd  {args.job} {args.bs} QD{args.qd}: {await fio(uri, args, [qemu.pid])}")
    finally:
        qemu.send_signal(signal.SIGTERM)
        qemu.wait()


async def main(args: argparse.Namespace) -> None:
    if not args.default_gc:
        tune_gc()  # as ``aecp storage run`` does
        tune_malloc()
    root = Path(tempfile.mkdtemp(prefix="ap-bench-", dir="/tmp"))
    children = await child_servers(root, 2, args.uvloop and not args.default_gc)
    store = MemoryStore()
    local = ReplicaStore(root / "n1")
    meta = MetaService(store, 256 * MIB, SYSTEM_CLOCK, owners=ClusterOwners(store))
    pool = ReplicaPool(meta, "n1", local, auth=auth(root, "n1", False))
    await register(store, "n1", 1)
    for i, (_, port) in enumerate(children):
        await register(store, f"n{i + 2}", port)
    await meta.create_volume(VOLUME, args.size_mib * MIB, args.factor)
    lease = await store.grant_lease(600)

    async def open_export(name: str) -> BlockDevice:
        if name != VOLUME:
            raise KeyError(name)
        return await open_volume(meta, pool, "n1", name, lease, takeover=True)

    async def list_exports() -> list[str]:
        return [VOLUME]

    nbd = NbdServer(None, 0, open_export, list_exports, unix_path=root / "nbd" / "nbd.sock")
    await nbd.start()
    pids = [os.getpid()] + [c.pid for c, _ in children]
    uri = f"nbd+unix:///{VOLUME}?socket={nbd.unix_path}"
    prof = cProfile.Profile() if args.profile else None
    try:
        if not args.no_baseline:
            await baseline(root, args)
        print(f"fill      {await fio(uri, args, pids, fill=True)}")
        if prof is not None:
            prof.enable()
        line = await fio(uri, args, pids)
        if prof is not None:
            prof.disable()
        print(f"ABS f{args.factor}    {args.job} {args.bs} QD{args.qd}: {line}")
    finally:
        await nbd.stop()
        await pool.close()
        await local.close()
        for c, _ in children:
            c.terminate()
            await c.wait()
        shutil.rmtree(root, ignore_errors=True)
    if prof is not None:
        s = io.StringIO()
        pstats.Stats(prof, stream=s).sort_stats("tottime").print_stats(args.top)
        print(s.getvalue())


def parse() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--factor", type=int, default=1, choices=(1, 2, 3))
    p.add_argument("--job", default="randwrite", help="fio --rw")
    p.add_argument("--bs", default="4k")
    p.add_argument("--qd", type=int, default=32)
    p.add_argument("--seconds", type=int, default=5)
    p.add_argument("--size-mib", type=int, default=512)
    p.add_argument("--uvloop", action="store_true", help="as ``aecp storage run`` does")
    p.add_argument("--default-gc", action="store_true", help="keep CPython's GC thresholds")
    p.add_argument("--profile", action="store_true", help="cProfile this process during the job")
    p.add_argument("--top", type=int, default=35, help="functions printed with --profile")
    p.add_argument("--no-baseline", action="store_true", help="skip qemu-nbd")
    return p.parse_args()


if __name__ == "__main__":
    arguments = parse()
    if arguments.uvloop:
        import uvloop

        uvloop.run(main(arguments))
    else:
        asyncio.run(main(arguments))
