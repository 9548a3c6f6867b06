"""A VM's NICs on this node: which NICs QEMU gets (``nics_for``, pure) and the taps of the
ones on VM networks (``ensure_taps`` before QEMU starts, ``remove_taps`` once it is gone).

A VM without networks keeps today's single user-mode NIC, its guest's port 80 forwarded to
``node_address:port`` (the loopback lab). A VM on networks gets one tap NIC per network NIC,
in the spec's order, with the spec's MACs; no user-mode NIC.
"""

from __future__ import annotations

import hashlib
import logging

from aecp.compute.hypervisor import NicSpec, PortForward
from aecp.model.vm import VMSpec
from aecp.network import bridges

log = logging.getLogger(__name__)
GUEST_HTTP_PORT = 80


def nics_for(spec: VMSpec, node: str, node_address: str, port: int) -> tuple[NicSpec, ...]:
    """The NICs to launch ``spec``'s QEMU with on node ``node`` (pure)."""
    if not spec.nics:
        fwd = PortForward(node_address, port, GUEST_HTTP_PORT)
        return (NicSpec(mac=user_mac(spec.uuid), forwards=(fwd,)),)
    return tuple(
        NicSpec(mac=nic.mac, tap=bridges.tap_name(spec.uuid, i, node))
        for i, nic in enumerate(spec.nics)
    )


def http_url_for(spec: VMSpec, node_address: str, port: int) -> str:
    """Where the guest's web server is reached: its first network address, or the user-mode
    forward on this node."""
    if spec.nics and spec.nics[0].ip:
        return f"http://{spec.nics[0].ip}/"
    return f"http://{node_address}:{port}/"


def user_mac(uuid: str) -> str:
    """The user-mode NIC's MAC: ``node.vmops.mac_for``'s (kept so a VM's MAC never changes)."""
    h = hashlib.sha256(uuid.encode()).digest()
    return f"52:54:00:{h[0]:02x}:{h[1]:02x}:{h[2]:02x}"


async def ensure_taps(spec: VMSpec, node: str) -> None:
    """Make the tap of each of ``spec``'s network NICs exist on this node, up, on its network's
    bridge (the bridge is created if the network reconciler has not made it yet). Call before
    QEMU starts (it opens the taps by name); idempotent."""
    for i, nic in enumerate(spec.nics):
        tap = bridges.tap_name(spec.uuid, i, node)
        await bridges.ensure_tap(tap, bridges.bridge_name(nic.vlan, node))
    if spec.nics:
        log.info("vm %s: %d taps ready on %s", spec.name, len(spec.nics), node)


async def remove_taps(spec: VMSpec, node: str) -> None:
    """Delete the taps of ``spec``'s network NICs on this node. Call once its QEMU is gone
    (stopped, deleted, migrated away); idempotent."""
    for i in range(len(spec.nics)):
        await bridges.remove_tap(bridges.tap_name(spec.uuid, i, node))
