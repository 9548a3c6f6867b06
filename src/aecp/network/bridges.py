"""A VM network on one node: its Linux bridge, the VLAN link of the node's uplink enslaved to
it, the node's address on it (for its DHCP server), and the taps of the VMs' NICs. Names are
pure functions (every name at most 15 characters, the kernel's limit); the changes go through
``rootops`` (the one place root actions run).

Naming: the bridge of VLAN ``v`` on node ``n`` is ``vb<v>-<6 hex of n>``. The node's part keeps
the bridges of several nodes apart when they share one network namespace (the loopback lab
runs every node in the host's); on a real host it is constant. The VLAN link is
``<uplink>.<v>`` (or ``vl<v>-<hex>`` when that would be too long); a NIC's tap is
``vt<first 8 hex of the VM uuid>n<index>``.

Ordering (``ensure_bridge``): bridge, up; then the VLAN link, enslaved, up (frames flow to the
other nodes from then on); then the node's address (DHCP can answer from then on).
``remove_bridge`` deletes the VLAN link first, then the bridge (the taps on it go with QEMU).
"""

from __future__ import annotations

import hashlib
import ipaddress
import logging
from pathlib import Path

from aecp.common.errors import InvalidState
from aecp.common.proc import CommandFailed
from aecp.network import rootops

log = logging.getLogger(__name__)
IFNAMSIZ = 15
SYS_NET = Path("/sys/class/net")


def _hex(text: str, n: int) -> str:
    return hashlib.sha256(text.encode()).hexdigest()[:n]


def bridge_name(vlan: int, node: str) -> str:
    """The bridge of VLAN ``vlan`` on node ``node`` (``vb100-1a2b3c``)."""
    return f"vb{vlan}-{_hex(node, 6)}"


def vlan_link_name(uplink: str, vlan: int, node: str) -> str:
    """The VLAN link tagging ``vlan`` on ``uplink`` (``eth1.100``; shortened when too long)."""
    name = f"{uplink}.{vlan}"
    return name if len(name) <= IFNAMSIZ else f"vl{vlan}-{_hex(uplink + node, 6)}"


def tap_name(vm_uuid: str, index: int, node: str) -> str:
    """The tap of NIC ``index`` of the VM ``vm_uuid`` on node ``node`` (``vt0123abc9fn0``):
    during a live migration the VM has a tap on its source and on its destination, which in
    the loopback lab share one network namespace."""
    return f"vt{vm_uuid.replace('-', '')[:7]}{_hex(node, 2)}n{index}"


def link_exists_here(name: str) -> bool:
    """True if link ``name`` exists in this process's network namespace (a read of sysfs)."""
    return (SYS_NET / name).exists()


def links_here(prefix: str) -> list[str]:
    """The links of this network namespace whose name starts with ``prefix``."""
    try:
        return sorted(p.name for p in SYS_NET.iterdir() if p.name.startswith(prefix))
    except OSError:
        return []


async def ensure_bridge(bridge: str, vlan: int, uplink: str, node: str, address: str) -> list[str]:
    """Make ``bridge`` exist and be up, with ``uplink``'s VLAN link ``vlan`` on it (none without
    an uplink) and ``address`` as a /32 (none if empty). Returns what was changed."""
    done: list[str] = []
    if not link_exists_here(bridge):
        await rootops.bridge_add(bridge)
        done.append(f"bridge {bridge} created")
    await rootops.link_up(bridge)
    if uplink and master(uplink) != bridge:
        vl = vlan_link_name(uplink, vlan, node)
        if not link_exists_here(vl) and not await _vlan_link(uplink, vl, vlan):
            done += await _untagged(uplink, bridge)
        else:
            if master(vl) != bridge:
                await rootops.link_set_master(vl, bridge)
                done.append(f"{vl} joined {bridge}")
            await rootops.link_up(vl)
    if address and not await _has_address(bridge, address):
        await rootops.addr_add(bridge, f"{address}/32")
        done.append(f"{bridge} has address {address}")
    return done


async def _vlan_link(uplink: str, link: str, vlan: int) -> bool:
    """Make ``uplink``'s VLAN link; False (nothing made) where the kernel has no 802.1Q."""
    try:
        await rootops.vlan_add(uplink, link, vlan)
    except CommandFailed as exc:
        if "Unknown device type" not in str(exc):
            raise
        return False
    return True


async def _untagged(uplink: str, bridge: str) -> list[str]:
    """Without VLAN support in the kernel (``CONFIG_VLAN_8021Q``, as on the lab's test
    machine) the uplink itself joins the bridge, untagged: it can carry one VM network only."""
    taken = master(uplink)
    if taken:
        raise InvalidState(
            f"this kernel has no VLAN (802.1Q) support and uplink {uplink} already carries the "
            f"network of bridge {taken}: bridge {bridge}'s network stays on this node",
            bridge=bridge,
        )
    log.warning("no VLAN support in this kernel: uplink %s joins %s untagged", uplink, bridge)
    await rootops.link_set_master(uplink, bridge)
    await rootops.link_up(uplink)
    return [f"{uplink} joined {bridge} untagged (no VLAN support in this kernel)"]


async def remove_bridge(bridge: str, vlan: int, uplink: str, node: str) -> None:
    """Delete the VLAN link (if any), then the bridge. Idempotent."""
    if uplink:
        await rootops.link_delete(vlan_link_name(uplink, vlan, node))
    await rootops.link_delete(bridge)


async def ensure_tap(tap: str, bridge: str) -> None:
    """Make tap ``tap`` exist, enslaved to ``bridge`` (created, up, if missing) and up."""
    if not link_exists_here(bridge):
        await rootops.bridge_add(bridge)
        await rootops.link_up(bridge)
    if not link_exists_here(tap):
        await rootops.tap_add(tap)
    if master(tap) != bridge:
        await rootops.link_set_master(tap, bridge)
    await rootops.link_up(tap)


async def remove_tap(tap: str) -> None:
    await rootops.link_delete(tap)


def master(link: str) -> str:
    """The bridge ``link`` is enslaved to ("" if none)."""
    path = SYS_NET / link / "master"
    try:
        return path.resolve().name if path.exists() else ""
    except OSError:
        return ""


async def _has_address(link: str, address: str) -> bool:
    want = ipaddress.IPv4Address(address)
    for name, cidr in await rootops.addr_list():
        if name == link and ipaddress.ip_interface(cidr).ip == want:
            return True
    return False
