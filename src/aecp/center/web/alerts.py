"""Alerts as the console shows them: listed by the API's own ``list_alerts`` (newest first)."""

from __future__ import annotations

from fastapi import Request
from sqlalchemy.orm import Session as DB

from aecp.center.accounts import Caller
from aecp.center.alerts import RULES
from aecp.center.api import alerts as alert_api

SHOWN = 200
# the rules whose alerts a person resolves (a failed task: "handled"); others resolve alone
ACKNOWLEDGED = frozenset(name for name, spec in RULES.items() if spec.one_shot)


def alert_rows(
    request: Request, db: DB, who: Caller, open_only: bool
) -> list[alert_api.AlertPublic]:
    """The open alerts, or every alert, as ``GET /v1/alerts`` answers (open ones first)."""
    if open_only:
        return alert_api.list_alerts(request, db, who, state="open", limit=SHOWN)
    found = alert_api.list_alerts(request, db, who, limit=SHOWN)
    return sorted(found, key=lambda a: a.state != "open")
