"""VM jobs (snapshot, rollback, clone, convert-to-template): the API only records them, the
VM's node agent carries them out, one at a time per VM, and a run interrupted half-way (the
agent killed) is undone by the next run before it starts again: a snapshot is then whole or
absent, never partial, and a clone is made once."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest

from aecp.cluster.vmclones import DiskCloner
from aecp.cluster.vms import VMService
from aecp.cluster.vmsnapshots import VMSnapshotService
from aecp.common.clock import FakeClock
from aecp.common.errors import InvalidState, StoreUnavailable, Unavailable
from aecp.compute.fake import FakeHypervisor
from aecp.compute.hypervisor import InstanceSpec, RunState
from aecp.model.operation import Operation, OpState
from aecp.model.vm import Power, PowerOp, VMState
from aecp.model.vmjob import JobKind, clone_snapshot
from aecp.node.reconciler import Reconciler
from aecp.node.vmjobs import VMJobs
from aecp.storage.snapshots import SnapshotService
from aecp.store import keys
from aecp.store.base import Store
from aecp.store.memory import MemoryStore
from aecp.store.opsend import sweep_strays
from aecp.store.typed import read
from aecp.store.view import VMEntry, read_cluster
from tests.unit.abskit import Cluster
from tests.unit.conftest import add_node, dump_store
from tests.unit.test_vm_ownership import disks, stopped_vm


@pytest.fixture
async def svc(store: MemoryStore, images_dir: Path, cluster: Cluster) -> VMService:
    await add_node(store, "n1", memory_mib=4096, cpus=2)
    return VMService(store, images_dir, disks=disks(cluster))


@pytest.fixture
def hv() -> FakeHypervisor:
    return FakeHypervisor()


@pytest.fixture
def requests(svc: VMService, cluster: Cluster) -> VMSnapshotService:
    return VMSnapshotService(svc, SnapshotService(cluster.meta, cluster.pool))


def agent(svc: VMService, requests: VMSnapshotService, hv: FakeHypervisor) -> VMJobs:
    """The job runner of n1's agent (a new one is a restarted agent)."""
    return VMJobs("n1", hv, requests.cloner, svc.clock)


async def entry(store: Store, vm: str) -> VMEntry:
    return (await read_cluster(store)).vms[vm]


async def op_of(store: Store, op_id: str) -> Operation:
    got = await read(store, keys.op(op_id), Operation)
    assert got is not None
    return got[0]


async def running(svc: VMService, cluster: Cluster, hv: FakeHypervisor, name: str) -> None:
    """A VM with two disks, running on n1."""
    spec = await stopped_vm(svc, cluster, name, data=1)
    await svc.store.put(keys.vm_spec(name), spec.model_copy(update={"power": Power.RUNNING}).dump())
    await hv.start(InstanceSpec(name, spec.uuid, 1, 256, disks=()))


async def snapshot_names(requests: VMSnapshotService, vm: str) -> dict[str, list[str]]:
    return {
        vol: [s.name for s in await requests.snaps.snapshots(vol)]
        for vol in (f"{vm}-boot", f"{vm}-data1")
    }


async def test_a_snapshot_request_only_records_a_job_and_the_agent_takes_it_paused(
    svc: VMService, cluster: Cluster, hv: FakeHypervisor, requests: VMSnapshotService
) -> None:
    await running(svc, cluster, hv, "web")
    op = await requests.snapshot("web", "s1")
    assert op.kind == "vm.snapshot" and op.state is OpState.RUNNING
    assert await snapshot_names(requests, "web") == {"web-boot": [], "web-data1": []}
    job = (await entry(svc.store, "web")).job
    assert job is not None and job.kind is JobKind.SNAPSHOT and job.op_id == op.id

    await agent(svc, requests, hv).run(await entry(svc.store, "web"))

    assert await snapshot_names(requests, "web") == {"web-boot": ["s1"], "web-data1": ["s1"]}
    assert [c for c in hv.calls if c[0] in ("pause", "resume")] == [
        ("pause", "web"),
        ("resume", "web"),
    ]
    assert await hv.state("web") is RunState.RUNNING
    done = await op_of(svc.store, op.id)
    assert done.state is OpState.SUCCEEDED and "2 disks" in done.message
    assert (await entry(svc.store, "web")).job is None


