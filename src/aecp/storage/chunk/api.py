"""The replica contract: what the access point may ask of one replica, local or remote.

``ReplicaClient`` is implemented by ``client.ChunkClient`` (over TCP, the replica protocol of
``wire``) and ``client.LocalChunkClient`` (the node-local ``store.ReplicaStore``, no TCP). The
docstrings below are the spec both follow; ``store.ReplicaStore`` has the same semantics.

Terms. An *extent* replica has a fixed ``size`` (a multiple of the block size, 256 KiB by
default), split into blocks of 64 sectors of 4 KiB. A sector is *valid* once written; invalid
sectors read as zeros. The replica stores the *epoch* (the highest attach epoch seen: writes with
an older one are refused) and the *generation* (raised by writes; set by recovery). Each block
records its *modification generation* (``modgen``), the highest generation it was written under.

Errors (``errors``): ``ChunkInvalid`` for a bad id/range (nothing changed), ``ExtentNotFound``,
``StaleEpoch`` (nothing changed), ``ChecksumError`` (nothing returned), ``ChunkIOError`` (disk),
and for remote replicas ``ReplicaUnavailable``: the server is unreachable, the connection broke
or a request timed out; whether a mutation reached the replica is then unknown.

Durability: a mutation is durable once ``flush`` returns (or at once with ``fua=True``);
``fence``, ``set_generation`` and an epoch raised by ``write`` are durable when they return.
"""

from __future__ import annotations

import re
from abc import ABC, abstractmethod
from array import array
from collections.abc import Awaitable
from dataclasses import dataclass

Buffer = bytes | bytearray | memoryview

EXTENT_ID = re.compile(r"[a-z0-9-]{1,64}")
U64_MAX = (1 << 64) - 1


@dataclass(frozen=True, slots=True)
class ReplicaStat:
    """What a replica holds: sizes in bytes."""

    size: int
    epoch: int
    generation: int
    #: bytes in blocks holding at least one valid sector (thin provisioning)
    allocated_bytes: int
    #: bytes in valid sectors
    valid_bytes: int


@dataclass(frozen=True, slots=True)
class RawBlocks:
    """Whole blocks as copied by recovery: per block its valid bitmap (bit i = sector i of the
    block) and modgen, and ``data`` = the valid sectors only, in order (invalid ones are not
    carried). ``len(data) == sector * sum(popcount(b) for b in bitmaps)``."""

    offset: int
    block_size: int
    sector: int
    bitmaps: tuple[int, ...]
    modgens: tuple[int, ...]
    data: bytes

    @property
    def length(self) -> int:
        return self.block_size * len(self.bitmaps)


