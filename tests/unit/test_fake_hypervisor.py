"""The fake hypervisor honours the same contract as the QEMU driver."""

from __future__ import annotations

import pytest

from aecp.common.errors import InvalidState, LaunchError
from aecp.compute.fake import FailingLaunchHypervisor, FakeHypervisor, FakeInstance
from aecp.compute.hypervisor import DiskSpec, EventKind, Hypervisor, InstanceSpec, RunState


def spec(name: str = "vm-1") -> InstanceSpec:
    return InstanceSpec(name, f"uuid-{name}", 1, 128, (DiskSpec(f"/d/{name}.qcow2", boot=True),))


def kinds(hv: FakeHypervisor) -> list[EventKind]:
    return [e.kind for e in hv.pending_events()]


async def test_start_returns_a_running_instance_and_emits_started() -> None:
    hv = FakeHypervisor()
    info = await hv.start(spec())
    assert isinstance(hv, Hypervisor)
    assert info.state is RunState.RUNNING
    assert info.console_log.name == "console.log"
    assert await hv.state("vm-1") is RunState.RUNNING
    assert [i.name for i in hv.instances()] == ["vm-1"]
    assert kinds(hv) == [EventKind.STARTED]


async def test_starting_a_running_instance_again_is_invalid_state() -> None:
    hv = FakeHypervisor()
    await hv.start(spec())
    with pytest.raises(InvalidState):
        await hv.start(spec())


async def test_pause_and_resume_check_the_state() -> None:
    hv = FakeHypervisor()
    await hv.start(spec())
    with pytest.raises(InvalidState):
        await hv.resume("vm-1")
    await hv.pause("vm-1")
    assert await hv.state("vm-1") is RunState.PAUSED
    with pytest.raises(InvalidState):
        await hv.pause("vm-1")
    await hv.resume("vm-1")
    assert await hv.state("vm-1") is RunState.RUNNING
    assert kinds(hv) == [EventKind.STARTED, EventKind.PAUSED, EventKind.RESUMED]


async def test_commands_on_an_unknown_instance_are_invalid_state_but_poweroff_is_idempotent() -> (
    None
):
    hv = FakeHypervisor()
    for call in (hv.pause("x"), hv.resume("x"), hv.shutdown("x", 1), hv.reboot("x", 1)):
        with pytest.raises(InvalidState):
            await call
    await hv.poweroff("x")
    assert await hv.state("x") is RunState.STOPPED


async def test_a_clean_shutdown_returns_true_after_guest_shutdown_then_stopped() -> None:
    hv = FakeHypervisor()
    await hv.start(spec())
    assert await hv.shutdown("vm-1", 30) is True
    assert await hv.state("vm-1") is RunState.STOPPED
    assert hv.instances() == []
    assert kinds(hv) == [EventKind.STARTED, EventKind.GUEST_SHUTDOWN, EventKind.STOPPED]


async def test_a_guest_ignoring_acpi_is_powered_off_hard_and_shutdown_returns_false() -> None:
    hv = FakeHypervisor(guest_cooperates=False)
    await hv.start(spec())
    assert await hv.shutdown("vm-1", 30) is False
    assert await hv.state("vm-1") is RunState.STOPPED
    assert kinds(hv) == [EventKind.STARTED, EventKind.STOPPED]


async def test_reboot_keeps_the_instance_running_and_emits_reset() -> None:
    hv = FakeHypervisor()
    info = await hv.start(spec())
    assert await hv.reboot("vm-1", 30) is True
    assert await hv.state("vm-1") is RunState.RUNNING
    assert hv.instances()[0].pid == info.pid
    assert hv.world["vm-1"].boots == 2
    assert kinds(hv) == [EventKind.STARTED, EventKind.RESET]


async def test_a_crash_stops_the_instance_with_a_stopped_event() -> None:
    hv = FakeHypervisor()
    await hv.start(spec())
    hv.pending_events()
    hv.crash("vm-1")
    assert await hv.state("vm-1") is RunState.STOPPED
    events = hv.pending_events()
    assert [e.kind for e in events] == [EventKind.STOPPED]
    assert events[0].detail == {"reason": "process-exited"}


async def test_a_guest_poweroff_emits_guest_shutdown_then_stopped() -> None:
    hv = FakeHypervisor()
    await hv.start(spec())
    hv.pending_events()
    hv.guest_poweroff("vm-1")
    assert kinds(hv) == [EventKind.GUEST_SHUTDOWN, EventKind.STOPPED]


async def test_events_are_delivered_through_the_async_iterator() -> None:
    hv = FakeHypervisor()
    await hv.start(spec())
    await hv.poweroff("vm-1")
    stream = hv.events()
    first, second = await anext(stream), await anext(stream)
    await stream.aclose()  # type: ignore[attr-defined]
    assert (first.kind, second.kind) == (EventKind.STARTED, EventKind.STOPPED)


async def test_a_new_object_over_the_same_world_reattaches_after_an_agent_restart() -> None:
    world: dict[str, FakeInstance] = {}
    old = FakeHypervisor(persistent=world)
    info = await old.start(spec())
    await old.close()
    new = FakeHypervisor(persistent=world)
    assert new.instances() == []
    attached = await new.attach_all()
    assert [(i.name, i.pid) for i in attached] == [("vm-1", info.pid)]
    with pytest.raises(InvalidState):
        await new.start(spec())


async def test_failing_launch_raises_launch_error_and_tracks_nothing() -> None:
    hv = FailingLaunchHypervisor()
    with pytest.raises(LaunchError) as caught:
        await hv.start(spec())
    assert caught.value.fields["exit_code"] == 1
    assert "/d/vm-1.qcow2" in caught.value.fields["output"]
    assert hv.instances() == []
    assert hv.pending_events() == []
