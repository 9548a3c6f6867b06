"""What one node of the trio needs on disk in production (``deploy/center-ha/README.md``): a pure
function of the topology, the node's name, its paths and the trio's secrets
(``node_files``, ``layout``), and ``write_node``, which puts it there.

Under the node's base directory (``NodePaths.base``, ``/var/lib/aecp-center-ha``)::

    path                 nodes  mode  owner         read by
    topology.json        all    0644  root          the agent, ``aecp center ha status``
    secrets.json         all    0600  postgres (1)  the agent; Patroni's post_bootstrap
    etcd.env             all    0644  root          aecp-ha-etcd.service (EnvironmentFile=)
    node.env             all    0644  root          aecp-ha-agent.service, aecp-center.service
    patroni.json         data   0600  postgres      aecp-ha-patroni.service
    center/database-url  data   0600  aecp          the center (``--database-url-file``)
    center/agent-token   data   0600  aecp          the center (``--ha-status-token-file``)
    center/secret.key    data   0600  aecp          the center (its ``data_dir/secret.key``)
    tls/                 all    0750  root:aecp-ha  etcd, Patroni, the agent (``install_bundle``)
    etcd/                all    0700  etcd          etcd's data
    run/ log/ log/patroni/  data  0700  postgres    Patroni: pgpass, the socket, its log
    center/              data   0700  aecp          the center's data directory

    (1) root on the witness, which runs no PostgreSQL.

``center/secret.key`` is the trio's ``box_key`` (``Secrets``): the Fernet key the center seals
cluster credentials with. A center in a trio never makes one and refuses to start without it,
and both data nodes' centers must have the same, so the deploy step writes it from the shared
secrets file.

Secrets appear only in the 0600 files: ``etcd.env`` and ``node.env`` hold names, addresses and
paths, never a password. ``etcd.env`` sets, as ``ETCD_*`` variables, exactly the flags that
``aecp.lab.etcd.etcd_argv`` gives a lab member (TLS with client certificates on the client and
the peer URLs, all on the HA IP), with production's log level.

``python -m aecp.center.ha.deploy secrets FILE`` makes the trio's secrets file once;
``python -m aecp.center.ha.deploy node ...`` writes one node's files (``main``).
"""

from __future__ import annotations

import argparse
import json
import os
import secrets as tokens
import shutil
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from aecp.center.ha.model import Role
from aecp.center.ha.patroni import NodePaths, Secrets, center_url, config
from aecp.center.ha.topology import (
    AGENT_PORT,
    ETCD_CLIENT_PORT,
    ETCD_PEER_PORT,
    PATRONI_PORT,
    HANode,
    Topology,
    load,
)
from aecp.common.errors import InvalidInput

BASE = Path("/var/lib/aecp-center-ha")
TOPOLOGY = "topology.json"
SECRETS = "secrets.json"
ETCD_ENV = "etcd.env"
NODE_ENV = "node.env"
PATRONI = "patroni.json"
DATABASE_URL = "center/database-url"
AGENT_TOKEN = "center/agent-token"
SECRET_KEY = "center/secret.key"
CENTER_DIR = "center"
HA_GROUP = "aecp-ha"
"""The group that may read the node's TLS key: etcd, Patroni and the agent (root)."""
CENTER_USER = "aecp"
BOOTSTRAP_SCRIPT = Path(__file__).with_name("bootstrapdb.py")

EtcdState = Literal["new", "existing"]


@dataclass(frozen=True)
class Install:
    """Where the software is on every node: ``aecp`` is the virtual environment holding AECP
    (``bin/aecp``), ``ha_venv`` Patroni's (Debian's python3: Patroni runs as postgres) and
    ``bootstrap_script`` the file Patroni runs once on the first primary (``bootstrapdb.py``
    of this installation)."""

    aecp: Path = Path("/opt/aecp")
    ha_venv: Path = Path("/opt/aecp/venv-ha")
    bootstrap_script: Path = BOOTSTRAP_SCRIPT


@dataclass(frozen=True)
class EtcdSettings:
    """etcd's tuning in production; the fields are ``aecp.lab.etcd.EtcdTuning``'s, the values
    etcd's defaults for a LAN (heartbeat and election) and a small, compacted keyspace."""

    heartbeat_ms: int = 100
    election_ms: int = 1000
    snapshot_count: int = 10_000
    quota_backend_bytes: int = 512 * 1024 * 1024
    compaction_retention_revisions: int = 100_000
    log_level: str = "info"


@dataclass(frozen=True)
class Entry:
    """How one path under the base is owned: ``mode``, ``user`` and ``group``."""

    mode: int
    user: str = "root"
    group: str = "root"


