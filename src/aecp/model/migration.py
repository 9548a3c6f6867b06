"""The records of a live migration besides its job (``model.vmjob``, ``node.migration``).

``MigrationMark`` (``/aecp/vm-migrations/<vm>``, written by the source agent only) says how
far the source got, so an agent that restarts mid-migration knows whether the disks may have
been handed over and whether the destination may already run the VM. ``Incoming``
(``/aecp/vm-incoming/<vm>``, written by the destination agent only) says where its QEMU waits
for the migration, or why it could not be started. The source deletes both, with the job, in
the transaction that ends the migration.
"""

from __future__ import annotations

import enum

from aecp.model.base import Stored


class Phase(enum.StrEnum):
    TRANSFERRING = "transferring"  # memory being copied; the VM runs on the source
    HANDOFF = "handoff"  # paused before the switch-over; the disks may be handed over
    COMPLETED = "completed"  # QEMU switched over: the destination runs the VM


class MigrationMark(Stored):
    op: str
    phase: Phase
    target: str
    at: float


class Incoming(Stored):
    op: str
    node: str
    uri: str = ""  # tcp:<address>:<port> the destination QEMU listens on
    pid: int = 0
    http_url: str = ""  # the guest's HTTP port as forwarded on the destination (user NIC)
    error: str = ""  # why no QEMU waits there
    at: float
