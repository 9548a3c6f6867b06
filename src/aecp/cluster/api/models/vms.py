"""VMs as the API shows them (the create body is ``model.vm.VMCreate``: the service's input,
validated the same way wherever it comes from)."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field, StrictBool

from aecp.common.apierrors import redact_paths
from aecp.model.base import Name
from aecp.model.vm import Power, VMState
from aecp.store.view import ClusterView


class NicPublic(BaseModel):
    """A NIC on a VM network: its MAC and the address the cluster gave it (by DHCP)."""

    network: str
    mac: str
    ip: str


class VMPublic(BaseModel):
    name: str
    uuid: str
    image: str
    vcpus: int
    memory_mib: int
    data_disks_mib: list[int]
    pinned_node: str | None
    node: str | None
    state: VMState
    power: Power
    message: str
    http_url: str
    pid: int | None
    boots: int
    created_at: float
    last_operation: str
    nics: list[NicPublic] = []  # none: one user-mode NIC (http_url reaches it)

    @classmethod
    def from_view(cls, snap: ClusterView, name: str) -> VMPublic:
        e = snap.vms[name]
        st = e.status
        state = snap.vm_state(name)
        message = st.message if st else ""
        if state is VMState.UNKNOWN:
            message = f"node {e.node} is unreachable"
        return cls(
            name=name,
            uuid=e.spec.uuid,
            image=e.spec.image,
            vcpus=e.spec.vcpus,
            memory_mib=e.spec.memory_mib,
            data_disks_mib=e.spec.data_disks_mib,
            pinned_node=e.spec.node,
            node=e.node,
            state=state,
            power=e.spec.power,
            message=redact_paths(message),
            http_url=st.http_url if st and state is VMState.RUNNING else "",
            pid=st.pid if st else None,
            boots=st.boots if st else 0,
            created_at=e.spec.created_at,
            last_operation=e.spec.op_id,
            nics=[NicPublic(network=n.network, mac=n.mac, ip=n.ip) for n in e.spec.nics],
        )


class VMClone(BaseModel):
    """The body of ``POST /v1/vms/{name}/clone``."""

    model_config = ConfigDict(extra="forbid")

    name: Name = Field(description="the new VM's name")
    start: StrictBool = Field(True, description="power the new VM on")
