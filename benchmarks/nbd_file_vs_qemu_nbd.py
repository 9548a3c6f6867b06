"""AECP's NBD server over a FileDevice vs ``qemu-nbd`` on the same file, measured with fio.

Both serve one raw file on /dev/shm (so the NBD path, not a disk, is measured), each on a Unix
socket (the path a node's QEMU takes to AECP's server). Jobs: 4k
randread/randwrite at QD1 and QD32, 1M sequential read/write at QD8; each job runs against both
servers back to back. Prints IOPS, MiB/s, p99 completion latency and the ratio AECP/qemu-nbd.

Usage: .venv/bin/python benchmarks/nbd_file_vs_qemu_nbd.py [--seconds 5] [--size-mib 1024]
       [--uvloop] [--rounds 1]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

AECP_SOCKET, QEMU_SOCKET = "aecp.sock", "qemu-nbd.sock"  # in the run's temporary directory
JOBS = [  # name, rw, block size, queue depth
    ("4k randread QD1", "randread", "4k", 1),
    ("4k randread QD32", "randread", "4k", 32),
    ("4k randwrite QD1", "randwrite", "4k", 1),
    ("4k randwrite QD32", "randwrite", "4k", 32),
    ("1M seqread QD8", "read", "1M", 8),
    ("1M seqwrite QD8", "write", "1M", 8),
]


def serve(path: str, sock: str, use_uvloop: bool) -> None:
    """Child process: serve ``path`` as export ``disk`` until SIGTERM."""
    from aecp.storage.blockdev import BlockDevice
    from aecp.storage.filedev import FileDevice
    from aecp.storage.frontends.nbd.server import NbdServer

    async def open_export(name: str) -> BlockDevice:
        if name != "disk":
            raise KeyError(name)
        return await FileDevice.open(path)

    async def list_exports() -> list[str]:
        return ["disk"]

    async def main() -> None:
        server = NbdServer(None, 0, open_export, list_exports, unix_path=Path(sock))
        await server.start()
        stop = asyncio.Event()
        asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
        await stop.wait()
        await server.stop()

    if use_uvloop:
        import uvloop

        uvloop.install()
    asyncio.run(main())


def make_image(path: Path, size: int) -> None:
    chunk = os.urandom(1 << 20)
    with path.open("wb") as f:
        for _ in range(size >> 20):
            f.write(chunk)


def wait_socket(path: Path) -> None:
    import socket

    for _ in range(100):
        with socket.socket(socket.AF_UNIX) as s:
            if s.connect_ex(str(path)) == 0:
                return
        time.sleep(0.1)
    raise RuntimeError(f"nothing listens on {path}")


def fio(
    uri: str, rw: str, bs: str, qd: int, seconds: int, size: int, out: Path
) -> dict[str, float]:
    argv = [
        "fio", "--name=bench", "--ioengine=nbd", f"--uri={uri}", f"--rw={rw}", f"--bs={bs}",
        f"--iodepth={qd}", f"--size={size}", "--time_based", f"--runtime={seconds}",
        "--output-format=json", f"--output={out}",
    ]  # fmt: skip
    subprocess.run(argv, check=True, stdout=subprocess.DEVNULL)  # noqa: S603 - argv list
    job = json.loads(out.read_text())["jobs"][0]
    side = job["read"] if "read" in rw else job["write"]
    p99 = side["clat_ns"].get("percentile", {}).get("99.000000", 0) / 1000
    return {"iops": side["iops"], "mib": side["bw_bytes"] / (1 << 20), "p99_us": p99}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seconds", type=int, default=5)
    ap.add_argument("--size-mib", type=int, default=1024)
    ap.add_argument("--rounds", type=int, default=1, help="repeat each job; report the best")
    ap.add_argument("--uvloop", action="store_true", help="run AECP's server on uvloop")
    ap.add_argument("--serve", nargs=2, metavar=("PATH", "SOCKET"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.serve:
        serve(args.serve[0], args.serve[1], args.uvloop)
        return
    size = args.size_mib << 20
    with tempfile.TemporaryDirectory(dir="/dev/shm") as tmp:
        image = Path(tmp) / "bench.raw"
        make_image(image, size)
        socks = {"aecp": Path(tmp) / AECP_SOCKET, "qemu-nbd": Path(tmp) / QEMU_SOCKET}
        argv = [sys.executable, __file__, "--serve", str(image), str(socks["aecp"])]
        aecp = subprocess.Popen(argv + (["--uvloop"] if args.uvloop else []))  # noqa: S603
        qemu = subprocess.Popen(  # noqa: S603 - argv list, no shell
            ["qemu-nbd", "-t", "--cache=writeback", "-f", "raw", "-k", str(socks["qemu-nbd"]),
             "-x", "disk", str(image)],
            stderr=subprocess.DEVNULL,  # it complains about wait_socket's probe connections
        )  # fmt: skip
        try:
            for sock in socks.values():
                wait_socket(sock)
            report(args, size, Path(tmp) / "fio.json", socks)
        finally:
            for proc in (aecp, qemu):
                proc.terminate()
                proc.wait(timeout=30)


def report(args: argparse.Namespace, size: int, out: Path, socks: dict[str, Path]) -> None:
    head = f"{'job':<18} {'server':<9} {'IOPS':>9} {'MiB/s':>8} {'p99 us':>9}  ratio"
    print(head)
    print("-" * len(head))
    for name, rw, bs, qd in JOBS:
        best: dict[str, dict[str, float]] = {}
        for _ in range(args.rounds):
            for label, sock in socks.items():
                r = fio(f"nbd+unix:///disk?socket={sock}", rw, bs, qd, args.seconds, size, out)
                if label not in best or r["iops"] > best[label]["iops"]:
                    best[label] = r
        for label in ("aecp", "qemu-nbd"):
            r = best[label]
            ratio = r["iops"] / best["qemu-nbd"]["iops"] if label == "aecp" else 1.0
            print(
                f"{name:<18} {label:<9} {r['iops']:>9.0f} {r['mib']:>8.1f} {r['p99_us']:>9.0f}"
                f"  {ratio:.2f}"
            )


if __name__ == "__main__":
    main()
