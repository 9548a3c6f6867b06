"""Volumes and their snapshots as the API shows them: never the stored records (their extent
tables, epochs and copy-on-write counters are ABS's own). The request bodies and the volume's
public shape are the volume service's (``cluster.volumes``)."""

from __future__ import annotations

from pydantic import BaseModel

from aecp.cluster.volumes import (
    ExportCreate,
    ExportPublic,
    VolumeCreate,
    VolumePublic,
    VolumeResize,
)
from aecp.storage.meta.model import SnapshotRecord


class SnapshotPublic(BaseModel):
    volume: str
    name: str
    size: int
    replicas: int
    created_at: float
    ready: bool

    @classmethod
    def of(cls, rec: SnapshotRecord) -> SnapshotPublic:
        return cls(
            volume=rec.volume,
            name=rec.name,
            size=rec.size,
            replicas=rec.replicas,
            created_at=rec.created_at,
            ready=rec.ready,
        )


__all__ = [
    "ExportCreate",
    "ExportPublic",
    "SnapshotPublic",
    "VolumeCreate",
    "VolumePublic",
    "VolumeResize",
]
