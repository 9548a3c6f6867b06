"""Every ABS table at one store revision: volumes, snapshots, extents and recovery copies.

Deciding that nothing names an extent needs the volume *and* snapshot tables of one moment.
Read one after the other, an extent can move between them unseen: a clone of a snapshot made
after the volumes were read and the snapshot deleted before the snapshots were read leaves an
extent that the new volume names and neither read shows. Once no table of one moment names an
extent, none ever will again (tables only take ids from other tables or from new extents), so
a decision taken on ``Tables`` stays true.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from aecp.storage.meta.model import ExtentRecord, RecoveryRecord, SnapshotRecord, VolumeRecord
from aecp.store import keys
from aecp.store.base import Store

#: the prefix of every ABS key (volumes, snapshots, extents, recovery, servers, ...)
ABS_PREFIX = keys.ABS_VOLUMES.removesuffix("volumes/")


@dataclass
class Tables:
    volumes: dict[str, VolumeRecord] = field(default_factory=dict)
    snapshots: list[SnapshotRecord] = field(default_factory=list)
    extents: dict[str, ExtentRecord] = field(default_factory=dict)
    #: store revision of each extent record (for a delete that must not race a change)
    extent_revs: dict[str, int] = field(default_factory=dict)
    #: copies in progress by (extent, target node)
    recoveries: dict[tuple[str, str], RecoveryRecord] = field(default_factory=dict)

    def named_by_volumes(self) -> set[str]:
        return {x for v in self.volumes.values() for x in v.extents if x}

    def named_by_snapshots(self) -> set[str]:
        return {x for s in self.snapshots for x in s.extents if x}

    def referenced(self) -> set[str]:
        """Every extent id some volume or snapshot table names."""
        return self.named_by_volumes() | self.named_by_snapshots()

    def snapshot_only(self) -> dict[str, tuple[ExtentRecord, int, str]]:
        """Extents that snapshots name and no volume does, with the factor to keep (the
        highest of those snapshots') and one snapshot naming it (``volume@snapshot``).
        Nothing can write them any more: a volume writes in place only extents it names."""
        by_volumes = self.named_by_volumes()
        out: dict[str, tuple[ExtentRecord, int, str]] = {}
        for s in self.snapshots:
            for x in s.extents:
                if not x or x in by_volumes or x not in self.extents:
                    continue
                _, factor, label = out.get(x, (None, 0, f"{s.volume}@{s.name}"))
                out[x] = (self.extents[x], max(factor, s.replicas), label)
        return out


async def read_tables(store: Store) -> Tables:
    """``Tables`` as one read of the store (one revision)."""
    t = Tables()
    for kv in await store.list(ABS_PREFIX):
        if kv.key.startswith(keys.ABS_VOLUMES):
            vol = VolumeRecord.load(kv.value)
            t.volumes[vol.name] = vol
        elif kv.key.startswith(keys.ABS_SNAPSHOTS):
            t.snapshots.append(SnapshotRecord.load(kv.value))
        elif kv.key.startswith(keys.ABS_EXTENTS):
            ext = ExtentRecord.load(kv.value)
            t.extents[ext.id] = ext
            t.extent_revs[ext.id] = kv.mod_revision
        elif kv.key.startswith(keys.ABS_RECOVERY):
            rec = RecoveryRecord.load(kv.value)
            t.recoveries[rec.extent, rec.target] = rec
    return t
