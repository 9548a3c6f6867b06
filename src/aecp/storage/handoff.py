"""The disk hand-off of a live migration: who may write a volume, moved at one instant.

A VM migrating to node D has its QEMU started on D long before the switch-over, and that QEMU
opens its disks (NBD) at once, while the source's access point still serves them. So D's
storage server serves such an open **deferred**: the handle knows the volume's size and
attaches nothing; its I/O, if any came, would wait. QEMU issues none until the migration
completes.

At the switch-over the source agent (the VM is paused there, its disks drained and flushed)
writes a ``Handoff`` per volume naming D. D's storage server, watching, attaches each volume
with ``takeover`` under a new epoch (which fences the source's access point: any later write
from it is refused by the replicas), wakes the deferred handles, and answers with a
``HandoffDone``. Only then does the source let QEMU switch over. A migration that fails after
the hand-off hands the volumes back the same way (a ``Handoff`` naming the source, whose
storage server re-attaches the export it still has open).

Writers: the source agent writes (and, when the migration ends, deletes) ``Handoff`` and
deletes ``HandoffDone``; the storage server named writes ``HandoffDone``.
"""

from __future__ import annotations

from aecp.model.base import Stored


class Handoff(Stored):
    """``/aecp/abs/handoffs/<volume>``: attach ``volume`` on node ``to`` now."""

    volume: str
    to: str
    vm: str
    op: str  # the migration's operation
    at: float


class HandoffDone(Stored):
    """``/aecp/abs/handoffs-done/<volume>``: the answer of node ``node`` to a ``Handoff``."""

    volume: str
    node: str
    op: str
    ok: bool
    epoch: int = 0
    error: str = ""
    at: float
