"""Reads the console asks of a cluster live (a VM's snapshots, its serial console log): through
the API's own ``read_cluster``, so the role's action and the VM's owner are checked exactly as
for ``GET /v1/clusters/{cluster}/proxy/{path}``. A cluster that does not answer, or answers
something of another shape than the page shows, is a sentence on the page, not an error
page.

(``read_cluster`` opens an HTTP client for every read: a VM's page costs one for its
snapshots each time its topics change, and one for its console log every few seconds while
it is shown.)
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from fastapi import Request

from aecp.center.api.objects import read_cluster
from aecp.common.errors import AecpError

CONSOLE_TAIL = 16 * 1024  # bytes of a serial console log shown


@dataclass(frozen=True)
class Read:
    """What the cluster answered: ``body`` on success, else ``error`` for people."""

    ok: bool
    body: Any = None
    error: str = ""


def unreadable(cluster: str, what: str) -> Read:
    return Read(False, error=f"cluster {cluster} answered something unreadable ({what})")


async def read(request: Request, cluster: str, path: str, query: str = "") -> Read:
    """``GET path`` of ``cluster``'s API (``v1/...``), as ``read_cluster`` carries it out for
    this request's caller (found from the session cookie already): a JSON answer decoded, any
    other as text."""
    scope = {**request.scope, "query_string": query.encode()}  # the same state: the caller
    try:
        r = await read_cluster(cluster, path, Request(scope, request.receive))
    except AecpError as exc:
        return Read(False, error=exc.message)
    text = bytes(r.body).decode(errors="replace")
    if r.status_code != 200:
        try:
            said = json.loads(text).get("message", text)
        except (ValueError, AttributeError):
            said = text
        return Read(False, error=f"cluster {cluster} answered {r.status_code}: {said}"[:500])
    if (r.media_type or "").startswith("application/json"):
        try:
            return Read(True, json.loads(text))
        except ValueError:
            return unreadable(cluster, "JSON that is not")
    return Read(True, text)


def _snapshot(item: dict[str, Any]) -> dict[str, Any]:
    """A snapshot as its row shows it: a name, its volumes' names, when (``None``: unknown)."""
    volumes = item.get("volumes")
    taken = item.get("created_at")
    return {
        "name": str(item.get("name") or "-"),
        "volumes": [str(v) for v in volumes] if isinstance(volumes, list) else [],
        "created_at": taken if isinstance(taken, int | float) and not isinstance(taken, bool)
        else None,
    }  # fmt: skip


async def snapshots(request: Request, cluster: str, vm: str) -> Read:
    """The VM's snapshots (a list of mappings; an entry that is not one is left out)."""
    got = await read(request, cluster, f"v1/vms/{vm}/snapshots")
    if not got.ok:
        return got
    if not isinstance(got.body, list):
        return unreadable(cluster, "not a list of snapshots")
    return Read(True, [_snapshot(s) for s in got.body if isinstance(s, dict)])


async def console_log(request: Request, cluster: str, vm: str) -> Read:
    """The tail of the VM's serial console log (text)."""
    got = await read(request, cluster, f"v1/vms/{vm}/console/log", f"tail={CONSOLE_TAIL}")
    if got.ok and not isinstance(got.body, str):
        return unreadable(cluster, "not the text of a log")
    return got
