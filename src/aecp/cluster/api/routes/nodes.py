"""``/v1/nodes``: the cluster's nodes with capacity, usage, reachability and maintenance state;
cordon, and maintenance mode (``docs/design/maintenance.md``)."""

from __future__ import annotations

from fastapi import Response, status

from aecp.cluster.api.deps import NamePath, Nodes
from aecp.cluster.api.models import Accepted, EventPublic
from aecp.cluster.api.models.nodes import NodeCordon, NodeMaintenanceEnter, NodeMaintenanceExit
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


@router.post(
    "/{name}/maintenance/enter",
    status_code=status.HTTP_202_ACCEPTED,
    operation_id="enter_node_maintenance",
    responses=error_responses(404, 409),
)
async def enter_maintenance(
    name: NamePath, svc: Nodes, body: NodeMaintenanceEnter | None = None
) -> Accepted:
    """Run the maintenance pre-checks; if any fails, 409 listing every failing one (the
    error's ``checks``: ``[{check, reason}]``) and nothing changes. Else the node is
    ``entering_maintenance``: no new VM goes to it, its VMs are moved off one at a time
    (follow the operation), then it is in ``maintenance``."""
    body = body or NodeMaintenanceEnter()
    return Accepted.of(await svc.enter_maintenance(name, body.shutdown_unmigratable))


@router.post(
    "/{name}/maintenance/exit",
    status_code=status.HTTP_202_ACCEPTED,
    operation_id="exit_node_maintenance",
    responses=error_responses(404, 409),
)
async def exit_maintenance(
    name: NamePath, svc: Nodes, body: NodeMaintenanceExit | None = None
) -> Accepted:
    """Return a node in maintenance to use (409 if it is not in maintenance); with
    ``restore_vms``, the VMs moved off it are moved back, one at a time."""
    body = body or NodeMaintenanceExit()
    return Accepted.of(await svc.exit_maintenance(name, body.restore_vms))
