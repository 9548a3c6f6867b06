"""The center's API application (``/v1``). Every route but ``/v1/login`` and ``/healthz``
needs a session token and the action its role must allow; every mutation and every login is
audited."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Annotated

import httpx
from fastapi import Depends, FastAPI, Query, Request, Response, status
from fastapi.responses import PlainTextResponse
from pydantic import BaseModel, ConfigDict, Field
from sqlalchemy.orm import Session as DB
from sqlalchemy.orm import sessionmaker

from aecp import __version__
from aecp.center import audit, web
from aecp.center.accounts import Accounts, Caller
from aecp.center.api import alerts as alerts_routes
from aecp.center.api import ha as ha_routes
from aecp.center.api import objects as objects_routes
from aecp.center.api import registry as registry_routes
from aecp.center.api import tasks as tasks_routes
from aecp.center.api.deps import (
    Center,
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
    token_of,
)
from aecp.center.db.models import AuditRecord, Role, User
from aecp.center.ha import gate
from aecp.center.inventory import Inventory
from aecp.center.metrics import RequestMetrics, timer
from aecp.center.registry import ClientFactory, Registry
from aecp.center.roles import parse_actions
from aecp.center.tasks import Runner
from aecp.common import apierrors as errors
from aecp.common.clock import Clock
from aecp.common.errors import AecpError
from aecp.model.base import Name

MayAuditRead = Annotated[Caller, Depends(needs("audit.read"))]
MayRoleRead = Annotated[Caller, Depends(needs("role.read"))]
MayRoleWrite = Annotated[Caller, Depends(needs("role.write"))]
MaySessionRead = Annotated[Caller, Depends(needs("session.read"))]
MayUserRead = Annotated[Caller, Depends(needs("user.read"))]
MayUserWrite = Annotated[Caller, Depends(needs("user.write"))]


MayClusterRead = Annotated[Caller, Depends(needs("cluster.read"))]


class Login(BaseModel):
    model_config = ConfigDict(extra="forbid")
    user: str = Field(max_length=64)
    password: str = Field(max_length=1024)


class SessionPublic(BaseModel):
    token: str
    expires_at: float


class Me(BaseModel):
    user: str
    role: str
    actions: list[str]


class UserCreate(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: Name
    role: str = Field(max_length=64)
    password: str = Field(max_length=1024)


class UserUpdate(BaseModel):
    model_config = ConfigDict(extra="forbid")
    role: str | None = Field(None, max_length=64)
    disabled: bool | None = None
    password: str | None = Field(None, max_length=1024)


class UserPublic(BaseModel):
    name: str
    role: str
    disabled: bool
    locked: bool
    created_at: float

    @classmethod
    def of(cls, u: User, now: float) -> UserPublic:
        return cls(
            name=u.name,
            role=u.role,
            disabled=u.disabled,
            locked=u.locked_until > now,
            created_at=u.created_at,
        )


class RoleCreate(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str = Field(max_length=64)
    actions: list[str] = Field(max_length=64)


class RolePublic(BaseModel):
    name: str
    actions: list[str]
    preset: bool

    @classmethod
    def of(cls, r: Role) -> RolePublic:
        return cls(name=r.name, actions=sorted(r.actions.split()), preset=r.preset)


class AuditPublic(BaseModel):
    id: int
    at: float
    user: str
    address: str
    action: str
    target: str
    params: str
    result: str
    task_id: str

    @classmethod
    def of(cls, a: AuditRecord) -> AuditPublic:
        return cls(
            id=a.id,
            at=a.at,
            user=a.user,
            address=a.address,
            action=a.action,
            target=a.target,
            params=a.params,
            result=a.result,
            task_id=a.task_id,
        )


def create_app(
    sessions: sessionmaker[DB],
    accounts: Accounts,
    clock: Clock,
    registry: Registry,
    cluster_client: ClientFactory = httpx.AsyncClient,
) -> FastAPI:
    """The center's app; ``cluster_client`` makes the HTTP clients the center reaches
    clusters with (tests give one over an in-process cluster)."""
    app = FastAPI(title="AECP operation center API", version=__version__)
    app.router.route_class = CenterRoute
    app.state.center = Center(sessions, accounts, clock)
    app.state.registry = registry
    app.state.cluster_client = cluster_client
    app.state.inventory = Inventory(sessions, registry, cluster_client, clock)
    app.state.runner = Runner(sessions, registry, cluster_client, clock)
    app.include_router(registry_routes.router)
    app.include_router(alerts_routes.router)
    app.include_router(tasks_routes.router)
    app.include_router(objects_routes.router)
    app.include_router(ha_routes.router)
    gate.install(app)  # in HA (app.state.leadership): changes only on the active (measured)
    metrics = RequestMetrics()

    @app.middleware("http")
    async def measured(
        request: Request, call_next: Callable[[Request], Awaitable[Response]]
    ) -> Response:
        started = timer()
        status_code = 500  # unless an answer comes back: an error that escaped counts too
        try:
            response = await call_next(request)
            status_code = response.status_code
            return response
        finally:
            route = request.scope.get("route")
            path = getattr(route, "path", "unmatched")
            metrics.observe(request.method, path, status_code, timer() - started)

    @app.get(
        "/metrics",
        tags=["metrics"],
        operation_id="metrics",
        response_class=PlainTextResponse,
        dependencies=[Depends(bearer)],
        responses=errors.error_responses(401, 403),
    )
    def prometheus(db: UnitOfWork, who: MayClusterRead) -> PlainTextResponse:
        """Requests by route and status with latencies; per cluster, the age of the center's
        copy and whether it answers (Prometheus text format)."""
        return PlainTextResponse(
            metrics.render(db, clock.wall()), media_type="text/plain; version=0.0.4"
        )

    errors.install(app)

    protected = [Depends(bearer)]

    @app.get("/healthz", tags=["health"], operation_id="health")
    def healthz() -> dict[str, str | bool]:
        """``role``: ``active`` or ``passive`` in an HA trio, else ``standalone``."""
        return {"status": "ok", **gate.health(app)}

    @app.post(
        "/v1/login",
        tags=["sessions"],
        operation_id="login",
        responses=errors.error_responses(401, 422),
    )
    def login(body: Login, request: Request, db: UnitOfWork) -> SessionPublic:
        c = center(request)
        try:
            token, expires = c.accounts.login(db, body.user, body.password)
        except AecpError as exc:
            db.commit()  # the failed attempt counts (lock-out)
            record_apart(request, body.user, "session.login", body.user, {}, outcome(exc))
            raise
        record(db, request, body.user, "session.login", body.user, {}, "ok")
        return SessionPublic(token=token, expires_at=expires)

    @app.post(
        "/v1/logout",
        tags=["sessions"],
        operation_id="logout",
        status_code=status.HTTP_204_NO_CONTENT,
        dependencies=protected,
        responses=errors.error_responses(401, 403),
    )
    def logout(request: Request, db: UnitOfWork) -> None:
        """End this session (any valid one may: a role needs no action to log out)."""
        who = caller(request, db)
        audited(
            request,
            who.user,
            "session.logout",
            who.user,
            {},
            lambda: center(request).accounts.logout(db, token_of(request)),
        )

    @app.get(
        "/v1/session",
        tags=["sessions"],
        operation_id="whoami",
        dependencies=protected,
        responses=errors.error_responses(401, 403),
    )
    def whoami(who: MaySessionRead) -> Me:
        return Me(user=who.user, role=who.role, actions=sorted(who.actions))

    # ---- users --------------------------------------------------------------------------------
    @app.get(
        "/v1/users",
        tags=["users"],
        operation_id="list_users",
        dependencies=protected,
        responses=errors.error_responses(401, 403),
    )
    def list_users(request: Request, db: UnitOfWork, who: MayUserRead) -> list[UserPublic]:
        c = center(request)
        return [UserPublic.of(u, c.clock.wall()) for u in c.accounts.users(db)]

    @app.post(
        "/v1/users",
        tags=["users"],
        operation_id="create_user",
        status_code=201,
        dependencies=protected,
        responses=errors.error_responses(401, 403, 409, 422),
    )
    def create_user(
        body: UserCreate,
        request: Request,
        db: UnitOfWork,
        who: MayUserWrite,
    ) -> UserPublic:
        c = center(request)
        user = audited(
            request,
            who.user,
            "user.create",
            body.name,
            body.model_dump(),
            lambda: c.accounts.create_user(db, who, body.name, body.role, body.password),
        )
        return UserPublic.of(user, c.clock.wall())

    @app.patch(
        "/v1/users/{name}",
        tags=["users"],
        operation_id="update_user",
        dependencies=protected,
        responses=errors.error_responses(401, 403, 404, 409, 422),
    )
    def update_user(
        name: str,
        body: UserUpdate,
        request: Request,
        db: UnitOfWork,
        who: MayUserWrite,
    ) -> UserPublic:
        c = center(request)
        user = audited(
            request,
            who.user,
            "user.update",
            name,
            body.model_dump(exclude_none=True),
            lambda: c.accounts.update_user(db, who, name, body.role, body.disabled, body.password),
        )
        return UserPublic.of(user, c.clock.wall())

    @app.delete(
        "/v1/users/{name}",
        tags=["users"],
        operation_id="delete_user",
        status_code=204,
        dependencies=protected,
        responses=errors.error_responses(401, 403, 404, 409),
    )
    def delete_user(
        name: str,
        request: Request,
        db: UnitOfWork,
        who: MayUserWrite,
    ) -> None:
        c = center(request)
        audited(
            request,
            who.user,
            "user.delete",
            name,
            {},
            lambda: c.accounts.delete_user(db, who, name),
        )

    # ---- roles --------------------------------------------------------------------------------
    @app.get(
        "/v1/roles",
        tags=["roles"],
        operation_id="list_roles",
        dependencies=protected,
        responses=errors.error_responses(401, 403),
    )
    def list_roles(request: Request, db: UnitOfWork, who: MayRoleRead) -> list[RolePublic]:
        return [RolePublic.of(r) for r in center(request).accounts.roles(db)]

    @app.post(
        "/v1/roles",
        tags=["roles"],
        operation_id="create_role",
        status_code=201,
        dependencies=protected,
        responses=errors.error_responses(401, 403, 409, 422),
    )
    def create_role(
        body: RoleCreate,
        request: Request,
        db: UnitOfWork,
        who: MayRoleWrite,
    ) -> RolePublic:
        c = center(request)
        role = audited(
            request,
            who.user,
            "role.create",
            body.name,
            body.model_dump(),
            lambda: c.accounts.create_role(db, body.name, parse_actions(body.actions)),
        )
        return RolePublic.of(role)

    @app.delete(
        "/v1/roles/{name}",
        tags=["roles"],
        operation_id="delete_role",
        status_code=204,
        dependencies=protected,
        responses=errors.error_responses(401, 403, 404, 409),
    )
    def delete_role(
        name: str,
        request: Request,
        db: UnitOfWork,
        who: MayRoleWrite,
    ) -> None:
        c = center(request)
        audited(
            request, who.user, "role.delete", name, {}, lambda: c.accounts.delete_role(db, name)
        )

    # ---- audit --------------------------------------------------------------------------------
    @app.get(
        "/v1/audit",
        tags=["audit"],
        operation_id="list_audit",
        dependencies=protected,
        responses=errors.error_responses(401, 403, 422),
    )
    def list_audit(
        db: UnitOfWork,
        who: MayAuditRead,
        user: Annotated[str | None, Query(max_length=64)] = None,
        action: Annotated[str | None, Query(max_length=64)] = None,
        limit: Annotated[int, Query(ge=1, le=1000)] = 100,
        before: Annotated[int | None, Query(ge=1, le=2**62)] = None,
    ) -> list[AuditPublic]:
        """Newest first; ``before``: the ``id`` of the last record of the page before."""
        return [AuditPublic.of(a) for a in audit.records(db, user, action, limit, before)]

    web.mount(app)  # the web console at /, with the same sessions, actions and audit
    return app
