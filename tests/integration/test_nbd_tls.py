"""The NBD server's TCP port (outside clients) against real peers over TLS: qemu-io, qemu-img,
nbdinfo, nbdcopy and fio reach a volume with the credential it was granted, and nothing
without one; a revoked credential's connections close; negotiation, idle time and connections
per client are limited.

Issue 11 found the port serving any volume, a running VM's boot disk included, to anyone. The
grants are the real ones (``storage/exports.py``), over the in-memory store.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import os
import shutil
import ssl
import struct
import tempfile
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from aecp.cli.volume import write_credentials
from aecp.common.clock import FakeClock
from aecp.common.pki import grant_credential
from aecp.common.tls import Credentials
from aecp.storage.blockdev import BlockDevice
from aecp.storage.exports import Exports, GrantPolicy, granted_by
from aecp.storage.filedev import FileDevice
from aecp.storage.frontends.nbd import protocol as p
from aecp.storage.frontends.nbd.server import MAX_OPTIONS, Limits, NbdServer
from aecp.storage.meta.model import VolumeRecord
from aecp.store import keys
from aecp.store.memory import MemoryStore
from tests.integration.test_nbd_interop import run, write_sample
from tests.pkikit import TestPKI

pytestmark = pytest.mark.integration

HOST = "127.0.101.1"
SIZE = 64 << 20
EXPORTS = ("disk", "other")


@dataclass
class Tls:
    server: NbdServer
    store: MemoryStore
    policy: GrantPolicy
    creds: Path  # granted "disk"
    disks: dict[str, Path]
    cluster_ca: bytes

    def qemu(self, export: str = "disk", creds: Path | None = None) -> list[str]:
        """qemu-io / qemu-img arguments opening ``export`` as a raw image over TLS."""
        return [
            "--object",
            f"tls-creds-x509,id=tls0,endpoint=client,dir={creds or self.creds}",
            "--image-opts",
            f"driver=raw,file.driver=nbd,file.host={HOST},file.port={self.server.port},"
            f"file.export={export},file.tls-creds=tls0",
        ]

    def uri(self, export: str = "disk", creds: Path | None = None) -> str:
        return f"nbds://{HOST}:{self.server.port}/{export}?tls-certificates={creds or self.creds}"


async def grant(store: MemoryStore, pki: TestPKI, volume: str, creds: Path) -> str:
    """Grant ``volume`` to a new credential written to ``creds``; its fingerprint."""
    own_ca, cert, key = grant_credential(f"test:{volume}", days=3)
    got = await store.get(keys.abs_volume(volume))
    assert got is not None
    vol = VolumeRecord.load(got.value)
    made = await Exports(store).grant(vol, own_ca.decode(), "n1", "test")
    write_credentials(creds, pki.ca.cert_file.read_bytes() + own_ca, cert, key)
    return made.fingerprint


@pytest.fixture
async def tls(tmp_path: Path) -> AsyncIterator[Tls]:
    pki = TestPKI(tmp_path / "pki", HOST)
    store = MemoryStore(FakeClock())
    disks = {}
    for name in EXPORTS:
        disks[name] = tmp_path / f"{name}.raw"
        disks[name].touch()
        os.truncate(disks[name], SIZE)
        vol = VolumeRecord(name=name, size=SIZE, replicas=1, extent_size=SIZE, uid=name + "-1")
        await store.put(keys.abs_volume(name), vol.dump())

    async def open_export(name: str) -> BlockDevice:
        if name not in disks:
            raise KeyError(name)
        return await FileDevice.open(disks[name])

    async def list_exports() -> list[str]:
        return list(EXPORTS)

    policy = GrantPolicy(store, Credentials(pki.node("n1")))
    server = NbdServer(
        HOST,
        0,
        open_export,
        list_exports,
        tls=policy,
        limits=Limits(handshake_timeout=2, idle_timeout=2, max_per_client=3),
    )
    await server.start()
    await grant(store, pki, "disk", tmp_path / "creds")
    try:
        yield Tls(server, store, policy, tmp_path / "creds", disks, pki.ca.cert_file.read_bytes())
    finally:
        await server.stop()
        await store.close()


async def test_qemu_io_and_qemu_img_reach_the_granted_export_over_tls(tls: Tls, tmp_path: Path):
    _, out = await run(
        "qemu-io", *tls.qemu(), "-c", "write -P 0x5a 1M 1M", "-c", "read -P 0x5a 1M 1M"
    )
    assert "verification failed" not in out.lower() and "read 1048576/1048576" in out
    src = tmp_path / "src.raw"
    data = write_sample(src, SIZE)
    object_arg, creds, _, target = tls.qemu()
    await run(
        "qemu-img", "convert", "-n", "-f", "raw", object_arg, creds, "--target-image-opts",
        str(src), target,
    )  # fmt: skip
    assert tls.disks["disk"].read_bytes() == data


async def test_nbdinfo_lists_only_the_granted_export_and_nbdcopy_copies_both_ways(
    tls: Tls, tmp_path: Path
) -> None:
    _, out = await run("nbdinfo", "--list", tls.uri(""))
    assert 'export="disk"' in out and "other" not in out
    src, back = tmp_path / "src.raw", tmp_path / "back.raw"
    data = write_sample(src, SIZE)
    await run("nbdcopy", "--connections=2", str(src), tls.uri())
    await run("nbdcopy", "--connections=2", tls.uri(), str(back))
    assert back.read_bytes() == data


async def test_fio_verifies_random_writes_over_tls(tls: Tls) -> None:
    """fio's nbd engine takes no certificate directory in its URI: libnbd looks in
    ~/.pki/libnbd of a non-root user (root's is /etc/pki/libnbd), so fio runs as nobody with
    a home of its own (outside pytest's directories, which nobody cannot enter)."""
    home = Path(tempfile.mkdtemp(prefix="fio-home-", dir="/tmp"))
    try:
        install_for_nobody(tls.creds, home)
        _, out = await run(
            "setpriv", "--reuid=65534", "--regid=65534", "--clear-groups",
            "env", f"HOME={home}", "fio", "--name=tlsverify", "--ioengine=nbd",
            f"--uri=nbds://{HOST}:{tls.server.port}/disk", "--rw=randwrite", "--bs=4k",
            "--iodepth=8", "--size=8M", "--verify=crc32c", "--do_verify=1",
            "--verify_state_save=0", "--runtime=60",
            cwd=home,
        )  # fmt: skip
    finally:
        shutil.rmtree(home, ignore_errors=True)
    assert "err= 0" in out, out


def install_for_nobody(creds: Path, home: Path) -> None:
    """Copy a credential to ``home``/.pki/libnbd, all owned by nobody."""
    target = home / ".pki" / "libnbd"
    target.mkdir(parents=True)
    for f in creds.iterdir():
        (target / f.name).write_bytes(f.read_bytes())
    for path in (home, home / ".pki", target, *target.iterdir()):
        os.chown(path, 65534, 65534)


async def test_without_tls_nothing_is_listed_or_opened(tls: Tls) -> None:
    plain = f"nbd://{HOST}:{tls.server.port}"
    rc, out = await run("nbdinfo", "--list", plain, ok=False)
    assert rc != 0 and "disk" not in out.replace("export: disk", "")
    rc, out = await run("qemu-io", "-r", "-f", "raw", "-c", "read 0 512", f"{plain}/disk", ok=False)
    assert rc != 0


async def test_a_credential_of_another_volume_or_outside_the_grants_opens_nothing(
    tls: Tls, tmp_path: Path
) -> None:
    other = tmp_path / "other-creds"
    await grant(tls.store, TestPKI(tmp_path / "pki2", HOST), "other", other)
    rc, out = await run("nbdinfo", tls.uri("disk", other), ok=False)
    assert rc != 0 and "certificate" in out.lower()  # another cluster's CA: refused server
    stranger = tmp_path / "stranger"
    own_ca, cert, key = grant_credential("stranger", days=1)
    write_credentials(stranger, tls.cluster_ca + own_ca, cert, key)
    rc, out = await run("qemu-io", *tls.qemu(creds=stranger), "-c", "read 0 512", ok=False)
    assert rc != 0 and "TLS" in out  # its own CA was never granted: the handshake fails


async def raw_tls(
    tls: Tls, export: str | None = "disk"
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """A raw client: STARTTLS with the granted credential, then (with ``export``) NBD_OPT_GO."""
    reader, writer = await asyncio.open_connection(HOST, tls.server.port)
    await reader.readexactly(18)
    writer.write(struct.pack(">I", 3) + p.encode_option(p.Opt.STARTTLS))
    _, _, rep, n = struct.unpack(">QIII", await reader.readexactly(20))
    await reader.readexactly(n)
    assert rep == p.Rep.ACK
    ctx = ssl.create_default_context(cafile=tls.creds / "ca-cert.pem")
    ctx.load_cert_chain(tls.creds / "client-cert.pem", tls.creds / "client-key.pem")
    await writer.start_tls(ctx, server_hostname=HOST)
    if export is not None:
        name = export.encode()
        writer.write(p.encode_option(p.Opt.GO, struct.pack(">I", len(name)) + name + bytes(2)))
        while True:
            _, _, rep, n = struct.unpack(">QIII", await reader.readexactly(20))
            await reader.readexactly(n)
            if rep == p.Rep.ACK:
                break
            assert rep == p.Rep.INFO
    return reader, writer


async def closed(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> bytes:
    try:
        return await asyncio.wait_for(reader.read(), 30)
    except (ConnectionError, ssl.SSLError):
        return b""
    finally:
        writer.close()
        with contextlib.suppress(ConnectionError, ssl.SSLError):
            await writer.wait_closed()


async def test_a_revoked_credential_is_refused_and_its_connections_close(tls: Tls) -> None:
    reader, writer = await raw_tls(tls)
    await Exports(tls.store).revoke("disk")
    valid = await tls.policy.refresh()
    assert tls.server.revoke(functools.partial(granted_by, valid)) == 1
    assert await closed(reader, writer) == b""
    rc, _ = await run("nbdinfo", tls.uri(), ok=False)
    assert rc != 0


async def test_a_client_that_does_not_finish_negotiating_is_dropped(tls: Tls) -> None:
    reader, writer = await asyncio.open_connection(HOST, tls.server.port)
    assert len(await reader.readexactly(18)) == 18
    assert await closed(reader, writer) == b""  # it sent nothing more: dropped after 2 s
    assert tls.server.refused == 1


async def test_an_idle_tcp_connection_is_closed(tls: Tls) -> None:
    reader, writer = await raw_tls(tls)
    writer.write(p.encode_request(p.Cmd.READ, 1, 0, 512))
    assert struct.unpack(">IIQ", await reader.readexactly(16))[1:] == (0, 1)
    await reader.readexactly(512)
    assert await closed(reader, writer) == b""  # then nothing for 2 s: closed


async def test_connections_per_client_address_are_capped(tls: Tls) -> None:
    held = [await raw_tls(tls) for _ in range(3)]
    reader, writer = await asyncio.open_connection(HOST, tls.server.port)
    assert await closed(reader, writer) == b""  # the fourth is closed before the greeting
    assert tls.server.refused == 1
    for r, w in held:
        w.write(p.encode_request(p.Cmd.DISC, 9))
        await closed(r, w)
    reader, writer = await raw_tls(tls)  # room again
    writer.write(p.encode_request(p.Cmd.DISC, 9))
    await closed(reader, writer)


async def test_only_so_many_tcp_connections_negotiate_at_once(tls: Tls) -> None:
    """16 per address was the only limit: many addresses held thousands (second review)."""
    tls.server.limits = Limits(handshake_timeout=30, idle_timeout=30, max_negotiating=2)
    held = [await asyncio.open_connection(HOST, tls.server.port) for _ in range(2)]
    for reader, _ in held:
        await reader.readexactly(18)  # greeted: negotiating
    reader, writer = await asyncio.open_connection(HOST, tls.server.port)
    assert await closed(reader, writer) == b""  # closed before the greeting
    assert tls.server.refused == 1
    for _, w in held:
        w.close()


async def test_a_negotiation_of_endless_options_is_ended(tls: Tls) -> None:
    reader, writer = await asyncio.open_connection(HOST, tls.server.port)
    await reader.readexactly(18)
    writer.write(struct.pack(">I", 3) + p.encode_option(p.Opt.LIST) * (MAX_OPTIONS + 1))
    got = await closed(reader, writer)
    assert got.count(p.OPT_REPLY_MAGIC.to_bytes(8, "big")) == MAX_OPTIONS


async def test_starttls_while_the_grants_cannot_be_read_is_refused_in_the_protocol(
    tls: Tls,
) -> None:
    """The client got a bare EOF and the server logged a traceback (second review)."""
    tls.store.set_reachable(False)
    tls.policy.invalidate()
    try:
        reader, writer = await asyncio.open_connection(HOST, tls.server.port)
        await reader.readexactly(18)
        writer.write(struct.pack(">I", 3) + p.encode_option(p.Opt.STARTTLS))
        _, opt, rep, n = struct.unpack(">QIII", await reader.readexactly(20))
        await reader.readexactly(n)
        assert (opt, rep) == (p.Opt.STARTTLS, p.Rep.ERR_POLICY)
        writer.write(p.encode_option(p.Opt.ABORT))
        await closed(reader, writer)
    finally:
        tls.store.set_reachable(True)
