"""Which power operation is valid in which state, and what it changes in the spec."""

from __future__ import annotations

import pytest

from aecp.common.errors import InvalidInput, InvalidState
from aecp.model.base import check_name
from aecp.model.vm import (
    MAX_DATA_DISKS,
    VM_NAME_MAX,
    Placement,
    Power,
    PowerOp,
    VMCreate,
    VMSpec,
    VMState,
    VMStatus,
    apply_power_op,
    check_deletable,
    observed_state,
    vm_of_volume,
)


def spec(power: Power = Power.RUNNING, **kw: object) -> VMSpec:
    return VMSpec(name="vm1", uuid="u", image="tiny", vcpus=1, memory_mib=128, power=power, **kw)


def test_start_a_stopped_vm_sets_it_running() -> None:
    new = apply_power_op(PowerOp.START, spec(Power.STOPPED), VMState.STOPPED, "op-1")
    assert new.power is Power.RUNNING
    assert new.op_id == "op-1"


@pytest.mark.parametrize(
    ("op", "power", "state"),
    [
        (PowerOp.START, Power.RUNNING, VMState.RUNNING),
        (PowerOp.RESUME, Power.RUNNING, VMState.RUNNING),
        (PowerOp.SUSPEND, Power.PAUSED, VMState.PAUSED),
        (PowerOp.REBOOT, Power.STOPPED, VMState.STOPPED),
        (PowerOp.SHUTDOWN, Power.STOPPED, VMState.STOPPED),
        (PowerOp.POWEROFF, Power.STOPPED, VMState.STOPPED),
        (PowerOp.REBOOT, Power.PAUSED, VMState.PAUSED),
    ],
)
def test_an_operation_invalid_in_the_current_state_is_refused(
    op: PowerOp, power: Power, state: VMState
) -> None:
    with pytest.raises(InvalidState) as err:
        apply_power_op(op, spec(power), state, "op-1")
    assert err.value.fields["state"] == state.value
    assert op.value in err.value.message


def test_shutdown_asks_for_acpi_and_poweroff_for_a_hard_stop() -> None:
    soft = apply_power_op(PowerOp.SHUTDOWN, spec(), VMState.RUNNING, "a")
    assert (soft.power, soft.stop_mode) == (Power.STOPPED, "acpi")
    hard = apply_power_op(PowerOp.POWEROFF, spec(), VMState.RUNNING, "b")
    assert (hard.power, hard.stop_mode) == (Power.STOPPED, "hard")


def test_poweroff_escalates_a_shutdown_still_in_progress() -> None:
    stopping = spec(Power.STOPPED, stop_mode="acpi")
    new = apply_power_op(PowerOp.POWEROFF, stopping, VMState.STOPPING, "c")
    assert new.stop_mode == "hard"


def test_reboot_bumps_the_reboot_sequence() -> None:
    assert apply_power_op(PowerOp.REBOOT, spec(), VMState.RUNNING, "d").reboot_seq == 1


def test_suspend_and_resume_round_trip() -> None:
    paused = apply_power_op(PowerOp.SUSPEND, spec(), VMState.RUNNING, "e")
    assert paused.power is Power.PAUSED
    assert apply_power_op(PowerOp.RESUME, paused, VMState.PAUSED, "f").power is Power.RUNNING


def test_no_operation_is_valid_on_a_vm_being_deleted() -> None:
    with pytest.raises(InvalidState):
        apply_power_op(PowerOp.START, spec(Power.STOPPED, deleting=True), VMState.DELETING, "g")


def test_only_a_stopped_vm_can_be_deleted() -> None:
    check_deletable(spec(Power.STOPPED), VMState.STOPPED)
    with pytest.raises(InvalidState, match="power it off"):
        check_deletable(spec(), VMState.RUNNING)


def test_observed_state_shows_unknown_when_the_node_is_unreachable() -> None:
    placed = Placement(node="n1", at=1.0)
    running = VMStatus(state=VMState.RUNNING, node="n1")
    assert observed_state(spec(), placed, running, node_alive=True) is VMState.RUNNING
    assert observed_state(spec(), placed, running, node_alive=False) is VMState.UNKNOWN
    assert observed_state(spec(), None, None, node_alive=False) is VMState.PENDING


def test_a_63_character_vm_name_is_refused_with_the_rule_its_volume_names_need() -> None:
    with pytest.raises(InvalidInput) as err:
        VMCreate(name="a" * 63, image="tiny").validate_fields()
    assert err.value.fields["field"] == "name"
    assert f"at most {VM_NAME_MAX} characters" in err.value.message
    assert "<name>-boot" in err.value.message


def test_every_name_derived_from_the_longest_vm_name_is_valid() -> None:
    name = "a" * VM_NAME_MAX
    VMCreate(name=name, image="tiny").validate_fields()
    longest = VMSpec(
        name=name, uuid="u", image="tiny", vcpus=1, memory_mib=64, data_disks_mib=[1] * 4
    )
    assert len(longest.volumes()) == 1 + MAX_DATA_DISKS
    for volume in longest.volumes():
        check_name("volume", volume)


def test_a_volume_name_tells_which_vm_it_is_reserved_for() -> None:
    assert vm_of_volume("web-boot") == "web"
    assert vm_of_volume("web-data3") == "web"
    assert vm_of_volume("a-boot-boot") == "a-boot"
    assert vm_of_volume("scratch") is None
    assert vm_of_volume("web-data0") is None
    assert vm_of_volume("-boot") is None


def test_a_vm_in_error_can_be_deleted_whatever_its_desired_power() -> None:
    check_deletable(spec(Power.RUNNING), VMState.ERROR)


def test_a_vm_whose_deletion_failed_is_shown_in_error_and_can_be_deleted_again() -> None:
    deleting = spec(Power.STOPPED, deleting=True, op_id="op-del")
    placed = Placement(node="n1", at=1.0)
    failed = VMStatus(state=VMState.ERROR, node="n1", message="boom", failed_op="op-del")
    assert observed_state(deleting, placed, failed, node_alive=True) is VMState.ERROR
    check_deletable(deleting, VMState.ERROR)
    older = failed.model_copy(update={"failed_op": "op-start"})  # from before the delete
    assert observed_state(deleting, placed, older, node_alive=True) is VMState.DELETING
    with pytest.raises(InvalidState, match="already being deleted"):
        check_deletable(deleting, VMState.DELETING)
