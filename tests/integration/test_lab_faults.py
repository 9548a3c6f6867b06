"""A 3-node lab with real etcd and QEMU: agent restarts, node kills and self-fencing."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import pytest_asyncio

from aecp.common.proc import pid_alive
from aecp.compute.images.tiny import BOOT_MARKER
from tests.labkit import LabKit, running_lab, wait_for

pytestmark = [pytest.mark.integration, pytest.mark.asyncio(loop_scope="module")]


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def kit(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[LabKit]:
    root: Path = tmp_path_factory.mktemp("faults") / "lab"
    async with running_lab(root, subnet="127.0.61", etcd_mode="local") as k:
        yield k


async def test_an_agent_restart_leaves_the_vm_running_in_the_same_qemu_process(
    kit: LabKit,
) -> None:
    await kit.create_vm("keep", node="node1")
    await kit.wait_console("keep", f"{BOOT_MARKER} name=keep")
    before = await kit.vm("keep")
    kit.lab.kill_agent("node1")
    assert pid_alive(before["pid"]), "QEMU must outlive its agent"
    kit.lab.start_agent("node1")
    await kit.lab.wait_ready()
    log = kit.lab.agent("node1").log_file

    async def reattached() -> bool:
        return "re-attached 1 running VMs" in log.read_text()

    await wait_for(reattached, "the new agent to re-attach")
    after = await kit.wait_vm("keep", "running")
    assert after["pid"] == before["pid"]
    assert after["boots"] == before["boots"]
    # the re-attached VM is still driven over QMP: a power operation works
    await kit.action("keep", "suspend")
    assert (await kit.vm("keep"))["state"] == "paused"
    await kit.action("keep", "resume")


async def test_a_killed_node_becomes_unreachable_and_its_vms_unknown(kit: LabKit) -> None:
    await kit.create_vm("victim", node="node3")
    kit.lab.kill_node("node3")

    async def unreachable() -> bool:
        return await kit.node_state("node3") == "unreachable"

    await wait_for(unreachable, "node3 to show as unreachable (its lease expires)")
    vm = await kit.vm("victim")
    assert vm["state"] == "unknown" and "unreachable" in vm["message"]
    kit.lab.start_node("node3")
    await kit.lab.wait_ready()
    back = await kit.wait_vm("victim", "running")
    assert back["boots"] == 2


async def test_a_node_that_loses_etcd_stops_its_vms_before_its_lease_expires(
    kit: LabKit,
) -> None:
    await kit.create_vm("fenced", node="node2")
    pid = (await kit.vm("fenced"))["pid"]
    assert pid_alive(pid)
    kit.lab.kill_etcd("node2")  # node2's agent talks only to its own member: cut off
    order: list[str] = []

    async def both_seen() -> bool:
        if not pid_alive(pid) and "qemu-gone" not in order:
            order.append("qemu-gone")
        if "lease-gone" not in order and await kit.node_state("node2") == "unreachable":
            order.append("lease-gone")
        return len(order) == 2

    await wait_for(both_seen, "fencing and lease expiry", every=0.05)
    assert order == ["qemu-gone", "lease-gone"], (
        "the VM must be stopped before anyone could consider the node dead"
    )
    assert "fencing" in kit.lab.agent("node2").log_file.read_text()
    kit.lab.start_etcd("node2")
    await kit.lab.wait_ready()

    async def restarted() -> dict[str, object] | None:
        # the status from before the fence says "running" until the agent records the restart
        vm = await kit.vm("fenced")
        return vm if vm["state"] == "running" and vm["pid"] != pid else None

    await wait_for(restarted, "fenced running again in a new QEMU process")


async def test_an_operation_outlives_the_agent_that_must_carry_it_out(kit: LabKit) -> None:
    kit.lab.kill_agent("node1")
    r = await kit.call(
        "POST", "/v1/vms", node="node2", json={"name": "later", "image": "tiny", "node": "node1"}
    )
    assert r.status_code == 202, r.text
    op_id = r.json()["operation"]["id"]
    kit.lab.start_agent("node1")
    op = await kit.wait_op(op_id)
    assert op["state"] == "succeeded" and "running on node1" in op["message"]
    assert (await kit.vm("later"))["boots"] == 1
