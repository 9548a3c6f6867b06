"""The web console of the operation center, served by the center itself at ``/``.

Server-rendered pages (Jinja2 templates, package data) with a small script of the console's
own (``static/console.js``: no build step, no library) that refreshes the parts of a page
when the server's events (``/ui/events``) say their data changed. The console logs in with
the API's sessions (a cookie), checks every page and form with the API's ``needs()``, and
reads and changes things with the API's own functions, so it can do nothing the API would
refuse the same user. None of its routes is in the OpenAPI document.
"""

from __future__ import annotations

from fastapi import FastAPI
from starlette.staticfiles import StaticFiles

from aecp.center.web import forms, live, pages


def mount(app: FastAPI) -> None:
    """Serve the console's pages, forms, events and static files from ``app`` (the events
    of every stream read by one poller, ``live.Poller``)."""
    app.state.live = live.Poller(app.state.center)
    app.include_router(pages.router)
    app.include_router(forms.router)
    app.include_router(live.router)
    app.mount(
        "/ui/static",
        StaticFiles(packages=[("aecp.center.web", "static")]),
        name="console-static",
    )
