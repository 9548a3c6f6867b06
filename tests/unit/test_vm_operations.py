"""Every VM operation ends (succeeded, failed with its reason, or cancelled saying why), a failed
action leaves the VM in a state that says so and backs off, and a deleted VM takes its files
and its open operations with it. Requests go through the API's service; the node's reconciler
carries them out over the memory store and the fake hypervisor."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from aecp.common.clock import FakeClock
from aecp.common.errors import LaunchError
from aecp.compute.fake import FakeHypervisor
from aecp.compute.hypervisor import EventKind, InstanceEvent, InstanceSpec
from aecp.model.operation import Operation, OpState
from aecp.model.vm import Power, PowerOp, VMCreate, VMState
from aecp.node.reconciler import RETRY_MAX
from aecp.store import keys
from aecp.store.memory import MemoryStore
from aecp.store.opsend import sweep_strays
from tests.unit.conftest import add_node
from tests.unit.vmstack import Stack


class FlakyLaunchHypervisor(FakeHypervisor):
    """``start`` fails with ``error`` while it is set."""

    error = ""

    def _launch(self, spec: InstanceSpec) -> None:
        if self.error:
            raise LaunchError(self.error, exit_code=1, argv=["qemu"], output="")


@pytest.fixture
async def stack(store: MemoryStore, clock: FakeClock, images_dir: Path) -> Stack:
    await add_node(store, "n1")
    return Stack(store, clock, images_dir)


def flaky(stack: Stack) -> FlakyLaunchHypervisor:
    hv = FlakyLaunchHypervisor()
    stack.hv = stack.actions.hv = stack.rec.hv = hv
    return hv


async def running(stack: Stack, name: str = "vm1") -> None:
    await stack.add_vm(name)
    await stack.converge()
    assert await stack.state(name) is VMState.RUNNING


async def test_a_later_power_request_cancels_the_running_one_as_superseded(stack: Stack) -> None:
    await running(stack)
    first = await stack.svc.power("vm1", PowerOp.SHUTDOWN)
    second = await stack.svc.power("vm1", PowerOp.POWEROFF)
    old = await stack.op(first.id)
    assert old.state is OpState.CANCELLED
    assert old.error == f"superseded by {second.id}" and old.superseded_by == second.id
    await stack.converge()
    assert (await stack.op(second.id)).state is OpState.SUCCEEDED


async def test_a_shutdown_overtaken_by_a_start_ends_cancelled_and_the_vm_runs(
    stack: Stack,
) -> None:
    """The agent finishing an operation just superseded leaves it cancelled; and the guest's
    power-off in answer to our ACPI press is not taken for the guest's own decision."""
    await running(stack)
    shutdown = await stack.svc.power("vm1", PowerOp.SHUTDOWN)
    await stack.run_pass()  # the ACPI shutdown is under way ...
    start = await stack.svc.power("vm1", PowerOp.START)  # ... when a start overtakes it
    await stack.settle()
    await stack.converge()
    assert (await stack.op(shutdown.id)).state is OpState.CANCELLED
    assert (await stack.op(start.id)).state is OpState.SUCCEEDED
    assert await stack.state("vm1") is VMState.RUNNING


def test_a_power_off_the_guest_did_in_answer_to_our_acpi_press_is_not_its_own(
    stack: Stack,
) -> None:
    asked = InstanceEvent("vm1", EventKind.GUEST_SHUTDOWN, {"requested": True})
    stack.rec.note_event(asked)
    assert stack.rec.guest_off == set()
    stack.rec.note_event(InstanceEvent("vm1", EventKind.GUEST_SHUTDOWN, {"requested": False}))
    assert stack.rec.guest_off == {"vm1"}


async def test_a_failed_action_fails_its_own_operation_not_a_later_one(stack: Stack) -> None:
    await stack.add_vm("vm1", Power.STOPPED)
    await stack.converge()
    flaky(stack).error = "QEMU failed to launch vm1"
    start = await stack.svc.power("vm1", PowerOp.START)
    await stack.run_pass()  # the start is under way ...
    poweroff = await stack.svc.power("vm1", PowerOp.POWEROFF)  # ... and fails after this
    await stack.settle()
    assert (await stack.op(start.id)).state is OpState.CANCELLED
    await stack.converge()
    assert (await stack.op(poweroff.id)).state is OpState.SUCCEEDED
    assert await stack.state("vm1") is VMState.STOPPED