async def test_a_vm_has_one_job_at_a_time_and_is_not_deleted_under_it(
    store: MemoryStore,
    svc: VMService,
    cluster: Cluster,
    hv: FakeHypervisor,
    requests: VMSnapshotService,
) -> None:
    """Two snapshots of one VM never pause and resume it under each other: the second is
    refused while the first is recorded (and a delete too), naming the first."""
    await stopped_vm(svc, cluster, "web")
    op = await requests.snapshot("web", "s1")
    before = await dump_store(store)
    for refused in (
        requests.snapshot("web", "s2"),
        requests.clone("web", "twin"),
        requests.convert_to_template("web", "gold"),
        svc.delete_vm("web"),
    ):
        with pytest.raises(InvalidState, match=f"in progress \\({op.id}\\)"):
            await refused
    assert await dump_store(store) == before


class KilledAfterOneSnapshot(SnapshotService):
    """Takes one snapshot, then hangs in the next one (where the agent is killed)."""

    taken = asyncio.Event()

    async def snapshot(self, volume: str, name: str, *args: Any, **kw: Any) -> Any:
        if self.taken.is_set():
            await asyncio.Event().wait()
        rec = await super().snapshot(volume, name, *args, **kw)
        self.taken.set()
        return rec


class KilledBeforeStoring(DiskCloner):
    """Makes a clone's volumes, then dies before its record is stored."""

    async def store_vm(self, *args: Any, **kw: Any) -> None:
        raise asyncio.CancelledError


async def test_a_snapshot_interrupted_half_way_is_undone_and_taken_whole_by_the_next_run(
    svc: VMService, cluster: Cluster, hv: FakeHypervisor, requests: VMSnapshotService
) -> None:
    await running(svc, cluster, hv, "web")
    op = await requests.snapshot("web", "s1")
    dying = KilledAfterOneSnapshot(cluster.meta, cluster.pool)
    first = VMJobs("n1", hv, DiskCloner(svc, dying), svc.clock)
    task = asyncio.create_task(first.run(await entry(svc.store, "web")))
    await dying.taken.wait()
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)
    assert await snapshot_names(requests, "web") == {"web-boot": ["s1"], "web-data1": []}

    await agent(svc, requests, hv).run(await entry(svc.store, "web"))

    assert await snapshot_names(requests, "web") == {"web-boot": ["s1"], "web-data1": ["s1"]}
    assert (await op_of(svc.store, op.id)).state is OpState.SUCCEEDED
    assert await hv.state("web") is RunState.RUNNING


async def test_a_snapshot_that_fails_leaves_none_and_fails_its_operation(
    svc: VMService, cluster: Cluster, hv: FakeHypervisor, requests: VMSnapshotService
) -> None:
    await running(svc, cluster, hv, "web")
    op = await requests.snapshot("web", "s1")
    await requests.snaps.snapshot("web-data1", "s1")  # taken through the volume API meanwhile

    await agent(svc, requests, hv).run(await entry(svc.store, "web"))

    failed = await op_of(svc.store, op.id)
    assert failed.state is OpState.FAILED and "web-data1@s1 already exists" in failed.error
    # its own snapshot of web-boot is gone; the namesake taken meanwhile is not its own: kept
    assert await snapshot_names(requests, "web") == {"web-boot": [], "web-data1": ["s1"]}
    assert await hv.state("web") is RunState.RUNNING
    assert (await entry(svc.store, "web")).job is None


async def test_a_clone_interrupted_after_its_volumes_were_made_is_made_once(
    svc: VMService, cluster: Cluster, hv: FakeHypervisor, requests: VMSnapshotService
) -> None:
    await stopped_vm(svc, cluster, "src", data=1)
    op = await requests.clone("src", "twin", start=False)
    first = VMJobs("n1", hv, KilledBeforeStoring(svc, requests.snaps), svc.clock)
    with pytest.raises(asyncio.CancelledError):
        await first.run(await entry(svc.store, "src"))
    assert {v.name for v in await cluster.meta.volumes()} >= {"twin-boot", "twin-data1"}

    await agent(svc, requests, hv).run(await entry(svc.store, "src"))

    view = await read_cluster(svc.store)
    twin = view.vms["twin"].spec
    assert twin.op_id == op.id and twin.source == "clone of src"
    for vol in ("twin-boot", "twin-data1"):
        owner = (await cluster.meta.volume(vol))[0].owner
        assert owner is not None and owner.uid == twin.uuid
    assert view.vms["src"].job is None
    assert (await op_of(svc.store, op.id)).state is OpState.RUNNING


