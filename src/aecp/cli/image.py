"""``aecp image``: build the tiny guest image, import images, list and delete them."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from aecp.cli.client import file_chunks
from aecp.cli.common import client
from aecp.cli.output import Format, OutputOpt, emit, err_console

app = typer.Typer(help="Images VMs boot from.", no_args_is_help=True)
COLS = ["name", "format", "size_bytes", "virtual_size", "sha256", "source"]


@app.command("build-tiny")
def build_tiny(
    dest: Annotated[Path | None, typer.Option(help="where to write the image")] = None,
    if_missing: Annotated[bool, typer.Option(help="keep an existing valid image")] = False,
    output: OutputOpt = Format.TABLE,
) -> None:
    """Build the tiny guest image (Debian cloud kernel + busybox) without root."""
    from aecp.compute.images.tiny import build_tiny as build
    from aecp.compute.images.tiny import ensure_tiny_image

    if if_missing and dest is None:
        path = ensure_tiny_image()
    else:
        path = build(dest, progress=lambda m: err_console.print(f"[dim]{m}[/dim]"))
    emit({"image": str(path), "bytes": path.stat().st_size}, output)


@app.command("import")
def import_image(
    name: str,
    file: Annotated[Path, typer.Argument(help="a raw or qcow2 image file")],
    fmt: Annotated[str | None, typer.Option("--format", help="raw or qcow2 (detected)")] = None,
    output: OutputOpt = Format.TABLE,
) -> None:
    """Upload an image file to the cluster."""
    if not file.is_file():
        raise typer.BadParameter(f"{file} is not a file", param_hint="FILE")
    params = {"source": file.name[:200]}
    if fmt:
        params["format"] = fmt
    with client() as c:
        record = c.put(
            f"/v1/images/{name}",
            params=params,
            content=file_chunks(file),
            headers={"content-length": str(file.stat().st_size)},
        )
        emit(record, output)


@app.command("list")
def list_images(output: OutputOpt = Format.TABLE) -> None:
    """List images."""
    with client() as c:
        emit(c.get("/v1/images"), output, COLS)


@app.command("delete")
def delete(name: str, output: OutputOpt = Format.TABLE) -> None:
    """Delete an image no VM uses."""
    with client() as c:
        c.delete(f"/v1/images/{name}")
    emit({"image": name, "deleted": True}, output)
