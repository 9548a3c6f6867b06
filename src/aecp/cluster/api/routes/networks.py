"""``/v1/networks``: VM networks — create (a VLAN and an IPv4 subnet), list, show (with the
addresses handed out) and delete (refused while a VM has a NIC on it)."""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Request, Response, status

from aecp.cluster.api.deps import NamePath, service
from aecp.cluster.api.pages import Page, paginate
from aecp.cluster.api.routing import api_router
from aecp.cluster.networks import NetworkPublic, NetworkService
from aecp.common.apierrors import error_responses
from aecp.model.network import NetworkCreate

router = api_router("/v1/networks", "networks")


def network_service(request: Request) -> NetworkService:
    return service(request).networks


Networks = Annotated[NetworkService, Depends(network_service)]


@router.get("", operation_id="list_networks")
async def list_networks(page: Page, response: Response, svc: Networks) -> list[NetworkPublic]:
    return paginate(await svc.all(), "networks", lambda n: [n.name], page, response)


@router.post(
    "",
    status_code=status.HTTP_201_CREATED,
    operation_id="create_network",
    responses=error_responses(409),
)
async def create_network(body: NetworkCreate, svc: Networks) -> NetworkPublic:
    """A VM network: 422 for a VLAN outside 1-4094 or a bad subnet; 409 for a name, VLAN or
    overlapping subnet another network has."""
    return await svc.show((await svc.create(body)).name)


@router.get("/{name}", operation_id="get_network", responses=error_responses(404))
async def get_network(name: NamePath, svc: Networks) -> NetworkPublic:
    """The network and every address handed out in it (to a VM's NIC or a node's bridge)."""
    return await svc.show(name)


@router.delete(
    "/{name}",
    status_code=status.HTTP_204_NO_CONTENT,
    operation_id="delete_network",
    responses=error_responses(404, 409),
)
async def delete_network(name: NamePath, svc: Networks) -> None:
    """Delete the network; 409 naming the VMs while any has a NIC on it."""
    await svc.delete(name)
