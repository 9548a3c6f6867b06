"""``aecp storage status`` shows each server's fullness and level and the cluster's warnings."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import pytest
from typer.testing import CliRunner

from aecp.cli.storage import app

STATUS: dict[str, Any] = {
    "servers": [
        {"node": "node1", "address": "127.0.1.1", "capacity_bytes": 100, "used_bytes": 60,
         "free_bytes": 40, "used_pct": 60.0, "level": "ok"},
        {"node": "node2", "address": "127.0.1.2", "capacity_bytes": 100, "used_bytes": 95,
         "free_bytes": 5, "used_pct": 95.0, "level": "critical"},
    ],
    "raw_bytes": 200,
    "provisioned_bytes": 500,
    "level": "critical",
    "warnings": ["storage server node2 is 95% full (critical)"],
}  # fmt: skip


class FakeClient:
    def get(self, path: str) -> dict[str, Any]:
        assert path == "/v1/storage"
        return STATUS


@contextmanager
def fake_client() -> Iterator[FakeClient]:
    yield FakeClient()


def test_storage_status_shows_levels_and_warns_about_full_servers(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr("aecp.cli.storage.client", fake_client)
    result = CliRunner().invoke(app, ["status"], terminal_width=200)
    assert result.exit_code == 0, result.output
    assert "critical" in result.output and "95.0" in result.output
    assert "provisioned_bytes" in result.output
    assert "storage server node2 is 95% full (critical)" in result.output
