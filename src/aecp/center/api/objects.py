"""A cluster's VMs, templates and volumes through the center.

Mutations mirror the cluster API's paths under ``/v1/clusters/{cluster}`` (``POST
/v1/clusters/c1/vms`` is ``POST /v1/vms`` of ``c1``) and answer 202 with a task
(``center.tasks``) that carries the request out; the body is checked here first, so bad
input changes nothing. VMs are listed from the center's copy (``/v1/vms`` across clusters:
filtered, sorted and paged in SQL); other reads (snapshots, the console log, storage, …) are
asked of the cluster live (``/v1/clusters/{cluster}/proxy/{path}``).

A role without ``vm.all`` sees and acts on the VMs its user made through the center only:
another's VM is 404 to a read and 403 to a change (audited; the VM is untouched).
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from typing import Annotated, Any, Literal

import httpx
from fastapi import APIRouter, BackgroundTasks, Depends, Query, Request, Response
from fastapi.concurrency import run_in_threadpool
from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictInt
from sqlalchemy import func, select
from sqlalchemy.orm import Session as DB

from aecp.center import tasks
from aecp.center.accounts import Caller
from aecp.center.api.deps import (
    CenterRoute,
    UnitOfWork,
    audited,
    bearer,
    center,
    needs,
)
from aecp.center.api.tasks import TaskPublic, submitted
from aecp.center.db.models import Cluster, InventoryObject, Task, VMOwner
from aecp.common.apierrors import error_responses
from aecp.common.errors import Forbidden, InvalidInput, NotFound, Unavailable
from aecp.common.sizes import parse_size
from aecp.common.tasks import spawn
from aecp.model.base import Name
from aecp.model.vm import PowerOp, VMCreate, VMState

router = APIRouter(prefix="/v1", dependencies=[Depends(bearer)], route_class=CenterRoute)
MayVMRead = Annotated[Caller, Depends(needs("vm.read"))]
MayVMWrite = Annotated[Caller, Depends(needs("vm.write"))]
MayVMPower = Annotated[Caller, Depends(needs("vm.power"))]
MayVolumeWrite = Annotated[Caller, Depends(needs("volume.write"))]
ACCEPTED = error_responses(401, 403, 404, 422)
ACCEPTED_NEW = error_responses(401, 403, 404, 409, 422)  # a name taken: 409
VMSort = Literal["name", "-name", "cluster", "-cluster", "state", "-state", "node", "-node"]
PROXY_TIMEOUT = 10.0  # s


class NewName(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: Name


class VMClone(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: Name = Field(description="the new VM's name")
    start: StrictBool = True


class VolumeCreate(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: Name
    size: StrictInt | str = Field(description="bytes, or a size like 10G, 512M")
    replicas: StrictInt | None = Field(None, description="1, 2 or 3 (default: by node count)")


class VolumeResize(BaseModel):
    model_config = ConfigDict(extra="forbid")
    size: StrictInt | str = Field(description="bytes, or a size like 10G, 512M")


class VMPublic(BaseModel):
    """A VM as the center's copy has it: the cluster's fields, its cluster, and when it was
    read (an unreachable cluster's VMs keep their last copy: see the cluster's sync
    state)."""

    model_config = ConfigDict(extra="allow")
    cluster: str
    name: str
    state: str
    node: str | None = None
    synced_at: float

    @classmethod
    def of(cls, row: InventoryObject) -> VMPublic:
        data: dict[str, Any] = json.loads(row.data)
        data.update(cluster=row.cluster, name=row.name, synced_at=row.synced_at)
        return cls(**data)


# ---- reads --------------------------------------------------------------------------------
def _owned(who: Caller, q: Any) -> Any:
    """Narrow a query of VMs to ``who``'s own, unless its role has ``vm.all``."""
    if who.may("vm.all"):
        return q
    return q.join(
        VMOwner,
        (VMOwner.cluster == InventoryObject.cluster) & (VMOwner.vm == InventoryObject.name),
    ).where(VMOwner.user == who.user)


