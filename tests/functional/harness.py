"""A cluster in one event loop (see ``conftest``): ``FunctionalCluster`` with its nodes
(``FunctionalNode``: the agent's pieces, wired as ``NodeAgent`` wires them, over the fake
hypervisor) and an API client over the same store."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import httpx

from aecp.cluster.api.app import create_app
from aecp.cluster.api.deps import NodeContext
from aecp.cluster.principals import first_admin
from aecp.cluster.scheduler import Scheduler
from aecp.cluster.vmclones import DiskCloner
from aecp.cluster.vms import VMService
from aecp.cluster.vmsnapshots import VMSnapshotService
from aecp.cluster.volumes import VolumeService
from aecp.common.clock import FakeClock
from aecp.common.tasks import cancel
from aecp.compute.fake import FakeHypervisor, FakeInstance
from aecp.compute.hypervisor import Accel, DiskSpec
from aecp.model.cluster import ClusterInfo, new_cluster_id
from aecp.model.node import Capacity, NodeHeartbeat, NodeRecord, Usage
from aecp.model.principal import FIRST_ADMIN, new_principal_token
from aecp.model.vm import VMSpec
from aecp.node.control import ControlLoop
from aecp.node.fencing import Fencer
from aecp.node.reconciler import Reconciler
from aecp.node.vmdisks import owner
from aecp.node.vmjobs import VMJobs
from aecp.node.vmops import VMActions
from aecp.storage.meta.model import MIB
from aecp.storage.snapshots import SnapshotService
from aecp.store import keys
from aecp.store.base import Lease
from aecp.store.controllers import ControllerHost
from aecp.store.history import History
from aecp.store.lease import LeaseKeeper
from aecp.store.memory import MemoryStore
from tests.unit.abskit import Cluster

LEASE_TTL = 10


class VolumeDisks:
    """The VM's disks as ABS volumes (made empty, owned by the VM), not attached: what the
    functional tier needs of disks is that they exist for snapshots and clones."""

    def __init__(self, abs_: Cluster) -> None:
        self.abs = abs_

    async def prepare(
        self, spec: VMSpec, image: Path, fmt: str, vsize: int
    ) -> tuple[DiskSpec, ...]:
        for vol in spec.volumes():
            if await self.abs.store.get(keys.abs_volume(vol)) is None:
                await self.abs.meta.create_volume(vol, MIB, replicas=1, owner=owner(spec))
        return self.disks(spec)

    def disks(self, spec: VMSpec) -> tuple[DiskSpec, ...]:
        return tuple(
            DiskSpec(path=f"nbd+unix:///{v}", format="raw", boot=i == 0)
            for i, v in enumerate(spec.volumes())
        )

    async def reuse(self, spec: VMSpec) -> tuple[DiskSpec, ...]:
        return self.disks(spec)

    async def released(self, spec: VMSpec) -> None:
        return None

    async def remove(self, spec: VMSpec) -> list[str]:
        for vol in spec.volumes():
            if await self.abs.store.get(keys.abs_volume(vol)) is not None:
                await self.abs.meta.delete_volume(vol, owner(spec))
        return []


class FunctionalNode:
    """One node's agent: lease, reconciler and its job runner, controllers, control loop.
    ``world`` is its QEMU processes, which outlive the agent (``restart``)."""

    def __init__(
        self,
        name: str,
        fc: FunctionalCluster,
        world: dict[str, FakeInstance] | None = None,
        hv: FakeHypervisor | None = None,
        snaps: SnapshotService | None = None,
    ) -> None:
        self.name, self.fc = name, fc
        self.world: dict[str, FakeInstance] = {} if world is None else world
        self.hv = hv if hv is not None else FakeHypervisor(persistent=self.world)
        self.hv.world = self.world
        store, clock = fc.store, fc.clock
        self.actions = VMActions(
            name, "127.0.0.1", store, self.hv, VolumeDisks(fc.abs), fc.images_dir, Accel.TCG, clock
        )
        snaps = snaps or SnapshotService(fc.abs.meta, fc.abs.pool)
        self.jobs = VMJobs(name, self.hv, DiskCloner(fc.service, snaps), clock)
        self.reconciler = Reconciler(name, self.hv, self.actions, clock, self.jobs)
        self.controllers = ControllerHost(store, name, History(store, name, clock))
        self.controllers.register(Scheduler(store, clock))
        self.keeper = LeaseKeeper(
            store,
            LEASE_TTL,
            1.0,
            self._registered,
            Fencer(name, self.hv, self.controllers.step_down).fence,
            clock,
            node=name,
        )
        self.control = ControlLoop(
            name, store, self.hv, self.keeper, self.controllers, self.reconciler, 5.0, clock
        )

    async def start(self) -> None:
        """What the agent does first: re-attach to its running instances, take a lease."""
        await self.hv.attach_all()
        await self.keeper.step()

    async def _registered(self, lease: Lease) -> None:
        rec = NodeRecord(
            name=self.name,
            address="127.0.0.1",
            api_url=f"http://{self.name}.invalid:8700",
            capacity=Capacity(cpus=4, memory_mib=4096, disk_bytes=10**10),
            registered_at=self.fc.clock.wall(),
        )
        await self.fc.store.put(keys.node(self.name), rec.dump())
        hb = NodeHeartbeat(name=self.name, at=self.fc.clock.wall(), usage=Usage(), accel="tcg")
        await self.fc.store.put(keys.alive(self.name), hb.dump(), lease=lease)

    async def run_pass(self) -> None:
        """One control pass (controllers, then reconcile), the hypervisor's events fed in."""
        await self.control.run_pass()
        for ev in self.hv.pending_events():
            self.reconciler.note_event(ev)

    async def settle(self) -> None:
        while self.reconciler.inflight:
            await asyncio.gather(*self.reconciler.inflight.values(), return_exceptions=True)
        for ev in self.hv.pending_events():
            self.reconciler.note_event(ev)

    async def kill(self) -> None:
        """The agent dies: its actions stop where they are; its QEMUs run on. (A task's
        cancellation still runs its ``finally`` blocks, which a ``kill -9`` does not: the
        integration tier kills real agents, ``tests/integration/test_vm_abs.py``.)"""
        await cancel(*self.reconciler.inflight.values())
        self.reconciler.inflight.clear()


