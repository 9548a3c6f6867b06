"""``/v1/vms``: create, list, show, power operations and delete."""

from __future__ import annotations

from fastapi import APIRouter, Request, status

from aecp.cluster.api.deps import Service
from aecp.cluster.api.models import Accepted, VMPublic
from aecp.model.vm import PowerOp, VMCreate

router = APIRouter(prefix="/v1/vms", tags=["vms"])


@router.get("", operation_id="list_vms")
async def list_vms(svc: Service) -> list[VMPublic]:
    snap = await svc.snapshot()
    return [VMPublic.from_snapshot(snap, n) for n in sorted(snap.vms)]


@router.post("", status_code=status.HTTP_202_ACCEPTED, operation_id="create_vm")
async def create_vm(body: VMCreate, svc: Service, request: Request) -> Accepted:
    """Create a VM from an image (its disk is filled from it) or, with ``template``, as an
    O(1) clone of a template."""
    if body.template is not None:
        return Accepted(operation=await request.app.state.vmsnaps.create_from_template(body))
    _, op = await svc.create_vm(body)
    return Accepted(operation=op)


@router.get("/{name}", operation_id="get_vm")
async def get_vm(name: str, svc: Service) -> VMPublic:
    _, snap = await svc.vm(name)
    return VMPublic.from_snapshot(snap, name)


@router.delete("/{name}", status_code=status.HTTP_202_ACCEPTED, operation_id="delete_vm")
async def delete_vm(name: str, svc: Service) -> Accepted:
    return Accepted(operation=await svc.delete_vm(name))


@router.post(
    "/{name}/actions/{action}", status_code=status.HTTP_202_ACCEPTED, operation_id="vm_action"
)
async def vm_action(name: str, action: PowerOp, svc: Service) -> Accepted:
    """Power operations: start, shutdown (ACPI), poweroff, reboot, suspend, resume."""
    return Accepted(operation=await svc.power(name, action))
