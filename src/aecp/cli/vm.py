"""``aecp vm``: create, list, show, power operations, delete and the serial console."""

from __future__ import annotations

from typing import Annotated

import typer

from aecp.cli import console as vmconsole
from aecp.cli.centerclient import CenterClient
from aecp.cli.client import ApiError
from aecp.cli.common import client, done, follow
from aecp.cli.output import Format, NoWaitOpt, OutputOpt, emit, emit_events

app = typer.Typer(help="Virtual machines.", no_args_is_help=True)
COLS = ["name", "state", "node", "vcpus", "memory_mib", "image", "http_url", "message"]


@app.command("create")
def create(
    name: str,
    image: Annotated[str | None, typer.Option(help="image to boot from [default: tiny]")] = None,
    template: Annotated[str | None, typer.Option(help="clone this template (O(1))")] = None,
    vcpus: Annotated[int | None, typer.Option(help="virtual CPUs [default: 1]")] = None,
    memory: Annotated[int | None, typer.Option(help="memory in MiB [default: 256]")] = None,
    node: Annotated[str | None, typer.Option(help="pin to this node")] = None,
    data_disk: Annotated[list[int] | None, typer.Option(help="extra blank disk, MiB")] = None,
    network: Annotated[
        list[str] | None,
        typer.Option(help="a NIC on this VM network (repeatable) [default: user-mode NIC]"),
    ] = None,
    start: Annotated[bool, typer.Option(help="power on once created")] = True,
    no_wait: NoWaitOpt = False,
    output: OutputOpt = Format.TABLE,
) -> None:
    """Create a VM (and start it) on the node with the most free memory."""
    body: dict[str, object] = {"name": name, "node": node, "start": start}
    if template:
        body["template"] = template
    else:
        body["image"] = image or "tiny"
        body["data_disks_mib"] = data_disk or []
    if vcpus is not None:
        body["vcpus"] = vcpus
    if memory is not None:
        body["memory_mib"] = memory
    if network:
        body["networks"] = network
    with client() as c:
        follow(c, c.post("/v1/vms", json=body), no_wait, output)
        if not no_wait and output is Format.TABLE:
            _emit_vm(c.get(f"/v1/vms/{name}"), output)


@app.command("list")
def list_vms(
    cluster: Annotated[
        str | None, typer.Option(help="through an operation center: this cluster's only")
    ] = None,
    output: OutputOpt = Format.TABLE,
) -> None:
    """List VMs with their state and node (through an operation center: of every cluster,
    with a CLUSTER column)."""
    with client(cluster) as c:
        cols = ["cluster", *COLS] if isinstance(c, CenterClient) else COLS
        emit(c.get("/v1/vms"), output, cols)


@app.command("show")
def show(name: str, output: OutputOpt = Format.TABLE) -> None:
    """Show one VM (with each NIC's network, MAC and address)."""
    with client() as c:
        _emit_vm(c.get(f"/v1/vms/{name}"), output)


def _emit_vm(vm: dict[str, object], output: Format) -> None:
    nics = vm.pop("nics", None) if output is Format.TABLE else None
    emit(vm, output)
    if isinstance(nics, list) and nics:
        emit(nics, output, ["network", "mac", "ip"], title="nics")


@app.command("events")
def events(name: str, output: OutputOpt = Format.TABLE) -> None:
    """What controllers decided about one VM (placement, ...), newest first."""
    with client() as c:
        emit_events(c.get(f"/v1/vms/{name}/events"), output, f"events of VM {name}")


def _power(action: str, help_text: str) -> None:
    def command(name: str, no_wait: NoWaitOpt = False, output: OutputOpt = Format.TABLE) -> None:
        with client() as c:
            follow(c, c.post(f"/v1/vms/{name}/actions/{action}"), no_wait, output)

    command.__doc__ = help_text
    app.command(action)(command)


