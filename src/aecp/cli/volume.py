"""``aecp volume``: ABS volumes."""

from __future__ import annotations

from typing import Annotated, Any

import typer

from aecp.cli.common import client
from aecp.cli.output import Format, OutputOpt, emit

app = typer.Typer(help="ABS volumes (replicated block storage).", no_args_is_help=True)
COLS = [
    "name",
    "size",
    "replicas",
    "allocated_bytes",
    "provisioned_bytes",
    "extents_allocated",
    "extents_total",
    "attached_to",
    "owner",
    "health",
]


def _readable(vol: dict[str, Any]) -> dict[str, Any]:
    """``vol`` with its owner as words ("VM web", "template gold", "-" when standalone)."""
    owner = vol.get("owner")
    kind = {"vm": "VM", "template": "template"}
    words = f"{kind.get(owner['kind'], owner['kind'])} {owner['name']}" if owner else None
    return {**vol, "owner": words}


@app.command("create")
def create(
    name: str,
    size: Annotated[str, typer.Option(help="e.g. 10G, 512M")],
    replicas: Annotated[int | None, typer.Option(help="1, 2 or 3 (default: by node count)")] = None,
    output: OutputOpt = Format.TABLE,
) -> None:
    """Create a thin volume (space is used on first write)."""
    with client() as c:
        emit(
            c.post("/v1/volumes", json={"name": name, "size": size, "replicas": replicas}),
            output,
            ["name", "size", "replicas", "extent_size"],
        )


@app.command("list")
def list_volumes(output: OutputOpt = Format.TABLE) -> None:
    """List volumes with allocated vs provisioned bytes and health."""
    with client() as c:
        vols = c.get("/v1/volumes")
        emit(vols if output is Format.JSON else [_readable(v) for v in vols], output, COLS)


@app.command("show")
def show(name: str, output: OutputOpt = Format.TABLE) -> None:
    """Show a volume and the health of each allocated extent."""
    with client() as c:
        vol = c.get(f"/v1/volumes/{name}")
        if output is Format.JSON:
            emit(vol, output)
            return
        extents = vol.pop("extents")
        emit(_readable(vol), output)
        if extents:
            emit(
                extents,
                output,
                ["slot", "id", "replicas", "stale", "generation", "allocated_bytes", "healthy"],
                title="extents",
            )


@app.command("resize")
def resize(
    name: str,
    size: Annotated[str, typer.Option(help="new size (grow only)")],
    output: OutputOpt = Format.TABLE,
) -> None:
    """Grow a volume."""
    with client() as c:
        emit(
            c.post(f"/v1/volumes/{name}/resize", json={"size": size}),
            output,
            ["name", "size", "replicas"],
        )


@app.command("delete")
def delete(name: str, output: OutputOpt = Format.TABLE) -> None:
    """Delete a volume nobody has attached."""
    with client() as c:
        c.delete(f"/v1/volumes/{name}")
    emit({"volume": name, "deleted": True}, output)


@app.command("export")
def export(
    name: str,
    node: Annotated[str | None, typer.Option(help="serve via this node")] = None,
    output: OutputOpt = Format.TABLE,
) -> None:
    """Print the nbd:// URI at which any NBD client reads and writes the volume."""
    with client() as c:
        params = {"node": node} if node else {}
        uri = c.get(f"/v1/volumes/{name}/export", params=params)["uri"]
    if output is Format.JSON:
        emit({"uri": uri}, output)
    else:
        typer.echo(uri)


snapshot_app = typer.Typer(help="Volume snapshots (O(1), independent).", no_args_is_help=True)
app.add_typer(snapshot_app, name="snapshot")
SNAP_COLS = ["volume", "name", "size", "created_at"]


@snapshot_app.command("create")
def snapshot_create(volume: str, name: str, output: OutputOpt = Format.TABLE) -> None:
    """Snapshot a volume no client has attached (for a VM's disks use: aecp vm snapshot)."""
    with client() as c:
        emit(c.post(f"/v1/volumes/{volume}/snapshots", json={"name": name}), output, SNAP_COLS)


@snapshot_app.command("list")
def snapshot_list(volume: str, output: OutputOpt = Format.TABLE) -> None:
    """List a volume's snapshots, oldest first."""
    with client() as c:
        emit(c.get(f"/v1/volumes/{volume}/snapshots"), output, SNAP_COLS)


@snapshot_app.command("delete")
def snapshot_delete(volume: str, name: str, output: OutputOpt = Format.TABLE) -> None:
    """Delete a snapshot (clones made from it are not affected)."""
    with client() as c:
        c.delete(f"/v1/volumes/{volume}/snapshots/{name}")
    emit({"snapshot": f"{volume}@{name}", "deleted": True}, output)


@snapshot_app.command("rollback")
def snapshot_rollback(volume: str, name: str, output: OutputOpt = Format.TABLE) -> None:
    """Make a detached volume hold the snapshot's content again."""
    with client() as c:
        emit(
            c.post(f"/v1/volumes/{volume}/snapshots/{name}/rollback"),
            output,
            ["name", "size", "replicas"],
        )


@app.command("clone")
def clone(
    snapshot: Annotated[str, typer.Argument(help="VOLUME@SNAPSHOT")],
    new: Annotated[str, typer.Argument(help="name of the new volume")],
    output: OutputOpt = Format.TABLE,
) -> None:
    """Create a volume from a snapshot in O(1); it does not depend on the snapshot."""
    volume, sep, snap = snapshot.partition("@")
    if not sep or not volume or not snap:
        raise typer.BadParameter("expected VOLUME@SNAPSHOT", param_hint="SNAPSHOT")
    with client() as c:
        emit(
            c.post(f"/v1/volumes/{volume}/snapshots/{snap}/clone", json={"name": new}),
            output,
            ["name", "size", "replicas", "source"],
        )
