"""The trio's layout: which node has which role, its HA IP, the management IP and the cluster
id. Loaded from one JSON document shared by the three nodes (``aecp center ha deploy``
reads it; the lab writes it).

Validation is the whole contract: a topology that loads is one the trio can run. Refused, with
the field named: not exactly three nodes, a role missing or given twice, two nodes with one
name or one HA IP, an HA IP outside the HA subnet, a management IP inside the HA subnet or equal
to an HA IP, a witness given a data directory, a data node without one, a cluster id that is
not a plain name.
"""

from __future__ import annotations

import ipaddress
import json
import re
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from aecp.center.ha.model import Role
from aecp.common.errors import InvalidInput

_ID = re.compile(r"^[a-z][a-z0-9-]{1,30}[a-z0-9]$")
ETCD_CLIENT_PORT = 2379
ETCD_PEER_PORT = 2380
PG_PORT = 5432
PATRONI_PORT = 8008
AGENT_PORT = 8009
CENTER_PORT = 8800


class HANode(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str = Field(pattern=r"^[a-z]([a-z0-9-]{0,29}[a-z0-9])?$")
    role: Role
    ha_ip: str = Field(description="the node's address on the HA network")
    data_dir: Path | None = Field(None, description="PostgreSQL's home; none on the witness")

    @field_validator("ha_ip")
    @classmethod
    def _address(cls, value: str) -> str:
        return str(ipaddress.IPv4Address(value))


class Topology(BaseModel):
    """One trio. ``management_ip`` is ``address/prefix`` on ``management_iface`` of the active."""

    model_config = ConfigDict(extra="forbid")

    cluster_id: str
    ha_cidr: str
    management_ip: str
    management_iface: str = Field("mgmt0", pattern=r"^[A-Za-z0-9_.-]{1,15}$")
    nodes: list[HANode]

    def node(self, name: str) -> HANode:
        for n in self.nodes:
            if n.name == name:
                return n
        raise InvalidInput("node", f"{name!r} is not a node of trio {self.cluster_id}")

    def by_role(self, role: Role) -> HANode:
        return next(n for n in self.nodes if n.role is role)

    @property
    def data_nodes(self) -> list[HANode]:
        return [n for n in self.nodes if n.role is not Role.WITNESS]

    @property
    def management_address(self) -> str:
        """The management IP without its prefix."""
        return str(ipaddress.IPv4Interface(self.management_ip).ip)

    @property
    def leader_key(self) -> str:
        """Patroni's leader key in etcd (its namespace ``/service/``, its scope the cluster id)."""
        return f"/service/{self.cluster_id}/leader"

    def etcd_endpoints(self) -> list[str]:
        return [f"{n.ha_ip}:{ETCD_CLIENT_PORT}" for n in self.nodes]

    def initial_cluster(self) -> str:
        return ",".join(f"{n.name}=https://{n.ha_ip}:{ETCD_PEER_PORT}" for n in self.nodes)


def check(topology: Topology) -> Topology:
    """``topology`` if the trio can run it; ``InvalidInput`` naming the field otherwise."""
    if not _ID.fullmatch(topology.cluster_id):
        raise InvalidInput("cluster_id", "3-32 lower-case letters, digits and dashes")
    nodes = topology.nodes
    if len(nodes) != 3:
        raise InvalidInput("nodes", f"a trio has exactly three nodes, not {len(nodes)}")
    _unique(nodes)
    for role in Role:
        holders = [n.name for n in nodes if n.role is role]
        if len(holders) != 1:
            raise InvalidInput("nodes", f"one node must be the {role}, not {len(holders)}")
    subnet = _network("ha_cidr", topology.ha_cidr)
    for n in nodes:
        ip = ipaddress.IPv4Address(n.ha_ip)
        if ip not in subnet:
            raise InvalidInput(f"nodes.{n.name}.ha_ip", f"{n.ha_ip} is outside {subnet}")
        if subnet.prefixlen < 31 and ip in (subnet.network_address, subnet.broadcast_address):
            raise InvalidInput(
                f"nodes.{n.name}.ha_ip", f"{n.ha_ip} is {subnet}'s network or broadcast address"
            )
        if n.data_dir is not None and (
            str(n.data_dir) in ("", ".") or not n.data_dir.is_absolute()
        ):
            raise InvalidInput(f"nodes.{n.name}.data_dir", "give an absolute path")
        if n.role is Role.WITNESS and n.data_dir is not None:
            raise InvalidInput(
                f"nodes.{n.name}.data_dir", "the witness stores no service data: give it none"
            )
        if n.role is not Role.WITNESS and n.data_dir is None:
            raise InvalidInput(f"nodes.{n.name}.data_dir", f"the {n.role} needs a data directory")
    _check_management(topology, subnet)
    return topology


def _unique(nodes: list[HANode]) -> None:
    for field in ("name", "ha_ip"):
        seen: set[str] = set()
        for n in nodes:
            value = getattr(n, field)
            if value in seen:
                raise InvalidInput(f"nodes.{field}", f"{value} is given to two nodes")
            seen.add(value)


def _network(field: str, cidr: str) -> ipaddress.IPv4Network:
    try:
        return ipaddress.IPv4Network(cidr, strict=True)
    except ValueError as e:
        raise InvalidInput(field, f"{cidr!r} is not an IPv4 network: {e}") from None


def _check_management(topology: Topology, subnet: ipaddress.IPv4Network) -> None:
    try:
        mgmt = ipaddress.IPv4Interface(topology.management_ip)
    except ValueError as e:
        raise InvalidInput("management_ip", f"not address/prefix: {e}") from None
    if "/" not in topology.management_ip:
        raise InvalidInput("management_ip", "give it with its prefix, e.g. 10.231.0.200/24")
    ip, net = mgmt.ip, mgmt.network
    if ip.is_loopback or ip.is_unspecified or ip.is_multicast or ip.is_reserved or ip.is_link_local:
        raise InvalidInput("management_ip", f"{ip} cannot be a host's address")
    if (
        ip.version == 4
        and net.prefixlen < 31
        and ip in (net.network_address, net.broadcast_address)
    ):
        raise InvalidInput("management_ip", f"{ip} is {net}'s network or broadcast address")
    if mgmt.ip in subnet or mgmt.network.overlaps(subnet):
        raise InvalidInput(
            "management_ip",
            f"{mgmt} is on the HA network {subnet}: it must be on the management network",
        )


def parse(data: Any) -> Topology:
    """Validate a decoded document (pydantic's errors become ``InvalidInput`` too)."""
    try:
        topology = Topology.model_validate(data)
    except ValidationError as e:
        err = e.errors()[0]
        where = ".".join(str(p) for p in err["loc"]) or "topology"
        raise InvalidInput(where, err["msg"]) from None
    return check(topology)


def load(path: Path) -> Topology:
    """Read a topology file (JSON)."""
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise InvalidInput("topology", f"cannot read {path}: {e}") from None
    return parse(data)
