"""The live migration state machine (``node.migration``) on the memory store, two fake
hypervisors and the fake clock, with a stand-in for the storage servers' hand-off; and the
requests (``cluster.migrations``): what is refused, and that a refusal changes nothing."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest

from aecp.cluster import migrations
from aecp.cluster.vms import VMService
from aecp.common.clock import FakeClock
from aecp.common.errors import (
    InvalidInput,
    InvalidState,
    NoCapacity,
    NotFound,
    StoreUnavailable,
)
from aecp.compute.fake import FailingLaunchHypervisor, FakeHypervisor
from aecp.compute.hypervisor import Accel, DiskSpec, InstanceSpec, MigrationParams, RunState
from aecp.model.migration import Incoming, MigrationMark, Phase
from aecp.model.node import MaintenanceState, NodeAdmin
from aecp.model.operation import Operation, OpState
from aecp.model.vm import Placement, Power, PowerOp, VMCreate, VMSpec, VMState, VMStatus
from aecp.model.vmjob import JobKind, VMJob
from aecp.node.migration import MigrationConfig, Migrator
from aecp.node.vmops import VMActions
from aecp.storage.handoff import Handoff, HandoffDone
from aecp.storage.meta.model import AttachRecord
from aecp.store import keys
from aecp.store.memory import MemoryStore
from aecp.store.typed import read
from aecp.store.view import read_cluster
from tests.unit.conftest import add_node, dump_store

VM = "web1"


class Disks:
    """Two disks that exist (what ``receive`` asks of the disk provider)."""

    def disks(self, spec: VMSpec) -> tuple[DiskSpec, ...]:
        return tuple(DiskSpec(path=f"nbd+unix:///{v}", format="raw") for v in spec.volumes())

    async def reuse(self, spec: VMSpec) -> tuple[DiskSpec, ...]:
        return self.disks(spec)

    async def prepare(self, spec: VMSpec, *_: Any) -> tuple[DiskSpec, ...]:
        return self.disks(spec)

    async def released(self, spec: VMSpec) -> None:
        return None

    async def remove(self, spec: VMSpec) -> list[str]:
        return []


def migrator(name: str, store: MemoryStore, hv: FakeHypervisor, clock: FakeClock) -> Migrator:
    actions = VMActions(
        name, "127.0.0.1", store, hv, Disks(), Path("/nonexistent"), Accel.TCG, clock
    )
    config = MigrationConfig("127.0.0.1", MigrationParams(1 << 30, 300), timeout=60)
    return Migrator(name, store, hv, actions, Disks(), config, clock)


async def stored_vm(store: MemoryStore, clock: FakeClock, power: Power = Power.RUNNING) -> VMSpec:
    spec = VMSpec.from_create(
        VMCreate(name=VM, image="tiny", memory_mib=256, data_disks_mib=[16]), "op-create", 1.0
    ).model_copy(update={"power": power})
    await store.put(keys.vm_spec(VM), spec.dump())
    await store.put(keys.vm_placement(VM), Placement(node="n1", at=1.0).dump())
    state = VMState.RUNNING if power is Power.RUNNING else VMState.STOPPED
    status = VMStatus(state=state, node="n1", updated_at=1.0, disks_ready=True)
    await store.put(keys.vm_status(VM), status.dump())
    if power is not Power.STOPPED:  # its disks are attached where its QEMU runs
        for v in spec.volumes():
            await store.put(keys.abs_attach(v), attached(v, "n1").dump())
    return spec


def attached(volume: str, node: str) -> AttachRecord:
    return AttachRecord(volume=volume, node=node, epoch=1, at=1.0)


async def answer_handoffs(
    store: MemoryStore, seen: list[Handoff], ok: Callable[[Handoff], bool] = lambda _: True
) -> None:
    """The storage servers: answer every hand-off (``ok`` decides how), noting it."""
    async with store.watch(keys.ABS_HANDOFFS) as events:
        async for ev in events:
            if ev.value is None:
                continue
            h = Handoff.load(ev.value)
            seen.append(h)
            good = ok(h)
            if good:  # the storage server named attached it
                await store.put(keys.abs_attach(h.volume), attached(h.volume, h.to).dump())
            done = HandoffDone(
                volume=h.volume, node=h.to, op=h.op, ok=good, epoch=7 if good else 0,
                error="" if good else "refused", at=1.0,
            )  # fmt: skip
            await store.put(keys.abs_handoff_done(h.volume), done.dump())


class World:
    """Two nodes, n1 running the VM, n2 free, the hand-off answered."""

    def __init__(self, store: MemoryStore, clock: FakeClock, dest: FakeHypervisor) -> None:
        self.store, self.clock = store, clock
        self.src_hv, self.dst_hv = FakeHypervisor(), dest
        self.src = migrator("n1", store, self.src_hv, clock)
        self.dst = migrator("n2", store, self.dst_hv, clock)
        self.handoffs: list[Handoff] = []

    async def request(self, target: str | None = "n2") -> Operation:
        view = await read_cluster(self.store)
        return await migrations.request_migration(
            self.store, view.vms[VM], view, target, self.clock
        )

    async def entry(self) -> Any:
        return (await read_cluster(self.store)).vms[VM]

    async def drive(
        self, task: asyncio.Task[None], until: Callable[[], bool] = lambda: False
    ) -> None:
        """Let virtual time pass (the source polls QEMU) until ``task`` ends or ``until``."""
        for _ in range(10_000):
            if task.done() or until():
                return
            await self.clock.advance(0.01)
        raise AssertionError("the migration never ended")

    async def op(self, op_id: str) -> Operation:
        got = await read(self.store, keys.op(op_id), Operation)
        assert got is not None
        return got[0]


@pytest.fixture
async def world(store: MemoryStore, clock: FakeClock) -> AsyncIterator[World]:
    for n in ("n1", "n2"):
        await add_node(store, n)
    spec = await stored_vm(store, clock)
    w = World(store, clock, FakeHypervisor())
    await w.src_hv.start(InstanceSpec(VM, spec.uuid, 1, 256, Disks().disks(spec)))
    responder = asyncio.create_task(answer_handoffs(store, w.handoffs))
    yield w
    responder.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await responder


async def migrate(w: World, before_switch: Callable[[], Any] | None = None) -> Operation:
    op = await w.request()
    e = await w.entry()
    task = asyncio.create_task(w.src.run_source(e))
    await w.dst.receive(e)  # the destination's reconciler, seeing the job
    if before_switch is not None:
        await before_switch()
    await w.drive(task)
    await task
    return await w.op(op.id)


async def test_a_migration_moves_the_placement_and_cleans_up(world: World) -> None:
    op = await migrate(world)
    assert op.state is OpState.SUCCEEDED, op
    assert "moved live from n1 to n2" in op.message and op.detail["downtime_ms"] == 5
    e = await world.entry()
    assert e.node == "n2" and e.job is None
    assert world.src_hv.instances() == []  # powered off on the source
    assert [i.state for i in world.dst_hv.instances()] == [RunState.RUNNING]
    for key in (keys.vm_migration(VM), keys.vm_incoming(VM), keys.abs_handoff(f"{VM}-boot")):
        assert await world.store.get(key) is None, key


async def test_a_cancel_during_the_transfer_leaves_the_vm_on_its_source(world: World) -> None:
    world.src_hv.active_polls = 10_000
    op = await world.request()
    e = await world.entry()
    task = asyncio.create_task(world.src.run_source(e))
    await world.dst.receive(e)
    await world.drive(task, until=lambda: world.src_hv.calls.count(("migrate", VM)) == 1)
    await migrations.cancel(world.store, op.id, world.clock)
    await world.drive(task)
    await task
    ended = await world.op(op.id)
    assert ended.state is OpState.CANCELLED and "runs on n1" in ended.error, ended
    assert (await world.entry()).node == "n1"
    assert await world.src_hv.state(VM) is RunState.RUNNING
    with pytest.raises(InvalidState, match="has ended"):
        await migrations.cancel(world.store, op.id, world.clock)


async def test_a_destination_that_dies_mid_transfer_fails_the_migration(world: World) -> None:
    world.src_hv.active_polls = 10_000

    async def kill_destination() -> None:
        world.dst_hv.crash(VM)

    op = await migrate(world, before_switch=kill_destination)
    assert op.state is OpState.FAILED and "runs on n1" in op.error, op
    assert (await world.entry()).node == "n1"
    assert await world.src_hv.state(VM) is RunState.RUNNING


async def test_a_destination_that_cannot_start_fails_the_migration(
    store: MemoryStore, clock: FakeClock, world: World
) -> None:
    world.dst_hv = FailingLaunchHypervisor()
    world.dst = migrator("n2", store, world.dst_hv, clock)
    op = await migrate(world)
    assert op.state is OpState.FAILED and "cannot receive it" in op.error, op
    assert await world.src_hv.state(VM) is RunState.RUNNING


async def test_a_refused_hand_off_cancels_and_the_guest_runs_on(
    store: MemoryStore, clock: FakeClock
) -> None:
    for n in ("n1", "n2"):
        await add_node(store, n)
    spec = await stored_vm(store, clock)
    w = World(store, clock, FakeHypervisor())
    await w.src_hv.start(InstanceSpec(VM, spec.uuid, 1, 256, Disks().disks(spec)))
    boot_only = asyncio.create_task(
        answer_handoffs(store, w.handoffs, lambda h: h.volume.endswith("boot"))
    )
    try:
        op = await migrate(w)
        assert op.state is OpState.FAILED and "hand-off to n2 failed" in op.error, op
        # the boot disk had been handed over: it was taken back before the guest resumed
        assert [(h.volume, h.to) for h in w.handoffs if h.to == "n1"] == [(f"{VM}-boot", "n1")]
        assert await store.get(keys.abs_handoff_done(f"{VM}-boot")) is None  # cleaned up
        assert ("migrate_cancel", VM) in w.src_hv.calls
        assert await w.src_hv.state(VM) is RunState.RUNNING
        assert (await w.entry()).node == "n1"
    finally:
        boot_only.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await boot_only


class DiesAtTheSwitchOver(FakeHypervisor):
    """``migrate_continue`` never returns: the agent dies there (the disks handed over)."""

    def __init__(self) -> None:
        super().__init__()
        self.entered = asyncio.Event()

    async def migrate_continue(self, name: str) -> None:
        self.entered.set()
        await asyncio.Event().wait()


async def test_an_agent_restarted_after_the_hand_off_takes_the_disks_back(
    store: MemoryStore, clock: FakeClock
) -> None:
    """The source agent dies at pre-switchover with the disks handed over: the next one
    takes them back, cancels, and the VM runs on at the source."""
    for n in ("n1", "n2"):
        await add_node(store, n)
    spec = await stored_vm(store, clock)
    w = World(store, clock, FakeHypervisor())
    w.src_hv = DiesAtTheSwitchOver()
    w.src = migrator("n1", store, w.src_hv, clock)
    await w.src_hv.start(InstanceSpec(VM, spec.uuid, 1, 256, Disks().disks(spec)))
    responder = asyncio.create_task(answer_handoffs(store, w.handoffs))
    try:
        op = await w.request()
        e = await w.entry()
        task = asyncio.create_task(w.src.run_source(e))
        await w.dst.receive(e)
        await w.drive(task, until=w.src_hv.entered.is_set)
        task.cancel()  # the agent dies here
        with contextlib.suppress(asyncio.CancelledError):
            await task
        mark = await read(store, keys.vm_migration(VM), MigrationMark)
        assert mark is not None and mark[0].phase is Phase.HANDOFF
        done = await read(store, keys.abs_handoff_done(f"{VM}-boot"), HandoffDone)
        assert done is not None and done[0].node == "n2"
        again = migrator("n1", store, w.src_hv, clock)
        rerun = asyncio.create_task(again.run_source(await w.entry()))
        await w.drive(rerun)
        await rerun
        ended = await w.op(op.id)
        assert ended.state is OpState.FAILED and "agent restarted" in ended.error, ended
        assert handed_back_to(w, "n1")
        assert await w.src_hv.state(VM) is RunState.RUNNING
        assert (await w.entry()).node == "n1"
    finally:
        responder.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await responder


def handed_back_to(w: World, node: str) -> bool:
    back = {h.volume for h in w.handoffs if h.to == node}
    return ("migrate_cancel", VM) in w.src_hv.calls and back == set(w_volumes())


def w_volumes() -> list[str]:
    return [f"{VM}-boot", f"{VM}-data1"]


async def test_an_agent_restarted_after_qemu_completed_finishes_the_move(world: World) -> None:
    op = await world.request()
    e = await world.entry()
    await world.dst.receive(e)
    incoming = await read(world.store, keys.vm_incoming(VM), Incoming)
    assert incoming is not None
    await world.src_hv.migrate(VM, incoming[0].uri, MigrationParams(1, 1))
    while (await world.src_hv.migration(VM)).status != "pre-switchover":
        pass
    await world.src_hv.migrate_continue(VM)  # QEMU completed while no agent watched
    mark = MigrationMark(op=op.id, phase=Phase.HANDOFF, target="n2", at=1.0)
    await world.store.put(keys.vm_migration(VM), mark.dump())
    again = migrator("n1", world.store, world.src_hv, world.clock)
    await again.run_source(e)
    assert (await world.op(op.id)).state is OpState.SUCCEEDED
    assert (await world.entry()).node == "n2"


# ---- requests -------------------------------------------------------------------------------


async def refused(w: World, target: str | None, exc: type[Exception], words: str) -> None:
    before = await dump_store(w.store)
    with pytest.raises(exc, match=words):
        await w.request(target)
    assert await dump_store(w.store) == before


async def test_bad_requests_are_refused_and_change_nothing(
    store: MemoryStore, clock: FakeClock, world: World
) -> None:
    await refused(world, "n1", InvalidInput, "already runs on n1")
    await refused(world, "n9", NotFound, "node n9 does not exist")
    await refused(world, "bad name", InvalidInput, "not a valid name")
    await add_node(store, "n3", alive=False)
    await refused(world, "n3", Exception, "not ready")
    await add_node(store, "n4", memory_mib=128)
    await refused(world, "n4", NoCapacity, "MiB free")
    before = await dump_store(store)
    view = await read_cluster(store)
    with pytest.raises(InvalidInput, match="bandwidth_mib_s"):
        await migrations.request_migration(
            store, view.vms[VM], view, "n2", clock, bandwidth_mib_s=-1
        )
    assert await dump_store(store) == before
    op = await world.request("n2")
    await refused(world, "n2", InvalidState, "in progress")
    assert (await world.op(op.id)).kind == "vm.migrate"


async def test_a_suspended_vm_is_not_live_migrated(store: MemoryStore, clock: FakeClock) -> None:
    for n in ("n1", "n2"):
        await add_node(store, n)
    spec = await stored_vm(store, clock, power=Power.PAUSED)
    status = VMStatus(state=VMState.PAUSED, node="n1", updated_at=1.0)
    await store.put(keys.vm_status(VM), status.dump())
    w = World(store, clock, FakeHypervisor())
    await refused(w, "n2", InvalidState, "suspended")
    assert spec.power is Power.PAUSED


async def test_a_stopped_vm_moves_cold_at_once_unless_a_disk_is_attached(
    store: MemoryStore, clock: FakeClock
) -> None:
    for n in ("n1", "n2"):
        await add_node(store, n)
    await stored_vm(store, clock, power=Power.STOPPED)
    w = World(store, clock, FakeHypervisor())
    await store.put(keys.abs_attach(f"{VM}-boot"), b"{}")
    await refused(w, "n2", InvalidState, "still attached")
    await store.delete(keys.abs_attach(f"{VM}-boot"))
    op = await w.request(None)
    assert op.state is OpState.SUCCEEDED and "nothing copied" in op.message
    assert (await w.entry()).node == "n2"


async def test_only_running_migrations_can_be_cancelled(
    store: MemoryStore, clock: FakeClock
) -> None:
    with pytest.raises(NotFound):
        await migrations.cancel(store, "op-none", clock)
    other = Operation(id="op-1", kind="vm.start", target=VM, created_at=1.0, updated_at=1.0)
    await store.put(keys.op(other.id), other.dump())
    with pytest.raises(InvalidState, match="cannot be cancelled"):
        await migrations.cancel(store, other.id, clock)
    job = VMJob(
        vm=VM, vm_uuid="u", kind=JobKind.MIGRATE, op_id="x", source="n1", target="n2",
        created_at=1.0,
    )  # fmt: skip
    assert job.describe() == "live migration from n1 to n2"


async def test_a_stopped_vm_on_a_node_in_maintenance_is_not_started_there(
    store: MemoryStore, clock: FakeClock, images_dir: Path
) -> None:
    for n in ("n1", "n2"):
        await add_node(store, n)
    await stored_vm(store, clock, power=Power.STOPPED)
    admin = NodeAdmin(maintenance=MaintenanceState.MAINTENANCE)
    await store.put(keys.node_admin("n1"), admin.dump())
    before = await dump_store(store)
    with pytest.raises(InvalidState, match="n1, which is maintenance"):
        await VMService(store, images_dir, clock).power(VM, PowerOp.START)
    assert await dump_store(store) == before


class LosesTheCompletedMark(Migrator):
    """The store fails once, right after QEMU completed the switch-over."""

    failed = False

    async def _mark(self, job: VMJob, phase: Phase) -> None:
        if phase is Phase.COMPLETED and not self.failed:
            self.failed = True
            raise StoreUnavailable("etcd did not answer in time")
        await super()._mark(job, phase)


async def test_an_error_after_the_switch_over_never_rolls_the_move_back(world: World) -> None:
    """QEMU completed: the VM runs on the destination. An error then (the store, once) must
    not hand the disks back or resume the source: the migration ends as succeeded."""
    src = migrator("n1", world.store, world.src_hv, world.clock)
    world.src = LosesTheCompletedMark(
        src.node, src.store, src.hv, src.actions, src.disks, src.config, src.clock
    )
    op = await migrate(world)
    assert op.state is OpState.SUCCEEDED, op
    assert (await world.entry()).node == "n2"
    assert [h.to for h in world.handoffs] == ["n2", "n2"]  # nothing taken back
    assert world.src_hv.instances() == []
    assert [i.state for i in world.dst_hv.instances()] == [RunState.RUNNING]
