"""Output for humans (Rich tables, progress) or scripts (``--output json``)."""

from __future__ import annotations

import datetime
import enum
import json
import sys
from collections.abc import Sequence
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.progress import BarColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn
from rich.table import Table

console = Console()
err_console = Console(stderr=True)


class Format(enum.StrEnum):
    TABLE = "table"
    JSON = "json"


OutputOpt = Annotated[
    Format, typer.Option("--output", "-o", help="table for people, json for scripts")
]
NoWaitOpt = Annotated[bool, typer.Option("--no-wait", help="return at once with the operation id")]


def emit(data: Any, fmt: Format, columns: Sequence[str] = (), title: str = "") -> None:
    """Print ``data`` (a dict or a list of dicts) as JSON or as a table of ``columns``."""
    if fmt is Format.JSON:
        sys.stdout.write(json.dumps(data, indent=2) + "\n")
        return
    rows = data if isinstance(data, list) else [data]
    if isinstance(data, dict) and not columns:
        table = Table(show_header=False, title=title)
        for k, v in data.items():
            table.add_row(k, _cell(v))
        console.print(table)
        return
    table = Table(title=title)
    for c in columns:
        table.add_column(c.rsplit(".", 1)[-1].upper().replace("_", " "), overflow="fold")
    for row in rows:
        table.add_row(*(_cell(_get(row, c)) for c in columns))
    console.print(table)


def emit_events(events: list[dict[str, Any]], fmt: Format, title: str) -> None:
    """An object's events, newest first: times for people in a table, raw in JSON."""
    if fmt is Format.JSON:
        emit(events, fmt)
        return
    rows = [{**e, "at": iso_time(e["at"])} for e in events]
    emit(rows, fmt, ["at", "role", "node", "sentence"], title=title)


def iso_time(ts: float) -> str:
    """A Unix time for people: ISO 8601 in UTC, to the second."""
    return datetime.datetime.fromtimestamp(ts, datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _get(row: dict[str, Any], path: str) -> Any:
    cur: Any = row
    for part in path.split("."):
        cur = cur.get(part) if isinstance(cur, dict) else None
    return cur


def _cell(v: Any) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.1f}"
    if isinstance(v, dict | list):
        return json.dumps(v)
    return str(v)


def progress_bar() -> Progress:
    return Progress(
        SpinnerColumn(),
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        TextColumn("{task.percentage:>3.0f}%"),
        TimeElapsedColumn(),
        console=err_console,
        transient=False,
    )
