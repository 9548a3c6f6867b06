"""Errors of the chunk layer (local replica store, replica wire protocol, replica clients).

::

    AecpError
    └── ChunkError                 a replica operation failed (root; raised bare for a remote
        │                          error the protocol has no better name for)
        ├── StaleEpoch             the request carries an epoch older than the replica's
        ├── ChecksumError          stored data does not match its checksum (names the sectors)
        ├── ExtentNotFound         no replica of that extent on this node
        ├── ExtentExists           ``create`` clashes with an existing replica of another size
        ├── ChunkInvalid           bad extent id, offset, length, size or geometry
        ├── ChunkIOError           the disk failed (carries the errno, e.g. ENOSPC)
        ├── ChunkProtocolError     a malformed frame on the replica protocol
        └── ReplicaUnavailable     client side: the chunk server cannot be reached or timed out

Every error except ``ReplicaUnavailable`` and ``ChunkProtocolError`` crosses the wire with a
status code (``wire.Status``) and is raised again by the client with the same class and fields.
"""

from __future__ import annotations

import errno as errno_codes
from collections.abc import Sequence

from aecp.common.errors import AecpError


class ChunkError(AecpError):
    """A replica operation failed."""

    code = "chunk_error"


class ReplicaChanged(ChunkError):
    """A replica changed since it was observed, so a delete conditional on it did nothing."""

    code = "replica_changed"
    http_status = 409

    def __init__(self, extent_id: str) -> None:
        super().__init__(
            f"replica {extent_id} changed since it was observed: not deleted", extent_id=extent_id
        )


class StaleEpoch(ChunkError):
    """``epoch`` is older than the replica's stored epoch ``stored``; nothing was changed."""

    code = "stale_epoch"
    http_status = 409

    def __init__(self, extent_id: str, epoch: int, stored: int) -> None:
        super().__init__(
            f"extent {extent_id}: epoch {epoch} is older than the replica's epoch {stored}",
            extent_id=extent_id,
            epoch=epoch,
            stored=stored,
        )
        self.extent_id = extent_id
        self.epoch = epoch
        self.stored = stored


class ChecksumError(ChunkError):
    """Sectors (4 KiB indexes inside the extent) whose data fails its checksum."""

    code = "checksum_error"

    def __init__(self, extent_id: str, sectors: Sequence[int]) -> None:
        shown = ", ".join(str(s) for s in list(sectors)[:16])
        more = "" if len(sectors) <= 16 else f" (+{len(sectors) - 16} more)"
        super().__init__(
            f"extent {extent_id}: checksum mismatch in sectors {shown}{more}",
            extent_id=extent_id,
            sectors=list(sectors),
        )
        self.extent_id = extent_id
        self.sectors = list(sectors)


class ExtentNotFound(ChunkError):
    code = "extent_not_found"
    http_status = 404

    def __init__(self, extent_id: str) -> None:
        super().__init__(f"extent {extent_id}: no replica here", extent_id=extent_id)
        self.extent_id = extent_id


class ExtentExists(ChunkError):
    """``create`` of an extent that exists with a different size."""

    code = "extent_exists"
    http_status = 409

    def __init__(self, extent_id: str, reason: str) -> None:
        super().__init__(f"extent {extent_id}: {reason}", extent_id=extent_id)
        self.extent_id = extent_id


class ChunkInvalid(ChunkError):
    """A malformed request (bad id, range, size or geometry); nothing was changed."""

    code = "chunk_invalid"
    http_status = 422


class ChunkIOError(ChunkError):
    """The local disk failed; ``errno`` tells how (``ENOSPC`` means the node is full)."""

    code = "chunk_io_error"

    def __init__(self, message: str, errno: int = errno_codes.EIO) -> None:
        super().__init__(message, errno=errno)
        self.errno = errno


class ChunkProtocolError(ChunkError):
    """A frame of the replica protocol is malformed; the connection must be closed."""

    code = "chunk_protocol_error"


class ReplicaUnavailable(ChunkError):
    """The chunk server cannot be reached, closed the connection, or did not answer in time.

    Whether a write that failed this way reached the replica is unknown."""

    code = "replica_unavailable"
    http_status = 503

    def __init__(self, address: str, reason: str) -> None:
        super().__init__(f"replica at {address} unavailable: {reason}", address=address)
        self.address = address
