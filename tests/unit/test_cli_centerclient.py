"""The CLI through an operation center: cluster-API paths are carried to the center's routes,
the cluster is picked (named, found by the VM, the only one, or an error listing them), a
change is a task shown as an operation, and what the center does not carry says so."""

from __future__ import annotations

from typing import Any

import httpx
import pytest

from aecp.cli.centerclient import CenterClient
from aecp.cli.client import ApiError

TASK = {
    "id": "0" * 32,
    "kind": "vm.poweroff",
    "cluster": "c2",
    "target": "web",
    "state": "executing",
    "progress": 40,
    "steps": [{"at": 1.0, "sentence": "cluster c2 accepted it as operation op-1"}],
    "error": "",
}


def center(cluster: str | None = None, vms: list[dict[str, Any]] | None = None) -> Any:
    seen: list[str] = []
    vms = vms if vms is not None else [{"cluster": "c2", "name": "web"}]

    def handle(request: httpx.Request) -> httpx.Response:
        seen.append(f"{request.method} {request.url.path}")
        if request.url.path == "/v1/clusters":
            return httpx.Response(200, json=[{"name": "c1"}, {"name": "c2"}])
        if request.url.path == "/v1/vms":
            name = request.url.params.get("name")
            return httpx.Response(200, json=[v for v in vms if name in (None, v["name"])])
        if request.method != "GET":
            return httpx.Response(202, json=TASK)
        return httpx.Response(200, json={"path": request.url.path})

    c = CenterClient("http://aoc", "token", cluster)
    c.http = httpx.Client(transport=httpx.MockTransport(handle))
    return c, seen


def test_a_change_goes_to_the_cluster_that_has_the_vm_and_is_a_task() -> None:
    c, seen = center()
    answer = c.post("/v1/vms/web/actions/poweroff")
    assert seen[-1] == "POST /v1/clusters/c2/vms/web/actions/poweroff"
    op = answer["operation"]
    assert op["task"] and op["state"] == "running" and op["target"] == "c2/web"
    assert op["message"].startswith("cluster c2 accepted")
    assert c.cluster == "c2"  # the rest of the command is about that cluster


def test_reads_come_from_the_copy_or_the_cluster_live() -> None:
    c, seen = center(cluster="c1")
    c.get("/v1/vms/web/snapshots")
    assert seen[-1] == "GET /v1/clusters/c1/proxy/v1/vms/web/snapshots"
    c.get("/v1/vms/web")
    assert seen[-1] == "GET /v1/clusters/c1/vms/web"
    c.get("/v1/vms")
    assert seen[-1] == "GET /v1/vms"


def test_an_ambiguous_or_unnamed_cluster_is_an_error_that_lists_the_choices() -> None:
    twice = [{"cluster": "c1", "name": "demo"}, {"cluster": "c2", "name": "demo"}]
    c, _ = center(vms=twice)
    with pytest.raises(ApiError, match="VM demo is in clusters c1, c2"):
        c.post("/v1/vms/demo/actions/poweroff")
    with pytest.raises(ApiError, match=r"say which cluster with --cluster .*: c1, c2"):
        c.post("/v1/volumes", json={"name": "v", "size": "1G"})


def test_what_the_center_does_not_carry_says_so_and_sends_nothing() -> None:
    c, seen = center(cluster="c1")
    for method, path in (("POST", "/v1/tokens"), ("GET", "/v1/tokens"),
                         ("PUT", "/v1/images/x"), ("POST", "/v1/nodes/n1/cordon"),
                         ("POST", "/v1/volumes/v/export")):  # fmt: skip
        with pytest.raises(ApiError, match="not available through the operation center"):
            c.request(method, path)
    assert seen == []
