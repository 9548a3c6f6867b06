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

import asyncio
import base64
import logging
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any

from fastapi import APIRouter, Depends, Request, Response, Security
from fastapi.dependencies.models import Dependant
from fastapi.dependencies.utils import get_flat_params
from fastapi.exceptions import RequestValidationError
from fastapi.routing import APIRoute
from starlette.exceptions import HTTPException
from starlette.types import Message

from aecp.cluster import idempotency
from aecp.cluster.api.deps import SAFE_METHODS, authenticate, authorize, bearer
from aecp.cluster.idempotency import IdempotencyKeys
from aecp.common.apierrors import error_response, error_responses
from aecp.common.errors import AecpError, InvalidInput, StoreUnavailable
from aecp.model.principal import Role

log = logging.getLogger(__name__)
MAX_JSON_BODY = 1024 * 1024
# a route whose answer holds a secret (a new token) says so in the document: its answer is
# never kept, so it takes no Idempotency-Key
SECRET_ANSWER = "x-answer-holds-secret"

Handler = Callable[[Request], Coroutine[Any, Any, Response]]


class AuthenticatedRoute(APIRoute):
    needs: Role | None = None  # set by the router (``api_router(needs=...)``)

    def __init__(self, path: str, endpoint: Callable[..., Any], **kwargs: Any) -> None:
        super().__init__(path, endpoint, **kwargs)
        self.responses = {**error_responses(*self._implied_statuses()), **self.responses}

    def _implied_statuses(self) -> list[int]:
        statuses = [401, 403, 500, 503]
        mutating = bool((self.methods or set()) - SAFE_METHODS)
        if get_flat_params(self.dependant) or self.body_field is not None or mutating:
            statuses.append(422)
        if mutating:  # an Idempotency-Key whose request is still being carried out
            statuses.append(409)
        if self.body_field is not None:
            statuses += [400, 413]
        return statuses

    def get_route_handler(self) -> Handler:
        handler = super().get_route_handler()
        json_body = self.body_field is not None
        known = _query_names(self.dependant)
        secret_answer = bool((self.openapi_extra or {}).get(SECRET_ANSWER))
        raw_body = bool((self.openapi_extra or {}).get("requestBody"))  # an upload

        async def authenticated(request: Request) -> Response:
            principal = await authenticate(request)
            authorize(principal, request.method, self.needs)
            for name in request.query_params:
                if name not in known:
                    raise InvalidInput(name or "query", "unknown query parameter")
            if json_body:
                request = await bounded(request, MAX_JSON_BODY)
            key = request.headers.get(idempotency.HEADER)
            if key is None or request.method in SAFE_METHODS:
                return await handler(request)
            if secret_answer or raw_body:
                raise InvalidInput(
                    idempotency.HEADER,
                    "not taken by this request: its answer holds a secret shown once (never "
                    "kept), or its body is an upload (not compared); send it without the header",
                )
            return await _at_most_once(request, handler, principal.name, key, json_body)

        return authenticated


async def _at_most_once(
    request: Request, handler: Handler, principal: str, key: str, json_body: bool
) -> Response:
    """Carry the request out once per ``Idempotency-Key`` (``cluster.idempotency``): a
    retry gets the first answer (``Idempotent-Replayed: true``)."""
    keys: IdempotencyKeys = request.app.state.idempotency
    idempotency.check_key(key)
    body = await request.body() if json_body else b""
    print_ = idempotency.fingerprint(request.method, request.url.path, request.url.query, body)
    claim = await keys.claim(principal, key, print_)
    if claim.replay is not None:
        return Response(
            base64.b64decode(claim.replay.body_b64),
            status_code=claim.replay.status,
            media_type=claim.replay.content_type or None,
            headers={"Idempotent-Replayed": "true"},
        )
    task = asyncio.ensure_future(handler(request))
    async with keys.holding(claim, task):
        try:
            response = await _fenced(task)
        except (RequestValidationError, HTTPException):  # refused before the endpoint ran
            await _settle(keys.release(claim))
            raise
        except AecpError as exc:
            if isinstance(exc, StoreUnavailable) or exc.http_status == 500:
                await _settle(keys.unknown(claim, print_, exc.message))
                raise
            if exc.http_status >= 500:  # the API's own checks refused it: nothing changed
                await _settle(keys.release(claim))
                raise
            response = error_response(exc.http_status, exc.to_dict())
        except BaseException as exc:
            await _settle(keys.unknown(claim, print_, type(exc).__name__))
            raise
        body_out = getattr(response, "body", None)
        if isinstance(body_out, bytes):
            ctype = response.headers.get("content-type", "")
            await _settle(keys.answered(claim, print_, response.status_code, body_out, ctype))
        else:
            await _settle(keys.unknown(claim, print_, "its answer was a stream"))
    return response


async def _fenced(task: asyncio.Future[Response]) -> Response:
    """The handler's answer; a handler cancelled because its hold lapsed (see
    ``IdempotencyKeys.holding``) is a 503 whose outcome is unknown."""
    try:
        return await task
    except asyncio.CancelledError:
        if not task.cancelled() or _being_cancelled():
            raise
        raise StoreUnavailable(
            f"this request's hold on its {idempotency.HEADER} lapsed (the cluster store did "
            "not answer): whether it took effect is unknown"
        ) from None


def _being_cancelled() -> bool:
    me = asyncio.current_task()
    return me is not None and me.cancelling() > 0


async def _settle(step: Awaitable[None]) -> None:
    try:
        await step
    except AecpError as exc:  # the record says pending: retries are told the outcome is unknown
        log.warning("%s: the outcome was not recorded: %s", idempotency.HEADER, exc)


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
