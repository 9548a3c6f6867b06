"""``aecp volume``: ABS volumes."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer

from aecp.cli.centerclient import CenterClient
from aecp.cli.common import client, done
from aecp.cli.output import Format, OutputOpt, emit, iso_time
from aecp.common.pki import grant_credential, write_private
from aecp.model.base import check_name

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
        done(
            c,
            c.post("/v1/volumes", json={"name": name, "size": size, "replicas": replicas}),
            output,
            ["name", "size", "replicas", "extent_size"],
        )


@app.command("list")
def list_volumes(output: OutputOpt = Format.TABLE) -> None:
    """List volumes with allocated vs provisioned bytes and health."""
    with client() as c:
        vols = c.get("/v1/volumes")
        cols = ["cluster", *COLS] if isinstance(c, CenterClient) else COLS
        emit(vols if output is Format.JSON else [_readable(v) for v in vols], output, cols)


@app.command("show")
def show(name: str, output: OutputOpt = Format.TABLE) -> None:
    """Show a volume, how many of its extents have a replica on the node it is attached to
    (locality), its copies in progress, and the health of each allocated extent."""
    with client() as c:
        vol = c.get(f"/v1/volumes/{name}")
        if output is Format.JSON:
            emit(vol, output)
            return
        extents = vol.pop("extents")
        vol["recoveries"] = "; ".join(vol.get("recoveries", [])) or "-"
        emit(_readable(vol), output)
        if extents:
            emit(
                extents,
                output,
                [
                    "slot",
                    "id",
                    "replicas",
                    "stale",
                    "generation",
                    "allocated_bytes",
                    "healthy",
                    "recovery",
                ],
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
        done(
            c,
            c.post(f"/v1/volumes/{name}/resize", json={"size": size}),
            output,
            ["name", "size", "replicas"],
        )


@app.command("delete")
def delete(name: str, output: OutputOpt = Format.TABLE) -> None:
    """Delete a volume nobody has attached."""
    with client() as c:
        answer = c.delete(f"/v1/volumes/{name}")
        if answer is not None:
            done(c, answer, output)
            return
    emit({"volume": name, "deleted": True}, output)


@app.command("export")
def export(
    name: str,
    node: Annotated[str | None, typer.Option(help="serve through this node")] = None,
    directory: Annotated[
        Path | None,
        typer.Option("--dir", help="where to write the credential (default: ./<name>-nbd-tls)"),
    ] = None,
    days: Annotated[int, typer.Option(help="days the credential is valid", min=1, max=366)] = 30,
    output: OutputOpt = Format.TABLE,
) -> None:
    """Let an outside NBD client read and write the volume over TLS.

    Makes a client key and certificate here, under a CA of their own whose key is thrown away
    (the client key never leaves this machine), registers that CA as the only credential that
    may open the volume, writes the credential directory that QEMU, qemu-img, qemu-io, nbdinfo,
    nbdcopy and fio read (ca-cert.pem, client-cert.pem, client-key.pem), and prints how to use
    it. Revoke with: aecp volume unexport NAME.
    """
    check_name("name", name)  # before anything is written under a directory named after it
    target = (directory or Path(f"{name}-nbd-tls")).absolute()
    if target.exists() and (not target.is_dir() or any(target.iterdir())):
        why = f"{target} exists and is not an empty directory"
        raise typer.BadParameter(why, param_hint="--dir")
    own_ca, cert, key = grant_credential(f"aecp-export:{name}", days=days)
    write_credentials(target, own_ca, cert, key)  # before the grant: a failed write asks nothing
    try:
        with client() as c:
            body = {"client_ca_certificate": own_ca.decode(), "node": node}
            grant = c.post(f"/v1/volumes/{name}/export", json=body)
    except BaseException:
        for f in CREDENTIAL_FILES:
            (target / f).unlink(missing_ok=True)
        raise
    # the cluster CA (to check the server) and the credential's own CA (QEMU checks its own
    # certificate against the same file)
    write_private(target / "ca-cert.pem", grant["ca_certificate"].encode() + own_ca)
    usage = export_usage(grant, target)
    if output is Format.JSON:
        emit({**grant, "credential_dir": str(target), **usage}, output)
        return
    typer.echo(
        f"volume {name} is exported through {grant['node']} ({grant['address']}:"
        f"{grant['port']}) until {iso_time(grant['expires_at'])}; credential in {target}\n"
        f"  nbdinfo, nbdcopy, fio:  {usage['libnbd_uri']}\n"
        f"  qemu-img, qemu-io:      {usage['qemu_args']}\n"
        f"revoke it with: aecp volume unexport {name}"
    )


@app.command("unexport")
def unexport(name: str, output: OutputOpt = Format.TABLE) -> None:
    """Revoke the volume's export: its credential opens nothing any more, and the connections
    made with it are closed."""
    with client() as c:
        c.delete(f"/v1/volumes/{name}/export")
    emit({"volume": name, "exported": False}, output)


CREDENTIAL_FILES = ("ca-cert.pem", "client-cert.pem", "client-key.pem")


def write_credentials(target: Path, ca: bytes, cert: bytes, key: bytes) -> None:
    """The directory layout QEMU's tls-creds-x509 and libnbd's tls-certificates read
    (``CREDENTIAL_FILES``), the directory 0700 and the files 0600."""
    target.mkdir(mode=0o700, parents=True, exist_ok=True)
    target.chmod(0o700)
    write_private(target / "client-key.pem", key)
    write_private(target / "client-cert.pem", cert)
    write_private(target / "ca-cert.pem", ca)


def export_usage(grant: dict[str, Any], creds: Path) -> dict[str, str]:
    """How the usual NBD clients open an export with the credential in ``creds``."""
    host, port, volume = grant["address"], grant["port"], grant["volume"]
    return {
        "libnbd_uri": f"{grant['uri']}?tls-certificates={creds}",
        "qemu_args": (
            f"--object tls-creds-x509,id=tls0,endpoint=client,dir={creds} --image-opts "
            f"driver=nbd,host={host},port={port},export={volume},tls-creds=tls0"
        ),
    }


snapshot_app = typer.Typer(help="Volume snapshots (O(1), independent).", no_args_is_help=True)
app.add_typer(snapshot_app, name="snapshot")
SNAP_COLS = ["volume", "name", "size", "created_at"]


@snapshot_app.command("create")
def snapshot_create(volume: str, name: str, output: OutputOpt = Format.TABLE) -> None:
    """Snapshot a volume no client has attached (for a VM's disks use: aecp vm snapshot)."""
    with client() as c:
        done(c, c.post(f"/v1/volumes/{volume}/snapshots", json={"name": name}), output, SNAP_COLS)


@snapshot_app.command("list")
def snapshot_list(volume: str, output: OutputOpt = Format.TABLE) -> None:
    """List a volume's snapshots, oldest first."""
    with client() as c:
        emit(c.get(f"/v1/volumes/{volume}/snapshots"), output, SNAP_COLS)


@snapshot_app.command("delete")
def snapshot_delete(volume: str, name: str, output: OutputOpt = Format.TABLE) -> None:
    """Delete a snapshot (clones made from it are not affected)."""
    with client() as c:
        answer = c.delete(f"/v1/volumes/{volume}/snapshots/{name}")
        if answer is not None:
            done(c, answer, output)
            return
    emit({"snapshot": f"{volume}@{name}", "deleted": True}, output)


@snapshot_app.command("rollback")
def snapshot_rollback(volume: str, name: str, output: OutputOpt = Format.TABLE) -> None:
    """Make a detached volume hold the snapshot's content again."""
    with client() as c:
        done(
            c,
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
        done(
            c,
            c.post(f"/v1/volumes/{volume}/snapshots/{snap}/clone", json={"name": new}),
            output,
            ["name", "size", "replicas", "source"],
        )
