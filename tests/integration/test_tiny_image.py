"""The tiny guest image boots from its own disk under QEMU TCG and keeps its guest contract.

Each test starts ``qemu-system-x86_64`` itself (no ``-kernel``: SeaBIOS boots the disk), talks
QMP through ``qemu.qmp`` and reads the serial console from a log file.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import re
import socket
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
from qemu.qmp import QMPClient

from aecp.common.proc import arun
from aecp.compute.images.tiny import BOOT_MARKER, ensure_tiny_image

pytestmark = pytest.mark.integration

HOST = "127.0.40.1"
BOOT_TIMEOUT = 120.0  # generous: other TCG guests may share the two cores
DATA_MIB = 16
_counter = itertools.count(1)


@dataclass
class Guest:
    """One QEMU process started by a test, with its QMP client and console log."""

    name: str
    uuid: str
    proc: asyncio.subprocess.Process
    qmp: QMPClient
    console: Path
    http_port: int | None

    def output(self) -> str:
        """Everything the guest has written to its serial console so far (CRs removed)."""
        try:
            return self.console.read_bytes().decode(errors="replace").replace("\r", "")
        except FileNotFoundError:
            return ""

    async def wait_for(self, pattern: str, timeout: float = BOOT_TIMEOUT) -> re.Match[str]:
        """Wait until ``pattern`` (multi-line regex) matches the console output."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while True:
            found = re.search(pattern, self.output(), re.MULTILINE)
            if found:
                return found
            if self.proc.returncode is not None or loop.time() > deadline:
                state = f"exited {self.proc.returncode}" if self.proc.returncode else "running"
                pytest.fail(f"{pattern!r} not seen on {self.name} ({state}):\n{self.output()}")
            await asyncio.sleep(0.1)

    async def stop(self) -> None:
        """Quit QEMU (it flushes its disks), kill it if it lingers, and close QMP."""
        if self.proc.returncode is None:
            with contextlib.suppress(Exception):  # QEMU may close the socket mid-reply
                await asyncio.wait_for(self.qmp.execute("quit"), 5)
            try:
                await asyncio.wait_for(self.proc.wait(), 10)
            except TimeoutError:
                self.proc.kill()
                await self.proc.wait()
        with contextlib.suppress(Exception):  # the peer is gone; see this-machine.md section 3
            await self.qmp.disconnect()


Launch = Callable[..., Awaitable[Guest]]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        port: int = s.getsockname()[1]
        return port


async def _connect_qmp(sock: Path, proc: asyncio.subprocess.Process) -> QMPClient:
    qmp = QMPClient("tiny-test")
    for _ in range(200):
        if proc.returncode is not None:
            break
        try:
            await qmp.connect(str(sock))
            return qmp
        except Exception:  # the socket is not there yet
            await asyncio.sleep(0.05)
    pytest.fail(f"no QMP on {sock} (QEMU exit code {proc.returncode})")


@pytest.fixture(scope="session")
def tiny_image() -> Path:
    return ensure_tiny_image()


@pytest.fixture
def data_disk(tmp_path: Path) -> Path:
    path = tmp_path / "data.raw"
    with path.open("wb") as f:
        f.truncate(DATA_MIB * 1024 * 1024)
    return path


@pytest.fixture
async def launch(tiny_image: Path, tmp_path: Path) -> AsyncIterator[Launch]:
    """Start guests booting from overlays of the tiny image; all are stopped at teardown."""
    guests: list[Guest] = []

    async def _launch(
        name: str,
        *,
        network: bool = True,
        oem: Sequence[str] = (),
        data: Path | None = None,
    ) -> Guest:
        n = next(_counter)
        uuid = f"00000000-0000-4000-8000-{n:012d}"
        run_dir = tmp_path / f"{name}-{n}"
        run_dir.mkdir()
        overlay = run_dir / "boot.qcow2"
        await arun(
            [
                "qemu-img",
                "create",
                "-q",
                "-f",
                "qcow2",
                "-b",
                str(tiny_image),
                "-F",
                "raw",
                str(overlay),
            ]
        )
        argv = [
            "qemu-system-x86_64", "-machine", "q35,accel=tcg", "-cpu", "max", "-m", "256",
            "-nodefaults", "-display", "none", "-serial", f"file:{run_dir / 'console.log'}",
            "-drive", f"file={overlay},if=none,id=d0,format=qcow2",
            "-device", "virtio-blk-pci,drive=d0,bootindex=1",
            "-smbios", f"type=1,manufacturer=AECP,product={name},serial={uuid}",
            "-qmp", f"unix:{run_dir / 'qmp.sock'},server=on,wait=off",
        ]  # fmt: skip
        port = None
        if data is not None:
            argv += ["-drive", f"file={data},if=none,id=d1,format=raw"]
            argv += ["-device", "virtio-blk-pci,drive=d1"]
        if network:
            port = _free_port()
            argv += ["-netdev", f"user,id=n0,hostfwd=tcp:{HOST}:{port}-:80"]
            argv += ["-device", "virtio-net-pci,netdev=n0"]
        if oem:
            argv += ["-smbios", "type=11," + ",".join(f"value={s}" for s in oem)]
        proc = await asyncio.create_subprocess_exec(*argv)
        try:
            qmp = await _connect_qmp(run_dir / "qmp.sock", proc)
        except BaseException:
            proc.kill()
            await proc.wait()
            raise
        guest = Guest(name, uuid, proc, qmp, run_dir / "console.log", port)
        guests.append(guest)
        return guest

    try:
        yield _launch
    finally:
        for guest in guests:
            await guest.stop()


