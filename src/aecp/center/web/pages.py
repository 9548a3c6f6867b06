"""The console's pages (``GET``): the dashboard at ``/``, then ``/ui/...``: a cluster (nodes,
VMs, volumes), VMs, a VM (state, disks, snapshots, power, serial console), tasks, alerts,
users and roles, the audit trail.

Each page needs the action the API needs for the same data (``may``: the API's ``needs``),
and reads it with the functions the API's routes use. A page is made of parts; ``?part=NAME``
answers that part alone, which is what the page's script fetches again when the server's
events say its data changed (``live``).
"""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Depends, Query, Request, Response
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import HTMLResponse

from aecp.center import audit
from aecp.center.accounts import Caller
from aecp.center.api import objects as object_api
from aecp.center.api import tasks as task_api
from aecp.center.api.deps import UnitOfWork, center
from aecp.center.inventory import Inventory
from aecp.center.registry import Registry
from aecp.center.roles import ACTIONS
from aecp.center.tasks import TaskState
from aecp.center.web import live, remote, views
from aecp.center.web.alerts import ACKNOWLEDGED, alert_rows
from aecp.center.web.auth import COOKIE, may
from aecp.center.web.render import WebRoute, redirect, render, safe_next
from aecp.common.errors import Forbidden, NotFound, Unauthorized
from aecp.model.vm import PowerOp

router = APIRouter(include_in_schema=False, route_class=WebRoute)
Part = Annotated[str | None, Query(max_length=32, pattern=r"^[a-z]+$")]
MaySession = Annotated[Caller, Depends(may("session.read"))]
MayCluster = Annotated[Caller, Depends(may("cluster.read"))]
MayVM = Annotated[Caller, Depends(may("vm.read"))]
MayTask = Annotated[Caller, Depends(may("task.read"))]
MayAlert = Annotated[Caller, Depends(may("alert.read"))]
MayUser = Annotated[Caller, Depends(may("user.read"))]
MayAudit = Annotated[Caller, Depends(may("audit.read"))]
PAGE = 50
# which power buttons a VM in a state shows
POWER = {
    "running": (PowerOp.SHUTDOWN, PowerOp.POWEROFF, PowerOp.REBOOT, PowerOp.SUSPEND),
    "paused": (PowerOp.RESUME, PowerOp.POWEROFF),
    "stopped": (PowerOp.START,),
    "error": (PowerOp.START, PowerOp.POWEROFF),
    "starting": (PowerOp.POWEROFF,),
    "stopping": (PowerOp.POWEROFF,),
    "rebooting": (PowerOp.POWEROFF,),
    "unschedulable": (PowerOp.POWEROFF,),
}


def power_ops(vm: dict[str, Any]) -> tuple[PowerOp, ...]:
    """The power buttons of ``vm``: by its state (one not placed yet: by its wanted power)."""
    if vm.get("state") == "pending":
        return (PowerOp.START,) if vm.get("power") == "stopped" else (PowerOp.POWEROFF,)
    return POWER.get(str(vm.get("state")), ())


def _registry(request: Request) -> Registry:
    reg: Registry = request.app.state.registry
    return reg


def _inventory(request: Request) -> Inventory:
    inv: Inventory = request.app.state.inventory
    return inv


def page(
    request: Request,
    template: str,
    parts: tuple[str, ...],
    part: str | None,
    since: str | None = None,
    **context: Any,
) -> HTMLResponse:
    """The whole page, or only its part ``part`` (``parts/<page>_<part>.html``). A whole
    page carries the versions of the live topics it was made from (read now unless given:
    from a worker thread, never the event loop)."""
    if part is None:
        if since is None:
            since = live_since(request)
        return render(request, f"{template}.html", since=since, **context)
    if part not in parts:
        raise NotFound(f"page {template} has no part {part!r}", part=part)
    return render(request, f"parts/{template}_{part}.html", **context)


