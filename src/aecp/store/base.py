"""The cluster-store contract (modelled on Patroni's AbstractDCS).

Keys are ``str`` (UTF-8 on the wire), values ``bytes``. Revisions are etcd's: one counter for the
whole store, bumped by every write.

Error contract, for every method:

- the store cannot be reached (connection refused, no quorum, deadline exceeded) → raise
  ``StoreUnavailable``; nothing is known to have happened;
- a conditional write lost the race (the key changed, exists, or is absent) → return ``False``;
  nothing was written;
- a lease is gone → ``refresh_lease`` raises ``LeaseExpired``; a write naming a dead lease raises
  ``LeaseExpired`` too.
"""

from __future__ import annotations

import enum
from abc import ABC, abstractmethod
from collections.abc import AsyncIterator, Sequence
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass
from typing import Literal


@dataclass(frozen=True)
class KeyValue:
    """One stored key. ``lease`` is 0 when the key has no lease."""

    key: str
    value: bytes
    create_revision: int
    mod_revision: int
    lease: int = 0


@dataclass(frozen=True)
class Lease:
    """A granted lease: keys attached to it vanish when it expires or is revoked."""

    id: int
    ttl: int


class ChangeKind(enum.Enum):
    PUT = "put"
    DELETE = "delete"


@dataclass(frozen=True)
class WatchEvent:
    """A change under a watched prefix. ``value`` is None for DELETE."""

    kind: ChangeKind
    key: str
    value: bytes | None
    mod_revision: int


@dataclass(frozen=True)
class Compare:
    """A transaction guard: ``<target of key> <op> <operand>``.

    ``target`` is ``"value"`` (bytes), ``"mod"`` (mod_revision), ``"create"`` (create_revision;
    0 means the key is absent) or ``"version"``.
    """

    key: str
    target: Literal["value", "mod", "create", "version"]
    op: Literal["==", "!=", "<", ">"]
    operand: bytes | int

    @staticmethod
    def absent(key: str) -> Compare:
        return Compare(key, "create", "==", 0)

    @staticmethod
    def unchanged(key: str, mod_revision: int) -> Compare:
        return Compare(key, "mod", "==", mod_revision)


@dataclass(frozen=True)
class Put:
    key: str
    value: bytes
    lease: Lease | None = None


@dataclass(frozen=True)
class Delete:
    key: str
    prefix: bool = False


Op = Put | Delete


class Store(ABC):
    """What AECP needs from a consistent key-value store (etcd v3 semantics)."""

    @abstractmethod
    async def get(self, key: str) -> KeyValue | None:
        """The key's current value, or None when absent."""

    @abstractmethod
    async def list(self, prefix: str) -> list[KeyValue]:
        """Every key starting with ``prefix``, sorted by key, read at one revision."""

    @abstractmethod
    async def put(self, key: str, value: bytes, *, lease: Lease | None = None) -> int:
        """Write unconditionally; returns the revision of the write."""

    @abstractmethod
    async def create(self, key: str, value: bytes, *, lease: Lease | None = None) -> bool:
        """Write only if the key is absent. False: it exists (nothing written)."""

    @abstractmethod
    async def replace(
        self, key: str, value: bytes, *, mod_revision: int, lease: Lease | None = None
    ) -> bool:
        """Compare-and-swap: write only if the key's mod_revision is still ``mod_revision``."""

    @abstractmethod
    async def delete(self, key: str, *, mod_revision: int | None = None) -> bool:
        """Delete the key (only at ``mod_revision`` when given). False: absent or changed."""

    @abstractmethod
    async def delete_prefix(self, prefix: str) -> int:
        """Delete every key under ``prefix``; returns how many were deleted."""

    @abstractmethod
    async def txn(
        self, compare: Sequence[Compare], success: Sequence[Op], failure: Sequence[Op] = ()
    ) -> bool:
        """Atomically: if every compare holds, apply ``success`` and return True; else apply
        ``failure`` and return False."""

    @abstractmethod
    async def grant_lease(self, ttl: int) -> Lease:
        """A new lease of ``ttl`` seconds (>= 1)."""

    @abstractmethod
    async def refresh_lease(self, lease: Lease) -> int:
        """Keep the lease alive once; returns the TTL granted. Raises ``LeaseExpired`` if gone."""

    @abstractmethod
    async def revoke_lease(self, lease: Lease) -> None:
        """End the lease now, deleting its keys. No error if it is already gone."""

    @abstractmethod
    def watch(
        self, prefix: str, *, start_revision: int | None = None
    ) -> AbstractAsyncContextManager[AsyncIterator[WatchEvent]]:
        """Watch every key under ``prefix``.

        Use as ``async with store.watch(p) as events: async for ev in events: ...``. Events come
        in revision order, starting after the current revision (or at ``start_revision``).
        Iteration raises ``StoreUnavailable`` when the watch breaks; leaving the ``async with``
        cancels the watch. A ``start_revision`` older than the store keeps (compacted) raises
        ``Compacted`` on entering. A reader that falls far behind has its watch broken
        (``StoreUnavailable``) rather than the events held for it without bound.
        """

    @abstractmethod
    async def compact(self, revision: int) -> None:
        """Forget the history before ``revision`` (watches can no longer start there);
        ``ValueError`` for a revision not written yet, ``Compacted`` if it is gone already."""

    @abstractmethod
    async def revision(self) -> int:
        """The store's current revision."""

    @abstractmethod
    async def close(self) -> None:
        """Release connections. The store is unusable afterwards."""
