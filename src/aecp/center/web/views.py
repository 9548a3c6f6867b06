"""What the console's pages show, read from the center's database with the functions the API
uses (the registry, the inventory, the accounts, the audit trail).

Each function takes the request's unit of work and returns plain values for a template; none
changes anything. What a role may not read through the API is not read for it here either
(``cluster_page``: the API's ``INVENTORY_ACTIONS`` and ``list_vms``). A cluster's health is
read off the center's copy: ``unreachable`` when the center cannot read it, ``new`` before
its first read, ``degraded`` when a node is not ready or a volume is not healthy, else ``ok``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from fastapi import Response
from sqlalchemy.orm import Session as DB

from aecp.center.accounts import Caller
from aecp.center.api import objects as object_api
from aecp.center.db.models import Cluster, ClusterSync
from aecp.center.inventory import Inventory
from aecp.center.registry import Registry

VM_PAGE = 1000  # VMs read at a time (the most ``GET /v1/vms`` answers)


@dataclass(frozen=True)
class ClusterRow:
    """A registered cluster with what the center's copy says of it."""

    name: str
    datacenter: str
    endpoint: str
    sync_state: str
    last_sync_at: float
    sync_error: str
    nodes: int = 0
    nodes_ready: int = 0
    vms: int = 0
    vms_running: int = 0
    volumes: int = 0
    volumes_degraded: int = 0

    @property
    def health(self) -> str:
        if self.sync_state in ("unreachable", "new"):
            return self.sync_state
        if self.nodes_ready < self.nodes or self.volumes_degraded:
            return "degraded"
        return "ok"

    @property
    def problems(self) -> list[str]:
        said = []
        if self.sync_state == "unreachable":
            said.append(f"the center cannot read it: {self.sync_error}")
        if self.nodes_ready < self.nodes:
            said.append(f"{self.nodes - self.nodes_ready} of {self.nodes} nodes not ready")
        if self.volumes_degraded:
            said.append(f"{self.volumes_degraded} volumes degraded")
        return said


@dataclass(frozen=True)
class DatacenterRow:
    name: str
    clusters: list[ClusterRow] = field(default_factory=list)


@dataclass(frozen=True)
class Totals:
    clusters: int
    nodes: int
    nodes_ready: int
    vms: int
    vms_running: int
    volumes: int
    volumes_degraded: int


def objects(db: DB, inventory: Inventory, kind: str, cluster: str) -> list[dict[str, Any]]:
    """The center's copy of ``cluster``'s objects of ``kind``, as the cluster shows them
    (each a mapping with its name, whatever else the cluster said)."""
    found = []
    for o in inventory.objects(db, kind, cluster):
        data = json.loads(o.data)
        found.append({**data, "name": o.name} if isinstance(data, dict) else {"name": o.name})
    return found


def cluster_row(db: DB, inventory: Inventory, c: Cluster) -> ClusterRow:
    sync = db.get(ClusterSync, c.name)
    nodes = objects(db, inventory, "node", c.name)
    vms = objects(db, inventory, "vm", c.name)
    volumes = objects(db, inventory, "volume", c.name)
    return ClusterRow(
        name=c.name,
        datacenter=c.datacenter,
        endpoint=c.endpoint,
        sync_state=sync.state if sync else "new",
        last_sync_at=sync.last_sync_at if sync else 0.0,
        sync_error=sync.error if sync else "",
        nodes=len(nodes),
        nodes_ready=sum(1 for n in nodes if n.get("state") == "ready"),
        vms=len(vms),
        vms_running=sum(1 for v in vms if v.get("state") == "running"),
        volumes=len(volumes),
        volumes_degraded=sum(1 for v in volumes if v.get("health", "healthy") != "healthy"),
    )


def datacenters(db: DB, registry: Registry, inventory: Inventory) -> list[DatacenterRow]:
    """Every data center with its clusters (a data center without any is listed too)."""
    rows = {d.name: DatacenterRow(d.name) for d in registry.datacenters(db)}
    for c in registry.clusters(db):
        rows.setdefault(c.datacenter, DatacenterRow(c.datacenter)).clusters.append(
            cluster_row(db, inventory, c)
        )
    return list(rows.values())


