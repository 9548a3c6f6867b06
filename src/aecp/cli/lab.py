"""``aecp lab``: the all-in-one lab on this machine (no root needed): one cluster, or with
``--clusters N`` an operation center and N clusters in N data centers (``aecp.lab.site``).
``--netns`` (root only) puts each node of one cluster in a network namespace of its own, on a
management and a storage network (``aecp.lab.netns``); ``cut`` and ``restore`` take one network
of one node away and give it back."""

from __future__ import annotations

import asyncio
import contextlib
import os
from pathlib import Path
from typing import Annotated, Any

import typer

from aecp.cli import centerctx, common
from aecp.cli.client import ApiError
from aecp.cli.output import Format, OutputOpt, console, emit, err_console
from aecp.common.errors import AecpError, InvalidInput
from aecp.lab import netns as labnet
from aecp.lab.harness import Lab, LabSpec, default_root
from aecp.lab.site import Site, SiteSpec, create_demo_vm

app = typer.Typer(
    help="The all-in-one lab: N nodes on this machine, or an operation center and N clusters.",
    no_args_is_help=True,
)
RootOpt = Annotated[
    Path | None,
    typer.Option(help="lab directory (default: AECP_LAB_DIR or ~/.local/state/aecp/lab)"),
]
ClusterOpt = Annotated[
    str | None,
    typer.Option("--cluster", help="the cluster (c1, c2...) [default: aecp --cluster, else c1]"),
]
NODE_COLS = ["node", "address", "api", "agent_pid", "etcd", "etcd_pid", "vms_running"]


def _which(cluster: str | None) -> str:
    """The cluster a node command is about: its --cluster, else the root's (aecp --cluster
    or AECP_CLUSTER), else c1; the two named differently is an error."""
    root = common.cluster_option or os.environ.get("AECP_CLUSTER") or None
    if cluster and root and cluster != root:
        raise typer.BadParameter(
            f"{cluster}, but aecp --cluster says {root}", param_hint="--cluster"
        )
    return cluster or root or "c1"


def _say(msg: str) -> None:
    err_console.print(f"[dim]lab:[/dim] {msg}", soft_wrap=True)


