"""N generated clusters behind one small HTTP server, for ``benchmarks/center.py``: what the
center's sync (``aecp.center.inventory``) reads of a cluster, answered from memory.

Each cluster has a port of its own (the process listens on N ports; a request's cluster is
the port it came in on) and answers, to any bearer token:

- ``GET /v1/cluster``: ``{"name", "id", "version", "served_by"}``;
- the lists ``/v1/nodes``, ``/v1/vms``, ``/v1/volumes``, ``/v1/templates``, ``/v1/operations``,
  paged as the cluster API pages them (``limit``, ``cursor``, ``X-Next-Cursor``: the cluster's
  own ``paginate``); ``/v1/vms`` also filters by ``node`` and ``state``;
- single objects ``GET /v1/{vms,nodes,volumes,operations}/{name}`` (404 in the API's error
  shape);
- the change feed ``GET /v1/events`` as the cluster serves it (``routes/events.py``): a
  ``sync`` event naming the position it follows from, then one event per change with id
  ``R.i``; ``since`` or ``Last-Event-ID``; ``timeout`` and ``limit``; a keepalive comment
  every 15 s; a position from the future is 422.

Every object is generated (seeded, so every run has the same clusters) and validated by the
cluster's own API models (``VMPublic``, ``NodeView``, ``VolumePublic``, ``TemplatePublic``,
``OperationPublic``), so its JSON is shaped exactly like a real cluster's. Per cluster: 8 nodes,
``--vms`` VMs (named ``web-0042``, ``db-0043``, …; 70% running, the rest stopped, paused,
starting, pending or in error), a root volume per VM and 20 standalone ones, 4 templates and
60 operations.

The benchmark drives changes through ``/_bench`` routes (any port):

- ``POST /_bench/change`` ``{"cluster", "vm", "state"}``: the VM takes that state, as one
  store revision (one feed event);
- ``POST /_bench/burst`` ``{"cluster", "vms": [...], "state"}``: all of them in one revision
  (as when a node goes down);
- ``GET /_bench/stats``: requests served, by cluster and route.

On start it prints one JSON line to stdout: ``{"clusters": {name: port}}``.

Usage: .venv/bin/python benchmarks/center_replayer.py [--clusters 10] [--vms 1000]
       [--address 127.0.0.1]
"""

from __future__ import annotations

import argparse
import asyncio
import bisect
import collections
import json
import random
import socket
import sys
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response, StreamingResponse
from starlette.routing import Route

from aecp import __version__
from aecp.cluster.api.models.operations import OperationPublic
from aecp.cluster.api.models.templates import TemplatePublic
from aecp.cluster.api.models.vms import VMPublic
from aecp.cluster.api.pages import NEXT_CURSOR, PageQuery, paginate
from aecp.cluster.volumes import VolumePublic
from aecp.common.errors import InvalidInput
from aecp.model.node import NodeView

KEEPALIVE = 15.0  # s, as the cluster's feed
NODES = 8
PREFIXES = ("web", "db", "cache", "batch", "ci")
STATES = [("running", 70), ("stopped", 18), ("paused", 4), ("error", 3), ("starting", 3),
          ("pending", 2)]  # fmt: skip
NS = uuid.UUID("6f1c0d1e-5b0a-4c4e-9d1e-aecb0e0c0c13")
MIB, GIB = 1 << 20, 1 << 30
SortKey = list[Any]


def _json(body: Any, status: int = 200, headers: dict[str, str] | None = None) -> Response:
    raw = json.dumps(body, separators=(",", ":")).encode()
    return Response(raw, status_code=status, media_type="application/json", headers=headers)


def _error(status: int, code: str, message: str, **fields: Any) -> Response:
    return _json({"error": code, "message": message, **fields}, status)


@dataclass(order=True)
class Event:
    revision: int
    index: int
    kind: str = field(compare=False)
    name: str = field(compare=False)
    change: str = field(compare=False)

    def sse(self) -> bytes:
        data = {"revision": self.revision, "kind": self.kind, "name": self.name,
                "change": self.change}  # fmt: skip
        return _sse(f"{self.revision}.{self.index}", self.kind, data)


def _sse(ident: str | None, name: str, data: object) -> bytes:
    head = f"id: {ident}\n" if ident is not None else ""
    return f"{head}event: {name}\ndata: {json.dumps(data, separators=(',', ':'))}\n\n".encode()


