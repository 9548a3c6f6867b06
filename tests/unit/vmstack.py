"""The VM control path in one process: requests through ``VMService``, carried out by a
``Reconciler`` and ``VMActions`` over the memory store and the fake hypervisor, with reconcile
passes driven by the test (so interleavings are deterministic)."""

from __future__ import annotations

import asyncio
from pathlib import Path

from aecp.cluster.vms import VMService
from aecp.common.clock import FakeClock
from aecp.common.errors import InvalidState
from aecp.compute.fake import FakeHypervisor
from aecp.compute.hypervisor import Accel, DiskSpec
from aecp.model.operation import Operation
from aecp.model.vm import Placement, Power, VMSpec, VMState, VMStatus
from aecp.node.reconciler import Decision, Reconciler
from aecp.node.vmops import VMActions
from aecp.store import keys
from aecp.store.memory import MemoryStore
from aecp.store.typed import read
from aecp.store.view import read_cluster


class NullDisks:
    """A ``DiskProvider`` double with nothing behind it; ``fail_remove`` makes ``remove``
    fail as a storage error would."""

    def __init__(self) -> None:
        self.fail_remove = ""
        self.removed: list[str] = []

    async def prepare(
        self, spec: VMSpec, image: Path, image_format: str, virtual_size: int
    ) -> tuple[DiskSpec, ...]:
        return self.disks(spec)

    def disks(self, spec: VMSpec) -> tuple[DiskSpec, ...]:
        return (DiskSpec(path=f"/nonexistent/{spec.name}", format="raw", boot=True),)

    async def reuse(self, spec: VMSpec) -> tuple[DiskSpec, ...]:
        return self.disks(spec)

    async def released(self, spec: VMSpec) -> None:
        return None

    async def remove(self, spec: VMSpec) -> list[str]:
        if self.fail_remove:
            raise InvalidState(self.fail_remove)
        self.removed.append(spec.name)
        return []


class Stack:
    def __init__(self, store: MemoryStore, clock: FakeClock, images_dir: Path) -> None:
        self.store = store
        self.clock = clock
        self.hv = FakeHypervisor()
        self.disks = NullDisks()
        self.actions = VMActions(
            "n1", "127.0.0.1", store, self.hv, self.disks, images_dir, Accel.TCG, clock
        )
        self.rec = Reconciler("n1", self.hv, self.actions, clock)
        self.svc = VMService(store, images_dir, clock)

    async def add_vm(self, name: str, power: Power = Power.RUNNING, op_id: str = "") -> None:
        """A VM placed on n1 (as if created and scheduled)."""
        spec = VMSpec(
            name=name,
            uuid=f"uuid-{name}",
            image="tiny",
            vcpus=1,
            memory_mib=128,
            power=power,
            op_id=op_id,
            disks_prepared=True,
        )
        await self.store.put(keys.vm_spec(name), spec.dump())
        await self.store.put(keys.vm_placement(name), Placement(node="n1", at=1).dump())

    async def run_pass(self) -> list[Decision]:
        """Decide and start the actions, without waiting for them."""
        decisions = self.rec.run_pass(await read_cluster(self.store), lease_held=True)
        self.feed_events()
        return decisions

    async def settle(self) -> None:
        while self.rec.inflight:
            await asyncio.gather(*self.rec.inflight.values())
        self.feed_events()

    def feed_events(self) -> None:
        """Hand the hypervisor's events to the reconciler, as the agent's event loop does."""
        for ev in self.hv.pending_events():
            self.rec.note_event(ev)

    async def reconcile(self) -> list[str]:
        """One pass, its actions carried out."""
        decisions = await self.run_pass()
        await self.settle()
        return [d.sentence for d in decisions]

    async def converge(self, passes: int = 20) -> None:
        """Reconcile until a pass starts no action."""
        for _ in range(passes):
            decisions = await self.run_pass()
            await self.settle()
            if all(d.action is None for d in decisions):
                return
        raise AssertionError(f"no steady state after {passes} passes")

    async def op(self, op_id: str) -> Operation:
        got = await read(self.store, keys.op(op_id), Operation)
        assert got is not None, op_id
        return got[0]

    async def ops(self) -> list[Operation]:
        return [Operation.load(kv.value) for kv in await self.store.list(keys.OPS)]

    async def state(self, name: str) -> VMState:
        return (await read_cluster(self.store)).vm_state(name)

    async def status(self, name: str) -> VMStatus | None:
        got = await read(self.store, keys.vm_status(name), VMStatus)
        return got[0] if got else None
