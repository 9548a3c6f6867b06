"""Live and cold migration on a two-node lab (real etcd, QEMU, ABS): the guest keeps its memory
and its disk across moves; a stale write through the old access point after the disk
hand-off is refused; a source agent killed after the hand-off, a destination QEMU killed
mid-migration and a cancel each leave the VM running in exactly one place, its data intact.
Bad requests change nothing."""

from __future__ import annotations

import json
import os
import signal
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import pytest_asyncio
from qemu.qmp import QMPClient

from aecp.compute.images.tiny import BOOT_MARKER
from aecp.compute.qemu.argv import RuntimePaths
from aecp.conf import settings
from tests.labkit import LabKit, console_command, running_lab, wait_for

pytestmark = [pytest.mark.integration, pytest.mark.asyncio(loop_scope="module")]
PROMPT = "aecp:/# "
VM = "mig1"


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def kit(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[LabKit]:
    root: Path = tmp_path_factory.mktemp("migration") / "lab"
    async with running_lab(root, subnet="127.0.65", nodes=2) as k:
        op = await k.create_vm(VM, data_disks_mib=[16], memory_mib=128)
        assert op["state"] == "succeeded", op
        marker = f"{BOOT_MARKER} name={VM}"

        async def ready() -> bool:
            log = await k.console(VM)
            return marker in log and PROMPT in log.rsplit(marker, 1)[1]

        await wait_for(ready, f"{VM} at its prompt", timeout=120)
        await console_command(
            k, VM, "aecp-pattern write /dev/vdb p1 8", "AECP-PATTERN-WRITTEN dev=/dev/vdb"
        )
        await console_command(k, VM, "echo kept-$((6*7)) > /tmp/m", PROMPT)
        yield k


async def migrate(kit: LabKit, node: str | None = None) -> tuple[int, dict[str, Any]]:
    body = {"node": node} if node else {}
    r = await kit.call("POST", f"/v1/vms/{VM}/migrate", json=body)
    return r.status_code, r.json()


async def check_guest(kit: LabKit) -> None:
    """The same guest (its memory: the file in its tmpfs) with its disk's pattern intact."""
    await console_command(kit, VM, "cat /tmp/m", "kept-42")
    await console_command(
        kit, VM, "aecp-pattern verify /dev/vdb p1 8", "AECP-PATTERN-OK dev=/dev/vdb seed=p1"
    )


def other(node: str) -> str:
    return "node2" if node == "node1" else "node1"


async def test_a_running_vm_moves_back_and_forth_keeping_memory_and_disk(kit: LabKit) -> None:
    for _ in range(2):
        src = (await kit.wait_vm(VM, "running"))["node"]
        status, body = await migrate(kit, other(src))
        assert status == 202, body
        op = await kit.wait_op(body["operation"]["id"])
        assert op["state"] == "succeeded", op
        assert op["kind"] == "vm.migrate"
        assert op["detail"]["downtime_ms"] >= 0 and op["detail"]["ram_total_bytes"] > 0
        vm = await kit.wait_vm(VM, "running")
        assert vm["node"] == other(src)
        await check_guest(kit)
        runs = [n for n in ("node1", "node2") if VM in instances(kit, n)]
        assert runs == [other(src)]


def instances(kit: LabKit, node: str) -> set[str]:
    """The VMs whose QEMU runs on ``node`` (by its pidfiles)."""
    run_dir = settings.load(kit.lab.node_dir(node) / "node.json").run_dir
    out = set()
    for pidfile in run_dir.glob("*/qemu.pid"):
        try:
            os.kill(int(pidfile.read_text()), 0)
        except (OSError, ValueError):
            continue
        out.add(pidfile.parent.name)
    return out


async def test_bad_migrations_are_refused_and_change_nothing(kit: LabKit) -> None:
    vm = await kit.wait_vm(VM, "running")
    here = vm["node"]
    for node, code, words in [
        (here, 422, "already runs on"),
        ("node9", 404, "does not exist"),
        ("bad name!", 422, ""),
    ]:
        status, body = await migrate(kit, node)
        assert status == code, body
        assert words in json.dumps(body)
    op = await kit.create_vm("big", memory_mib=1950, start=False, node=other(here))
    assert op["state"] == "succeeded", op
    status, body = await migrate(kit, other(here))
    assert status == 409 and "MiB free" in body["message"], body
    r = await kit.call("DELETE", "/v1/vms/big")
    assert r.status_code == 202, r.text
    await kit.wait_op(r.json()["operation"]["id"])
    assert (await kit.action(VM, "suspend"))["state"] == "succeeded"
    status, body = await migrate(kit, other(here))
    assert status == 409 and "suspended" in body["message"], body
    assert (await kit.action(VM, "resume"))["state"] == "succeeded"
    status, body = await migrate(kit, other(here))
    assert status == 202, body
    again, second = await migrate(kit, other(here))
    assert again == 409 and "in progress" in second["message"], second
    assert (await kit.wait_op(body["operation"]["id"]))["state"] == "succeeded"
    here = other(here)
    assert (await kit.vm(VM))["node"] == here


async def test_a_stale_write_after_the_hand_off_is_refused_and_a_restarted_source_undoes(
    kit: LabKit,
) -> None:
    """The source agent stops right after the disk hand-off (killed there): a write through
    the old access point (the source QEMU's own disk) is refused by the replicas; the next
    agent cancels the migration, takes the disks back and the VM runs on, on the source."""
    src = (await kit.wait_vm(VM, "running"))["node"]
    agent = kit.lab.agent(src)
    kit.lab.kill_agent(src)
    agent.start(env={"AECP_FAILPOINTS": "migration-after-handoff"})
    await kit.lab.wait_ready()
    status, body = await migrate(kit, other(src))
    assert status == 202, body

    async def handed_over() -> bool:
        return "failpoint migration-after-handoff reached" in agent.log_file.read_text()

    await wait_for(handed_over, "the hand-off", timeout=90)
    kit.lab.kill_agent(src)
    qemu_log = settings.load(kit.lab.node_dir(src) / "node.json").run_dir / VM / "qemu.log"
    before = qemu_log.read_text()
    await hmp(kit, src, 'qemu-io disk1 "write -P 0x5a 0 64k"')
    refused = qemu_log.read_text()[len(before) :]  # qemu-io reports on QEMU's stderr
    assert "write failed: Cannot send after transport endpoint shutdown" in refused, refused
    kit.lab.start_agent(src)
    await kit.lab.wait_ready()
    op = await kit.wait_op(body["operation"]["id"])
    assert op["state"] == "failed" and "agent restarted" in op["error"], op
    vm = await kit.wait_vm(VM, "running")
    assert vm["node"] == src
    await check_guest(kit)
    await wait_for(lambda: _not_running(kit, other(src)), "the destination's QEMU to go")


async def _not_running(kit: LabKit, node: str) -> bool:
    return VM not in instances(kit, node)


async def hmp(kit: LabKit, node: str, command: str) -> str:
    """Run a human monitor command on ``node``'s QEMU of the VM (its agent must be down)."""
    run_dir = settings.load(kit.lab.node_dir(node) / "node.json").run_dir
    qmp = QMPClient("test")
    await qmp.connect(str(RuntimePaths.for_instance(run_dir, VM).qmp_socket))
    try:
        out = await qmp.execute("human-monitor-command", {"command-line": command})
        return str(out)
    finally:
        await qmp.disconnect()


async def active_migration(kit: LabKit) -> tuple[str, str]:
    """Start a slow migration (1 MiB/s) and wait until QEMU is sending memory; (source, op
    id)."""
    src = (await kit.wait_vm(VM, "running"))["node"]
    slow = {"node": other(src), "bandwidth_mib_s": 1}
    r = await kit.call("POST", f"/v1/vms/{VM}/migrate", json=slow)
    status, body = r.status_code, r.json()
    assert status == 202, body
    op_id = body["operation"]["id"]

    async def sending() -> bool:
        op = (await kit.call("GET", f"/v1/operations/{op_id}")).json()
        return op["detail"].get("status") == "active" and op["detail"]["ram_sent_bytes"] > 0

    await wait_for(sending, "memory being sent", timeout=90)
    return src, op_id


async def test_cancel_and_a_killed_destination_leave_the_vm_on_its_source(kit: LabKit) -> None:
    src, op_id = await active_migration(kit)
    r = await kit.call("POST", f"/v1/operations/{op_id}/cancel")
    assert r.status_code == 200 and r.json()["cancel_requested"], r.text
    op = await kit.wait_op(op_id)
    assert op["state"] == "cancelled", op
    assert (await kit.wait_vm(VM, "running"))["node"] == src
    await check_guest(kit)
    r = await kit.call("POST", f"/v1/operations/{op_id}/cancel")
    assert r.status_code == 409 and "has ended" in r.json()["message"]

    src, op_id = await active_migration(kit)
    await wait_for(lambda: _running(kit, other(src)), "the destination's QEMU")
    pidfile = next(
        settings.load(kit.lab.node_dir(other(src)) / "node.json").run_dir.glob(f"{VM}/qemu.pid")
    )
    os.kill(int(pidfile.read_text()), signal.SIGKILL)
    op = await kit.wait_op(op_id)
    assert op["state"] == "failed", op
    assert (await kit.wait_vm(VM, "running"))["node"] == src
    await check_guest(kit)


async def _running(kit: LabKit, node: str) -> bool:
    return VM in instances(kit, node)


async def test_a_stopped_vm_moves_cold_and_starts_on_its_new_node(kit: LabKit) -> None:
    src = (await kit.wait_vm(VM, "running"))["node"]
    assert (await kit.action(VM, "poweroff"))["state"] == "succeeded"
    status, body = await migrate(kit)
    assert status == 202, body
    op = (await kit.call("GET", f"/v1/operations/{body['operation']['id']}")).json()
    assert op["state"] == "succeeded" and "nothing copied" in op["message"], op
    assert (await kit.vm(VM))["node"] == other(src)
    marker = f"{BOOT_MARKER} name={VM}"
    console = settings.load(kit.lab.node_dir(other(src)) / "node.json").run_dir / VM / "console.log"
    boots = console.read_text().count(marker) if console.exists() else 0
    assert (await kit.action(VM, "start"))["state"] == "succeeded"
    assert (await kit.wait_vm(VM, "running"))["node"] == other(src)

    async def booted() -> bool:
        log = console.read_text()
        return log.count(marker) > boots and PROMPT in log.rsplit(marker, 1)[1]

    await wait_for(booted, f"{VM} at its prompt on {other(src)}", timeout=120)
    await console_command(
        kit, VM, "aecp-pattern verify /dev/vdb p1 8", "AECP-PATTERN-OK dev=/dev/vdb seed=p1"
    )
