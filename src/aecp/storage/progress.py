"""Copies in progress, published at ``/aecp/abs/recovery/<extent>/<target>`` on the copier's
lease: shown by ``aecp volume show`` and ``aecp storage status``, and read by the orphan
collectors (``storage.collect``).

A record names the replica being copied into: the orphan collector of the target's node leaves
that replica alone while the record exists, although no extent record names it yet. So:

- a copy's record is put before its target is created or written, and a copy whose record
  cannot be put is not made (``put`` raises);
- records are kept per target: two copiers of one extent (the access points of a volume and of
  its clone share extents, and the Meta leader repairs the extents only snapshots name) may
  copy into different replicas at once, and each must name its own;
- a copier removes only its own record (``clear`` compares the record's ``id``): another
  copier may have put its own under the same key meanwhile.
"""

from __future__ import annotations

import logging
import secrets
from collections.abc import Callable

from pydantic import ValidationError

from aecp.common.errors import AecpError, Unavailable
from aecp.storage.meta.model import RecoveryRecord
from aecp.store import keys
from aecp.store.base import Lease, Store

log = logging.getLogger(__name__)


def new_copy_id() -> str:
    """The ``id`` of a new copy's record."""
    return secrets.token_hex(8)


class RecoveryBoard:
    """The copies in progress of one copier process, in ``store``; ``lease`` gives the lease
    records live on (None from it: none held, nothing can be published). Without ``lease``
    the records carry none (tests)."""

    def __init__(self, store: Store, lease: Callable[[], Lease | None] | None = None) -> None:
        self.store = store
        self._lease = lease

    async def put(self, rec: RecoveryRecord) -> None:
        """Publish ``rec`` (a new copy, or its progress). Raises ``AecpError`` if it was not
        published: the copy must not go on."""
        lease = None
        if self._lease is not None:
            lease = self._lease()
            if lease is None:
                raise Unavailable(f"extent {rec.extent}: no lease to publish a copy on")
        await self.store.put(keys.abs_recovery(rec.extent, rec.target), rec.dump(), lease=lease)

    async def clear(self, rec: RecoveryRecord) -> None:
        """Remove the record of the copy ``rec`` describes if it is still that copy's. Never
        raises: a record left behind only keeps a replica from being collected until the
        copier's lease ends."""
        key = keys.abs_recovery(rec.extent, rec.target)
        try:
            kv = await self.store.get(key)
            if kv is None or RecoveryRecord.load(kv.value).id != rec.id:
                return
            await self.store.delete(key, mod_revision=kv.mod_revision)
        except (AecpError, ValidationError) as exc:
            log.warning("extent %s: record of the copy to %s left: %s", rec.extent, rec.target, exc)
