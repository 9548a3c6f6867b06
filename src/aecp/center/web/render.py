"""Pages out of templates, and what a page answers when something fails.

Templates and static files are package data (``aecp.center.web``: ``templates/``,
``static/``). Every HTML answer forbids framing and any script or style but the console's own
files (``Content-Security-Policy``). ``WebRoute`` turns what a route raises into what a
browser expects: no session is a redirect to the login page; a refusal (403), a missing object
(404), an address with a parameter out of bounds (422: no form can mend it) or an error on a
page is an error page with that status; a refused form (a name taken, a field wrong) goes back
to the page it came from with the reason shown once (a "flash" cookie). Filters show what a
cluster sent that is not a figure as ``-``.
"""

from __future__ import annotations

import datetime
import logging
import math
from collections.abc import Callable, Coroutine
from typing import Any
from urllib.parse import quote, unquote, urlsplit

import jinja2
from fastapi import Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, RedirectResponse
from fastapi.routing import APIRoute

from aecp import __version__
from aecp.center.accounts import Caller
from aecp.center.ha.gate import Badge, leadership_of
from aecp.center.web.auth import LoginRequired, end_session, origin_of, own_origin
from aecp.common.errors import AecpError, Forbidden, NotFound, Unauthorized

log = logging.getLogger(__name__)
FLASH = "aoc_flash"
SECURITY_HEADERS = {
    "Content-Security-Policy": (
        "default-src 'self'; img-src 'self' data:; frame-ancestors 'none'; form-action 'self'"
    ),
    "X-Frame-Options": "DENY",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "same-origin",
    "Cache-Control": "no-store",
}
UNITS = ("B", "KiB", "MiB", "GiB", "TiB", "PiB")


def figure(n: Any) -> float | None:
    """A number a cluster sent, or ``None`` if it sent something else (shown as ``-``)."""
    if isinstance(n, bool) or not isinstance(n, int | float):
        return None
    v = float(n)
    return v if math.isfinite(v) else None


def size(n: Any) -> str:
    """``1073741824`` → ``1.0 GiB``."""
    v = figure(n)
    if v is None:
        return "-"
    for unit in UNITS:
        if abs(v) < 1024 or unit == UNITS[-1]:
            return f"{v:.0f} {unit}" if unit == "B" else f"{v:.1f} {unit}"
        v /= 1024
    return "-"


def mib(n: Any) -> str:
    v = figure(n)
    return "-" if v is None else size(v * 1024 * 1024)


def utc(ts: Any) -> str:
    t = figure(ts)
    if not t:
        return "-"
    try:
        return datetime.datetime.fromtimestamp(t, datetime.UTC).strftime("%Y-%m-%d %H:%M:%S UTC")
    except (OverflowError, OSError, ValueError):  # a time no calendar holds
        return "-"


def ago(ts: Any, now: float) -> str:
    t = figure(ts)
    if not t:
        return "never"
    seconds = now - t
    if seconds < 0:
        return "just now"
    for limit, unit, div in ((60, "s", 1), (3600, "min", 60), (86400, "h", 3600)):
        if seconds < limit:
            return f"{seconds / div:.0f} {unit} ago"
    return f"{seconds / 86400:.0f} d ago"


def mapping(value: Any) -> dict[str, Any]:
    """``value`` if a cluster sent a mapping there, else an empty one (``.get`` works)."""
    return value if isinstance(value, dict) else {}


def _environment() -> jinja2.Environment:
    env = jinja2.Environment(
        loader=jinja2.PackageLoader("aecp.center.web", "templates"),
        autoescape=True,
        undefined=jinja2.StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
    )
    env.filters.update(size=size, mib=mib, utc=utc, mapping=mapping)
    env.globals.update(version=__version__, quote=quote)
    return env


ENV = _environment()


def render(
    request: Request,
    template: str,
    status: int = 200,
    since: str = "",
    **context: Any,
) -> HTMLResponse:
    """The page ``template`` with ``context``, the caller (if known), the clock, the flash
    message (shown once: its cookie goes with this answer) and the HA badge (``ha``; ``None``
    standalone); ``since``: the versions of the live topics the page was made from
    (``live``)."""
    center = request.app.state.center
    now = center.clock.wall()
    who: Caller | None = getattr(request.state, "caller", None)
    flash = _flash(request)
    page = ENV.get_template(template).render(
        request=request,
        who=who,
        now=now,
        ago=lambda ts: ago(ts, now),
        flash=flash,
        path=request.url.path,
        since=since,
        ha=_ha_badge(request),
        **context,
    )
    response = HTMLResponse(page, status_code=status, headers=SECURITY_HEADERS)
    if flash is not None:
        response.delete_cookie(FLASH, path="/")
    return response


def _ha_badge(request: Request) -> Badge | None:
    """What the header says of the HA trio: the last status read, never one read now."""
    leadership = leadership_of(request.app)
    return leadership.badge() if leadership is not None else None


def _flash(request: Request) -> tuple[str, str] | None:
    raw = request.cookies.get(FLASH)
    if not raw:
        return None
    kind, _, text = unquote(raw).partition("|")
    return (kind if kind in ("ok", "error") else "error", text[:500])


def flash(response: Response, kind: str, text: str) -> None:
    """Show ``text`` once on the next page (``kind``: ok or error)."""
    response.set_cookie(
        FLASH, quote(f"{kind}|{text[:500]}"), max_age=60, path="/", httponly=True, samesite="strict"
    )


def safe_next(target: str | None, default: str = "/") -> str:
    """A path on this site to go to (never another site: ``//host`` or a scheme is refused)."""
    if not target or not target.startswith("/") or target.startswith("//") or "\\" in target:
        return default
    return target


def back(request: Request, default: str = "/") -> str:
    """The page a form was sent from, if it is one of this site's."""
    referer = request.headers.get("referer", "")
    if not referer or origin_of(referer) != own_origin(request):
        return default
    parts = urlsplit(referer)
    return safe_next(parts.path + (f"?{parts.query}" if parts.query else ""), default)


def redirect(to: str) -> RedirectResponse:
    return RedirectResponse(to, status_code=303, headers={"Cache-Control": "no-store"})


def to_login(request: Request) -> Response:
    here = request.url.path + (f"?{request.url.query}" if request.url.query else "")
    target = "/login" if request.method != "GET" or here == "/" else f"/login?next={quote(here)}"
    response = redirect(target)
    end_session(response)
    return response


def failed(request: Request, exc: AecpError) -> Response:
    """A refused form goes back with its reason; anything else is an error page."""
    if request.method == "POST" and not isinstance(exc, Forbidden | NotFound):
        if exc.http_status >= 500:
            log.warning("console: %s %s failed: %s", request.method, request.url.path, exc.message)
        response = redirect(back(request))
        flash(response, "error", exc.message)
        return response
    return render(request, "error.html", exc.http_status, error=exc)


class WebRoute(APIRoute):
    """A console route: failures are answered as pages (see the module's docstring)."""

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handler = super().get_route_handler()

        async def guarded(request: Request) -> Response:
            try:
                return await handler(request)
            except (LoginRequired, Unauthorized):
                return to_login(request)
            except AecpError as exc:
                return failed(request, exc)
            except RequestValidationError as exc:  # the address: no form can mend it
                where = ", ".join(".".join(map(str, e.get("loc", ()))) for e in exc.errors())
                invalid = _Invalid(f"invalid request: {where}")
                return render(request, "error.html", invalid.http_status, error=invalid)

        return guarded


class _Invalid(AecpError):
    code = "invalid_input"
    http_status = 422
