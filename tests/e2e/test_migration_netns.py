"""Live migration on the netns lab (root): a VM on a VM network keeps its address and an open
TCP connection while it moves back and forth five times over the storage network; its disk
pattern verifies after each move; each move's downtime is recorded."""

from __future__ import annotations

import asyncio
import contextlib
import os
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import pytest_asyncio

from aecp.compute.images.tiny import BOOT_MARKER
from aecp.network import rootops
from tests.labkit import LabKit, console_command, running_lab, wait_for

pytestmark = [pytest.mark.e2e, pytest.mark.asyncio(loop_scope="module")]

MGMT = "10.231.80.0/24"
STORAGE = "10.231.81.0/24"
SUBNET = "10.231.82.0/24"
HOST = "10.231.82.200"
VM = "stream1"
PROMPT = "aecp:/# "
# the guest's stream server: a counter, one line every 20 ms, to whoever connects on 5000
SERVER = (
    "printf '#!/bin/sh\\ni=0\\nwhile true; do i=$((i+1)); echo $i; usleep 20000; done\\n' "
    "> /s && chmod +x /s && (nc -l -p 5000 -e /s &) && echo SERVER-UP"
)


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def kit(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[LabKit]:
    assert os.geteuid() == 0, "the netns lab tests need root (CI runs them as root)"
    root: Path = tmp_path_factory.mktemp("netnsmig") / "lab"
    async with running_lab(
        root, netns=True, nodes=2, mgmt_cidr=MGMT, storage_cidr=STORAGE, accel="tcg"
    ) as k:
        bridge = k.lab.spec.plan().bridge("vm")
        await rootops.addr_add(bridge, f"{HOST}/24")  # the lab host on the VM network
        yield k


@dataclass
class Stream:
    """A client holding one TCP connection to the guest, checking the counter never skips."""

    lines: int = 0
    last: int = 0
    broken: str = ""
    task: asyncio.Task[None] | None = None
    seen: asyncio.Event = field(default_factory=asyncio.Event)

    async def follow(self, ip: str) -> None:
        reader, writer = await asyncio.open_connection(ip, 5000)
        try:
            while True:
                line = await reader.readline()
                if not line:
                    self.broken = f"closed by the guest after {self.last}"
                    return
                n = int(line)
                if self.last and n != self.last + 1:
                    self.broken = f"{n} came after {self.last}"
                    return
                self.last, self.lines = n, self.lines + 1
                self.seen.set()
        except (OSError, ValueError) as exc:
            self.broken = f"{type(exc).__name__}: {exc}"
        finally:
            writer.close()

    async def advancing(self) -> None:
        """Wait until new lines arrive (the connection carries data now)."""
        start = self.last

        async def moved() -> bool:
            assert not self.broken, self.broken
            return self.last > start + 5

        await wait_for(moved, "the stream to advance", timeout=60)


@pytest.mark.timeout(600)
async def test_a_vm_keeps_its_address_and_tcp_stream_over_five_live_migrations(
    kit: LabKit,
) -> None:
    r = await kit.call("POST", "/v1/networks", json={"name": "blue", "vlan": 120, "subnet": SUBNET})
    assert r.status_code == 201, r.text
    op = await kit.create_vm(VM, memory_mib=128, data_disks_mib=[16], networks=["blue"])
    assert op["state"] == "succeeded", op
    vm = await kit.vm(VM)
    ip = vm["nics"][0]["ip"]
    await kit.wait_console(VM, f"AECP-NET ip={ip}", timeout=120)
    marker = f"{BOOT_MARKER} name={VM}"

    async def at_prompt() -> bool:
        log = await kit.console(VM)
        return PROMPT in log.rsplit(marker, 1)[-1]

    await wait_for(at_prompt, f"{VM} at its prompt")
    await console_command(kit, VM, "aecp-pattern write /dev/vdb s5 8", "AECP-PATTERN-WRITTEN")
    await console_command(kit, VM, SERVER, "SERVER-UP")
    stream = Stream()

    async def connected() -> bool:
        with contextlib.suppress(OSError):
            stream.task = asyncio.create_task(stream.follow(ip))
            await asyncio.wait_for(stream.seen.wait(), 5)
            return True
        return False

    await wait_for(connected, f"a TCP connection to {ip}:5000", timeout=60)
    downtimes = []
    try:
        for move in range(5):
            src = (await kit.vm(VM))["node"]
            dest = "node2" if src == "node1" else "node1"
            r = await kit.call("POST", f"/v1/vms/{VM}/migrate", json={"node": dest})
            assert r.status_code == 202, r.text
            op = await kit.wait_op(r.json()["operation"]["id"])
            assert op["state"] == "succeeded", (move, op)
            downtimes.append(op["detail"]["downtime_ms"])
            after = await kit.vm(VM)
            assert after["node"] == dest and after["nics"][0]["ip"] == ip
            await stream.advancing()
            await console_command(
                kit, VM, "aecp-pattern verify /dev/vdb s5 8", "AECP-PATTERN-OK dev=/dev/vdb"
            )
        assert not stream.broken, stream.broken
        assert len(downtimes) == 5 and all(d >= 0 for d in downtimes)
        print(f"downtimes of the 5 moves (ms): {downtimes}; {stream.lines} lines streamed")
    finally:
        if stream.task is not None:
            stream.task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await stream.task
