"""Nodes: the static record a node registers, the heartbeat it keeps alive under its lease,
and what the administrator says of it (``NodeAdmin``)."""

from __future__ import annotations

import enum

from pydantic import BaseModel, ConfigDict

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


class NodeAdmin(Stored):
    """``/aecp/node-admin/<name>``: written by the API only, never by the node's agent (which
    rewrites its own record on every new lease). ``cordoned``: no VM is placed on the node
    (those already there stay); ``reason`` says why, for people."""

    cordoned: bool = False
    reason: str = ""
    updated_at: float = 0.0


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

    @property
    def free_memory_mib(self) -> int:
        return self.capacity.memory_mib - self.reserved_memory_mib
