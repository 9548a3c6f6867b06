"""The cluster as the control loops read it: nodes (the agents' records and the administrator's
keys), heartbeats and VMs, read together (one read per prefix, not one revision: each loop
acts by compare-and-swap on what it read)."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field

from aecp.model.node import Capacity, NodeAdmin, NodeHeartbeat, NodeRecord, NodeState, NodeView
from aecp.model.vm import Placement, VMSpec, VMState, VMStatus, observed_state
from aecp.model.vmjob import JobKind, VMJob
from aecp.store import keys
from aecp.store.base import Compare, Store


@dataclass(frozen=True)
class VMEntry:
    """The three keys of one VM, and its job if it has one. ``spec_rev`` is the spec's
    mod_revision (for CAS)."""

    spec: VMSpec
    spec_rev: int
    placement: Placement | None = None
    status: VMStatus | None = None
    job: VMJob | None = None
    placement_rev: int = 0  # the placement's mod_revision (for CAS; 0 without one)
    job_rev: int = 0  # the job's mod_revision

    @property
    def node(self) -> str | None:
        return self.placement.node if self.placement else None


@dataclass(frozen=True)
class ClusterView:
    nodes: dict[str, NodeRecord] = field(default_factory=dict)
    alive: dict[str, NodeHeartbeat] = field(default_factory=dict)
    vms: dict[str, VMEntry] = field(default_factory=dict)
    admin: dict[str, NodeAdmin] = field(default_factory=dict)
    admin_revs: dict[str, int] = field(default_factory=dict)  # for CAS on what was read

    def admin_unchanged(self, node: str) -> Compare:
        """A guard that ``node``'s admin key is still as read (absent, if it was)."""
        rev = self.admin_revs.get(node)
        key = keys.node_admin(node)
        return Compare.absent(key) if rev is None else Compare.unchanged(key, rev)

    def vm_state(self, name: str) -> VMState:
        e = self.vms[name]
        return observed_state(e.spec, e.placement, e.status, e.node in self.alive)

    def vms_on(self, node: str) -> list[VMEntry]:
        return [e for e in self.vms.values() if e.node == node]

    def node_views(self) -> list[NodeView]:
        return [self.node_view(n) for n in sorted(self.nodes)]

    def node_view(self, name: str) -> NodeView:
        rec = self.nodes[name]
        hb = self.alive.get(name)
        placed = self.vms_on(name)
        # a VM migrating here already needs its memory here (it is placed on its source)
        incoming = [e for e in self.vms.values() if _migrating_to(e, name)]
        admin = self.admin.get(name, NodeAdmin())
        return NodeView(
            name=name,
            address=rec.address,
            api_url=rec.api_url,
            state=NodeState.READY if hb else NodeState.UNREACHABLE,
            capacity=rec.capacity,
            usage=hb.usage if hb else None,
            accel=hb.accel if hb else "unknown",
            reserved_memory_mib=sum(e.spec.memory_mib for e in (*placed, *incoming)),
            reserved_vcpus=sum(e.spec.vcpus for e in (*placed, *incoming)),
            vms=len(placed),
            cordoned=admin.cordoned,
            cordon_reason=admin.reason,
            maintenance=admin.maintenance,
            maintenance_since=admin.maintenance_since,
            maintenance_op=admin.maintenance_op,
            maintenance_error=admin.maintenance_error,
        )

    def largest_capacity(self) -> Capacity | None:
        if not self.nodes:
            return None
        return Capacity(
            cpus=max(n.capacity.cpus for n in self.nodes.values()),
            memory_mib=max(n.capacity.memory_mib for n in self.nodes.values()),
            disk_bytes=max(n.capacity.disk_bytes for n in self.nodes.values()),
        )


def _migrating_to(e: VMEntry, node: str) -> bool:
    return e.job is not None and e.job.kind is JobKind.MIGRATE and e.job.target == node


async def read_cluster(store: Store) -> ClusterView:
    """Read nodes, heartbeats, VMs and their jobs (a prefix read each, concurrently)."""
    node_kvs, admin_kvs, alive_kvs, vm_kvs, job_kvs = await asyncio.gather(
        store.list(keys.NODES),
        store.list(keys.NODE_ADMIN),
        store.list(keys.ALIVE),
        store.list(keys.VMS),
        store.list(keys.VM_JOBS),
    )
    nodes = {keys.last_segment(kv.key, keys.NODES): NodeRecord.load(kv.value) for kv in node_kvs}
    admin = {
        keys.last_segment(kv.key, keys.NODE_ADMIN): NodeAdmin.load(kv.value) for kv in admin_kvs
    }
    admin_revs = {keys.last_segment(kv.key, keys.NODE_ADMIN): kv.mod_revision for kv in admin_kvs}
    alive = {
        keys.last_segment(kv.key, keys.ALIVE): NodeHeartbeat.load(kv.value) for kv in alive_kvs
    }
    parts: dict[str, dict[str, tuple[bytes, int]]] = {}
    for kv in vm_kvs:
        split = keys.split_vm_key(kv.key)
        if split is not None:
            parts.setdefault(split[0], {})[split[1]] = (kv.value, kv.mod_revision)
    jobs = {
        keys.last_segment(kv.key, keys.VM_JOBS): (VMJob.load(kv.value), kv.mod_revision)
        for kv in job_kvs
    }
    vms = {}
    for name, p in parts.items():
        if "spec" not in p:
            continue  # a half-deleted VM: status or placement without a spec
        spec = VMSpec.load(p["spec"][0])
        job, job_rev = jobs.get(name, (None, 0))
        if job is not None and job.vm_uuid != spec.uuid:
            job, job_rev = None, 0  # asked of an earlier VM of that name
        vms[name] = VMEntry(
            spec=spec,
            spec_rev=p["spec"][1],
            placement=Placement.load(p["placement"][0]) if "placement" in p else None,
            placement_rev=p["placement"][1] if "placement" in p else 0,
            status=VMStatus.load(p["status"][0]) if "status" in p else None,
            job=job,
            job_rev=job_rev,
        )
    return ClusterView(nodes=nodes, alive=alive, vms=vms, admin=admin, admin_revs=admin_revs)
