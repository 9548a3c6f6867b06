"""The node lease and self-fencing.

The node is alive while its lease is. ``LeaseKeeper`` grants the lease, refreshes it every
``ttl/3`` seconds and knows until when it is *certainly* still valid: the send time of the last
successful refresh plus the TTL, minus a safety margin. The store starts its countdown no earlier
than that send time, so at ``valid_until`` nobody else can have taken over yet.

If ``valid_until`` passes without a successful refresh, or the store says the lease is gone, the
keeper calls ``on_lost`` — the agent then powers off every VM it runs (self-fencing) — and starts
over with a new lease once the store answers again. Timing: ``on_lost`` runs within about
``ttl - margin`` seconds of the last successful refresh, because each refresh call is bounded by
the time left.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable

from aecp.common.clock import SYSTEM_CLOCK, Clock
from aecp.common.errors import LeaseExpired, StoreUnavailable
from aecp.store.base import Lease, Store

log = logging.getLogger(__name__)


class LeaseKeeper:
    """Holds one lease for the node. ``held()`` is the fencing truth for everyone else."""

    def __init__(
        self,
        store: Store,
        ttl: int,
        margin: float,
        on_acquired: Callable[[Lease], Awaitable[None]],
        on_lost: Callable[[str], Awaitable[None]],
        clock: Clock = SYSTEM_CLOCK,
        node: str = "",
    ) -> None:
        self.store = store
        self.ttl = ttl
        self.margin = margin
        self.on_acquired = on_acquired
        self.on_lost = on_lost
        self.clock = clock
        self.node = node
        self.lease: Lease | None = None
        self.valid_until = 0.0
        self.refreshes = 0

    @property
    def interval(self) -> float:
        return self.ttl / 3

    def held(self) -> bool:
        return self.lease is not None and self.clock.monotonic() < self.valid_until

    async def run(self) -> None:
        """Keep the lease forever (until cancelled)."""
        while True:
            decision = await self.step()
            log.debug("node %s: %s", self.node, decision)
            await self.clock.sleep(self.next_delay())

    def next_delay(self) -> float:
        """Seconds until the next step: the refresh interval, but never past the moment the
        lease stops being certain (so fencing happens on time, not a whole interval late)."""
        if self.lease is None:
            return min(1.0, self.interval)
        return max(0.0, min(self.interval, self.valid_until - self.clock.monotonic()))

    async def step(self) -> str:
        """One round: acquire or refresh; returns a sentence saying what happened."""
        if self.lease is None:
            return await self._acquire()
        return await self._refresh(self.lease)

    async def _acquire(self) -> str:
        sent = self.clock.monotonic()
        try:
            lease = await self.store.grant_lease(self.ttl)
            self.lease = lease
            self.valid_until = sent + self.ttl - self.margin
            await self.on_acquired(lease)
        except StoreUnavailable as exc:
            self.lease = None
            return f"no lease: store unreachable ({exc.message})"
        except LeaseExpired:
            self.lease = None
            return "no lease: it expired while registering"
        log.info("node %s: acquired lease %x (ttl %ss)", self.node, lease.id, self.ttl)
        return f"acquired lease {lease.id:x}"

    async def _refresh(self, lease: Lease) -> str:
        sent = self.clock.monotonic()
        left = self.valid_until - sent
        try:
            if left <= 0:
                raise TimeoutError
            await asyncio.wait_for(self.store.refresh_lease(lease), timeout=left)
        except LeaseExpired:
            return await self._lose("the store says the lease expired")
        except (StoreUnavailable, TimeoutError) as exc:
            if self.clock.monotonic() >= self.valid_until or isinstance(exc, TimeoutError):
                return await self._lose(
                    f"no successful refresh for {self.ttl - self.margin:.1f}s (store unreachable)"
                )
            return f"refresh failed, lease still certain for {left:.1f}s"
        self.valid_until = sent + self.ttl - self.margin
        self.refreshes += 1
        return "refreshed"

    async def _lose(self, reason: str) -> str:
        self.lease = None
        self.valid_until = 0.0
        log.warning("node %s: lost its lease: %s; fencing", self.node, reason)
        await self.on_lost(reason)
        return f"lost the lease ({reason}): fenced"
