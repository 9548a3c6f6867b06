"""``aecp template``: VM templates."""

from __future__ import annotations

import typer

from aecp.cli.centerclient import CenterClient
from aecp.cli.common import client, done
from aecp.cli.output import Format, OutputOpt, emit

app = typer.Typer(help="VM templates (create VMs from them with --template).", no_args_is_help=True)


@app.command("list")
def list_templates(output: OutputOpt = Format.TABLE) -> None:
    """List templates."""
    with client() as c:
        cols = ["name", "vcpus", "memory_mib", "source_vm"]
        emit(
            c.get("/v1/templates"),
            output,
            ["cluster", *cols] if isinstance(c, CenterClient) else cols,
        )


@app.command("delete")
def delete(name: str, output: OutputOpt = Format.TABLE) -> None:
    """Delete a template (VMs created from it are not affected)."""
    with client() as c:
        answer = c.delete(f"/v1/templates/{name}")
        if answer is not None:
            done(c, answer, output)
            return
    emit({"template": name, "deleted": True}, output)
