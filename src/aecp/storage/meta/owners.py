"""What ABS asks about the owners of volumes.

A volume records its owner (``VolumeOwner``: a VM, a template), but what those are, and whether
one exists, is known only to the layer that made them (the cluster's VMs and templates). ABS asks
through this protocol, which that layer implements and the node wires in; every answer comes
with a store guard for the caller's transaction, so it still holds when the change is made.
"""

from __future__ import annotations

from typing import Protocol

from aecp.storage.meta.model import VolumeOwner
from aecp.store.base import Compare


class VolumeOwners(Protocol):
    async def alive(self, owner: VolumeOwner) -> tuple[bool, Compare]:
        """Whether ``owner`` exists now (the very one: a later namesake is not it), and the
        guard that it stays as seen."""
        ...

    async def reserve(self, volume: str, owner: VolumeOwner | None) -> list[Compare]:
        """The guards under which ``owner`` (None: a standalone volume) may take the name
        ``volume``: a name may be reserved for the disks of an owner that exists.
        ``AlreadyExists`` naming that owner if it is reserved now."""
        ...
