"""Volumes record their owner: a VM never takes over, overwrites or deletes a volume that is not
its own, whatever path made the VM (image, clone, template), and a clashing name is refused when
the VM is created, naming the volume."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from aecp.cluster.vms import VMService
from aecp.cluster.vmsnapshots import VMSnapshotService
from aecp.cluster.volumes import VolumeService
from aecp.common.errors import AlreadyExists, InvalidInput, InvalidState, NotFound
from aecp.compute.fake import FakeHypervisor
from aecp.model.operation import Operation, OpState
from aecp.model.vm import Placement, Power, VMCreate, VMSpec, VMState, VMStatus
from aecp.node.vmdisks import VMDisks, owner
from aecp.node.vmjobs import VMJobs
from aecp.storage.meta.model import MIB, VolumeOwner, VolumeRecord
from aecp.storage.snapshots import SnapshotService
from aecp.store import keys
from aecp.store.memory import MemoryStore
from aecp.store.typed import read
from aecp.store.view import read_cluster
from tests.unit.abskit import Cluster
from tests.unit.conftest import add_node, dump_store


@pytest.fixture
async def svc(store: MemoryStore, images_dir: Path, cluster: Cluster) -> VMService:
    await add_node(store, "n1", memory_mib=4096, cpus=2)
    return VMService(store, images_dir, disks=disks(cluster))


def disks(cluster: Cluster) -> VMDisks:
    return VMDisks(cluster.meta, cluster.pool, Path("/nonexistent/nbd.sock"))


class JobFailed(Exception):
    """A VM job ended as failed: its operation's error."""


class CarriedOut:
    """``VMSnapshotService`` whose jobs the VM's node (n1) carries out at once: a test of
    what the jobs do, not of who runs them. A job that fails raises ``JobFailed``."""

    def __init__(self, svc: VMService, cluster: Cluster) -> None:
        self.service = VMSnapshotService(svc, SnapshotService(cluster.meta, cluster.pool))
        self.cloner = self.service.cloner
        self.snaps = self.service.snaps
        self.store = svc.store
        self.jobs = VMJobs("n1", FakeHypervisor(), self.cloner, svc.clock)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.service, name)

    async def _carried_out(self, vm: str, op: Operation) -> Operation:
        await self.jobs.run((await read_cluster(self.store)).vms[vm])
        got = await read(self.store, keys.op(op.id), Operation)
        assert got is not None
        if got[0].state is OpState.FAILED:
            raise JobFailed(got[0].error)
        return got[0]

    async def snapshot(self, vm: str, name: str) -> Operation:
        return await self._carried_out(vm, await self.service.snapshot(vm, name))

    async def rollback(self, vm: str, name: str) -> Operation:
        return await self._carried_out(vm, await self.service.rollback(vm, name))

    async def clone(self, vm: str, new: str, start: bool = True) -> Operation:
        return await self._carried_out(vm, await self.service.clone(vm, new, start))

    async def convert_to_template(self, vm: str, template: str) -> Operation:
        return await self._carried_out(vm, await self.service.convert_to_template(vm, template))


def vmsnaps(svc: VMService, cluster: Cluster) -> CarriedOut:
    return CarriedOut(svc, cluster)


async def spec_of(store: MemoryStore, name: str) -> VMSpec:
    got = await read(store, keys.vm_spec(name), VMSpec)
    assert got is not None
    return got[0]


async def stopped_vm(svc: VMService, cluster: Cluster, name: str, data: int = 0) -> VMSpec:
    """A VM placed on n1 and stopped, with its volumes as its node would have made them."""
    await svc.create_vm(VMCreate(name=name, image="tiny", start=False, data_disks_mib=[1] * data))
    spec = await spec_of(svc.store, name)  # type: ignore[arg-type]
    for vol in spec.volumes():
        await cluster.meta.create_volume(vol, MIB, replicas=1, owner=owner(spec))
    await svc.store.put(keys.vm_placement(name), Placement(node="n1", at=1).dump())
    status = VMStatus(state=VMState.STOPPED, node="n1", disks_ready=True)
    await svc.store.put(keys.vm_status(name), status.dump())
    return spec