async def test_a_failing_start_shows_error_and_its_operation_says_it_is_retried(
    stack: Stack,
) -> None:
    await stack.add_vm("vm1", Power.STOPPED)
    await stack.converge()
    flaky(stack).error = "QEMU failed to launch vm1: no such disk"
    op = await stack.svc.power("vm1", PowerOp.START)
    await stack.reconcile()
    status = await stack.status("vm1")
    assert status is not None and status.state is VMState.ERROR
    assert "no such disk" in status.message and status.failed_op == op.id
    retrying = await stack.op(op.id)
    assert retrying.state is OpState.RUNNING
    assert retrying.message.startswith("retrying: QEMU failed to launch vm1: no such disk")
    assert retrying.message.endswith("(attempt 1, next in 1 s)")


async def test_a_failing_action_backs_off_doubling_up_to_a_bound(
    stack: Stack, clock: FakeClock
) -> None:
    flaky(stack).error = "QEMU failed to launch vm1"
    await stack.add_vm("vm1")
    delays = []
    for _ in range(9):
        await stack.reconcile()
        failure = stack.rec.failures["vm1"]
        delays.append(failure.retry_at - clock.monotonic())
        [waiting] = await stack.reconcile()
        assert waiting.startswith("vm1 failed (QEMU failed to launch vm1") and "later" in waiting
        await clock.advance(delays[-1])
    assert delays == [1, 2, 4, 8, 16, 32, RETRY_MAX, RETRY_MAX, RETRY_MAX]


async def test_a_new_request_retries_a_failed_action_at_once(stack: Stack) -> None:
    hv = flaky(stack)
    hv.error = "QEMU failed to launch vm1"
    await stack.add_vm("vm1", Power.STOPPED)
    await stack.converge()
    await stack.svc.power("vm1", PowerOp.START)
    await stack.reconcile()  # fails, backs off
    hv.error = ""
    await stack.svc.power("vm1", PowerOp.POWEROFF)
    again = await stack.svc.power("vm1", PowerOp.START)
    await stack.converge()
    assert (await stack.op(again.id)).state is OpState.SUCCEEDED
    assert await stack.state("vm1") is VMState.RUNNING


