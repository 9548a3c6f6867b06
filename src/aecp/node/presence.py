"""The node's presence in the cluster: its record, written on every new lease, and the
heartbeat it keeps on that lease (usage, accelerator)."""

from __future__ import annotations

import contextlib
from collections.abc import Callable

from aecp import __version__
from aecp.common.clock import SYSTEM_CLOCK, Clock
from aecp.common.errors import AecpError
from aecp.compute.hypervisor import Accel, Hypervisor
from aecp.conf.settings import NodeSettings
from aecp.model.node import NodeHeartbeat, NodeRecord
from aecp.node import host
from aecp.store import keys
from aecp.store.base import Lease, Store
from aecp.store.lease import LeaseKeeper


class Presence:
    """Registers the node and keeps its heartbeat. ``on_registered`` runs after each
    registration (the agent wakes its control loop)."""

    def __init__(
        self,
        settings: NodeSettings,
        store: Store,
        hv: Hypervisor,
        accel: Accel,
        accel_reason: str,
        on_registered: Callable[[], None],
        clock: Clock = SYSTEM_CLOCK,
    ) -> None:
        self.settings, self.store, self.hv = settings, store, hv
        self.accel, self.accel_reason = accel, accel_reason
        self.on_registered, self.clock = on_registered, clock
        self.sampler = host.UsageSampler(settings.data_dir)

    async def registered(self, lease: Lease) -> None:
        """A new lease: (re-)register the node record and put the heartbeat on the lease."""
        s = self.settings
        cap = host.capacity(s.data_dir, s.compute.cpus, s.compute.memory_mib)
        record = NodeRecord(
            name=s.name,
            address=s.address,
            api_url=s.api_url,
            capacity=cap,
            registered_at=self.clock.wall(),
            agent_version=__version__,
        )
        await self.store.put(keys.node(s.name), record.dump())
        await self.heartbeat(lease)
        self.on_registered()

    async def heartbeat(self, lease: Lease) -> None:
        running = len(self.hv.instances())
        hb = NodeHeartbeat(
            name=self.settings.name,
            at=self.clock.wall(),
            usage=self.sampler.sample(running),
            accel=self.accel.value,
            accel_reason=self.accel_reason,
        )
        await self.store.put(keys.alive(self.settings.name), hb.dump(), lease=lease)

    async def run(self, keeper: LeaseKeeper) -> None:
        """Refresh the heartbeat every ``agent.heartbeat_every`` lease intervals while the
        lease is held (forever, until cancelled)."""
        every = keeper.interval * self.settings.agent.heartbeat_every
        while True:
            await self.clock.sleep(every)
            lease = keeper.lease
            if lease is not None and keeper.held():
                with contextlib.suppress(AecpError):
                    await self.heartbeat(lease)
