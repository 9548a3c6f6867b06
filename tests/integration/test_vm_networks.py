"""VM networks on a real one-node loopback lab (root): a network becomes a bridge and a DHCP
server on the node; a VM on it boots, gets the address the cluster handed out by DHCP, and
serves HTTP there to the lab host; deleting the VM and the network leaves no bridge, tap or
dnsmasq behind.

One node: every node of the loopback lab shares the host's network namespace, where each
node's bridge of a network is its own (``vb<vlan>-<node hash>``) and, without an uplink, joined
to no other. The host reaches the guest through the node's bridge by a /32 route the test adds
(the node's address on the bridge is a /32: it gives the host no route into the subnet)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest
import pytest_asyncio

from aecp.common.proc import arun, kill, pid_alive, read_pidfile
from aecp.compute.images.tiny import NET_MARKER
from aecp.network import bridges
from tests.labkit import LabKit, running_lab, wait_for

pytestmark = [pytest.mark.integration, pytest.mark.asyncio(loop_scope="module")]
VLAN = 3210
SUBNET = "10.213.0.0/24"
NET = "lab-net"


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def kit(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[LabKit]:
    root: Path = tmp_path_factory.mktemp("vmnet") / "lab"
    pidfile = root / "nodes" / "node1" / "data" / "networks" / NET / "dnsmasq.pid"
    dnsmasq = None
    try:
        async with running_lab(root, subnet="127.0.67", nodes=1) as k:
            yield k
            dnsmasq = read_pidfile(pidfile)
    finally:  # once its agent is gone, whatever failed: nothing of the network stays
        if dnsmasq is not None:
            kill(dnsmasq)
        await arun(["ip", "link", "delete", bridges.bridge_name(VLAN, "node1")], check=False)


def _state(kit: LabKit) -> Path:
    return kit.lab.node_settings("node1").data_dir / "networks" / NET


async def test_a_vm_on_a_network_gets_its_address_by_dhcp_and_serves_http_there(
    kit: LabKit,
) -> None:
    bridge = bridges.bridge_name(VLAN, "node1")
    r = await kit.call("POST", "/v1/networks", json={"name": NET, "vlan": VLAN, "subnet": SUBNET})
    assert r.status_code == 201, r.text
    pidfile = _state(kit) / "dnsmasq.pid"

    async def realised() -> bool:
        return bridges.link_exists_here(bridge) and read_pidfile(pidfile) is not None

    await wait_for(realised, f"bridge {bridge} and its DHCP server", timeout=30)
    dnsmasq = read_pidfile(pidfile)
    assert dnsmasq is not None
    node_ip = (await kit.call("GET", f"/v1/networks/{NET}")).json()["addresses"][0]
    assert node_ip == {"ip": "10.213.0.254", "holder": "node", "vm": "", "nic": 0, "node": "node1"}

    op = await kit.create_vm("web", networks=[NET])
    assert op["state"] == "succeeded", op
    vm = await kit.vm("web")
    (nic,) = vm["nics"]
    assert nic["network"] == NET and nic["ip"] == "10.213.0.2"
    await kit.wait_console("web", f"{NET_MARKER} ip={nic['ip']}", timeout=90)

    await arun(["ip", "route", "replace", f"{nic['ip']}/32", "dev", bridge])
    async with httpx.AsyncClient(timeout=5) as http:

        async def page() -> str | None:
            try:
                r = await http.get(f"http://{nic['ip']}/")
            except httpx.TransportError:
                return None
            return r.text if r.status_code == 200 else None

        text = await wait_for(page, f"the guest's web page at {nic['ip']}", timeout=30)
    assert "AECP tiny guest web" in text

    tap = bridges.tap_name(vm["uuid"], 0, vm["node"])
    assert bridges.link_exists_here(tap)
    assert (await kit.action("web", "poweroff"))["state"] == "succeeded"
    r = await kit.call("DELETE", "/v1/networks/" + NET)
    assert r.status_code == 409 and r.json()["vms"] == ["web"], r.text
    r = await kit.call("DELETE", "/v1/vms/web")
    assert r.status_code == 202, r.text
    assert (await kit.wait_op(r.json()["operation"]["id"]))["state"] == "succeeded"

    async def given_back() -> bool:
        addresses = (await kit.call("GET", f"/v1/networks/{NET}")).json()["addresses"]
        return [a["holder"] for a in addresses] == ["node"]

    await wait_for(given_back, "the VM's address given back", timeout=30)

    r = await kit.call("DELETE", "/v1/networks/" + NET)
    assert r.status_code == 204, r.text

    async def gone() -> bool:
        links = bridges.link_exists_here(bridge) or bridges.link_exists_here(tap)
        return not links and not pid_alive(dnsmasq)

    await wait_for(gone, "the bridge, the tap and the DHCP server removed", timeout=30)
    assert not _state(kit).exists()
