"""The one error shape of the HTTP APIs (the cluster's and the center's).

Whatever answers an error — an ``AecpError`` from a service, a request that fails validation, a
body that is not JSON, an unknown route, a wrong method, a bug — the body is an ``ErrorBody``:
``{"error": code, "message": ..., fields...}``. Messages never carry server-side paths: every
string of an error body passes through ``redact_paths`` (the server log keeps the full text).
"""

from __future__ import annotations

import logging
import re
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from fastapi.routing import iter_route_contexts
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from pydantic_core import PydanticSerializationError
from starlette.exceptions import HTTPException

from aecp.common.errors import AecpError, Unauthorized
from aecp.common.names import NAME_PATTERN, NAME_RULE, OPTIONAL_NAME_PATTERN

log = logging.getLogger(__name__)
NAME_PATTERNS = (NAME_PATTERN, OPTIONAL_NAME_PATTERN)


class FieldProblem(BaseModel):
    field: str
    reason: str


class ErrorBody(BaseModel):
    """The body of every error answer; errors may add named fields of their own."""

    model_config = ConfigDict(extra="allow")

    error: str = Field(description="stable code, e.g. not_found, invalid_input, already_exists")
    message: str = Field(description="what went wrong, for people")
    field: str | None = Field(None, description="the request field at fault, if one is")
    reason: str | None = Field(None, description="why that field is refused")
    details: list[FieldProblem] | None = Field(None, description="every invalid field (422)")


# the codes of errors that HTTP itself produces (no AecpError behind them)
HTTP_CODES = {
    400: "bad_request",
    401: "unauthorized",
    404: "not_found",
    405: "method_not_allowed",
    413: "too_large",
    422: "invalid_input",
    500: "internal",
    503: "unavailable",
}

DESCRIPTIONS = {
    400: "the body is not UTF-8 JSON",
    401: "no or bad bearer token",
    403: "the caller's role does not allow this request",
    404: "the named object does not exist",
    409: "the request clashes with the object's state",
    410: "the revision asked for is compacted: read everything again",
    413: "the body is too large",
    422: "a field is invalid (the body names it)",
    500: "internal error",
    503: "the cluster store or another node cannot be reached",
}


def error_responses(*statuses: int) -> dict[int | str, dict[str, Any]]:
    """``responses=`` for a route: each status answered with an ``ErrorBody``."""
    return {s: {"model": ErrorBody, "description": DESCRIPTIONS[s]} for s in statuses}


# an absolute path of two components or more, not inside a URL ("http://h/x") or a word
# ("a/b"), and one after QEMU's "unix:" or "file:" (its socket and file options)
_PATH = re.compile(r"(?:(?<![\w.:/~-])|(?<=unix:)|(?<=file:))(?:/[\w.@+~%-]+){2,}/?")
MAX_DETAILS = 20
MAX_ECHO = 64  # characters of a refused input repeated in a message


def redact_paths(text: str) -> str:
    """``text`` with every absolute server path replaced by its last component."""
    return _PATH.sub(lambda m: m.group(0).rstrip("/").rsplit("/", 1)[-1], text)


def _redacted(value: Any) -> Any:
    if isinstance(value, str):
        return redact_paths(value)
    if isinstance(value, list):
        return [_redacted(v) for v in value]
    if isinstance(value, dict):
        return {k: _redacted(v) for k, v in value.items()}
    return value


def error_response(
    status: int, body: dict[str, Any], headers: dict[str, str] | None = None
) -> JSONResponse:
    """The one way an error answer is made: validated as ``ErrorBody``, paths redacted. Fields
    that do not fit the shape are dropped rather than fail the answer."""
    try:
        checked = ErrorBody.model_validate(_redacted(body)).model_dump(
            mode="json", exclude_none=True
        )
    except (ValidationError, PydanticSerializationError):
        checked = {k: redact_paths(str(body.get(k, ""))) for k in ("error", "message")}
    return JSONResponse(checked, status_code=status, headers=headers)


