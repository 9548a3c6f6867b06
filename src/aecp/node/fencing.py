"""Self-fencing: a node that lost its lease powers off every VM it runs, at once, because
another node may start them now (ARCHITECTURE.md §7, invariant 1)."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

from aecp.compute.hypervisor import Hypervisor

log = logging.getLogger(__name__)


class Fencer:
    """``fence(reason)`` is the lease keeper's ``on_lost``; ``on_fenced`` runs after (the
    controllers step down)."""

    def __init__(self, node: str, hv: Hypervisor, on_fenced: Callable[[], None]) -> None:
        self.node, self.hv, self.on_fenced = node, hv, on_fenced

    async def fence(self, reason: str) -> None:
        """Power off every VM this node runs, now, concurrently."""
        names = [i.name for i in self.hv.instances()]
        log.warning(
            "node %s: fencing after losing the lease (%s): powering off %d VMs: %s",
            self.node,
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
        self.on_fenced()
