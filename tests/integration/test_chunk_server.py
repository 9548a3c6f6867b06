"""ChunkServer and ChunkClient over real TCP on 127.0.46.1: pipelining, every operation of the
contract (also through LocalChunkClient), errors across the wire, a server that stops or stalls
mid-flight, and malformed frames."""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import os
import random
import socket
import struct
from array import array
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import uvloop
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from aecp.common.tls import Credentials
from aecp.storage.chunk import server as chunk_server_module
from aecp.storage.chunk.api import ReplicaClient
from aecp.storage.chunk.auth import MAGIC, NONCE, ReplicaAuth, client_handshake
from aecp.storage.chunk.client import ChunkClient, LocalChunkClient
from aecp.storage.chunk.diskio import sector_crcs
from aecp.storage.chunk.errors import (
    ChecksumError,
    ChunkInvalid,
    ChunkIOError,
    ExtentExists,
    ExtentNotFound,
    ReplicaUnavailable,
    StaleEpoch,
)
from aecp.storage.chunk.server import ChunkServer
from aecp.storage.chunk.store import ReplicaStore
from tests.pkikit import TestPKI

pytestmark = pytest.mark.integration

HOST = "127.0.46.1"
SERVER = "n1"  # the node the chunk server runs as; clients run as "n2"
MIB = 1 << 20
BLOCK = 256 * 1024
SECTOR = 4096


class CountingStore(ReplicaStore):
    """Records how many writes were inside the store at once."""

    def __init__(self, root: Path) -> None:
        super().__init__(root)
        self.inside = 0
        self.peak = 0

    def write_nowait(self, *args: Any, **kwargs: Any) -> None:
        return None  # every write goes through ``write``, where it is counted

    async def write(self, *args: Any, **kwargs: Any) -> None:
        self.inside += 1
        self.peak = max(self.peak, self.inside)
        try:
            await super().write(*args, **kwargs)
        finally:
            self.inside -= 1


class StallingStore(ReplicaStore):
    """Writes wait until ``release`` is set, so requests stay in flight; ``stalled`` is set
    once ``expect`` writes are waiting."""

    def __init__(self, root: Path, expect: int = 1) -> None:
        super().__init__(root)
        self.release = asyncio.Event()
        self.stalled = asyncio.Event()
        self.expect = expect
        self.arrived = 0

    def write_nowait(self, *args: Any, **kwargs: Any) -> None:
        return None  # every write goes through ``write``, where it stalls

    async def write(self, *args: Any, **kwargs: Any) -> None:
        self.arrived += 1
        if self.arrived >= self.expect:
            self.stalled.set()
        await self.release.wait()
        await super().write(*args, **kwargs)


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> TestPKI:
    return TestPKI(tmp_path_factory.mktemp("pki"), HOST)


@pytest.fixture(autouse=True)
def _credentials(pki: TestPKI) -> None:
    CREDENTIALS["server"] = pki.replica_auth(SERVER)
    CREDENTIALS["client"] = pki.replica_auth("n2")


CREDENTIALS: dict[str, Any] = {}


def chunk_server(store: ReplicaStore, port: int = 0) -> ChunkServer:
    return ChunkServer(store, HOST, port, auth=CREDENTIALS["server"])


def chunk_client(port: int, timeout: float) -> ChunkClient:
    return ChunkClient(HOST, port, node=SERVER, auth=CREDENTIALS["client"], timeout=timeout)


@pytest.fixture
async def store(tmp_path: Path) -> AsyncIterator[CountingStore]:
    s = CountingStore(tmp_path / "node")
    yield s
    await s.close()


@pytest.fixture
async def server(store: ReplicaStore) -> AsyncIterator[ChunkServer]:
    srv = chunk_server(store, 0)
    await srv.start()
    yield srv
    await srv.stop()


@pytest.fixture
async def client(server: ChunkServer) -> AsyncIterator[ChunkClient]:
    c = chunk_client(server.port, 30)
    yield c
    await c.close()


@pytest.fixture(params=["tcp", "local"])
async def replica(
    request: pytest.FixtureRequest, store: ReplicaStore, client: ChunkClient
) -> ReplicaClient:
    return client if request.param == "tcp" else LocalChunkClient(store)


def pattern(n: int, seed: int) -> bytes:
    return bytes((i * 13 + seed) & 0xFF for i in range(n))


