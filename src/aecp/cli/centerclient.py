"""The CLI through an operation center: the same commands, the center's routes.

After ``aecp login URL`` (and unless ``AECP_API`` names a cluster), every command that speaks
a cluster's API is carried to the center instead, by path:

- ``GET /v1/vms`` lists the VMs of every cluster (``cluster`` filled in: a CLUSTER column),
  or of ``--cluster`` only; ``GET /v1/vms/{name}`` finds the VM in the center's copy.
- Other reads go to ``/v1/clusters/{cluster}/proxy/v1/...`` (asked of the cluster live).
- Changes go to ``/v1/clusters/{cluster}/...`` and become tasks: the answer is shaped as an
  accepted request (``{"operation": ...}``) whose operation is the task, so ``follow`` shows
  its progress bar; a command whose cluster route answers at once waits for the task.

Which cluster: ``--cluster`` (or ``AECP_CLUSTER``); else the one that has the VM named in
the path; else the only registered cluster; else an error that lists them. What the center
does not carry (principals, images, exports, console attach, cordon) says so, and how to
reach the cluster directly.
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable
from typing import Any

from aecp.cli.client import ApiError, Client

PAGE = 1000
INVENTORY = {"/v1/nodes": "node", "/v1/volumes": "volume", "/v1/templates": "template"}
_VM_PATH = re.compile(r"^/v1/vms/([^/]+)")
# what the center does not carry: (methods, path pattern, why)
NOT_CARRIED = (
    (None, re.compile(r"^/v1/tokens(/|$)"), "each cluster's principals are managed on it"),
    ("write", re.compile(r"^/v1/images(/|$)"), "images are uploaded to each cluster"),
    ("write", re.compile(r"^/v1/nodes/"), "cordons and maintenance mode are set on the cluster"),
    ("write", re.compile(r"^/v1/vms/[^/]+/migrate$"), "the center does not carry migrations yet"),
    ("write", re.compile(r"^/v1/networks(/|$)"), "the center does not carry VM networks yet"),
    ("write", re.compile(r"^/v1/operations/[^/]+/cancel$"), "cancel it on its cluster"),
    ("write", re.compile(r"^/v1/volumes/[^/]+/export$"), "exports are granted by the cluster"),
)


def _not_carried(method: str, path: str) -> str:
    for methods, pattern, why in NOT_CARRIED:
        if pattern.match(path) and (methods is None or method != "GET"):
            return why
    return ""


def task_as_operation(task: dict[str, Any]) -> dict[str, Any]:
    """A task in the shape of a cluster operation (what ``follow`` shows)."""
    steps = task.get("steps") or []
    state = task["state"]
    return {
        "id": task["id"],
        "kind": task["kind"],
        "target": f"{task['cluster']}/{task['target']}",
        "state": "running" if state in ("pending", "executing") else state,
        "progress": task["progress"],
        "message": steps[-1]["sentence"] if steps else state,
        "error": task["error"],
        "cluster": task["cluster"],
        "task": True,
    }


class CenterClient(Client):
    """A ``Client`` whose cluster-API paths are carried to an operation center."""

    def __init__(self, url: str, token: str, cluster: str | None) -> None:
        super().__init__([url], token)
        self.cluster = cluster

    # ---- which cluster ------------------------------------------------------------------------
    def clusters(self) -> list[str]:
        return [c["name"] for c in super().request("GET", "/v1/clusters")]

    def _cluster_for(self, path: str) -> str:
        if self.cluster:
            return self.cluster
        m = _VM_PATH.match(path)
        if m:
            found: list[str] = sorted({str(v["cluster"]) for v in self._vms_named(m.group(1))})
            if len(found) == 1:
                return found[0]
            if len(found) > 1:
                raise ApiError(
                    f"VM {m.group(1)} is in clusters {', '.join(found)}: say which with "
                    "--cluster (or AECP_CLUSTER)"
                )
        known = self.clusters()
        if len(known) == 1:
            return known[0]
        if not known:
            raise ApiError("the operation center manages no cluster yet: aecp center cluster add")
        raise ApiError(
            f"say which cluster with --cluster (or AECP_CLUSTER): {', '.join(sorted(known))}"
        )

    def _vms_named(self, name: str) -> list[dict[str, Any]]:
        got: list[dict[str, Any]] = super().request(
            "GET", "/v1/vms", params={"name": name, "limit": PAGE}
        )
        return [v for v in got if v["name"] == name]

    # ---- requests -------------------------------------------------------------------------------
    def request(self, method: str, path: str, **kw: Any) -> Any:
        why = _not_carried(method, path)
        if why:
            raise ApiError(
                f"not available through the operation center ({why}): reach the cluster "
                "directly (AECP_API=<its URL> AECP_TOKEN_FILE=<a token file> aecp ...)"
            )
        if method == "GET":
            return self._read(path, **kw)
        cluster = self._cluster_for(path)
        task = super().request(method, f"/v1/clusters/{cluster}{path.removeprefix('/v1')}", **kw)
        self.cluster = cluster  # the rest of this command is about the same cluster
        return {"operation": task_as_operation(task)}

    def _read(self, path: str, **kw: Any) -> Any:
        if path == "/v1/vms":
            return self._all_vms()
        if path in INVENTORY and not self.cluster:
            return self._inventory(INVENTORY[path])
        m = _VM_PATH.match(path)
        if m and path == m.group(0):
            cluster = self._cluster_for(path)
            try:
                return super().request("GET", f"/v1/clusters/{cluster}/vms/{m.group(1)}", **kw)
            except ApiError as exc:  # not in the center's copy yet (just made): ask
                if exc.status != 404:
                    raise
        if path.startswith("/v1/operations/") and self._is_task(path):
            return task_as_operation(super().request("GET", path.replace("operations", "tasks")))
        cluster = self._cluster_for(path)
        return super().request("GET", f"/v1/clusters/{cluster}/proxy{path}", **kw)

    def _inventory(self, kind: str) -> list[dict[str, Any]]:
        rows: list[dict[str, Any]] = super().request("GET", f"/v1/inventory/{kind}")
        return [{"cluster": r["cluster"], **r["data"]} for r in rows]

    def _is_task(self, path: str) -> bool:
        return bool(re.fullmatch(r"/v1/operations/[0-9a-f]{32}", path))

    def _all_vms(self) -> list[dict[str, Any]]:
        params: dict[str, Any] = {"limit": PAGE, "sort": "name"}
        if self.cluster:
            params["cluster"] = self.cluster
        out: list[dict[str, Any]] = []
        while True:
            page: list[dict[str, Any]] = super().request(
                "GET", "/v1/vms", params={**params, "offset": len(out)}
            )
            out += page
            if len(page) < PAGE:
                return out

    def wait_operation(
        self, op_id: str, on_update: Callable[[dict[str, Any]], None], timeout: float = 600
    ) -> dict[str, Any]:
        """Poll the task until it ends (``ApiError`` if it failed or was cancelled)."""
        deadline = time.monotonic() + timeout
        while True:
            op = task_as_operation(super().request("GET", f"/v1/tasks/{op_id}"))
            on_update(op)
            if op["state"] in ("failed", "cancelled"):
                raise ApiError(f"{op['kind']} {op['target']} {op['state']}: {op['error']}", body=op)
            if op["state"] == "succeeded":
                return op
            if time.monotonic() > deadline:
                raise ApiError(f"task {op_id} still running after {timeout:.0f}s")
            time.sleep(0.25)