async def test_the_operation_of_a_job_is_not_ended_as_a_stray(
    svc: VMService, cluster: Cluster, requests: VMSnapshotService
) -> None:
    """The scheduler's sweep ends operations no spec names; a job's is named by its job (a
    clone's names a VM that does not exist yet)."""
    await stopped_vm(svc, cluster, "src")
    snap = await requests.snapshot("src", "s1")
    ended = await sweep_strays(svc.store, 0.0)
    assert ended == 0
    assert (await op_of(svc.store, snap.id)).state is OpState.RUNNING


async def test_the_reconciler_runs_a_job_before_a_start_requested_after_it(
    svc: VMService, cluster: Cluster, hv: FakeHypervisor, requests: VMSnapshotService
) -> None:
    await stopped_vm(svc, cluster, "web")
    await requests.snaps.snapshot("web-boot", "s0")
    rb = await requests.rollback("web", "s0")
    await svc.power("web", PowerOp.START)
    rec = Reconciler("n1", hv, None, svc.clock, agent(svc, requests, hv))  # type: ignore[arg-type]

    decisions = rec.run_pass(await read_cluster(svc.store), lease_held=True)

    assert [d.sentence for d in decisions] == [
        f"web has a job, rollback to snapshot s0 ({rb.id}): carrying it out"
    ]
    await rec.inflight["web"]
    assert (await op_of(svc.store, rb.id)).state is OpState.SUCCEEDED
    view = await read_cluster(svc.store)
    assert view.vms["web"].job is None and view.vm_state("web") is VMState.STOPPED


# ---- found by review: each failed before its fix -------------------------------------------


async def test_a_pass_on_a_view_read_before_the_job_ended_does_not_run_it_again(
    svc: VMService, cluster: Cluster, hv: FakeHypervisor, requests: VMSnapshotService
) -> None:
    """The rerun's undo deleted the finished snapshot, the operation saying it was taken."""
    await running(svc, cluster, hv, "web")
    op = await requests.snapshot("web", "s1")
    rec = Reconciler("n1", hv, None, svc.clock, agent(svc, requests, hv))  # type: ignore[arg-type]
    rec.run_pass(await read_cluster(svc.store), lease_held=True)
    stale = await read_cluster(svc.store)  # the next pass read its view here...
    await rec.inflight["web"]  # ...and the job ended before it decided

    rec.run_pass(stale, lease_held=True)
    await rec.inflight["web"]

    assert (await op_of(svc.store, op.id)).state is OpState.SUCCEEDED
    assert await snapshot_names(requests, "web") == {"web-boot": ["s1"], "web-data1": ["s1"]}
    assert [c for c in hv.calls if c[0] == "pause"] == [("pause", "web")]


class StoreDownAtData1(SnapshotService):
    async def snapshot(self, volume: str, name: str, *args: Any, **kw: Any) -> Any:
        if volume.endswith("data1"):
            raise StoreUnavailable("etcd txn: deadline exceeded")
        return await super().snapshot(volume, name, *args, **kw)


async def test_a_job_that_could_not_end_is_tried_again_after_a_back_off_not_every_pass(
    svc: VMService,
    cluster: Cluster,
    hv: FakeHypervisor,
    requests: VMSnapshotService,
    clock: FakeClock,
) -> None:
    await running(svc, cluster, hv, "web")
    op = await requests.snapshot("web", "s1")
    jobs = VMJobs("n1", hv, DiskCloner(svc, StoreDownAtData1(cluster.meta, cluster.pool)), clock)
    rec = Reconciler("n1", hv, None, clock, jobs)  # type: ignore[arg-type]
    rec.run_pass(await read_cluster(svc.store), lease_held=True)
    await rec.inflight["web"]

    again = rec.run_pass(await read_cluster(svc.store), lease_held=True)

    assert [d.sentence for d in again] == [
        f"web's job, snapshot s1 ({op.id}), is tried again later"
    ]
    assert rec.next_retry() is not None and "web" not in rec.inflight
    assert (await read_cluster(svc.store)).vms["web"].status.state is VMState.STOPPED  # type: ignore[union-attr]
    waiting = await op_of(svc.store, op.id)
    assert waiting.state is OpState.RUNNING and "trying again" in waiting.message
    assert await snapshot_names(requests, "web") == {"web-boot": ["s1"], "web-data1": []}
    await clock.advance(60)
    rec.jobs = agent(svc, requests, hv)  # the store answers again
    rec.run_pass(await read_cluster(svc.store), lease_held=True)
    await rec.inflight["web"]
    assert (await op_of(svc.store, op.id)).state is OpState.SUCCEEDED


