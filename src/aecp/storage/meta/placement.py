"""Replica placement: which nodes hold the replicas of a new extent.

Rules, in order: replicas on different nodes (and different racks/chassis when nodes are tagged);
the preferred node (the one that will run the VM) gets one replica when it can; then the nodes
with the most free storage. Pure: the caller passes the candidates.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from aecp.common.errors import NoCapacity


@dataclass(frozen=True)
class StorageNode:
    name: str
    free_bytes: int
    rack: str = ""
    chassis: str = ""


def place(
    count: int,
    nodes: Sequence[StorageNode],
    need_bytes: int,
    prefer: str | None = None,
    exclude: Sequence[str] = (),
) -> list[str]:
    """``count`` distinct node names for a new replica set; ``NoCapacity`` if impossible."""
    fits = [n for n in nodes if n.name not in exclude and n.free_bytes >= need_bytes]
    chosen: list[StorageNode] = []
    local = next((n for n in fits if n.name == prefer), None)
    if local is not None:
        chosen.append(local)
    ranked = sorted((n for n in fits if n is not local), key=lambda n: (-n.free_bytes, n.name))
    for domain in ("rack", "chassis", None):
        for n in ranked:
            if len(chosen) == count:
                break
            if n in chosen or (domain and _shares(n, chosen, domain)):
                continue
            chosen.append(n)
    if len(chosen) < count:
        raise NoCapacity(
            f"{count} replicas need {count} nodes with {need_bytes} bytes free; "
            f"{len(fits)} qualify",
            replicas=count,
        )
    return [n.name for n in chosen]


def _shares(n: StorageNode, chosen: list[StorageNode], domain: str) -> bool:
    value = getattr(n, domain)
    return bool(value) and any(getattr(c, domain) == value for c in chosen)
