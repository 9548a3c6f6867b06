"""Where a VM runs: its placement, written by compare-and-swap.

The scheduler creates a VM's placement once (``cluster.scheduler``); moving it — HA after a
node's death, migration, evacuation — is a compare-and-swap on the revision the mover read,
so two movers never both win, and a move never lands on a VM that was deleted or moved
meanwhile. The agent of the old node then sees the VM is not its own any more and powers its
instance off; the new node's agent starts it (its disks attach at a newer epoch, which fences
the old instance's writes on the replicas).
"""

from __future__ import annotations

from aecp.common.clock import SYSTEM_CLOCK, Clock
from aecp.common.errors import InvalidInput, InvalidState
from aecp.model.vm import Placement
from aecp.store import keys
from aecp.store.base import Compare, Put, Store
from aecp.store.view import VMEntry


async def move(store: Store, entry: VMEntry, to: str, clock: Clock = SYSTEM_CLOCK) -> bool:
    """Place ``entry``'s VM on node ``to`` if its placement and spec are still those read
    and the node exists. False if something changed (read again and decide again)."""
    if entry.placement is None:
        raise InvalidInput("vm", f"VM {entry.spec.name} is not placed yet: the scheduler is")
    if entry.job is not None:  # its node is carrying a job out: the new one would redo it
        raise InvalidState(
            f"VM {entry.spec.name} has a {entry.job.describe()} in progress "
            f"({entry.job.op_id}); move it when that ends",
            operation=entry.job.op_id,
        )
    name = entry.spec.name
    return await store.txn(
        [
            Compare.unchanged(keys.vm_placement(name), entry.placement_rev),
            Compare.unchanged(keys.vm_spec(name), entry.spec_rev),
            Compare(keys.node(to), "create", ">", 0),
            Compare.absent(keys.vm_job(name)),
        ],
        [Put(keys.vm_placement(name), Placement(node=to, at=clock.wall()).dump())],
    )
