"""``/v1/vms/{name}/snapshots``, ``/v1/vms/{name}/clone``, ``/v1/vms/{name}/convert-to-template``
and ``/v1/templates``. Taking a snapshot, rolling back, cloning and converting are carried out
by the VM's node agent: these requests answer 202 with the operation to follow."""

from __future__ import annotations

from fastapi import Response, status

from aecp.cluster.api.deps import NamePath, VMSnapshots, Volumes
from aecp.cluster.api.models import Accepted
from aecp.cluster.api.models.common import NewName
from aecp.cluster.api.models.templates import TemplatePublic
from aecp.cluster.api.models.vms import VMClone
from aecp.cluster.api.pages import Page, paginate
from aecp.cluster.api.routing import api_router
from aecp.cluster.vmsnapshots import VMSnapshot
from aecp.common.apierrors import error_responses

router = api_router("/v1/vms", "vm snapshots")
templates_router = api_router("/v1/templates", "templates")


@router.post(
    "/{name}/snapshots",
    status_code=status.HTTP_202_ACCEPTED,
    operation_id="create_vm_snapshot",
    responses=error_responses(404, 409),
)
async def create_snapshot(name: NamePath, body: NewName, svc: VMSnapshots) -> Accepted:
    """Crash-consistent snapshot of every disk of the VM (paused for the instant), taken by
    the VM's node."""
    return Accepted.of(await svc.snapshot(name, body.name))


@router.get("/{name}/snapshots", operation_id="list_vm_snapshots", responses=error_responses(404))
async def list_snapshots(name: NamePath, svc: VMSnapshots) -> list[VMSnapshot]:
    return await svc.snapshots(name)


@router.delete(
    "/{name}/snapshots/{snap}",
    status_code=status.HTTP_204_NO_CONTENT,
    operation_id="delete_vm_snapshot",
    responses=error_responses(404, 409),
)
async def delete_snapshot(name: NamePath, snap: NamePath, svc: VMSnapshots) -> None:
    await svc.delete(name, snap)


@router.post(
    "/{name}/snapshots/{snap}/rollback",
    status_code=status.HTTP_202_ACCEPTED,
    operation_id="rollback_vm",
    responses=error_responses(404, 409),
)
async def rollback(name: NamePath, snap: NamePath, svc: VMSnapshots) -> Accepted:
    """Return a stopped VM's disks to the snapshot (carried out by the VM's node)."""
    return Accepted.of(await svc.rollback(name, snap))


@router.post(
    "/{name}/clone",
    status_code=status.HTTP_202_ACCEPTED,
    operation_id="clone_vm",
    responses=error_responses(404, 409),
)
async def clone(name: NamePath, body: VMClone, svc: VMSnapshots) -> Accepted:
    """A new VM whose disks are O(1) clones of this VM's (made by this VM's node; the
    operation ends when the new VM runs)."""
    return Accepted.of(await svc.clone(name, body.name, body.start))


@router.post(
    "/{name}/convert-to-template",
    status_code=status.HTTP_202_ACCEPTED,
    operation_id="convert_vm_to_template",
    responses=error_responses(404, 409),
)
async def convert(name: NamePath, body: NewName, svc: VMSnapshots) -> Accepted:
    """Freeze a stopped VM's disks as a template; the VM itself is deleted (carried out by
    the VM's node)."""
    return Accepted.of(await svc.convert_to_template(name, body.name))


@templates_router.get("", operation_id="list_templates")
async def list_templates(page: Page, response: Response, svc: VMSnapshots) -> list[TemplatePublic]:
    templates = [TemplatePublic.of(t) for t in await svc.templates()]
    return paginate(templates, "templates", lambda t: [t.name], page, response)


@templates_router.delete(
    "/{name}",
    status_code=status.HTTP_204_NO_CONTENT,
    operation_id="delete_template",
    responses=error_responses(404, 409),
)
async def delete_template(name: NamePath, svc: VMSnapshots, vols: Volumes) -> None:
    """Delete a template; VMs created from it do not depend on it."""
    await svc.delete_template(name, vols.delete)
