"""A VM's volumes and its record go together, whatever lands in between: a delete of a VM no node
has never leaves it without disks, a clone's volumes deleted before its spec is stored fail the
clone, a store answer lost after the spec was stored keeps the clone, and a VM made before
volumes recorded owners keeps using its own volumes. Found by review: each test failed before
its fix."""

from __future__ import annotations

from pathlib import Path

import pytest

from aecp.cluster.vms import VMService
from aecp.common.errors import InvalidState, NotFound, StoreUnavailable
from aecp.model.operation import Operation, OpState
from aecp.model.vm import PowerOp, VMSpec, VMState, VMStatus
from aecp.node.vmdisks import owner
from aecp.storage.meta.model import VolumeOwner
from aecp.store import keys
from aecp.store.memory import MemoryStore
from aecp.store.view import read_cluster
from tests.unit.abskit import Cluster
from tests.unit.conftest import add_node
from tests.unit.test_vm_ownership import JobFailed, disks, spec_of, stopped_vm, vmsnaps


@pytest.fixture
async def svc(store: MemoryStore, images_dir: Path, cluster: Cluster) -> VMService:
    await add_node(store, "n1", memory_mib=4096, cpus=2)
    return VMService(store, images_dir, disks=disks(cluster))


async def volume_names(cluster: Cluster) -> set[str]:
    return {v.name for v in await cluster.meta.volumes()}


async def test_a_start_sent_while_an_unplaced_vm_is_deleted_never_leaves_it_without_disks(
    store: MemoryStore, images_dir: Path, cluster: Cluster, svc: VMService
) -> None:
    """The reviewer's race: the volumes were deleted before the transaction that decided the
    delete; a start landing in between won, and the VM stayed without its disks."""
    real = disks(cluster)
    refused: list[Exception] = []

    class StartMeanwhile:
        async def remove(self, spec: VMSpec) -> list[str]:
            try:  # a start request lands while the volumes are being deleted
                await racing.power(spec.name, PowerOp.START)
            except InvalidState as exc:
                refused.append(exc)
            return await real.remove(spec)

    racing = VMService(store, images_dir, disks=StartMeanwhile())
    await stopped_vm(svc, cluster, "src")
    await vmsnaps(svc, cluster).clone("src", "twin", start=False)

    op = await racing.delete_vm("twin")

    assert op.state is OpState.SUCCEEDED
    assert [str(e) for e in refused] == ["VM twin is being deleted"]
    assert await store.get(keys.vm_spec("twin")) is None
    assert "twin-boot" not in await volume_names(cluster)


async def test_an_unplaced_delete_interrupted_after_it_was_marked_is_finished_by_the_next(
    store: MemoryStore, images_dir: Path, cluster: Cluster, svc: VMService
) -> None:
    real = disks(cluster)

    class DiesHalfway:
        async def remove(self, spec: VMSpec) -> list[str]:
            raise StoreUnavailable("etcd txn: no answer within 5 s")

    await stopped_vm(svc, cluster, "src")
    await vmsnaps(svc, cluster).clone("src", "twin", start=False)
    with pytest.raises(StoreUnavailable):
        await VMService(store, images_dir, disks=DiesHalfway()).delete_vm("twin")
    snap = await read_cluster(store)
    assert snap.vm_state("twin") is VMState.DELETING  # says what is under way
    first = snap.vms["twin"].spec.op_id

    op = await VMService(store, images_dir, disks=real).delete_vm("twin")

    assert op.id == first and op.state is OpState.SUCCEEDED
    assert await store.list(keys.vm_prefix("twin")) == []
    assert "twin-boot" not in await volume_names(cluster)


async def test_an_unplaced_vm_whose_disks_cannot_be_deleted_shows_error_and_can_be_deleted_again(
    store: MemoryStore, svc: VMService, cluster: Cluster
) -> None:
    await stopped_vm(svc, cluster, "src")
    vs = vmsnaps(svc, cluster)
    await vs.clone("src", "twin", start=False)
    await vs.snaps.snapshot("twin-boot", "keep")  # a volume with snapshots stays

    failed = await svc.delete_vm("twin")

    assert failed.state is OpState.FAILED and "has snapshots" in failed.error
    assert (await read_cluster(store)).vm_state("twin") is VMState.ERROR
    await vs.snaps.delete("twin-boot", "keep")
    assert (await svc.delete_vm("twin")).state is OpState.SUCCEEDED
    assert "twin-boot" not in await volume_names(cluster)


async def test_a_clone_whose_volume_is_deleted_before_its_spec_is_stored_is_not_stored(
    store: MemoryStore, images_dir: Path, cluster: Cluster, svc: VMService
) -> None:
    """Until the spec is stored the clone's volumes have no living owner, so the volume API
    may delete them; the spec was stored anyway and the VM had no disk."""

    class VolumeApiMeanwhile(VMService):
        async def store_new(self, spec: VMSpec, op: Operation, *args: object, **kw: object):  # type: ignore[no-untyped-def]
            await cluster.meta.delete_volume(f"{spec.name}-boot")  # what the volume API does
            return await super().store_new(spec, op, *args, **kw)  # type: ignore[arg-type]

    await stopped_vm(svc, cluster, "src", data=1)
    racing = VolumeApiMeanwhile(store, images_dir, disks=disks(cluster))

    with pytest.raises(JobFailed, match="its disks changed while it was created"):
        await vmsnaps(racing, cluster).clone("src", "twin", start=False)

    assert await store.get(keys.vm_spec("twin")) is None
    assert await volume_names(cluster) == {"src-boot", "src-data1"}


