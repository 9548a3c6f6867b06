"""The console's forms (``POST``): log in and out, create a VM, power it, delete it, cancel a
task, and administer users and roles.

Every form is checked to come from the console's own pages (``same_origin``) before anything
else, needs the action the API needs (``may``: the API's ``needs``, which audits a refusal),
and is carried out by the very functions the API's routes call: a VM's create, power and
delete by the routes of ``api.objects`` (a task, audited with its id), users and roles by
``Accounts`` through ``audited``. The answer is a redirect (303) to the page that shows the
result; a refusal goes back to the form's page with the reason (``render.failed``).
"""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, BackgroundTasks, Depends, Path, Request
from fastapi.responses import RedirectResponse
from pydantic import ValidationError

from aecp.center.accounts import Caller
from aecp.center.api import alerts as alert_api
from aecp.center.api import objects as object_api
from aecp.center.api import tasks as task_api
from aecp.center.api.deps import (
    UnitOfWork,
    audited,
    center,
    outcome,
    record,
    record_apart,
)
from aecp.center.roles import parse_actions
from aecp.center.web.auth import (
    Form,
    end_session,
    may,
    same_origin,
    session_caller,
    session_token,
    set_session,
)
from aecp.center.web.render import WebRoute, back, flash, redirect, safe_next
from aecp.common.errors import AecpError, InvalidInput
from aecp.model.vm import PowerOp, VMCreate

router = APIRouter(
    include_in_schema=False, route_class=WebRoute, dependencies=[Depends(same_origin)]
)


MayVMWrite = Annotated[Caller, Depends(may("vm.write"))]
MayVMPower = Annotated[Caller, Depends(may("vm.power"))]
MayTaskWrite = Annotated[Caller, Depends(may("task.write"))]
MayUserWrite = Annotated[Caller, Depends(may("user.write"))]
MayRoleWrite = Annotated[Caller, Depends(may("role.write"))]
MayAlertWrite = Annotated[Caller, Depends(may("alert.write"))]


def field(form: Form, name: str, limit: int = 256) -> str:
    value = str(form.get(name) or "")
    if len(value) > limit:
        raise InvalidInput(name, f"at most {limit} characters")
    return value


def number(form: Form, name: str, default: int) -> int:
    raw = field(form, name, 16).strip()
    if not raw:
        return default
    try:
        return int(raw)
    except ValueError:
        raise InvalidInput(name, f"must be a whole number, got {raw!r}") from None


def done(to: str, message: str) -> RedirectResponse:
    response = redirect(to)
    flash(response, "ok", message)
    return response


# ---- sessions -------------------------------------------------------------------------------
@router.post("/login")
def login(request: Request, form: Form, db: UnitOfWork) -> Any:
    """``Accounts.login``, audited as the API's ``POST /v1/login``; the token goes in the
    session cookie (never in the page)."""
    c = center(request)
    user = field(form, "user", 64)
    password = field(form, "password", 1024)
    try:
        token, expires = c.accounts.login(db, user, password)
    except AecpError as exc:
        db.commit()  # the failed attempt counts (lock-out)
        record_apart(request, user, "session.login", user, {}, outcome(exc))
        response = redirect(back(request, "/login"))
        flash(response, "error", exc.message)
        return response
    record(db, request, user, "session.login", user, {}, "ok")
    response = redirect(safe_next(field(form, "next", 512)))
    set_session(request, response, token, expires - c.clock.wall())
    return response


@router.post("/logout")
def logout(request: Request, db: UnitOfWork) -> Any:
    who = session_caller(request, db)
    token = session_token(request)
    audited(
        request,
        who.user,
        "session.logout",
        who.user,
        {},
        lambda: center(request).accounts.logout(db, token),
    )
    response = redirect("/login")
    end_session(response)
    return response


# ---- VMs ------------------------------------------------------------------------------------
@router.post("/ui/clusters/{cluster}/vms")
def create_vm(
    cluster: str,
    request: Request,
    form: Form,
    background: BackgroundTasks,
    db: UnitOfWork,
    who: MayVMWrite,
) -> Any:
    """The API's ``POST /v1/clusters/{cluster}/vms``; then the task's page."""
    try:
        body = VMCreate(
            name=field(form, "name", 64).strip(),
            image=field(form, "image", 64).strip(),
            vcpus=number(form, "vcpus", 1),
            memory_mib=number(form, "memory_mib", 256),
            start=form.get("start") is not None,
        )
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first.get("loc", ())) or "form"
        raise InvalidInput(where, str(first.get("msg", "invalid"))) from None
    task = object_api.create_vm(cluster, body, request, background, db, who)
    return done(f"/ui/tasks/{task.id}", f"creating VM {body.name} in cluster {cluster}")