class FunctionalCluster:
    def __init__(
        self, store: MemoryStore, clock: FakeClock, abs_: Cluster, images_dir: Path
    ) -> None:
        self.store, self.clock, self.abs, self.images_dir = store, clock, abs_, images_dir
        self.service = VMService(store, images_dir, clock)
        self.nodes: dict[str, FunctionalNode] = {}
        self.token = ""
        self._client: httpx.AsyncClient | None = None

    async def up(self, *names: str) -> FunctionalCluster:
        token, digest = new_principal_token(FIRST_ADMIN)
        await self.store.put(
            keys.CLUSTER, ClusterInfo(name="f", created_at=1, id=new_cluster_id()).dump()
        )
        await self.store.put(keys.principal(FIRST_ADMIN), first_admin(digest, 1).dump())
        self.token = token
        for name in names:
            await self.add(FunctionalNode(name, self))
        app = create_app(
            self.service,
            NodeContext(names[0], "", self.images_dir, lambda vm: None),
            VolumeService(self.abs.meta, self.abs.pool),
            VMSnapshotService(self.service, SnapshotService(self.abs.meta, self.abs.pool)),
        )
        transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
        self._client = httpx.AsyncClient(transport=transport, base_url="http://api")
        return self

    async def add(self, node: FunctionalNode) -> FunctionalNode:
        self.nodes[node.name] = node
        await node.start()
        return node

    async def close(self) -> None:
        """End the test's cluster: an action still running on a live node is a leak (the
        test did not wait for what it started), so it fails the test."""
        left = sorted(
            f"{n.name}: {vm}" for n in self.nodes.values() for vm in n.reconciler.inflight
        )
        for node in self.nodes.values():
            await node.kill()
        if self._client is not None:
            await self._client.aclose()
        assert not left, f"actions left running: {left}"

    async def call(self, method: str, path: str, **kw: Any) -> httpx.Response:
        assert self._client is not None
        headers = {"authorization": f"Bearer {self.token}"}
        return await self._client.request(method, path, headers=headers, **kw)

    async def converge(self, passes: int = 30) -> None:
        """Passes on every node (in name order) until one changes nothing."""
        for _ in range(passes):
            before = await self.store.revision()
            for node in sorted(self.nodes.values(), key=lambda n: n.name):
                await node.run_pass()
                await node.settle()
            if await self.store.revision() == before and not any(
                n.reconciler.inflight for n in self.nodes.values()
            ):
                return
        raise AssertionError(f"no steady state after {passes} passes")

    async def op(self, op_id: str) -> dict[str, Any]:
        r = await self.call("GET", f"/v1/operations/{op_id}")
        assert r.status_code == 200, r.text
        body: dict[str, Any] = r.json()
        return body

    async def vm(self, name: str) -> dict[str, Any]:
        r = await self.call("GET", f"/v1/vms/{name}")
        assert r.status_code == 200, r.text
        body: dict[str, Any] = r.json()
        return body

    def running_on(self, vm: str) -> list[str]:
        """The nodes whose hypervisor runs an instance of ``vm``."""
        return sorted(n.name for n in self.nodes.values() if vm in n.world)