@router.get(
    "/vms", tags=["vms"], operation_id="list_all_vms", responses=error_responses(401, 403, 422)
)
def list_vms(
    db: UnitOfWork,
    who: MayVMRead,
    response: Response,
    cluster: Annotated[str | None, Query(max_length=64)] = None,
    state: Annotated[VMState | None, Query()] = None,
    node: Annotated[str | None, Query(max_length=64)] = None,
    name: Annotated[str | None, Query(max_length=64, description="names containing this")] = None,
    sort: Annotated[VMSort, Query(description="a field; '-' first: descending")] = "name",
    limit: Annotated[int, Query(ge=1, le=1000)] = 100,
    offset: Annotated[int, Query(ge=0, le=1_000_000)] = 0,
) -> list[VMPublic]:
    """VMs of every cluster (the center's copy); ``X-Total-Count`` is how many match."""
    q = select(InventoryObject).where(InventoryObject.kind == "vm")
    if cluster is not None:
        q = q.where(InventoryObject.cluster == cluster)
    if state is not None:
        q = q.where(InventoryObject.state == state.value)
    if node is not None:
        q = q.where(InventoryObject.node == node)
    if name:
        q = q.where(InventoryObject.name.contains(name, autoescape=True))
    q = _owned(who, q)
    total = db.scalar(select(func.count()).select_from(q.subquery())) or 0
    # the sort column, then cluster and name to make the order total, all one direction
    # (so an index gives the page without sorting: migration 0008)
    first = getattr(InventoryObject, sort.lstrip("-"))
    keys = [first, *(c for c in (InventoryObject.cluster, InventoryObject.name) if c is not first)]
    q = q.order_by(*(k.desc() if sort.startswith("-") else k for k in keys))
    response.headers["X-Total-Count"] = str(total)
    return [VMPublic.of(row) for row in db.scalars(q.limit(limit).offset(offset))]


@router.get(
    "/clusters/{cluster}/vms/{name}",
    tags=["vms"],
    operation_id="get_cluster_vm",
    responses=error_responses(401, 403, 404),
)
def get_vm(cluster: str, name: str, db: UnitOfWork, who: MayVMRead) -> VMPublic:
    q = select(InventoryObject).where(
        InventoryObject.cluster == cluster,
        InventoryObject.kind == "vm",
        InventoryObject.name == name,
    )
    row = db.scalars(_owned(who, q)).first()
    if row is None:
        raise NotFound(f"no VM {name!r} in cluster {cluster!r}", vm=name, cluster=cluster)
    return VMPublic.of(row)


# what a proxied read needs: the path's first segment → the action
READ_ACTIONS = {
    "vms": "vm.read",
    "templates": "vm.read",
    "volumes": "volume.read",
    "storage": "volume.read",
    "nodes": "cluster.read",
    "operations": "cluster.read",
    "images": "cluster.read",
    "cluster": "cluster.read",
}
_PROXY_PATH = re.compile(r"^v1/([a-z]+)(/[A-Za-z0-9._/-]*)?$")


