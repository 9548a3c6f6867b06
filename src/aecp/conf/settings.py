"""Settings of a node process (``aecp node run --config FILE``).

A JSON file with one group per component. ``load`` validates the whole file and reports every
problem at once in a ``ConfigError``.
"""

from __future__ import annotations

import ipaddress
import json
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from aecp.common.errors import ConfigError
from aecp.common.names import is_name

MAX_SOCKET_PATH = 107  # sun_path holds 108 bytes, the last one a NUL


class StoreSettings(BaseModel):
    model_config = ConfigDict(extra="forbid")

    endpoints: list[str] = Field(
        default_factory=lambda: ["127.0.0.1:2379"], description="etcd client endpoints host:port"
    )
    timeout: float = Field(5.0, gt=0, description="deadline of one store call, seconds")


class AgentSettings(BaseModel):
    model_config = ConfigDict(extra="forbid")

    lease_ttl: int = Field(10, ge=2, le=120, description="node lease TTL, seconds")
    fence_margin: float = Field(
        1.0, ge=0.1, description="fence this many seconds before the lease could have expired"
    )
    resync_interval: float = Field(5.0, gt=0, description="full reconcile at least this often")
    heartbeat_every: int = Field(3, ge=1, description="rewrite usage every N lease refreshes")
    operation_retention_h: float = Field(
        168.0,
        gt=0,
        le=24 * 3650,
        description="finished operations are deleted this many hours after they ended (the node "
        "that holds the operation-reaper role applies its own setting: set it alike everywhere)",
    )


class ComputeSettings(BaseModel):
    model_config = ConfigDict(extra="forbid")

    accel: Literal["auto", "kvm", "tcg"] = Field("auto", description="auto probes KVM once")
    qemu_binary: str = "qemu-system-x86_64"
    cpus: int | None = Field(None, ge=1, description="vCPUs offered (default: host cores)")
    memory_mib: int | None = Field(None, ge=64, description="memory offered (default: host)")
    probe_image: str | None = Field(None, description="bootable image used by the KVM probe")
    migration_address: str | None = Field(
        None,
        description="the address a VM migrating here is received on (the storage network's; "
        "default: the node's address)",
    )
    migration_max_bandwidth_mib_s: int = Field(
        4096, ge=1, description="live migration bandwidth cap (QEMU max-bandwidth)"
    )
    migration_downtime_limit_ms: int = Field(
        300,
        ge=1,
        le=60_000,
        description="the longest pause QEMU may plan for a live migration's last pass",
    )
    migration_timeout_s: float = Field(
        600, gt=0, description="a live migration not finished by then is cancelled"
    )


class NetworkSettings(BaseModel):
    model_config = ConfigDict(extra="forbid")

    vm_uplink: str = Field(
        "",
        description="the host interface VM networks are bridged onto, tagged with each "
        "network's VLAN (empty: VM networks stay on this node)",
    )


class ApiSettings(BaseModel):
    model_config = ConfigDict(extra="forbid")

    port: int = Field(8700, ge=1, le=65535)


class SecuritySettings(BaseModel):
    model_config = ConfigDict(extra="forbid")

    tls_dir: Path = Field(
        description="this node's credentials from the cluster CA (ca.crt, tls.crt, tls.key, "
        "mode 0600): etcd, replica and NBD TLS"
    )
    replica_encryption: bool = Field(
        False,
        description="encrypt replica traffic with TLS; when off each replica connection is "
        "still authenticated both ways, but its stream is not encrypted (a dedicated storage "
        "network)",
    )


class StorageSettings(BaseModel):
    model_config = ConfigDict(extra="forbid")

    chunk_port: int = Field(8710, ge=1, le=65535, description="replica protocol port")
    nbd_port: int = Field(
        10809, ge=1, le=65535, description="NBD port for outside clients (TLS required)"
    )
    nbd_handshake_timeout_s: float = Field(
        10, gt=0, description="an NBD client that has not finished negotiating by then is dropped"
    )
    nbd_idle_timeout_s: float = Field(
        600, gt=0, description="a TCP NBD connection without requests this long is closed"
    )
    nbd_max_connections_per_client: int = Field(
        16, ge=1, description="TCP NBD connections one client address may hold at once"
    )
    extent_mib: int = Field(256, ge=1, le=4096, description="extent size of new volumes")
    capacity_gib: int | None = Field(None, ge=1, description="space offered (default: disk)")
    capacity_mib: int | None = Field(
        None, ge=1, description="space offered in MiB (small test labs; not with capacity_gib)"
    )
    overcommit_ratio: float = Field(
        3.0,
        gt=0,
        allow_inf_nan=False,
        description="thin provisioning: volumes may provision (size x replicas) up to this "
        "many times the storage servers' raw capacity (a finite number above 0)",
    )
    orphan_grace_s: float = Field(
        600,
        gt=0,
        description="a replica that no extent record names is deleted once it has been "
        "found so, unchanged, for this long (a replica being built is not named yet); at "
        "least 60 s and 4 recovery intervals plus the store timeout",
    )
    rack: str = ""
    chassis: str = ""
    recovery_grace_s: float = Field(
        600,
        ge=0,
        description="wait this long for a failed replica's node before copying "
        "its data elsewhere (a node back in time only catches up what it missed)",
    )
    recovery_mib_s: float = Field(64, gt=0, description="recovery copy rate limit per volume")
    recovery_interval_s: float = Field(
        5, gt=0, description="how often degraded extents are looked at"
    )
    scrub_interval_s: float = Field(3600, gt=0, description="re-verify every replica this often")
    maintenance_grace_s: float = Field(
        3600,
        ge=0,
        description="while a node is in maintenance, wait this long for its replicas before "
        "copying their data elsewhere (instead of recovery_grace_s)",
    )
    address: str | None = Field(
        None,
        description="this node's address on the storage network: the storage server's replica "
        "and NBD ports, and the source of replica connections (default: the node's address)",
    )

    @property
    def capacity_bytes(self) -> int | None:
        """The space offered when configured (``capacity_mib`` or ``capacity_gib``), else None:
        the disk's."""
        if self.capacity_mib is not None:
            return self.capacity_mib << 20
        return None if self.capacity_gib is None else self.capacity_gib << 30


