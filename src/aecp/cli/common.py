"""Helpers shared by the CLI commands: a client, and waiting for operations with a bar."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from aecp.cli.client import Client, discover
from aecp.cli.output import Format, emit, progress_bar


@contextmanager
def client() -> Iterator[Client]:
    urls, token = discover()
    c = Client(urls, token)
    try:
        yield c
    finally:
        c.close()


def follow(c: Client, accepted: dict[str, Any], no_wait: bool, fmt: Format) -> dict[str, Any]:
    """Wait for an accepted request's operation with a progress bar (unless ``no_wait``)."""
    op: dict[str, Any] = accepted["operation"]
    if no_wait:
        emit(op, fmt, ["id", "kind", "target", "state", "progress", "message"])
        return op
    if fmt is Format.JSON:
        done = c.wait_operation(op["id"], lambda _: None)
    else:
        with progress_bar() as bar:
            task = bar.add_task(f"{op['kind']} {op['target']}", total=100)

            def update(o: dict[str, Any]) -> None:
                bar.update(
                    task,
                    completed=o["progress"],
                    description=f"{o['kind']} {o['target']}: {o['message']}"[:70],
                )

            done = c.wait_operation(op["id"], update)
    emit(done, fmt, ["id", "kind", "target", "state", "message"])
    return done