@router.get(
    "/clusters/{cluster}/proxy/{path:path}",
    tags=["clusters"],
    operation_id="read_cluster",
    responses=error_responses(400, 401, 403, 404, 409, 410, 422, 503),
)
async def read_cluster(cluster: str, path: str, request: Request) -> Response:
    """Ask the cluster a read of its API (``path``: e.g. ``v1/vms/web/snapshots``), with the
    center's credentials, live; the role needs the action of what is read (``vm.read`` for
    ``vms``, ``volume.read`` for ``volumes``, ``cluster.read`` for ``nodes``, …)."""
    m = _PROXY_PATH.match(path)
    kind = m.group(1) if m else ""
    rest = ((m.group(2) if m else "") or "").strip("/")
    action = READ_ACTIONS.get(kind, "cluster.read")

    def check() -> tuple[str, str]:
        c = center(request)
        with c.sessions() as db:
            who = needs(action)(request, db)  # a session, and the action, before anything
            if m is None or ".." in path or kind not in READ_ACTIONS:
                raise NotFound(
                    f"the center does not carry reads of {path!r} (it carries: "
                    f"{', '.join('v1/' + k for k in sorted(READ_ACTIONS))})",
                    path=path,
                )
            if kind == "vms" and rest:
                _check_owner(db, who, cluster, rest.split("/")[0], "GET")
            elif kind == "vms" and not who.may("vm.all"):
                raise Forbidden(
                    f"user {who.user} sees its own VMs only: list them with GET /v1/vms",
                    needs="vm.all",
                )
            row = db.get(Cluster, cluster)
            if row is None:
                raise NotFound(f"no cluster named {cluster!r} is registered", cluster=cluster)
            reg = request.app.state.registry
            return reg.address(row), reg.token(row)

    endpoint, token = await run_in_threadpool(check)
    query = str(request.url.query)
    try:
        r = await shared_client(request.app).get(
            f"{endpoint}/{path}" + (f"?{query}" if query else ""),
            headers={"authorization": f"Bearer {token}"},
            timeout=PROXY_TIMEOUT,
        )
    except httpx.HTTPError as exc:
        if isinstance(exc, httpx.TransportError):  # the next request may find another node
            reg, sessions = request.app.state.registry, center(request).sessions
            spawn(  # in the background: this answer does not wait for it
                reg.failover(sessions, request.app.state.cluster_client, cluster),
                name=f"failover-{cluster}",
            )
        raise Unavailable(
            f"cluster {cluster} did not answer ({type(exc).__name__})", cluster=cluster
        ) from None
    if r.status_code in (401, 403):  # the center's token, not the caller's session
        raise Unavailable(
            f"cluster {cluster} refuses the center's token ({r.status_code}): register it "
            "again with a valid one",
            cluster=cluster,
        )
    headers = {k: v for k, v in r.headers.items() if k.lower() in ("x-next-cursor",)}
    return Response(
        r.content,
        status_code=r.status_code,
        media_type=r.headers.get("content-type"),
        headers=headers,
    )


def shared_client(app: Any) -> httpx.AsyncClient:
    """One HTTP client for the live reads of every request (making one costs ~25 ms of the
    event loop); closed with the center (``main.serve``)."""
    http: httpx.AsyncClient | None = getattr(app.state, "shared_http", None)
    if http is None or http.is_closed:
        http = app.state.shared_http = app.state.cluster_client()
    return http


# ---- changes: tasks -----------------------------------------------------------------------
def _check_owner(db: DB, who: Caller, cluster: str, vm: str, method: str) -> None:
    """``who`` may touch VM ``vm`` (its own, or any with ``vm.all``): a read of another's
    is ``NotFound``, a change ``Forbidden``."""
    if who.may("vm.all"):
        return
    owner = db.get(VMOwner, (cluster, vm))
    if owner is not None and owner.user == who.user:
        return
    if method == "GET":
        raise NotFound(f"no VM {vm!r} in cluster {cluster!r}", vm=vm, cluster=cluster)
    raise Forbidden(
        f"user {who.user} may act only on its own VMs (role {who.role} lacks vm.all); "
        f"{vm} is not one",
        vm=vm,
    )


Call = tasks.ClusterCall | Callable[[], tasks.ClusterCall]


def _task(
    request: Request,
    background: BackgroundTasks,
    db: DB,
    who: Caller,
    *,
    kind: str,
    cluster: str,
    target: str,
    call: Call,
    params: dict[str, Any] | None = None,
    vm: str | None = None,
    makes: str | None = None,
) -> TaskPublic:
    """Check the request (``call`` may be a function that checks the body and makes the
    request) and ownership, record the task and its audit record in the request's unit of
    work, and wake the runner once that commits. A refusal is audited too."""
    now = center(request).clock.wall()

    def work() -> Task:
        made = call() if callable(call) else call
        if vm is not None:
            _check_owner(db, who, cluster, vm, made.method)
        return tasks.submit(
            db,
            kind=kind,
            cluster=cluster,
            target=target,
            user=who.user,
            call=made,
            now=now,
            makes=tasks.Owned(cluster, makes) if makes else None,
        )

    given = params if params is not None else (call.body if not callable(call) else None)
    made = audited(
        request, who.user, kind, f"{cluster}/{target}", given or {}, work, task_of=lambda t: t.id
    )
    submitted(request, background)
    return TaskPublic.of(made)


