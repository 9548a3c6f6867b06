"""``aecp center ha``: the operation center's HA trio — its status, a forced promotion, and the
per-node agent (run by systemd, or by the lab).

Where the trio is: ``--lab-dir`` (a lab trio, default ``<lab dir>/center-ha``) or, on a
production node, ``--topology`` and ``--secrets`` (``deploy/center-ha/README.md``).
"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Annotated, Any

import httpx
import typer

from aecp.center.ha.model import HAStatus, Replication, Role
from aecp.center.ha.patroni import Secrets
from aecp.center.ha.topology import AGENT_PORT, PATRONI_PORT, Topology, load
from aecp.cli.output import Format, OutputOpt, console, emit
from aecp.common.errors import InvalidInput, InvalidState, Unavailable

app = typer.Typer(help="The operation center's HA trio (active, passive, witness).")
LabDirOpt = Annotated[
    Path | None, typer.Option(help="a lab trio's directory [default: <lab dir>/center-ha]")
]
TopologyOpt = Annotated[Path | None, typer.Option(help="production: the trio's topology file")]
SecretsOpt = Annotated[Path | None, typer.Option(help="production: the trio's secrets file")]
MEMBER_COLS = ["name", "role", "now", "replication", "lag", "management_ip", "reachable"]


def _where(
    lab_dir: Path | None, topology: Path | None, secrets: Path | None
) -> tuple[Topology, Secrets, Path | None]:
    """The trio's topology and secrets, and its lab directory if it is a lab trio."""
    if topology is not None or secrets is not None:
        if topology is None or secrets is None:
            raise InvalidInput("topology", "give both --topology and --secrets")
        return load(topology), _secrets(secrets), None
    from aecp.lab.centerha import Trio
    from aecp.lab.harness import default_root

    trio = Trio.open(lab_dir or default_root() / "center-ha")
    return trio.topology(), trio.secrets(), trio.root


def _secrets(path: Path) -> Secrets:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise InvalidInput("secrets", f"cannot read {path}: {e}") from None
    return Secrets.from_dict(data)


async def fetch_status(topology: Topology, secrets: Secrets) -> HAStatus:
    """The trio's status from the first agent that answers (the witness's first: it sees both
    data nodes from outside). ``Unavailable`` if none does."""
    order = sorted(topology.nodes, key=lambda n: n.role is not Role.WITNESS)
    headers = {"Authorization": f"Bearer {secrets.agent}"}
    errors = []
    async with httpx.AsyncClient(trust_env=False) as http:
        for node in order:
            url = f"http://{node.ha_ip}:{AGENT_PORT}/status"
            try:
                r = await http.get(url, headers=headers, timeout=2.0)
            except httpx.HTTPError as e:
                errors.append(f"{node.name}: {type(e).__name__}")
                continue
            if r.status_code == 200:
                return HAStatus.model_validate(r.json())
            errors.append(f"{node.name}: {r.status_code}")
    raise Unavailable("no agent of the trio answers (" + "; ".join(errors) + ")")


def member_rows(status: HAStatus) -> list[dict[str, Any]]:
    rows = []
    for m in status.members:
        if not m.reachable and m.replication in (None, Replication.NOT_REPLICATING):
            now = "down"
        elif m.role is Role.WITNESS:
            now = "witness"
        else:
            now = "active" if m.leader else "passive"
        rows.append(
            {
                "name": m.name,
                "role": str(m.role),
                "now": now,
                "replication": str(m.replication) if m.replication else "-",
                "lag": "-" if m.lag_bytes is None else f"{m.lag_bytes} B",
                "management_ip": "held" if m.holds_management_ip else "-",
                "reachable": "yes" if m.reachable else "no",
            }
        )
    return rows


@app.command("status")
def status(
    lab_dir: LabDirOpt = None,
    topology: TopologyOpt = None,
    secrets: SecretsOpt = None,
    output: OutputOpt = Format.TABLE,
) -> None:
    """Each node's role and replication, the leader's epoch, who holds the management IP, and
    whether a failover now would lose data."""
    topo, sec, _ = _where(lab_dir, topology, secrets)
    st = asyncio.run(fetch_status(topo, sec))
    if output is not Format.TABLE:
        emit(st.model_dump(mode="json"), output)
        return
    holder = ", ".join(st.ip_holders) or "nobody"
    console.print(
        f"trio {st.cluster_id}: active {st.leader or 'none'} (epoch {st.epoch or '-'}), "
        f"management IP {st.management_ip} on {holder}"
    )
    console.print(f"RPO: [bold]{st.rpo.text}[/bold]")
    if st.automatic_failover:
        console.print("automatic failover: on")
    else:
        console.print(f"automatic failover: [bold]off[/bold] ({st.failover_note})")
    emit(member_rows(st), Format.TABLE, MEMBER_COLS)