async def test_a_clone_whose_store_answer_was_lost_after_it_was_stored_keeps_its_volumes(
    store: MemoryStore, images_dir: Path, cluster: Cluster, svc: VMService
) -> None:
    class AnswerLost(VMService):
        async def store_new(self, spec: VMSpec, op: Operation, *args: object, **kw: object):  # type: ignore[no-untyped-def]
            await super().store_new(spec, op, *args, **kw)  # type: ignore[arg-type]
            raise StoreUnavailable("etcd txn: the connection broke")

    await stopped_vm(svc, cluster, "src")
    op = await vmsnaps(AnswerLost(store, images_dir, disks=disks(cluster)), cluster).clone(
        "src", "twin", start=False
    )

    twin = await spec_of(store, "twin")
    assert twin.op_id == op.id
    assert (await cluster.meta.volume("twin-boot"))[0].owner == VolumeOwner.vm("twin", twin.uuid)


async def test_a_template_whose_volume_is_deleted_before_it_is_stored_is_not_stored(
    store: MemoryStore, svc: VMService, cluster: Cluster
) -> None:
    await stopped_vm(svc, cluster, "base")
    vs = vmsnaps(svc, cluster)
    clone = vs.cloner.clone_volumes

    async def volume_api_meanwhile(*args, **kw):  # type: ignore[no-untyped-def]
        made = await clone(*args, **kw)
        await cluster.meta.delete_volume("tpl-gold-boot")  # its template does not exist yet
        return made

    vs.cloner.clone_volumes = volume_api_meanwhile  # type: ignore[method-assign]
    with pytest.raises(JobFailed, match="was deleted while it was made for template gold"):
        await vs.convert_to_template("base", "gold")
    assert await store.get(keys.template("gold")) is None
    assert await store.get(keys.vm_spec("base")) is not None  # not deleted either


async def legacy_vm(svc: VMService, cluster: Cluster, name: str) -> VMSpec:
    """A VM whose volumes were made before volumes recorded owners, its disks ready."""
    spec = await stopped_vm(svc, cluster, name, data=1)
    for vol in spec.volumes():
        rec, rev = await cluster.meta.volume(vol)
        ownerless = rec.model_copy(update={"owner": None})
        assert await cluster.store.replace(keys.abs_volume(vol), ownerless.dump(), mod_revision=rev)
    return spec


async def test_a_vm_made_before_volumes_had_owners_adopts_its_own_volumes_and_starts(
    svc: VMService, cluster: Cluster
) -> None:
    spec = await legacy_vm(svc, cluster, "old")
    vm_disks = disks(cluster)

    got = await vm_disks.reuse(spec)

    assert got == vm_disks.disks(spec)
    for vol in spec.volumes():
        assert (await cluster.meta.volume(vol))[0].owner == owner(spec)
    assert await vm_disks.reuse(spec) == got  # once: now simply its own
    assert await vm_disks.remove(spec) == []  # and its delete takes them with it


async def test_a_volume_owned_by_someone_else_is_never_adopted(
    svc: VMService, cluster: Cluster
) -> None:
    spec = await legacy_vm(svc, cluster, "old")
    rec, rev = await cluster.meta.volume("old-data1")
    other = VolumeOwner.vm("old", "u-an-earlier-vm")
    await cluster.store.replace(
        keys.abs_volume("old-data1"),
        rec.model_copy(update={"owner": other}).dump(),
        mod_revision=rev,
    )
    with pytest.raises(InvalidState, match="old-data1 belongs to VM old"):
        await disks(cluster).reuse(spec)
    assert (await cluster.meta.volume("old-data1"))[0].owner == other
    with pytest.raises(InvalidState, match="belongs to"):
        await cluster.meta.adopt_volume("old-data1", owner(spec))


async def test_a_vm_whose_ready_disk_is_gone_fails_to_start_naming_it(
    svc: VMService, cluster: Cluster
) -> None:
    spec = await legacy_vm(svc, cluster, "old")
    await cluster.meta.delete_volume("old-data1")  # owner-less: the volume API may
    with pytest.raises(InvalidState, match="volume old-data1 of VM old no longer exists"):
        await disks(cluster).reuse(spec)
    with pytest.raises(NotFound):
        await cluster.meta.volume("old-data1")


def test_a_status_from_before_the_fields_it_keeps_still_loads() -> None:
    old = b'{"state":"error","node":"n1","message":"x","disks_ready":true}'
    status = VMStatus.load(old)
    assert status.disks_ready and not status.gave_up