class ReplicaClient(ABC):
    """One chunk server's replicas, as the access point sees them."""

    @abstractmethod
    async def create(
        self, extent_id: str, size: int, *, epoch: int = 0, generation: int = 0
    ) -> None:
        """Create an empty (all invalid, thin) replica. Idempotent: if it exists with the same
        size, nothing changes; another size raises ``ExtentExists``. Durable on return."""

    @abstractmethod
    async def delete(self, extent_id: str, epoch: int = 0) -> None:
        """Remove the replica and its space (waits for its in-flight requests). Raises
        ``ExtentNotFound`` if absent. Durable on return. With an ``epoch``, only if the
        replica was not fenced above it (``StaleEpoch``): a leftover may be another access
        point's copy by now."""

    @abstractmethod
    async def stat(self, extent_id: str) -> ReplicaStat:
        """Sizes, epoch and generation of the replica."""

    @abstractmethod
    async def list_extents(self) -> list[str]:
        """Ids of every replica on the node, sorted."""

    @abstractmethod
    def write(
        self,
        extent_id: str,
        offset: int,
        data: Buffer,
        *,
        epoch: int,
        generation: int,
        fua: bool = False,
        crcs: array[int] | None = None,
    ) -> Awaitable[None]:
        """Write ``data`` at ``offset`` (any alignment). Returns an awaitable (a coroutine, or
        a future on the hot path): errors are raised when it is awaited, never by the call.

        ``crcs``: the CRC-32 of each 4 KiB sector of ``data`` (``sector_crcs``), computed by
        the caller once for all replicas. The replica records them instead of computing its
        own, so they must be right: every read verifies against them. Ignored unless they are
        one per sector of a write of whole sectors (a replica with other sectors ignores
        them).

        ``epoch`` older than the stored epoch: ``StaleEpoch``, nothing written. Newer: the
        stored epoch is raised (durably) first. Sectors written become valid; touched blocks get
        ``modgen = max(modgen, generation)``; the replica's generation is raised to
        ``generation`` if lower. A partial sector whose stored data fails its checksum raises
        ``ChecksumError`` and nothing is written. With ``fua`` durable on return."""

    @abstractmethod
    async def read(self, extent_id: str, offset: int, length: int) -> bytes:
        """Exactly ``length`` bytes; invalid sectors read as zeros. Every valid sector read is
        verified: a mismatch raises ``ChecksumError`` naming the sectors, nothing returned."""

    def read_nowait(self, extent_id: str, offset: int, length: int) -> bytes | None:
        """``read`` done at once, without waiting for anything (a local replica whose data is
        in the page cache), or None if it cannot be: then call ``read``. Never raises: what
        would fail is left to ``read``. The default never can."""
        return None

    @abstractmethod
    async def trim(
        self, extent_id: str, offset: int, length: int, *, epoch: int, generation: int
    ) -> None:
        """Make the range read as zeros: whole sectors become invalid, partial ones are written
        with zeros; blocks left without valid sectors release their space. Epoch as ``write``;
        touched blocks get the modgen."""

    @abstractmethod
    async def write_zeroes(
        self, extent_id: str, offset: int, length: int, *, epoch: int, generation: int
    ) -> None:
        """Same effect as ``trim`` (the store is thin: zeros are never stored)."""

    @abstractmethod
    async def flush(self, extent_id: str | None = None) -> None:
        """Make every mutation of the replica (of every replica when ``None``) that completed
        before this call durable: data and metadata."""

    @abstractmethod
    async def fence(self, extent_id: str, epoch: int) -> int:
        """Raise the stored epoch to ``epoch`` (durably) and wait until no request carrying an
        older epoch is still in flight; returns the stored epoch. A lower ``epoch`` raises
        ``StaleEpoch``; an equal one is a no-op."""

    @abstractmethod
    async def set_generation(self, extent_id: str, generation: int) -> None:
        """Set the replica's generation (recovery: after a catch-up). Durable on return."""

    @abstractmethod
    async def modified_since(self, extent_id: str, generation: int) -> list[tuple[int, int]]:
        """``(offset, length)`` block ranges, coalesced and in order, whose modgen is greater
        than ``generation``: what a replica that stopped at ``generation`` must copy."""

    @abstractmethod
    async def allocation(self, extent_id: str) -> list[tuple[int, int, bool]]:
        """``(offset, length, valid)`` runs covering the whole extent, coalesced, in order."""

    @abstractmethod
    async def read_raw(self, extent_id: str, offset: int, length: int) -> RawBlocks:
        """Whole blocks (``offset``, ``length`` block-aligned) with their bitmaps and modgens;
        valid sectors are verified (``ChecksumError``). Recovery only."""

    @abstractmethod
    async def write_raw(self, extent_id: str, raw: RawBlocks, epoch: int | None = None) -> None:
        """Make the blocks exactly as ``raw`` describes (valid sectors, data, modgens); the
        replica generation is unchanged. With ``epoch``: ``StaleEpoch`` if it is older than
        the replica's (a newer access point claimed it), and a newer one is recorded first,
        as for writes. Recovery only: the caller orders it against live writes. Durable after
        ``flush``."""

    @abstractmethod
    async def scrub(self, extent_id: str) -> list[int]:
        """Indexes of the valid sectors whose data fails its checksum (never raises
        ``ChecksumError``)."""

    @abstractmethod
    async def repair(self, extent_id: str, offset: int, data: Buffer, epoch: int = 0) -> None:
        """Write good data over sectors (``offset`` and ``len(data)`` sector-aligned) and make
        them valid, with no modgen change; an ``epoch`` (0: none) is checked as for a write.
        Recovery only: for sectors that ``scrub`` or ``ChecksumError`` reported, with data from a
        healthy replica."""

    @abstractmethod
    async def ping(self) -> None:
        """Return once the replica's server answers."""

    @abstractmethod
    async def close(self) -> None:
        """Release connections; later calls raise ``ReplicaUnavailable``. Idempotent."""