@app.command("up")
def up(
    nodes: Annotated[int, typer.Option(help="number of nodes (of each cluster)", min=1, max=9)] = 3,
    clusters: Annotated[
        int,
        typer.Option(
            help="1: one cluster; more: an operation center and N clusters, cluster k in data "
            "center dck on subnet <subnet + k - 1>",
            min=1,
            max=9,
        ),
    ] = 1,
    root: RootOpt = None,
    accel: Annotated[str, typer.Option(help="auto, kvm or tcg")] = "auto",
    node_memory: Annotated[int | None, typer.Option(help="MiB each node offers")] = None,
    subnet: Annotated[str, typer.Option(help="node k listens on <subnet>.k")] = "127.0.1",
    center_address: Annotated[str, typer.Option(help="the center's address")] = "127.0.0.1",
    center_port: Annotated[int, typer.Option(help="the center's port")] = 8800,
    demo: Annotated[bool, typer.Option(help="start VM demo on each cluster")] = False,
    netns: Annotated[
        bool,
        typer.Option(
            "--netns",
            help="root only: each node in a network namespace of its own, with a management "
            "and a storage network (one cluster)",
        ),
    ] = False,
    mgmt_cidr: Annotated[
        str, typer.Option(help="--netns: the management network (node k: host k)")
    ] = "10.231.0.0/24",
    storage_cidr: Annotated[
        str, typer.Option(help="--netns: the storage network (node k: host k)")
    ] = "10.231.1.0/24",
    center: Annotated[
        str,
        typer.Option(
            help="ha: also the operation center as an HA trio (active, passive, witness) in "
            "namespaces of their own, the cluster registered in it (root; implies --netns)"
        ),
    ] = "",
    ha_cidr: Annotated[
        str, typer.Option(help="--center ha: the trio's HA network")
    ] = "10.232.0.0/24",
    output: OutputOpt = Format.TABLE,
) -> None:
    """Start a lab of N nodes (3 etcd members), import the tiny image, print the endpoints.
    With --clusters 2 or more, also start the operation center, register every cluster in it
    and log this CLI in to it as root."""
    from aecp.compute.images.tiny import ensure_tiny_image

    if accel not in ("auto", "kvm", "tcg"):
        raise typer.BadParameter("must be auto, kvm or tcg", param_hint="--accel")
    if center not in ("", "ha"):
        raise typer.BadParameter("must be ha (or left out)", param_hint="--center")
    if center == "ha":
        netns = True
    if netns:
        labnet.require_root()
        if clusters > 1:
            raise typer.BadParameter("the netns lab runs one cluster", param_hint="--clusters")
    _say("making sure the tiny guest image is built")
    image = ensure_tiny_image()
    memory = node_memory or _default_node_memory(nodes * clusters)
    try:
        spec = LabSpec(
            nodes=nodes,
            subnet=subnet,
            accel=accel,
            node_memory_mib=memory,
            netns=netns,
            mgmt_cidr=mgmt_cidr,
            storage_cidr=storage_cidr,
        )
    except ValueError as exc:
        raise typer.BadParameter(str(exc)) from None
    if clusters > 1:
        _site_up(root, spec, clusters, center_address, center_port, demo, output)
        return
    lab = Lab(root or default_root(), spec)
    asyncio.run(lab.up(_say, image=image))
    if demo:
        _say("starting the demo VM")
        asyncio.run(create_demo_vm(lab))
    summary: dict[str, object] = {
        "root": str(lab.root),
        "api": ", ".join(lab.api_urls()),
        "token_file": str(lab.token_file),
        "nodes": nodes,
    }
    if netns:
        summary["storage"] = ", ".join(lab.storage_address(n) for n in lab.node_names)
        summary["namespaces"] = ", ".join(str(lab.namespace(n)) for n in lab.node_names)
    if center == "ha":
        from aecp.cli.labha import trio_up

        summary.update(trio_up(lab, ha_cidr, _say))
    emit(summary, output)


def _site_up(
    root: Path | None,
    spec: LabSpec,
    clusters: int,
    center_address: str,
    center_port: int,
    demo: bool,
    output: Format,
) -> None:
    from aecp.compute.images.tiny import ensure_tiny_image

    try:
        site_spec = SiteSpec(
            clusters=clusters,
            cluster=spec,
            center_address=center_address,
            center_port=center_port,
        )
    except ValueError as exc:
        raise typer.BadParameter(str(exc), param_hint="--clusters") from None
    site = Site(root or default_root(), site_spec)
    existed = Site.exists(site.root) or (site.root / "lab.json").exists()
    try:
        session = asyncio.run(site.up(_say, image=ensure_tiny_image(), demo=demo))
    except AecpError:
        if not existed and Site.exists(site.root):
            _say("not all of it came up: 'aecp lab down' stops what did")
        raise
    path = centerctx.save(session)  # as 'aecp login' keeps it
    _say(f"logged in to the center as root (session kept in {path})")
    status = site.status()
    summary = {
        "root": str(site.root),
        "center": site.center_url,
        "web_console": site.center_url + "/",
        "password_file": str(site.password_file),
        "session_file": str(path),
        "clusters": status["clusters"],
    }
    if output is Format.JSON:
        emit(summary, output)
        return
    emit(
        {k: v for k, v in summary.items() if k != "clusters"},
        output,
        title="operation center",
    )
    emit(status["clusters"], output, ["cluster", "datacenter", "api", "nodes"])
    _print_direct(status["clusters"])


def _print_direct(clusters: list[dict[str, Any]]) -> None:
    """How to reach each cluster without the center."""
    console.print("the CLI's direct cluster mode talks to c1; another cluster directly:")
    for c in clusters[1:]:
        console.print(
            f"  AECP_API={c['api']} AECP_TOKEN_FILE={c['token_file']} aecp node list"
            f"   # {c['cluster']}",
            soft_wrap=True,
        )


