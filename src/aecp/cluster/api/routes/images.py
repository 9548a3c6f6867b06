"""``/v1/images``: images VMs boot from. Upload with ``PUT /v1/images/{name}`` (raw body);
the service (``cluster.images``) does the work."""

from __future__ import annotations

from fastapi import Query, Request, Response, status

from aecp.cluster.api.deps import Images, NamePath
from aecp.cluster.api.models.images import ImagePublic
from aecp.cluster.api.pages import Page, paginate
from aecp.cluster.api.routing import api_router
from aecp.common.apierrors import error_responses
from aecp.model.image import ImageFormat

router = api_router("/v1/images", "images")

RAW_BODY = {
    "requestBody": {
        "required": True,
        "description": "the image file (raw or qcow2)",
        "content": {"application/octet-stream": {"schema": {"type": "string", "format": "binary"}}},
    }
}


@router.get("", operation_id="list_images")
async def list_images(svc: Images, page: Page, response: Response) -> list[ImagePublic]:
    images = [ImagePublic.of(i) for i in await svc.images()]
    return paginate(images, "images", lambda i: [i.name], page, response)


@router.get("/{name}", operation_id="get_image", responses=error_responses(404))
async def get_image(name: NamePath, svc: Images) -> ImagePublic:
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
    svc: Images,
    format: ImageFormat | None = Query(None, description="expected format; detected if absent"),
    source: str = Query("", max_length=200, description="where the image came from"),
) -> ImagePublic:
    """Store the request body as image ``name`` after checking format and integrity (422 names
    what is wrong with the file; 503 if this node cannot store it)."""
    declared = request.headers.get("content-length", "")
    size = int(declared) if declared.isdigit() else None
    return ImagePublic.of(await svc.upload(name, request.stream(), size, format, source))


@router.delete(
    "/{name}",
    status_code=status.HTTP_204_NO_CONTENT,
    operation_id="delete_image",
    responses=error_responses(404, 409),
)
async def delete_image(name: NamePath, svc: Images) -> None:
    await svc.delete(name)
