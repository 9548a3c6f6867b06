"""VM networks: the cluster-wide network object (a VLAN and an IPv4 subnet), the holder of each
address the cluster hands out in it, and the pure address arithmetic (which addresses VMs get,
which ones the nodes' bridges get). No I/O.

Addresses of a subnet, low to high: the network address (never given), the gateway (the first
host unless chosen; never given: the router outside the cluster owns it), the VM addresses
handed out lowest first, ..., the node addresses (one per node, on its bridge, for its DHCP
server) handed out highest first, the broadcast address (never given).
"""

from __future__ import annotations

import hashlib
import ipaddress
from collections.abc import Collection, Iterator
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, StrictInt

from aecp.common.errors import InvalidInput
from aecp.model.base import Name, Stored, check_name

VLAN_MIN, VLAN_MAX = 1, 4094
PREFIX_MIN, PREFIX_MAX = 8, 29  # a /29 leaves room for a gateway, node addresses and VMs
MAX_NICS = 8  # networks per VM

# address ranges that are no VM network's: loopback, link-local, multicast, reserved, "this"
_NOT_VM_SUBNETS = tuple(
    ipaddress.IPv4Network(n)
    for n in ("0.0.0.0/8", "127.0.0.0/8", "169.254.0.0/16", "224.0.0.0/4", "240.0.0.0/4")
)


class NetworkCreate(BaseModel):
    """The body of ``POST /v1/networks``."""

    model_config = ConfigDict(extra="forbid")

    name: Name
    vlan: StrictInt = Field(description=f"the 802.1Q VLAN id, {VLAN_MIN}-{VLAN_MAX}")
    subnet: str = Field(
        description=f"an IPv4 subnet in CIDR form, /{PREFIX_MIN} to /{PREFIX_MAX}",
        examples=["10.10.0.0/24"],
    )
    gateway: str = Field(
        "", description="the router's address in the subnet (default: its first host)"
    )

    def validate_fields(self) -> tuple[ipaddress.IPv4Network, ipaddress.IPv4Address]:
        """The subnet and gateway, or ``InvalidInput`` naming the first bad field."""
        check_name("name", self.name)
        check_vlan(self.vlan)
        net = parse_subnet(self.subnet)
        return net, parse_gateway(net, self.gateway)


def check_vlan(vlan: object) -> int:
    if isinstance(vlan, bool) or not isinstance(vlan, int) or not VLAN_MIN <= vlan <= VLAN_MAX:
        raise InvalidInput("vlan", f"must be a VLAN id in {VLAN_MIN}-{VLAN_MAX}, got {vlan!r}")
    return vlan


def parse_subnet(text: str) -> ipaddress.IPv4Network:
    """``text`` as an IPv4 subnet a VM network may use, else ``InvalidInput`` for ``subnet``."""
    if not isinstance(text, str) or "/" not in text:
        raise InvalidInput("subnet", f"{text!r} is not an IPv4 subnet in CIDR form (10.0.0.0/24)")
    try:
        net = ipaddress.IPv4Network(text.strip(), strict=True)
    except ValueError as exc:
        raise InvalidInput(
            "subnet", f"{text!r} is not an IPv4 subnet in CIDR form: {exc}"
        ) from None
    if not PREFIX_MIN <= net.prefixlen <= PREFIX_MAX:
        raise InvalidInput(
            "subnet", f"the prefix must be /{PREFIX_MIN} to /{PREFIX_MAX}, got /{net.prefixlen}"
        )
    for bad in _NOT_VM_SUBNETS:
        if net.overlaps(bad):
            raise InvalidInput("subnet", f"{net} overlaps {bad}, which no VM network may use")
    return net


def parse_gateway(net: ipaddress.IPv4Network, text: str) -> ipaddress.IPv4Address:
    if not text:
        return net.network_address + 1
    try:
        gw = ipaddress.IPv4Address(text.strip())
    except ValueError:
        raise InvalidInput("gateway", f"{text!r} is not an IPv4 address") from None
    if gw not in net or gw in (net.network_address, net.broadcast_address):
        raise InvalidInput("gateway", f"{gw} is not a host address of {net}")
    return gw


class NetworkRecord(Stored):
    """``/aecp/networks/<name>``: a VM network. Immutable once created (its VLAN names the
    bridges and VLAN links on the nodes; its addresses are held by VMs)."""

    name: str
    vlan: int
    subnet: str
    gateway: str
    created_at: float = 0.0

    @property
    def net(self) -> ipaddress.IPv4Network:
        return ipaddress.IPv4Network(self.subnet)

    @property
    def prefixlen(self) -> int:
        return self.net.prefixlen


class AddressHolder(Stored):
    """``/aecp/network-ips/<network>/<ip>``: who holds an address — a VM's NIC (``vm``) or a
    node's bridge (``node``)."""

    kind: Literal["vm", "node"]
    vm: str = ""
    vm_uuid: str = ""
    nic: int = 0
    mac: str = ""  # the VM NIC's (DHCP hands the address to this MAC)
    node: str = ""

    def describe(self) -> str:
        return f"node {self.node}" if self.kind == "node" else f"{self.vm}/nic{self.nic}"


def nic_mac(uuid: str, index: int) -> str:
    """A stable locally administered MAC for NIC ``index`` of the VM ``uuid`` (52:54:00, QEMU's
    prefix, then three bytes of a digest of both)."""
    h = hashlib.sha256(f"{uuid}/nic{index}".encode()).digest()
    return f"52:54:00:{h[0]:02x}:{h[1]:02x}:{h[2]:02x}"


def _hosts(rec: NetworkRecord) -> Iterator[ipaddress.IPv4Address]:
    net = rec.net
    first, last = int(net.network_address) + 1, int(net.broadcast_address) - 1
    return (ipaddress.IPv4Address(i) for i in range(first, last + 1))


def lowest_free(rec: NetworkRecord, taken: Collection[str]) -> str | None:
    """The lowest host address of ``rec`` that is not its gateway nor ``taken`` (a VM's)."""
    for ip in _hosts(rec):
        s = str(ip)
        if s != rec.gateway and s not in taken:
            return s
    return None


def highest_free(rec: NetworkRecord, taken: Collection[str]) -> str | None:
    """The highest host address of ``rec`` that is not its gateway nor ``taken`` (a node's)."""
    net = rec.net
    for i in range(int(net.broadcast_address) - 1, int(net.network_address), -1):
        s = str(ipaddress.IPv4Address(i))
        if s != rec.gateway and s not in taken:
            return s
    return None