def _default_node_memory(nodes: int) -> int:
    from aecp.node.host import meminfo

    return max(512, meminfo()["MemTotal"] // 1024 // nodes)


@app.command("status")
def status(root: RootOpt = None, output: OutputOpt = Format.TABLE) -> None:
    """Show the lab's processes per node (and the center's, in a multi-cluster lab)."""
    root = root or default_root()
    if Site.exists(root):
        got = Site.open(root).status()
        if output is Format.JSON:
            emit(got, output)
            return
        emit(got["center"], output, title="operation center")
        emit(got["nodes"], output, ["cluster", "datacenter", *NODE_COLS])
        _print_direct(got["clusters"])
        return
    lab = Lab.open(root)
    cols = NODE_COLS + (["storage_address", "netns"] if lab.spec.netns else [])
    emit(lab.status(), output, cols)


@app.command("down")
def down(root: RootOpt = None, output: OutputOpt = Format.TABLE) -> None:
    """Stop every process of the lab (center, agents, VMs, etcd) and remove its directory."""
    root = root or default_root()
    if Site.exists(root):
        site = Site.open(root)
        try:
            pids = site.down()
        finally:  # the center is stopped first: its session is of no use even if a cluster
            _forget_session(site.center_url)  # fails to stop
        emit({"stopped_processes": len(pids), "root": str(site.root)}, output)
        return
    from aecp.cli.labha import trio_down

    trio_down(root, _forget_session)
    lab = Lab.open(root)
    pids = lab.down()
    emit({"stopped_processes": len(pids), "root": str(lab.root)}, output)


def _forget_session(url: str) -> None:
    """The CLI's session with the center just stopped is of no use any more."""
    with contextlib.suppress(ApiError):
        if centerctx.load().get("url") == url:
            centerctx.forget()


def _lab(root: Path | None, cluster: str) -> Lab:
    root = root or default_root()
    if Site.exists(root):
        site = Site.open(root)
        site.spec.index(cluster)  # InvalidInput naming the clusters there are
        return site.lab(cluster)
    if cluster != "c1":
        raise InvalidInput("cluster", f"the lab at {root} has one cluster: c1")
    return Lab.open(root)


@app.command("kill-node")
def kill_node(
    name: str, cluster: ClusterOpt = None, root: RootOpt = None, output: OutputOpt = Format.TABLE
) -> None:
    """Simulate a power loss: SIGKILL the node's agent, VMs and etcd member."""
    cluster = _which(cluster)
    pids = _lab(root, cluster).kill_node(name)
    emit({"cluster": cluster, "node": name, "killed_vms": len(pids)}, output)


@app.command("start-node")
def start_node(
    name: str, cluster: ClusterOpt = None, root: RootOpt = None, output: OutputOpt = Format.TABLE
) -> None:
    """Start a killed node again (etcd member, then agent)."""
    cluster = _which(cluster)
    _lab(root, cluster).start_node(name)
    emit({"cluster": cluster, "node": name, "started": True}, output)


NetworkOpt = Annotated[
    str, typer.Option("--network", help="mgmt, storage or vm (the netns lab's networks)")
]


def _network(network: str) -> labnet.Network:
    if network not in labnet.NETWORKS:
        raise typer.BadParameter("must be mgmt, storage or vm", param_hint="--network")
    return network


@app.command("cut")
def cut(
    name: str,
    network: NetworkOpt = "storage",
    root: RootOpt = None,
    output: OutputOpt = Format.TABLE,
) -> None:
    """The netns lab: cut node NAME off one network (its link goes down on the host side)."""
    _set_link(name, network, root, output, up=False)


@app.command("restore")
def restore(
    name: str,
    network: NetworkOpt = "storage",
    root: RootOpt = None,
    output: OutputOpt = Format.TABLE,
) -> None:
    """The netns lab: give node NAME back the network ``cut`` took."""
    _set_link(name, network, root, output, up=True)


def _set_link(name: str, network: str, root: Path | None, output: Format, up: bool) -> None:
    lab = _lab(root, "c1")
    net = _network(network)
    asyncio.run(lab.restore(name, net) if up else lab.cut(name, net))
    emit({"node": name, "network": network, "link": "up" if up else "down"}, output)