@router.post(
    "/clusters/{cluster}/vms",
    tags=["vms"],
    operation_id="create_cluster_vm",
    status_code=202,
    responses=ACCEPTED_NEW,
)
def create_vm(
    cluster: str,
    body: VMCreate,
    request: Request,
    background: BackgroundTasks,
    db: UnitOfWork,
    who: MayVMWrite,
) -> TaskPublic:
    """Create a VM in ``cluster`` (the cluster's ``POST /v1/vms``); its maker owns it."""

    def call() -> tasks.ClusterCall:
        body.validate_fields()
        return tasks.ClusterCall("POST", "/v1/vms", body.model_dump(mode="json"))

    return _task(
        request, background, db, who, kind="vm.create", cluster=cluster, target=body.name,
        call=call, params=body.model_dump(mode="json"), makes=body.name,
    )  # fmt: skip


@router.delete(
    "/clusters/{cluster}/vms/{name}",
    tags=["vms"],
    operation_id="delete_cluster_vm",
    status_code=202,
    responses=ACCEPTED,
)
def delete_vm(
    cluster: str,
    name: Name,
    request: Request,
    background: BackgroundTasks,
    db: UnitOfWork,
    who: MayVMWrite,
) -> TaskPublic:
    call = tasks.ClusterCall("DELETE", f"/v1/vms/{name}")
    return _task(
        request, background, db, who, kind="vm.delete", cluster=cluster, target=name,
        call=call, vm=name,
    )  # fmt: skip


@router.post(
    "/clusters/{cluster}/vms/{name}/actions/{action}",
    tags=["vms"],
    operation_id="cluster_vm_action",
    status_code=202,
    responses=ACCEPTED,
)
def vm_action(
    cluster: str,
    name: Name,
    action: PowerOp,
    request: Request,
    background: BackgroundTasks,
    db: UnitOfWork,
    who: MayVMPower,
) -> TaskPublic:
    """Power operations: start, shutdown (ACPI), poweroff, reboot, suspend, resume."""
    call = tasks.ClusterCall("POST", f"/v1/vms/{name}/actions/{action.value}")
    return _task(
        request, background, db, who, kind=f"vm.{action.value}", cluster=cluster,
        target=name, call=call, vm=name,
    )  # fmt: skip


@router.post(
    "/clusters/{cluster}/vms/{name}/snapshots",
    tags=["vms"],
    operation_id="create_cluster_vm_snapshot",
    status_code=202,
    responses=ACCEPTED,
)
def snapshot_vm(
    cluster: str,
    name: Name,
    body: NewName,
    request: Request,
    background: BackgroundTasks,
    db: UnitOfWork,
    who: MayVMWrite,
) -> TaskPublic:
    call = tasks.ClusterCall("POST", f"/v1/vms/{name}/snapshots", body.model_dump())
    return _task(
        request, background, db, who, kind="vm.snapshot", cluster=cluster, target=name,
        call=call, vm=name,
    )  # fmt: skip


@router.delete(
    "/clusters/{cluster}/vms/{name}/snapshots/{snap}",
    tags=["vms"],
    operation_id="delete_cluster_vm_snapshot",
    status_code=202,
    responses=ACCEPTED,
)
def delete_vm_snapshot(
    cluster: str,
    name: Name,
    snap: Name,
    request: Request,
    background: BackgroundTasks,
    db: UnitOfWork,
    who: MayVMWrite,
) -> TaskPublic:
    call = tasks.ClusterCall("DELETE", f"/v1/vms/{name}/snapshots/{snap}")
    return _task(
        request, background, db, who, kind="vm.snapshot.delete", cluster=cluster,
        target=name, call=call, vm=name,
    )  # fmt: skip


