"""``/healthz`` and the cluster id every answer carries (``X-AECP-Cluster-Id``)."""

from __future__ import annotations

import asyncio
from typing import Literal

from pydantic import BaseModel

from aecp.cluster.api.deps import NodeContext
from aecp.common.errors import AecpError
from aecp.model.cluster import ClusterInfo
from aecp.store import keys
from aecp.store.base import Store
from aecp.store.typed import read

CLUSTER_ID_HEADER = "X-AECP-Cluster-Id"
STORE_TIMEOUT = 2.0  # s: a health check that waits longer says the store is not answering


class Health(BaseModel):
    status: Literal["ok", "failing"]
    node: str
    store: str  # "ok", or why not
    lease: str  # "held", or "not held"


class ClusterId:
    """The cluster's id, read once it exists (it never changes)."""

    def __init__(self, store: Store) -> None:
        self.store = store
        self._id = ""

    async def get(self) -> str:
        if not self._id:
            try:
                got = await asyncio.wait_for(
                    read(self.store, keys.CLUSTER, ClusterInfo), STORE_TIMEOUT
                )
            except (AecpError, TimeoutError):
                return ""
            self._id = got[0].id if got else ""
        return self._id


async def check_health(store: Store, node: NodeContext) -> Health:
    """The store answers (within ``STORE_TIMEOUT``) and the node holds its lease."""
    try:
        await asyncio.wait_for(store.get(keys.CLUSTER), STORE_TIMEOUT)
        store_state = "ok"
    except TimeoutError:
        store_state = f"no answer within {STORE_TIMEOUT:.0f} s"
    except AecpError as exc:
        store_state = exc.message[:200]
    lease = "held" if node.lease_held() else "not held"
    ok = store_state == "ok" and lease == "held"
    return Health(status="ok" if ok else "failing", node=node.name, store=store_state, lease=lease)
