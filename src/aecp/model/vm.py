"""VMs: the desired spec (API-owned), the placement (scheduler-owned), the observed status
(agent-owned), and the power state machine that says which operation is valid when.

Ownership keeps writers apart: each of the three keys has exactly one writer role, so no write
needs to merge another writer's fields. The one exception is a guest-initiated power-off, where
the agent records the guest's decision in the spec (``power = stopped``) by compare-and-swap.
"""

from __future__ import annotations

import enum
import re
import uuid as uuidlib
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictInt

from aecp.common.errors import InvalidInput, InvalidState
from aecp.common.names import NAME_RULE
from aecp.model.base import Name, OptionalName, Stored, check_name
from aecp.model.network import MAX_NICS, nic_mac

MAX_DATA_DISKS = 4
MAX_DATA_DISK_MIB = 1024 * 1024
# a VM's volumes are named <vm>-boot and <vm>-data1..<vm>-data4, and must follow the 63-character
# name rule themselves: so VM names are shorter
VM_NAME_MAX = 63 - len(f"-data{MAX_DATA_DISKS}")
VM_NAME_RULE = (
    f"at most {VM_NAME_MAX} characters, so that the names of its volumes (<name>-boot, "
    f"<name>-data1..<name>-data{MAX_DATA_DISKS}) stay within the 63-character name rule"
)


class Power(enum.StrEnum):
    """Desired power state."""

    RUNNING = "running"
    PAUSED = "paused"
    STOPPED = "stopped"


class VMState(enum.StrEnum):
    """Observed state, as shown to users."""

    PENDING = "pending"  # created, not placed yet
    UNSCHEDULABLE = "unschedulable"  # no node fits it
    STARTING = "starting"
    RUNNING = "running"
    PAUSED = "paused"
    STOPPING = "stopping"
    REBOOTING = "rebooting"
    STOPPED = "stopped"
    ERROR = "error"
    DELETING = "deleting"
    UNKNOWN = "unknown"  # its node is unreachable


class PowerOp(enum.StrEnum):
    START = "start"
    SHUTDOWN = "shutdown"
    POWEROFF = "poweroff"
    REBOOT = "reboot"
    SUSPEND = "suspend"
    RESUME = "resume"


class VMCreate(BaseModel):
    """The body of ``POST /v1/vms``."""

    model_config = ConfigDict(extra="forbid")

    name: Name = Field(
        description=f"unique VM name: {NAME_RULE}; {VM_NAME_RULE}",
        json_schema_extra={"maxLength": VM_NAME_MAX},  # checked by check_vm_name, with why
    )
    image: OptionalName = Field("", description="name of a registered image to boot from")
    vcpus: StrictInt = Field(1, description="virtual CPUs (1..the most any node has)")
    memory_mib: StrictInt = Field(256, description="memory in MiB (>= 64)")
    data_disks_mib: list[StrictInt] = Field(
        default_factory=list, description="extra blank disks, MiB"
    )
    node: Name | None = Field(None, description="pin the VM to this node")
    start: StrictBool = Field(True, description="power the VM on once created")
    template: Name | None = Field(None, description="create as an O(1) clone of this template")
    networks: list[Name] = Field(
        default_factory=list,
        description=f"VM networks, one NIC on each, in order (at most {MAX_NICS}); none: one "
        "user-mode NIC (the loopback lab)",
    )

    def validate_fields(self) -> None:
        """Raise ``InvalidInput`` naming the first bad field (pure checks only)."""
        check_vm_name("name", self.name)
        if self.template is None or self.image:
            check_name("image", self.image)
        if self.template is not None:
            check_name("template", self.template)
        if self.node is not None:
            check_name("node", self.node)
        if self.vcpus < 1:
            raise InvalidInput("vcpus", f"must be at least 1, got {self.vcpus}")
        if self.memory_mib < 64:
            raise InvalidInput("memory_mib", f"must be at least 64 MiB, got {self.memory_mib}")
        if len(self.data_disks_mib) > MAX_DATA_DISKS:
            raise InvalidInput("data_disks_mib", f"at most {MAX_DATA_DISKS} data disks")
        for size in self.data_disks_mib:
            if not 1 <= size <= MAX_DATA_DISK_MIB:
                raise InvalidInput(
                    "data_disks_mib", f"each size must be 1..{MAX_DATA_DISK_MIB} MiB, got {size}"
                )
        if len(self.networks) > MAX_NICS:
            raise InvalidInput("networks", f"at most {MAX_NICS} networks (one NIC each)")
        for net in self.networks:
            check_name("networks", net)


