"""Authenticated routes: every route of the cluster API except ``/healthz`` (and the console
WebSocket, which checks the token itself) is an ``AuthenticatedRoute``.

Such a route authenticates and authorizes its caller before anything else: before the body is
read, parsed or validated, so a caller without a token learns nothing but 401, and one whose
role does not allow the request nothing but 403 (reads need ``read-only``, other methods
``operator``, and the routes of an ``admin`` router ``admin``). A query parameter the route
does not take is refused (422), not ignored. It then reads a JSON body up to
``MAX_JSON_BODY`` bytes (413 beyond). It documents the error statuses that follow from what it
takes (401, 500 and 503 always; 422 with parameters or a body; 400 and 413 with a JSON body), so
a route declares only the statuses of its own logic (404, 409...).
"""

from __future__ import annotations

from collections.abc import Callable, Coroutine
from typing import Any

from fastapi import APIRouter, Depends, Request, Response, Security
from fastapi.dependencies.models import Dependant
from fastapi.dependencies.utils import get_flat_params
from fastapi.routing import APIRoute
from starlette.exceptions import HTTPException
from starlette.types import Message

from aecp.cluster.api.deps import authenticate, authorize, bearer
from aecp.cluster.api.errors import error_responses
from aecp.common.errors import InvalidInput
from aecp.model.principal import Role

MAX_JSON_BODY = 1024 * 1024

Handler = Callable[[Request], Coroutine[Any, Any, Response]]


class AuthenticatedRoute(APIRoute):
    needs: Role | None = None  # set by the router (``api_router(needs=...)``)

    def __init__(self, path: str, endpoint: Callable[..., Any], **kwargs: Any) -> None:
        super().__init__(path, endpoint, **kwargs)
        self.responses = {**error_responses(*self._implied_statuses()), **self.responses}

    def _implied_statuses(self) -> list[int]:
        statuses = [401, 403, 500, 503]
        if get_flat_params(self.dependant) or self.body_field is not None:
            statuses.append(422)
        if self.body_field is not None:
            statuses += [400, 413]
        return statuses

    def get_route_handler(self) -> Handler:
        handler = super().get_route_handler()
        json_body = self.body_field is not None
        known = _query_names(self.dependant)

        async def authenticated(request: Request) -> Response:
            authorize(await authenticate(request), request.method, self.needs)
            for name in request.query_params:
                if name not in known:
                    raise InvalidInput(name or "query", "unknown query parameter")
            if json_body:
                request = await bounded(request, MAX_JSON_BODY)
            return await handler(request)

        return authenticated


class AdminRoute(AuthenticatedRoute):
    needs = Role.ADMIN


def _query_names(dependant: Dependant) -> set[str]:
    """The query parameters a route takes, its dependencies' included."""
    names = {p.alias for p in dependant.query_params}
    for sub in dependant.dependencies:
        names |= _query_names(sub)
    return names


def api_router(prefix: str, tag: str, admin_only: bool = False) -> APIRouter:
    """A router whose routes are ``AuthenticatedRoute`` s (the bearer scheme documented);
    ``admin_only``: every one of its routes needs ``admin`` (else the role goes by method)."""
    route_class = AdminRoute if admin_only else AuthenticatedRoute
    return APIRouter(
        prefix=prefix,
        tags=[tag],
        route_class=route_class,
        # the route's handler authenticates before the body is read; ``authenticate`` here
        # too (it returns the name found then) keeps every route closed should a FastAPI
        # version build routes without ``get_route_handler``
        dependencies=[Security(bearer), Depends(authenticate)],
    )


async def bounded(request: Request, limit: int) -> Request:
    """``request`` with its body read; 413 if the body is larger than ``limit`` bytes, 400 if
    it is not UTF-8 (JSON's decoder would also take UTF-16 and UTF-32)."""
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise HTTPException(413, f"the body is larger than the {limit}-byte limit")
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > limit:
            raise HTTPException(413, f"the body is larger than the {limit}-byte limit")
    try:
        bytes(body).decode("utf-8")
    except UnicodeDecodeError:
        raise HTTPException(400, "the body is not UTF-8") from None
    replayed = False

    async def receive() -> Message:
        nonlocal replayed
        if replayed:
            return await request.receive()
        replayed = True
        return {"type": "http.request", "body": bytes(body), "more_body": False}

    return Request(request.scope, receive)
