"""Alerts as the console shows them: listed by the API's own ``list_alerts`` (newest first),
and a version of the alerts table for the live updates (``live``)."""

from __future__ import annotations

import hashlib

from fastapi import Request
from sqlalchemy import func, select
from sqlalchemy.orm import Session as DB

from aecp.center.accounts import Caller
from aecp.center.alerts import RULES
from aecp.center.api import alerts as alert_api
from aecp.center.db.models import Alert

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


def alerts_version(db: DB) -> str:
    row = db.execute(
        select(func.count(), func.max(Alert.id), func.max(Alert.updated_at)).select_from(Alert)
    ).one()
    return hashlib.sha256(repr(tuple(row)).encode()).hexdigest()[:12]