async def test_a_failing_action_is_logged_once_per_change_of_its_reason_without_traceback(
    stack: Stack, clock: FakeClock, caplog: pytest.LogCaptureFixture
) -> None:
    hv = flaky(stack)
    hv.error = "QEMU failed to launch vm1: disk A"
    await stack.add_vm("vm1")
    caplog.set_level(logging.DEBUG, logger="aecp.node.reconciler")
    for attempt in range(6):
        if attempt == 3:
            hv.error = "QEMU failed to launch vm1: disk B"
        await stack.reconcile()
        await clock.advance(RETRY_MAX)
    errors = [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert [("disk A" in r.getMessage(), "disk B" in r.getMessage()) for r in errors] == [
        (True, False),
        (False, True),
    ]
    assert not any(r.exc_info for r in errors)


async def test_a_vm_whose_delete_fails_shows_error_and_can_be_deleted_again(
    stack: Stack,
) -> None:
    await stack.add_vm("vm1", Power.STOPPED)
    await stack.converge()
    stack.disks.fail_remove = "volume vm1-boot has snapshots; delete them first"
    first = await stack.svc.delete_vm("vm1")
    await stack.reconcile()
    assert await stack.state("vm1") is VMState.ERROR
    status = await stack.status("vm1")
    assert status is not None and "has snapshots" in status.message
    assert (await stack.op(first.id)).message.startswith("retrying: volume vm1-boot has")
    stack.disks.fail_remove = ""
    again = await stack.svc.delete_vm("vm1")  # accepted, and acted on at once
    await stack.reconcile()
    assert await stack.store.list(keys.vm_prefix("vm1")) == []
    assert (await stack.op(again.id)).state is OpState.SUCCEEDED
    assert (await stack.op(first.id)).superseded_by == again.id


async def test_a_deleted_vm_takes_its_run_directory_and_console_log_with_it(
    stack: Stack,
) -> None:
    await running(stack)
    assert "vm1" in stack.hv.files
    await stack.svc.power("vm1", PowerOp.POWEROFF)
    await stack.converge()
    await stack.svc.delete_vm("vm1")
    await stack.converge()
    assert "vm1" not in stack.hv.files
    assert ("remove_files", "vm1") in stack.hv.calls


async def test_deleting_a_vm_ends_every_operation_still_open_on_it(stack: Stack) -> None:
    await stack.add_vm("vm1", Power.STOPPED)
    await stack.converge()
    stray = Operation(id="op-stray", kind="vm.start", target="vm1", created_at=1, updated_at=1)
    await stack.store.put(keys.op(stray.id), stray.dump())  # left open by an older version
    delete = await stack.svc.delete_vm("vm1")
    await stack.converge()
    ended = await stack.op(stray.id)
    assert ended.state is OpState.CANCELLED and ended.error == "VM vm1 was deleted"
    assert (await stack.op(delete.id)).state is OpState.SUCCEEDED
    assert all(op.state.done for op in await stack.ops())


async def test_deleting_a_vm_no_node_has_ends_its_operations_at_once(stack: Stack) -> None:
    _, create = await stack.svc.create_vm(VMCreate(name="vm2", image="tiny", start=False))
    delete = await stack.svc.delete_vm("vm2")
    assert delete.state is OpState.SUCCEEDED
    ended = await stack.op(create.id)
    assert ended.state is OpState.CANCELLED and ended.superseded_by == delete.id


async def open_ops(stack: Stack, vm: str, count: int) -> list[str]:
    """``count`` operations left running on ``vm`` by an older version."""
    ids = [f"op-{vm}-stray{i:03d}" for i in range(count)]
    for op_id in ids:
        stray = Operation(id=op_id, kind="vm.start", target=vm, created_at=1, updated_at=1)
        await stack.store.put(keys.op(op_id), stray.dump())
    return ids


async def test_deleting_a_vm_with_200_open_operations_ends_them_all_within_etcds_txn_limit(
    stack: Stack,
) -> None:
    """The memory store refuses transactions over 128 operations, as etcd does; the delete
    put one compare and one write per open operation into its transaction and got stuck."""
    await stack.add_vm("vm1", Power.STOPPED)
    await stack.converge()
    strays = await open_ops(stack, "vm1", 200)
    delete = await stack.svc.delete_vm("vm1")
    await stack.converge()
    assert await stack.store.list(keys.vm_prefix("vm1")) == []
    assert (await stack.op(delete.id)).state is OpState.SUCCEEDED
    for op_id in strays:
        ended = await stack.op(op_id)
        assert ended.state is OpState.CANCELLED and ended.error == "VM vm1 was deleted"


async def test_deleting_a_vm_no_node_has_with_200_open_operations_ends_them_all(
    stack: Stack,
) -> None:
    _, create = await stack.svc.create_vm(VMCreate(name="vm2", image="tiny", start=False))
    strays = await open_ops(stack, "vm2", 200)
    delete = await stack.svc.delete_vm("vm2")
    assert delete.state is OpState.SUCCEEDED
    assert await stack.store.list(keys.vm_prefix("vm2")) == []
    assert all(op.state.done for op in await stack.ops())
    assert (await stack.op(strays[0])).error == "VM vm2 was deleted"
    assert (await stack.op(create.id)).superseded_by == delete.id


async def test_the_sweep_ends_operations_left_running_on_vms_gone_or_moved_on(
    stack: Stack,
) -> None:
    await stack.add_vm("vm1", Power.STOPPED, op_id="op-current")
    current = Operation(id="op-current", kind="vm.start", target="vm1", created_at=2, updated_at=2)
    await stack.store.put(keys.op(current.id), current.dump())
    [older] = await open_ops(stack, "vm1", 1)
    [orphan] = await open_ops(stack, "gone", 1)
    volume_op = Operation(
        id="op-vol", kind="volume.copy", target="gone", created_at=1, updated_at=1
    )
    await stack.store.put(keys.op(volume_op.id), volume_op.dump())

    assert await sweep_strays(stack.store, 5.0) == 2

    assert (await stack.op(older)).superseded_by == "op-current"
    assert (await stack.op(orphan)).error == "VM gone was deleted"
    assert (await stack.op("op-current")).state is OpState.RUNNING
    assert (await stack.op("op-vol")).state is OpState.RUNNING  # not a VM's
    assert await sweep_strays(stack.store, 6.0) == 0
