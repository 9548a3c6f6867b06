"""``aecp cluster``: the cluster (``show``: its name and id, through the API) and its
certificate authority — create it, issue node and client credentials, and renew them all
(``rotate-certs``).

The CA commands work on a CA directory on this machine (``--pki-dir``; by default the lab's),
not through the API: the CA's key is never sent anywhere. Running processes pick renewed
credentials up by themselves: etcd on its next connections, AECP's processes within seconds
(``common.tls.Credentials``, ``EtcdStore``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from cryptography import x509

from aecp.cli.common import client
from aecp.cli.output import Format, OutputOpt, emit, iso_time
from aecp.common.errors import NotFound
from aecp.common.pki import LEAF_DAYS, Bundle, ClusterCA, common_name, role_of
from aecp.lab.harness import Lab

app = typer.Typer(help="The cluster: its id, its certificate authority.", no_args_is_help=True)
cert_app = typer.Typer(help="Issue credentials from the cluster CA.", no_args_is_help=True)
app.add_typer(cert_app, name="cert")
PkiOpt = Annotated[
    Path | None, typer.Option("--pki-dir", help="the CA directory (default: the lab's)")
]
DaysOpt = Annotated[int, typer.Option(help="validity in days", min=1, max=3650)]
COLUMNS = ["name", "role", "dir", "expires"]


def _ca(pki_dir: Path | None) -> ClusterCA:
    if pki_dir is not None:
        return ClusterCA(pki_dir)
    try:
        return Lab.open().ca
    except NotFound:
        raise typer.BadParameter(
            "no lab here: name the CA directory", param_hint="--pki-dir"
        ) from None


def _row(bundle: Bundle) -> dict[str, object]:
    cert = x509.load_pem_x509_certificate(bundle.cert_file.read_bytes())
    expires = cert.not_valid_after_utc.timestamp()
    return {
        "name": common_name(cert),
        "role": role_of(cert),
        "dir": str(bundle.dir),
        "expires": iso_time(expires),
        "expires_at": expires,
    }


@app.command("show")
def show(output: OutputOpt = Format.TABLE) -> None:
    """The cluster's name and id, and the version of the node that answers."""
    with client() as c:
        emit(c.get("/v1/cluster"), output)


@app.command("init-ca")
def init_ca(
    cluster: Annotated[str, typer.Option(help="the cluster's name")],
    pki_dir: Annotated[Path, typer.Option("--pki-dir", help="where to create the CA")],
    output: OutputOpt = Format.TABLE,
) -> None:
    """Create the cluster's certificate authority (production bootstrap; the lab makes its
    own). Keep its directory on one trusted machine: it holds the CA's key."""
    ca = ClusterCA.create(pki_dir, cluster)
    emit({"cluster": cluster, "ca_certificate": str(ca.cert_file)}, output)


@cert_app.command("node")
def issue_node(
    name: str,
    address: Annotated[list[str], typer.Option(help="an IP address of the node (repeatable)")],
    pki_dir: PkiOpt = None,
    days: DaysOpt = LEAF_DAYS,
    output: OutputOpt = Format.TABLE,
) -> None:
    """Issue a node's credential (copy its directory to the node; its settings name it as
    security.tls_dir)."""
    emit(_row(_ca(pki_dir).issue_node(name, address, days=days)), output, COLUMNS)


@cert_app.command("client")
def issue_client(
    role: str, pki_dir: PkiOpt = None, days: DaysOpt = LEAF_DAYS, output: OutputOpt = Format.TABLE
) -> None:
    """Issue a client role's credential (for example ``admin``, for tools that talk to etcd)."""
    emit(_row(_ca(pki_dir).issue_client(role, days=days)), output, COLUMNS)


@app.command("rotate-certs")
def rotate_certs(
    pki_dir: PkiOpt = None, days: DaysOpt = LEAF_DAYS, output: OutputOpt = Format.TABLE
) -> None:
    """Renew every credential the CA issued: new keys, new validity, same names and addresses.
    Processes reading them switch on their own (etcd on new connections, AECP's processes
    within seconds); copy a renewed node credential to its node where the CA lives elsewhere
    (the lab's processes read theirs in place). The CA itself is kept."""
    ca = _ca(pki_dir)
    if not ca.exists():
        raise typer.BadParameter(f"no cluster CA in {ca.root}", param_hint="--pki-dir")
    rotated = ca.rotate(days=days)
    rows = [_row(b) for b in rotated]
    if output is Format.JSON:
        emit(rows, output)
        return
    emit(rows, output, COLUMNS, title=f"{len(rows)} credentials renewed")
