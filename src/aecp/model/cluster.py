"""The cluster record: its name, its stable id, and (clusters from before principals) the
digest of the API token created with it."""

from __future__ import annotations

import hashlib
import hmac
import secrets
import uuid

from aecp.model.base import Stored


class ClusterInfo(Stored):
    """``/aecp/cluster``. The token itself is never stored, only its SHA-256; since
    principals, tokens are theirs (``model.principal``) and a new cluster has none here."""

    name: str
    created_at: float
    token_sha256: str = ""
    id: str = ""  # a UUID, given once (records before it get one from ``cluster.upgrades``)

    def token_ok(self, token: str) -> bool:
        """Constant-time check of a presented bearer token."""
        digest = hashlib.sha256(token.encode()).hexdigest()
        return hmac.compare_digest(digest, self.token_sha256)


def new_token() -> tuple[str, str]:
    """A fresh API token and its digest."""
    token = secrets.token_urlsafe(32)
    return token, hashlib.sha256(token.encode()).hexdigest()


def new_cluster_id() -> str:
    return str(uuid.uuid4())
