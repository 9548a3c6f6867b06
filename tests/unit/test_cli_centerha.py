"""``aecp center ha secrets|deploy|promote``: bad input is refused with its field named and
changes nothing."""

from __future__ import annotations

import json
from pathlib import Path

from typer.testing import CliRunner

from aecp.cli.main import app
from aecp.common.errors import InvalidInput

EXAMPLE = Path(__file__).parents[2] / "deploy" / "center-ha" / "topology.example.json"


def test_deploy_writes_a_node_and_refuses_a_node_the_topology_lacks(tmp_path: Path) -> None:
    runner = CliRunner()
    secrets = tmp_path / "secrets.json"
    assert runner.invoke(app, ["center", "ha", "secrets", str(secrets)]).exit_code == 0
    assert (secrets.stat().st_mode & 0o777) == 0o600
    witness = json.loads(EXAMPLE.read_text())["nodes"][2]["name"]
    base = ["center", "ha", "deploy", "--topology", str(EXAMPLE), "--secrets", str(secrets)]
    done = runner.invoke(app, [*base, "--node", witness, "--base", str(tmp_path / "w")])
    assert done.exit_code == 0, done.output
    assert (tmp_path / "w" / "etcd.env").exists()
    bad = runner.invoke(app, [*base, "--node", "nope", "--base", str(tmp_path / "x")])
    assert bad.exit_code == 2
    assert "node" in bad.output and not (tmp_path / "x").exists()


def test_promote_without_force_is_refused_naming_the_flag(tmp_path: Path) -> None:
    runner = CliRunner()
    secrets = tmp_path / "secrets.json"
    runner.invoke(app, ["center", "ha", "secrets", str(secrets)])
    passive = json.loads(EXAMPLE.read_text())["nodes"][1]["name"]
    r = runner.invoke(
        app,
        ["center", "ha", "promote", passive, "--topology", str(EXAMPLE), "--secrets", str(secrets)],
    )
    assert isinstance(r.exception, InvalidInput)  # aecp's main prints it: "error: force: ..."
    assert r.exception.fields["field"] == "force"