@router.post(
    "/clusters/{cluster}/vms/{name}/snapshots/{snap}/rollback",
    tags=["vms"],
    operation_id="rollback_cluster_vm",
    status_code=202,
    responses=ACCEPTED,
)
def rollback_vm(
    cluster: str,
    name: Name,
    snap: Name,
    request: Request,
    background: BackgroundTasks,
    db: UnitOfWork,
    who: MayVMWrite,
) -> TaskPublic:
    call = tasks.ClusterCall("POST", f"/v1/vms/{name}/snapshots/{snap}/rollback")
    return _task(
        request, background, db, who, kind="vm.rollback", cluster=cluster, target=name,
        call=call, vm=name,
    )  # fmt: skip


@router.post(
    "/clusters/{cluster}/vms/{name}/clone",
    tags=["vms"],
    operation_id="clone_cluster_vm",
    status_code=202,
    responses=ACCEPTED_NEW,
)
def clone_vm(
    cluster: str,
    name: Name,
    body: VMClone,
    request: Request,
    background: BackgroundTasks,
    db: UnitOfWork,
    who: MayVMWrite,
) -> TaskPublic:
    """A new VM (owned by the caller) whose disks are O(1) clones of this VM's."""
    call = tasks.ClusterCall("POST", f"/v1/vms/{name}/clone", body.model_dump())
    return _task(
        request, background, db, who, kind="vm.clone", cluster=cluster, target=name,
        call=call, vm=name, makes=body.name,
    )  # fmt: skip


@router.post(
    "/clusters/{cluster}/vms/{name}/convert-to-template",
    tags=["vms"],
    operation_id="convert_cluster_vm_to_template",
    status_code=202,
    responses=ACCEPTED,
)
def convert_vm(
    cluster: str,
    name: Name,
    body: NewName,
    request: Request,
    background: BackgroundTasks,
    db: UnitOfWork,
    who: MayVMWrite,
) -> TaskPublic:
    call = tasks.ClusterCall("POST", f"/v1/vms/{name}/convert-to-template", body.model_dump())
    return _task(
        request, background, db, who, kind="vm.template", cluster=cluster, target=name,
        call=call, vm=name,
    )  # fmt: skip


def _templates_all(request: Request, db: UnitOfWork) -> Caller:
    """Templates are shared: deleting one needs ``vm.write`` over every VM (``vm.all``)."""
    needs("vm.write")(request, db)
    return needs("vm.all")(request, db)


@router.delete(
    "/clusters/{cluster}/templates/{name}",
    tags=["vms"],
    operation_id="delete_cluster_template",
    status_code=202,
    responses=ACCEPTED,
)
def delete_template(
    cluster: str,
    name: Name,
    request: Request,
    background: BackgroundTasks,
    db: UnitOfWork,
    who: Annotated[Caller, Depends(_templates_all)],
) -> TaskPublic:
    call = tasks.ClusterCall("DELETE", f"/v1/templates/{name}")
    return _task(
        request, background, db, who, kind="template.delete", cluster=cluster, target=name,
        call=call,
    )  # fmt: skip


# ---- volumes --------------------------------------------------------------------------------
def _size(value: int | str) -> int:
    size = parse_size("size", value)
    if size <= 0:
        raise InvalidInput("size", f"must be positive, got {size}")
    return size


@router.post(
    "/clusters/{cluster}/volumes",
    tags=["volumes"],
    operation_id="create_cluster_volume",
    status_code=202,
    responses=ACCEPTED,
)
def create_volume(
    cluster: str,
    body: VolumeCreate,
    request: Request,
    background: BackgroundTasks,
    db: UnitOfWork,
    who: MayVolumeWrite,
) -> TaskPublic:

    def call() -> tasks.ClusterCall:
        if body.replicas is not None and body.replicas not in (1, 2, 3):
            raise InvalidInput("replicas", f"must be 1, 2 or 3, got {body.replicas}")
        sent = {"name": body.name, "size": _size(body.size), "replicas": body.replicas}
        return tasks.ClusterCall("POST", "/v1/volumes", sent)

    return _task(
        request, background, db, who, kind="volume.create", cluster=cluster,
        target=body.name, call=call, params=body.model_dump(),
    )  # fmt: skip