# --- what a node needs (pure) -------------------------------------------------------------------


def post_bootstrap(paths: NodePaths, install: Install = Install()) -> str:
    """Patroni's ``post_bootstrap``: ``bootstrapdb.py`` on Patroni's interpreter with the secrets
    file (Patroni appends the connection URL)."""
    python = install.ha_venv / "bin" / "python"
    return f"{python} {install.bootstrap_script} {paths.base / SECRETS}"


def etcd_env(
    topology: Topology,
    node: HANode,
    paths: NodePaths,
    *,
    state: EtcdState = "new",
    settings: EtcdSettings = EtcdSettings(),
) -> dict[str, str]:
    """The ``ETCD_*`` variables of ``node``'s member: the flags of ``etcd_argv`` by name
    (``--client-cert-auth`` is ``ETCD_CLIENT_CERT_AUTH=true``). ``state`` is ``existing`` for a
    member that joins a running cluster (after ``etcdctl member add``)."""
    client = f"https://{node.ha_ip}:{ETCD_CLIENT_PORT}"
    peer = f"https://{node.ha_ip}:{ETCD_PEER_PORT}"
    ca, cert, key = _tls(paths)
    return {
        "ETCD_NAME": node.name,
        "ETCD_DATA_DIR": str(paths.etcd_data),
        "ETCD_LISTEN_CLIENT_URLS": client,
        "ETCD_ADVERTISE_CLIENT_URLS": client,
        "ETCD_LISTEN_PEER_URLS": peer,
        "ETCD_INITIAL_ADVERTISE_PEER_URLS": peer,
        "ETCD_INITIAL_CLUSTER": topology.initial_cluster(),
        "ETCD_INITIAL_CLUSTER_TOKEN": topology.cluster_id,
        "ETCD_INITIAL_CLUSTER_STATE": state,
        "ETCD_HEARTBEAT_INTERVAL": str(settings.heartbeat_ms),
        "ETCD_ELECTION_TIMEOUT": str(settings.election_ms),
        "ETCD_SNAPSHOT_COUNT": str(settings.snapshot_count),
        "ETCD_QUOTA_BACKEND_BYTES": str(settings.quota_backend_bytes),
        "ETCD_AUTO_COMPACTION_MODE": "revision",
        "ETCD_AUTO_COMPACTION_RETENTION": str(settings.compaction_retention_revisions),
        "ETCD_LOGGER": "zap",
        "ETCD_LOG_LEVEL": settings.log_level,
        "ETCD_CERT_FILE": cert,
        "ETCD_KEY_FILE": key,
        "ETCD_TRUSTED_CA_FILE": ca,
        "ETCD_CLIENT_CERT_AUTH": "true",
        "ETCD_PEER_CERT_FILE": cert,
        "ETCD_PEER_KEY_FILE": key,
        "ETCD_PEER_TRUSTED_CA_FILE": ca,
        "ETCD_PEER_CLIENT_CERT_AUTH": "true",
    }


def node_env(topology: Topology, node: HANode, paths: NodePaths) -> dict[str, str]:
    """The agent's arguments, and on a data node the center's (paths and URLs only: its
    database URL and the agents' secret are in 0600 files it is pointed at)."""
    env = {
        "AECP_HA_TOPOLOGY": str(paths.base / TOPOLOGY),
        "AECP_HA_NODE": node.name,
        "AECP_HA_BASE": str(paths.base),
        "AECP_HA_SECRETS": str(paths.base / SECRETS),
    }
    if node.role is Role.WITNESS:
        return env
    return env | {
        "AECP_HA_CENTER_DATA_DIR": str(paths.base / CENTER_DIR),
        "AECP_HA_DATABASE_URL_FILE": str(paths.base / DATABASE_URL),
        "AECP_HA_PATRONI_URL": f"http://{node.ha_ip}:{PATRONI_PORT}",
        "AECP_HA_MANAGEMENT_IP": topology.management_address,
        "AECP_HA_STATUS_URL": f"http://{node.ha_ip}:{AGENT_PORT}/status",
        "AECP_HA_STATUS_TOKEN_FILE": str(paths.base / AGENT_TOKEN),
    }


def env_file(variables: Mapping[str, str], header: str) -> str:
    """A systemd ``EnvironmentFile=``: ``# header`` lines, then ``NAME=value`` lines. Values are
    names, URLs and paths: refused if one holds a character systemd would read otherwise."""
    lines = [f"# {line}".rstrip() for line in header.splitlines()]
    for name, value in variables.items():
        if any(c in value for c in " \t\n\"'\\$`#;"):
            raise InvalidInput(name, f"{value!r} cannot be written to an environment file")
        lines.append(f"{name}={value}")
    return "\n".join(lines) + "\n"


