"""``/v1/vms``: create, list, show, power operations and delete."""

from __future__ import annotations

from typing import Annotated

from fastapi import Query, Request, Response, status

from aecp.cluster.api.deps import NamePath, Service, vm_snapshot_service
from aecp.cluster.api.models import Accepted, EventPublic, VMPublic
from aecp.cluster.api.pages import Page, paginate
from aecp.cluster.api.routing import api_router
from aecp.common.apierrors import error_responses
from aecp.common.names import NAME_PATTERN
from aecp.model.vm import PowerOp, VMCreate, VMState

router = api_router("/v1/vms", "vms")


@router.get("", operation_id="list_vms")
async def list_vms(
    svc: Service,
    page: Page,
    response: Response,
    node: Annotated[str | None, Query(pattern=NAME_PATTERN, description="on this node")] = None,
    state: Annotated[VMState | None, Query(description="in this state")] = None,
) -> list[VMPublic]:
    """VMs by name (``limit``/``cursor`` pages them; ``node`` and ``state`` filter them)."""
    snap = await svc.cluster_view()
    vms = [VMPublic.from_view(snap, n) for n in snap.vms]
    vms = [
        v for v in vms if (node is None or v.node == node) and (state is None or v.state == state)
    ]
    list_id = f"vms?node={node or ''}&state={state.value if state else ''}"
    return paginate(vms, list_id, lambda v: [v.name], page, response)


@router.post(
    "",
    status_code=status.HTTP_202_ACCEPTED,
    operation_id="create_vm",
    responses=error_responses(404, 409),
)
async def create_vm(body: VMCreate, svc: Service, request: Request) -> Accepted:
    """Create a VM from an image (its disk is filled from it) or, with ``template``, as an
    O(1) clone of a template (404 if there is no such template)."""
    if body.template is not None:  # only then: a node without ABS still creates from images
        vmsnaps = vm_snapshot_service(request)
        return Accepted.of(await vmsnaps.create_from_template(body))
    _, op = await svc.create_vm(body)
    return Accepted.of(op)


@router.get("/{name}", operation_id="get_vm", responses=error_responses(404))
async def get_vm(name: NamePath, svc: Service) -> VMPublic:
    _, snap = await svc.vm(name)
    return VMPublic.from_view(snap, name)


@router.get("/{name}/events", operation_id="list_vm_events", responses=error_responses(404))
async def list_vm_events(name: NamePath, svc: Service) -> list[EventPublic]:
    """What controllers decided about the VM (placement, ...), newest first."""
    return [EventPublic.of(e) for e in await svc.vm_events(name)]


@router.delete(
    "/{name}",
    status_code=status.HTTP_202_ACCEPTED,
    operation_id="delete_vm",
    responses=error_responses(404, 409),
)
async def delete_vm(name: NamePath, svc: Service) -> Accepted:
    return Accepted.of(await svc.delete_vm(name))


@router.post(
    "/{name}/actions/{action}",
    status_code=status.HTTP_202_ACCEPTED,
    operation_id="vm_action",
    responses=error_responses(404, 409),
)
async def vm_action(name: NamePath, action: PowerOp, svc: Service) -> Accepted:
    """Power operations: start, shutdown (ACPI), poweroff, reboot, suspend, resume."""
    return Accepted.of(await svc.power(name, action))