@app.command("promote")
def promote(
    node: Annotated[str, typer.Argument(help="the passive to make the active")],
    force: Annotated[
        bool,
        typer.Option(
            "--force",
            help="promote without a quorum: only when the active AND the witness are gone",
        ),
    ] = False,
    lab_dir: LabDirOpt = None,
    topology: TopologyOpt = None,
    secrets: SecretsOpt = None,
) -> None:
    """Forced promotion of the passive when the active and the witness are both lost (no
    quorum, so no automatic failover). RISK: if the active is in fact alive and writing (cut
    off, not dead), two actives result and the writes one of them takes are lost when the
    trio is rebuilt. Refused unless --force and the active is unreachable from here."""
    topo, sec, root = _where(lab_dir, topology, secrets)
    target = topo.node(node)
    if target.role is Role.WITNESS:
        raise InvalidInput("node", f"{node} is the witness: it has no database to promote")
    if not force:
        raise InvalidInput(
            "force",
            "a forced promotion can lose data and make two actives if the active is alive; "
            "add --force once you are sure the active is down",
        )
    alive = asyncio.run(_answering(topo, sec, exclude=node))
    if alive:
        raise InvalidState(
            f"{'; '.join(alive)}: a forced promotion is only for when the active and the "
            "witness are both gone (with either alive it could make two actives, and with the "
            "witness alive an automatic failover comes by itself)"
        )
    if root is None:
        raise InvalidState(
            "forced promotion is automated for lab trios only; on production nodes follow "
            "deploy/center-ha/README.md (Forced promotion)"
        )
    from aecp.lab.centerha import Trio

    trio = Trio.open(root)
    k = [n.name for n in topo.nodes].index(node) + 1
    asyncio.run(trio.force_promote(k))
    console.print(
        f"{node}: its etcd member now forms a cluster of one; Patroni promotes it once the old "
        "leader's lease runs out (ttl). Rebuild the other two members before they return."
    )


async def _answering(topology: Topology, secrets: Secrets, exclude: str) -> list[str]:
    """The other members that answer at all (their Patroni or their agent), one phrase each:
    a member that answers, even as a replica, is not gone."""
    found = []
    auth = {"Authorization": f"Bearer {secrets.agent}"}
    async with httpx.AsyncClient(trust_env=False, timeout=2.0) as http:
        for n in topology.nodes:
            if n.name == exclude:
                continue
            urls = [(f"http://{n.ha_ip}:{AGENT_PORT}/local", auth, "its HA agent")]
            if n.role is not Role.WITNESS:
                urls.insert(0, (f"http://{n.ha_ip}:{PATRONI_PORT}/patroni", {}, "its Patroni"))
            for url, headers, what in urls:
                try:
                    await http.get(url, headers=headers)
                except httpx.HTTPError:
                    continue
                found.append(f"{n.name} ({n.role}) answers: {what}")
                break
    return found


@app.command("agent")
def agent(
    topology: Annotated[Path, typer.Option(help="the trio's topology file")],
    node: Annotated[str, typer.Option(help="this node's name")],
    base: Annotated[Path, typer.Option(help="this node's state directory")],
    secrets: Annotated[Path, typer.Option(help="the trio's secrets file")],
) -> None:
    """Run this node's HA agent (the management-IP mover and health monitor)."""
    from aecp.center.ha.agent import main

    main(
        [
            "--topology", str(topology), "--node", node,
            "--base", str(base), "--secrets", str(secrets),
        ]
    )  # fmt: skip


@app.command("secrets")
def secrets_file(
    file: Annotated[Path, typer.Argument(help="where to write the trio's secrets (mode 0600)")],
) -> None:
    """Generate the trio's secrets file, once; copy it to the three nodes."""
    from aecp.center.ha.deploy import main

    raise typer.Exit(main(["secrets", str(file)]))


@app.command("deploy")
def deploy(
    topology: Annotated[Path, typer.Option(help="the trio's topology file")],
    node: Annotated[str, typer.Option(help="this node's name")],
    secrets: Annotated[Path, typer.Option(help="the trio's secrets file")],
    base: Annotated[Path, typer.Option(help="this node's state directory")] = Path(
        "/var/lib/aecp-center-ha"
    ),
    bundle: Annotated[
        Path | None, typer.Option(help="the node's credential directory to install")
    ] = None,
    etcd_state: Annotated[str, typer.Option(help="new, or existing for a returning node")] = "new",
    chown: Annotated[bool, typer.Option(help="set owners (as root)")] = False,
) -> None:
    """Write one node's configuration (Patroni, etcd, agent, center) under BASE for the units
    in deploy/center-ha/systemd; a node of another trio is refused, nothing changed."""
    from aecp.center.ha.deploy import main

    argv = ["node", "--topology", str(topology), "--node", node, "--secrets", str(secrets)]
    argv += ["--base", str(base), "--etcd-state", etcd_state]
    if bundle is not None:
        argv += ["--bundle", str(bundle)]
    if chown:
        argv.append("--chown")
    raise typer.Exit(main(argv))
