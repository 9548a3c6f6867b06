"""The drain controller (``cluster.drain``) over the in-memory store, with fakes for the
migration request and the power path: the order of the moves, progress per VM, the end of
entering and exiting, and what a failure leaves."""

from __future__ import annotations

import pytest

from aecp.cluster.drain import Drain
from aecp.common.clock import Clock, FakeClock
from aecp.common.errors import AecpError, Conflict, InvalidState
from aecp.model.node import MaintenanceState, NodeAdmin
from aecp.model.operation import Operation, OpState, new_op_id
from aecp.model.vm import Placement, Power, PowerOp, VMSpec, VMState, VMStatus
from aecp.store import keys
from aecp.store.base import Store
from aecp.store.memory import MemoryStore
from aecp.store.typed import read
from aecp.store.view import ClusterView, VMEntry
from tests.unit.conftest import add_node


class Fakes:
    """``request_migration`` and ``VMService.power`` as the drain sees them: each call is
    recorded and stores a running operation (a stopped VM's move: succeeded, placement moved);
    ``finish`` plays the node agent ending it. ``refuse`` makes the next call raise."""

    def __init__(self, store: MemoryStore, clock: FakeClock) -> None:
        self.store, self.clock = store, clock
        self.calls: list[tuple[str, str | None]] = []  # (vm, target or "poweroff")
        self.ops: dict[str, Operation] = {}  # vm -> its latest operation
        self.refuse: AecpError | None = None

    async def migrate(
        self,
        store: Store,
        entry: VMEntry,
        view: ClusterView,
        target: str | None,
        clock: Clock,
        *,
        reason: str = "",
    ) -> Operation:
        self._refused()
        name = entry.spec.name
        self.calls.append((name, target))
        op = self._op("vm.migrate", name)
        if view.vm_state(name) is VMState.STOPPED:
            op = op.succeed("moved", clock.wall())
            await place(self.store, name, target or "")
        await self.store.put(keys.op(op.id), op.dump())
        return op

    async def power(self, name: str, op: PowerOp) -> Operation:
        self._refused()
        assert op is PowerOp.POWEROFF
        self.calls.append((name, "poweroff"))
        new = self._op("vm.poweroff", name)
        await self.store.put(keys.op(new.id), new.dump())
        return new

    async def finish(self, vm: str, to: str = "", error: str = "") -> None:
        """End ``vm``'s operation: the VM moved to ``to`` (or powered off), or ``error``."""
        op = self.ops[vm]
        if error:
            ended = op.fail(error, self.clock.wall())
        else:
            ended = op.succeed("done", self.clock.wall())
            if op.kind == "vm.poweroff":
                await set_vm(self.store, vm, state=VMState.STOPPED, power=Power.STOPPED)
            else:
                await place(self.store, vm, to)
        await self.store.put(keys.op(op.id), ended.dump())

    def _op(self, kind: str, vm: str) -> Operation:
        now = self.clock.wall()
        op = Operation(id=new_op_id(), kind=kind, target=vm, created_at=now, updated_at=now)
        self.ops[vm] = op
        return op

    def _refused(self) -> None:
        if self.refuse is not None:
            exc, self.refuse = self.refuse, None
            raise exc


async def place(store: MemoryStore, vm: str, node: str) -> None:
    await store.put(keys.vm_placement(vm), Placement(node=node, at=1).dump())
    got = await read(store, keys.vm_status(vm), VMStatus)
    assert got is not None
    await store.put(keys.vm_status(vm), got[0].model_copy(update={"node": node}).dump())


async def set_vm(
    store: MemoryStore, vm: str, state: VMState | None = None, power: Power | None = None
) -> None:
    spec = (await read(store, keys.vm_spec(vm), VMSpec))[0]  # type: ignore[index]
    status = (await read(store, keys.vm_status(vm), VMStatus))[0]  # type: ignore[index]
    if power is not None:
        await store.put(keys.vm_spec(vm), spec.model_copy(update={"power": power}).dump())
    if state is not None:
        await store.put(keys.vm_status(vm), status.model_copy(update={"state": state}).dump())


async def add_vm(
    store: MemoryStore,
    name: str,
    mem: int,
    on: str = "n1",
    state: VMState = VMState.RUNNING,
    pin: str | None = None,
) -> None:
    power = Power.STOPPED if state is VMState.STOPPED else Power.RUNNING
    spec = VMSpec(
        name=name, uuid=f"u-{name}", image="t", vcpus=1, memory_mib=mem, power=power, node=pin
    )
    await store.put(keys.vm_spec(name), spec.dump())
    await store.put(keys.vm_placement(name), Placement(node=on, at=1).dump())
    await store.put(keys.vm_status(name), VMStatus(state=state, node=on).dump())


