"""Helpers shared by the CLI commands: a client, and waiting for operations with a bar."""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from aecp.cli import centerctx
from aecp.cli.centerclient import CenterClient
from aecp.cli.client import ApiError, Client, discover
from aecp.cli.output import Format, emit, progress_bar

cluster_option: str | None = None  # the root's --cluster


def through_center() -> bool:
    """Commands go through an operation center once logged in to one, unless ``AECP_API``
    names a cluster."""
    return not os.environ.get("AECP_API") and centerctx.config_path().exists()


@contextmanager
def client(cluster: str | None = None) -> Iterator[Client]:
    """A client of a cluster's API: direct, or carried by the operation center logged in
    to (``cluster``, the root's ``--cluster`` or ``AECP_CLUSTER`` pick the cluster there)."""
    c: Client
    picked = cluster or cluster_option or os.environ.get("AECP_CLUSTER") or None
    if through_center():
        context = centerctx.load()
        c = CenterClient(context["url"], context["token"], picked)
    else:
        if picked:
            raise ApiError(
                f"a cluster ({picked}) is named, but the CLI talks to one cluster directly "
                "(AECP_API or the lab's); to pick among clusters, log in to an operation "
                "center: aecp login URL"
            )
        urls, token = discover()
        c = Client(urls, token)
    try:
        yield c
    finally:
        c.close()


def done(c: Client, answer: Any, fmt: Format, columns: list[str] | None = None) -> None:
    """Show what a change answered: through a center that is a task, followed to its end
    (with a bar); from a cluster, the object itself."""
    if isinstance(answer, dict) and answer.get("operation", {}).get("task"):
        follow(c, answer, False, fmt)
    else:
        emit(answer, fmt, columns or [])


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