class VMNic(BaseModel):
    """One NIC of a VM on a VM network: its MAC (stable: from the VM's uuid and the NIC's
    index) and the address the cluster handed out to it (given to the guest by DHCP)."""

    model_config = ConfigDict(frozen=True)

    network: str
    vlan: int  # the network's (immutable): names the bridge on the node
    mac: str
    ip: str = ""


class VMSpec(Stored):
    """``/aecp/vms/<name>/spec``: what the user wants."""

    name: str
    uuid: str
    image: str
    vcpus: int
    memory_mib: int
    data_disks_mib: list[int] = Field(default_factory=list)
    node: str | None = None
    power: Power = Power.RUNNING
    stop_mode: Literal["acpi", "hard"] = "acpi"
    shutdown_timeout: float = 60.0
    reboot_seq: int = 0
    deleting: bool = False
    op_id: str = ""
    created_at: float = 0.0
    disks_prepared: bool = False  # volumes were cloned for it (template, clone): no image copy
    source: str = ""  # "image tiny", "template web", "clone of vm1"
    nics: list[VMNic] = Field(default_factory=list)  # none: one user-mode NIC

    def volumes(self) -> list[str]:
        """The ABS volumes holding this VM's disks: boot first, then data disks."""
        return [boot_volume(self.name)] + [
            data_volume(self.name, i) for i in range(1, len(self.data_disks_mib) + 1)
        ]

    @classmethod
    def from_create(
        cls, req: VMCreate, op_id: str, now: float, vlans: dict[str, int] | None = None
    ) -> VMSpec:
        """The new VM's spec; ``vlans``: each of ``req.networks``' VLAN (its NICs get their
        addresses when it is stored: ``cluster.networks``)."""
        uuid = str(uuidlib.uuid4())
        vlans = vlans or {}
        return cls(
            name=req.name,
            uuid=uuid,
            image=req.image,
            vcpus=req.vcpus,
            memory_mib=req.memory_mib,
            data_disks_mib=list(req.data_disks_mib),
            node=req.node,
            power=Power.RUNNING if req.start else Power.STOPPED,
            op_id=op_id,
            created_at=now,
            nics=[
                VMNic(network=n, vlan=vlans.get(n, 0), mac=nic_mac(uuid, i))
                for i, n in enumerate(req.networks)
            ],
        )


class Placement(Stored):
    """``/aecp/vms/<name>/placement``: the node the scheduler chose."""

    node: str
    at: float


class VMStatus(Stored):
    """``/aecp/vms/<name>/status``: what the node agent observed."""

    state: VMState
    node: str = ""
    pid: int | None = None
    message: str = ""
    http_url: str = ""
    boots: int = 0
    reboot_seq: int = 0
    disks_ready: bool = False  # the VM's volumes exist and the boot volume holds its image
    failed_op: str = ""  # state error: the operation whose action failed
    gave_up: bool = False  # state error: the agent stopped retrying failed_op (it failed)
    updated_at: float = 0.0


def check_vm_name(field: str, name: str) -> str:
    """``name`` if it is a valid VM name (the object name rule, and short enough that every
    name derived from it is valid too), else ``InvalidInput`` for ``field`` stating the rule."""
    check_name(field, name)
    if len(name) > VM_NAME_MAX:
        raise InvalidInput(
            field, f"{name!r} is {len(name)} characters; a VM name has {VM_NAME_RULE}"
        )
    return name


def boot_volume(vm: str) -> str:
    return f"{vm}-boot"


def data_volume(vm: str, index: int) -> str:
    return f"{vm}-data{index}"


_DATA_VOLUME = re.compile(r"^(?P<vm>.+)-data[1-9][0-9]*$")


def vm_of_volume(volume: str) -> str | None:
    """The VM whose disk ``volume`` would be by its name (``x-boot``, ``x-data2`` → ``x``), or
    None: such names are reserved for that VM while it exists."""
    if volume.endswith("-boot") and len(volume) > len("-boot"):
        return volume[: -len("-boot")]
    m = _DATA_VOLUME.match(volume)
    return m["vm"] if m else None


