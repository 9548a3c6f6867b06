"""Principals: the named holders of API tokens, each with one role.

A token is ``<principal>.<secret>``; only its SHA-256 is stored. Roles, from most to least:
``admin`` (everything), ``operator`` (everything but principals), ``read-only`` (reads).
A token without a ``.`` is the cluster's first token, from before principals: it is the
``admin`` principal's (``cluster.principals`` adopts it).
"""

from __future__ import annotations

import enum
import hashlib
import hmac
import secrets

from aecp.model.base import Stored


class Role(enum.StrEnum):
    ADMIN = "admin"
    OPERATOR = "operator"
    READ_ONLY = "read-only"

    def allows(self, needed: Role) -> bool:
        """True if this role may do what ``needed`` may."""
        return _RANK[self] >= _RANK[needed]


_RANK = {Role.READ_ONLY: 0, Role.OPERATOR: 1, Role.ADMIN: 2}
FIRST_ADMIN = "admin"


class PrincipalRecord(Stored):
    """``/aecp/principals/<name>``."""

    name: str
    role: Role
    token_sha256: str
    created_at: float
    created_by: str = ""

    def token_ok(self, token: str) -> bool:
        """Constant-time check of a presented token."""
        return hmac.compare_digest(digest(token), self.token_sha256)


def digest(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def new_principal_token(name: str) -> tuple[str, str]:
    """A fresh token for principal ``name`` and its digest."""
    token = f"{name}.{secrets.token_urlsafe(32)}"
    return token, digest(token)


def holder(token: str) -> str:
    """The principal a token names (``admin`` for a token from before principals)."""
    name, dot, _ = token.partition(".")
    return name if dot else FIRST_ADMIN
