"""Patroni's ``post_bootstrap`` for the trio: once, on the first primary, make the center's role
and database. Patroni runs it as user postgres with its own interpreter (``.venv-ha``), as
``python bootstrapdb.py SECRETS_FILE DSN`` with ``PGPASSFILE`` set for the superuser, so it
imports nothing but psycopg and the standard library. The center's password is read from the
secrets file and never appears on a command line."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import psycopg
from psycopg import sql

CENTER_DB = "aecp"  # the same names as patroni.py's
CENTER_USER = "aecp"


def main(argv: list[str]) -> int:
    if len(argv) != 2:
        print("usage: python bootstrapdb.py SECRETS_FILE DSN", file=sys.stderr)
        return 2
    password = json.loads(Path(argv[0]).read_text())["center"]
    with psycopg.connect(argv[1], autocommit=True) as conn:
        exists = conn.execute("SELECT 1 FROM pg_roles WHERE rolname = %s", (CENTER_USER,))
        if exists.fetchone() is None:
            conn.execute(
                sql.SQL("CREATE ROLE {} LOGIN PASSWORD {}").format(
                    sql.Identifier(CENTER_USER), sql.Literal(password)
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
