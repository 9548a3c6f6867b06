"""What a failed action leaves behind: the VM's status keeps what it knew (its disks stay ready,
the reboots done stay done), the request's operation keeps running while the agent retries and
ends with the retry that succeeds, and after the last attempt the operation fails and the agent
leaves the VM alone until a new request, even after a restart. Found by review: each test
failed before its fix."""

from __future__ import annotations

from pathlib import Path

import pytest

from aecp.common.clock import FakeClock
from aecp.common.errors import HypervisorError
from aecp.compute.fake import FakeHypervisor
from aecp.compute.hypervisor import DiskSpec
from aecp.model.operation import Operation, OpState
from aecp.model.vm import Power, PowerOp, VMSpec, VMState
from aecp.node.reconciler import RETRY_ATTEMPTS, RETRY_MAX, Reconciler
from aecp.store.memory import MemoryStore
from tests.unit.conftest import add_node
from tests.unit.test_vm_operations import flaky
from tests.unit.vmstack import NullDisks, Stack


class CountingDisks(NullDisks):
    """Counts ``prepare`` (the image copy over the boot disk) and ``reuse``."""

    def __init__(self) -> None:
        super().__init__()
        self.prepared = 0
        self.reused = 0

    async def prepare(
        self, spec: VMSpec, image: Path, image_format: str, virtual_size: int
    ) -> tuple[DiskSpec, ...]:
        self.prepared += 1
        return self.disks(spec)

    async def reuse(self, spec: VMSpec) -> tuple[DiskSpec, ...]:
        self.reused += 1
        return self.disks(spec)


class FlakyPauseHypervisor(FakeHypervisor):
    """``pause`` fails while ``fail`` is set."""

    fail = False

    async def pause(self, name: str) -> None:
        if self.fail:
            raise HypervisorError("QMP stop failed")
        await super().pause(name)


@pytest.fixture
async def stack(store: MemoryStore, clock: FakeClock, images_dir: Path) -> Stack:
    await add_node(store, "n1")
    return Stack(store, clock, images_dir)


async def running_with_a_flaky_pause(stack: Stack) -> FlakyPauseHypervisor:
    """VM vm1 running on a hypervisor whose ``pause`` fails on demand."""
    hv = FlakyPauseHypervisor()
    stack.hv = stack.actions.hv = stack.rec.hv = hv
    await stack.add_vm("vm1")
    await stack.converge()
    return hv


async def test_a_failed_action_keeps_the_disks_ready_so_a_later_start_does_not_refill_the_boot_disk(
    stack: Stack,
) -> None:
    disks = CountingDisks()
    stack.disks = stack.actions.disks = disks
    hv = await running_with_a_flaky_pause(stack)
    assert disks.prepared == 1
    hv.fail = True
    await stack.svc.power("vm1", PowerOp.SUSPEND)
    await stack.reconcile()
    status = await stack.status("vm1")
    assert status is not None and status.state is VMState.ERROR and status.disks_ready
    hv.fail = False
    await stack.svc.power("vm1", PowerOp.POWEROFF)
    await stack.converge()
    start = await stack.svc.power("vm1", PowerOp.START)
    await stack.converge()
    assert (await stack.op(start.id)).state is OpState.SUCCEEDED
    assert disks.prepared == 1 and disks.reused == 1


async def test_a_failed_action_keeps_the_reboots_done_so_a_running_guest_is_not_rebooted_again(
    stack: Stack,
) -> None:
    hv = await running_with_a_flaky_pause(stack)
    await stack.svc.power("vm1", PowerOp.REBOOT)
    await stack.converge()
    hv.fail = True
    await stack.svc.power("vm1", PowerOp.SUSPEND)
    await stack.reconcile()
    status = await stack.status("vm1")
    assert status is not None and status.reboot_seq == 1 and status.boots == 2
    hv.fail = False
    await stack.svc.power("vm1", PowerOp.RESUME)
    await stack.converge()
    assert [c for c in hv.calls if c[0] == "reboot"] == [("reboot", "vm1")]


async def test_a_start_that_succeeds_on_a_retry_ends_its_operation_as_succeeded(
    stack: Stack, clock: FakeClock
) -> None:
    hv = flaky(stack)
    await stack.add_vm("vm1", Power.STOPPED)
    await stack.converge()
    hv.error = "transient"
    op = await stack.svc.power("vm1", PowerOp.START)
    await stack.reconcile()
    assert await stack.state("vm1") is VMState.ERROR
    hv.error = ""
    await clock.advance(1)
    await stack.converge()
    assert await stack.state("vm1") is VMState.RUNNING
    assert (await stack.op(op.id)).state is OpState.SUCCEEDED