@router.post(
    "/clusters/{cluster}/volumes/{name}/resize",
    tags=["volumes"],
    operation_id="resize_cluster_volume",
    status_code=202,
    responses=ACCEPTED,
)
def resize_volume(
    cluster: str,
    name: Name,
    body: VolumeResize,
    request: Request,
    background: BackgroundTasks,
    db: UnitOfWork,
    who: MayVolumeWrite,
) -> TaskPublic:

    def call() -> tasks.ClusterCall:
        return tasks.ClusterCall("POST", f"/v1/volumes/{name}/resize", {"size": _size(body.size)})

    return _task(
        request, background, db, who, kind="volume.resize", cluster=cluster, target=name,
        call=call, params=body.model_dump(),
    )  # fmt: skip


@router.delete(
    "/clusters/{cluster}/volumes/{name}",
    tags=["volumes"],
    operation_id="delete_cluster_volume",
    status_code=202,
    responses=ACCEPTED,
)
def delete_volume(
    cluster: str,
    name: Name,
    request: Request,
    background: BackgroundTasks,
    db: UnitOfWork,
    who: MayVolumeWrite,
) -> TaskPublic:
    call = tasks.ClusterCall("DELETE", f"/v1/volumes/{name}")
    return _task(
        request, background, db, who, kind="volume.delete", cluster=cluster, target=name,
        call=call,
    )  # fmt: skip


@router.post(
    "/clusters/{cluster}/volumes/{name}/snapshots",
    tags=["volumes"],
    operation_id="create_cluster_volume_snapshot",
    status_code=202,
    responses=ACCEPTED,
)
def snapshot_volume(
    cluster: str,
    name: Name,
    body: NewName,
    request: Request,
    background: BackgroundTasks,
    db: UnitOfWork,
    who: MayVolumeWrite,
) -> TaskPublic:
    call = tasks.ClusterCall("POST", f"/v1/volumes/{name}/snapshots", body.model_dump())
    return _task(
        request, background, db, who, kind="volume.snapshot", cluster=cluster, target=name,
        call=call,
    )  # fmt: skip


@router.delete(
    "/clusters/{cluster}/volumes/{name}/snapshots/{snap}",
    tags=["volumes"],
    operation_id="delete_cluster_volume_snapshot",
    status_code=202,
    responses=ACCEPTED,
)
def delete_volume_snapshot(
    cluster: str,
    name: Name,
    snap: Name,
    request: Request,
    background: BackgroundTasks,
    db: UnitOfWork,
    who: MayVolumeWrite,
) -> TaskPublic:
    call = tasks.ClusterCall("DELETE", f"/v1/volumes/{name}/snapshots/{snap}")
    return _task(
        request, background, db, who, kind="volume.snapshot.delete", cluster=cluster,
        target=name, call=call,
    )  # fmt: skip


@router.post(
    "/clusters/{cluster}/volumes/{name}/snapshots/{snap}/clone",
    tags=["volumes"],
    operation_id="clone_cluster_volume_snapshot",
    status_code=202,
    responses=ACCEPTED,
)
def clone_volume_snapshot(
    cluster: str,
    name: Name,
    snap: Name,
    body: NewName,
    request: Request,
    background: BackgroundTasks,
    db: UnitOfWork,
    who: MayVolumeWrite,
) -> TaskPublic:
    call = tasks.ClusterCall(
        "POST", f"/v1/volumes/{name}/snapshots/{snap}/clone", body.model_dump()
    )
    return _task(
        request, background, db, who, kind="volume.clone", cluster=cluster, target=name,
        call=call,
    )  # fmt: skip


@router.post(
    "/clusters/{cluster}/volumes/{name}/snapshots/{snap}/rollback",
    tags=["volumes"],
    operation_id="rollback_cluster_volume",
    status_code=202,
    responses=ACCEPTED,
)
def rollback_volume(
    cluster: str,
    name: Name,
    snap: Name,
    request: Request,
    background: BackgroundTasks,
    db: UnitOfWork,
    who: MayVolumeWrite,
) -> TaskPublic:
    call = tasks.ClusterCall("POST", f"/v1/volumes/{name}/snapshots/{snap}/rollback")
    return _task(
        request, background, db, who, kind="volume.rollback", cluster=cluster, target=name,
        call=call,
    )  # fmt: skip