@router.post("/ui/clusters/{cluster}/vms/{name}/actions/{action}")
def vm_action(
    cluster: str,
    name: str,
    action: PowerOp,
    request: Request,
    background: BackgroundTasks,
    db: UnitOfWork,
    who: MayVMPower,
) -> Any:
    """The API's ``POST /v1/clusters/{cluster}/vms/{name}/actions/{action}``."""
    task = object_api.vm_action(cluster, name, action, request, background, db, who)
    return done(
        back(request, f"/ui/clusters/{cluster}/vms/{name}"),
        f"{action.value} of {name} asked (task {task.id[:8]})",
    )


@router.post("/ui/clusters/{cluster}/vms/{name}/delete")
def delete_vm(
    cluster: str,
    name: str,
    request: Request,
    background: BackgroundTasks,
    db: UnitOfWork,
    who: MayVMWrite,
) -> Any:
    """The API's ``DELETE /v1/clusters/{cluster}/vms/{name}``; then the task's page."""
    task = object_api.delete_vm(cluster, name, request, background, db, who)
    return done(f"/ui/tasks/{task.id}", f"deleting VM {name} of cluster {cluster}")


@router.post("/ui/tasks/{task_id}/cancel")
def cancel_task(task_id: str, request: Request, db: UnitOfWork, who: MayTaskWrite) -> Any:
    task_api.cancel_task(task_id, request, db, who)
    return done(back(request, f"/ui/tasks/{task_id}"), f"task {task_id[:8]} cancelled")


@router.post("/ui/alerts/{alert_id}/acknowledge")
def acknowledge_alert(
    alert_id: Annotated[int, Path(ge=1, le=2**62)],
    request: Request,
    db: UnitOfWork,
    who: MayAlertWrite,
) -> Any:
    """The API's ``POST /v1/alerts/{id}/acknowledge`` (an alert of a failed task)."""
    alert_api.acknowledge_alert(alert_id, request, db, who)
    return done(back(request, "/ui/alerts"), f"alert {alert_id} acknowledged")


# ---- users and roles ------------------------------------------------------------------------
@router.post("/ui/users")
def create_user(request: Request, form: Form, db: UnitOfWork, who: MayUserWrite) -> Any:
    c = center(request)
    name, role = field(form, "name", 64).strip(), field(form, "role", 64)
    password = field(form, "password", 1024)
    params = {"name": name, "role": role, "password": password}  # the password is redacted
    audited(
        request,
        who.user,
        "user.create",
        name,
        params,
        lambda: c.accounts.create_user(db, who, name, role, password),
    )
    return done("/ui/users", f"user {name} created with role {role}")


@router.post("/ui/users/{name}/{change}")
def change_user(
    name: str, change: str, request: Request, form: Form, db: UnitOfWork, who: MayUserWrite
) -> Any:
    """``change``: enable, disable, delete, or role (to the form's ``role``)."""
    accounts = center(request).accounts
    if change == "delete":
        audited(
            request, who.user, "user.delete", name, {}, lambda: accounts.delete_user(db, who, name)
        )
        return done("/ui/users", f"user {name} deleted")
    if change in ("enable", "disable"):
        params: dict[str, Any] = {"disabled": change == "disable"}
        role = None
    elif change == "role":
        role = field(form, "role", 64)
        params = {"role": role}
    else:
        raise InvalidInput("change", "one of enable, disable, role, delete")
    audited(
        request,
        who.user,
        "user.update",
        name,
        params,
        lambda: accounts.update_user(db, who, name, role, params.get("disabled"), None),
    )
    return done("/ui/users", f"user {name}: {change} done")


@router.post("/ui/roles")
def create_role(request: Request, form: Form, db: UnitOfWork, who: MayRoleWrite) -> Any:
    accounts = center(request).accounts
    name = field(form, "name", 64).strip()
    actions = [str(a) for a in form.getlist("actions")]
    audited(
        request,
        who.user,
        "role.create",
        name,
        {"name": name, "actions": actions},
        lambda: accounts.create_role(db, name, parse_actions(actions)),
    )
    return done("/ui/users", f"role {name} created")


@router.post("/ui/roles/{name}/delete")
def delete_role(name: str, request: Request, db: UnitOfWork, who: MayRoleWrite) -> Any:
    accounts = center(request).accounts
    audited(request, who.user, "role.delete", name, {}, lambda: accounts.delete_role(db, name))
    return done("/ui/users", f"role {name} deleted")