def node_files(
    topology: Topology,
    name: str,
    paths: NodePaths,
    secrets: Secrets,
    *,
    install: Install = Install(),
    etcd_state: EtcdState = "new",
) -> dict[str, str]:
    """Every file node ``name`` needs, as ``{path relative to paths.base: content}`` (pure;
    ``InvalidInput`` if ``name`` is not a node of the trio). The witness gets no
    ``patroni.json`` and no center files (``center/secret.key`` among them)."""
    node = topology.node(name)
    files = {
        TOPOLOGY: topology.model_dump_json(indent=2) + "\n",
        SECRETS: json.dumps(secrets.to_dict(), indent=2) + "\n",
        ETCD_ENV: env_file(
            etcd_env(topology, node, paths, state=etcd_state),
            f"etcd member {node.name} of trio {topology.cluster_id} (aecp-ha-etcd.service)",
        ),
        NODE_ENV: env_file(
            node_env(topology, node, paths),
            f"{node.role} {node.name} of trio {topology.cluster_id} "
            "(aecp-ha-agent.service, aecp-center.service)",
        ),
    }
    if node.role is Role.WITNESS:
        return files
    document = config(topology, node, paths, secrets, post_bootstrap=post_bootstrap(paths, install))
    return files | {
        PATRONI: json.dumps(document, indent=2) + "\n",
        DATABASE_URL: center_url(topology, node, secrets) + "\n",
        AGENT_TOKEN: secrets.agent + "\n",
        SECRET_KEY: secrets.box_key + "\n",
    }


def layout(topology: Topology, name: str) -> dict[str, Entry]:
    """Mode and owner of every directory (key ending in ``/``) and file under the base of node
    ``name``, parents before children. Secret-bearing files are 0600."""
    node = topology.node(name)
    data = node.role is not Role.WITNESS
    db_owner = "postgres" if data else "root"
    entries = {
        "./": Entry(0o755),
        "tls/": Entry(0o750, group=HA_GROUP),
        "etcd/": Entry(0o700, "etcd", "etcd"),
        TOPOLOGY: Entry(0o644),
        SECRETS: Entry(0o600, db_owner, db_owner),
        ETCD_ENV: Entry(0o644),
        NODE_ENV: Entry(0o644),
    }
    if not data:
        return entries
    postgres = Entry(0o700, "postgres", "postgres")
    center = Entry(0o600, CENTER_USER, CENTER_USER)
    return entries | {
        "run/": postgres,
        "log/": postgres,
        "log/patroni/": postgres,
        f"{CENTER_DIR}/": Entry(0o700, CENTER_USER, CENTER_USER),
        PATRONI: Entry(0o600, "postgres", "postgres"),
        DATABASE_URL: center,
        AGENT_TOKEN: center,
        SECRET_KEY: center,
    }


# --- writing it -----------------------------------------------------------------------------------


def write_node(
    topology: Topology,
    name: str,
    paths: NodePaths,
    secrets: Secrets,
    *,
    install: Install = Install(),
    etcd_state: EtcdState = "new",
    chown: bool = False,
) -> list[Path]:
    """Make node ``name``'s directories and write its files under ``paths.base`` (each file
    replaced atomically, 0600 from its first byte until it has its final mode and owner), and on
    a data node its PostgreSQL data directory (0700, postgres; an existing one is left as it
    is). Owners are set only with ``chown`` (as root, once the users exist: ``InvalidInput``
    names a missing one). Returns the files written."""
    files = node_files(topology, name, paths, secrets, install=install, etcd_state=etcd_state)
    paths.claim(topology.cluster_id)  # another trio's node is refused before anything changes
    entries = layout(topology, name)
    for rel, entry in entries.items():
        if rel.endswith("/"):
            directory = paths.base / rel
            directory.mkdir(parents=True, exist_ok=True)
            os.chmod(directory, entry.mode)
            if chown:
                _chown(directory, entry)
    written = []
    for rel, content in files.items():
        path = paths.base / rel
        _write(path, content, entries[rel], chown=chown)
        written.append(path)
    data_dir = topology.node(name).data_dir
    if data_dir is not None and not data_dir.exists():
        data_dir.mkdir(mode=0o700, parents=True)
        os.chmod(data_dir, 0o700)
        if chown:
            _chown(data_dir, Entry(0o700, "postgres", "postgres"))
    return written


