"""The audit trail: append-only records of every mutation and every login, with secrets
redacted from the parameters."""

from __future__ import annotations

import json
import re
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session as DB

from aecp.center.db.models import AuditRecord

SECRET_FIELDS = frozenset({"password", "token", "secret", "credentials", "private_key"})


_USERINFO = re.compile(r"(?<=://)[^/@\s]+@")


def redact(params: Any) -> Any:
    """``params`` with secret fields, and a URL's user and password, replaced."""
    if isinstance(params, dict):
        return {
            k: "[redacted]" if k.lower() in SECRET_FIELDS else redact(v) for k, v in params.items()
        }
    if isinstance(params, list):
        return [redact(v) for v in params]
    if isinstance(params, str):
        return _USERINFO.sub("[redacted]@", params)
    return params


def record(
    db: DB,
    *,
    at: float,
    user: str,
    address: str,
    action: str,
    target: str,
    params: Any,
    result: str,
    task_id: str = "",
) -> None:
    db.add(
        AuditRecord(
            at=at,
            user=user[:64],
            address=address[:64],
            action=action[:64],
            target=target[:256],
            params=json.dumps(redact(params), sort_keys=True, default=str)[:8192],
            result=redact(result)[:256],
            task_id=task_id,
        )
    )


def records(
    db: DB,
    user: str | None = None,
    action: str | None = None,
    limit: int = 100,
    before: int | None = None,
) -> list[AuditRecord]:
    """Newest first; ``before``: records older than that id (the next page)."""
    q = select(AuditRecord).order_by(AuditRecord.id.desc()).limit(limit)
    if user is not None:
        q = q.where(AuditRecord.user == user)
    if action is not None:
        q = q.where(AuditRecord.action == action)
    if before is not None:
        q = q.where(AuditRecord.id < before)
    return list(db.scalars(q))
