"""The netns lab's networks: a network namespace per node, three shared bridges in the root
namespace, and a veth from each bridge into each node's namespace.

Owns the naming (a pure function of the lab's short id and node index: ``NetnsPlan``), creating
the plumbing (``create``), tearing it down (``destroy``, idempotent, usable after a crash) and
cutting or restoring one network of one node (the host side of its veth down or up). Every
command goes through ``aecp.network.rootops``.

The three networks::

    mgmt     bridge ae<id>m, host .254   node k: mgmt0 = <mgmt>.k     API; the lab host's way in
    storage  bridge ae<id>s, host .254   node k: stor0 = <storage>.k  etcd, replicas, NBD, migration
    vm       bridge ae<id>v, no address  node k: vmup0                VM networks' uplink

Order of ``create``: bridges (addressed, up), then per node its namespace, then per network the
veth pair (the node's end created inside the namespace), its host end on the bridge and up, the
node's end addressed and up. ``destroy`` reverses it: namespaces (which takes the node ends and
so the pairs with them), then any host end still there, then the bridges.
"""

from __future__ import annotations

import asyncio
import ipaddress
import os
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Literal, TypeVar

from aecp.common.errors import InvalidInput
from aecp.network import rootops

Network = Literal["mgmt", "storage", "vm"]
NETWORKS: tuple[Network, ...] = ("mgmt", "storage", "vm")
#: the interface name of each network inside a node's namespace
NODE_IFACE: dict[Network, str] = {"mgmt": "mgmt0", "storage": "stor0", "vm": "vmup0"}
_LETTER: dict[Network, str] = {"mgmt": "m", "storage": "s", "vm": "v"}
HOST_INDEX = 254
T = TypeVar("T")


def require_root() -> None:
    """Refuse clearly when not root: namespaces, bridges and veths need it."""
    if os.geteuid() != 0:
        raise InvalidInput("netns", "the netns lab needs root (run it with sudo)")


@dataclass(frozen=True)
class NetnsPlan:
    """The names and addresses of one netns lab (pure: nothing is touched)."""

    lab_id: str
    nodes: int
    mgmt_cidr: str
    storage_cidr: str

    def namespace(self, k: int) -> str:
        return f"aecp-{self.lab_id}-n{k}"

    def bridge(self, net: Network) -> str:
        return f"ae{self.lab_id}{_LETTER[net]}"

    def host_veth(self, k: int, net: Network) -> str:
        return f"ae{self.lab_id}n{k}{_LETTER[net]}"

    def subnet(self, net: Network) -> ipaddress.IPv4Network:
        return ipaddress.IPv4Network(self.mgmt_cidr if net == "mgmt" else self.storage_cidr)

    def address(self, net: Network, k: int) -> str:
        """Node k's address on ``net`` (mgmt or storage): host number k of the subnet."""
        return str(self.subnet(net).network_address + k)

    def host_address(self, net: Network) -> str:
        """The lab host's address on ``net`` (mgmt or storage): host number 254."""
        return str(self.subnet(net).network_address + HOST_INDEX)

    def prefix(self, net: Network) -> int:
        return self.subnet(net).prefixlen


async def create(plan: NetnsPlan) -> None:
    """Make the bridges, namespaces and veths of ``plan`` (see the module docstring's order).
    Raises ``InvalidInput`` if a subnet is already in use on this host; on any failure the
    caller runs ``destroy``, which removes whatever was made."""
    await _check_subnets_free(plan)
    for net in NETWORKS:
        bridge = plan.bridge(net)
        await rootops.bridge_add(bridge)
        if net != "vm":
            await rootops.addr_add(bridge, f"{plan.host_address(net)}/{plan.prefix(net)}")
        await rootops.link_up(bridge)
    for k in range(1, plan.nodes + 1):
        await _plug_node(plan, k)


async def _plug_node(plan: NetnsPlan, k: int) -> None:
    ns = plan.namespace(k)
    await rootops.netns_add(ns)
    for net in NETWORKS:
        host, inner = plan.host_veth(k, net), NODE_IFACE[net]
        await rootops.veth_add(host, inner, peer_netns=ns)
        await rootops.link_set_master(host, plan.bridge(net))
        await rootops.link_up(host)
        if net != "vm":
            await rootops.addr_add(inner, f"{plan.address(net, k)}/{plan.prefix(net)}", netns=ns)
        await rootops.link_up(inner, netns=ns)


async def _check_subnets_free(plan: NetnsPlan) -> None:
    mine = [plan.subnet("mgmt"), plan.subnet("storage")]
    if mine[0].overlaps(mine[1]):
        raise InvalidInput("storage_cidr", f"{mine[1]} overlaps the management subnet {mine[0]}")
    for iface, cidr in await rootops.addr_list():
        net = ipaddress.ip_interface(cidr).network
        for sub in mine:
            if net.version == 4 and net.overlaps(sub):
                raise InvalidInput(
                    "cidr", f"{sub} is in use on this host ({iface} has {cidr}): another lab?"
                )


async def destroy(plan: NetnsPlan) -> None:
    """Remove every namespace, veth and bridge of ``plan`` that exists; missing ones are fine,
    so this also cleans up after a crash or a half-made ``create``."""
    for k in range(1, plan.nodes + 1):
        await rootops.netns_delete(plan.namespace(k))
    for k in range(1, plan.nodes + 1):
        for net in NETWORKS:
            await rootops.link_delete(plan.host_veth(k, net))
    for net in NETWORKS:
        await rootops.link_delete(plan.bridge(net))


async def leftovers(plan: NetnsPlan) -> list[str]:
    """The namespaces and links of ``plan`` that exist (empty after ``destroy``)."""
    found = [ns for ns in await rootops.netns_list() if ns in _namespaces(plan)]
    for name in [plan.bridge(n) for n in NETWORKS] + [
        plan.host_veth(k, n) for k in range(1, plan.nodes + 1) for n in NETWORKS
    ]:
        if await rootops.link_exists(name):
            found.append(name)
    return found


def _namespaces(plan: NetnsPlan) -> set[str]:
    return {plan.namespace(k) for k in range(1, plan.nodes + 1)}


async def cut(plan: NetnsPlan, k: int, net: Network) -> None:
    """Cut node k off ``net``: the host end of its veth goes down (the node sees no carrier)."""
    await rootops.link_down(plan.host_veth(k, net))


async def restore(plan: NetnsPlan, k: int, net: Network) -> None:
    """Undo ``cut``."""
    await rootops.link_up(plan.host_veth(k, net))


def run_sync(make: Callable[[], Awaitable[T]]) -> T:
    """Run ``make()`` to completion from synchronous code, even inside a running event loop
    (in a thread of its own; the root actions take milliseconds)."""

    async def main() -> T:
        return await make()

    with ThreadPoolExecutor(1, thread_name_prefix="netns") as pool:
        return pool.submit(asyncio.run, main()).result()
