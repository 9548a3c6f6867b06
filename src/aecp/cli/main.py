"""The ``aecp`` command: sub-commands per resource; errors become a message and exit code 1."""

from __future__ import annotations

import sys

import typer
from rich.markup import escape

from aecp.cli import center, cluster, image, lab, node, ops, storage, template, token, vm, volume
from aecp.cli.client import ApiError
from aecp.cli.output import err_console
from aecp.common.errors import AecpError

app = typer.Typer(
    name="aecp",
    help="AECP: run an ACOS cluster of virtual machines. Start with: aecp lab up",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
app.add_typer(cluster.app, name="cluster")
app.add_typer(node.app, name="node")
app.add_typer(vm.app, name="vm")
app.add_typer(image.app, name="image")
app.add_typer(lab.app, name="lab")
app.add_typer(ops.app, name="operation")
app.add_typer(volume.app, name="volume")
app.add_typer(storage.app, name="storage")
app.add_typer(template.app, name="template")
app.add_typer(token.app, name="token")
app.add_typer(center.app, name="center")


def main() -> None:
    try:
        app()
    except ApiError as exc:
        field = exc.body.get("field") if exc.body else None
        where = f" [field: {field}]" if field else ""
        err_console.print(f"[red]error:[/red] {escape(str(exc) + where)}")
        sys.exit(1)
    except AecpError as exc:
        err_console.print(f"[red]error:[/red] {escape(exc.message)}")
        sys.exit(1)
    except KeyboardInterrupt:
        sys.exit(130)
