"""``aecp vm migrate``: move a VM to another node (live when it runs, cold when stopped)."""

from __future__ import annotations

from typing import Annotated

import typer

from aecp.cli.common import client, follow
from aecp.cli.output import Format, NoWaitOpt, OutputOpt


def migrate(
    name: str,
    node: Annotated[
        str | None, typer.Option("--node", help="the node to move to (default: the scheduler's)")
    ] = None,
    bandwidth: Annotated[
        int, typer.Option("--bandwidth", min=0, help="cap this migration's bandwidth, MiB/s")
    ] = 0,
    no_wait: NoWaitOpt = False,
    output: OutputOpt = Format.TABLE,
) -> None:
    """Move a VM to another node: live (it keeps running, its memory copied, its disks handed
    over at the switch-over) when it runs, cold (nothing copied) when it is stopped. Shows the
    migration's progress; `aecp operation cancel ID` cancels a live one."""
    body: dict[str, object] = {"node": node} if node else {}
    if bandwidth:
        body["bandwidth_mib_s"] = bandwidth
    with client() as c:
        follow(c, c.post(f"/v1/vms/{name}/migrate", json=body), no_wait, output)


def register(app: typer.Typer) -> None:
    app.command("migrate")(migrate)
