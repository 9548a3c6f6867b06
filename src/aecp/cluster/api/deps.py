"""Request dependencies: the services, this node's identity, bearer-token authentication, and
the name rule for path parameters."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path as FilePath
from typing import Annotated

from fastapi import Depends, Path, Request
from fastapi.security import HTTPBearer

from aecp.cluster.service import ClusterService
from aecp.cluster.vmsnapshots import VMSnapshotService
from aecp.cluster.volumes import VolumeService
from aecp.common.errors import StoreUnavailable, Unauthorized, Unavailable
from aecp.common.names import NAME_PATTERN, NAME_RULE
from aecp.model.cluster import ClusterInfo
from aecp.storage.snapshots import SnapshotService
from aecp.store import keys
from aecp.store.typed import read

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


def service(request: Request) -> ClusterService:
    svc: ClusterService = request.app.state.service
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
bearer = HTTPBearer(auto_error=False, description="the cluster API token")


async def authenticate(request: Request) -> str:
    """The caller's name (the shared token's holder is ``admin``); ``Unauthorized`` without a
    valid bearer token. Checked once per request: later calls return the name found."""
    known: str | None = getattr(request.state, "principal", None)
    if known is not None:
        return known
    scheme, _, token = request.headers.get("authorization", "").partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise Unauthorized("a bearer token is required (Authorization: Bearer <token>)")
    await check_token(request.app.state.service, token.strip())
    request.state.principal = "admin"
    return "admin"


async def check_token(svc: ClusterService, token: str) -> None:
    """``Unauthorized`` unless ``token`` is the cluster's. A store that cannot be read says
    only that (``Unavailable`` without its details: the caller is not authenticated yet)."""
    try:
        got = await read(svc.store, keys.CLUSTER, ClusterInfo)
    except StoreUnavailable:
        raise StoreUnavailable(
            "the token cannot be checked now: the cluster store cannot be reached"
        ) from None
    if got is None or not got[0].token_ok(token):
        raise Unauthorized("invalid token")


Service = Annotated[ClusterService, Depends(service)]
Principal = Annotated[str, Depends(authenticate)]
"""The caller's name (the shared token's holder is ``admin``)."""
Node = Annotated[NodeContext, Depends(node_context)]
# a path parameter that names an object
NamePath = Annotated[str, Path(pattern=NAME_PATTERN, description=f"a name: {NAME_RULE}")]