class Data1RollbackFails(SnapshotService):
    async def rollback(self, volume: str, name: str) -> Any:
        if volume.endswith("data1"):
            raise Unavailable("extent e1: no replica answers")
        return await super().rollback(volume, name)


async def test_a_rollback_that_reached_one_disk_is_tried_again_and_a_start_waits_for_it(
    svc: VMService, cluster: Cluster, hv: FakeHypervisor, requests: VMSnapshotService
) -> None:
    """The rollback failed half-way and the start queued behind it booted mixed disks."""
    await stopped_vm(svc, cluster, "web", data=1)
    for vol in ("web-boot", "web-data1"):
        await requests.snaps.snapshot(vol, "s0")
    rb = await requests.rollback("web", "s0")
    await svc.power("web", PowerOp.START)
    cloner = DiskCloner(svc, Data1RollbackFails(cluster.meta, cluster.pool))
    rec = Reconciler("n1", hv, None, svc.clock, VMJobs("n1", hv, cloner, svc.clock))  # type: ignore[arg-type]
    rec.run_pass(await read_cluster(svc.store), lease_held=True)
    await rec.inflight["web"]

    assert (await op_of(svc.store, rb.id)).state is OpState.RUNNING
    decisions = rec.decide(await read_cluster(svc.store), {})
    assert "tried again later" in decisions[0].sentence  # not "starting it"


async def test_a_job_left_by_a_vm_deleted_before_jobs_blocks_nothing_and_its_op_ends(
    svc: VMService, cluster: Cluster, requests: VMSnapshotService
) -> None:
    await stopped_vm(svc, cluster, "web")
    old = await requests.snapshot("web", "s1")
    # deleted by a version that knows no jobs: its keys go, the job stays
    await cluster.meta.delete_volume("web-boot", (await cluster.meta.volume("web-boot"))[0].owner)
    for part in ("spec", "placement", "status"):
        await svc.store.delete(keys.vm_prefix("web") + part)
    await stopped_vm(svc, cluster, "web")  # a new VM of that name

    await sweep_strays(svc.store, 0.0)
    assert (await op_of(svc.store, old.id)).state is OpState.CANCELLED
    new = await requests.snapshot("web", "s2")  # the stale job is no obstacle
    assert (await entry(svc.store, "web")).job.op_id == new.id  # type: ignore[union-attr]


async def test_a_job_is_refused_while_the_vms_node_is_unreachable(
    store: MemoryStore, svc: VMService, cluster: Cluster, requests: VMSnapshotService
) -> None:
    await stopped_vm(svc, cluster, "web")
    await store.delete(keys.alive("n1"))
    before = await dump_store(store)
    with pytest.raises(Unavailable, match="node n1 is unreachable"):
        await requests.snapshot("web", "s1")
    assert await dump_store(store) == before


async def test_a_jobs_own_snapshots_are_not_listed_nor_deletable_while_it_runs(
    svc: VMService, cluster: Cluster, hv: FakeHypervisor, requests: VMSnapshotService
) -> None:
    await running(svc, cluster, hv, "web")
    await requests.snapshot("web", "s0")
    await agent(svc, requests, hv).run(await entry(svc.store, "web"))
    op = await requests.clone("web", "twin")
    tmp = clone_snapshot(op.id)
    await requests.snaps.snapshot("web-boot", tmp, op=op.id)  # the clone's, half made

    assert [s.name for s in await requests.snapshots("web")] == ["s0"]
    with pytest.raises(InvalidState, match=f"in use by {op.id}"):
        await requests.delete("web", tmp)


async def test_converting_a_vm_with_snapshots_is_refused_before_anything_is_made(
    store: MemoryStore, svc: VMService, cluster: Cluster, requests: VMSnapshotService
) -> None:
    """The template was stored, then the VM's delete failed on its snapshots."""
    await stopped_vm(svc, cluster, "web")
    await requests.snaps.snapshot("web-boot", "keep")
    before = await dump_store(store)
    with pytest.raises(InvalidState, match="web-boot has snapshots"):
        await requests.convert_to_template("web", "gold")
    assert await dump_store(store) == before
