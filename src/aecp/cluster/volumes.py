"""Volume requests (ABS) below the REST layer: Meta for metadata, the chunk servers for what the
replicas hold (allocation, health) and for reclaiming the replicas of deleted volumes."""

from __future__ import annotations

import asyncio
import json
import logging
from typing import Annotated

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, StrictInt
from pydantic_core import PydanticCustomError

from aecp.common.errors import NotFound, Unavailable
from aecp.model.base import Name, check_name
from aecp.storage.chunk.errors import ChunkError
from aecp.storage.exports import ExportGrant, Exports
from aecp.storage.meta.model import (
    ExtentRecord,
    RecoveryRecord,
    StorageServer,
    VolumeOwner,
    VolumeRecord,
    parse_size,
)
from aecp.storage.meta.service import MetaService
from aecp.storage.pool import ReplicaPool
from aecp.store import keys

log = logging.getLogger(__name__)


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
    extents: list[ExtentHealth] = []


class StorageStatus(BaseModel):
    servers: list[StorageServer]
    volumes: int
    extents: int
    degraded_extents: int
    replicas_missing: int
    recoveries: list[str] = []


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
    node: str | None = Field(None, description="serve through this node (default: the first)")


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
                self._health(slot, exts[x], vol.replicas, recs.get(x))
                for slot, x in enumerate(vol.extents)
                if x and x in exts
            )
        )
        degraded = any(not h.healthy for h in healths)
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
            extents=list(healths) if detail else [],
        )

    async def _recoveries(self) -> dict[str, RecoveryRecord]:
        kvs = await self.meta.store.list(keys.ABS_RECOVERY)
        return {r.extent: r for r in (RecoveryRecord.load(kv.value) for kv in kvs)}

    async def _health(
        self, slot: int, ext: ExtentRecord, factor: int, rec: RecoveryRecord | None
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
            recovery=_progress(rec),
        )

    async def all(self) -> list[VolumePublic]:
        vols = await self.meta.volumes()
        return list(await asyncio.gather(*(self.show(v.name, detail=False) for v in vols)))

    async def resize(self, name: str, size: str | int) -> VolumeRecord:
        return await self.meta.resize(name, parse_size("size", size))

    async def delete(self, name: str) -> list[str]:
        """Delete the volume and reclaim the replicas of the extents nothing else names (best
        effort: a replica on an unreachable node is left for later)."""
        leftovers = await self.pool.delete_replicas(await self.meta.delete_volume(name))
        if leftovers:
            log.warning("volume %s: replicas left to reclaim later: %s", name, ", ".join(leftovers))
        return leftovers

    async def status(self) -> StorageStatus:
        recs = await self._recoveries()
        servers = await self.meta.servers()
        vols = await self.meta.volumes()
        exts = await self.meta.extents()
        factor = {x: v.replicas for v in vols for x in v.extents if x}
        missing = {x: factor[x] - len(e.replicas) for x, e in exts.items() if x in factor}
        return StorageStatus(
            servers=sorted(servers.values(), key=lambda s: s.node),
            volumes=len(vols),
            extents=len(exts),
            degraded_extents=sum(1 for m in missing.values() if m > 0),
            replicas_missing=sum(m for m in missing.values() if m > 0),
            recoveries=[f"{r.volume}/{r.extent}: {_progress(r)}" for r in recs.values()],
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


def _progress(rec: RecoveryRecord | None) -> str:
    if rec is None:
        return ""
    pct = 100 * rec.copied_bytes // rec.total_bytes if rec.total_bytes else 100
    return f"{rec.kind} to {rec.target}: {pct}% of {rec.total_bytes} bytes"