async def test_a_vm_is_refused_at_create_when_a_volume_holds_its_disk_name(
    svc: VMService, cluster: Cluster
) -> None:
    await cluster.meta.create_volume("x-boot", 64 * MIB, replicas=1)
    before = await dump_store(svc.store)  # type: ignore[arg-type]
    with pytest.raises(AlreadyExists) as err:
        await svc.create_vm(VMCreate(name="x", image="tiny", start=False))
    assert err.value.fields["volume"] == "x-boot" and "volume x-boot" in err.value.message
    assert await dump_store(svc.store) == before  # type: ignore[arg-type]


async def test_a_clashing_data_disk_name_is_refused_too(svc: VMService, cluster: Cluster) -> None:
    await cluster.meta.create_volume("x-data2", MIB, replicas=1)
    with pytest.raises(AlreadyExists, match="volume x-data2"):
        await svc.create_vm(VMCreate(name="x", image="tiny", data_disks_mib=[1, 1]))
    await svc.create_vm(VMCreate(name="x", image="tiny", data_disks_mib=[1]))  # no x-data2


async def test_vm_delete_never_deletes_a_volume_it_does_not_own(
    store: MemoryStore, cluster: Cluster
) -> None:
    """The issue's repro: a VM named like a standalone volume's prefix (here stored without
    the API's check, as before the fix) neither fills nor deletes that volume."""
    vol = await cluster.meta.create_volume("x-boot", 64 * MIB, replicas=1)
    spec = VMSpec(name="x", uuid="u-x", image="tiny", vcpus=1, memory_mib=64)
    with pytest.raises(InvalidState, match="volume x-boot belongs to nobody"):
        await disks(cluster).prepare(spec, Path("/nonexistent"), "raw", MIB)
    assert await disks(cluster).remove(spec) == ["x-boot"]
    assert (await cluster.meta.volume("x-boot"))[0] == vol


async def test_a_vm_uses_and_deletes_only_the_volumes_that_name_it_as_owner(
    cluster: Cluster,
) -> None:
    mine = VMSpec(name="x", uuid="u-new", image="t", vcpus=1, memory_mib=64, data_disks_mib=[1])
    await cluster.meta.create_volume("x-boot", MIB, replicas=1, owner=owner(mine))
    earlier = VolumeOwner.vm("x", "u-old")  # an earlier VM of the same name
    await cluster.meta.create_volume("x-data1", MIB, replicas=1, owner=earlier)
    prepared = mine.model_copy(update={"disks_prepared": True})
    with pytest.raises(InvalidState, match="x-data1 belongs to VM x, not to this VM"):
        await disks(cluster).prepare(prepared, Path(), "raw", 0)
    assert await disks(cluster).remove(mine) == ["x-data1"]
    with pytest.raises(NotFound):
        await cluster.meta.volume("x-boot")
    assert (await cluster.meta.volume("x-data1"))[0].owner == earlier


async def test_a_vm_with_a_name_too_long_for_its_volumes_is_deleted_not_stuck(
    cluster: Cluster,
) -> None:
    """A VM stored before names were checked: its volume names are invalid, so it has none."""
    legacy = VMSpec(name="a" * 63, uuid="u", image="t", vcpus=1, memory_mib=64)
    assert await disks(cluster).remove(legacy) == []


async def test_a_standalone_volume_cannot_take_a_name_reserved_for_an_existing_vm(
    svc: VMService, cluster: Cluster
) -> None:
    await svc.create_vm(VMCreate(name="web", image="tiny", start=False))
    with pytest.raises(AlreadyExists, match="reserved for the disks of VM web"):
        await cluster.meta.create_volume("web-boot", MIB, replicas=1)
    await cluster.meta.create_volume("scratch", MIB, replicas=1)
    snaps = SnapshotService(cluster.meta, cluster.pool)
    await snaps.snapshot("scratch", "s1")
    with pytest.raises(AlreadyExists, match="reserved for the disks of VM web"):
        await snaps.clone("scratch", "s1", "web-data1")
    with pytest.raises(AlreadyExists, match="reserved for the disks of VM web"):
        await snaps.clone_volume("scratch", "web-data2")
    assert {v.name for v in await cluster.meta.volumes()} == {"scratch"}


async def test_a_vms_disk_cannot_be_deleted_through_the_volume_api_while_the_vm_exists(
    svc: VMService, cluster: Cluster
) -> None:
    spec = await stopped_vm(svc, cluster, "db")
    with pytest.raises(InvalidState, match="is a disk of VM db; delete the vm instead"):
        await cluster.meta.delete_volume("db-boot")
    await svc.store.delete_prefix(keys.vm_prefix("db"))  # the VM is gone (its disk was not)
    later = spec.model_copy(update={"uuid": "u-later"})  # a namesake made since owns nothing
    await svc.store.put(keys.vm_spec("db"), later.dump())
    await cluster.meta.delete_volume("db-boot")


