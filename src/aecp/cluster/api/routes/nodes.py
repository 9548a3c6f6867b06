"""``/v1/nodes``: the cluster's nodes with capacity, usage and reachability."""

from __future__ import annotations

from fastapi import Response

from aecp.cluster.api.deps import NamePath, Nodes
from aecp.cluster.api.models import EventPublic
from aecp.cluster.api.models.nodes import NodeCordon
from aecp.cluster.api.pages import Page, paginate
from aecp.cluster.api.routing import api_router
from aecp.common.apierrors import error_responses
from aecp.model.node import NodeView

router = api_router("/v1/nodes", "nodes")


@router.get("", operation_id="list_nodes")
async def list_nodes(svc: Nodes, page: Page, response: Response) -> list[NodeView]:
    return paginate(await svc.nodes(), "nodes", lambda n: [n.name], page, response)


@router.get("/{name}", operation_id="get_node", responses=error_responses(404))
async def get_node(name: NamePath, svc: Nodes) -> NodeView:
    return await svc.node(name)


@router.get("/{name}/events", operation_id="list_node_events", responses=error_responses(404))
async def list_node_events(name: NamePath, svc: Nodes) -> list[EventPublic]:
    """What was decided about the node (by controllers, by administrators), newest first."""
    return [EventPublic.of(e) for e in await svc.events(name)]


@router.post("/{name}/cordon", operation_id="cordon_node", responses=error_responses(404))
async def cordon_node(name: NamePath, body: NodeCordon, svc: Nodes) -> NodeView:
    """Place no new VM on the node (the VMs there stay); undone by ``uncordon``."""
    return await svc.set_cordon(name, True, body.reason)


@router.post("/{name}/uncordon", operation_id="uncordon_node", responses=error_responses(404))
async def uncordon_node(name: NamePath, svc: Nodes) -> NodeView:
    """Let VMs be placed on the node again."""
    return await svc.set_cordon(name, False)