def apply_power_op(op: PowerOp, spec: VMSpec, state: VMState, op_id: str) -> VMSpec:
    """The new spec after ``op``, or ``InvalidState`` saying why ``op`` is not valid now.

    ``state`` is the observed state; ``spec.power`` the desired one. An operation is valid when it
    moves the VM somewhere it is not already going (resume a running VM is refused; poweroff during
    a slow ACPI shutdown escalates it). ``start`` is also valid on a VM in state ``error``: a new
    request, so its node tries again what failed (after it gave up retrying on its own).
    """
    if spec.deleting:
        raise InvalidState(f"VM {spec.name} is being deleted", state=state.value, op=op.value)
    update: dict[str, object] = {"op_id": op_id}
    if op is PowerOp.START:  # in state error: try again, whatever failed
        ok = spec.power is Power.STOPPED or state is VMState.ERROR
        _require(spec, state, op, ok, "it is not stopped")
        update["power"] = Power.RUNNING
    elif op is PowerOp.SHUTDOWN:
        _require(spec, state, op, spec.power is not Power.STOPPED, "it is not running")
        update |= {"power": Power.STOPPED, "stop_mode": "acpi"}
    elif op is PowerOp.POWEROFF:
        escalate = spec.power is Power.STOPPED and state not in _AT_REST
        _require(spec, state, op, spec.power is not Power.STOPPED or escalate, "it is not running")
        update |= {"power": Power.STOPPED, "stop_mode": "hard"}
    elif op is PowerOp.REBOOT:
        ok = spec.power is Power.RUNNING and state is VMState.RUNNING
        _require(spec, state, op, ok, "it is not running")
        update["reboot_seq"] = spec.reboot_seq + 1
    elif op is PowerOp.SUSPEND:
        ok = spec.power is Power.RUNNING and state is VMState.RUNNING
        _require(spec, state, op, ok, "it is not running")
        update["power"] = Power.PAUSED
    elif op is PowerOp.RESUME:
        _require(spec, state, op, spec.power is Power.PAUSED, "it is not suspended")
        update["power"] = Power.RUNNING
    return spec.model_copy(update=update)


_AT_REST = frozenset(
    {VMState.STOPPED, VMState.PENDING, VMState.UNSCHEDULABLE, VMState.ERROR, VMState.UNKNOWN}
)


def check_deletable(spec: VMSpec, state: VMState) -> None:
    """Raise ``InvalidState`` unless the VM may be deleted: it is stopped (power it off first),
    or in state ``error`` whatever its desired power (the delete powers it off): a VM whose
    action failed, its deletion included, can always be deleted (again)."""
    if state is VMState.ERROR:
        return
    if spec.deleting:
        raise InvalidState(f"VM {spec.name} is already being deleted", state=state.value)
    if spec.power is not Power.STOPPED or state not in _AT_REST:
        raise InvalidState(
            f"VM {spec.name} is {state.value}; power it off before deleting it",
            state=state.value,
        )


def _require(spec: VMSpec, state: VMState, op: PowerOp, ok: bool, why: str) -> None:
    if not ok:
        raise InvalidState(
            f"cannot {op.value} VM {spec.name}: {why} (state {state.value}, "
            f"desired {spec.power.value})",
            state=state.value,
            op=op.value,
        )


def observed_state(
    spec: VMSpec, placement: Placement | None, status: VMStatus | None, node_alive: bool
) -> VMState:
    """The state to show for a VM, from its three keys and whether its node is alive. A VM
    being deleted is ``deleting``, or ``error`` once its deletion failed."""
    if spec.deleting:
        if status is not None and status.state is VMState.ERROR and status.failed_op == spec.op_id:
            return VMState.ERROR
        return VMState.DELETING
    if placement is None:
        if status is not None and status.state is VMState.UNSCHEDULABLE:
            return VMState.UNSCHEDULABLE
        return VMState.PENDING
    if not node_alive:
        return VMState.UNKNOWN
    if status is None or status.state is VMState.UNSCHEDULABLE:  # placed since
        return VMState.STARTING if spec.power is not Power.STOPPED else VMState.STOPPED
    return status.state
