"""The cluster API application: its routers (every one mounted whatever services a node has,
so the OpenAPI document is always complete), and the error shape of ``errors``."""

from __future__ import annotations

from collections.abc import Awaitable, Callable

from fastapi import FastAPI, Request, Response

from aecp import __version__
from aecp.cluster.api.deps import NodeContext
from aecp.cluster.api.health import CLUSTER_ID_HEADER, ClusterId, Health, check_health
from aecp.cluster.api.routes import (
    cluster,
    console,
    events,
    images,
    migrations,
    networks,
    nodes,
    operations,
    tokens,
    vms,
    vmsnaps,
    volumes,
)
from aecp.cluster.console import ConsoleService
from aecp.cluster.idempotency import IdempotencyKeys
from aecp.cluster.nodes import NodeService
from aecp.cluster.operations import OperationService
from aecp.cluster.principals import PrincipalService
from aecp.cluster.vms import VMService
from aecp.cluster.vmsnapshots import VMSnapshotService
from aecp.cluster.volumes import VolumeService
from aecp.common import apierrors as errors
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
    tokens.router,
    events.router,
    migrations.router,
    migrations.ops_router,
    networks.router,
]


def create_app(
    service: VMService,
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
    app.state.images = service.image_service
    app.state.consoles = ConsoleService(service, node.name, node.run_dir, node.console_socket)
    app.state.nodes = NodeService(service.store, service.clock)
    app.state.operations = OperationService(service.store)
    app.state.principals = PrincipalService(service.store, service.clock)
    app.state.idempotency = IdempotencyKeys(service.store, service.clock)
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

    cluster_id = ClusterId(service.store)

    @app.middleware("http")
    async def with_cluster_id(
        request: Request, call_next: Callable[[Request], Awaitable[Response]]
    ) -> Response:
        response = await call_next(request)
        known = await cluster_id.get()
        if known:
            response.headers[CLUSTER_ID_HEADER] = known
        return response

    @app.get(
        "/healthz",
        tags=["health"],
        operation_id="health",
        responses={503: {"model": Health, "description": "a check failed"}},
    )
    async def healthz(response: Response) -> Health:
        """This node's health (no authentication, no cluster data): the cluster store answers
        and the node holds its lease. 503 when a check fails, with which."""
        health = await check_health(service.store, node)
        if health.status != "ok":
            response.status_code = 503
        return health

    return app