_power("start", "Power a stopped VM on.")
_power("shutdown", "Shut a VM down cleanly (ACPI power button; powered off after a timeout).")
_power("poweroff", "Power a VM off at once (like pulling the plug).")
_power("reboot", "Reboot a running VM cleanly (ACPI shutdown, then reset).")
_power("suspend", "Pause a running VM (its memory is kept).")
_power("resume", "Resume a suspended VM.")


@app.command("delete")
def delete(name: str, no_wait: NoWaitOpt = False, output: OutputOpt = Format.TABLE) -> None:
    """Delete a stopped VM and its disks."""
    with client() as c:
        follow(c, c.delete(f"/v1/vms/{name}"), no_wait, output)


@app.command("console")
def console(
    name: str,
    log: Annotated[
        bool, typer.Option("--log", help="print what the console showed so far")
    ] = False,
) -> None:
    """Attach to a VM's serial console (detach with Ctrl-]), or print its log."""
    with client() as c:
        if log:
            typer.echo(c.get(f"/v1/vms/{name}/console/log"), nl=False)
            return
        if isinstance(c, CenterClient):
            raise ApiError(
                "attaching to a console is not carried by the operation center (--log is): "
                "reach the cluster directly (AECP_API=<its URL> AECP_TOKEN_FILE=<token file>)"
            )
        vm = c.get(f"/v1/vms/{name}")
        if not vm["node"]:
            raise typer.BadParameter(f"VM {name} is not on a node yet", param_hint="NAME")
        node = c.get(f"/v1/nodes/{vm['node']}")
        vmconsole.attach(node["api_url"], name, c.token)


snapshot_app = typer.Typer(
    help="VM snapshots (crash-consistent across disks).", no_args_is_help=True
)
app.add_typer(snapshot_app, name="snapshot")


@snapshot_app.command("create")
def snapshot_create(
    vm: str, name: str, no_wait: NoWaitOpt = False, output: OutputOpt = Format.TABLE
) -> None:
    """Snapshot every disk of a VM at one instant (a running VM is paused for it)."""
    with client() as c:
        follow(c, c.post(f"/v1/vms/{vm}/snapshots", json={"name": name}), no_wait, output)


@snapshot_app.command("list")
def snapshot_list(vm: str, output: OutputOpt = Format.TABLE) -> None:
    """List a VM's snapshots."""
    with client() as c:
        emit(c.get(f"/v1/vms/{vm}/snapshots"), output, ["vm", "name", "created_at"])


@snapshot_app.command("rollback")
def snapshot_rollback(
    vm: str, name: str, no_wait: NoWaitOpt = False, output: OutputOpt = Format.TABLE
) -> None:
    """Return a stopped VM's disks to a snapshot."""
    with client() as c:
        follow(c, c.post(f"/v1/vms/{vm}/snapshots/{name}/rollback"), no_wait, output)


@snapshot_app.command("delete")
def snapshot_delete(vm: str, name: str, output: OutputOpt = Format.TABLE) -> None:
    """Delete a VM snapshot."""
    with client() as c:
        answer = c.delete(f"/v1/vms/{vm}/snapshots/{name}")
        if answer is not None:
            done(c, answer, output)
            return
    emit({"vm": vm, "snapshot": name, "deleted": True}, output)


@app.command("clone")
def clone(
    vm: str,
    new: str,
    start: Annotated[bool, typer.Option(help="power it on")] = True,
    no_wait: NoWaitOpt = False,
    output: OutputOpt = Format.TABLE,
) -> None:
    """Create a VM whose disks are O(1) clones of another VM's."""
    with client() as c:
        follow(
            c, c.post(f"/v1/vms/{vm}/clone", json={"name": new, "start": start}), no_wait, output
        )


@app.command("convert-to-template")
def convert_to_template(
    vm: str,
    template: Annotated[str | None, typer.Option(help="template name [default: the VM's]")] = None,
    no_wait: NoWaitOpt = False,
    output: OutputOpt = Format.TABLE,
) -> None:
    """Turn a stopped VM into a template (the VM is deleted; its disks are kept frozen)."""
    with client() as c:
        body = {"name": template or vm}
        follow(c, c.post(f"/v1/vms/{vm}/convert-to-template", json=body), no_wait, output)
