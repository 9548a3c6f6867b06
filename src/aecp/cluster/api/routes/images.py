"""``/v1/images``: images VMs boot from. Upload with ``PUT /v1/images/{name}`` (raw body)."""

from __future__ import annotations

import asyncio
import contextlib
import secrets
import shutil
from pathlib import Path

from fastapi import Query, Request, Response, status

from aecp.cluster.api.deps import NamePath, Service
from aecp.cluster.api.errors import error_responses
from aecp.cluster.api.models.images import ImagePublic
from aecp.cluster.api.pages import Page, paginate
from aecp.cluster.api.routing import api_router
from aecp.cluster.service import ClusterService
from aecp.common.errors import AlreadyExists, ImageError, InvalidInput, Unavailable
from aecp.compute.images import catalog
from aecp.model.image import ImageFormat, ImageRecord

router = api_router("/v1/images", "images")

MAX_IMAGE_BYTES = 256 * 1024**3
RAW_BODY = {
    "requestBody": {
        "required": True,
        "description": "the image file (raw or qcow2)",
        "content": {"application/octet-stream": {"schema": {"type": "string", "format": "binary"}}},
    }
}


@router.get("", operation_id="list_images")
async def list_images(svc: Service, page: Page, response: Response) -> list[ImagePublic]:
    images = [ImagePublic.of(i) for i in await svc.images()]
    return paginate(images, "images", lambda i: [i.name], page, response)


@router.get("/{name}", operation_id="get_image", responses=error_responses(404))
async def get_image(name: NamePath, svc: Service) -> ImagePublic:
    return ImagePublic.of(await svc.image(name))


@router.put(
    "/{name}",
    status_code=status.HTTP_201_CREATED,
    operation_id="upload_image",
    responses=error_responses(409),
    openapi_extra=RAW_BODY,
)
async def upload_image(
    name: NamePath,
    request: Request,
    svc: Service,
    format: ImageFormat | None = Query(None, description="expected format; detected if absent"),
    source: str = Query("", max_length=200, description="where the image came from"),
) -> ImagePublic:
    """Store the request body as image ``name`` after checking format and integrity (422 names
    what is wrong with the file; 503 if this node cannot store it)."""
    if any(i.name == name for i in await svc.images()):
        raise AlreadyExists(f"image {name} already exists", field="name")
    try:
        return ImagePublic.of(await _store(name, request, svc, format, source))
    except OSError as exc:  # the images directory: full, read-only... (never say where it is)
        raise Unavailable(f"cannot store image {name}: {exc.strerror or 'I/O error'}") from None


async def _store(
    name: str, request: Request, svc: ClusterService, format: ImageFormat | None, source: str
) -> ImageRecord:
    svc.images_dir.mkdir(parents=True, exist_ok=True)
    tmp = svc.images_dir / f".upload-{name}-{secrets.token_hex(4)}"
    try:
        await _receive(request, tmp)
        info = await asyncio.to_thread(catalog.inspect, tmp, format)
        # a name of its own: a concurrent upload of the same image name that loses the race
        # deletes its own file, never the winner's
        final = svc.images_dir / f"{name}-{secrets.token_hex(4)}.{info.format.value}"
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
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > min(free, MAX_IMAGE_BYTES):
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


@router.delete(
    "/{name}",
    status_code=status.HTTP_204_NO_CONTENT,
    operation_id="delete_image",
    responses=error_responses(404, 409),
)
async def delete_image(name: NamePath, svc: Service) -> None:
    await svc.delete_image(name)
