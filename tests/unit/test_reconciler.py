"""The node's VM control loop: decisions as sentences, actions through the hypervisor contract."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from aecp.common.clock import FakeClock
from aecp.compute.fake import FakeHypervisor
from aecp.compute.hypervisor import Accel, InstanceSpec, RunState
from aecp.model.vm import Placement, Power, VMSpec, VMState, VMStatus
from aecp.node.reconciler import Reconciler
from aecp.node.vmops import VMActions
from aecp.store import keys
from aecp.store.memory import MemoryStore
from aecp.store.typed import read
from aecp.store.view import read_cluster
from tests.unit.conftest import add_node
from tests.unit.localdisks import LocalDisks


class World:
    def __init__(self, store: MemoryStore, hv: FakeHypervisor, rec: Reconciler) -> None:
        self.store, self.hv, self.rec = store, hv, rec

    async def add_vm(self, name: str, power: Power = Power.RUNNING, node: str = "n1") -> None:
        spec = VMSpec(
            name=name, uuid=f"uuid-{name}", image="tiny", vcpus=1, memory_mib=128, power=power
        )
        await self.store.put(keys.vm_spec(name), spec.dump())
        await self.store.put(keys.vm_placement(name), Placement(node=node, at=1).dump())

    async def set_power(self, name: str, power: Power, stop_mode: str = "acpi") -> None:
        got = await read(self.store, keys.vm_spec(name), VMSpec)
        assert got is not None
        await self.store.put(
            keys.vm_spec(name),
            got[0].model_copy(update={"power": power, "stop_mode": stop_mode}).dump(),
        )

    async def reconcile(self, held: bool = True) -> list[str]:
        decisions = self.rec.run_pass(await read_cluster(self.store), held)
        while self.rec.inflight:
            await asyncio.gather(*self.rec.inflight.values())
        return [d.sentence for d in decisions]

    async def status(self, name: str) -> VMStatus | None:
        got = await read(self.store, keys.vm_status(name), VMStatus)
        return got[0] if got else None


@pytest.fixture
async def world(store: MemoryStore, clock: FakeClock, images_dir: Path, tmp_path: Path) -> World:
    await add_node(store, "n1")
    hv = FakeHypervisor()
    actions = VMActions(
        "n1", "127.0.0.1", store, hv, LocalDisks(tmp_path / "vms"), images_dir, Accel.TCG, clock
    )
    return World(store, hv, Reconciler("n1", hv, actions, clock))


async def test_a_vm_assigned_here_and_not_running_is_started(world: World) -> None:
    await world.add_vm("vm1")
    assert await world.reconcile() == ["vm1 should run and is stopped: starting it"]
    assert await world.hv.state("vm1") is RunState.RUNNING
    st = await world.status("vm1")
    assert st is not None and st.state is VMState.RUNNING and st.boots == 1
    assert st.http_url.startswith("http://127.0.0.1:")
    assert await world.reconcile() == ["vm1 is running as desired"]


async def test_vms_assigned_to_other_nodes_are_left_alone(world: World) -> None:
    await world.add_vm("vm2", node="n2")
    assert await world.reconcile() == []
    assert world.hv.calls == []


async def test_nothing_changes_while_the_node_does_not_hold_its_lease(world: World) -> None:
    await world.add_vm("vm1")
    assert await world.reconcile(held=False) == [
        "this node does not hold its lease: changing nothing"
    ]
    assert world.hv.calls == []


async def test_shutdown_presses_acpi_and_records_stopped(world: World) -> None:
    await world.add_vm("vm1")
    await world.reconcile()
    await world.set_power("vm1", Power.STOPPED)
    [sentence] = await world.reconcile()
    assert "pressing its ACPI power button" in sentence
    assert ("shutdown", "vm1") in world.hv.calls
    st = await world.status("vm1")
    assert st is not None and st.state is VMState.STOPPED and st.pid is None


async def test_poweroff_stops_hard(world: World) -> None:
    await world.add_vm("vm1")
    await world.reconcile()
    await world.set_power("vm1", Power.STOPPED, stop_mode="hard")
    [sentence] = await world.reconcile()
    assert sentence == "vm1 should be off and is running: powering it off"
    assert ("poweroff", "vm1") in world.hv.calls


async def test_suspend_and_resume_follow_the_desired_power(world: World) -> None:
    await world.add_vm("vm1")
    await world.reconcile()
    await world.set_power("vm1", Power.PAUSED)
    assert await world.reconcile() == ["vm1 should be suspended and is running: pausing it"]
    assert await world.hv.state("vm1") is RunState.PAUSED
    await world.set_power("vm1", Power.RUNNING)
    assert await world.reconcile() == ["vm1 should run and is paused: resuming it"]


async def test_a_guest_that_powers_itself_off_stays_off(world: World) -> None:
    await world.add_vm("vm1")
    await world.reconcile()
    world.hv.guest_poweroff("vm1")
    world.rec.note_guest_poweroff("vm1")
    assert await world.reconcile() == [
        "vm1 powered itself off from inside: recording it as stopped"
    ]
    got = await read(world.store, keys.vm_spec("vm1"), VMSpec)
    assert got is not None and got[0].power is Power.STOPPED
    [sentence] = await world.reconcile()
    assert sentence == "vm1 is stopped as desired: recording its status"


async def test_a_crashed_qemu_is_restarted(world: World) -> None:
    await world.add_vm("vm1")
    await world.reconcile()
    world.hv.crash("vm1")
    [sentence] = await world.reconcile()
    assert "should run and is" in sentence and "starting it" in sentence
    assert await world.hv.state("vm1") is RunState.RUNNING


async def test_an_instance_not_assigned_here_is_powered_off(world: World) -> None:
    await world.hv.start(InstanceSpec(name="ghost", uuid="g", vcpus=1, memory_mib=64, disks=()))
    assert await world.reconcile() == [
        "ghost runs here but is not assigned to this node: powering it off"
    ]
    assert await world.hv.state("ghost") is RunState.STOPPED


async def test_delete_powers_off_removes_disks_and_keys(world: World, tmp_path: Path) -> None:
    await world.add_vm("vm1")
    await world.reconcile()
    assert (tmp_path / "vms" / "vm1" / "disk0.qcow2").exists()
    got = await read(world.store, keys.vm_spec("vm1"), VMSpec)
    assert got is not None
    await world.store.put(keys.vm_spec("vm1"), got[0].model_copy(update={"deleting": True}).dump())
    await world.reconcile()
    assert await world.store.list(keys.vm_prefix("vm1")) == []
    assert not (tmp_path / "vms" / "vm1").exists()


async def test_a_failed_start_is_reported_and_retried_later(world: World, images_dir: Path) -> None:
    (images_dir / "tiny.raw").unlink()
    await world.add_vm("vm1")
    await world.reconcile()
    st = await world.status("vm1")
    assert st is not None and st.state is VMState.ERROR and "missing" in st.message
    [sentence] = await world.reconcile()
    assert sentence.startswith("vm1 failed (image tiny is missing") and "retrying later" in sentence
