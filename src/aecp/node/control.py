"""The agent's control loop: woken by a change in the store or an event of the hypervisor
(or the resync interval), each pass runs the controllers of the roles this node holds, then
the reconciler of this node's VMs, and logs what they decided."""

from __future__ import annotations

import asyncio
import contextlib
import logging

from aecp.common.clock import SYSTEM_CLOCK, Clock
from aecp.common.errors import AecpError, StoreUnavailable
from aecp.compute.hypervisor import Hypervisor
from aecp.node.reconciler import Decision, Reconciler, Say
from aecp.store import keys
from aecp.store.base import Store
from aecp.store.controllers import ControllerHost
from aecp.store.lease import LeaseKeeper
from aecp.store.view import read_cluster

log = logging.getLogger(__name__)
WAKING = (keys.VMS, keys.VM_JOBS, keys.ALIVE, keys.NODES, keys.NODE_ADMIN)  # these wake it


class ControlLoop:
    """The loops of one node's control (``watch``, ``hypervisor_events``, ``run``); ``wake``
    asks for a pass now."""

    def __init__(
        self,
        node: str,
        store: Store,
        hv: Hypervisor,
        keeper: LeaseKeeper,
        controllers: ControllerHost,
        reconciler: Reconciler,
        resync_interval: float,
        clock: Clock = SYSTEM_CLOCK,
    ) -> None:
        self.node, self.store, self.hv, self.keeper = node, store, hv, keeper
        self.controllers, self.reconciler = controllers, reconciler
        self.resync_interval, self.clock = resync_interval, clock
        self.dirty = asyncio.Event()
        self._said: dict[str, str] = {}  # the last steady-state sentence per VM

    def wake(self) -> None:
        self.dirty.set()

    async def watch(self) -> None:
        """Wake the loop on any change to VMs, heartbeats or nodes (records or admin keys)."""
        while True:
            try:
                async with self.store.watch(keys.ROOT) as events:
                    async for ev in events:
                        if ev.key.startswith(WAKING):
                            self.dirty.set()
            except StoreUnavailable:
                await self.clock.sleep(1.0)

    async def hypervisor_events(self) -> None:
        async for ev in self.hv.events():
            self.reconciler.note_event(ev)
            log.info("vm %s: hypervisor event %s", ev.name, ev.kind.value)
            self.dirty.set()

    async def run(self) -> None:
        while True:
            wait = self.reconciler.wait_before_pass(self.resync_interval)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.dirty.wait(), timeout=wait)
            self.dirty.clear()
            try:
                await self.run_pass()
            except StoreUnavailable as exc:
                log.warning(
                    "node %s: store unreachable, skipping this pass: %s", self.node, exc.message
                )
            except AecpError as exc:
                log.error("node %s: control pass failed: %s", self.node, exc)
            await asyncio.sleep(0.05)

    async def run_pass(self) -> None:
        lease = self.keeper.lease
        held = lease is not None and self.keeper.held()
        await self.controllers.run_pass(lease if held else None)
        view = await read_cluster(self.store)
        for decision in self.reconciler.run_pass(view, held):
            self._log(decision)

    def _log(self, d: Decision) -> None:
        """Log a decision: steady states only when they change, retries at debug level."""
        if d.say is Say.DEBUG:
            log.debug("node %s: %s", self.node, d.sentence)
            return
        if d.say is Say.ON_CHANGE and self._said.get(d.vm) == d.sentence:
            return
        self._said[d.vm] = d.sentence
        log.info("node %s: %s", self.node, d.sentence)
