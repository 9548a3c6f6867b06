"""4 KiB random write and read throughput of the replica store: directly (``ReplicaStore``),
through ``LocalChunkClient``, and through ``ChunkClient`` to a ``ChunkServer`` in this process
and in a child process. Prints operations per second and CPU microseconds per operation (of
this process; for the child-server case, of the client process only). Connections are
authenticated as in the product (a throwaway cluster CA; ``--encrypt``: TLS).
``--handshakes N`` measures instead what authentication costs a connection: N fresh
connections to an in-process server, each authenticated and answering one PING, in the signed
mode and in TLS, against the PING round trip on a connection already open (median of N each).

Usage: .venv/bin/python benchmarks/chunk_store.py [--seconds 3] [--qd 32] [--dir /tmp/x]
       [--size-mib 256] [--threads 4] [--uvloop] [--encrypt] [--handshakes N]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

from aecp.common.pki import ClusterCA
from aecp.common.tls import Credentials
from aecp.node.storage_server import tune_gc, tune_malloc
from aecp.storage.chunk.api import ReplicaClient
from aecp.storage.chunk.auth import ReplicaAuth
from aecp.storage.chunk.client import ChunkClient, LocalChunkClient
from aecp.storage.chunk.server import ChunkServer
from aecp.storage.chunk.store import ReplicaStore

HOST = "127.0.0.1"
SECTOR = 4096
EXTENT = "bench"


async def run_for(
    seconds: float, qd: int, op: Callable[[int], Awaitable[object]], size: int
) -> tuple[float, float]:
    """Run ``op(offset)`` from ``qd`` workers for ``seconds``: (ops/s, CPU µs per op)."""
    deadline = time.monotonic() + seconds
    count = 0

    async def worker(seed: int) -> None:
        nonlocal count
        rnd = random.Random(seed)
        sectors = size // SECTOR
        while time.monotonic() < deadline:
            await op(rnd.randrange(sectors) * SECTOR)
            count += 1

    t0, c0 = time.monotonic(), time.process_time()
    await asyncio.gather(*(worker(i) for i in range(qd)))
    wall, cpu = time.monotonic() - t0, time.process_time() - c0
    return count / wall, cpu / max(count, 1) * 1e6


async def fill(replica: ReplicaClient, size: int) -> None:
    chunk = os.urandom(1 << 20)
    for offset in range(0, size, len(chunk)):
        await replica.write(EXTENT, offset, chunk, epoch=1, generation=1)
    await replica.flush(EXTENT)


async def measure(name: str, replica: ReplicaClient, args: argparse.Namespace) -> None:
    size = args.size_mib << 20
    data = os.urandom(SECTOR)

    async def write(offset: int) -> None:
        await replica.write(EXTENT, offset, data, epoch=1, generation=2)

    async def read(offset: int) -> None:
        await replica.read(EXTENT, offset, SECTOR)

    for label, op in (("randwrite", write), ("randread", read)):
        ops, cpu_us = await run_for(args.seconds, args.qd, op, size)
        print(f"{name:<28} {label:<10} {ops:>9.0f} ops/s  {cpu_us:6.1f} µs CPU/op", flush=True)
    await replica.flush(EXTENT)


def auth(root: Path, node: str, encrypt: bool) -> ReplicaAuth:
    """``node``'s credentials under the CA in ``root``/pki (made on first use)."""
    ca = ClusterCA(root / "pki")
    if not ca.exists():
        ClusterCA.create(ca.root, "bench")
    bundle = ca.node_bundle(node)
    if not bundle.cert_file.exists():
        ca.issue_node(node, [HOST])
    return ReplicaAuth(Credentials(bundle), encrypt)


def client_of(root: Path, port: int, args: argparse.Namespace) -> ChunkClient:
    return ChunkClient(HOST, port, node="server", auth=auth(root, "client", args.encrypt))


async def bench_store(args: argparse.Namespace, root: Path) -> None:
    async with ReplicaStore(root / "direct", threads=args.threads) as store:
        await store.create(EXTENT, args.size_mib << 20)
        local = LocalChunkClient(store)
        await fill(local, args.size_mib << 20)
        await measure("store (LocalChunkClient)", local, args)


async def bench_inproc_server(args: argparse.Namespace, root: Path) -> None:
    async with ReplicaStore(root / "inproc", threads=args.threads) as store:
        server = ChunkServer(store, HOST, 0, auth=auth(root, "server", args.encrypt))
        await server.start()
        client = client_of(root, server.port, args)
        try:
            await client.create(EXTENT, args.size_mib << 20)
            await fill(client, args.size_mib << 20)
            await measure("ChunkClient, server in-proc", client, args)
        finally:
            await client.close()
            await server.stop()


