"""``/v1/volumes``: ABS volumes — create, list, show (allocation and per-extent health), resize,
delete, and the NBD URI at which any NBD client reads and writes a volume."""

from __future__ import annotations

from fastapi import APIRouter, Depends, Query, Request, status
from pydantic import BaseModel

from aecp.cluster.volumes import StorageStatus, VolumeCreate, VolumePublic, VolumeService
from aecp.storage.meta.model import VolumeRecord

router = APIRouter(prefix="/v1/volumes", tags=["volumes"])


def volumes(request: Request) -> VolumeService:
    svc: VolumeService = request.app.state.volumes
    return svc


class Resize(BaseModel):
    size: str | int


class Export(BaseModel):
    uri: str


@router.get("", operation_id="list_volumes")
async def list_volumes(svc: VolumeService = Depends(volumes)) -> list[VolumePublic]:
    return await svc.all()


@router.post("", status_code=status.HTTP_201_CREATED, operation_id="create_volume")
async def create_volume(body: VolumeCreate, svc: VolumeService = Depends(volumes)) -> VolumeRecord:
    return await svc.create(body)


@router.get("/{name}", operation_id="get_volume")
async def get_volume(name: str, svc: VolumeService = Depends(volumes)) -> VolumePublic:
    return await svc.show(name)


@router.post("/{name}/resize", operation_id="resize_volume")
async def resize_volume(
    name: str, body: Resize, svc: VolumeService = Depends(volumes)
) -> VolumeRecord:
    return await svc.resize(name, body.size)


@router.delete("/{name}", status_code=status.HTTP_204_NO_CONTENT, operation_id="delete_volume")
async def delete_volume(name: str, svc: VolumeService = Depends(volumes)) -> None:
    await svc.delete(name)


@router.get("/{name}/export", operation_id="export_volume")
async def export_volume(
    name: str,
    node: str | None = Query(None, description="serve through this node"),
    svc: VolumeService = Depends(volumes),
) -> Export:
    return Export(uri=await svc.export_uri(name, node))


storage_router = APIRouter(prefix="/v1/storage", tags=["volumes"])


@storage_router.get("", operation_id="storage_status")
async def storage_status(svc: VolumeService = Depends(volumes)) -> StorageStatus:
    """Storage servers with capacity, and the volumes' health (degraded extents)."""
    return await svc.status()
