"""``/v1/images``: images VMs boot from. Upload with ``PUT /v1/images/{name}`` (raw body)."""

from __future__ import annotations

import asyncio
import contextlib
import secrets
import shutil
from pathlib import Path

from fastapi import APIRouter, Query, Request, status

from aecp.cluster.api.deps import Service
from aecp.common.errors import AlreadyExists, ImageError, InvalidInput
from aecp.compute.images import catalog
from aecp.model.base import check_name
from aecp.model.image import ImageFormat, ImageRecord

router = APIRouter(prefix="/v1/images", tags=["images"])

MAX_IMAGE_BYTES = 256 * 1024**3


@router.get("", operation_id="list_images")
async def list_images(svc: Service) -> list[ImageRecord]:
    return await svc.images()


@router.get("/{name}", operation_id="get_image")
async def get_image(name: str, svc: Service) -> ImageRecord:
    return await svc.image(name)


@router.put("/{name}", status_code=status.HTTP_201_CREATED, operation_id="upload_image")
async def upload_image(
    name: str,
    request: Request,
    svc: Service,
    format: ImageFormat | None = Query(None, description="expected format; detected if absent"),
    source: str = Query("", max_length=200, description="where the image came from"),
) -> ImageRecord:
    """Store the request body as image ``name`` after checking format and integrity."""
    check_name("name", name)
    if any(i.name == name for i in await svc.images()):
        raise AlreadyExists(f"image {name} already exists", field="name")
    svc.images_dir.mkdir(parents=True, exist_ok=True)
    tmp = svc.images_dir / f".upload-{name}-{secrets.token_hex(4)}"
    try:
        await _receive(request, tmp)
        info = await asyncio.to_thread(catalog.inspect, tmp, format)
        final = svc.images_dir / f"{name}.{info.format.value}"
        record = ImageRecord(
            name=name,
            format=info.format,
            file=final.name,
            size_bytes=info.size_bytes,
            virtual_size=info.virtual_size,
            sha256=info.sha256,
            created_at=svc.clock.wall(),
            source=source,
        )
        tmp.rename(final)
        try:
            await svc.register_image(record)
        except BaseException:
            final.unlink(missing_ok=True)
            raise
        return record
    finally:
        tmp.unlink(missing_ok=True)


async def _receive(request: Request, dest: Path) -> None:
    free = shutil.disk_usage(dest.parent).free
    declared = request.headers.get("content-length")
    if declared is not None and int(declared) > min(free, MAX_IMAGE_BYTES):
        raise InvalidInput("body", f"{declared} bytes do not fit ({free} bytes free)")
    written = 0
    with dest.open("wb") as f:
        async for chunk in request.stream():
            written += len(chunk)
            if written > MAX_IMAGE_BYTES:
                raise InvalidInput("body", "image larger than the 256 GiB limit")
            await asyncio.to_thread(f.write, chunk)
    if written == 0:
        with contextlib.suppress(OSError):
            dest.unlink()
        raise ImageError("the uploaded image is empty", field="body")


@router.delete("/{name}", status_code=status.HTTP_204_NO_CONTENT, operation_id="delete_image")
async def delete_image(name: str, svc: Service) -> None:
    await svc.delete_image(name)
