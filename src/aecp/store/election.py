"""Leader election for controller roles through an etcd key attached to a lease.

The holder of ``/aecp/leaders/<role>`` is the leader. The key lives on the holder's node lease,
so it vanishes when the node dies or loses the store; then any other node can take the role.
"""

from __future__ import annotations

import logging

from aecp.store import keys
from aecp.store.base import Lease, Store

log = logging.getLogger(__name__)


class Election:
    """Campaigns for ``role`` as ``identity``; ``check`` tells whether we lead right now."""

    def __init__(self, store: Store, role: str, identity: str) -> None:
        self.store = store
        self.role = role
        self.identity = identity
        self.leading = False

    async def check(self, lease: Lease) -> bool:
        """Take the role if free; True if ``identity`` holds it under ``lease``.

        Raises ``StoreUnavailable`` when the store cannot be reached (the caller must then
        behave as a non-leader).
        """
        key = keys.leader(self.role)
        kv = await self.store.get(key)
        if kv is None:
            won = await self.store.create(key, self.identity.encode(), lease=lease)
            kv = await self.store.get(key) if won else None
        leading = kv is not None and kv.value == self.identity.encode() and kv.lease == lease.id
        if leading != self.leading:
            log.info(
                "role %s: %s %s",
                self.role,
                self.identity,
                "is now the leader" if leading else "is not the leader",
            )
        self.leading = leading
        return leading

    async def holder(self) -> str | None:
        kv = await self.store.get(keys.leader(self.role))
        return kv.value.decode() if kv else None
