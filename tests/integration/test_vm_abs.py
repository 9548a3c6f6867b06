"""VMs on ABS (two-node lab): disks are volumes; a pattern written on a second disk survives a
power cycle; VM snapshots roll back; a snapshot whose agent is killed half-way is finished
whole by the next agent, the VM running; clones and templates boot."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import pytest_asyncio

from aecp.compute.images.tiny import BOOT_MARKER
from tests.labkit import LabKit, console_command, running_lab, wait_for

pytestmark = [pytest.mark.integration, pytest.mark.asyncio(loop_scope="module")]
PROMPT = "aecp:/# "


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def kit(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[LabKit]:
    root: Path = tmp_path_factory.mktemp("vmabs") / "lab"
    async with running_lab(root, subnet="127.0.64", nodes=2) as k:
        yield k


async def boot(kit: LabKit, name: str, count: int = 1) -> None:
    """Wait for the ``count``-th boot of ``name`` to reach its shell prompt."""
    marker = f"{BOOT_MARKER} name={name}"

    async def ready() -> bool:
        log = await kit.console(name)
        return log.count(marker) >= count and PROMPT in log.rsplit(marker, 1)[1]

    await wait_for(ready, f"boot {count} of {name} at its prompt", timeout=120)


async def test_a_vm_boots_from_abs_and_keeps_a_pattern_on_its_second_disk(kit: LabKit) -> None:
    op = await kit.create_vm("data1", data_disks_mib=[16])
    assert op["state"] == "succeeded", op
    await boot(kit, "data1")
    vols = (await kit.call("GET", "/v1/volumes")).json()
    assert {"data1-boot", "data1-data1"} <= {v["name"] for v in vols}
    await console_command(
        kit,
        "data1",
        "aecp-pattern write /dev/vdb s1 8",
        "AECP-PATTERN-WRITTEN dev=/dev/vdb seed=s1",
    )
    assert (await kit.action("data1", "poweroff"))["state"] == "succeeded"
    assert (await kit.action("data1", "start"))["state"] == "succeeded"
    await boot(kit, "data1", count=2)
    await console_command(
        kit, "data1", "aecp-pattern verify /dev/vdb s1 8", "AECP-PATTERN-OK dev=/dev/vdb seed=s1"
    )


async def test_a_vm_snapshot_taken_while_running_rolls_back(kit: LabKit) -> None:
    r = await kit.call("POST", "/v1/vms/data1/snapshots", json={"name": "before"})
    assert r.status_code == 202, r.text
    op = await kit.wait_op(r.json()["operation"]["id"])
    assert op["state"] == "succeeded" and op["kind"] == "vm.snapshot", op
    assert (await kit.vm("data1"))["state"] == "running"  # paused only for the instant
    await console_command(
        kit,
        "data1",
        "aecp-pattern write /dev/vdb s2 8",
        "AECP-PATTERN-WRITTEN dev=/dev/vdb seed=s2",
    )
    r = await kit.call("POST", "/v1/vms/data1/snapshots/before/rollback")
    assert r.status_code == 409 and "power it off" in r.json()["message"]
    await kit.action("data1", "poweroff")
    r = await kit.call("POST", "/v1/vms/data1/snapshots/before/rollback")
    assert r.status_code == 202, r.text
    assert (await kit.wait_op(r.json()["operation"]["id"]))["state"] == "succeeded"
    await kit.action("data1", "start")
    await boot(kit, "data1", count=3)
    await console_command(
        kit, "data1", "aecp-pattern verify /dev/vdb s1 8", "AECP-PATTERN-OK dev=/dev/vdb seed=s1"
    )
    names = [s["name"] for s in (await kit.call("GET", "/v1/vms/data1/snapshots")).json()]
    assert names == ["before"]


async def snapshot_volumes(kit: LabKit, name: str) -> list[str]:
    """The disks of data1 that hold snapshot ``name``."""
    out = []
    for vol in ("data1-boot", "data1-data1"):
        snaps = (await kit.call("GET", f"/v1/volumes/{vol}/snapshots")).json()
        out += [vol for s in snaps if s["name"] == name]
    return out


async def test_a_snapshot_whose_agent_is_killed_half_way_is_finished_whole(kit: LabKit) -> None:
    """kill -9 of the agent between the two disks' snapshots: the VM keeps running (paused
    until the next agent), and the next agent undoes the half-taken snapshot and takes it
    whole; never a snapshot of one disk only."""
    vm = await kit.wait_vm("data1", "running")
    node = vm["node"]
    agent = kit.lab.agent(node)
    kit.lab.kill_agent(node)
    agent.start(env={"AECP_FAILPOINTS": "vmjob-between-disks"})
    await kit.lab.wait_ready()
    r = await kit.call("POST", "/v1/vms/data1/snapshots", json={"name": "mid"})
    assert r.status_code == 202, r.text
    op_id = r.json()["operation"]["id"]

    async def stopped_half_way() -> bool:
        return "failpoint vmjob-between-disks reached" in agent.log_file.read_text()

    await wait_for(stopped_half_way, "the agent to stop between the two disks")
    kit.lab.kill_agent(node)
    assert await snapshot_volumes(kit, "mid") == ["data1-boot"]  # killed half-way indeed

    kit.lab.start_agent(node)
    await kit.lab.wait_ready()
    op = await kit.wait_op(op_id)
    assert op["state"] == "succeeded", op
    assert await snapshot_volumes(kit, "mid") == ["data1-boot", "data1-data1"]
    after = await kit.wait_vm("data1", "running")
    assert after["pid"] == vm["pid"]  # the same QEMU, resumed
    await console_command(
        kit, "data1", "aecp-pattern verify /dev/vdb s1 8", "AECP-PATTERN-OK dev=/dev/vdb seed=s1"
    )


async def test_a_clone_and_a_template_boot_with_the_same_data(kit: LabKit) -> None:
    await kit.action("data1", "poweroff")
    r = await kit.call("POST", "/v1/vms/data1/clone", json={"name": "twin"})
    assert r.status_code == 202, r.text
    op = await kit.wait_op(r.json()["operation"]["id"])
    assert op["state"] == "succeeded", op
    await boot(kit, "twin")
    await console_command(
        kit, "twin", "aecp-pattern verify /dev/vdb s1 8", "AECP-PATTERN-OK dev=/dev/vdb seed=s1"
    )
    await kit.action("twin", "poweroff")
    r = await kit.call("POST", "/v1/vms/twin/convert-to-template", json={"name": "gold"})
    assert r.status_code == 202, r.text
    op = await kit.wait_op(r.json()["operation"]["id"])
    assert op["state"] == "succeeded" and op["kind"] == "vm.template", op
    assert (await kit.call("GET", "/v1/vms/twin")).status_code == 404
    op = await kit.create_vm("fromtpl", template="gold")
    assert op["state"] == "succeeded", op
    await boot(kit, "fromtpl")
    await console_command(
        kit, "fromtpl", "aecp-pattern verify /dev/vdb s1 8", "AECP-PATTERN-OK dev=/dev/vdb seed=s1"
    )
