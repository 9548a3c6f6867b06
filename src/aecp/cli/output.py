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
            table.add_row(k, human(k, v))
        console.print(table)
        return
    table = Table(title=title)
    for c in columns:
        table.add_column(c.rsplit(".", 1)[-1].upper().replace("_", " "), overflow="fold")
    for row in rows:
        table.add_row(*(human(c.rsplit(".", 1)[-1], _get(row, c)) for c in columns))
    console.print(table)


def emit_events(events: list[dict[str, Any]], fmt: Format, title: str) -> None:
    """An object's events, newest first: times for people in a table, raw in JSON."""
    if fmt is Format.JSON:
        emit(events, fmt)
        return
    rows = events
    emit(rows, fmt, ["at", "role", "node", "sentence"], title=title)


SIZE_KEYS = frozenset({"size", "virtual_size", "extent_size"})
UNITS = ("B", "KiB", "MiB", "GiB", "TiB", "PiB")


def human(key: str, v: Any, now: float | None = None) -> str:
    """A table cell for people: times (``*_at``) as UTC with their age, sizes (``*_bytes``,
    ``size``...) in binary units, MiB counts (``*_mib``) likewise; anything else as it is.
    ``--output json`` keeps the raw values."""
    if isinstance(v, bool) or not isinstance(v, int | float):
        return _cell(v)
    if key.endswith("_at") or key == "at":
        return when(float(v), now) if v else "-"
    if key.endswith("_bytes") or key in SIZE_KEYS:
        return size(float(v))
    if key.endswith("_mib"):
        return size(float(v) * 1024 * 1024)
    return _cell(v)


def size(n: float) -> str:
    """``1073741824`` → ``1.0 GiB``; whole bytes below 1 KiB."""
    for unit in UNITS:
        if abs(n) < 1024 or unit == UNITS[-1]:
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")


def when(ts: float, now: float | None = None) -> str:
    """A Unix time for people: ``2026-12-07 10:41 UTC (3 min ago)``."""
    stamp = datetime.datetime.fromtimestamp(ts, datetime.UTC).strftime("%Y-%m-%d %H:%M UTC")
    return f"{stamp} ({ago((now if now is not None else _now()) - ts)})"


def ago(seconds: float) -> str:
    if seconds < 0:
        return "in the future"
    for limit, unit, div in ((60, "s", 1), (3600, "min", 60), (86400, "h", 3600)):
        if seconds < limit:
            return f"{seconds / div:.0f} {unit} ago"
    return f"{seconds / 86400:.0f} d ago"


def _now() -> float:
    return datetime.datetime.now(datetime.UTC).timestamp()


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
