"""Volume requests (ABS) below the REST layer: Meta for metadata, the chunk servers for what the
replicas hold (allocation, health) and for reclaiming the replicas of deleted volumes.

Storage status shows, per server and for the cluster, raw capacity, what is allocated and what
volumes have provisioned (thin: size x replicas), and how full the space is: over
``WARN_PCT`` a warning, over ``CRIT_PCT`` critical (writes needing new space then soon fail
with ENOSPC)."""

from __future__ import annotations

import asyncio
import json
import logging
from typing import Annotated

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, StrictInt
from pydantic_core import PydanticCustomError

from aecp.common.errors import NotFound, Unavailable
from aecp.common.sizes import parse_size
from aecp.model.base import Name, check_name
from aecp.storage.chunk.errors import ChunkError
from aecp.storage.exports import ExportGrant, Exports
from aecp.storage.meta.model import (
    ExtentRecord,
    RecoveryRecord,
    StorageServer,
    VolumeOwner,
    VolumeRecord,
)
from aecp.storage.meta.service import MetaService
from aecp.storage.pool import ReplicaPool
from aecp.store import keys

log = logging.getLogger(__name__)
WARN_PCT = 80.0
CRIT_PCT = 90.0


class ExtentHealth(BaseModel):
    slot: int
    id: str
    replicas: list[str]
    stale: list[str]
    generation: int
    allocated_bytes: int
    healthy: bool
    recovery: str = ""


class VolumePublic(BaseModel):
    name: str
    size: int
    replicas: int
    extent_size: int
    provisioned_bytes: int
    allocated_bytes: int
    extents_allocated: int
    extents_total: int
    attached_to: str | None
    epoch: int
    health: str
    owner: VolumeOwner | None = None  # the VM or template whose disk it is; None: standalone
    source: str = ""  # what it was made from: "snapshot v@s", "volume v", "" (empty)
    created_at: float = 0.0
    extents: list[ExtentHealth] = []
    #: allocated extents with a valid replica on the node it is attached to (data locality)
    local_extents: int = 0
    locality: str = ""  # "3 of 4 extents on node2"; "" when not attached
    recoveries: list[str] = []  # its copies in progress: "<extent>: locality to node2: 40% ..."


class ServerUsage(StorageServer):
    """A storage server with how full it is: ``used_pct`` of its capacity is not free."""

    used_pct: float
    level: str  # "ok", "warning" (over WARN_PCT) or "critical" (over CRIT_PCT)


class StorageStatus(BaseModel):
    servers: list[ServerUsage]
    volumes: int
    extents: int
    degraded_extents: int
    replicas_missing: int
    recoveries: list[str] = []
    raw_bytes: int = 0  # the storage servers' capacity
    free_bytes: int = 0
    allocated_bytes: int = 0  # held by replicas
    provisioned_bytes: int = 0  # volumes' size x replicas (thin: most is not written)
    provisioned_limit_bytes: int = 0  # overcommit_ratio x raw_bytes
    overcommit_ratio: float = 0.0
    used_pct: float = 0.0
    level: str = "ok"
    warnings: list[str] = []


def _int_or_text(value: object) -> object:
    """Refuse what JSON would only coerce into a size: ``true``, ``1e9``, ``10.5``."""
    if isinstance(value, bool) or not isinstance(value, int | str):
        raise PydanticCustomError(
            "size_type",
            "must be a whole number of bytes or a size like 10G, got {got}",
            {"got": json.dumps(value, default=str)},
        )
    return value


Size = Annotated[
    int | str,
    BeforeValidator(_int_or_text),
    Field(description="bytes (an integer) or a size like 10G, 512M", examples=["10G", 1048576]),
]


