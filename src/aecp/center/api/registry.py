"""``/v1/datacenters`` and ``/v1/clusters``: the organization's data centers and the clusters
registered in them (``center.registry``). A registration asks the cluster first, and stores
nothing unless its endpoint answers and accepts the token."""

from __future__ import annotations

import json
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Depends, Query, Request, status
from fastapi.concurrency import run_in_threadpool
from pydantic import BaseModel, ConfigDict, Field

from aecp.center.accounts import Caller
from aecp.center.api.deps import (
    CenterRoute,
    UnitOfWork,
    audited,
    bearer,
    caller,
    center,
    needs,
    outcome,
    record,
    record_apart,
)
from aecp.center.db.models import Cluster, ClusterSync, Datacenter
from aecp.center.inventory import Inventory
from aecp.center.registry import Registry, probe
from aecp.common.apierrors import error_responses
from aecp.common.errors import AecpError
from aecp.model.base import Name

router = APIRouter(
    prefix="/v1", tags=["registry"], dependencies=[Depends(bearer)], route_class=CenterRoute
)
MayRead = Annotated[Caller, Depends(needs("cluster.read"))]
MayWrite = Annotated[Caller, Depends(needs("cluster.write"))]


class DatacenterCreate(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: Name


class DatacenterPublic(BaseModel):
    name: str
    created_at: float


class ClusterCreate(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: Name
    datacenter: str = Field(max_length=64)
    endpoint: str = Field(max_length=256, description="the cluster API's URL")
    token: str = Field(max_length=512, description="a token of the cluster (operator or admin)")


class ClusterUpdate(BaseModel):
    model_config = ConfigDict(extra="forbid")
    datacenter: str = Field(max_length=64, description="move the cluster to this data center")


class ClusterPublic(BaseModel):
    name: str
    datacenter: str
    endpoint: str
    cluster_id: str
    created_at: float
    sync_state: str = Field("new", description="ok, unreachable, or new (not read yet)")
    last_sync_at: float = Field(0.0, description="the last good sync (0: none yet)")
    sync_error: str = ""

    @classmethod
    def of(cls, c: Cluster, sync: ClusterSync | None = None) -> ClusterPublic:
        return cls(
            name=c.name,
            datacenter=c.datacenter,
            endpoint=c.endpoint,
            cluster_id=c.cluster_id,
            created_at=c.created_at,
            sync_state=sync.state if sync else "new",
            last_sync_at=sync.last_sync_at if sync else 0.0,
            sync_error=sync.error if sync else "",
        )


def registry(request: Request) -> Registry:
    reg: Registry = request.app.state.registry
    return reg


Reg = Annotated[Registry, Depends(registry)]


@router.get("/datacenters", operation_id="list_datacenters", responses=error_responses(401, 403))
def list_datacenters(db: UnitOfWork, reg: Reg, who: MayRead) -> list[DatacenterPublic]:
    return [DatacenterPublic(name=d.name, created_at=d.created_at) for d in reg.datacenters(db)]


@router.post(
    "/datacenters",
    operation_id="create_datacenter",
    status_code=status.HTTP_201_CREATED,
    responses=error_responses(401, 403, 409, 422),
)
def create_datacenter(
    body: DatacenterCreate, request: Request, db: UnitOfWork, reg: Reg, who: MayWrite
) -> DatacenterPublic:
    dc: Datacenter = audited(
        request,
        who.user,
        "datacenter.create",
        body.name,
        body.model_dump(),
        lambda: reg.add_datacenter(db, body.name),
    )
    return DatacenterPublic(name=dc.name, created_at=dc.created_at)


@router.delete(
    "/datacenters/{name}",
    operation_id="delete_datacenter",
    status_code=status.HTTP_204_NO_CONTENT,
    responses=error_responses(401, 403, 404, 409),
)
def delete_datacenter(name: str, request: Request, db: UnitOfWork, reg: Reg, who: MayWrite) -> None:
    audited(
        request, who.user, "datacenter.delete", name, {}, lambda: reg.delete_datacenter(db, name)
    )


@router.get("/clusters", operation_id="list_clusters", responses=error_responses(401, 403, 422))
def list_clusters(
    db: UnitOfWork,
    reg: Reg,
    who: MayRead,
    datacenter: Annotated[str | None, Query(max_length=64)] = None,
) -> list[ClusterPublic]:
    return [ClusterPublic.of(c, db.get(ClusterSync, c.name)) for c in reg.clusters(db, datacenter)]


@router.post(
    "/clusters",
    operation_id="register_cluster",
    status_code=status.HTTP_201_CREATED,
    responses=error_responses(401, 403, 409, 422),
)
async def register_cluster(
    body: ClusterCreate, request: Request, reg: Reg, who: MayWrite
) -> ClusterPublic:
    """Register a cluster: its endpoint must answer as a cluster's API and accept the token
    (422 naming ``endpoint`` or ``token`` otherwise); nothing is stored before both hold."""
    c = center(request)
    params: dict[str, Any] = body.model_dump()
    try:

        def precheck() -> None:
            with c.sessions() as db:
                reg.check_new(db, body.name, body.datacenter, body.endpoint)

        await run_in_threadpool(precheck)
        checked = await probe(request.app.state.cluster_client, body.endpoint, body.token)

        def store() -> ClusterPublic:
            with c.sessions.begin() as db:
                made = reg.add(db, body.name, body.datacenter, checked, body.token)
                record(db, request, who.user, "cluster.register", body.name, params, "ok")
                return ClusterPublic.of(made)

        made = await run_in_threadpool(store)
        syncer = getattr(request.app.state, "syncer", None)
        if syncer is not None:
            syncer.watch(made.name)
        return made
    except AecpError as exc:
        why = outcome(exc)
        await run_in_threadpool(
            record_apart, request, who.user, "cluster.register", body.name, params, why
        )
        raise


@router.patch(
    "/clusters/{name}",
    operation_id="move_cluster",
    responses=error_responses(401, 403, 404, 422),
)
def move_cluster(
    name: str, body: ClusterUpdate, request: Request, db: UnitOfWork, reg: Reg, who: MayWrite
) -> ClusterPublic:
    moved: Cluster = audited(
        request,
        who.user,
        "cluster.move",
        name,
        body.model_dump(),
        lambda: reg.move(db, name, body.datacenter),
    )
    return ClusterPublic.of(moved)


@router.delete(
    "/clusters/{name}",
    operation_id="remove_cluster",
    status_code=status.HTTP_204_NO_CONTENT,
    responses=error_responses(401, 403, 404, 409),
)
async def remove_cluster(name: str, request: Request, reg: Reg, who: MayWrite) -> None:
    """Stop managing the cluster (the cluster itself is not touched); its copy goes. Refused
    (409) while tasks on it are unfinished."""
    syncer = getattr(request.app.state, "syncer", None)
    if syncer is not None:
        await syncer.forget(name)

    def remove() -> None:
        c = center(request)
        with c.sessions.begin() as db:
            request.state.db = db
            audited(request, who.user, "cluster.remove", name, {}, lambda: reg.remove(db, name))

    try:
        await run_in_threadpool(remove)
    except AecpError:
        if syncer is not None:  # still managed: its copy is kept current again
            syncer.watch(name)
        raise


INVENTORY_ACTIONS = {
    "node": ("cluster.read",),
    "operation": ("cluster.read",),
    "volume": ("volume.read",),
    "template": ("vm.read",),
    "vm": ("vm.read", "vm.all"),
}


def inventory_reader(request: Request, db: UnitOfWork) -> Caller:
    """The caller, if its role has the actions of the kind asked for (checked before the
    kind itself is: an unknown kind needs ``cluster.read``)."""
    who = caller(request, db)
    for action in INVENTORY_ACTIONS.get(request.path_params.get("kind", ""), ("cluster.read",)):
        needs(action)(request, db)
    return who


class InventoryPublic(BaseModel):
    cluster: str
    kind: str
    name: str
    data: dict[str, Any]
    synced_at: float


@router.get(
    "/inventory/{kind}",
    operation_id="list_inventory",
    responses=error_responses(401, 403, 422),
)
def list_inventory(
    kind: Literal["node", "vm", "volume", "template", "operation"],
    request: Request,
    db: UnitOfWork,
    who: Annotated[Caller, Depends(inventory_reader)],
    cluster: Annotated[str | None, Query(max_length=64)] = None,
) -> list[InventoryPublic]:
    """The center's copy of every cluster's objects of ``kind`` (each with the time it was
    read: a cluster that is unreachable keeps its last copy, see its sync state). The role
    needs the kind's action: ``cluster.read`` (nodes, operations), ``volume.read``,
    ``vm.read`` (templates) or ``vm.read`` with ``vm.all`` (VMs: ``GET /v1/vms`` shows a
    user its own)."""
    inv: Inventory = request.app.state.inventory
    return [
        InventoryPublic(
            cluster=o.cluster,
            kind=o.kind,
            name=o.name,
            data=json.loads(o.data),
            synced_at=o.synced_at,
        )
        for o in inv.objects(db, kind, cluster)
    ]
