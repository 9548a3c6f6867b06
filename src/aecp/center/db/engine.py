"""The engine, the schema's upgrade, and the lock two starting centers take turns under.

SQLite runs in WAL mode with foreign keys on, and centers sharing a data directory take turns
with ``flock`` on a file there. PostgreSQL (HA) runs through psycopg 3 (``postgresql://`` means
``postgresql+psycopg://``) at its default isolation, READ COMMITTED: what the center relies on
holds there (claims are conditional ``UPDATE``s checked by their row count; a duplicate is
refused by a unique key); every connection is checked before use (``pool_pre_ping``: after a
failover the old ones are gone) and a connection attempt gives up after ``CONNECT_TIMEOUT_S``.
Centers sharing a PostgreSQL database take turns under a session advisory lock
(``pg_advisory_lock``), which the server releases if the holder dies.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from alembic import command
from alembic.config import Config
from alembic.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import Engine, create_engine, event, text
from sqlalchemy.engine import make_url
from sqlalchemy.exc import DBAPIError

MIGRATIONS = Path(__file__).parent / "migrations"
CONNECT_TIMEOUT_S = 3
# the advisory lock's key: any constant no other user of the database takes ("AECPSTRT")
START_LOCK_KEY = 0x4145435053545254


def engine_url(url: str) -> str:
    """``url`` with psycopg 3 named as the driver of a bare ``postgresql://`` URL."""
    parsed = make_url(url)
    if parsed.drivername == "postgresql":
        parsed = parsed.set(drivername="postgresql+psycopg")
    return parsed.render_as_string(hide_password=False)


def is_sqlite(url: str) -> bool:
    return url.startswith("sqlite")


def make_engine(url: str) -> Engine:
    if is_sqlite(url):
        engine = create_engine(url, connect_args={"check_same_thread": False})

        @event.listens_for(engine, "connect")
        def _pragmas(conn: Any, _record: Any) -> None:
            cur = conn.cursor()
            cur.execute("PRAGMA journal_mode=WAL")
            cur.execute("PRAGMA foreign_keys=ON")
            cur.execute("PRAGMA busy_timeout=5000")
            cur.close()

        return engine
    return create_engine(
        engine_url(url),
        pool_pre_ping=True,
        connect_args={"connect_timeout": CONNECT_TIMEOUT_S},
    )


def alembic_config(url: str) -> Config:
    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS))
    # alembic's options are interpolated: a "%" in a password must be doubled
    cfg.set_main_option("sqlalchemy.url", url.replace("%", "%%"))
    return cfg


def upgrade(url: str) -> None:
    """Bring the database at ``url`` to the newest schema (creating it if empty)."""
    command.upgrade(alembic_config(url), "head")


def at_head(engine: Engine) -> bool:
    """Whether the database has the newest schema (read only: a standby can answer)."""
    scripts = Config()
    scripts.set_main_option("script_location", str(MIGRATIONS))
    head = ScriptDirectory.from_config(scripts).get_current_head()
    with engine.connect() as conn:
        return MigrationContext.configure(conn).get_current_revision() == head


def writable(engine: Engine) -> bool:
    """Whether the database takes writes: always for SQLite; for PostgreSQL, unless it is a
    standby (in recovery)."""
    if engine.dialect.name != "postgresql":
        return True
    with engine.connect() as conn:
        return not conn.execute(text("SELECT pg_is_in_recovery()")).scalar_one()


@contextlib.contextmanager
def start_lock(engine: Engine, lock_file: Path) -> Iterator[None]:
    """Exclusive for the block among centers on one database: ``flock`` on ``lock_file`` for
    SQLite, ``pg_advisory_lock`` for PostgreSQL (both released if the process dies)."""
    if engine.dialect.name != "postgresql":
        with _file_lock(lock_file):
            yield
        return
    with engine.connect() as conn:
        conn.execute(text("SELECT pg_advisory_lock(:k)"), {"k": START_LOCK_KEY})
        conn.commit()
        try:
            yield
        finally:
            with contextlib.suppress(DBAPIError):  # a connection that broke holds no lock
                conn.execute(text("SELECT pg_advisory_unlock(:k)"), {"k": START_LOCK_KEY})
                conn.commit()


@contextlib.contextmanager
def _file_lock(path: Path) -> Iterator[None]:
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)
