"""Pausing a VM for the length of a block (a snapshot of all its disks at one instant)."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

from aecp.compute.hypervisor import Hypervisor, RunState


class VMPauses:
    """Pauses VMs on this node. ``held`` is the reconciler's set of VMs it must leave alone
    (a paused VM is not one to "fix")."""

    def __init__(self, hv: Hypervisor, held: set[str]) -> None:
        self.hv = hv
        self.held = held
        self._locks: dict[str, asyncio.Lock] = {}  # one pause of a VM at a time

    @contextlib.asynccontextmanager
    async def paused(self, vm: str) -> AsyncIterator[None]:
        """Pause ``vm``'s QEMU (its I/O drained) for the block; the reconciler leaves it
        alone meanwhile. A VM not running here is not touched. Pauses of one VM take turns:
        the first to resume must not resume the VM under another one's snapshot."""
        async with self._locks.setdefault(vm, asyncio.Lock()), self._paused_now(vm):
            yield

    @contextlib.asynccontextmanager
    async def _paused_now(self, vm: str) -> AsyncIterator[None]:
        self.held.add(vm)
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
            self.held.discard(vm)