def install(app: FastAPI) -> None:
    """Give every error the app can answer the ``ErrorBody`` shape, and say so in its OpenAPI
    document (also for routes whose success is not JSON)."""
    app.add_exception_handler(AecpError, _aecp_error)  # type: ignore[arg-type]
    app.add_exception_handler(RequestValidationError, _validation_error)  # type: ignore[arg-type]
    app.add_exception_handler(HTTPException, _http_error)  # type: ignore[arg-type]
    app.add_exception_handler(Exception, _internal_error)
    generate = app.openapi

    def openapi() -> dict[str, Any]:
        doc = generate()  # cached by FastAPI: rewritten in place, the same each time
        for op in (op for ops in doc["paths"].values() for op in ops.values()):
            for status, answer in op["responses"].items():
                if int(status) >= 400:
                    answer["content"] = {"application/json": {"schema": _ERROR_REF}}
        return doc

    app.openapi = openapi  # type: ignore[method-assign]


_ERROR_REF = {"$ref": "#/components/schemas/ErrorBody"}


async def _aecp_error(request: Request, exc: AecpError) -> JSONResponse:
    if exc.http_status >= 500:
        log.warning("%s %s failed: %s", request.method, request.url.path, exc.message)
    headers = {"WWW-Authenticate": "Bearer"} if isinstance(exc, Unauthorized) else None
    return error_response(exc.http_status, exc.to_dict(), headers)


async def _validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
    errors = exc.errors()
    if any(e["type"] == "json_invalid" for e in errors):
        why = errors[0].get("ctx", {}).get("error", "not JSON")
        return error_response(
            400,
            {"error": "bad_request", "message": f"body: not valid JSON ({why})", "field": "body"},
        )
    problems = [FieldProblem(field=_field(e["loc"]) or "body", reason=_reason(e)) for e in errors]
    first = problems[0] if problems else FieldProblem(field="body", reason="invalid request")
    return error_response(
        422,
        {
            "error": "invalid_input",
            "message": f"{first.field}: {first.reason}",
            "field": first.field,
            "reason": first.reason,
            "details": [p.model_dump() for p in problems[:MAX_DETAILS]],
        },
    )


def _field(loc: tuple[Any, ...]) -> str:
    return ".".join(str(p) for p in loc if p not in ("body", "query", "path"))


def _reason(error: Any) -> str:
    """pydantic's message, except that a name refused by its pattern gets the name rule."""
    if error["type"] == "string_pattern_mismatch" and error["ctx"]["pattern"] in NAME_PATTERNS:
        shown = repr(error["input"])
        if len(shown) > MAX_ECHO:
            shown = shown[:MAX_ECHO] + "..."
        return f"{shown} is not a valid name ({NAME_RULE})"
    msg: str = error["msg"]
    return msg[:200]


async def _http_error(request: Request, exc: HTTPException) -> JSONResponse:
    status = exc.status_code
    headers = dict(exc.headers or {})
    if status == 404:
        message = "no such route in this API (see /openapi.json)"
    elif status == 405:
        headers["Allow"] = allowed = _allowed_methods(request) or headers.get("Allow", "")
        message = f"method {request.method} is not allowed here (allowed: {allowed})"
    elif status == 400:
        message = "body: could not be read as UTF-8 JSON"
    else:
        message = str(exc.detail)
    body = {"error": HTTP_CODES.get(status, f"http_{status}"), "message": message}
    if status in (400, 413):
        body["field"] = "body"
    return error_response(status, body, headers or None)


def _allowed_methods(request: Request) -> str:
    """Every method some route serves at this path (Starlette names only the first route's)."""
    path = request.scope["path"]
    methods: set[str] = set()
    for route in iter_route_contexts(request.app.routes):
        regex = getattr(route, "path_regex", None)
        if regex is not None and regex.match(path):
            methods |= getattr(route, "methods", None) or set()
    return ", ".join(sorted(methods))


async def _internal_error(request: Request, exc: Exception) -> JSONResponse:
    """A bug: the caller gets a body without any detail (the server logs the traceback)."""
    log.error("%s %s: unexpected %s", request.method, request.url.path, type(exc).__name__)
    return error_response(
        500, {"error": "internal", "message": "internal error (the server log has the details)"}
    )