async def test_64_pipelined_writes_on_one_connection_read_back(
    client: ChunkClient, store: CountingStore
) -> None:
    await client.create("e1", 64 * MIB)
    offsets = random.Random(7).sample(range(64 * MIB // SECTOR), 64)
    await asyncio.gather(
        *(
            client.write("e1", o * SECTOR, pattern(SECTOR, i), epoch=1, generation=1)
            for i, o in enumerate(offsets)
        )
    )
    assert store.peak > 1
    reads = await asyncio.gather(*(client.read("e1", o * SECTOR, SECTOR) for o in offsets))
    assert reads == [pattern(SECTOR, i) for i in range(64)]
    assert (await client.stat("e1")).valid_bytes == 64 * SECTOR


async def test_writes_started_at_once_are_answered_and_their_errors_cross_the_wire(
    tmp_path: Path,
) -> None:
    """Writes into blocks already written take the store's ``write_nowait`` path (no task on
    the server); their answers, errors included, are those of ``write``."""
    store = ReplicaStore(tmp_path / "node")
    server = chunk_server(store, 0)
    await server.start()
    client = chunk_client(server.port, 30)
    try:
        await client.create("e1", 4 * MIB, epoch=1)
        await client.write("e1", 0, pattern(BLOCK, 0), epoch=1, generation=1)
        await asyncio.gather(
            *(
                client.write("e1", i * SECTOR, pattern(SECTOR, i), epoch=1, generation=2)
                for i in range(BLOCK // SECTOR)
            )
        )
        expect = b"".join(pattern(SECTOR, i) for i in range(BLOCK // SECTOR))
        assert await client.read("e1", 0, BLOCK) == expect
        assert await client.modified_since("e1", 1) == [(0, BLOCK)]
        with pytest.raises(StaleEpoch):
            await client.write("e1", 0, pattern(SECTOR, 9), epoch=0, generation=3)
        rep = store._replicas["e1"]
        good_fd, rep.data_fd = rep.data_fd, os.open(os.devnull, os.O_RDONLY)
        try:
            with pytest.raises(ChunkIOError):
                await client.write("e1", 0, pattern(SECTOR, 9), epoch=1, generation=3)
        finally:
            os.close(rep.data_fd)
            rep.data_fd = good_fd
        await client.ping()  # the connection went on
        assert await client.read("e1", 0, BLOCK) == expect
    finally:
        await client.close()
        await server.stop()
        await store.close()


async def test_sector_checksums_given_by_the_writer_are_the_ones_reads_verify(
    replica: ReplicaClient,
) -> None:
    """The access point computes a write's checksums once for every replica: the replica
    records them as given (right ones read back; wrong ones fail the read, which is how a
    bad replica is found and repaired), over TCP and locally alike."""
    await replica.create("e1", 4 * MIB, epoch=1)
    data = pattern(2 * SECTOR, 3)
    await replica.write("e1", 0, pattern(BLOCK, 0), epoch=1, generation=1)  # INTENT logged
    await replica.write("e1", 0, data, epoch=1, generation=2, crcs=sector_crcs(data, SECTOR))
    assert await replica.read("e1", 0, 2 * SECTOR) == data
    wrong = array("I", [1, 2])
    await replica.write("e1", SECTOR * 8, data, epoch=1, generation=2, crcs=wrong)
    with pytest.raises(ChecksumError) as info:
        await replica.read("e1", SECTOR * 8, 2 * SECTOR)
    assert info.value.sectors == [8, 9]
    # checksums that do not match the write's sector count are not used
    await replica.write("e1", SECTOR * 16, data, epoch=1, generation=2, crcs=array("I", [1]))
    assert await replica.read("e1", SECTOR * 16, 2 * SECTOR) == data


async def test_every_operation_behaves_the_same_over_tcp_and_locally(
    replica: ReplicaClient,
) -> None:
    await replica.ping()
    await replica.create("e1", 4 * MIB, epoch=1, generation=1)
    await replica.create("e1", 4 * MIB, epoch=1, generation=1)
    await replica.write("e1", 0, pattern(3 * BLOCK, 1), epoch=1, generation=2, fua=True)
    await replica.trim("e1", BLOCK, BLOCK, epoch=1, generation=3)
    await replica.write_zeroes("e1", 10, 20, epoch=1, generation=3)
    await replica.flush("e1")
    await replica.flush()
    expected = bytearray(pattern(3 * BLOCK, 1))
    expected[BLOCK : 2 * BLOCK] = bytes(BLOCK)
    expected[10:30] = bytes(20)
    assert await replica.read("e1", 0, 3 * BLOCK) == expected
    assert await replica.list_extents() == ["e1"]
    stat = await replica.stat("e1")
    assert (stat.epoch, stat.generation, stat.allocated_bytes) == (1, 3, 2 * BLOCK)
    assert await replica.modified_since("e1", 2) == [(0, 2 * BLOCK)]
    assert await replica.allocation("e1") == [
        (0, BLOCK, True),
        (BLOCK, BLOCK, False),
        (2 * BLOCK, BLOCK, True),
        (3 * BLOCK, 4 * MIB - 3 * BLOCK, False),
    ]
    raw = await replica.read_raw("e1", 0, 4 * BLOCK)
    await replica.create("e2", 4 * MIB, epoch=2)
    with pytest.raises(StaleEpoch):  # the epoch crosses the wire with the raw blocks
        await replica.write_raw("e2", raw, 1)
    await replica.write_raw("e2", raw, 2)
    assert await replica.read("e2", 0, 4 * BLOCK) == await replica.read("e1", 0, 4 * BLOCK)
    assert await replica.scrub("e1") == []
    await replica.repair("e1", 0, pattern(SECTOR, 9))
    assert await replica.read("e1", 0, SECTOR) == pattern(SECTOR, 9)
    assert await replica.fence("e1", 4) == 4
    await replica.set_generation("e1", 11)
    assert (await replica.stat("e1")).generation == 11
    await replica.delete("e2")
    assert await replica.list_extents() == ["e1"]
    await replica.close()
    with pytest.raises(ReplicaUnavailable):
        await replica.ping()


async def test_errors_cross_the_wire_and_the_connection_goes_on(
    client: ChunkClient, tmp_path: Path
) -> None:
    await client.create("e1", 4 * MIB, epoch=5)
    with pytest.raises(StaleEpoch) as stale:
        await client.write("e1", 0, b"x" * SECTOR, epoch=4, generation=1)
    assert (stale.value.epoch, stale.value.stored) == (4, 5)
    with pytest.raises(ExtentNotFound):
        await client.read("nope", 0, 1)
    with pytest.raises(ExtentExists):
        await client.create("e1", 8 * MIB)
    with pytest.raises(ChunkInvalid):
        await client.read("e1", 4 * MIB - 1, 2)
    with pytest.raises(ChunkInvalid):
        await client.read("BAD/ID", 0, 1)
    pending = client.write("BAD/ID", 0, b"x", epoch=5, generation=1)  # the call raises nothing
    with pytest.raises(ChunkInvalid):
        await pending
    await client.write("e1", 0, pattern(SECTOR, 3), epoch=5, generation=1)
    await client.flush("e1")
    with (tmp_path / "node" / "e1.data").open("r+b") as f:
        f.write(b"corrupt")
    with pytest.raises(ChecksumError) as bad:
        await client.read("e1", 0, SECTOR)
    assert bad.value.sectors == [0]
    assert await client.scrub("e1") == [0]
    await client.ping()


async def test_a_server_stopped_mid_flight_fails_pending_requests_then_the_client_reconnects(
    tmp_path: Path,
) -> None:
    store = StallingStore(tmp_path / "node", expect=8)
    server = chunk_server(store, 0)
    await server.start()
    port = server.port
    client = chunk_client(port, 30)
    try:
        await client.create("e1", 4 * MIB)
        writes = [
            asyncio.ensure_future(
                client.write("e1", i * SECTOR, b"w" * SECTOR, epoch=1, generation=1)
            )
            for i in range(8)
        ]
        await store.stalled.wait()
        await server.stop()
        results = await asyncio.gather(*writes, return_exceptions=True)
        assert all(isinstance(r, ReplicaUnavailable) for r in results), results
        store.release.set()
        with pytest.raises(ReplicaUnavailable):
            await client.ping()
        server = chunk_server(store, port)
        await server.start()
        await client.write("e1", 0, b"again" * 100, epoch=1, generation=2)
        assert await client.read("e1", 0, 500) == b"again" * 100
    finally:
        await client.close()
        await server.stop()
        await store.close()


async def test_a_request_that_times_out_fails_the_connection_and_the_next_call_reconnects(
    tmp_path: Path,
) -> None:
    store = StallingStore(tmp_path / "node")
    await store.create("e1", 4 * MIB)
    server = chunk_server(store, 0)
    await server.start()
    client = chunk_client(server.port, 0.5)
    try:
        await client.ping()
        with pytest.raises(ReplicaUnavailable, match="no answer"):
            await client.write("e1", 0, b"x" * SECTOR, epoch=1, generation=1)
        store.release.set()
        await client.ping()
        assert (await client.stat("e1")).size == 4 * MIB
    finally:
        await client.close()
        await server.stop()
        await store.close()


async def test_an_unreachable_server_raises_replica_unavailable() -> None:
    with socket.socket() as probe:  # a port nobody listens on
        probe.bind((HOST, 0))
        port = probe.getsockname()[1]
    client = chunk_client(port, 2)
    with pytest.raises(ReplicaUnavailable, match="cannot connect"):
        await client.ping()
    await client.close()


async def test_a_connection_that_does_not_authenticate_is_refused_and_others_go_on(
    server: ChunkServer, client: ChunkClient
) -> None:
    await client.ping()
    reader, writer = await asyncio.open_connection(HOST, server.port)
    writer.write(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n" + bytes(64))
    await writer.drain()
    with contextlib.suppress(ConnectionResetError):  # refused with unread bytes: a reset
        while await reader.read(4096):
            pass
    writer.close()
    with contextlib.suppress(ConnectionResetError):
        await writer.wait_closed()
    assert server.refused == 1
    await client.ping()


async def test_a_malformed_frame_after_authentication_closes_that_connection_only(
    server: ChunkServer, client: ChunkClient
) -> None:
    loop = asyncio.get_running_loop()
    with socket.socket() as sock:
        sock.setblocking(False)
        await loop.sock_connect(sock, (HOST, server.port))
        await client_handshake(sock, CREDENTIALS["client"], SERVER, 5)
        await loop.sock_sendall(sock, b"GET / HTTP/1.1\r\nHost: x\r\n\r\n" + bytes(64))
        assert await loop.sock_recv(sock, 4096) == b""
    assert server.refused == 0
    await client.ping()


@pytest.mark.parametrize("encrypt", [False, True], ids=["signed", "tls"])
def test_client_and_server_work_on_uvloop_whose_transports_are_no_asyncio_subclass(
    tmp_path: Path, pki: TestPKI, encrypt: bool
) -> None:
    """The storage daemon runs on uvloop, whose TLS wrapper is what it returns as the
    protocol of a connection made with ``ssl``."""

    async def scenario() -> None:
        async with ReplicaStore(tmp_path / "node") as store:
            server = ChunkServer(store, HOST, 0, auth=pki.replica_auth(SERVER, encrypt=encrypt))
            await server.start()
            auth = pki.replica_auth("n2", encrypt=encrypt)
            client = ChunkClient(HOST, server.port, node=SERVER, auth=auth, timeout=30)
            try:
                await client.create("e1", 4 * MIB)
                await client.write("e1", 0, pattern(SECTOR, 5), epoch=1, generation=1)
                assert await client.read("e1", 0, SECTOR) == pattern(SECTOR, 5)
            finally:
                await client.close()
                await server.stop()
            assert server.refused == 0

    uvloop.run(scenario())


# -- authentication (issue 11: "the replica protocol has no authentication in its code") ------


async def test_a_client_without_a_node_certificate_of_this_cluster_is_refused(
    server: ChunkServer, tmp_path: Path
) -> None:
    stranger = TestPKI(tmp_path / "other-ca", HOST).replica_auth("n2")
    client = ChunkClient(HOST, server.port, node=SERVER, auth=stranger, timeout=5)
    try:
        with pytest.raises(ReplicaUnavailable, match="not issued by the cluster CA"):
            await client.ping()
    finally:
        await client.close()
    assert server.refused == 1


async def test_a_client_role_certificate_is_refused_on_the_replica_protocol(
    server: ChunkServer, pki: TestPKI
) -> None:
    for encrypt in (False, True):
        admin = ReplicaAuth(Credentials(pki.ca.issue_client("admin")), encrypt)
        client = ChunkClient(HOST, server.port, node=SERVER, auth=admin, timeout=5)
        try:
            with pytest.raises(ReplicaUnavailable):
                await client.ping()
        finally:
            await client.close()
    assert server.refused == 2


async def test_the_client_refuses_a_server_that_is_not_the_node_it_meant_to_reach(
    server: ChunkServer,
) -> None:
    client = ChunkClient(HOST, server.port, node="n3", auth=CREDENTIALS["client"], timeout=5)
    try:
        with pytest.raises(ReplicaUnavailable, match="expected 'n3'"):
            await client.ping()
    finally:
        await client.close()


async def test_with_encryption_on_the_protocol_runs_inside_mutual_tls(
    store: ReplicaStore, pki: TestPKI
) -> None:
    server = ChunkServer(store, HOST, 0, auth=pki.replica_auth(SERVER, encrypt=True))
    await server.start()
    signed = ChunkClient(HOST, server.port, node=SERVER, auth=CREDENTIALS["client"], timeout=5)
    encrypted = ChunkClient(
        HOST, server.port, node=SERVER, auth=pki.replica_auth("n2", encrypt=True), timeout=5
    )
    try:
        with pytest.raises(ReplicaUnavailable, match="requires encrypted"):
            await signed.ping()
        await encrypted.create("e1", 4 * MIB, epoch=1)
        await encrypted.write("e1", 0, pattern(MIB, 3), epoch=1, generation=1)
        assert await encrypted.read("e1", 0, MIB) == pattern(MIB, 3)
    finally:
        await signed.close()
        await encrypted.close()
        await server.stop()
    assert server.refused == 1


# -- handshake slots (review: 64 idle connections locked every node out) -----------------------


async def idle_connection() -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    return await asyncio.open_connection(HOST, CREDENTIALS["port"])


async def closed_by_server(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> bool:
    with contextlib.suppress(ConnectionError):
        if await asyncio.wait_for(reader.read(), 30) == b"":
            writer.close()
            return True
    writer.close()
    return False


async def test_a_connection_that_sends_no_hello_is_closed(server: ChunkServer) -> None:
    CREDENTIALS["port"] = server.port
    reader, writer = await idle_connection()
    assert await closed_by_server(reader, writer)  # after HELLO_TIMEOUT
    assert server.refused == 1


async def test_idle_connections_holding_every_slot_give_way_to_a_node(
    server: ChunkServer, client: ChunkClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(chunk_server_module, "MAX_HANDSHAKES", 3)
    monkeypatch.setattr(chunk_server_module, "HELLO_TIMEOUT", 30.0)
    CREDENTIALS["port"] = server.port
    idle = [await idle_connection() for _ in range(3)]
    for _ in range(100):  # until the server accepted all three
        if len(server._admitting) == 3:
            break
        await asyncio.sleep(0.01)
    await client.ping()  # the node's connection takes the oldest idle one's slot
    assert await closed_by_server(*idle[0])
    for _, writer in idle[1:]:
        writer.close()


async def test_one_address_holds_a_few_handshake_slots_only(
    server: ChunkServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(chunk_server_module, "HELLO_TIMEOUT", 30.0)
    CREDENTIALS["port"] = server.port
    idle = [await idle_connection() for _ in range(chunk_server_module.MAX_HANDSHAKES_PER_ADDRESS)]
    for _ in range(100):
        if len(server._admitting) == len(idle):
            break
        await asyncio.sleep(0.01)
    reader, writer = await idle_connection()
    assert await closed_by_server(reader, writer)  # at once: the address has no slot left
    assert server.refused == 1
    for _, w in idle:
        w.close()


async def test_a_hello_certificate_whose_name_cannot_be_decoded_is_refused_not_a_crash(
    server: ChunkServer, pki: TestPKI
) -> None:
    """Decoding its subject raised ValueError out of the handshake: the task died with a
    traceback per connection and the socket stayed open (second security review)."""
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.UTC)
    issuer = pki.node(SERVER).load().ca.subject
    der = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "EVILEVIL")]))
        .issuer_name(issuer)
        .public_key(key.public_key())
        .serial_number(1)
        .not_valid_before(now)
        .not_valid_after(now + datetime.timedelta(days=1))
        .sign(key, hashes.SHA256())
        .public_bytes(serialization.Encoding.DER)
    ).replace(b"\x0c\x08EVILEVIL", b"\x0c\x08\xff\xfe\xfd\xfc\xff\xfe\xfd\xfc")
    reader, writer = await asyncio.open_connection(HOST, server.port)
    hello = MAGIC + b"\0" + bytes(NONCE) + der
    writer.write(struct.pack(">I", len(hello)) + hello)
    with contextlib.suppress(ConnectionError):
        while await asyncio.wait_for(reader.read(4096), 30):
            pass  # the refusal, then the server closes
    writer.close()
    assert server.refused == 1
