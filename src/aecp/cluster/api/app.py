"""The cluster API application: routers, authentication, and the mapping of ``AecpError`` onto
HTTP status codes with a JSON body ``{"error": code, "message": ..., fields...}``."""

from __future__ import annotations

import logging

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse

from aecp import __version__
from aecp.cluster.api.deps import NodeContext, Service, authenticate
from aecp.cluster.api.routes import console, images, nodes, operations, vms, vmsnaps, volumes
from aecp.cluster.service import ClusterService
from aecp.cluster.vmsnapshots import VMSnapshotService
from aecp.cluster.volumes import VolumeService
from aecp.common.errors import AecpError, Unauthorized
from aecp.model.cluster import ClusterInfo
from aecp.storage.snapshots import SnapshotService
from aecp.store import keys
from aecp.store.typed import read

log = logging.getLogger(__name__)


def create_app(
    service: ClusterService,
    node: NodeContext,
    volume_service: VolumeService | None = None,
    vm_snapshots: VMSnapshotService | None = None,
) -> FastAPI:
    """The API served by a node. Every route except ``/healthz`` needs the bearer token."""
    app = FastAPI(
        title="AECP cluster API",
        version=__version__,
        description="Manage an ACOS cluster: nodes, VMs, images and operations.",
    )
    app.state.service = service
    app.state.node = node
    app.state.volumes = volume_service
    app.state.vmsnaps = vm_snapshots
    if volume_service is not None:
        app.state.snapshots = SnapshotService(volume_service.meta, volume_service.pool)
    auth = [Depends(authenticate)]
    routers = [nodes.router, vms.router, images.router, operations.router, console.router]
    if volume_service is not None:
        routers += [volumes.router, volumes.storage_router]
    if vm_snapshots is not None:
        routers += [vmsnaps.router, vmsnaps.templates_router]
    for r in routers:
        app.include_router(r, dependencies=auth)
    app.include_router(console.ws_router)
    app.add_exception_handler(AecpError, _aecp_error)  # type: ignore[arg-type]
    app.add_exception_handler(RequestValidationError, _validation_error)  # type: ignore[arg-type]

    @app.get("/healthz", tags=["health"], operation_id="health")
    async def healthz() -> dict[str, str]:
        """Liveness of this API process (no authentication, no cluster data)."""
        return {"status": "ok", "node": node.name}

    @app.get("/v1/cluster", tags=["cluster"], operation_id="get_cluster", dependencies=auth)
    async def cluster(svc: Service) -> dict[str, object]:
        got = await read(svc.store, keys.CLUSTER, ClusterInfo)
        name = got[0].name if got else ""
        return {"name": name, "version": __version__, "served_by": node.name}

    return app


async def _aecp_error(request: Request, exc: AecpError) -> JSONResponse:
    if exc.http_status >= 500:
        log.warning("%s %s failed: %s", request.method, request.url.path, exc.message)
    headers = {"WWW-Authenticate": "Bearer"} if isinstance(exc, Unauthorized) else None
    return JSONResponse(exc.to_dict(), status_code=exc.http_status, headers=headers)


async def _validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
    errors = exc.errors()
    first = errors[0] if errors else {"loc": ("body",), "msg": "invalid request"}
    field = ".".join(str(p) for p in first["loc"] if p not in ("body", "query", "path"))
    return JSONResponse(
        {
            "error": "invalid_input",
            "message": f"{field or 'body'}: {first['msg']}",
            "field": field,
            "reason": first["msg"],
            "details": [
                {"field": ".".join(str(p) for p in e["loc"]), "reason": e["msg"]} for e in errors
            ],
        },
        status_code=422,
    )
