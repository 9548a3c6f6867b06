"""The least CPU a replicated 1 MiB write can cost on this machine, and what that allows.

ABS at factor f must do, per MiB written, everything qemu-nbd does (take the data from fio's
socket, put it in the page cache) plus work qemu-nbd does not do at all: compute the sector
checksums, and for each of the f-1 remote replicas send the MiB over TCP, receive it there and
write it to that replica's page cache. This script measures those kernel and library costs
alone, in tight loops with no Python overhead to speak of, and qemu-nbd's own cost per MiB
(fio included) over NBD. If all of that ran in parallel on every core with nothing else, ABS
could reach at most

    cores / (qemu-nbd CPU per MiB + checksums + (f-1) x (TCP send+receive + page-cache write))

MiB/s; divided by qemu-nbd's own MiB/s, that is the highest ratio any implementation of the
same design could show in ``make bench-storage`` on this machine, where all three "nodes"
share its cores. It is a bound, not an estimate: real code adds its own per-request costs.

Usage: .venv/bin/python benchmarks/write_floor.py [--seconds 10] [--size-mib 1024]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import socket
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path

from aecp.storage.chunk.diskio import WRITE_PIECE, sector_crcs

MIB = 1 << 20
HOST = "127.0.0.1"


def cpu() -> float:
    """CPU seconds of this process (every thread), user and system."""
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def per_mib(fn: Callable[[], int]) -> float:
    """CPU µs per MiB of ``fn`` (which returns the MiB it moved)."""
    c0 = cpu()
    n = fn()
    return (cpu() - c0) / n * 1e6


def tcp_pair(total_mib: int) -> int:
    """Send ``total_mib`` MiB over loopback TCP in 1 MiB messages and receive them."""
    with socket.create_server((HOST, 0)) as srv:
        tx = socket.create_connection(srv.getsockname())
        rx, _ = srv.accept()
    data = os.urandom(MIB)

    def receive() -> None:
        buf = memoryview(bytearray(MIB))
        left = total_mib * MIB
        while left:
            left -= rx.recv_into(buf, min(MIB, left))

    t = threading.Thread(target=receive)
    t.start()
    for _ in range(total_mib):
        tx.sendall(data)
    t.join()
    tx.close()
    rx.close()
    return total_mib


def write_file(fd: int, size_mib: int, data: memoryview) -> None:
    """Write ``size_mib`` MiB at the start of ``fd``, in ``WRITE_PIECE`` pieces (as a replica
    does)."""
    for mib in range(size_mib):
        for at in range(0, MIB, WRITE_PIECE):
            os.pwrite(fd, data[at : at + WRITE_PIECE], mib * MIB + at)


def page_cache_writes(fd: int, size_mib: int, rounds: int) -> int:
    """Overwrite the first ``size_mib`` MiB of ``fd`` ``rounds`` times."""
    data = memoryview(os.urandom(MIB))
    for _ in range(rounds):
        write_file(fd, size_mib, data)
    return size_mib * rounds


def checksums(n: int) -> int:
    data = os.urandom(MIB)
    for _ in range(n):
        sector_crcs(data, 4096)
    return n


def host_busy() -> float:
    """CPU seconds the machine has spent running anything since boot: user, nice, system, irq
    and softirq from /proc/stat (not idle, iowait or steal, the hypervisor's share)."""
    v = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    return (v[0] + v[1] + v[2] + v[5] + v[6]) / os.sysconf("SC_CLK_TCK")


def qemu_nbd_run(image: Path, seconds: int) -> tuple[float, float]:
    """fio 1 MiB sequential writes, QD8, over NBD to ``qemu-nbd --cache=writeback``: the
    MiB/s and the whole machine's CPU µs per MiB (fio, qemu-nbd, the kernel's writeback)."""
    with socket.socket() as s:
        s.bind((HOST, 0))
        port = s.getsockname()[1]
    argv = ["qemu-nbd", "-t", "--cache=writeback", "-f", "raw", "--bind", HOST,
            "--port", str(port), "-x", "disk", str(image)]  # fmt: skip
    proc = subprocess.Popen(argv, stderr=subprocess.DEVNULL)  # noqa: S603 - argv list
    try:
        for _ in range(100):
            with socket.socket() as s:
                if s.connect_ex((HOST, port)) == 0:
                    break
            time.sleep(0.1)
        fio = ["fio", "--name=floor", "--ioengine=nbd", f"--uri=nbd://{HOST}:{port}/disk",
               "--rw=write", "--bs=1M", "--iodepth=8", f"--size={image.stat().st_size}",
               "--time_based", f"--runtime={seconds}", "--output-format=json"]  # fmt: skip
        os.sync()
        busy = host_busy()
        out = subprocess.run(fio, capture_output=True, text=True, check=True)  # noqa: S603
        busy = host_busy() - busy
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    job = json.loads(out.stdout[out.stdout.index("{") :])["jobs"][0]["write"]
    mib_s = job["bw_bytes"] / MIB
    return mib_s, busy / (job["io_bytes"] / MIB) * 1e6


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seconds", type=int, default=10, help="length of the qemu-nbd run")
    ap.add_argument("--size-mib", type=int, default=1024, help="file size for the write runs")
    args = ap.parse_args()
    cores = os.cpu_count() or 1
    with tempfile.TemporaryDirectory(prefix="aecp-floor-", dir="/tmp") as d:
        image = Path(d) / "baseline.raw"
        image.touch()
        os.truncate(image, args.size_mib * MIB)
        qemu_mib_s, qemu_us = qemu_nbd_run(image, args.seconds)
        os.sync()
        tcp = per_mib(lambda: tcp_pair(2000))
        # as in a benchmark job: the replica's blocks exist and were written back (clean)
        fd = os.open(Path(d) / "replica", os.O_RDWR | os.O_CREAT, 0o600)
        try:
            write_file(fd, args.size_mib, memoryview(os.urandom(MIB)))
            os.sync()
            write = per_mib(lambda: page_cache_writes(fd, args.size_mib, 2))
        finally:
            os.close(fd)
        crc = per_mib(lambda: checksums(500))
    print(f"qemu-nbd, fio 1M seqwrite QD8: {qemu_mib_s:.0f} MiB/s, {qemu_us:.0f} µs CPU/MiB"
          f" (whole machine, {cores} cores)")  # fmt: skip
    print(
        f"TCP loopback send+receive: {tcp:.0f} µs/MiB; page-cache write in "
        f"{WRITE_PIECE >> 10} KiB pieces: {write:.0f} µs/MiB; sector checksums: {crc:.0f} µs/MiB"
    )
    print("\nfactor  extra µs/MiB  least µs/MiB  most MiB/s  highest ratio (goal 0.80)")
    for f in (1, 2, 3):
        extra = crc + (f - 1) * (tcp + write)
        least = qemu_us + extra
        most = cores * 1e6 / least
        print(f"{f:>6}  {extra:>12.0f}  {least:>12.0f}  {most:>10.0f}  {most / qemu_mib_s:>13.2f}")


if __name__ == "__main__":
    main()
