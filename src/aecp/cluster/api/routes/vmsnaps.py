"""``/v1/vms/{name}/snapshots``, ``/v1/vms/{name}/clone``, ``/v1/vms/{name}/convert-to-template``
and ``/v1/templates``. A snapshot of a running VM must be taken on the VM's node (it pauses the
VM): such requests are forwarded there."""

from __future__ import annotations

from typing import Any

import httpx
from fastapi import Depends, Request, status
from fastapi.responses import Response
from pydantic import BaseModel, ConfigDict, Field, StrictBool

from aecp.cluster.api.deps import NamePath, volume_service
from aecp.cluster.api.deps import vm_snapshot_service as vmsnaps
from aecp.cluster.api.errors import error_responses
from aecp.cluster.api.models import Accepted
from aecp.cluster.api.routing import api_router
from aecp.cluster.vmsnapshots import RunsElsewhere, VMSnapshot, VMSnapshotService
from aecp.common.errors import Unavailable
from aecp.model.base import Name
from aecp.model.template import TemplateRecord

router = api_router("/v1/vms", "vm snapshots")
templates_router = api_router("/v1/templates", "templates")


class Named(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: Name


class CloneRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: Name = Field(description="the new VM's name")
    start: StrictBool = Field(True, description="power the new VM on")


async def forward(request: Request, node: str, body: dict[str, Any] | None) -> Response:
    """Send this request to ``node``'s API and relay its answer."""
    svc: VMSnapshotService = request.app.state.vmsnaps
    snap = await svc.svc.cluster_view()
    if node not in snap.nodes:
        raise Unavailable(f"node {node} is unknown")
    url = snap.nodes[node].api_url + request.url.path
    headers = {"authorization": request.headers.get("authorization", "")}
    try:
        async with httpx.AsyncClient(timeout=120) as client:
            resp = await client.request(request.method, url, json=body, headers=headers)
    except httpx.HTTPError as exc:
        raise Unavailable(f"the VM's node {node} did not answer: {exc}") from None
    return Response(
        resp.content, status_code=resp.status_code, media_type=resp.headers.get("content-type")
    )


@router.post(
    "/{name}/snapshots",
    status_code=status.HTTP_201_CREATED,
    operation_id="create_vm_snapshot",
    response_model=VMSnapshot,
    responses=error_responses(404, 409),
)
async def create_snapshot(
    name: NamePath, body: Named, request: Request, svc: VMSnapshotService = Depends(vmsnaps)
) -> Any:
    """Crash-consistent snapshot of every disk of the VM (paused for the instant)."""
    try:
        return await svc.snapshot(name, body.name)
    except RunsElsewhere as exc:
        return await forward(request, exc.node, body.model_dump())


@router.get("/{name}/snapshots", operation_id="list_vm_snapshots", responses=error_responses(404))
async def list_snapshots(
    name: NamePath, svc: VMSnapshotService = Depends(vmsnaps)
) -> list[VMSnapshot]:
    return await svc.snapshots(name)


@router.delete(
    "/{name}/snapshots/{snap}",
    status_code=status.HTTP_204_NO_CONTENT,
    operation_id="delete_vm_snapshot",
    responses=error_responses(404, 409),
)
async def delete_snapshot(
    name: NamePath, snap: NamePath, svc: VMSnapshotService = Depends(vmsnaps)
) -> None:
    await svc.delete(name, snap)


@router.post(
    "/{name}/snapshots/{snap}/rollback",
    operation_id="rollback_vm",
    responses=error_responses(404, 409),
)
async def rollback(
    name: NamePath, snap: NamePath, svc: VMSnapshotService = Depends(vmsnaps)
) -> VMSnapshot:
    """Return a stopped VM's disks to the snapshot."""
    return await svc.rollback(name, snap)


@router.post(
    "/{name}/clone",
    status_code=status.HTTP_202_ACCEPTED,
    operation_id="clone_vm",
    response_model=Accepted,
    responses=error_responses(404, 409),
)
async def clone(
    name: NamePath, body: CloneRequest, request: Request, svc: VMSnapshotService = Depends(vmsnaps)
) -> Any:
    """A new VM whose disks are O(1) clones of this VM's."""
    try:
        return Accepted(operation=await svc.clone(name, body.name, body.start))
    except RunsElsewhere as exc:
        return await forward(request, exc.node, body.model_dump())


@router.post(
    "/{name}/convert-to-template",
    status_code=status.HTTP_201_CREATED,
    operation_id="convert_vm_to_template",
    responses=error_responses(404, 409),
)
async def convert(
    name: NamePath, body: Named, svc: VMSnapshotService = Depends(vmsnaps)
) -> TemplateRecord:
    """Freeze a stopped VM's disks as a template; the VM itself is deleted."""
    return await svc.convert_to_template(name, body.name)


@templates_router.get("", operation_id="list_templates")
async def list_templates(svc: VMSnapshotService = Depends(vmsnaps)) -> list[TemplateRecord]:
    return await svc.templates()


@templates_router.delete(
    "/{name}",
    status_code=status.HTTP_204_NO_CONTENT,
    operation_id="delete_template",
    responses=error_responses(404, 409),
)
async def delete_template(
    name: NamePath, request: Request, svc: VMSnapshotService = Depends(vmsnaps)
) -> None:
    """Delete a template; VMs created from it do not depend on it."""
    await svc.delete_template(name, volume_service(request).delete)