async def request(store: MemoryStore, state: MaintenanceState, **fields: object) -> str:
    """The API's request: node n1 in ``state`` with a running node.maintenance operation."""
    op = Operation(id=new_op_id(), kind="node.maintenance", target="n1", created_at=1, updated_at=1)
    await store.put(keys.op(op.id), op.dump())
    admin = NodeAdmin(maintenance=state, maintenance_since=1, maintenance_op=op.id, **fields)
    await store.put(keys.node_admin("n1"), admin.dump())
    return op.id


async def admin(store: MemoryStore) -> NodeAdmin:
    return (await read(store, keys.node_admin("n1"), NodeAdmin))[0]  # type: ignore[index]


async def op(store: MemoryStore, op_id: str) -> Operation:
    return (await read(store, keys.op(op_id), Operation))[0]  # type: ignore[index]


@pytest.fixture
async def drain(store: MemoryStore, clock: FakeClock) -> tuple[Drain, Fakes]:
    for n in ("n1", "n2", "n3"):
        await add_node(store, n, memory_mib=2048)
    fakes = Fakes(store, clock)
    return Drain(store, fakes.power, clock, migrate=fakes.migrate), fakes


async def sentences(d: Drain) -> list[str]:
    return [x.sentence for x in await d.run_pass()]


async def test_running_vms_leave_one_at_a_time_largest_first_then_stopped_ones_move(
    drain: tuple[Drain, Fakes], store: MemoryStore
) -> None:
    d, fakes = drain
    await add_vm(store, "small", 300)
    await add_vm(store, "big", 700)
    await add_vm(store, "mid", 500)
    await add_vm(store, "off", 200, state=VMState.STOPPED)
    op_id = await request(store, MaintenanceState.ENTERING)
    assert await sentences(d) == [f"migrating big to n2 (1 of 4) as {fakes.ops['big'].id}"]
    assert (await op(store, op_id)).message == "migrating big to n2 (1 of 4)"
    assert (await sentences(d))[0].startswith("waiting for vm.migrate of VM big")
    assert fakes.calls == [("big", "n2")]  # one at a time
    await fakes.finish("big", "n2")
    assert await sentences(d) == ["vm.migrate of VM big succeeded"]
    assert await sentences(d) == [f"migrating mid to n3 (2 of 4) as {fakes.ops['mid'].id}"]
    await fakes.finish("mid", "n3")
    await d.run_pass()
    await d.run_pass()
    await fakes.finish("small", "n3")  # n3 has 2048 - 500, n2 2048 - 700
    await d.run_pass()
    assert await sentences(d) == ["moved stopped VM off to n2 (4 of 4)"]
    assert fakes.calls == [("big", "n2"), ("mid", "n3"), ("small", "n3"), ("off", "n2")]
    [said] = await sentences(d)
    assert said == "n1 is in maintenance (moved live: big, mid, small; moved stopped: off)"
    got = await admin(store)
    assert got.maintenance is MaintenanceState.MAINTENANCE
    assert got.evacuated == ["big", "mid", "small"] and got.cold_moved == ["off"]
    ended = await op(store, op_id)
    assert ended.state is OpState.SUCCEEDED and ended.message == said
    assert await d.run_pass() == []  # nothing more to do


async def test_a_failed_migration_ends_entering_and_the_node_is_back_in_use(
    drain: tuple[Drain, Fakes], store: MemoryStore
) -> None:
    d, fakes = drain
    await add_vm(store, "a", 700)
    await add_vm(store, "b", 300)
    op_id = await request(store, MaintenanceState.ENTERING)
    await d.run_pass()
    await fakes.finish("a", "n2")
    await d.run_pass()
    await d.run_pass()
    await fakes.finish("b", error="destination died")
    [said] = await sentences(d)
    assert said == (
        "entering maintenance failed: migrating b failed: destination died; n1 is back in use "
        "(moved before, staying where they are: a)"
    )
    got = await admin(store)
    assert got.maintenance is MaintenanceState.IN_USE and got.maintenance_error
    assert not got.drain_op
    ended = await op(store, op_id)
    assert ended.state is OpState.FAILED and ended.error == said
    assert await d.run_pass() == []


