"""Tables are for people: times as UTC with their age, sizes in binary units; ``--output
json`` keeps the raw values."""

from __future__ import annotations

import json

import pytest

from aecp.cli.output import Format, emit, human

NOW = 1796603882.7  # 2026-12-07 00:38:02 UTC


@pytest.mark.parametrize(
    ("key", "value", "shown"),
    [
        ("created_at", NOW - 180, "2026-12-07 00:35 UTC (3 min ago)"),
        ("last_sync_at", 0.0, "-"),
        ("size", 1 << 30, "1.0 GiB"),
        ("allocated_bytes", 1536, "1.5 KiB"),
        ("provisioned_bytes", 512, "512 B"),
        ("memory_mib", 256, "256.0 MiB"),
        ("vcpus", 2, "2"),
        ("disabled", True, "True"),
        ("name", "web", "web"),
    ],
)
def test_a_cell_is_shown_for_people(key: str, value: object, shown: str) -> None:
    assert human(key, value, now=NOW) == shown


def test_json_keeps_the_raw_values(capsys: pytest.CaptureFixture[str]) -> None:
    row = {"name": "v", "size": 1 << 30, "created_at": NOW}
    emit([row], Format.JSON, ["name", "size", "created_at"])
    assert json.loads(capsys.readouterr().out) == [row]
    emit([row], Format.TABLE, ["name", "size", "created_at"])
    table = capsys.readouterr().out
    assert "1.0 GiB" in table and "2026-12-07 00:38 UTC" in table and "1073741824" not in table
