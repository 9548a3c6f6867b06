"""``aecp storage``: the node's storage server (a daemon)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from aecp.cli.common import client
from aecp.cli.output import Format, OutputOpt, emit, err_console

app = typer.Typer(help="The ABS storage server of a node.", no_args_is_help=True)


@app.command("run")
def run(config: Annotated[Path, typer.Option(help="node settings (JSON)")]) -> None:
    """Run this node's storage server: replicas and NBD exports (a daemon; SIGTERM stops it)."""
    from aecp.conf.settings import load
    from aecp.node.storage_server import main

    main(load(config))


@app.command("status")
def status(output: OutputOpt = Format.TABLE) -> None:
    """Storage servers and the cluster: raw capacity, allocated and provisioned bytes, how full
    (over 80% a warning, over 90% critical), and extents missing replicas."""
    with client() as c:
        st = c.get("/v1/storage")
    if output is Format.JSON:
        emit(st, output)
        return
    emit(
        st["servers"],
        output,
        ["node", "address", "capacity_bytes", "used_bytes", "free_bytes", "used_pct", "level"],
        title="storage servers",
    )
    emit({k: v for k, v in st.items() if k not in ("servers", "warnings")}, output)
    for warning in st.get("warnings", []):
        err_console.print(f"[bold yellow]warning:[/] {warning}")