async def test_unmigratable_vms_are_powered_off_when_asked_and_stay_stopped(
    drain: tuple[Drain, Fakes], store: MemoryStore
) -> None:
    d, fakes = drain
    await add_vm(store, "pinned", 256, pin="n1")
    op_id = await request(store, MaintenanceState.ENTERING, shutdown_unmigratable=True)
    [said] = await sentences(d)
    assert said.startswith("powering off pinned (VM pinned is pinned to n1: it cannot run")
    assert fakes.calls == [("pinned", "poweroff")]
    await fakes.finish("pinned")
    assert await sentences(d) == ["vm.poweroff of VM pinned succeeded"]
    [said] = await sentences(d)
    assert said == "n1 is in maintenance (powered off: pinned; stay, stopped: pinned)"
    assert (await op(store, op_id)).state is OpState.SUCCEEDED


async def test_a_vm_that_becomes_unmovable_ends_entering_with_its_reason(
    drain: tuple[Drain, Fakes], store: MemoryStore
) -> None:
    d, _ = drain
    await add_vm(store, "web", 256)
    await set_vm(store, "web", state=VMState.PAUSED, power=Power.PAUSED)
    op_id = await request(store, MaintenanceState.ENTERING)
    [said] = await sentences(d)
    assert said.startswith("entering maintenance failed: VM web is suspended")
    assert (await op(store, op_id)).state is OpState.FAILED


async def test_a_busy_vm_is_waited_for_and_a_refusal_that_may_pass_is_tried_again(
    drain: tuple[Drain, Fakes], store: MemoryStore
) -> None:
    d, fakes = drain
    await add_vm(store, "web", 256, state=VMState.STARTING)
    op_id = await request(store, MaintenanceState.ENTERING)
    assert await sentences(d) == ["waiting: VM web is starting: wait for it to settle"]
    assert (await op(store, op_id)).message.startswith("waiting: VM web is starting")
    await set_vm(store, "web", state=VMState.RUNNING)
    fakes.refuse = Conflict("VM web changed while the request was made; try again")
    [said] = await sentences(d)
    assert said.startswith("live-migrate of VM web not asked now, will try again")
    assert (await admin(store)).maintenance is MaintenanceState.ENTERING
    fakes.refuse = InvalidState("VM web is suspended")  # a refusal that will not pass
    [said] = await sentences(d)
    assert said.startswith("entering maintenance failed: VM web: VM web is suspended")


async def test_exit_returns_the_node_to_use(drain: tuple[Drain, Fakes], store: MemoryStore) -> None:
    d, fakes = drain
    op_id = await request(store, MaintenanceState.EXITING, evacuated=["a"])
    assert await sentences(d) == ["n1 is back in use"]
    got = await admin(store)
    assert got.in_use and got.evacuated == [] and got.maintenance_since == 0
    assert (await op(store, op_id)).state is OpState.SUCCEEDED
    assert fakes.calls == []


async def test_exit_with_restore_moves_the_evacuated_vms_back_one_at_a_time(
    drain: tuple[Drain, Fakes], store: MemoryStore
) -> None:
    d, fakes = drain
    await add_vm(store, "a", 700, on="n2")
    await add_vm(store, "b", 300, on="n3")
    await add_vm(store, "c", 300, on="n3", state=VMState.STOPPED)  # stopped since: stays
    evacuated = ["a", "gone", "c", "b"]  # "gone" was deleted since
    op_id = await request(store, MaintenanceState.EXITING, evacuated=evacuated, restore_vms=True)
    [said] = await sentences(d)
    assert said == "n1 is back in use; moving 3 VMs back: a, c, b"
    assert (await admin(store)).in_use  # new VMs may go to it at once
    assert await sentences(d) == [f"moving VM a back as {fakes.ops['a'].id}"]
    assert fakes.calls == [("a", "n1")]
    await d.run_pass()  # still going
    await fakes.finish("a", "n1")
    assert await sentences(d) == ["VM a moved back"]
    assert await sentences(d) == ["VM c not moved back: it is stopped, not running"]
    await d.run_pass()
    assert fakes.calls == [("a", "n1"), ("b", "n1")]
    await fakes.finish("b", error="cancelled by a user")
    [said] = await sentences(d)
    assert said == "n1 is back in use; not moved back: b: cancelled by a user"
    ended = await op(store, op_id)
    assert ended.state is OpState.FAILED
    got = await admin(store)
    assert got.in_use and got.restoring == [] and not got.drain_op
    assert await d.run_pass() == []
