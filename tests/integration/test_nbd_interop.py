"""The NBD server against real peers: qemu-io, qemu-img, nbdinfo, nbdcopy and fio, on the
server's Unix socket (the path a node's QEMU takes; TLS on TCP: test_nbd_tls.py).

The server runs in the test's event loop; the tools run as subprocesses (argv lists) so the
loop keeps serving while they work.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import shutil
import struct
import tempfile
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from aecp.storage.blockdev import (
    Allocation,
    BlockDevice,
    BlockError,
    InvalidRequest,
    NoSpace,
    ReadOnly,
    Span,
)
from aecp.storage.filedev import FileDevice
from aecp.storage.frontends.nbd import protocol as p
from aecp.storage.frontends.nbd.server import NbdServer
from tests.receivekit import fail_first_reservation

pytestmark = pytest.mark.integration

DISK_SIZE = 64 << 20


@dataclass
class Served:
    server: NbdServer
    disk: Path
    opens: list[str] = field(default_factory=list)

    @property
    def socket(self) -> Path:
        assert self.server.unix_path is not None
        return self.server.unix_path

    def export_uri(self, name: str) -> str:
        return f"nbd+unix:///{name}?socket={self.socket}"

    @property
    def uri(self) -> str:
        return self.export_uri("disk")


@pytest.fixture
def sock_dir() -> Iterator[Path]:
    """A short directory for Unix sockets (a socket path has at most 107 bytes)."""
    path = Path(tempfile.mkdtemp(prefix="nbd-", dir="/tmp"))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def sparse_file(path: Path, size: int) -> Path:
    path.touch()
    os.truncate(path, size)
    return path


@pytest.fixture
async def served(tmp_path: Path, sock_dir: Path) -> AsyncIterator[Served]:
    """A 64 MiB sparse file served as export ``disk``; each connection opens its own handle."""
    disk = sparse_file(tmp_path / "disk.raw", DISK_SIZE)
    opens: list[str] = []

    async def open_export(name: str) -> BlockDevice:
        if name != "disk":
            raise KeyError(name)
        opens.append(name)
        return await FileDevice.open(disk)

    async def list_exports() -> list[str]:
        return ["disk"]

    server = NbdServer(None, 0, open_export, list_exports, unix_path=sock_dir / "nbd.sock")
    await server.start()
    try:
        yield Served(server, disk, opens)
    finally:
        await server.stop()


async def run(*argv: str, ok: bool = True, cwd: Path | None = None) -> tuple[int, str]:
    """Run a tool; its exit code and combined output (asserting success when ``ok``)."""
    proc = await asyncio.create_subprocess_exec(
        *argv, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT, cwd=cwd
    )
    out, _ = await proc.communicate()
    text = out.decode(errors="replace")
    rc = proc.returncode
    assert rc is not None
    if ok:
        assert rc == 0, f"{argv} exited {rc}:\n{text}"
    return rc, text


def write_sample(path: Path, size: int = DISK_SIZE) -> bytes:
    """A sparse raw image with random data in a few places; returns its contents."""
    data = bytearray(size)
    for offset, n in ((0, 65536), (5 << 20, 1 << 20), (size - 4096, 4096), (33 << 20, 12345)):
        data[offset : offset + n] = os.urandom(n)
    path.write_bytes(data)
    return bytes(data)


def map_lines(text: str) -> list[tuple[int, int, str]]:
    """``nbdinfo --map`` lines as (offset, length, description)."""
    out = []
    for line in text.splitlines():
        parts = line.split(maxsplit=3)
        if len(parts) == 4 and parts[0].isdigit():
            out.append((int(parts[0]), int(parts[1]), parts[3].strip()))
    return out


async def test_qemu_io_writes_a_pattern_and_reads_it_back(served: Served) -> None:
    _, out = await run(
        "qemu-io", "-f", "raw", "-c", "write -P 0xab 0 1M", "-c", "read -P 0xab 0 1M", served.uri
    )
    assert "wrote 1048576/1048576" in out and "read 1048576/1048576" in out
    assert "verification failed" not in out.lower()
    with served.disk.open("rb") as f:
        assert f.read(1 << 20) == b"\xab" * (1 << 20)


async def test_qemu_img_convert_to_the_export_and_back_is_byte_identical(
    served: Served, tmp_path: Path
) -> None:
    src, back = tmp_path / "src.raw", tmp_path / "back.raw"
    data = write_sample(src)
    await run("qemu-img", "convert", "-n", "-f", "raw", "-O", "raw", str(src), served.uri)
    assert served.disk.read_bytes() == data
    await run("qemu-img", "convert", "-f", "raw", "-O", "raw", served.uri, str(back))
    assert back.read_bytes() == data


async def test_nbdinfo_map_shows_data_and_holes_after_a_write_and_a_trim(served: Served) -> None:
    await run("qemu-io", "-f", "raw", "-c", "write -P 0x11 0 1M", served.uri)
    _, out = await run("nbdinfo", "--map", served.uri)
    assert map_lines(out)[:2] == [
        (0, 1 << 20, "data"),
        (1 << 20, DISK_SIZE - (1 << 20), "hole,zero"),
    ]
    await run("qemu-io", "-f", "raw", "-c", "discard 0 512k", served.uri)
    _, out = await run("nbdinfo", "--map", served.uri)
    assert map_lines(out)[:3] == [
        (0, 512 << 10, "hole,zero"),
        (512 << 10, 512 << 10, "data"),
        (1 << 20, DISK_SIZE - (1 << 20), "hole,zero"),
    ]


async def test_nbdinfo_lists_the_export_with_its_size(served: Served) -> None:
    _, out = await run("nbdinfo", "--list", served.export_uri(""))
    assert 'export="disk"' in out and f"export-size: {DISK_SIZE}" in out
    assert "base:allocation" in out


async def test_nbdcopy_both_ways_over_four_connections(served: Served, tmp_path: Path) -> None:
    src, back = tmp_path / "src.raw", tmp_path / "back.raw"
    data = write_sample(src)
    await run("nbdcopy", "--connections=4", "--threads=4", str(src), served.uri)
    assert len(served.opens) >= 4  # the server offered multi-conn and nbdcopy used it
    assert served.disk.read_bytes() == data
    served.opens.clear()
    await run("nbdcopy", "--connections=4", "--threads=4", served.uri, str(back))
    assert len(served.opens) >= 4
    assert back.read_bytes() == data


async def test_fio_random_writes_verify_over_nbd(served: Served, tmp_path: Path) -> None:
    _, out = await run(
        "fio", "--name=nbdverify", "--ioengine=nbd", f"--uri={served.uri}",
        "--rw=randwrite", "--bs=4k", "--iodepth=16", "--size=16M", "--verify=crc32c",
        "--do_verify=1", "--verify_state_save=0", "--runtime=60",
        cwd=tmp_path,
    )  # fmt: skip
    assert "err= 0" in out  # a verify mismatch makes fio report an error
    assert re.search(r"read: IOPS=.*\(16\.0MiB/", out), out  # every block was read back


async def test_an_unknown_export_is_refused_by_name(served: Served) -> None:
    rc, out = await run("nbdinfo", served.export_uri("nope"), ok=False)
    assert rc != 0 and "nope" in out
    assert served.opens == []


async def open_raw(served: Served) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    reader, writer = await asyncio.open_unix_connection(served.socket)
    greeting = await reader.readexactly(18)
    assert struct.unpack(">QQH", greeting)[:2] == (p.NBDMAGIC, p.IHAVEOPT)
    return reader, writer


async def go_raw(served: Served) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """A raw connection in transmission phase on export ``disk``."""
    reader, writer = await open_raw(served)
    writer.write(struct.pack(">I", 3))
    name = b"disk"
    writer.write(p.encode_option(p.Opt.GO, struct.pack(">I", 4) + name + struct.pack(">H", 0)))
    while True:
        _, _, rep, n = struct.unpack(">QIII", await reader.readexactly(20))
        await reader.readexactly(n)
        if rep == p.Rep.ACK:
            return reader, writer
        assert rep == p.Rep.INFO


async def closed_by_server(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> bytes:
    """Everything the server still sent before closing the connection."""
    try:
        return await reader.read()
    finally:
        writer.close()
        with contextlib.suppress(ConnectionError):
            await writer.wait_closed()


async def test_garbage_and_cut_off_requests_close_only_that_connection(served: Served) -> None:
    reader, writer = await open_raw(served)  # garbage instead of client flags
    writer.write(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
    assert await closed_by_server(reader, writer) == b""

    reader, writer = await go_raw(served)  # garbage instead of a request
    writer.write(b"\xde\xad\xbe\xef" * 16)
    assert await closed_by_server(reader, writer) == b""

    reader, writer = await go_raw(served)  # a header cut off by the client's EOF
    writer.write(p.encode_request(p.Cmd.READ, 1, 0, 512)[:17])
    writer.write_eof()
    assert await closed_by_server(reader, writer) == b""

    reader, writer = await go_raw(served)  # a write whose payload never fully arrives
    writer.write(p.encode_request(p.Cmd.WRITE, 2, 0, 4096, payload=b"\x77" * 100))
    writer.write_eof()
    assert await closed_by_server(reader, writer) == b""
    with served.disk.open("rb") as f:
        assert f.read(4096) == bytes(4096)

    _, out = await run("qemu-io", "-f", "raw", "-c", "read -P 0 0 64k", served.uri)
    assert "verification failed" not in out.lower()


async def test_pipelined_requests_are_all_answered_with_their_cookies(served: Served) -> None:
    reader, writer = await go_raw(served)
    for cookie in range(100):
        payload = bytes([cookie]) * 4096
        writer.write(p.encode_request(p.Cmd.WRITE, cookie, cookie * 4096, 4096, payload=payload))
    writer.write(p.encode_request(p.Cmd.FLUSH, 1000))
    seen = set()
    for _ in range(101):
        magic, err, cookie = struct.unpack(">IIQ", await reader.readexactly(16))
        assert (magic, err) == (p.SIMPLE_REPLY_MAGIC, 0)
        seen.add(cookie)
    assert seen == {*range(100), 1000}
    writer.write(p.encode_request(p.Cmd.DISC, 2000))
    assert await closed_by_server(reader, writer) == b""
    with served.disk.open("rb") as f:
        assert f.read(100 * 4096) == b"".join(bytes([c]) * 4096 for c in range(100))


async def test_stop_closes_live_connections_and_waits_for_them(served: Served) -> None:
    reader, writer = await go_raw(served)
    assert served.server.connections == 1
    await served.server.stop()
    assert served.server.connections == 0
    assert await closed_by_server(reader, writer) == b""


# --- FileDevice, the baseline device behind these tests -----------------------------------


@pytest.mark.parametrize("inline_io", [None, True, False])
async def test_file_device_trim_and_zeroes_read_back_as_zeros_and_holes(
    tmp_path: Path, inline_io: bool | None
) -> None:
    path = tmp_path / "f.raw"
    path.write_bytes(b"\x55" * (1 << 20))
    dev = await FileDevice.open(path, inline_io=inline_io)
    try:
        await dev.trim(0, 256 << 10)
        await dev.write_zeroes(256 << 10, 256 << 10, may_trim=False)
        await dev.write_zeroes(512 << 10, 4096, fua=True)
        assert await dev.read(0, 516 << 10) == bytes(516 << 10)
        assert await dev.read(516 << 10, 4) == b"\x55" * 4
        spans = await dev.block_status(0, 1 << 20)
        assert spans[0] == Span(256 << 10, Allocation.HOLE | Allocation.ZERO)
        assert sum(s.length for s in spans) == 1 << 20
        await dev.write(1000, b"\x66" * 3000, fua=True)
        assert await dev.read(999, 3002) == b"\x00" + b"\x66" * 3000 + b"\x00"
    finally:
        await dev.close()


async def test_file_device_refuses_out_of_range_and_read_only_writes(tmp_path: Path) -> None:
    path = sparse_file(tmp_path / "f.raw", 4096)
    dev = await FileDevice.open(path, read_only=True)
    try:
        with pytest.raises(ReadOnly):
            await dev.write(0, b"x")
        with pytest.raises(InvalidRequest):
            await dev.read(4000, 100)
        assert await dev.read(0, 4096) == bytes(4096)
    finally:
        await dev.close()


async def test_file_device_close_waits_for_io_whose_caller_was_cancelled(tmp_path: Path) -> None:
    path = sparse_file(tmp_path / "f.raw", 8 << 20)
    dev = await FileDevice.open(path)
    writes = [asyncio.ensure_future(dev.write(i << 20, b"\x01" * (1 << 20))) for i in range(8)]
    await asyncio.sleep(0)
    for w in writes:
        w.cancel()
    await asyncio.gather(*writes, return_exceptions=True)
    await dev.close()  # must not close the fd under a running write
    assert path.read_bytes() == b"\x01" * (8 << 20)  # every queued write still landed
    with pytest.raises(BlockError):
        await dev.read(0, 1)


# --- devices that answer at once (``read_nowait``/``write_nowait``) ------------------------


class InstantDevice(BlockDevice):
    """An in-memory device whose reads and writes complete at once (like a volume whose
    data is in the page cache); a write at ``fail_at`` fails with ENOSPC. Counts the reads
    it answered at once."""

    def __init__(self, size: int, fail_at: int = -1) -> None:
        self.size = size
        self.data = bytearray(size)
        self.fail_at = fail_at
        self.instant_reads = 0

    def read_nowait(self, offset: int, length: int) -> bytes:
        self.instant_reads += 1
        return bytes(self.data[offset : offset + length])

    def write_nowait(self, offset: int, data: bytes | bytearray) -> asyncio.Future[None]:
        fut = asyncio.get_running_loop().create_future()
        if offset == self.fail_at:
            fut.set_exception(NoSpace("no room for this one"))
        else:
            self.data[offset : offset + len(data)] = data
            fut.set_result(None)
        return fut

    async def read(self, offset: int, length: int) -> bytes:
        raise AssertionError("every read should have been answered at once")

    async def write(self, offset: int, data: bytes | bytearray, fua: bool = False) -> None:
        self.data[offset : offset + len(data)] = data

    async def flush(self) -> None:
        return None

    async def trim(self, offset: int, length: int) -> None:
        self.data[offset : offset + length] = bytes(length)

    async def write_zeroes(
        self, offset: int, length: int, fua: bool = False, may_trim: bool = True
    ) -> None:
        self.data[offset : offset + length] = bytes(length)

    async def block_status(self, offset: int, length: int) -> list[Span]:
        return [Span(length, Allocation.DATA)]


@pytest.fixture
async def instant(tmp_path: Path, sock_dir: Path) -> AsyncIterator[tuple[Served, InstantDevice]]:
    device = InstantDevice(DISK_SIZE, fail_at=7 * 4096)

    async def open_export(name: str) -> BlockDevice:
        if name != "disk":
            raise KeyError(name)
        return device

    async def list_exports() -> list[str]:
        return ["disk"]

    server = NbdServer(None, 0, open_export, list_exports, unix_path=sock_dir / "nbd.sock")
    await server.start()
    try:
        yield Served(server, tmp_path / "unused"), device
    finally:
        await server.stop()


async def test_instant_replies_stop_while_the_client_does_not_read_them(
    instant: tuple[Served, InstantDevice],
) -> None:
    served, device = instant
    device.data[:] = bytes(range(256)) * (DISK_SIZE // 256)
    reader, writer = await go_raw(served)
    count = 16384  # 64 MiB of replies: far more than the socket buffers hold
    writer.write(
        b"".join(p.encode_request(p.Cmd.READ, c, (c % 256) * 4096, 4096) for c in range(count))
    )
    await writer.drain()
    await asyncio.sleep(0.5)
    assert device.instant_reads < count, "replies were produced with nobody reading them"
    for c in range(count):
        magic, err, cookie = struct.unpack(">IIQ", await reader.readexactly(16))
        assert (magic, err, cookie) == (p.SIMPLE_REPLY_MAGIC, 0, c)
        offset = (c % 256) * 4096
        assert await reader.readexactly(4096) == device.data[offset : offset + 4096], c
    assert device.instant_reads == count
    writer.write(p.encode_request(p.Cmd.DISC, count))
    assert await closed_by_server(reader, writer) == b""


async def test_writes_started_at_once_answer_each_with_its_own_outcome(
    instant: tuple[Served, InstantDevice],
) -> None:
    served, device = instant
    reader, writer = await go_raw(served)
    for c in range(16):
        payload = bytes([c]) * 4096
        writer.write(p.encode_request(p.Cmd.WRITE, c, c * 4096, 4096, payload=payload))
    errors = {}
    for _ in range(16):
        magic, err, cookie = struct.unpack(">IIQ", await reader.readexactly(16))
        assert magic == p.SIMPLE_REPLY_MAGIC
        errors[cookie] = err
    assert errors == {c: (28 if c == 7 else 0) for c in range(16)}  # ENOSPC for the one
    assert device.data[7 * 4096 : 8 * 4096] == bytes(4096)
    assert device.data[8 * 4096 : 9 * 4096] == bytes([8]) * 4096
    writer.write(p.encode_request(p.Cmd.DISC, 99))
    assert await closed_by_server(reader, writer) == b""


async def test_large_writes_past_the_payload_budget_land_whole_and_release_it(
    instant: tuple[Served, InstantDevice],
) -> None:
    """Payload buffers are reserved against the server's budget when a WRITE's header
    arrives; past it, the payload is buffered as it arrives instead. Either way the data
    lands whole and nothing stays reserved."""
    served, device = instant
    intake = served.server.intake
    payloads = [bytes([i]) * (256 << 10) for i in range(1, 5)]
    for budget in (intake.budget, 64 << 10):  # room for every payload; room for none
        intake.budget = budget
        reader, writer = await go_raw(served)
        for i, data in enumerate(payloads):
            writer.write(p.encode_request(p.Cmd.WRITE, i, i << 20, len(data), payload=data))
        for _ in payloads:
            magic, err, _ = struct.unpack(">IIQ", await reader.readexactly(16))
            assert (magic, err) == (p.SIMPLE_REPLY_MAGIC, 0)
        for i, data in enumerate(payloads):
            assert device.data[i << 20 : (i << 20) + len(data)] == data
            device.data[i << 20 : (i << 20) + len(data)] = bytes(len(data))
        assert intake.reserved == 0
        writer.write(p.encode_request(p.Cmd.DISC, 99))
        assert await closed_by_server(reader, writer) == b""


async def test_a_stalled_write_gives_back_its_reservation_when_the_client_goes(
    instant: tuple[Served, InstantDevice],
) -> None:
    served, _ = instant
    reader, writer = await go_raw(served)
    writer.write(p.encode_request(p.Cmd.WRITE, 1, 0, 1 << 20, payload=bytes(1 << 20))[:5000])
    await writer.drain()
    for _ in range(100):
        if served.server.intake.reserved == 1 << 20:
            break
        await asyncio.sleep(0.01)
    assert served.server.intake.reserved == 1 << 20
    writer.close()
    await closed_by_server(reader, writer)
    for _ in range(100):
        if served.server.intake.reserved == 0:
            break
        await asyncio.sleep(0.01)
    assert served.server.intake.reserved == 0


async def test_a_failed_payload_allocation_drops_the_client_instead_of_hanging(
    instant: tuple[Served, InstantDevice], monkeypatch: pytest.MonkeyPatch
) -> None:
    """One request slot: the 1 MiB WRITE behind a 4 KiB one is parsed when the first one's
    reply goes out (from a callback). Its buffer cannot be had: the connection is dropped,
    the server goes on."""
    served, device = instant
    served.server.max_inflight = 1
    fail_first_reservation(monkeypatch)
    reader, writer = await go_raw(served)
    writer.write(p.encode_request(p.Cmd.WRITE, 1, 0, 4096, payload=b"\x01" * 4096))
    writer.write(p.encode_request(p.Cmd.WRITE, 2, 1 << 20, 1 << 20, payload=b"\x02" * (1 << 20)))
    try:  # dropped: an EOF, or a reset as the server aborts with bytes unread
        got = await asyncio.wait_for(closed_by_server(reader, writer), 10)
    except ConnectionResetError:
        got = b""
    assert len(got) <= 16  # at most the first write's reply, never the second's
    assert device.data[1 << 20 : 2 << 20] == bytes(1 << 20)
    assert served.server.intake.reserved == 0
    reader, writer = await go_raw(served)  # the server still serves
    writer.write(p.encode_request(p.Cmd.WRITE, 3, 1 << 20, 1 << 20, payload=b"\x03" * (1 << 20)))
    magic, err, cookie = struct.unpack(">IIQ", await reader.readexactly(16))
    assert (magic, err, cookie) == (p.SIMPLE_REPLY_MAGIC, 0, 3)
    assert device.data[1 << 20 : 2 << 20] == b"\x03" * (1 << 20)
    writer.write(p.encode_request(p.Cmd.DISC, 4))
    assert await closed_by_server(reader, writer) == b""