class VolumeCreate(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: Name
    size: Size
    replicas: StrictInt | None = Field(None, description="1, 2 or 3 (default: by node count)")


class VolumeResize(BaseModel):
    model_config = ConfigDict(extra="forbid")

    size: Size


class ExportCreate(BaseModel):
    """The body of ``POST /v1/volumes/{name}/export``."""

    model_config = ConfigDict(extra="forbid")

    client_ca_certificate: str = Field(
        description="PEM of the CA certificate of the one client credential that may open "
        "the volume: self-signed, path length 0 (the credential's own CA; `aecp volume export` "
        "makes it and the client's key, which stays with the client)"
    )
    node: Name | None = Field(None, description="serve through this node (default: the first)")


class ExportPublic(BaseModel):
    """An export: where outside NBD clients reach the volume, over TLS, with which credential."""

    volume: str
    node: str
    address: str
    port: int
    uri: str = Field(description="nbds://address:port/volume (TLS required)")
    fingerprint: str = Field(description="sha256 of the credential's CA certificate")
    created_at: float
    expires_at: float
    ca_certificate: str = Field(description="the cluster CA (PEM): it signs the server's cert")


class VolumeService:
    def __init__(
        self,
        meta: MetaService,
        pool: ReplicaPool,
        *,
        ca_certificate: str = "",
        exports: Exports | None = None,
    ) -> None:
        self.meta = meta
        self.pool = pool
        self.ca_certificate = ca_certificate
        self.exports = exports or Exports(meta.store, meta.clock, cluster_ca=ca_certificate)

    async def create(self, req: VolumeCreate) -> VolumeRecord:
        return await self.meta.create_volume(req.name, parse_size("size", req.size), req.replicas)

    async def show(self, name: str, detail: bool = True) -> VolumePublic:
        vol, _ = await self.meta.volume(name)
        att = await self.meta.attachment(name)
        exts = await self.meta.extents()
        recs = await self._recoveries()
        healths = await asyncio.gather(
            *(
                self._health(slot, exts[x], vol.replicas, recs.get(x, []))
                for slot, x in enumerate(vol.extents)
                if x and x in exts
            )
        )
        degraded = any(not h.healthy for h in healths)
        node = att.node if att else None
        local = sum(1 for h in healths if node in h.replicas)
        return VolumePublic(
            name=vol.name,
            size=vol.size,
            replicas=vol.replicas,
            extent_size=vol.extent_size,
            provisioned_bytes=vol.size * vol.replicas,
            allocated_bytes=sum(h.allocated_bytes for h in healths),
            extents_allocated=len(healths),
            extents_total=vol.slots,
            attached_to=att.node if att else None,
            epoch=vol.epoch,
            health="degraded" if degraded else "healthy",
            owner=vol.owner,
            source=vol.source,
            created_at=vol.created_at,
            extents=list(healths) if detail else [],
            local_extents=local,
            locality=f"{local} of {len(healths)} extents on {node}" if node else "",
            recoveries=[
                f"{x}: {_progress(r)}"
                for x in dict.fromkeys(x for x in vol.extents if x)
                for r in sorted(recs.get(x, []), key=lambda r: r.target)
            ],
        )

    async def _recoveries(self) -> dict[str, list[RecoveryRecord]]:
        """The copies in progress by extent (one extent may be copied into several targets
        at once: recoverers of a shared extent each make their own)."""
        out: dict[str, list[RecoveryRecord]] = {}
        for kv in await self.meta.store.list(keys.ABS_RECOVERY):
            rec = RecoveryRecord.load(kv.value)
            out.setdefault(rec.extent, []).append(rec)
        return out

    async def _health(
        self, slot: int, ext: ExtentRecord, factor: int, recs: list[RecoveryRecord]
    ) -> ExtentHealth:
        allocated = 0
        for node in ext.replicas:
            try:
                allocated += (await (await self.pool.client(node)).stat(ext.id)).allocated_bytes
            except ChunkError:
                continue
        return ExtentHealth(
            slot=slot,
            id=ext.id,
            replicas=ext.replicas,
            stale=sorted(ext.stale),
            generation=ext.generation,
            allocated_bytes=allocated,
            healthy=len(ext.replicas) >= factor,
            recovery="; ".join(_progress(r) for r in sorted(recs, key=lambda r: r.target)),
        )

    async def all(self) -> list[VolumePublic]:
        vols = await self.meta.volumes()
        return list(await asyncio.gather(*(self.show(v.name, detail=False) for v in vols)))

    async def resize(self, name: str, size: str | int) -> VolumeRecord:
        return await self.meta.resize(name, parse_size("size", size))

    async def delete(self, name: str) -> list[str]:
        """Delete the volume and reclaim the replicas of the extents nothing else names (a
        replica on an unreachable node is deleted later by that node's orphan collector). An
        export that is closing is waited for (``MetaService.delete_volume``)."""
        leftovers = await self.pool.delete_replicas(await self.meta.delete_volume(name))
        if leftovers:
            log.warning("volume %s: replicas left to reclaim later: %s", name, ", ".join(leftovers))
        return leftovers

    async def status(self) -> StorageStatus:
        t = await self.meta.tables()
        registered = await self.meta.servers()
        servers = [_usage(s) for s in sorted(registered.values(), key=_node)]
        factor = {x: s.replicas for s in t.snapshots for x in s.extents if x}
        factor.update({x: v.replicas for v in t.volumes.values() for x in v.extents if x})
        missing = {x: factor[x] - len(e.replicas) for x, e in t.extents.items() if x in factor}
        raw = sum(s.capacity_bytes for s in servers)
        free = sum(s.free_bytes for s in servers)
        used_pct = _pct(raw - free, raw)
        warnings = [
            f"storage server {s.node} is {s.used_pct:.0f}% full ({s.level})"
            for s in servers
            if s.level != "ok"
        ]
        if _level(used_pct) != "ok":
            warnings.append(f"the cluster's storage is {used_pct:.0f}% full ({_level(used_pct)})")
        ratio = self.meta.cluster_overcommit(registered)
        provisioned = sum(v.size * v.replicas for v in t.volumes.values())
        warnings += _provisioning_warnings(servers, ratio, raw, provisioned)
        return StorageStatus(
            servers=servers,
            volumes=len(t.volumes),
            extents=len(t.extents),
            degraded_extents=sum(1 for m in missing.values() if m > 0),
            replicas_missing=sum(m for m in missing.values() if m > 0),
            recoveries=[f"{r.volume}/{r.extent}: {_progress(r)}" for r in t.recoveries.values()],
            raw_bytes=raw,
            free_bytes=free,
            allocated_bytes=sum(s.used_bytes for s in servers),
            provisioned_bytes=provisioned,
            provisioned_limit_bytes=int(raw * ratio),
            overcommit_ratio=ratio,
            used_pct=used_pct,
            # a full server fails the writes that need space there: the worst level counts
            level=max([_level(used_pct), *(s.level for s in servers)], key=_LEVELS.index),
            warnings=warnings,
        )

    async def export(self, name: str, req: ExportCreate, created_by: str) -> ExportPublic:
        """Grant the client certificate of ``req`` access to the volume over NBD with TLS
        (``storage/exports.py``); ``AlreadyExists`` if the volume is exported already."""
        vol, _ = await self.meta.volume(name)
        if req.node is not None:
            check_name("node", req.node)
        srv = await self._server(req.node)
        grant = await self.exports.grant(vol, req.client_ca_certificate, srv.node, created_by)
        return self._public(grant, srv)

    async def export_info(self, name: str) -> ExportPublic:
        grant = await self.exports.get(name)
        servers = await self.meta.servers()
        srv = servers.get(grant.node)
        if srv is None:
            raise Unavailable(
                f"volume {name} is exported through node {grant.node}, whose storage server "
                "is not running",
                node=grant.node,
            )
        return self._public(grant, srv)

    async def unexport(self, name: str) -> None:
        """Revoke the volume's export: its credential opens nothing from now on, and its open
        connections are closed within seconds."""
        await self.exports.revoke(name)

    async def _server(self, node: str | None) -> StorageServer:
        servers = await self.meta.servers()
        if not servers:
            raise Unavailable("no storage server is running")
        srv = servers.get(node) if node else next(iter(sorted(servers.items())))[1]
        if srv is None:
            raise NotFound(f"node {node} runs no storage server", node=node)
        return srv

    def _public(self, grant: ExportGrant, srv: StorageServer) -> ExportPublic:
        return ExportPublic(
            volume=grant.volume,
            node=srv.node,
            address=srv.address,
            port=srv.nbd_port,
            uri=f"nbds://{srv.address}:{srv.nbd_port}/{grant.volume}",
            fingerprint=grant.fingerprint,
            created_at=grant.created_at,
            expires_at=grant.expires_at,
            ca_certificate=self.ca_certificate,
        )


_LEVELS = ["ok", "warning", "critical"]


def _node(s: StorageServer) -> str:
    return s.node


def _pct(part: int, whole: int) -> float:
    return round(100.0 * part / whole, 1) if whole > 0 else 0.0


def _level(pct: float) -> str:
    if pct > CRIT_PCT:
        return "critical"
    return "warning" if pct > WARN_PCT else "ok"


def _usage(s: StorageServer) -> ServerUsage:
    pct = _pct(s.capacity_bytes - s.free_bytes, s.capacity_bytes)
    return ServerUsage(**s.model_dump(), used_pct=pct, level=_level(pct))


def _provisioning_warnings(
    servers: list[ServerUsage], ratio: float, raw: int, provisioned: int
) -> list[str]:
    """Provisioned beyond the limit (the servers' capacity shrank, or one left), and servers
    that publish different overcommit ratios (the lowest applies)."""
    out = []
    limit = int(raw * ratio)
    if provisioned > limit:
        out.append(
            f"{provisioned} bytes are provisioned, more than the limit of {limit} bytes "
            f"({ratio:g} x {raw} bytes of raw capacity): the capacity shrank or a storage "
            "server left; new volumes, growth and clones are refused until it is back"
        )
    ratios = {s.node: s.overcommit_ratio for s in servers if s.overcommit_ratio}
    if len(set(ratios.values())) > 1:
        each = ", ".join(f"{r:g} on {n}" for n, r in sorted(ratios.items()))
        out.append(f"storage servers set different overcommit ratios ({each}): {ratio:g} applies")
    return out


def _progress(rec: RecoveryRecord) -> str:
    pct = 100 * rec.copied_bytes // rec.total_bytes if rec.total_bytes else 100
    return f"{rec.kind} to {rec.target}: {pct}% of {rec.total_bytes} bytes"
