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
from collections.abc import Iterator
from pathlib import Path

import uvicorn

from aecp import __version__
from aecp.cluster.api.app import create_app
from aecp.cluster.api.deps import NodeContext
from aecp.cluster.drain import Drain
from aecp.cluster.reaper import OperationReaper
from aecp.cluster.scheduler import Scheduler
from aecp.cluster.upgrades import upgrade_until_done
from aecp.cluster.vmclones import DiskCloner
from aecp.cluster.vms import VMService
from aecp.cluster.vmsnapshots import VMSnapshotService
from aecp.cluster.volumes import VolumeService
from aecp.common.clock import SYSTEM_CLOCK, Clock
from aecp.common.pki import Bundle
from aecp.common.tasks import cancel, spawn
from aecp.compute.hypervisor import Accel, Hypervisor, MigrationParams
from aecp.conf.settings import NodeSettings
from aecp.node.control import ControlLoop
from aecp.node.fencing import Fencer
from aecp.node.migration import MigrationConfig, Migrator
from aecp.node.netreconciler import NetworkReconciler
from aecp.node.presence import Presence
from aecp.node.reconciler import Reconciler
from aecp.node.storagewiring import meta_service, replica_auth
from aecp.node.vmdisks import VMDisks
from aecp.node.vmjobs import VMJobs
from aecp.node.vmops import VMActions
from aecp.storage.pool import ReplicaPool
from aecp.storage.snapshots import SnapshotService
from aecp.store.base import Store
from aecp.store.controllers import ControllerHost
from aecp.store.history import History
from aecp.store.lease import LeaseKeeper

log = logging.getLogger(__name__)


class NodeAgent:
    """Everything one node runs, wired together (the pieces are ``Presence``, ``Fencer``,
    ``ControlLoop``, the reconciler and its job runner, the controller host and the API
    server).
    ``run`` returns when ``stop`` is called."""

    def __init__(
        self,
        settings: NodeSettings,
        store: Store,
        hv: Hypervisor,
        accel: Accel,
        accel_reason: str = "",
        clock: Clock = SYSTEM_CLOCK,
    ) -> None:
        self.settings, self.store, self.hv, self.clock = settings, store, hv, clock
        self.accel, self.accel_reason = accel, accel_reason
        self.name = settings.name
        self.meta = meta_service(settings, store, clock)
        auth = replica_auth(settings)
        self.volume_pool = ReplicaPool(self.meta, auth=auth, source=settings.storage_address)
        self.vmdisks = VMDisks(self.meta, self.volume_pool, settings.nbd_socket)
        self.actions = VMActions(
            settings.name, settings.address, store, hv, self.vmdisks, settings.images_dir, accel,
            clock,
        )  # fmt: skip
        self.service = VMService(store, settings.images_dir, clock, disks=self.vmdisks)
        self.snapshots = SnapshotService(self.meta, self.volume_pool)
        comp = settings.compute
        self.migrator = Migrator(
            settings.name,
            store,
            hv,
            self.actions,
            self.vmdisks,
            MigrationConfig(
                address=comp.migration_address or settings.address,
                params=MigrationParams(
                    max_bandwidth=comp.migration_max_bandwidth_mib_s << 20,
                    downtime_limit_ms=comp.migration_downtime_limit_ms,
                ),
                timeout=comp.migration_timeout_s,
            ),
            clock,
        )
        cloner = DiskCloner(self.service, self.snapshots)
        jobs = VMJobs(settings.name, hv, cloner, clock, migrator=self.migrator)
        self.reconciler = Reconciler(
            settings.name, hv, self.actions, clock, jobs, receiver=self.migrator
        )
        self.controllers = ControllerHost(
            store, settings.name, History(store, settings.name, clock)
        )
        self.controllers.register(Scheduler(store, clock))
        self.controllers.register(Drain(store, self.service.power, clock))
        self.controllers.register(
            OperationReaper(store, settings.agent.operation_retention_h * 3600, clock)
        )
        self.fencer = Fencer(settings.name, hv, self.controllers.step_down)
        self.presence = Presence(settings, store, hv, accel, accel_reason, self._wake, clock)
        self.keeper = LeaseKeeper(
            store,
            settings.agent.lease_ttl,
            settings.agent.fence_margin,
            self.presence.registered,
            self.fencer.fence,
            clock,
            node=settings.name,
        )
        self.control = ControlLoop(
            settings.name,
            store,
            hv,
            self.keeper,
            self.controllers,
            self.reconciler,
            settings.agent.resync_interval,
            clock,
        )
        self.networks = NetworkReconciler(
            settings.name,
            store,
            settings.data_dir / "networks",
            settings.network.vm_uplink,
            clock,
            settings.agent.resync_interval,
        )
        self._stop = asyncio.Event()

    def _wake(self) -> None:
        self.control.wake()

    def stop(self) -> None:
        self._stop.set()

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
            spawn(self.presence.run(self.keeper), name=f"heartbeat-{self.name}"),
            spawn(self.control.watch(), name=f"watch-{self.name}"),
            spawn(self.control.hypervisor_events(), name=f"hv-events-{self.name}"),
            spawn(self.control.run(), name=f"control-{self.name}"),
            spawn(upgrade_until_done(self.store, self.clock), name=f"upgrades-{self.name}"),
            spawn(self.networks.run(), name=f"networks-{self.name}"),
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
        svc = self.service
        ctx = NodeContext(
            self.name,
            self.settings.api_url,
            self.settings.run_dir,
            self._console_socket,
            self.keeper.held,
        )
        ca = Bundle(self.settings.security.tls_dir).ca_file.read_text()
        volumes = VolumeService(self.meta, self.volume_pool, ca_certificate=ca)
        vmsnaps = VMSnapshotService(svc, self.snapshots)
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


class _QuietServer(uvicorn.Server):
    """uvicorn without its own signal handling: the agent owns SIGTERM/SIGINT."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


def install_signal_handlers(agent: NodeAgent) -> None:
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, agent.stop)
