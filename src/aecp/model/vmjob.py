"""VM jobs: a change of a VM's disks that takes several steps, asked of the VM's node agent.

The API records a ``VMJob`` at ``/aecp/vm-jobs/<vm>`` together with its operation, in one
transaction, and returns the operation; the agent of the node the VM is placed on carries it
out (``node.vmjobs``) and deletes the job in the transaction that ends it. A VM has at most one
job at a time; it is not deleted while it has one.

What each kind does, and what a crash of the agent half-way leaves (the next agent to run the
job first undoes what the interrupted run made, then starts again, so the result is whole or
absent, never partial):

- ``snapshot``: pause the VM if it runs (its I/O drained), snapshot every disk under one name,
  resume it. The snapshots record the operation (``SnapshotRecord.op``), so those of an
  interrupted run are found and deleted before it starts again.
- ``rollback``: return every disk of a stopped VM to a snapshot; repeating it is harmless.
- ``clone``: a new VM whose disks are O(1) clones of this one's (of a snapshot taken as above
  if it runs). Its volumes belong to the new VM (its uuid is in the job) from the start; an
  interrupted run's volumes are deleted unless the new VM was stored.
- ``template``: clone a stopped VM's disks as a template's volumes, store the template (it
  records the operation) and mark the VM deleted, which its agent then carries out.
- ``migrate``: live-migrate the running VM to node ``target`` (``docs/design/migration.md``):
  the source agent runs it, the destination agent only receives; it ends with the VM running
  in exactly one place (the placement moves in the transaction that ends it).
"""

from __future__ import annotations

import enum

from aecp.model.base import Stored


class JobKind(enum.StrEnum):
    SNAPSHOT = "snapshot"
    ROLLBACK = "rollback"
    CLONE = "clone"
    TEMPLATE = "template"
    MIGRATE = "migrate"


# the operation kind of each job (a clone's operation is the new VM's create: it ends when
# the new VM runs, or is stopped if it was not to start)
OP_KINDS = {
    JobKind.SNAPSHOT: "vm.snapshot",
    JobKind.ROLLBACK: "vm.rollback",
    JobKind.CLONE: "vm.create",
    JobKind.TEMPLATE: "vm.template",
    JobKind.MIGRATE: "vm.migrate",
}


class VMJob(Stored):
    """``/aecp/vm-jobs/<vm>``: written by the API, deleted by the VM's agent when it ends."""

    vm: str
    vm_uuid: str  # the VM it was asked of, not a later namesake
    kind: JobKind
    op_id: str
    snapshot: str = ""  # snapshot, rollback: the snapshot's name
    target: str = ""  # clone: the new VM's name; template: the template's name; migrate: node
    source: str = ""  # migrate: the node it runs on when asked
    bandwidth_mib_s: int = 0  # migrate: a cap for this migration (0: the node's setting)
    target_uuid: str = ""  # clone: the new VM's uuid (the owner of its volumes)
    start: bool = True  # clone: power the new VM on
    created_at: float

    def describe(self) -> str:
        """What the job does, for sentences: ``snapshot s1``, ``clone as web2``..."""
        if self.kind is JobKind.SNAPSHOT:
            return f"snapshot {self.snapshot}"
        if self.kind is JobKind.ROLLBACK:
            return f"rollback to snapshot {self.snapshot}"
        if self.kind is JobKind.CLONE:
            return f"clone as VM {self.target}"
        if self.kind is JobKind.MIGRATE:
            return f"live migration from {self.source} to {self.target}"
        return f"conversion to template {self.target}"


def clone_snapshot(op_id: str) -> str:
    """The name of the snapshot a clone of a running VM is made from (deleted after)."""
    return f"clone-{op_id}"
