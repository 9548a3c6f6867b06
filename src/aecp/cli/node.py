"""``aecp node``: list nodes, and ``node run`` (the node process itself)."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Annotated

import typer

from aecp.cli.centerclient import CenterClient
from aecp.cli.common import client
from aecp.cli.output import Format, OutputOpt, emit, emit_events

app = typer.Typer(help="Cluster nodes.", no_args_is_help=True)
COLS = [
    "name",
    "state",
    "address",
    "accel",
    "capacity.cpus",
    "capacity.memory_mib",
    "reserved_memory_mib",
    "vms",
    "cordoned",
    "usage.cpu_percent",
    "usage.memory_used_mib",
]


@app.command("list")
def list_nodes(output: OutputOpt = Format.TABLE) -> None:
    """List nodes with state, capacity and usage."""
    with client() as c:
        emit(
            c.get("/v1/nodes"), output, ["cluster", *COLS] if isinstance(c, CenterClient) else COLS
        )


@app.command("show")
def show(name: str, output: OutputOpt = Format.TABLE) -> None:
    """Show one node."""
    with client() as c:
        emit(c.get(f"/v1/nodes/{name}"), output)


@app.command("cordon")
def cordon(
    name: str,
    reason: Annotated[str, typer.Option(help="why, shown with the node")] = "",
    output: OutputOpt = Format.TABLE,
) -> None:
    """Place no new VM on a node (the VMs there stay)."""
    with client() as c:
        emit(c.post(f"/v1/nodes/{name}/cordon", json={"reason": reason}), output)


@app.command("uncordon")
def uncordon(name: str, output: OutputOpt = Format.TABLE) -> None:
    """Let VMs be placed on a node again."""
    with client() as c:
        emit(c.post(f"/v1/nodes/{name}/uncordon"), output)


@app.command("events")
def events(name: str, output: OutputOpt = Format.TABLE) -> None:
    """What was decided about one node (by controllers, by administrators), newest first."""
    with client() as c:
        emit_events(c.get(f"/v1/nodes/{name}/events"), output, f"events of node {name}")


@app.command("run")
def run(config: Annotated[Path, typer.Option(help="node settings (JSON)")]) -> None:
    """Run this node's agent, storage of VM state and cluster API (a daemon; SIGTERM stops it,
    VMs keep running)."""
    from aecp.conf.settings import load
    from aecp.node.main import run_node

    asyncio.run(run_node(load(config)))
