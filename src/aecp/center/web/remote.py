"""Reads the console asks of a cluster live (a VM's snapshots, its serial console log): through
the API's own ``read_cluster``, so the role's action and the VM's owner are checked exactly as
for ``GET /v1/clusters/{cluster}/proxy/{path}``. A cluster that does not answer is a sentence
on the page, not an error page."""

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


async def read(request: Request, cluster: str, path: str, query: str = "") -> Read:
    """``GET path`` of ``cluster``'s API (``v1/...``), as ``read_cluster`` carries it out for
    this request's caller (found from the session cookie already)."""
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
        return Read(True, json.loads(text))
    return Read(True, text)


async def snapshots(request: Request, cluster: str, vm: str) -> Read:
    return await read(request, cluster, f"v1/vms/{vm}/snapshots")


async def console_log(request: Request, cluster: str, vm: str) -> Read:
    return await read(request, cluster, f"v1/vms/{vm}/console/log", f"tail={CONSOLE_TAIL}")