def totals(dcs: list[DatacenterRow]) -> Totals:
    rows = [c for d in dcs for c in d.clusters]
    return Totals(
        clusters=len(rows),
        nodes=sum(c.nodes for c in rows),
        nodes_ready=sum(c.nodes_ready for c in rows),
        vms=sum(c.vms for c in rows),
        vms_running=sum(c.vms_running for c in rows),
        volumes=sum(c.volumes for c in rows),
        volumes_degraded=sum(c.volumes_degraded for c in rows),
    )


@dataclass(frozen=True)
class ClusterPage:
    """What a cluster's page shows its caller: ``None`` for what its role may not read."""

    row: ClusterRow
    nodes: list[dict[str, Any]]
    vms: list[dict[str, Any]] | None
    volumes: list[dict[str, Any]] | None
    templates: list[dict[str, Any]] | None


def cluster_page(
    db: DB, registry: Registry, inventory: Inventory, name: str, who: Caller
) -> ClusterPage:
    """``NotFound`` for a cluster that is not registered. Each kind is read as the API reads
    it for ``who`` (``INVENTORY_ACTIONS``): nodes with ``cluster.read`` (the page's own
    action), VMs with ``vm.read`` through ``list_vms`` (its own only, without ``vm.all``),
    volumes with ``volume.read``, templates with ``vm.read``."""
    c = registry.cluster(db, name)
    return ClusterPage(
        row=cluster_row(db, inventory, c),
        nodes=objects(db, inventory, "node", name),
        vms=vms_of(db, who, name) if who.may("vm.read") else None,
        volumes=objects(db, inventory, "volume", name) if who.may("volume.read") else None,
        templates=objects(db, inventory, "template", name) if who.may("vm.read") else None,
    )


def vms_of(db: DB, who: Caller, cluster: str | None = None) -> list[dict[str, Any]]:
    """The VMs ``who`` may see (``GET /v1/vms``: its own only, without ``vm.all``), every
    page of them."""
    found: list[dict[str, Any]] = []
    while True:
        answer = Response()
        page = object_api.list_vms(
            db, who, answer, cluster=cluster, state=None, node=None, name=None,
            sort="name", limit=VM_PAGE, offset=len(found),
        )  # fmt: skip
        found.extend(v.model_dump() for v in page)
        if len(page) < VM_PAGE or len(found) >= int(answer.headers["X-Total-Count"]):
            return found


def disks_of(db: DB, inventory: Inventory, cluster: str, vm: str) -> list[dict[str, Any]]:
    """The volumes whose owner is VM ``vm`` (by name: ``<vm>-boot``, ``<vm>-dataN``, for
    volumes made before owners were recorded), boot disk first."""
    mine = []
    for v in objects(db, inventory, "volume", cluster):
        owner = v.get("owner") or {}
        if not isinstance(owner, dict):
            continue
        name = str(v.get("name", ""))
        if (owner.get("kind") == "vm" and owner.get("name") == vm) or (
            not owner and (name == f"{vm}-boot" or name.startswith(f"{vm}-data"))
        ):
            mine.append(v)
    mine.sort(key=lambda v: (not str(v.get("name", "")).endswith("-boot"), str(v.get("name"))))
    return mine


def operations_on(
    db: DB, inventory: Inventory, cluster: str, target: str, limit: int = 10
) -> list[dict[str, Any]]:
    ops = [o for o in objects(db, inventory, "operation", cluster) if o.get("target") == target]
    ops.sort(key=lambda o: number(o.get("created_at")), reverse=True)
    return ops[:limit]


def number(value: Any) -> float:
    """A figure the cluster sent, or 0 if it is not one."""
    return float(value) if isinstance(value, int | float) and not isinstance(value, bool) else 0.0