async def bench_child_server(args: argparse.Namespace, root: Path) -> None:
    auth(root, "server", args.encrypt)  # the credentials exist before the child reads them
    argv = [__file__, "--serve", str(root / "child"), "--threads", str(args.threads)]
    argv += ["--encrypt"] if args.encrypt else []
    child = await asyncio.create_subprocess_exec(
        sys.executable, *argv, *(["--uvloop"] if args.uvloop else []), stdout=subprocess.PIPE
    )
    try:
        assert child.stdout is not None
        port = int(await child.stdout.readline())
        client = client_of(root, port, args)
        try:
            await client.create(EXTENT, args.size_mib << 20)
            await fill(client, args.size_mib << 20)
            await measure("ChunkClient, server process", client, args)
        finally:
            await client.close()
    finally:
        child.terminate()
        await child.wait()


async def bench_handshakes(args: argparse.Namespace, root: Path) -> None:
    """Median time of a new authenticated connection's first PING, per mode, against a PING
    on an open connection: the cost authentication adds, once per connection."""
    async with ReplicaStore(root / "handshakes", threads=args.threads) as store:
        server = ChunkServer(store, HOST, 0, auth=auth(root, "server", False))
        await server.start()
        try:
            warm = ChunkClient(HOST, server.port, node="server", auth=auth(root, "client", False))
            await warm.ping()
            rtt = [await timed(warm.ping) for _ in range(args.handshakes)]
            await warm.close()
            print(f"{'PING, connection open':<34} {statistics.median(rtt) * 1e3:7.3f} ms")
            for encrypt, mode in ((False, "signed"), (True, "TLS")):
                times, a = [], auth(root, "client", encrypt)  # as a node: credentials loaded once
                for _ in range(args.handshakes):
                    client = ChunkClient(HOST, server.port, node="server", auth=a)
                    times.append(await timed(client.ping))
                    await client.close()
                med = statistics.median(times)
                print(f"{'connect + ' + mode + ' handshake + PING':<34} {med * 1e3:7.3f} ms")
        finally:
            await server.stop()


async def timed(call: Callable[[], Awaitable[object]]) -> float:
    t0 = time.perf_counter()
    await call()
    return time.perf_counter() - t0


async def serve(root: Path, threads: int, encrypt: bool, node: str) -> None:
    async with ReplicaStore(root, threads=threads) as store:
        server = ChunkServer(store, HOST, 0, auth=auth(root.parent, node, encrypt))
        await server.start()
        print(server.port, flush=True)
        try:
            await asyncio.Event().wait()
        finally:
            await server.stop()


async def main(args: argparse.Namespace) -> None:
    root = Path(args.dir) if args.dir else Path(tempfile.mkdtemp(prefix="chunk-bench-"))
    print(f"extent {args.size_mib} MiB in {root}, queue depth {args.qd}, {args.seconds:g} s each")
    try:
        if args.handshakes:
            await bench_handshakes(args, root)
            return
        await bench_store(args, root)
        await bench_inproc_server(args, root)
        await bench_child_server(args, root)
    finally:
        if not args.dir:
            shutil.rmtree(root, ignore_errors=True)


def parse() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seconds", type=float, default=3.0)
    p.add_argument("--qd", type=int, default=32, help="requests in flight")
    p.add_argument("--dir", help="where the replicas go (default: a temporary directory)")
    p.add_argument("--size-mib", type=int, default=256)
    p.add_argument("--threads", type=int, default=4)
    p.add_argument("--uvloop", action="store_true")
    p.add_argument("--encrypt", action="store_true", help="replica connections in TLS")
    p.add_argument("--handshakes", type=int, default=0, help="measure N connections per mode")
    p.add_argument("--serve", help=argparse.SUPPRESS)
    p.add_argument("--node", default="server", help=argparse.SUPPRESS)
    return p.parse_args()


if __name__ == "__main__":
    arguments = parse()
    coro = (
        serve(Path(arguments.serve), arguments.threads, arguments.encrypt, arguments.node)
        if arguments.serve
        else main(arguments)
    )
    if arguments.uvloop:
        import uvloop

        if arguments.serve:
            tune_gc()  # as ``aecp storage run`` does
            tune_malloc()

        uvloop.run(coro)
    else:
        asyncio.run(coro)
