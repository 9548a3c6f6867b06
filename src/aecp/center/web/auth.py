"""Who is at the console, and whether a form may be acted on.

The console uses the API's sessions: logging in through the form calls the same
``Accounts.login`` and keeps the session token in an HttpOnly, SameSite=Strict cookie. A page
finds its caller from that cookie and then checks the action with the API's own ``needs()``,
so a role sees and does in the console exactly what it may through the API (a refused
mutation is audited there too).

A form's POST is acted on only if it comes from a page of this site: the cookie is
SameSite=Strict (a cross-site request carries none), and the request's ``Origin`` (or, if a
browser sent none, its ``Referer``) must be this server's own origin.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Annotated
from urllib.parse import parse_qsl, urlsplit

from fastapi import Depends, Request, Response
from starlette.datastructures import FormData

from aecp.center.accounts import Caller
from aecp.center.api.deps import Database, center, needs
from aecp.common.errors import Forbidden, InvalidInput, Unauthorized

COOKIE = "aoc_session"
MAX_FORM_BYTES = 64 * 1024
MAX_FORM_FIELDS = 100


class LoginRequired(Exception):
    """No valid session cookie: the console sends the browser to the login page."""


def session_token(request: Request) -> str:
    token = request.cookies.get(COOKIE, "")
    if not token:
        raise LoginRequired
    return token


def session_caller(request: Request, db: Database) -> Caller:
    """The caller of the session in the cookie (kept where ``deps.caller`` looks first, so
    the API's ``needs()`` checks this caller); ``LoginRequired`` if there is none."""
    try:
        who = center(request).accounts.caller(db, session_token(request))
    except Unauthorized:
        raise LoginRequired from None
    request.state.caller = who
    return who


def may(action: str) -> Callable[..., Caller]:
    """A dependency: the console's caller, if its role allows ``action`` (the API's
    ``needs(action)``: ``Forbidden`` if not, and a refused mutation is audited)."""
    check = needs(action)

    def page_check(request: Request, db: Database) -> Caller:
        session_caller(request, db)
        return check(request, db)

    page_check.__name__ = f"may_{action.replace('.', '_')}"
    return page_check


def set_session(request: Request, response: Response, token: str, expires_in: float) -> None:
    response.set_cookie(
        COOKIE,
        token,
        max_age=max(1, int(expires_in)),
        path="/",
        httponly=True,
        samesite="strict",
        secure=request.url.scheme == "https",
    )


def end_session(response: Response) -> None:
    response.delete_cookie(COOKIE, path="/", httponly=True, samesite="strict")


def own_origin(request: Request) -> str:
    return f"{request.url.scheme}://{request.headers.get('host', '')}".lower()


def origin_of(url: str) -> str:
    parts = urlsplit(url)
    return f"{parts.scheme}://{parts.netloc}".lower() if parts.scheme and parts.netloc else ""


def same_origin(request: Request) -> None:
    """``Forbidden`` unless the request comes from a page of this site (its ``Origin``, or
    without one its ``Referer``, is this server's origin)."""
    origin = request.headers.get("origin")
    if origin is None:
        origin = origin_of(request.headers.get("referer", ""))
    if not origin or origin.lower() != own_origin(request):
        raise Forbidden(
            "a form of the console is acted on only when sent from the console's own pages",
            origin=origin or "",
        )


async def form(request: Request) -> FormData:
    """The fields of a URL-encoded form (the console's forms are all of that kind; a POST
    without a body is a form without fields)."""
    kind = request.headers.get("content-type", "").partition(";")[0].strip().lower()
    if not kind and request.headers.get("content-length", "0") == "0":
        return FormData()
    if kind != "application/x-www-form-urlencoded":
        raise InvalidInput("form", "expected a form (application/x-www-form-urlencoded)")
    body = b""
    async for chunk in request.stream():
        body += chunk
        if len(body) > MAX_FORM_BYTES:
            raise InvalidInput("form", f"at most {MAX_FORM_BYTES} bytes")
    try:
        pairs = parse_qsl(body.decode(), keep_blank_values=True, max_num_fields=MAX_FORM_FIELDS)
    except (UnicodeDecodeError, ValueError):
        raise InvalidInput("form", "not a well-formed form") from None
    return FormData([(name, value) for name, value in pairs])


Form = Annotated[FormData, Depends(form)]
