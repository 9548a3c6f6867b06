"""The undos of refused writes that are not settled yet, kept in Meta so that they outlive the
access point that began them: ``/aecp/abs/unsettled/<volume>`` (``UnsettledRecord``).

A write or trim that some replicas refused for want of space is undone by the access point
(``storage.refused``). An undo that its first attempt did not settle is recorded here before
the refused request is answered, so:

- a snapshot or a clone of the volume is refused while any is recorded (``settled``, a guard
  in its own transaction: one key per volume, required absent). A paused VM's drain covers
  the recording, since the request is not answered before it. Otherwise the snapshot would
  keep replicas that disagree, and the undo, once room appeared, would write into an extent
  that only the snapshot names;
- the next access point of the volume (after a close, a lost lease, a migration) and the Meta
  leader's repair attachment of an idle volume finish it (``storage.refused.retry`` reads
  them every pass).

Who changes the key (compare-and-swap on it every time):

- ``add``: any access point that met the refusal, holder or not. One fenced meanwhile knows of
  a disagreement that the newer one does not;
- ``remove``: only the holder of the volume's attachment (guarded in the same transaction),
  once the undo is done and durable on every member. A fenced access point never forgets an
  undo that the newer one must finish;
- a rollback and a volume delete remove the whole key in their own transaction (``delete``):
  the extents it names leave the volume.
"""

from __future__ import annotations

from collections.abc import Collection

from aecp.common.errors import Conflict, InvalidState
from aecp.storage.meta.holding import held_by
from aecp.storage.meta.model import Holder, UnsettledRecord, UnsettledUndo
from aecp.store import keys
from aecp.store.base import Compare, Delete, KeyValue, Put, Store

RETRIES = 8


class Unsettled:
    """The unsettled undos of every volume, in the cluster store."""

    def __init__(self, store: Store) -> None:
        self.store = store

    async def of(self, volume: str) -> list[UnsettledUndo]:
        """The unsettled undos of ``volume``, oldest first."""
        kv = await self.store.get(keys.abs_unsettled(volume))
        return UnsettledRecord.load(kv.value).undos if kv else []

    async def volumes(self) -> set[str]:
        """The volumes that have unsettled undos."""
        kvs = await self.store.list(keys.ABS_UNSETTLED)
        return {keys.last_segment(kv.key, keys.ABS_UNSETTLED) for kv in kvs}

    async def add(self, volume: str, undo: UnsettledUndo) -> None:
        """Record ``undo`` (once: an id already recorded is left as it is)."""
        key = keys.abs_unsettled(volume)
        for _ in range(RETRIES):
            kv = await self.store.get(key)
            undos = UnsettledRecord.load(kv.value).undos if kv else []
            if any(u.id == undo.id for u in undos):
                return
            new = UnsettledRecord(volume=volume, undos=[*undos, undo])
            if await self.store.txn([_unchanged(key, kv)], [Put(key, new.dump())]):
                return
        raise Conflict(f"volume {volume}: its unsettled undos keep changing; try again")

    async def remove(self, holder: Holder, ids: Collection[str]) -> None:
        """Forget the undos ``ids`` of ``holder``'s volume, settled by ``holder``, while it
        holds the volume's attachment (``NotHolder`` otherwise: the one that holds it now
        finishes them). Ids not recorded are ignored."""
        key = keys.abs_unsettled(holder.volume)
        for _ in range(RETRIES):
            kv = await self.store.get(key)
            if kv is None:
                return
            undos = UnsettledRecord.load(kv.value).undos
            left = [u for u in undos if u.id not in ids]
            if len(left) == len(undos):
                return
            guard = await held_by(self.store, holder, "its unsettled undos are left to the holder")
            op: Put | Delete = (
                Put(key, UnsettledRecord(volume=holder.volume, undos=left).dump())
                if left
                else Delete(key)
            )
            if await self.store.txn([guard, Compare.unchanged(key, kv.mod_revision)], [op]):
                return
        raise Conflict(f"volume {holder.volume}: its unsettled undos keep changing; try again")

    async def settled(self, volume: str) -> Compare:
        """The guard that ``volume`` has no unsettled undo, for a transaction that shares its
        extents (a snapshot, a clone); ``InvalidState`` naming the extents if it has some."""
        key = keys.abs_unsettled(volume)
        kv = await self.store.get(key)
        if kv is not None:
            undos = UnsettledRecord.load(kv.value).undos
            extents = sorted({u.extent for u in undos})
            raise InvalidState(
                f"volume {volume}: {len(undos)} writes refused for want of space are not "
                f"undone yet on extent {', '.join(extents)} (its replicas may differ there); "
                "try again once the storage has room and its access point has undone them",
                volume=volume,
                extents=extents,
            )
        return Compare.absent(key)

    @staticmethod
    def delete(volume: str) -> Delete:
        """The operation that forgets every unsettled undo of ``volume``, for a transaction
        after which its extents are no longer its own (a rollback, a delete)."""
        return Delete(keys.abs_unsettled(volume))


def _unchanged(key: str, kv: KeyValue | None) -> Compare:
    return Compare.absent(key) if kv is None else Compare.unchanged(key, kv.mod_revision)