def may_part(who: Caller, part: str | None, needs: dict[str, str]) -> None:
    """``Forbidden`` if part ``part`` of a page shows what ``who`` may not read (the API's
    answer to the same read)."""
    action = needs.get(part or "")
    if action is not None and not who.may(action):
        raise Forbidden(
            f"user {who.user} (role {who.role}) may not {action}", needs=action, role=who.role
        )


def live_since(request: Request) -> str:
    """The versions of the live topics the caller may hear of, now."""
    who: Caller = request.state.caller
    c = center(request)
    with c.sessions() as db:
        return live.encode(live.versions(db, who, c.clock.wall()))


def tasks_of(db: UnitOfWork, who: Caller, **filters: Any) -> tuple[list[Any], int]:
    """Tasks as ``GET /v1/tasks`` lists them for ``who`` (its own only, without
    ``vm.all``), and how many match."""
    answer = Response()
    found = task_api.list_tasks(db, who, answer, **filters)
    return found, int(answer.headers["X-Total-Count"])


def active_tasks(db: UnitOfWork, who: Caller, **filters: Any) -> list[Any]:
    if not who.may("task.read"):
        return []
    executing, _ = tasks_of(db, who, state=TaskState.EXECUTING, **filters)
    pending, _ = tasks_of(db, who, state=TaskState.PENDING, **filters)
    return executing + pending


# ---- login ----------------------------------------------------------------------------------
@router.get("/login")
def login_page(request: Request, next: Annotated[str | None, Query(max_length=512)] = None) -> Any:
    """The login form; a browser with a live session goes on to ``next`` at once."""
    if request.cookies.get(COOKIE):
        try:
            with center(request).sessions() as db:
                center(request).accounts.caller(db, request.cookies[COOKIE])
            return redirect(safe_next(next))
        except Unauthorized:  # an ended session: log in again
            pass
    return render(request, "login.html", next=safe_next(next))


# ---- dashboard ------------------------------------------------------------------------------
@router.get("/")
def dashboard(request: Request, db: UnitOfWork, who: MaySession, part: Part = None) -> Any:
    """Data centers and clusters with their health, counts, open alerts, running tasks
    (each shown to a role that may read it)."""
    dcs = (
        views.datacenters(db, _registry(request), _inventory(request))
        if who.may("cluster.read")
        else []
    )
    return page(
        request,
        "dashboard",
        ("clusters", "tasks", "alerts"),
        part,
        datacenters=dcs,
        totals=views.totals(dcs),
        tasks=active_tasks(db, who),
        alerts=alert_rows(request, db, who, open_only=True) if who.may("alert.read") else [],
        show="open",
        acknowledged=ACKNOWLEDGED,
    )


# ---- clusters and VMs -----------------------------------------------------------------------
@router.get("/ui/clusters/{name}")
def cluster_page(
    name: str, request: Request, db: UnitOfWork, who: MayCluster, part: Part = None
) -> Any:
    """Nodes (``cluster.read``), and what else the role may read: VMs (``vm.read``: its
    own only, without ``vm.all``), volumes (``volume.read``), templates (``vm.read``)."""
    may_part(who, part, {"vms": "vm.read", "volumes": "volume.read", "tasks": "task.read"})
    data = views.cluster_page(db, _registry(request), _inventory(request), name, who)
    return page(
        request,
        "cluster",
        ("summary", "nodes", "vms", "volumes", "tasks"),
        part,
        c=data,
        tasks=active_tasks(db, who, cluster=name),
    )


@router.get("/ui/vms")
def vms_page(
    request: Request,
    db: UnitOfWork,
    who: MayVM,
    part: Part = None,
    cluster: Annotated[str | None, Query(max_length=64)] = None,
) -> Any:
    """Every VM the caller may see (its own only, without ``vm.all``), as ``GET /v1/vms``."""
    found = object_api.list_vms(db, who, Response(), cluster=cluster, limit=1000)
    return page(request, "vms", ("list",), part, vms=[v.model_dump() for v in found])


