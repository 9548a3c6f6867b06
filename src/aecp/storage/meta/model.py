"""Stored ABS metadata: volumes (an ordered table of extent slots) and extents (replica sets with
generations).

A volume slot is ``None`` until the first write to it (thin). An extent's ``replicas`` are the
*valid* replicas: every acknowledged write is on each of them. A replica dropped after a failure
moves to ``stale`` with the generation it had missed from; the extent's ``generation`` is bumped
whenever the valid set changes, so a stale replica can catch up by copying only the blocks
modified at a later generation.
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass
from typing import Literal

from pydantic import Field, ValidationError, ValidatorFunctionWrapHandler, field_validator

from aecp.common.errors import InvalidInput
from aecp.model.base import Stored, check_name

MIB = 1024 * 1024
GIB = 1024 * MIB
DEFAULT_EXTENT_SIZE = 256 * MIB
SECTOR = 512


class VolumeOwner(Stored):
    """Whose disk a volume is: a VM's (named with its uuid, so a later VM of the same name is
    not the owner) or a template's. A volume without one is standalone (made through the volume
    API, or before volumes recorded their owners). A VM only uses, fills or deletes volumes
    that name it as their owner."""

    kind: Literal["vm", "template"]
    name: str
    uid: str = ""  # the VM's uuid

    @classmethod
    def vm(cls, name: str, uuid: str) -> VolumeOwner:
        return cls(kind="vm", name=name, uid=uuid)

    @classmethod
    def template(cls, name: str) -> VolumeOwner:
        return cls(kind="template", name=name)

    def __str__(self) -> str:
        return f"{'VM' if self.kind == 'vm' else 'template'} {self.name}"


class VolumeRecord(Stored):
    """``/aecp/abs/volumes/<name>``."""

    name: str
    size: int
    replicas: int
    extent_size: int
    extents: list[str | None] = Field(default_factory=list)
    epoch: int = 0  # bumped by every attach (and snapshot); replicas reject older epochs
    cow_epoch: int = 0  # bumped by every snapshot: extents from before are shared
    created_at: float = 0.0
    source: str = ""  # "snapshot <volume>@<snap>" for a clone
    # unique per volume ever created: a volume made later under the same name (a clone of a
    # clone, say) must not own the extents the old one left to others
    uid: str = ""
    owner: VolumeOwner | None = None  # None: a standalone volume

    @property
    def slots(self) -> int:
        return len(self.extents)

    @property
    def owner_id(self) -> str:
        """What its extents name as their owner (the name, for volumes made before uids)."""
        return self.uid or self.name


class ExtentRecord(Stored):
    """``/aecp/abs/extents/<id>``."""

    id: str
    size: int
    replicas: list[str]  # valid replicas (node names)
    generation: int = 1
    stale: dict[str, int] = Field(default_factory=dict)  # node -> generation it missed from
    stale_since: dict[str, float] = Field(default_factory=dict)  # node -> when it was dropped
    owner: str = ""  # the volume that allocated it (its ``owner_id``) ...
    owner_epoch: int = 0  # ... at this cow_epoch: only it, at that epoch, writes in place


class AttachRecord(Stored):
    """``/aecp/abs/attach/<volume>``: who serves the volume, under which epoch (on a lease)."""

    volume: str
    node: str
    epoch: int
    at: float
    purpose: str = "io"  # "io" (a client) or "repair" (Meta's recovery: yields to any client)
    ap: str = ""  # the access point instance; a snapshot re-epochs it without fencing it
    closing: bool = False  # its last client left: it flushes, then detaches (a delete waits)


@dataclass(frozen=True)
class Holder:
    """One access point as its attachment record names it: the same instance (``ap``; a
    snapshot may have raised its epoch since), else the same node and epoch."""

    volume: str
    node: str
    epoch: int
    ap: str = ""

    def holds(self, rec: AttachRecord) -> bool:
        same = rec.ap == self.ap if self.ap else rec.epoch == self.epoch
        return rec.volume == self.volume and rec.node == self.node and same


def new_volume_uid() -> str:
    return secrets.token_hex(8)


def new_extent_id() -> str:
    return "ext-" + secrets.token_hex(8)


def validate_volume(name: str, size: int, replicas: int, storage_nodes: int) -> None:
    """``InvalidInput`` naming the first bad field of a new volume."""
    check_name("name", name)
    if size <= 0:
        raise InvalidInput("size", f"must be positive, got {size}")
    if size % SECTOR:
        raise InvalidInput("size", f"must be a multiple of {SECTOR} bytes, got {size}")
    if replicas not in (1, 2, 3):
        raise InvalidInput("replicas", f"must be 1, 2 or 3, got {replicas}")
    if replicas > storage_nodes:
        raise InvalidInput(
            "replicas",
            f"{replicas} replicas need {replicas} storage nodes; the cluster has {storage_nodes}",
        )


def default_replicas(storage_nodes: int) -> int:
    """The product's rule: factor 3 from 5 storage nodes, else 2 (1 on a single node)."""
    if storage_nodes >= 5:
        return 3
    return min(2, max(1, storage_nodes))


