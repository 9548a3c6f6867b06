"""Cluster requests: every bad input gets a clear error naming the field, and changes nothing."""

from __future__ import annotations

from pathlib import Path

import pytest

from aecp.cluster.vms import VMService
from aecp.common.errors import AlreadyExists, ImageError, InvalidInput, InvalidState, NoCapacity
from aecp.model.operation import OpState
from aecp.model.vm import Placement, Power, PowerOp, VMCreate, VMSpec, VMState, VMStatus
from aecp.store import keys
from aecp.store.memory import MemoryStore
from aecp.store.typed import read
from tests.unit.conftest import add_node, dump_store


@pytest.fixture
async def svc(store: MemoryStore, images_dir: Path) -> VMService:
    await add_node(store, "n1", memory_mib=2048, cpus=2)
    await add_node(store, "n2", memory_mib=1024, cpus=2)
    await add_node(store, "n3", memory_mib=8192, cpus=8, alive=False)
    return VMService(store, images_dir)


async def test_create_stores_the_spec_and_a_running_operation(svc: VMService) -> None:
    spec, op = await svc.create_vm(VMCreate(name="vm1", image="tiny"))
    assert op.state is OpState.RUNNING and op.kind == "vm.create"
    got = await read(svc.store, keys.vm_spec("vm1"), VMSpec)
    assert got is not None and got[0].uuid == spec.uuid and got[0].op_id == op.id


@pytest.mark.parametrize(
    ("req", "field"),
    [
        ({"name": "Bad_Name", "image": "tiny"}, "name"),
        ({"name": "-x", "image": "tiny"}, "name"),
        ({"name": "vm1", "image": "tiny", "memory_mib": 0}, "memory_mib"),
        ({"name": "vm1", "image": "tiny", "memory_mib": -5}, "memory_mib"),
        ({"name": "vm1", "image": "tiny", "vcpus": 0}, "vcpus"),
        ({"name": "vm1", "image": "tiny", "vcpus": 9}, "vcpus"),
        ({"name": "vm1", "image": "nope"}, "image"),
        ({"name": "vm1", "image": "tiny", "node": "n9"}, "node"),
        ({"name": "vm1", "image": "tiny", "memory_mib": 100000}, "memory_mib"),
        ({"name": "vm1", "image": "tiny", "data_disks_mib": [0]}, "data_disks_mib"),
    ],
)
async def test_bad_create_input_names_the_field_and_changes_nothing(
    svc: VMService, req: dict[str, object], field: str
) -> None:
    before = await dump_store(svc.store)  # type: ignore[arg-type]
    with pytest.raises(InvalidInput) as err:
        await svc.create_vm(VMCreate.model_construct(**req))  # the service checks, not pydantic
    assert err.value.fields["field"] == field
    assert await dump_store(svc.store) == before  # type: ignore[arg-type]


async def test_a_duplicate_name_is_refused(svc: VMService) -> None:
    await svc.create_vm(VMCreate(name="vm1", image="tiny"))
    before = await dump_store(svc.store)  # type: ignore[arg-type]
    with pytest.raises(AlreadyExists):
        await svc.create_vm(VMCreate(name="vm1", image="tiny", memory_mib=512))
    assert await dump_store(svc.store) == before  # type: ignore[arg-type]


async def test_no_ready_node_with_room_is_refused_at_create(svc: VMService) -> None:
    with pytest.raises(NoCapacity, match="n3: unreachable"):
        await svc.create_vm(VMCreate(name="vm1", image="tiny", memory_mib=4096))


async def test_a_pinned_vm_on_an_unreachable_node_is_refused(svc: VMService) -> None:
    with pytest.raises(Exception, match="unreachable"):
        await svc.create_vm(VMCreate(name="vm1", image="tiny", node="n3"))


async def test_a_corrupt_image_file_fails_at_create_not_later(
    svc: VMService, images_dir: Path
) -> None:
    (images_dir / "tiny.raw").write_bytes(b"\1" * (1 << 20))
    with pytest.raises(ImageError, match="checksum"):
        await svc.create_vm(VMCreate(name="vm1", image="tiny"))
    (images_dir / "tiny.raw").unlink()
    with pytest.raises(ImageError, match="missing"):
        await svc.create_vm(VMCreate(name="vm1", image="tiny"))
    assert await svc.store.get(keys.vm_spec("vm1")) is None


async def _running(svc: VMService, name: str) -> None:
    await svc.create_vm(VMCreate(name=name, image="tiny"))
    await svc.store.put(keys.vm_placement(name), Placement(node="n1", at=1).dump())
    await svc.store.put(keys.vm_status(name), VMStatus(state=VMState.RUNNING, node="n1").dump())


async def test_resume_of_a_running_vm_is_refused_and_changes_nothing(svc: VMService) -> None:
    await _running(svc, "vm1")
    before = await dump_store(svc.store)  # type: ignore[arg-type]
    with pytest.raises(InvalidState, match="not suspended"):
        await svc.power("vm1", PowerOp.RESUME)
    assert await dump_store(svc.store) == before  # type: ignore[arg-type]


async def test_a_power_operation_updates_the_spec_and_records_an_operation(
    svc: VMService,
) -> None:
    await _running(svc, "vm1")
    op = await svc.power("vm1", PowerOp.SHUTDOWN)
    got = await read(svc.store, keys.vm_spec("vm1"), VMSpec)
    assert got is not None and got[0].power is Power.STOPPED and got[0].op_id == op.id
    assert (await svc.operation(op.id)).kind == "vm.shutdown"


async def test_a_running_vm_cannot_be_deleted(svc: VMService) -> None:
    await _running(svc, "vm1")
    with pytest.raises(InvalidState, match="power it off"):
        await svc.delete_vm("vm1")


async def test_an_unplaced_stopped_vm_is_deleted_at_once(svc: VMService) -> None:
    await svc.create_vm(VMCreate(name="vm1", image="tiny", start=False))
    op = await svc.delete_vm("vm1")
    assert op.state is OpState.SUCCEEDED
    assert await svc.store.list(keys.vm_prefix("vm1")) == []


async def test_an_image_in_use_cannot_be_deleted(svc: VMService) -> None:
    await svc.create_vm(VMCreate(name="vm1", image="tiny"))
    with pytest.raises(Exception, match="used by VMs: vm1"):
        await svc.delete_image("tiny")
