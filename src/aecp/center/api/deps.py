"""Request dependencies of the center's API: a database unit of work per request (committed
when the route succeeds), the caller from its session token, the action a route needs, and
the audit of mutations (a refused or failed one too, in a unit of work of its own)."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Annotated, Any, TypeVar

from fastapi import Depends, Request
from fastapi.routing import APIRoute
from fastapi.security import HTTPBearer
from sqlalchemy.orm import Session as DB
from sqlalchemy.orm import sessionmaker

from aecp.center import audit
from aecp.center.accounts import Accounts, Caller
from aecp.common.apierrors import error_responses
from aecp.common.clock import Clock
from aecp.common.errors import AecpError, Forbidden, Unauthorized

T = TypeVar("T")
bearer = HTTPBearer(auto_error=False, description="a session token from POST /v1/login")


@dataclass
class Center:
    """What the routes share: the database, the accounts, the clock."""

    sessions: sessionmaker[DB]
    accounts: Accounts
    clock: Clock


def center(request: Request) -> Center:
    c: Center = request.app.state.center
    return c


def database(request: Request) -> Iterator[DB]:
    db = center(request).sessions()
    try:
        yield db
        db.commit()
    except BaseException:
        db.rollback()
        raise
    finally:
        db.close()


# scope "function": the unit of work commits before the answer is sent (a commit that fails
# is the answer then, never a 2xx for a change that was not stored)
Database = Annotated[DB, Depends(database, scope="function")]


def unit_of_work(request: Request, db: Database) -> DB:
    """The request's database session, also kept for ``audited``."""
    request.state.db = db
    return db


UnitOfWork = Annotated[DB, Depends(unit_of_work, scope="function")]


def token_of(request: Request) -> str:
    scheme, _, token = request.headers.get("authorization", "").partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise Unauthorized("a session token is required (Authorization: Bearer <token>)")
    return token.strip()


def caller(request: Request, db: Database) -> Caller:
    known: Caller | None = getattr(request.state, "caller", None)
    if known is None:
        known = center(request).accounts.caller(db, token_of(request))
        request.state.caller = known
    return known


def needs(action: str) -> Callable[..., Caller]:
    """A dependency: the caller, if its role allows ``action`` (``Forbidden`` if not)."""

    def check(request: Request, db: Database) -> Caller:
        who = caller(request, db)
        if not who.may(action):
            if request.method not in ("GET", "HEAD", "OPTIONS"):  # a refused mutation: audited
                why = f"forbidden: role {who.role} lacks {action}"
                record_apart(request, who.user, action, request.url.path, {}, why)
            raise Forbidden(
                f"user {who.user} (role {who.role}) may not {action}", needs=action, role=who.role
            )
        return who

    check.__name__ = f"needs_{action.replace('.', '_')}"
    return check


def audited(
    request: Request,
    who: str,
    action: str,
    target: str,
    params: Any,
    work: Callable[[], T],
    task_of: Callable[[T], str] | None = None,
) -> T:
    """Run ``work`` (which changes the request's unit of work) and record it (with the id
    of the task it made, ``task_of(result)``); a failure is recorded in a unit of work of
    its own (the request's rolls back), then raised."""
    try:
        result = work()
    except Exception as exc:
        record_apart(request, who, action, target, params, outcome(exc))
        raise
    task_id = task_of(result) if task_of is not None else ""
    record(request.state.db, request, who, action, target, params, "ok", task_id)
    return result


def outcome(exc: BaseException) -> str:
    """An audit record's result for a failure (an unexpected one says no more than that)."""
    return f"{exc.code}: {exc.message}" if isinstance(exc, AecpError) else "internal error"


def record(
    db: DB,
    request: Request,
    who: str,
    action: str,
    target: str,
    params: Any,
    result: str,
    task_id: str = "",
) -> None:
    """An audit record of this request, in unit of work ``db``."""
    audit.record(
        db,
        at=center(request).clock.wall(),
        user=who,
        address=request.client.host if request.client else "",
        action=action,
        target=target,
        params=params,
        result=result,
        task_id=task_id,
    )


def record_apart(
    request: Request, who: str, action: str, target: str, params: Any, result: str
) -> None:
    """An audit record in a unit of work of its own (the request's rolls back)."""
    with center(request).sessions.begin() as own:
        record(own, request, who, action, target, params, result)


class CenterRoute(APIRoute):
    """A route of the center: one that takes a JSON body also documents 400 (a body that is
    not UTF-8 JSON) and 422."""

    def __init__(self, path: str, endpoint: Callable[..., Any], **kwargs: Any) -> None:
        super().__init__(path, endpoint, **kwargs)
        if self.body_field is not None:
            self.responses = {**error_responses(400, 422), **self.responses}