@router.get("/ui/clusters/{cluster}/vms/{name}")
async def vm_page(
    cluster: str, name: str, request: Request, db: UnitOfWork, who: MayVM, part: Part = None
) -> Any:
    """A VM: its state and power buttons, disks (``volume.read``), snapshots, tasks (and the
    cluster's operations on it: ``cluster.read``), and its serial console."""
    may_part(who, part, {"disks": "volume.read", "tasks": "task.read"})

    def local() -> dict[str, Any]:
        vm = object_api.get_vm(cluster, name, db, who).model_dump()
        inv = _inventory(request)
        return {
            "vm": vm,
            "power": power_ops(vm),
            "disks": views.disks_of(db, inv, cluster, name) if who.may("volume.read") else [],
            "operations": views.operations_on(db, inv, cluster, name)
            if who.may("cluster.read")
            else [],
            "tasks": tasks_of(db, who, cluster=cluster, target=name, limit=10)[0]
            if who.may("task.read")
            else [],
            "since": live_since(request) if part is None else "",
        }

    context = await run_in_threadpool(local)
    if part in (None, "snapshots"):
        context["snapshots"] = await remote.snapshots(request, cluster, name)
    if part in (None, "console"):
        context["console"] = await remote.console_log(request, cluster, name)
    return page(
        request,
        "vm",
        ("state", "disks", "snapshots", "tasks", "console"),
        part,
        cluster=cluster,
        **context,
    )


# ---- tasks ----------------------------------------------------------------------------------
@router.get("/ui/tasks")
def tasks_page(
    request: Request,
    db: UnitOfWork,
    who: MayTask,
    part: Part = None,
    state: Annotated[TaskState | None, Query()] = None,
    cluster: Annotated[str | None, Query(max_length=64)] = None,
    offset: Annotated[int, Query(ge=0, le=1_000_000)] = 0,
) -> Any:
    found, total = tasks_of(
        db, who, state=state, cluster=cluster or None, limit=PAGE, offset=offset
    )
    return page(
        request,
        "tasks",
        ("list",),
        part,
        tasks=found,
        total=total,
        offset=offset,
        step=PAGE,
        state=state.value if state else "",
        cluster=cluster or "",
        states=[s.value for s in TaskState],
    )


@router.get("/ui/tasks/{task_id}")
def task_page(
    task_id: str, request: Request, db: UnitOfWork, who: MayTask, part: Part = None
) -> Any:
    task = task_api.get_task(task_id, db, who)
    return page(request, "task", ("detail",), part, task=task)


# ---- alerts ---------------------------------------------------------------------------------
@router.get("/ui/alerts")
def alerts_page(
    request: Request,
    db: UnitOfWork,
    who: MayAlert,
    part: Part = None,
    show: Annotated[str, Query(pattern="^(open|all)$")] = "open",
) -> Any:
    return page(
        request,
        "alerts",
        ("list",),
        part,
        alerts=alert_rows(request, db, who, open_only=show == "open"),
        show=show,
        acknowledged=ACKNOWLEDGED,
    )


# ---- users, roles, audit --------------------------------------------------------------------
@router.get("/ui/users")
def users_page(request: Request, db: UnitOfWork, who: MayUser) -> Any:
    accounts = center(request).accounts
    roles = accounts.roles(db) if who.may("role.read") else []
    return render(
        request, "users.html", users=accounts.users(db), roles=roles, actions=sorted(ACTIONS)
    )


@router.get("/ui/audit")
def audit_page(
    request: Request,
    db: UnitOfWork,
    who: MayAudit,
    part: Part = None,
    user: Annotated[str | None, Query(max_length=64)] = None,
    action: Annotated[str | None, Query(max_length=64)] = None,
    before: Annotated[int | None, Query(ge=1, le=2**62)] = None,
) -> Any:
    """Newest first, a page at a time (``before``: the last id of the page before)."""
    found = audit.records(db, user or None, action or None, PAGE, before)
    return page(
        request,
        "audit",
        ("list",),
        part,
        records=found,
        user=user or "",
        action=action or "",
        before=before,
        more=found[-1].id if len(found) == PAGE else None,
    )
