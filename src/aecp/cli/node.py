"""``aecp node``: list nodes, cordon them, maintenance mode (``node maintenance enter|exit``),
and ``node run`` (the node process itself)."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Annotated

import typer

from aecp.cli.centerclient import CenterClient
from aecp.cli.client import ApiError, Client
from aecp.cli.common import client, follow
from aecp.cli.output import Format, OutputOpt, emit, emit_events

app = typer.Typer(help="Cluster nodes.", no_args_is_help=True)
maintenance = typer.Typer(
    help="Maintenance mode: move a node's VMs off it to service it, then return it to use.",
    no_args_is_help=True,
)
app.add_typer(maintenance, name="maintenance")
WaitOpt = Annotated[
    bool,
    typer.Option("--wait/--no-wait", help="follow the operation to its end with a progress bar"),
]
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
    "maintenance",
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


@maintenance.command("enter")
def maintenance_enter(
    name: str,
    shutdown_unmigratable: Annotated[
        bool,
        typer.Option(
            "--shutdown-unmigratable",
            help="power off the running VMs that cannot move (pinned here, or no room "
            "elsewhere) instead of refusing",
        ),
    ] = False,
    wait: WaitOpt = True,
    output: OutputOpt = Format.TABLE,
) -> None:
    """Put a node in maintenance: the pre-checks run first (every failing one is listed and
    nothing changes), then its VMs are moved off one at a time."""
    body = {"shutdown_unmigratable": shutdown_unmigratable}
    with client() as c:
        accepted = _request(c, f"/v1/nodes/{name}/maintenance/enter", body)
        follow(c, accepted, not wait, output)


@maintenance.command("exit")
def maintenance_exit(
    name: str,
    restore_vms: Annotated[
        bool,
        typer.Option("--restore-vms", help="move the VMs moved off it back, one at a time"),
    ] = False,
    wait: WaitOpt = True,
    output: OutputOpt = Format.TABLE,
) -> None:
    """Return a node in maintenance to use."""
    with client() as c:
        accepted = _request(c, f"/v1/nodes/{name}/maintenance/exit", {"restore_vms": restore_vms})
        follow(c, accepted, not wait, output)


def _request(c: Client, path: str, body: dict[str, bool]) -> dict[str, object]:
    """POST ``body``; a refusal with failing pre-checks lists each on its own line."""
    try:
        accepted: dict[str, object] = c.post(path, json=body)
    except ApiError as exc:
        checks = exc.body.get("checks")
        if not checks:
            raise
        node = exc.body.get("node", "the node")
        lines = [f"  - {ch['check']}: {ch['reason']}" for ch in checks]
        message = f"node {node} cannot enter maintenance; failing pre-checks:\n" + "\n".join(lines)
        raise ApiError(message, exc.status) from None
    return accepted


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
