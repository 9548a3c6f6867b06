"""The cluster API application: its routers (every one mounted whatever services a node has,
so the OpenAPI document is always complete), and the error shape of ``errors``."""

from __future__ import annotations

from fastapi import FastAPI

from aecp import __version__
from aecp.cluster.api import errors
from aecp.cluster.api.deps import NodeContext
from aecp.cluster.api.routes import (
    cluster,
    console,
    images,
    nodes,
    operations,
    vms,
    vmsnaps,
    volumes,
)
from aecp.cluster.service import ClusterService
from aecp.cluster.vmsnapshots import VMSnapshotService
from aecp.cluster.volumes import VolumeService
from aecp.storage.snapshots import SnapshotService

ROUTERS = [
    cluster.router,
    nodes.router,
    vms.router,
    images.router,
    operations.router,
    console.router,
    volumes.router,
    volumes.storage_router,
    vmsnaps.router,
    vmsnaps.templates_router,
]


def create_app(
    service: ClusterService,
    node: NodeContext,
    volume_service: VolumeService | None = None,
    vm_snapshots: VMSnapshotService | None = None,
) -> FastAPI:
    """The API served by a node. Every route except ``/healthz`` needs the bearer token; the
    routes of a service the node was started without answer 503."""
    app = FastAPI(
        title="AECP cluster API",
        version=__version__,
        description="Manage an ACOS cluster: nodes, VMs, images and operations. Every error "
        "answer has the ErrorBody shape.",
    )
    app.state.service = service
    app.state.node = node
    app.state.volumes = volume_service
    app.state.vmsnaps = vm_snapshots
    app.state.snapshots = (
        SnapshotService(volume_service.meta, volume_service.pool) if volume_service else None
    )
    for r in ROUTERS:
        app.include_router(r)
    app.include_router(console.ws_router)
    errors.install(app)

    @app.get("/healthz", tags=["health"], operation_id="health")
    async def healthz() -> dict[str, str]:
        """Liveness of this API process (no authentication, no cluster data)."""
        return {"status": "ok", "node": node.name}

    return app