class NodeSettings(BaseModel):
    """Everything one node process needs."""

    model_config = ConfigDict(extra="forbid")

    name: str
    address: str = Field(description="the address this node's services bind to")
    data_dir: Path
    images_dir: Path
    store: StoreSettings = Field(default_factory=lambda: StoreSettings())
    agent: AgentSettings = Field(default_factory=lambda: AgentSettings())
    compute: ComputeSettings = Field(default_factory=lambda: ComputeSettings())
    api: ApiSettings = Field(default_factory=lambda: ApiSettings())
    storage: StorageSettings = Field(default_factory=lambda: StorageSettings())
    network: NetworkSettings = Field(default_factory=lambda: NetworkSettings())
    security: SecuritySettings
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"

    @property
    def api_url(self) -> str:
        return f"http://{self.address}:{self.api.port}"

    @property
    def storage_address(self) -> str:
        """Where the storage server listens and replica connections come from."""
        return self.storage.address or self.address

    @property
    def run_dir(self) -> Path:
        return self.data_dir / "run"

    @property
    def vm_dir(self) -> Path:
        return self.data_dir / "vms"

    @property
    def chunk_dir(self) -> Path:
        return self.data_dir / "chunks"

    @property
    def nbd_socket(self) -> Path:
        """The Unix socket this node's QEMU reaches its storage server on (root only). Not in
        ``run_dir``, where every VM has a directory named after it (a VM may be called nbd)."""
        return self.data_dir / "nbd" / "nbd.sock"


#: the shortest ``storage.orphan_grace_s``, and how many recovery intervals it must span
MIN_ORPHAN_GRACE_S = 60.0
ORPHAN_GRACE_PASSES = 4


def orphan_grace_floor(s: NodeSettings) -> float:
    """The shortest orphan grace period these settings allow: a replica being built (created
    before its extent is committed, or a copy before its record is read back) stays unnamed
    for at most a few recovery passes and a store call."""
    passes = ORPHAN_GRACE_PASSES * s.storage.recovery_interval_s + s.store.timeout
    return max(MIN_ORPHAN_GRACE_S, passes)


def load(path: Path) -> NodeSettings:
    """Read and validate a settings file; ``ConfigError`` lists every problem found."""
    try:
        raw = json.loads(path.read_text())
    except OSError as exc:
        raise ConfigError([f"{path}: cannot read: {exc.strerror}"]) from exc
    except json.JSONDecodeError as exc:
        raise ConfigError([f"{path}: not JSON: {exc}"]) from exc
    return parse(raw)


def parse(raw: object) -> NodeSettings:
    """Validate a settings mapping; ``ConfigError`` lists every problem found."""
    try:
        settings = NodeSettings.model_validate(raw)
    except ValidationError as exc:
        problems = [f"{'.'.join(str(p) for p in err['loc'])}: {err['msg']}" for err in exc.errors()]
        raise ConfigError(problems) from None
    problems = _semantic_problems(settings)
    if problems:
        raise ConfigError(problems)
    return settings


def _semantic_problems(s: NodeSettings) -> list[str]:
    problems = []
    if not is_name(s.name):
        problems.append(f"name: {s.name!r} is not a valid node name")
    try:
        ipaddress.ip_address(s.address)
    except ValueError:
        problems.append(f"address: {s.address!r} is not an IP address")
    if s.agent.fence_margin >= s.agent.lease_ttl:
        problems.append("agent.fence_margin: must be smaller than agent.lease_ttl")
    if s.storage.capacity_gib is not None and s.storage.capacity_mib is not None:
        problems.append("storage.capacity_mib: give capacity_gib or capacity_mib, not both")
    floor = orphan_grace_floor(s)
    if s.storage.orphan_grace_s < floor:
        problems.append(
            f"storage.orphan_grace_s: must be at least {floor:g} s (at least "
            f"{MIN_ORPHAN_GRACE_S:g} s, and {ORPHAN_GRACE_PASSES} recovery intervals plus the "
            "store timeout): a replica being built may be named by nothing that long, and the "
            "orphan collector must not delete it"
        )
    if not s.store.endpoints:
        problems.append("store.endpoints: at least one endpoint is needed")
    if len(str(s.nbd_socket).encode()) > MAX_SOCKET_PATH:
        problems.append(
            f"data_dir: too long: the NBD socket {s.nbd_socket} would exceed the "
            f"{MAX_SOCKET_PATH} bytes of a Unix socket path"
        )
    for ep in s.store.endpoints:
        host, _, port = ep.rpartition(":")
        if not host or not port.isdigit():
            problems.append(f"store.endpoints: {ep!r} is not host:port")
    return problems
