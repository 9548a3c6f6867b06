"""The center's database: SQLAlchemy 2 models (``models``), the engine (``engine``), and the
schema, created and upgraded only by Alembic migrations (``migrations``)."""
