"""Alembic's environment for the center: online migrations on the configured URL."""

from __future__ import annotations

from alembic import context

from aecp.center.db.engine import make_engine
from aecp.center.db.models import Base

url = context.config.get_main_option("sqlalchemy.url")
assert url is not None
engine = make_engine(url)
with engine.connect() as connection:
    context.configure(connection=connection, target_metadata=Base.metadata, render_as_batch=True)
    with context.begin_transaction():
        context.run_migrations()
engine.dispose()
