"""The node process: registers the node, keeps its lease (self-fencing when it is lost),
reconciles its VMs, runs the controllers of the roles it holds (the scheduler) and serves
the cluster API.

Start-up order: decide the accelerator → re-attach to running QEMU instances → serve the API →
keep the lease (registering the node on each new lease) → reconcile and schedule. Shutdown
(SIGTERM) stops the loops and the API but leaves VMs running: they outlive the agent, and the
next agent re-attaches to them.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import uvicorn

from aecp import __version__
from aecp.cluster.api.app import create_app
from aecp.cluster.api.deps import NodeContext
from aecp.cluster.scheduler import Scheduler
from aecp.cluster.service import ClusterService
from aecp.cluster.vmsnapshots import VMSnapshotService
from aecp.cluster.volumeowners import ClusterOwners
from aecp.cluster.volumes import VolumeService
from aecp.common.clock import SYSTEM_CLOCK, Clock
from aecp.common.errors import AecpError, StoreUnavailable
from aecp.common.pki import Bundle
from aecp.common.tasks import cancel, spawn
from aecp.common.tls import Credentials
from aecp.compute.hypervisor import Accel, Hypervisor, RunState
from aecp.conf.settings import NodeSettings
from aecp.model.node import NodeHeartbeat, NodeRecord
from aecp.node import host
from aecp.node.reconciler import Decision, Reconciler, Say
from aecp.node.vmdisks import VMDisks
from aecp.node.vmops import VMActions
from aecp.storage.chunk.auth import ReplicaAuth
from aecp.storage.meta.model import MIB
from aecp.storage.meta.service import MetaService
from aecp.storage.pool import ReplicaPool
from aecp.storage.snapshots import SnapshotService
from aecp.store import keys
from aecp.store.base import Lease, Store
from aecp.store.controllers import ControllerHost
from aecp.store.history import History
from aecp.store.lease import LeaseKeeper
from aecp.store.view import read_cluster

log = logging.getLogger(__name__)


class NodeAgent:
    """Everything one node runs, wired together. ``run`` returns when ``stop`` is called."""

    def __init__(
        self,
        settings: NodeSettings,
        store: Store,
        hv: Hypervisor,
        accel: Accel,
        accel_reason: str = "",
        clock: Clock = SYSTEM_CLOCK,
    ) -> None:
        self.settings = settings
        self.store = store
        self.hv = hv
        self.accel = accel
        self.accel_reason = accel_reason
        self.clock = clock
        self.name = settings.name
        self.sampler = host.UsageSampler(settings.data_dir)
        self.meta = MetaService(
            store,
            settings.storage.extent_mib * MIB,
            clock,
            overcommit_ratio=settings.storage.overcommit_ratio,
            owners=ClusterOwners(store),
        )
        auth = ReplicaAuth(
            Credentials(Bundle(settings.security.tls_dir)), settings.security.replica_encryption
        )
        self.volume_pool = ReplicaPool(self.meta, auth=auth, source=settings.address)
        vmdisks = VMDisks(self.meta, self.volume_pool, settings.nbd_socket)
        self.vmdisks = vmdisks
        self.actions = VMActions(
            settings.name, settings.address, store, hv, vmdisks, settings.images_dir, accel, clock
        )
        self.reconciler = Reconciler(settings.name, hv, self.actions, clock)
        self._pauses: dict[str, asyncio.Lock] = {}  # one pause (snapshot) of a VM at a time
        self.keeper = LeaseKeeper(
            store,
            settings.agent.lease_ttl,
            settings.agent.fence_margin,
            self._registered,
            self._fence,
            clock,
            node=settings.name,
        )
        self.controllers = ControllerHost(
            store, settings.name, History(store, settings.name, clock)
        )
        self.controllers.register(Scheduler(store, clock))
        self.dirty = asyncio.Event()
        self._stop = asyncio.Event()
        self._last_decisions: dict[str, str] = {}

    def stop(self) -> None:
        self._stop.set()

    @contextlib.asynccontextmanager
    async def paused(self, vm: str) -> AsyncIterator[None]:
        """Pause ``vm``'s QEMU (its I/O drained) for the block; the reconciler leaves it
        alone meanwhile. A VM not running here is not touched. Pauses of one VM take turns:
        the first to resume must not resume the VM under another one's snapshot."""
        async with self._pauses.setdefault(vm, asyncio.Lock()), self._paused_now(vm):
            yield

    @contextlib.asynccontextmanager
    async def _paused_now(self, vm: str) -> AsyncIterator[None]:
        self.reconciler.held.add(vm)
        try:
            if await self.hv.state(vm) is RunState.RUNNING:
                await self.hv.pause(vm)
                try:
                    yield
                finally:
                    await self.hv.resume(vm)
            else:
                yield
        finally:
            self.reconciler.held.discard(vm)

    async def run(self) -> None:
        attached = await self.hv.attach_all()
        log.info(
            "node %s: agent %s starting; accel %s (%s); re-attached %d running VMs",
            self.name,
            __version__,
            self.accel.value,
            self.accel_reason,
            len(attached),
        )
        server = self._api_server()
        tasks = [
            spawn(server.serve(), name=f"api-{self.name}"),
            spawn(self.keeper.run(), name=f"lease-{self.name}"),
            spawn(self._heartbeat_loop(), name=f"heartbeat-{self.name}"),
            spawn(self._watch_loop(), name=f"watch-{self.name}"),
            spawn(self._events_loop(), name=f"hv-events-{self.name}"),
            spawn(self._control_loop(), name=f"control-{self.name}"),
        ]
        try:
            await self._stop.wait()
        finally:
            server.should_exit = True
            await asyncio.sleep(0.2)
            await cancel(*tasks)
            await self.hv.close()
            await self.volume_pool.close()
            log.info("node %s: agent stopped (VMs keep running)", self.name)

    def _api_server(self) -> uvicorn.Server:
        svc = ClusterService(self.store, self.settings.images_dir, self.clock, disks=self.vmdisks)
        ctx = NodeContext(
            self.name, self.settings.api_url, self.settings.run_dir, self._console_socket
        )
        ca = Bundle(self.settings.security.tls_dir).ca_file.read_text()
        volumes = VolumeService(self.meta, self.volume_pool, ca_certificate=ca)
        vmsnaps = VMSnapshotService(
            svc, SnapshotService(self.meta, self.volume_pool), self.name, self
        )
        config = uvicorn.Config(
            create_app(svc, ctx, volumes, vmsnaps),
            host=self.settings.address,
            port=self.settings.api.port,
            log_level="warning",
            lifespan="off",
            access_log=False,
        )
        return _QuietServer(config)

    def _console_socket(self, vm: str) -> Path | None:
        """Where ``vm``'s QEMU on this node has its console socket (as the driver found it
        when it started or re-attached it), or None if it runs none here."""
        return next((i.console_socket for i in self.hv.instances() if i.name == vm), None)

    # ---- lease ------------------------------------------------------------------------------
    async def _registered(self, lease: Lease) -> None:
        """A new lease: (re-)register the node record and put the heartbeat on the lease."""
        cap = host.capacity(
            self.settings.data_dir, self.settings.compute.cpus, self.settings.compute.memory_mib
        )
        record = NodeRecord(
            name=self.name,
            address=self.settings.address,
            api_url=self.settings.api_url,
            capacity=cap,
            registered_at=self.clock.wall(),
            agent_version=__version__,
        )
        await self.store.put(keys.node(self.name), record.dump())
        await self._put_heartbeat(lease)
        self.dirty.set()

    async def _put_heartbeat(self, lease: Lease) -> None:
        running = len(self.hv.instances())
        hb = NodeHeartbeat(
            name=self.name,
            at=self.clock.wall(),
            usage=self.sampler.sample(running),
            accel=self.accel.value,
            accel_reason=self.accel_reason,
        )
        await self.store.put(keys.alive(self.name), hb.dump(), lease=lease)

    async def _fence(self, reason: str) -> None:
        """Self-fencing: power off every VM this node runs, now, concurrently."""
        names = [i.name for i in self.hv.instances()]
        log.warning(
            "node %s: fencing after losing the lease (%s): powering off %d VMs: %s",
            self.name,
            reason,
            len(names),
            ", ".join(names) or "none",
        )
        results = await asyncio.gather(
            *(self.hv.poweroff(n) for n in names), return_exceptions=True
        )
        for n, r in zip(names, results, strict=True):
            if isinstance(r, BaseException):
                log.error("vm %s: fencing power-off failed: %r", n, r)
        self.controllers.step_down()

    async def _heartbeat_loop(self) -> None:
        every = self.keeper.interval * self.settings.agent.heartbeat_every
        while True:
            await self.clock.sleep(every)
            lease = self.keeper.lease
            if lease is not None and self.keeper.held():
                with contextlib.suppress(AecpError):
                    await self._put_heartbeat(lease)

    # ---- control ----------------------------------------------------------------------------
    async def _watch_loop(self) -> None:
        """Wake the control loop on any change under /aecp/vms and /aecp/alive."""
        while True:
            try:
                async with self.store.watch(keys.ROOT) as events:
                    async for ev in events:
                        if ev.key.startswith((keys.VMS, keys.ALIVE, keys.NODES)):
                            self.dirty.set()
            except StoreUnavailable:
                await self.clock.sleep(1.0)

    async def _events_loop(self) -> None:
        async for ev in self.hv.events():
            self.reconciler.note_event(ev)
            log.info("vm %s: hypervisor event %s", ev.name, ev.kind.value)
            self.dirty.set()

    async def _control_loop(self) -> None:
        while True:
            wait = self.reconciler.wait_before_pass(self.settings.agent.resync_interval)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.dirty.wait(), timeout=wait)
            self.dirty.clear()
            try:
                await self._control_pass()
            except StoreUnavailable as exc:
                log.warning(
                    "node %s: store unreachable, skipping this pass: %s", self.name, exc.message
                )
            except AecpError as exc:
                log.error("node %s: control pass failed: %s", self.name, exc)
            await asyncio.sleep(0.05)

    async def _control_pass(self) -> None:
        lease = self.keeper.lease
        held = lease is not None and self.keeper.held()
        await self.controllers.run_pass(lease if held else None)
        snap = await read_cluster(self.store)
        for decision in self.reconciler.run_pass(snap, held):
            self._log_decision(decision)

    def _log_decision(self, d: Decision) -> None:
        """Log a decision: steady states only when they change, retries at debug level."""
        if d.say is Say.DEBUG:
            log.debug("node %s: %s", self.name, d.sentence)
            return
        if d.say is Say.ON_CHANGE and self._last_decisions.get(d.vm) == d.sentence:
            return
        self._last_decisions[d.vm] = d.sentence
        log.info("node %s: %s", self.name, d.sentence)


class _QuietServer(uvicorn.Server):
    """uvicorn without its own signal handling: the agent owns SIGTERM/SIGINT."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


def install_signal_handlers(agent: NodeAgent) -> None:
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, agent.stop)
