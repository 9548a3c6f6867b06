"""Patroni's ``post_bootstrap`` for the trio: once, on the first primary, make the center's role
and database. Patroni runs it as user postgres with its own interpreter (``.venv-ha``), as
``python bootstrapdb.py SECRETS_FILE DSN`` with ``PGPASSFILE`` set for the superuser, so it
imports nothing but psycopg and the standard library. The center's password is read from the
secrets file and never appears on a command line, nor in what is sent to PostgreSQL: the role
is made with its SCRAM-SHA-256 verifier (``scram_verifier``), computed here, which PostgreSQL
stores as it is (a plain password in ``CREATE ROLE`` could reach the server's log or
``pg_stat_statements``)."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import os
import sys
from pathlib import Path

import psycopg
from psycopg import sql

CENTER_DB = "aecp"  # the same names as patroni.py's
CENTER_USER = "aecp"
SCRAM_ITERATIONS = 4096  # PostgreSQL's default (scram_iterations)
SCRAM_SALT_BYTES = 16


def scram_verifier(
    password: str, salt: bytes | None = None, iterations: int = SCRAM_ITERATIONS
) -> str:
    """The SCRAM-SHA-256 verifier of ``password`` as PostgreSQL stores it (RFC 5802, 7677):
    ``SCRAM-SHA-256$<iterations>:<base64 salt>$<base64 StoredKey>:<base64 ServerKey>``, with
    SaltedPassword = PBKDF2-HMAC-SHA-256(password, salt, iterations), StoredKey =
    SHA-256(HMAC(SaltedPassword, "Client Key")), ServerKey = HMAC(SaltedPassword, "Server
    Key"). ``salt``: 16 random bytes unless given. The password must be ASCII (``ValueError``
    otherwise): SASLprep, which PostgreSQL applies first, leaves ASCII as it is and would
    change some other characters."""
    if not password.isascii():
        raise ValueError("the password must be ASCII (SASLprep is not implemented here)")
    if iterations < 1:
        raise ValueError("iterations must be positive")
    salt = os.urandom(SCRAM_SALT_BYTES) if salt is None else salt
    salted = hashlib.pbkdf2_hmac("sha256", password.encode("ascii"), salt, iterations)
    stored_key = hashlib.sha256(hmac.digest(salted, b"Client Key", "sha256")).digest()
    server_key = hmac.digest(salted, b"Server Key", "sha256")
    return f"SCRAM-SHA-256${iterations}:{_b64(salt)}${_b64(stored_key)}:{_b64(server_key)}"


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def main(argv: list[str]) -> int:
    if len(argv) != 2:
        print("usage: python bootstrapdb.py SECRETS_FILE DSN", file=sys.stderr)
        return 2
    verifier = scram_verifier(json.loads(Path(argv[0]).read_text())["center"])
    with psycopg.connect(argv[1], autocommit=True) as conn:
        exists = conn.execute("SELECT 1 FROM pg_roles WHERE rolname = %s", (CENTER_USER,))
        if exists.fetchone() is None:
            conn.execute(
                sql.SQL("CREATE ROLE {} LOGIN PASSWORD {}").format(
                    sql.Identifier(CENTER_USER), sql.Literal(verifier)
                )
            )
        found = conn.execute("SELECT 1 FROM pg_database WHERE datname = %s", (CENTER_DB,))
        if found.fetchone() is None:
            conn.execute(
                sql.SQL("CREATE DATABASE {} OWNER {}").format(
                    sql.Identifier(CENTER_DB), sql.Identifier(CENTER_USER)
                )
            )
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
