"""``aecp network``: VM networks (a VLAN and an IPv4 subnet; the cluster hands out the
addresses and every node's DHCP server gives them to the VMs)."""

from __future__ import annotations

from typing import Annotated

import typer

from aecp.cli.centerclient import CenterClient
from aecp.cli.common import client, done
from aecp.cli.output import Format, OutputOpt, emit

app = typer.Typer(help="VM networks (VLAN + subnet, addresses by DHCP).", no_args_is_help=True)
COLS = ["name", "vlan", "subnet", "gateway"]


@app.command("create")
def create(
    name: str,
    vlan: Annotated[int, typer.Option(help="802.1Q VLAN id, 1-4094")],
    subnet: Annotated[str, typer.Option(help="IPv4 subnet, e.g. 10.10.0.0/24")],
    gateway: Annotated[str, typer.Option(help="router address [default: first host]")] = "",
    output: OutputOpt = Format.TABLE,
) -> None:
    """Create a VM network on every node of the cluster."""
    body: dict[str, object] = {"name": name, "vlan": vlan, "subnet": subnet}
    if gateway:
        body["gateway"] = gateway
    with client() as c:
        done(c, c.post("/v1/networks", json=body), output, COLS)


@app.command("list")
def list_networks(output: OutputOpt = Format.TABLE) -> None:
    """List VM networks."""
    with client() as c:
        cols = ["cluster", *COLS] if isinstance(c, CenterClient) else COLS
        emit(c.get("/v1/networks"), output, cols)


@app.command("show")
def show(name: str, output: OutputOpt = Format.TABLE) -> None:
    """Show a network and the addresses handed out in it (to VM NICs and node bridges)."""
    with client() as c:
        net = c.get(f"/v1/networks/{name}")
    if output is Format.JSON:
        emit(net, output)
        return
    addrs = net.pop("addresses", [])
    emit(net, output)
    if addrs:
        emit(addrs, output, ["ip", "holder", "vm", "nic", "node"], title="addresses")


@app.command("delete")
def delete(name: str, output: OutputOpt = Format.TABLE) -> None:
    """Delete a network no VM has a NIC on."""
    with client() as c:
        answer = c.delete(f"/v1/networks/{name}")
        if answer is not None:
            done(c, answer, output)
            return
    emit({"network": name, "deleted": True}, output)
