"""``/v1/nodes``: the cluster's nodes with capacity, usage and reachability."""

from __future__ import annotations

from fastapi import APIRouter

from aecp.cluster.api.deps import Service
from aecp.model.node import NodeView

router = APIRouter(prefix="/v1/nodes", tags=["nodes"])


@router.get("", operation_id="list_nodes")
async def list_nodes(svc: Service) -> list[NodeView]:
    return await svc.nodes()


@router.get("/{name}", operation_id="get_node")
async def get_node(name: str, svc: Service) -> NodeView:
    return await svc.node(name)
