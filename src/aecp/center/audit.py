"""The audit trail: append-only records of every mutation and every login, with secrets
redacted from the parameters."""

from __future__ import annotations

import json
import re
from typing import Any
from urllib.parse import urlsplit, urlunsplit

from sqlalchemy import select
from sqlalchemy.orm import Session as DB

from aecp.center.db.models import AuditRecord

SECRET_FIELDS = frozenset({"password", "token", "secret", "credentials", "private_key"})
# a URL under one of these keys may carry a token in its path or query (a webhook's does,
# often): both are redacted when there is more than "/"; a bare endpoint such as
# http://10.0.0.1:8700 says where, not how to get in, and is kept
URL_FIELDS = frozenset({"url", "webhook", "endpoint"})


_USERINFO = re.compile(r"(?<=://)[^/@\s]+@")


def redact(params: Any) -> Any:
    """``params`` with secret fields, a URL's user and password, and the path and query of a
    URL under a key in ``URL_FIELDS``, replaced."""
    if isinstance(params, dict):
        return {k: _redact_field(k, v) for k, v in params.items()}
    if isinstance(params, list):
        return [redact(v) for v in params]
    if isinstance(params, str):
        return _USERINFO.sub("[redacted]@", params)
    return params


def _redact_field(key: Any, value: Any) -> Any:
    name = str(key).lower()
    if name in SECRET_FIELDS:
        return "[redacted]"
    if isinstance(value, str) and (name in URL_FIELDS or name.endswith("_url")):
        return redact_url(value)
    return redact(value)


def redact_url(url: str) -> str:
    """``url`` with its user and password replaced, and its path, query and fragment too if
    it has any beyond "/". A value that is not a URL is replaced whole if it could hide one
    (a refused URL may still hold a real token)."""
    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018 (a port out of range raises here)
    except ValueError:
        return "[redacted]"
    if not parts.scheme or not parts.netloc:
        return "[redacted]" if any(c in url for c in "/?@#") else url
    _, at, host = parts.netloc.rpartition("@")
    netloc = f"[redacted]@{host}" if at else host
    if parts.path in ("", "/") and not parts.query and not parts.fragment:
        return urlunsplit((parts.scheme, netloc, parts.path, "", ""))
    return f"{parts.scheme}://{netloc}/[redacted]"


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