async def _press_power_button(guest: Guest, timeout: float) -> dict[str, Any]:
    """Press the ACPI power button until QEMU reports SHUTDOWN; returns the event's data.

    The press is repeated every few seconds because acpid may still be starting when the
    first one arrives (a press before it listens is lost, as on real hardware).
    """
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    with guest.qmp.listener("SHUTDOWN") as listener:
        while loop.time() < deadline:
            await guest.qmp.execute("system_powerdown")
            try:
                event = await asyncio.wait_for(listener.get(), 5)
            except TimeoutError:
                continue
            data = event["data"]
            assert isinstance(data, dict)
            return data
    pytest.fail(f"no SHUTDOWN event from {guest.name}:\n{guest.output()}")


async def test_the_guest_boots_from_its_disk_and_prints_the_boot_marker_with_its_name(
    launch: Launch,
) -> None:
    guest = await launch("tiny-boot")
    loop = asyncio.get_running_loop()
    started = loop.time()
    line = await guest.wait_for(rf"^{BOOT_MARKER} name=(\S+) uuid=(\S+)$")
    print(f"boot marker {loop.time() - started:.2f} s after QMP came up")
    assert line.groups() == (guest.name, guest.uuid)
    assert guest.output().count(BOOT_MARKER) == 1
    await guest.wait_for(r"^AECP-NET ip=10\.0\.2\.15$")


async def test_the_guest_serves_its_http_page(launch: Launch) -> None:
    guest = await launch("tiny-http")
    await guest.wait_for(r"^AECP-NET ip=10\.0\.2\.15$")
    loop = asyncio.get_running_loop()
    deadline = loop.time() + 60
    url = f"http://{HOST}:{guest.http_port}/"
    async with httpx.AsyncClient(timeout=5, trust_env=False) as client:
        while True:
            try:
                response = await client.get(url)
                break
            except httpx.TransportError:
                if loop.time() > deadline:
                    raise
                await asyncio.sleep(0.5)
    assert response.status_code == 200
    assert f"AECP tiny guest {guest.name}" in response.text


async def test_an_acpi_power_button_press_powers_the_guest_off(launch: Launch) -> None:
    guest = await launch("tiny-acpi")
    await guest.wait_for(r"^AECP-NET ")
    data = await _press_power_button(guest, timeout=60)
    assert data["guest"] is True
    assert await asyncio.wait_for(guest.proc.wait(), 30) == 0
    assert "AECP-POWEROFF" in guest.output()


async def test_the_pattern_written_on_a_second_disk_verifies_and_a_different_seed_does_not(
    launch: Launch, data_disk: Path
) -> None:
    write = ["aecp.pattern=write:seed-a:8"]
    writer = await launch("tiny-pw", network=False, oem=write, data=data_disk)
    await writer.wait_for(r"^AECP-NET none$")
    await writer.wait_for(r"^AECP-PATTERN-WRITTEN dev=/dev/vdb seed=seed-a mib=8$")
    await writer.stop()
    content = await asyncio.to_thread(data_disk.read_bytes)
    assert content[8 << 20 :] == bytes(len(content) - (8 << 20))  # nothing past 8 MiB
    assert content[: 8 << 20].count(0) == 0  # the pattern has no zero bytes

    verify = ["aecp.pattern=verify:seed-a:8", "aecp.pattern=verify:seed-b:8"]
    checker = await launch("tiny-pv", network=False, oem=verify, data=data_disk)
    await checker.wait_for(r"^AECP-PATTERN-OK dev=/dev/vdb seed=seed-a mib=8$")
    await checker.wait_for(r"^AECP-PATTERN-BAD dev=/dev/vdb seed=seed-b mib=8$")
    assert "AECP-PATTERN-BAD dev=/dev/vdb seed=seed-a" not in checker.output()
    assert "AECP-PATTERN-OK dev=/dev/vdb seed=seed-b" not in checker.output()
