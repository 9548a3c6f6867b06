"""``aecp token``: API principals (admin only). A new token is printed once."""

from __future__ import annotations

from typing import Annotated

import typer

from aecp.cli.common import client
from aecp.cli.output import Format, OutputOpt, emit

app = typer.Typer(help="API tokens: named principals with a role.", no_args_is_help=True)
COLS = ["name", "role", "created_at", "created_by"]


@app.command("create")
def create(
    name: str,
    role: Annotated[str, typer.Option(help="admin, operator or read-only")],
    output: OutputOpt = Format.TABLE,
) -> None:
    """Create a principal; its token is shown now and never again."""
    with client() as c:
        emit(c.post("/v1/tokens", json={"name": name, "role": role}), output, [*COLS, "token"])


@app.command("list")
def list_tokens(output: OutputOpt = Format.TABLE) -> None:
    """List principals (never their tokens)."""
    with client() as c:
        emit(c.get("/v1/tokens"), output, COLS)


@app.command("revoke")
def revoke(name: str, output: OutputOpt = Format.TABLE) -> None:
    """Revoke a principal: its token stops working at once (not the last admin)."""
    with client() as c:
        c.delete(f"/v1/tokens/{name}")
    emit({"principal": name, "revoked": True}, output)
