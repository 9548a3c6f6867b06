"""``aecp drill``: drills against a lab, each a fault under load with a report of what the
client saw and what the system decided.

``center-failover``: kill the active of the lab's operation-center HA trio under a continuous
stream of writes through the management IP (``aecp.lab.drill``); report the RTO as the client
saw it, the acknowledged writes lost (must be 0) and the timeline of decisions with reasons.
Exit code 1 if the drill failed (no write acknowledged after the kill, a lost write, or the
management IP on two nodes at once).
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Annotated

import typer

from aecp.cli.output import Format, OutputOpt, console, emit, err_console

app = typer.Typer(help="Drills against a lab: a fault under load, and a report.")


@app.command("center-failover")
def center_failover(
    lab_dir: Annotated[
        Path | None,
        typer.Option(help="the lab trio's directory [default: <lab dir>/center-ha]"),
    ] = None,
    writes_before: Annotated[
        int, typer.Option(min=1, help="acknowledged writes before the active is killed")
    ] = 50,
    restore: Annotated[
        bool,
        typer.Option(
            "--restore/--no-restore",
            help="restart the killed node afterwards and wait until it is the passive, in sync",
        ),
    ] = True,
    output: OutputOpt = Format.TABLE,
) -> None:
    """Kill the operation center's active under writes: the RTO, lost writes (must be 0) and
    the timeline of decisions (root; the trio of aecp lab up --center ha)."""
    from aecp.lab.centerha import Trio
    from aecp.lab.drill import TIMELINE_COLUMNS, run_drill
    from aecp.lab.harness import default_root

    trio = Trio.open(lab_dir or default_root() / "center-ha")
    report = asyncio.run(
        run_drill(
            trio,
            writes_before=writes_before,
            restore=restore,
            say=lambda s: err_console.print(f"drill: {s}"),
        )
    )
    if output is Format.JSON:
        emit(report.to_dict(), output)
    else:
        emit(report.summary(), Format.TABLE, title="center failover drill")
        emit(report.rows(), Format.TABLE, TIMELINE_COLUMNS, title="timeline")
        if report.missing:
            console.print(f"missing acknowledged writes: {', '.join(report.missing[:20])}")
    if not report.passed:
        raise typer.Exit(1)
