"""The center's REST API (``/v1``): sessions, users, roles, audit."""
