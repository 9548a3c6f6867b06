"""``aecp lab``: the all-in-one lab on this machine (no root needed)."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Annotated

import typer

from aecp.cli.output import Format, OutputOpt, emit, err_console
from aecp.lab.harness import Lab, LabSpec, default_root

app = typer.Typer(help="The all-in-one lab: N nodes on this machine.", no_args_is_help=True)
RootOpt = Annotated[
    Path | None,
    typer.Option(help="lab directory (default: AECP_LAB_DIR or ~/.local/state/aecp/lab)"),
]


def _say(msg: str) -> None:
    err_console.print(f"[dim]lab:[/dim] {msg}")


@app.command("up")
def up(
    nodes: Annotated[int, typer.Option(help="number of nodes", min=1, max=9)] = 3,
    root: RootOpt = None,
    accel: Annotated[str, typer.Option(help="auto, kvm or tcg")] = "auto",
    node_memory: Annotated[int | None, typer.Option(help="MiB each node offers")] = None,
    subnet: Annotated[str, typer.Option(help="node k listens on <subnet>.k")] = "127.0.1",
    output: OutputOpt = Format.TABLE,
) -> None:
    """Start a lab of N nodes (3 etcd members), import the tiny image, print the endpoints."""
    from aecp.compute.images.tiny import ensure_tiny_image

    if accel not in ("auto", "kvm", "tcg"):
        raise typer.BadParameter("must be auto, kvm or tcg", param_hint="--accel")
    _say("making sure the tiny guest image is built")
    image = ensure_tiny_image()
    memory = node_memory or _default_node_memory(nodes)
    lab = Lab(
        root or default_root(),
        LabSpec(
            nodes=nodes,
            subnet=subnet,
            accel=accel,
            node_memory_mib=memory,
        ),
    )
    asyncio.run(lab.up(_say, image=image))
    emit(
        {
            "root": str(lab.root),
            "api": ", ".join(lab.api_urls()),
            "token_file": str(lab.token_file),
            "nodes": nodes,
        },
        output,
    )


def _default_node_memory(nodes: int) -> int:
    from aecp.node.host import meminfo

    return max(512, meminfo()["MemTotal"] // 1024 // nodes)


@app.command("status")
def status(root: RootOpt = None, output: OutputOpt = Format.TABLE) -> None:
    """Show the lab's processes per node."""
    lab = Lab.open(root)
    emit(
        lab.status(),
        output,
        ["node", "address", "api", "agent_pid", "etcd", "etcd_pid", "vms_running"],
    )


@app.command("down")
def down(root: RootOpt = None, output: OutputOpt = Format.TABLE) -> None:
    """Stop every process of the lab (agents, VMs, etcd) and remove its directory."""
    lab = Lab.open(root)
    pids = lab.down()
    emit({"stopped_processes": len(pids), "root": str(lab.root)}, output)


@app.command("kill-node")
def kill_node(name: str, root: RootOpt = None, output: OutputOpt = Format.TABLE) -> None:
    """Simulate a power loss: SIGKILL the node's agent, VMs and etcd member."""
    pids = Lab.open(root).kill_node(name)
    emit({"node": name, "killed_vms": len(pids)}, output)


@app.command("start-node")
def start_node(name: str, root: RootOpt = None, output: OutputOpt = Format.TABLE) -> None:
    """Start a killed node again (etcd member, then agent)."""
    lab = Lab.open(root)
    lab.start_node(name)
    emit({"node": name, "started": True}, output)
