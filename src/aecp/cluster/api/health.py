"""``/healthz`` and the cluster id every answer carries (``X-AECP-Cluster-Id``)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import Literal

from pydantic import BaseModel

from aecp.cluster.api.deps import NodeContext
from aecp.common.errors import AecpError
from aecp.common.tasks import spawn
from aecp.model.cluster import ClusterInfo
from aecp.store import keys
from aecp.store.base import Store
from aecp.store.typed import read

CLUSTER_ID_HEADER = "X-AECP-Cluster-Id"
log = logging.getLogger(__name__)
STORE_TIMEOUT = 2.0  # s: a health check that waits longer says the store is not answering


class Health(BaseModel):
    status: Literal["ok", "failing"]
    node: str
    store: str  # "ok", or why not
    lease: str  # "held", or "not held"


class ClusterId:
    """The cluster's id for every answer's header: read once it exists (it never changes).
    An answer waits for the read at most ``WAIT`` seconds, and a failed read is tried again
    after ``RETRY`` seconds, not on every answer: a slow store never slows every answer."""

    WAIT = 0.5
    RETRY = 5.0

    def __init__(self, store: Store) -> None:
        self.store = store
        self._id = ""
        self._loading: asyncio.Task[None] | None = None
        self._tried_at = -1e9  # never tried

    async def get(self) -> str:
        if self._id:
            return self._id
        loop = asyncio.get_running_loop()
        if self._loading is None and loop.time() - self._tried_at >= self.RETRY:
            self._tried_at = loop.time()
            self._loading = spawn(self._load(), name="cluster-id")
        if self._loading is not None:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(asyncio.shield(self._loading), self.WAIT)
        return self._id

    async def _load(self) -> None:
        try:
            got = await asyncio.wait_for(read(self.store, keys.CLUSTER, ClusterInfo), STORE_TIMEOUT)
            self._id = got[0].id if got else ""
        except Exception as exc:
            log.debug("cluster id not read: %r", exc)
        finally:
            self._loading = None


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
