"""``aecp center``: the operation center (AOC)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from aecp.center.settings import CenterSettings

app = typer.Typer(help="The operation center (AOC): users, roles, audit.", no_args_is_help=True)


@app.command("run")
def run(
    data_dir: Annotated[Path, typer.Option(help="where the center keeps its data")],
    address: Annotated[str, typer.Option(help="address to listen on")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="port to listen on")] = 8800,
    database_url: Annotated[str, typer.Option(help="SQLAlchemy URL [default: SQLite]")] = "",
) -> None:
    """Serve the center (its database is made or upgraded first; at first start the root
    user's password is printed once and written to DATA_DIR/root-password, mode 0600)."""
    from aecp.center.main import run as serve

    serve(CenterSettings(data_dir=data_dir, address=address, port=port, database_url=database_url))
