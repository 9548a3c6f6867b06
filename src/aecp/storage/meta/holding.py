"""Whether an access point still holds its volume's attachment, as a transaction guard: only
the holder changes a volume's replica sets or settles its undos."""

from __future__ import annotations

from aecp.common.errors import InvalidState
from aecp.storage.meta.model import AttachRecord, Holder
from aecp.store import keys
from aecp.store.base import Compare, Store


class NotHolder(InvalidState):
    """The access point asking no longer holds its volume's attachment."""


async def held_by(store: Store, holder: Holder, what: str) -> Compare:
    """The guard that ``holder`` still holds its volume's attachment as now stored;
    ``NotHolder`` (ending with ``what``: what is left alone) if it does not hold it now."""
    att = await store.get(keys.abs_attach(holder.volume))
    if att is None or not holder.holds(AttachRecord.load(att.value)):
        raise NotHolder(f"volume {holder.volume}: no longer attached by this access point; {what}")
    return Compare.unchanged(keys.abs_attach(holder.volume), att.mod_revision)
