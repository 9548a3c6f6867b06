"""``/v1/cluster``: the cluster's name and id, and the software version of the node that
answers."""

from __future__ import annotations

from pydantic import BaseModel, Field

from aecp import __version__
from aecp.cluster.api.deps import Node, Service
from aecp.cluster.api.routing import api_router
from aecp.model.cluster import ClusterInfo
from aecp.store import keys
from aecp.store.typed import read

router = api_router("/v1/cluster", "cluster")


class ClusterPublic(BaseModel):
    name: str
    id: str = Field(description="stable for the cluster's life (a UUID); also in every answer's "
                    "X-AECP-Cluster-Id header")  # fmt: skip
    version: str
    served_by: str


@router.get("", operation_id="get_cluster")
async def get_cluster(svc: Service, node: Node) -> ClusterPublic:
    got = await read(svc.store, keys.CLUSTER, ClusterInfo)
    info = got[0] if got else None
    return ClusterPublic(
        name=info.name if info else "",
        id=info.id if info else "",
        version=__version__,
        served_by=node.name,
    )