def install_bundle(paths: NodePaths, bundle: Path, *, chown: bool = False) -> None:
    """Copy a node credential (``aecp cluster cert node``: ``ca.crt``, ``tls.crt``,
    ``tls.key``) into ``tls/`` as ``ca.crt``, ``node.crt`` and ``node.key``; the key is readable
    by root and the ``aecp-ha`` group (etcd and Patroni run in it) only. ``InvalidInput`` if a
    file of the credential cannot be read."""
    paths.tls.mkdir(parents=True, exist_ok=True)
    for src, dst, mode in (
        ("ca.crt", "ca.crt", 0o644),
        ("tls.crt", "node.crt", 0o644),
        ("tls.key", "node.key", 0o640),
    ):
        try:
            content = (bundle / src).read_text()
        except OSError as e:
            raise InvalidInput("bundle", f"cannot read {bundle / src}: {e}") from None
        _write(paths.tls / dst, content, Entry(mode, "root", HA_GROUP), chown=chown)


def _write(path: Path, content: str, entry: Entry, *, chown: bool) -> None:
    tmp = path.with_name(f".{path.name}.{tokens.token_hex(4)}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(content)
            f.flush()
            os.fsync(f.fileno())
        if chown:
            _chown(tmp, entry)
        os.chmod(tmp, entry.mode)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _chown(path: Path, entry: Entry) -> None:
    try:
        shutil.chown(path, entry.user, entry.group)
    except LookupError as e:
        raise InvalidInput("owner", f"{entry.user}:{entry.group} for {path}: {e}") from None


def _tls(paths: NodePaths) -> tuple[str, str, str]:
    return (
        str(paths.tls / "ca.crt"),
        str(paths.tls / "node.crt"),
        str(paths.tls / "node.key"),
    )


# --- command line -------------------------------------------------------------------------------


def write_secrets(path: Path) -> Secrets:
    """Generate the trio's secrets into a new 0600 file (``InvalidInput`` if it exists: the
    three nodes must share one set)."""
    if path.exists():
        raise InvalidInput("secrets", f"{path} exists: the trio's secrets are made once")
    made = Secrets.generate()
    _write(path, json.dumps(made.to_dict(), indent=2) + "\n", Entry(0o600), chown=False)
    return made


def read_secrets(path: Path) -> Secrets:
    """The trio's secrets in ``path``; ``InvalidInput`` if the file cannot be read or parsed,
    or naming the field that is missing or wrong (a file made before ``box_key`` existed is
    refused so: ``Secrets.from_dict`` says how to add it)."""
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise InvalidInput("secrets", f"cannot read the secrets in {path}: {e!r}") from None
    if not isinstance(data, dict):
        raise InvalidInput("secrets", f"{path} does not hold a JSON object")
    try:
        return Secrets.from_dict(data)
    except InvalidInput as e:
        raise InvalidInput(e.fields["field"], f"{path}: {e.fields['reason']}") from None


def main(argv: list[str] | None = None) -> int:
    """``secrets FILE`` | ``node --topology T --node N --secrets S [--base B] [--bundle DIR]
    [--etcd-state new|existing] [--chown]``."""
    parser = argparse.ArgumentParser(prog="python -m aecp.center.ha.deploy")
    sub = parser.add_subparsers(dest="command", required=True)
    make = sub.add_parser("secrets", help="generate the trio's secrets file (once)")
    make.add_argument("file", type=Path)
    node = sub.add_parser("node", help="write one node's configuration under its base")
    node.add_argument("--topology", type=Path, required=True)
    node.add_argument("--node", required=True)
    node.add_argument("--secrets", type=Path, required=True)
    node.add_argument("--base", type=Path, default=BASE)
    node.add_argument("--bundle", type=Path, help="the node's credential directory to install")
    node.add_argument("--etcd-state", choices=["new", "existing"], default="new")
    node.add_argument("--chown", action="store_true", help="set owners (as root)")
    args = parser.parse_args(argv)
    try:
        if args.command == "secrets":
            write_secrets(args.file)
            print(f"{args.file}: the trio's secrets (copy it to the three nodes)")
            return 0
        topology = load(args.topology)
        paths = NodePaths(args.base)
        secrets = read_secrets(args.secrets)
        written = write_node(
            topology,
            args.node,
            paths,
            secrets,
            etcd_state=args.etcd_state,
            chown=args.chown,
        )
        if args.bundle is not None:
            install_bundle(paths, args.bundle, chown=args.chown)
    except InvalidInput as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    for path in written:
        print(path)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
