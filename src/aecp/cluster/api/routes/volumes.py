"""``/v1/volumes``: ABS volumes — create, list, show (allocation and per-extent health), resize,
delete, and exports: the TLS credential with which one outside NBD client reads and writes a
volume."""

from __future__ import annotations

from fastapi import Response, status

from aecp.cluster.api.deps import NamePath, Principal, Snapshots, Volumes
from aecp.cluster.api.models.common import NewName
from aecp.cluster.api.models.volumes import SnapshotPublic
from aecp.cluster.api.pages import Page, paginate
from aecp.cluster.api.routing import api_router
from aecp.cluster.volumes import (
    ExportCreate,
    ExportPublic,
    StorageStatus,
    VolumeCreate,
    VolumePublic,
    VolumeResize,
)
from aecp.common.apierrors import error_responses

router = api_router("/v1/volumes", "volumes")


@router.get("", operation_id="list_volumes")
async def list_volumes(page: Page, response: Response, svc: Volumes) -> list[VolumePublic]:
    return paginate(await svc.all(), "volumes", lambda v: [v.name], page, response)


@router.post(
    "",
    status_code=status.HTTP_201_CREATED,
    operation_id="create_volume",
    responses=error_responses(409),
)
async def create_volume(body: VolumeCreate, svc: Volumes) -> VolumePublic:
    return await svc.show((await svc.create(body)).name, detail=False)


@router.get("/{name}", operation_id="get_volume", responses=error_responses(404))
async def get_volume(name: NamePath, svc: Volumes) -> VolumePublic:
    return await svc.show(name)


@router.post("/{name}/resize", operation_id="resize_volume", responses=error_responses(404, 409))
async def resize_volume(name: NamePath, body: VolumeResize, svc: Volumes) -> VolumePublic:
    await svc.resize(name, body.size)
    return await svc.show(name, detail=False)


@router.delete(
    "/{name}",
    status_code=status.HTTP_204_NO_CONTENT,
    operation_id="delete_volume",
    responses=error_responses(404, 409),
)
async def delete_volume(name: NamePath, svc: Volumes) -> None:
    await svc.delete(name)


@router.post(
    "/{name}/export",
    status_code=status.HTTP_201_CREATED,
    operation_id="export_volume",
    responses=error_responses(404, 409),
)
async def export_volume(
    name: NamePath, body: ExportCreate, who: Principal, svc: Volumes
) -> ExportPublic:
    """Let one outside NBD client (the holder of the key under ``client_ca_certificate``) read
    and write the volume over NBD with TLS. 409 if the volume is exported already."""
    return await svc.export(name, body, who.name)


@router.get("/{name}/export", operation_id="get_volume_export", responses=error_responses(404))
async def get_volume_export(name: NamePath, svc: Volumes) -> ExportPublic:
    """The volume's export (404 if it has none)."""
    return await svc.export_info(name)


@router.delete(
    "/{name}/export",
    status_code=status.HTTP_204_NO_CONTENT,
    operation_id="unexport_volume",
    responses=error_responses(404),
)
async def unexport_volume(name: NamePath, svc: Volumes) -> None:
    """Revoke the volume's export: its credential opens nothing any more and the connections
    made with it are closed."""
    await svc.unexport(name)


storage_router = api_router("/v1/storage", "volumes")


@storage_router.get("", operation_id="storage_status")
async def storage_status(svc: Volumes) -> StorageStatus:
    """Storage servers with capacity, and the volumes' health (degraded extents)."""
    return await svc.status()


@router.post(
    "/{name}/snapshots",
    status_code=status.HTTP_201_CREATED,
    operation_id="create_volume_snapshot",
    responses=error_responses(404, 409),
)
async def create_snapshot(name: NamePath, body: NewName, svc: Snapshots) -> SnapshotPublic:
    """O(1) snapshot of a volume that no client has attached (VM disks: snapshot the VM)."""
    return SnapshotPublic.of(await svc.snapshot(name, body.name))


@router.get(
    "/{name}/snapshots", operation_id="list_volume_snapshots", responses=error_responses(404)
)
async def list_snapshots(name: NamePath, svc: Snapshots) -> list[SnapshotPublic]:
    return [SnapshotPublic.of(s) for s in await svc.snapshots(name)]


@router.delete(
    "/{name}/snapshots/{snap}",
    status_code=status.HTTP_204_NO_CONTENT,
    operation_id="delete_volume_snapshot",
    responses=error_responses(404, 409),
)
async def delete_snapshot(name: NamePath, snap: NamePath, svc: Snapshots) -> None:
    """Delete a snapshot. Clones made from it do not depend on it and are not affected."""
    await svc.delete(name, snap)


@router.post(
    "/{name}/snapshots/{snap}/clone",
    status_code=status.HTTP_201_CREATED,
    operation_id="clone_volume_snapshot",
    responses=error_responses(404, 409),
)
async def clone_snapshot(
    name: NamePath,
    snap: NamePath,
    body: NewName,
    svc: Snapshots,
    vols: Volumes,
) -> VolumePublic:
    """A new volume with the snapshot's content (O(1), independent of the snapshot)."""
    return await vols.show((await svc.clone(name, snap, body.name)).name, detail=False)


@router.post(
    "/{name}/snapshots/{snap}/rollback",
    operation_id="rollback_volume",
    responses=error_responses(404, 409),
)
async def rollback(
    name: NamePath,
    snap: NamePath,
    svc: Snapshots,
    vols: Volumes,
) -> VolumePublic:
    """Make a detached volume hold the snapshot's content again."""
    await svc.rollback(name, snap)
    return await vols.show(name, detail=False)
