"""The ``aecp`` command: sub-commands per resource; errors become a message and exit code 1."""

from __future__ import annotations

import contextlib
import sys
from pathlib import Path
from typing import Annotated

import typer
from rich.markup import escape

from aecp.cli import (
    center,
    centerctx,
    cluster,
    common,
    drill,
    image,
    lab,
    migrate,
    network,
    node,
    ops,
    storage,
    template,
    token,
    vm,
    volume,
)
from aecp.cli.client import ApiError, Client
from aecp.cli.output import err_console
from aecp.common.errors import AecpError

app = typer.Typer(
    name="aecp",
    help="AECP: run an ACOS cluster of virtual machines. Start with: aecp lab up",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


@app.callback()
def root(
    cluster: Annotated[
        str | None,
        typer.Option(
            "--cluster",
            envvar="AECP_CLUSTER",
            help="through an operation center: the cluster a command is about",
        ),
    ] = None,
) -> None:
    """AECP: run ACOS clusters of virtual machines. Start with: make run (or aecp lab up).
    After aecp login URL, commands go through that operation center (AECP_API set: direct)."""
    common.cluster_option = cluster


app.add_typer(cluster.app, name="cluster")
app.add_typer(node.app, name="node")
migrate.register(vm.app)
app.add_typer(vm.app, name="vm")
app.add_typer(image.app, name="image")
app.add_typer(lab.app, name="lab")
app.add_typer(ops.app, name="operation")
app.add_typer(volume.app, name="volume")
app.add_typer(network.app, name="network")
app.add_typer(storage.app, name="storage")
app.add_typer(template.app, name="template")
app.add_typer(token.app, name="token")
app.add_typer(center.app, name="center")
app.add_typer(drill.app, name="drill")


@app.command("login")
def login(
    url: str,
    user: Annotated[str, typer.Option(help="the center's user")] = "root",
    password_file: Annotated[
        Path | None, typer.Option(help="read the password from this file (else: asked)")
    ] = None,
) -> None:
    """Log in to an operation center; the session is kept in ~/.config/aecp/center.json
    (mode 0600) for the aecp center commands."""
    password = (
        password_file.read_text().strip()
        if password_file
        else typer.prompt("password", hide_input=True)
    )
    with Client([url.rstrip("/")], "") as c:
        got = c.post("/v1/login", json={"user": user, "password": password})
    path = centerctx.save(
        {
            "url": url.rstrip("/"),
            "user": user,
            "token": got["token"],
            "expires_at": got["expires_at"],
        }
    )
    err_console.print(f"logged in to {url} as {user} (session kept in {path})")


@app.command("logout")
def logout() -> None:
    """End the session with the operation center."""
    try:
        context = centerctx.load()
    except ApiError:
        return
    with Client([context["url"]], context["token"]) as c, contextlib.suppress(ApiError):
        c.post("/v1/logout")
    centerctx.forget()


def main() -> None:
    try:
        app()
    except ApiError as exc:
        field = exc.body.get("field") if exc.body else None
        where = f" [field: {field}]" if field else ""
        err_console.print(f"[red]error:[/red] {escape(str(exc) + where)}")
        if common.through_center() and (exc.status == 401 or "no API answered" in str(exc)):
            url = centerctx.load().get("url", "URL")
            err_console.print(
                f"(through the operation center at {url}: log in again with aecp login {url}, "
                "or aecp logout to talk to a cluster directly)"
            )
        sys.exit(1)
    except AecpError as exc:
        err_console.print(f"[red]error:[/red] {escape(exc.message)}")
        sys.exit(1)
    except KeyboardInterrupt:
        sys.exit(130)
