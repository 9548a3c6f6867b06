"""Request dependencies: the services, this node's identity, bearer-token authentication and
role authorization, and the name rule for path parameters."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path as FilePath
from typing import Annotated

from fastapi import Depends, Path, Request
from fastapi.security import HTTPBearer

from aecp.cluster.console import ConsoleService
from aecp.cluster.images import ImageService
from aecp.cluster.nodes import NodeService
from aecp.cluster.operations import OperationService
from aecp.cluster.principals import PrincipalService
from aecp.cluster.vms import VMService
from aecp.cluster.vmsnapshots import VMSnapshotService
from aecp.cluster.volumes import VolumeService
from aecp.common.errors import Forbidden, Unauthorized, Unavailable
from aecp.common.names import NAME_PATTERN, NAME_RULE
from aecp.common.requester import REQUESTED_BY
from aecp.model.principal import PrincipalRecord, Role
from aecp.storage.snapshots import SnapshotService

ConsoleFinder = Callable[[str], FilePath | None]
"""The serial console socket of the named VM's QEMU on this node (None: it runs none here)."""


@dataclass(frozen=True)
class NodeContext:
    """The node serving this API: where its VMs' logs live (``run_dir/<vm>/``) and how to
    find the console socket of a VM it runs (wherever its QEMU has it: an instance started
    by an older agent keeps the layout of its day)."""

    name: str
    api_url: str
    run_dir: FilePath
    console_socket: ConsoleFinder
    lease_held: Callable[[], bool] = lambda: True  # for /healthz: the node's lease is held


def service(request: Request) -> VMService:
    svc: VMService = request.app.state.service
    return svc


def image_service(request: Request) -> ImageService:
    svc: ImageService = request.app.state.images
    return svc


def node_service(request: Request) -> NodeService:
    svc: NodeService = request.app.state.nodes
    return svc


def operation_service(request: Request) -> OperationService:
    svc: OperationService = request.app.state.operations
    return svc


def consoles(request: Request) -> ConsoleService:
    svc: ConsoleService = request.app.state.consoles
    return svc


def node_context(request: Request) -> NodeContext:
    ctx: NodeContext = request.app.state.node
    return ctx


def _missing(what: str) -> Unavailable:
    return Unavailable(f"this node was started without the {what} service")


def volume_service(request: Request) -> VolumeService:
    svc: VolumeService | None = request.app.state.volumes
    if svc is None:
        raise _missing("volume")
    return svc


def snapshot_service(request: Request) -> SnapshotService:
    svc: SnapshotService | None = request.app.state.snapshots
    if svc is None:
        raise _missing("volume snapshot")
    return svc


def vm_snapshot_service(request: Request) -> VMSnapshotService:
    svc: VMSnapshotService | None = request.app.state.vmsnaps
    if svc is None:
        raise _missing("VM snapshot")
    return svc


# documents the scheme in the OpenAPI document; the check itself is ``authenticate``
bearer = HTTPBearer(auto_error=False, description="a principal's API token")
SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})


def principal_service(request: Request) -> PrincipalService:
    svc: PrincipalService = request.app.state.principals
    return svc


async def authenticate(request: Request) -> PrincipalRecord:
    """The caller's principal; ``Unauthorized`` without a valid bearer token. Checked once
    per request (later calls return the principal found), which then names the operations
    the request creates (``REQUESTED_BY``)."""
    known: PrincipalRecord | None = getattr(request.state, "principal", None)
    if known is not None:
        return known
    scheme, _, token = request.headers.get("authorization", "").partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise Unauthorized("a bearer token is required (Authorization: Bearer <token>)")
    found = await principal_service(request).authenticate(token.strip())
    request.state.principal = found
    REQUESTED_BY.set(found.name)
    return found


def authorize(principal: PrincipalRecord, method: str, needs: Role | None) -> None:
    """``Forbidden`` unless ``principal``'s role allows a ``method`` request on a route that
    ``needs`` a role (None: reads need ``read-only``, anything else ``operator``)."""
    needed = needs or (Role.READ_ONLY if method in SAFE_METHODS else Role.OPERATOR)
    if not principal.role.allows(needed):
        raise Forbidden(
            f"principal {principal.name} has role {principal.role.value}; this request needs "
            f"{needed.value}",
            role=principal.role.value,
            needs=needed.value,
        )


Service = Annotated[VMService, Depends(service)]
Principal = Annotated[PrincipalRecord, Depends(authenticate)]
"""The caller."""
Principals = Annotated[PrincipalService, Depends(principal_service)]
Images = Annotated[ImageService, Depends(image_service)]
Consoles = Annotated[ConsoleService, Depends(consoles)]
Nodes = Annotated[NodeService, Depends(node_service)]
Operations = Annotated[OperationService, Depends(operation_service)]
Volumes = Annotated[VolumeService, Depends(volume_service)]
Snapshots = Annotated[SnapshotService, Depends(snapshot_service)]
VMSnapshots = Annotated[VMSnapshotService, Depends(vm_snapshot_service)]
Node = Annotated[NodeContext, Depends(node_context)]
# a path parameter that names an object
NamePath = Annotated[str, Path(pattern=NAME_PATTERN, description=f"a name: {NAME_RULE}")]
