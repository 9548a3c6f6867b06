"""``aecp node maintenance enter|exit`` and ``aecp node list``'s maintenance column."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import pytest
from typer.testing import CliRunner

from aecp.cli.client import ApiError
from aecp.cli.node import app

OP = {"id": "op-1", "kind": "node.maintenance", "target": "n1", "state": "running",
      "progress": 0, "message": "entering maintenance: 2 VMs to move or power off"}  # fmt: skip
REFUSAL = {
    "error": "invalid_state",
    "message": "node n1 cannot enter maintenance: 2 pre-checks failed: ...",
    "node": "n1",
    "checks": [
        {"check": "one-at-a-time", "reason": "node n2 is maintenance: one node at a time"},
        {"check": "vm-state", "reason": "VM web is suspended: resume it or power it off first"},
    ],
}


class FakeClient:
    def __init__(self, answer: Callable[[str, Any], Any]) -> None:
        self.answer = answer
        self.posted: list[tuple[str, Any]] = []

    def post(self, path: str, json: Any = None) -> Any:
        self.posted.append((path, json))
        return self.answer(path, json)

    def get(self, path: str) -> Any:
        assert path == "/v1/nodes"
        return [{"name": "n1", "state": "ready", "maintenance": "entering_maintenance"}]


def use(monkeypatch: pytest.MonkeyPatch, fake: FakeClient) -> None:
    @contextmanager
    def fake_client() -> Iterator[FakeClient]:
        yield fake

    monkeypatch.setattr("aecp.cli.node.client", fake_client)


def test_failing_pre_checks_are_printed_each_on_its_own_line(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    def refuse(path: str, body: Any) -> Any:
        raise ApiError(REFUSAL["message"], 409, REFUSAL)

    use(monkeypatch, FakeClient(refuse))
    result = CliRunner().invoke(app, ["maintenance", "enter", "n1"])
    assert isinstance(result.exception, ApiError)
    assert str(result.exception).splitlines() == [
        "node n1 cannot enter maintenance; failing pre-checks:",
        "  - one-at-a-time: node n2 is maintenance: one node at a time",
        "  - vm-state: VM web is suspended: resume it or power it off first",
    ]


def test_enter_and_exit_send_their_flags_and_no_wait_returns_the_operation(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    fake = FakeClient(lambda path, body: {"operation": OP})
    use(monkeypatch, fake)
    runner = CliRunner()
    args = ["maintenance", "enter", "n1", "--shutdown-unmigratable", "--no-wait"]
    result = runner.invoke(app, [*args, "--output", "json"])
    assert result.exit_code == 0, result.output
    assert '"op-1"' in result.output
    result = runner.invoke(app, ["maintenance", "exit", "n1", "--restore-vms", "--no-wait"])
    assert result.exit_code == 0, result.output
    assert fake.posted == [
        ("/v1/nodes/n1/maintenance/enter", {"shutdown_unmigratable": True}),
        ("/v1/nodes/n1/maintenance/exit", {"restore_vms": True}),
    ]


def test_node_list_shows_the_maintenance_state(monkeypatch: pytest.MonkeyPatch) -> None:
    use(monkeypatch, FakeClient(lambda path, body: None))
    monkeypatch.setattr("aecp.cli.output.console.width", 300)
    result = CliRunner().invoke(app, ["list"])
    assert result.exit_code == 0, result.output
    assert "entering_maintenance" in result.output