def test_a_volume_record_without_an_owner_still_loads() -> None:
    old = b'{"name":"v","size":512,"replicas":1,"extent_size":1048576,"extents":[null]}'
    assert VolumeRecord.load(old).owner is None


async def test_a_clone_owns_its_volumes_and_a_clashing_clone_makes_none(
    svc: VMService, cluster: Cluster
) -> None:
    await stopped_vm(svc, cluster, "src", data=1)
    vs = vmsnaps(svc, cluster)
    await vs.clone("src", "twin", start=False)
    twin = await spec_of(svc.store, "twin")  # type: ignore[arg-type]
    for vol in ("twin-boot", "twin-data1"):
        assert (await cluster.meta.volume(vol))[0].owner == VolumeOwner.vm("twin", twin.uuid)
    await cluster.meta.create_volume("dup-data1", MIB, replicas=1)
    before = await dump_store(svc.store)  # type: ignore[arg-type]
    with pytest.raises(AlreadyExists, match="volume dup-data1"):
        await vs.clone("src", "dup", start=False)
    assert await dump_store(svc.store) == before  # type: ignore[arg-type]


async def test_a_vm_from_a_template_owns_its_volumes_and_a_clash_is_refused(
    svc: VMService, cluster: Cluster
) -> None:
    await stopped_vm(svc, cluster, "base")
    vs = vmsnaps(svc, cluster)
    await vs.convert_to_template("base", "gold")
    assert (await cluster.meta.volume("tpl-gold-boot"))[0].owner == VolumeOwner.template("gold")
    with pytest.raises(InvalidState, match="is a disk of template gold"):
        await cluster.meta.delete_volume("tpl-gold-boot")
    await vs.create_from_template(VMCreate(name="app", template="gold", start=False))
    app = await spec_of(svc.store, "app")  # type: ignore[arg-type]
    assert (await cluster.meta.volume("app-boot"))[0].owner == VolumeOwner.vm("app", app.uuid)
    await cluster.meta.create_volume("web-boot", MIB, replicas=1)
    with pytest.raises(AlreadyExists, match="volume web-boot"):
        await vs.create_from_template(VMCreate(name="web", template="gold"))
    assert await svc.store.get(keys.vm_spec("web")) is None


async def test_a_template_name_too_long_for_its_volume_names_is_refused(
    svc: VMService, cluster: Cluster
) -> None:
    await stopped_vm(svc, cluster, "base")
    before = await dump_store(svc.store)  # type: ignore[arg-type]
    with pytest.raises(InvalidInput, match="tpl-<name>-data4") as err:
        await vmsnaps(svc, cluster).convert_to_template("base", "t" * 60)
    assert err.value.fields["field"] == "template"
    assert await dump_store(svc.store) == before  # type: ignore[arg-type]


async def test_deleting_an_unplaced_clone_deletes_its_own_volumes(
    svc: VMService, cluster: Cluster
) -> None:
    await stopped_vm(svc, cluster, "src")
    await vmsnaps(svc, cluster).clone("src", "twin", start=False)
    op = await svc.delete_vm("twin")  # the scheduler never placed it
    assert op.state.value == "succeeded"
    with pytest.raises(NotFound):
        await cluster.meta.volume("twin-boot")
    assert (await cluster.meta.volume("src-boot"))[0].owner is not None
    assert (await spec_of(svc.store, "src")).power is Power.STOPPED  # type: ignore[arg-type]


async def test_a_template_whose_volume_has_a_snapshot_is_not_deleted_at_all(
    svc: VMService, cluster: Cluster
) -> None:
    """The template record went first, leaving its volume owned by a template that no longer
    existed (review finding): now nothing is deleted and the 409 says why."""
    await stopped_vm(svc, cluster, "base")
    vs = vmsnaps(svc, cluster)
    await vs.convert_to_template("base", "gold")
    await vs.snaps.snapshot("tpl-gold-boot", "keep")
    before = await dump_store(svc.store)  # type: ignore[arg-type]
    volumes = VolumeService(cluster.meta, cluster.pool)
    with pytest.raises(InvalidState, match="tpl-gold-boot has snapshots"):
        await vs.delete_template("gold", volumes.delete)
    assert await dump_store(svc.store) == before  # type: ignore[arg-type]