async def test_a_delete_retried_until_it_works_ends_as_succeeded(
    stack: Stack, clock: FakeClock
) -> None:
    await stack.add_vm("vm1", Power.STOPPED)
    await stack.converge()
    stack.disks.fail_remove = "volume vm1-boot is in use (attached); detach it first"
    op = await stack.svc.delete_vm("vm1")
    await stack.reconcile()
    assert (await stack.op(op.id)).state is OpState.RUNNING
    stack.disks.fail_remove = ""
    await clock.advance(1)
    await stack.converge()
    assert (await stack.op(op.id)).state is OpState.SUCCEEDED
    assert await stack.store.list("/aecp/vms/") == []


async def status_state(stack: Stack) -> VMState | None:
    """The state the agent recorded (the node's lease lapses as the fake clock runs on)."""
    status = await stack.status("vm1")
    return status.state if status else None


async def fail_every_attempt(stack: Stack, clock: FakeClock) -> None:
    for _ in range(RETRY_ATTEMPTS):
        await stack.reconcile()
        await clock.advance(RETRY_MAX)


async def a_start_given_up(stack: Stack, clock: FakeClock) -> tuple[FakeHypervisor, Operation]:
    """A start request whose every attempt failed; the cause is gone afterwards."""
    hv = flaky(stack)
    await stack.add_vm("vm1", Power.STOPPED)
    await stack.converge()
    hv.error = "QEMU failed to launch vm1: no such disk"
    op = await stack.svc.power("vm1", PowerOp.START)
    await fail_every_attempt(stack, clock)
    hv.error = ""
    return hv, op


async def test_after_the_last_attempt_the_operation_fails_and_the_vm_is_left_alone(
    stack: Stack, clock: FakeClock
) -> None:
    hv, op = await a_start_given_up(stack, clock)
    failed = await stack.op(op.id)
    assert failed.state is OpState.FAILED
    assert failed.error.endswith(f"(gave up after {RETRY_ATTEMPTS} attempts)")
    status = await stack.status("vm1")
    assert status is not None and status.state is VMState.ERROR and status.gave_up
    starts = len([c for c in hv.calls if c[0] == "start"])
    await clock.advance(RETRY_MAX)
    [sentence] = await stack.reconcile()
    assert "leaving it until a new request" in sentence
    assert len([c for c in hv.calls if c[0] == "start"]) == starts
    assert await status_state(stack) is VMState.ERROR


async def test_an_agent_restarted_after_giving_up_still_leaves_the_vm_alone(
    stack: Stack, clock: FakeClock
) -> None:
    hv, _ = await a_start_given_up(stack, clock)
    stack.rec = Reconciler("n1", hv, stack.actions, clock)  # a new agent: no memory
    [sentence] = await stack.reconcile()
    assert "leaving it until a new request" in sentence
    assert await status_state(stack) is VMState.ERROR


async def test_a_start_after_the_agent_gave_up_tries_again_and_succeeds(
    stack: Stack, clock: FakeClock
) -> None:
    await a_start_given_up(stack, clock)
    await add_node(stack.store, "n1")  # its heartbeat again, after the time that passed
    again = await stack.svc.power("vm1", PowerOp.START)  # valid in state error
    await stack.converge()
    assert (await stack.op(again.id)).state is OpState.SUCCEEDED
    status = await stack.status("vm1")
    assert status is not None and status.state is VMState.RUNNING
    assert (status.failed_op, status.gave_up, status.message) == ("", False, "")


async def test_a_vm_without_a_running_operation_is_retried_without_giving_up(
    stack: Stack, clock: FakeClock
) -> None:
    """A crashed QEMU whose restart keeps failing: nobody waits for an answer, so the agent
    keeps trying at the back-off's bound."""
    hv = flaky(stack)
    hv.error = "QEMU failed to launch vm1"
    await stack.add_vm("vm1")  # no operation
    await fail_every_attempt(stack, clock)
    await stack.reconcile()
    assert not stack.rec.failures["vm1"].gave_up
    hv.error = ""
    await clock.advance(RETRY_MAX)
    await stack.converge()
    assert await status_state(stack) is VMState.RUNNING


async def test_a_different_action_after_a_failure_is_not_held_back_by_its_back_off(
    stack: Stack,
) -> None:
    hv = await running_with_a_flaky_pause(stack)
    hv.fail = True
    await stack.svc.power("vm1", PowerOp.SUSPEND)
    await stack.reconcile()  # the pause fails: backing off
    hv.crash("vm1")  # QEMU dies: the VM must be started, not left for the pause's back-off
    [sentence] = await stack.reconcile()
    assert sentence == "vm1 should run and is stopped: starting it"
    assert ("start", "vm1") in hv.calls[-2:]


async def test_the_agent_wakes_for_a_retry_before_the_resync_interval(
    stack: Stack, clock: FakeClock
) -> None:
    flaky(stack).error = "QEMU failed to launch vm1"
    await stack.add_vm("vm1")
    assert stack.rec.wait_before_pass(5.0) == 5.0
    await stack.reconcile()
    assert stack.rec.wait_before_pass(5.0) == 1.0
    await clock.advance(0.25)
    assert stack.rec.wait_before_pass(5.0) == 0.75
