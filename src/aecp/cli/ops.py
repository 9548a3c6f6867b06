"""``aecp operation``: long-running requests and their progress."""

from __future__ import annotations

import typer

from aecp.cli.common import client
from aecp.cli.output import Format, OutputOpt, emit

app = typer.Typer(help="Operations (long-running requests).", no_args_is_help=True)
COLS = ["id", "kind", "target", "state", "progress", "message"]


@app.command("list")
def list_ops(output: OutputOpt = Format.TABLE) -> None:
    """List operations, oldest first."""
    with client() as c:
        emit(c.get("/v1/operations"), output, COLS)


@app.command("show")
def show(op_id: str, output: OutputOpt = Format.TABLE) -> None:
    """Show one operation."""
    with client() as c:
        emit(c.get(f"/v1/operations/{op_id}"), output)


@app.command("cancel")
def cancel(op_id: str, output: OutputOpt = Format.TABLE) -> None:
    """Ask for a running operation to be cancelled (live migrations can be): the node carrying
    it out decides; `aecp operation show ID` tells how it ended."""
    with client() as c:
        emit(c.post(f"/v1/operations/{op_id}/cancel"), output, COLS)