def slots_for(size: int, extent_size: int) -> int:
    return (size + extent_size - 1) // extent_size


class StorageServer(Stored):
    """``/aecp/abs/servers/<node>``: a node's storage server, present while the node is alive."""

    node: str
    address: str
    chunk_port: int
    nbd_port: int
    capacity_bytes: int
    free_bytes: int
    used_bytes: int = 0  # held by its replicas (free can be less: the disk is shared)
    rack: str = ""
    chassis: str = ""
    #: its ``storage.overcommit_ratio``: the cluster's is the lowest published (``MetaService``)
    overcommit_ratio: float | None = Field(None, gt=0, allow_inf_nan=False)

    @field_validator("overcommit_ratio", mode="wrap")
    @classmethod
    def _ignore_a_bad_ratio(cls, value: object, handler: ValidatorFunctionWrapHandler) -> object:
        """A published ratio that is not a finite number above 0 is ignored (read as none
        published), rather than failing every read of the servers or admitting against a
        negative or infinite limit."""
        try:
            return handler(value)
        except ValidationError:
            return None


class RecoveryRecord(Stored):
    """``/aecp/abs/recovery/<extent>/<target>``: a copy in progress (on the copier's lease).
    ``id`` tells one copier's record from another's (``storage.progress``)."""

    volume: str
    extent: str
    kind: str  # "catch-up" | "re-replicate"
    target: str
    total_bytes: int
    copied_bytes: int
    started_at: float
    id: str = ""


class UnsettledUndo(Stored):
    """One write (or trim) of extent ``extent`` some replicas refused for want of space,
    whose undo (``storage.refused``) is not settled yet: ``[offset, offset+length)``, the
    replicas that refused it (``full``), took it (``took``) or failed otherwise (``unknown``:
    they may have taken it), and the generation it was sent under."""

    id: str
    extent: str
    offset: int
    length: int
    trim: bool = False
    full: list[str]
    took: list[str]
    unknown: list[str] = Field(default_factory=list)
    generation: int
    at: float = 0.0  # when it was recorded


class UnsettledRecord(Stored):
    """``/aecp/abs/unsettled/<volume>``: every unsettled undo of the volume, in one key so
    that a snapshot or a clone can require its absence in its own transaction
    (``storage.meta.unsettled``)."""

    volume: str
    undos: list[UnsettledUndo]


class SnapshotRecord(Stored):
    """``/aecp/abs/snapshots/<volume>/<snapshot>``: a frozen copy of a volume's extent table.

    Independent of every other snapshot and clone: extents are shared, never chained, and an
    extent lives while any volume or snapshot table names it."""

    volume: str
    name: str
    size: int
    replicas: int
    extent_size: int
    extents: list[str | None]
    created_at: float
    # False while a snapshot of an attached volume is fencing its replicas: until then one of
    # them could still take a write, so it is neither cloned nor rolled back to
    ready: bool = True
    uid: str = ""  # this one, not a namesake taken later (records before it have none)
    op: str = ""  # the VM operation that took it: undone whole if that one is interrupted


def writable_in_place(ext: ExtentRecord, vol: VolumeRecord) -> bool:
    """True if ``vol`` may write ``ext`` without copying it first (it is not shared)."""
    return ext.owner == vol.owner_id and ext.owner_epoch == vol.cow_epoch
