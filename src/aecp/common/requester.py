"""Who asked for what is being done: the authenticated principal of the API request being
served, for the operations it creates (``Operation.requested_by``).

Set by the API's authentication for the request's task (``asyncio`` copies context into tasks
it starts, so work spawned by the request keeps it); empty outside a request (a controller's
own work).
"""

from __future__ import annotations

from contextvars import ContextVar

REQUESTED_BY: ContextVar[str] = ContextVar("requested_by", default="")
