"""Request dependencies: the service, this node's identity, and bearer-token authentication."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Annotated

from fastapi import Depends, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from aecp.cluster.service import ClusterService
from aecp.common.errors import Unauthorized
from aecp.model.cluster import ClusterInfo
from aecp.store import keys
from aecp.store.typed import read


@dataclass(frozen=True)
class NodeContext:
    """The node serving this API: where its VMs' consoles live."""

    name: str
    api_url: str
    run_dir: Path


def service(request: Request) -> ClusterService:
    svc: ClusterService = request.app.state.service
    return svc


def node_context(request: Request) -> NodeContext:
    ctx: NodeContext = request.app.state.node
    return ctx


_bearer = HTTPBearer(auto_error=False, description="the cluster API token")


async def authenticate(
    request: Request,
    creds: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)],
) -> str:
    """The caller's role; ``Unauthorized`` without a valid bearer token."""
    if creds is None or creds.scheme.lower() != "bearer":
        raise Unauthorized("a bearer token is required (Authorization: Bearer <token>)")
    await check_token(request.app.state.service, creds.credentials)
    return "admin"


async def check_token(svc: ClusterService, token: str) -> None:
    got = await read(svc.store, keys.CLUSTER, ClusterInfo)
    if got is None or not got[0].token_ok(token):
        raise Unauthorized("invalid token")


Service = Annotated[ClusterService, Depends(service)]
Principal = Annotated[str, Depends(authenticate)]
"""The caller's name (the shared token's holder is ``admin``)."""
Node = Annotated[NodeContext, Depends(node_context)]
