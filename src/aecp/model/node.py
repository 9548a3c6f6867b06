"""Nodes: the static record a node registers, the heartbeat it keeps alive under its lease,
and what the administrator says of it (``NodeAdmin``)."""

from __future__ import annotations

import enum

from pydantic import BaseModel, ConfigDict, Field

from aecp.model.base import Stored


class Capacity(BaseModel):
    """What a node offers to VMs."""

    model_config = ConfigDict(frozen=True)

    cpus: int
    memory_mib: int
    disk_bytes: int


class Usage(BaseModel):
    """What a node uses now (host view) and what VMs have reserved on it."""

    model_config = ConfigDict(frozen=True)

    cpu_percent: float = 0.0
    memory_used_mib: int = 0
    disk_used_bytes: int = 0
    vms_running: int = 0


class NodeRecord(Stored):
    """``/aecp/nodes/<name>``: written by the node agent when it registers."""

    name: str
    address: str
    api_url: str
    capacity: Capacity
    registered_at: float
    agent_version: str = ""


class MaintenanceState(enum.StrEnum):
    """Where a node is in maintenance mode (``docs/design/maintenance.md``): ``in_use`` →
    ``entering_maintenance`` (the API, after the pre-checks) → ``maintenance`` (the drain
    controller, once no VM runs there) → ``exiting_maintenance`` (the API) → ``in_use`` (the
    drain controller). An entering that fails goes back to ``in_use`` (the drain controller)."""

    IN_USE = "in_use"
    ENTERING = "entering_maintenance"
    MAINTENANCE = "maintenance"
    EXITING = "exiting_maintenance"


class NodeAdmin(Stored):
    """``/aecp/node-admin/<name>``: what the administrator says of a node, never written by the
    node's agent (which rewrites its own record on every new lease). Two writers, each by
    compare-and-swap on the revision it read (so neither overwrites the other's change):

    - the API: cordon/uncordon (``cordoned``, ``reason``), and the maintenance requests
      (``in_use → entering_maintenance``, ``maintenance → exiting_maintenance``, with the
      request's fields: ``maintenance_op``, ``shutdown_unmigratable``, ``restore_vms``);
    - the drain controller (``cluster.drain``): every other maintenance transition and the
      drain's bookkeeping (``drain_vm``, ``drain_op``, ``evacuated``, ``powered_off``,
      ``restoring``, ``maintenance_error``).

    ``cordoned``: no VM is placed on the node (those already there stay); ``reason`` says why,
    for people. A node not ``in_use`` takes no new VM either."""

    cordoned: bool = False
    reason: str = ""
    updated_at: float = 0.0
    maintenance: MaintenanceState = MaintenanceState.IN_USE
    maintenance_since: float = 0.0  # when entering was asked (0 while in use)
    maintenance_op: str = ""  # the node.maintenance operation of the current request
    maintenance_error: str = ""  # why the last entering failed (the node went back in use)
    shutdown_unmigratable: bool = False  # entering: power off the VMs that cannot move
    restore_vms: bool = False  # exiting: move the evacuated VMs back
    drain_vm: str = ""  # the VM the drain is moving or powering off now ...
    drain_op: str = ""  # ... and that request's operation
    evacuated: list[str] = Field(default_factory=list)  # VMs moved off, running (restorable)
    cold_moved: list[str] = Field(default_factory=list)  # stopped VMs moved off
    powered_off: list[str] = Field(default_factory=list)  # VMs powered off as unmigratable
    restoring: list[str] = Field(default_factory=list)  # exiting: VMs still to move back

    @property
    def in_use(self) -> bool:
        return self.maintenance is MaintenanceState.IN_USE


class NodeHeartbeat(Stored):
    """``/aecp/alive/<name>``: attached to the node's lease; present while the node is alive."""

    name: str
    at: float
    usage: Usage
    accel: str = "unknown"
    accel_reason: str = ""


class NodeState(enum.StrEnum):
    READY = "ready"
    UNREACHABLE = "unreachable"


class NodeView(BaseModel):
    """A node as the API and scheduler see it: record + heartbeat + what VMs reserve on it."""

    model_config = ConfigDict(frozen=True)

    name: str
    address: str
    api_url: str
    state: NodeState
    capacity: Capacity
    usage: Usage | None
    accel: str
    reserved_memory_mib: int
    reserved_vcpus: int
    vms: int
    cordoned: bool = False
    cordon_reason: str = ""
    maintenance: MaintenanceState = MaintenanceState.IN_USE
    maintenance_since: float = 0.0
    maintenance_op: str = ""
    maintenance_error: str = ""

    def under(self, admin: NodeAdmin) -> NodeView:
        """This view with ``admin``'s maintenance fields (what ``ClusterView.node_view``
        reads from the admin key)."""
        return self.model_copy(
            update={
                "maintenance": admin.maintenance,
                "maintenance_since": admin.maintenance_since,
                "maintenance_op": admin.maintenance_op,
                "maintenance_error": admin.maintenance_error,
            }
        )

    @property
    def free_memory_mib(self) -> int:
        return self.capacity.memory_mib - self.reserved_memory_mib