class FakeCluster:
    """One cluster's objects (as its API shows them), its store revision and its feed."""

    def __init__(self, index: int, vms: int, seed: int) -> None:
        self.name = f"c{index:02d}"
        self.id = str(uuid.uuid5(NS, f"bench-cluster-{index}"))
        rnd = random.Random(seed * 1000 + index)
        now = time.time()
        self.revision = 1000 + index
        self.log: list[Event] = []  # every change, in order (never compacted)
        self.changed = asyncio.Event()
        self.objects: dict[str, dict[str, dict[str, Any]]] = {
            "nodes": {},
            "vms": {},
            "volumes": {},
            "templates": {},
            "operations": {},
        }
        nodes = [f"node{n}" for n in range(1, NODES + 1)]
        for n, node in enumerate(nodes, 1):
            view = NodeView.model_validate({
                "name": node, "address": f"10.{index}.0.{n}", "api_url": f"https://10.{index}.0.{n}:8700",
                "state": "ready",
                "capacity": {"cpus": 64, "memory_mib": 512 * 1024, "disk_bytes": 8 << 40},
                "usage": {"cpu_percent": rnd.uniform(5, 60),
                          "memory_used_mib": rnd.randrange(1 << 18),
                          "disk_used_bytes": rnd.randrange(1 << 42), "vms_running": vms // NODES},
                "accel": "kvm", "reserved_memory_mib": rnd.randrange(1 << 18),
                "reserved_vcpus": rnd.randrange(256), "vms": vms // NODES,
            })  # fmt: skip
            self.objects["nodes"][node] = view.model_dump(mode="json")
        names, weights = zip(*STATES, strict=True)
        for i in range(vms):
            name = f"{PREFIXES[i % len(PREFIXES)]}-{i:04d}"
            state = rnd.choices(names, weights)[0]
            running = state == "running"
            placed = None if state == "pending" else rnd.choice(nodes)
            vm = VMPublic.model_validate({
                "name": name, "uuid": str(uuid.UUID(int=rnd.getrandbits(128), version=4)),
                "image": rnd.choice(("debian-12", "ubuntu-24.04", "alpine-3.20", "tiny")),
                "vcpus": rnd.choice((1, 2, 4, 8)),
                "memory_mib": rnd.choice((512, 1024, 2048, 8192)),
                "data_disks_mib": [10240] * rnd.randrange(3), "pinned_node": None, "node": placed,
                "state": state, "power": "stopped" if state == "stopped" else "running",
                "message": "" if state != "error" else "qemu exited with status 1",
                "http_url": f"http://10.{index}.{i // 250}.{i % 250}:80" if running else "",
                "pid": rnd.randrange(2, 1 << 22) if running else None,
                "boots": rnd.randrange(1, 20), "created_at": now - rnd.uniform(0, 3e7),
                "last_operation": str(uuid.UUID(int=rnd.getrandbits(128), version=4)),
            })  # fmt: skip
            self.objects["vms"][name] = vm.model_dump(mode="json")
            self._volume(f"{name}-root", 10 * GIB, rnd, {"kind": "vm", "name": name}, name)
        for v in range(20):
            self._volume(f"data-{v:02d}", 100 * GIB, rnd, None, None)
        for t in range(4):
            tpl = TemplatePublic.model_validate({
                "name": f"tpl-{t}", "vcpus": 2, "memory_mib": 2048, "data_disks_mib": [],
                "volumes": [f"tpl-{t}-root"], "source_vm": "", "created_at": now - 1e6,
            })  # fmt: skip
            self.objects["templates"][tpl.name] = tpl.model_dump(mode="json")
        vm_names = list(self.objects["vms"])
        for o in range(60):
            created = now - 3600 + o * 60
            op = OperationPublic.model_validate({
                "id": str(uuid.UUID(int=rnd.getrandbits(128), version=4)),
                "kind": rnd.choice(("vm.create", "vm.start", "vm.stop", "volume.snapshot")),
                "target": rnd.choice(vm_names), "state": "succeeded", "progress": 100,
                "message": "", "error": "", "superseded_by": "", "requested_by": "admin",
                "created_at": created, "updated_at": created + rnd.uniform(0.1, 30),
            })  # fmt: skip
            self.objects["operations"][op.id] = op.model_dump(mode="json")

    def _volume(
        self, name: str, size: int, rnd: random.Random, owner: dict[str, str] | None, vm: str | None
    ) -> None:
        used = rnd.randrange(size // 4)
        vol = VolumePublic.model_validate({
            "name": name, "size": size, "replicas": 2, "extent_size": 256 * MIB,
            "provisioned_bytes": size * 2, "allocated_bytes": used,
            "extents_allocated": used // (256 * MIB) + 1, "extents_total": size // (256 * MIB),
            "attached_to": vm, "epoch": rnd.randrange(1, 9), "health": "healthy",
            "owner": owner, "source": "", "created_at": time.time() - rnd.uniform(0, 3e7),
        })  # fmt: skip
        self.objects["volumes"][name] = vol.model_dump(mode="json")

    def change(self, kind: str, names: list[str]) -> str:
        """One store revision that changed ``names`` (one feed event each); its position."""
        self.revision += 1
        for i, name in enumerate(names):
            self.log.append(Event(self.revision, i, kind, name, "changed"))
        self.changed.set()
        self.changed = asyncio.Event()
        return f"{self.revision}.{len(names) - 1}"

    def after(self, revision: int, index: int | None) -> list[Event]:
        """The events after position ``R`` (``index`` None) or ``R.i``."""
        at = Event(revision, index if index is not None else sys.maxsize, "", "", "")
        return self.log[bisect.bisect_right(self.log, at) :]


class Replayer:
    def __init__(self, clusters: dict[int, FakeCluster]) -> None:
        self.by_port = clusters
        self.by_name = {c.name: c for c in clusters.values()}
        self.stats: collections.Counter[str] = collections.Counter()

    def cluster(self, request: Request) -> FakeCluster:
        server = request.scope.get("server") or ("", 0)
        return self.by_port[int(server[1])]

    @staticmethod
    def refused(request: Request) -> Response | None:
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            return _error(401, "unauthorized", "a token is required (Authorization: Bearer)")
        return None

    def app(self) -> Starlette:
        return Starlette(
            routes=[
                Route("/v1/cluster", self.get_cluster),
                Route("/v1/events", self.events),
                Route("/v1/{kind}", self.list_objects),
                Route("/v1/{kind}/{name}", self.get_object),
                Route("/_bench/change", self.inject, methods=["POST"]),
                Route("/_bench/burst", self.burst, methods=["POST"]),
                Route("/_bench/stats", self.get_stats),
            ]
        )

    async def get_cluster(self, request: Request) -> Response:
        c = self.cluster(request)
        self.stats[f"{c.name} GET /v1/cluster"] += 1
        if (no := self.refused(request)) is not None:
            return no
        return _json({"name": c.name, "id": c.id, "version": __version__, "served_by": "node1"})

    async def list_objects(self, request: Request) -> Response:
        c, kind = self.cluster(request), request.path_params["kind"]
        self.stats[f"{c.name} GET /v1/{kind}"] += 1
        if (no := self.refused(request)) is not None:
            return no
        if kind not in c.objects:
            return _error(404, "not_found", f"no route GET /v1/{kind}")
        q = request.query_params
        items = list(c.objects[kind].values())
        list_id = kind
        if kind == "vms":
            node, state = q.get("node"), q.get("state")
            items = [v for v in items if node in (None, v["node"]) and state in (None, v["state"])]
            list_id = f"vms?node={node or ''}&state={state or ''}"
        elif kind == "operations":
            list_id = "operations?state=&target="

        def key(o: dict[str, Any]) -> SortKey:
            return [o["created_at"], o["id"]] if kind == "operations" else [o["name"]]

        try:
            limit = int(q["limit"]) if "limit" in q else None
            if limit is not None and not 1 <= limit <= 1000:
                raise ValueError(limit)
        except ValueError:
            return _error(422, "invalid_input", "limit: 1 to 1000", field="limit")
        carrier = Response()
        try:
            page = paginate(items, list_id, key, PageQuery(limit=limit, cursor=q.get("cursor")),
                            carrier)  # fmt: skip
        except InvalidInput as exc:
            return _error(422, "invalid_input", exc.message, field="cursor")
        headers = (
            {NEXT_CURSOR: carrier.headers[NEXT_CURSOR]} if NEXT_CURSOR in carrier.headers else {}
        )
        return _json(page, headers=headers)

    async def get_object(self, request: Request) -> Response:
        c, kind, name = (
            self.cluster(request),
            request.path_params["kind"],
            request.path_params["name"],
        )
        self.stats[f"{c.name} GET /v1/{kind}/{{name}}"] += 1
        if (no := self.refused(request)) is not None:
            return no
        if kind not in c.objects or kind == "templates":
            return _error(404, "not_found", f"no route GET /v1/{kind}/{{name}}")
        item = c.objects[kind].get(name)
        if item is None:
            return _error(404, "not_found", f"{kind[:-1]} {name} does not exist")
        return _json(item)

    async def events(self, request: Request) -> Response:
        c = self.cluster(request)
        self.stats[f"{c.name} GET /v1/events"] += 1
        if (no := self.refused(request)) is not None:
            return no
        q = request.query_params
        given = q.get("since", request.headers.get("last-event-id"))
        try:
            timeout = float(q.get("timeout", 3600.0))
            limit = int(q["limit"]) if "limit" in q else None
            revision, _, idx = (given or "").partition(".")
            start = (int(revision), int(idx) if idx else None) if given else (c.revision, None)
        except ValueError:
            return _error(422, "invalid_input", "since: R or R.i", field="since")
        if start[0] > c.revision:
            return _error(422, "invalid_input", f"revision {start[0]} is in the future",
                          field="since")  # fmt: skip
        return StreamingResponse(
            self._stream(c, start, timeout, limit),
            media_type="text/event-stream",
            headers={"cache-control": "no-cache", "x-accel-buffering": "no"},
        )

    async def _stream(
        self, c: FakeCluster, start: tuple[int, int | None], timeout: float, limit: int | None
    ) -> AsyncIterator[bytes]:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        ident = str(start[0]) if start[1] is None else f"{start[0]}.{start[1]}"
        yield _sse(ident, "sync", {"revision": start[0]})
        position, sent = start, 0
        while (limit is None or sent < limit) and (left := deadline - loop.time()) > 0:
            pending = c.after(*position)
            if not pending:
                waiter = c.changed
                try:
                    await asyncio.wait_for(waiter.wait(), min(KEEPALIVE, left))
                except TimeoutError:
                    yield b": keepalive\n\n"
                continue
            for ev in pending[: None if limit is None else limit - sent]:
                yield ev.sse()
                position, sent = (ev.revision, ev.index), sent + 1

    async def inject(self, request: Request) -> Response:
        body = await request.json()
        c = self.by_name[body["cluster"]]
        vm = c.objects["vms"].get(body["vm"])
        if vm is None:
            return _error(404, "not_found", f"no VM {body['vm']} in {c.name}")
        self._set_state(vm, body["state"])
        return _json({"position": c.change("vm", [body["vm"]]), "at": time.time()})

    async def burst(self, request: Request) -> Response:
        body = await request.json()
        c = self.by_name[body["cluster"]]
        for name in body["vms"]:
            self._set_state(c.objects["vms"][name], body["state"])
        return _json({"position": c.change("vm", list(body["vms"])), "at": time.time()})

    @staticmethod
    def _set_state(vm: dict[str, Any], state: str) -> None:
        vm["state"] = state
        vm["power"] = "stopped" if state == "stopped" else "running"
        if state != "running":
            vm["http_url"], vm["pid"] = "", None

    async def get_stats(self, request: Request) -> Response:
        return _json(dict(sorted(self.stats.items())))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--clusters", type=int, default=10)
    ap.add_argument("--vms", type=int, default=1000, help="VMs per cluster")
    ap.add_argument("--address", default="127.0.0.1")
    ap.add_argument("--seed", type=int, default=13)
    args = ap.parse_args()
    sockets, clusters = [], {}
    for i in range(1, args.clusters + 1):
        s = socket.socket()
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind((args.address, 0))
        s.listen(256)
        sockets.append(s)
        clusters[s.getsockname()[1]] = FakeCluster(i, args.vms, args.seed)
    replayer = Replayer(clusters)
    print(json.dumps({"clusters": {c.name: port for port, c in clusters.items()}}), flush=True)
    config = uvicorn.Config(
        replayer.app(), loop="uvloop", log_level="warning", access_log=False, lifespan="off"
    )
    uvicorn.Server(config).run(sockets=sockets)


if __name__ == "__main__":
    main()
