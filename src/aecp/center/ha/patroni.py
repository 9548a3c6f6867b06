"""Patroni's configuration for a data node of the trio (a pure function of the topology, the
node, its paths, the secrets and the timing), and the timing itself.

The choices that matter (``docs/design/center-ha.md``):

- ``synchronous_mode: on``, ``synchronous_mode_strict: off``: a commit waits for the passive
  while it streams; a lost passive is dropped from ``/sync`` (with the witness's vote) so the
  active keeps serving, degraded. Only the member named in ``/sync`` may be promoted.
- ``use_pg_rewind`` with data checksums (``initdb -k``) and ``wal_log_hints``: an old active
  comes back as the passive without a new base backup. ``wal_keep_size`` keeps the WAL a rewind
  needs.
- ``maximum_lag_on_failover`` 1 GiB, not 0: Patroni compares the lost leader's last published
  WAL flush position, unacknowledged WAL included, so 0 would block every failover after a bulk
  write; ``/sync`` is what keeps a promotion from losing a commit.
- Timing: Patroni's floor is ``ttl`` 20 s, ``loop_wait`` 1 s, ``retry_timeout`` 3 s. We use the
  floor for ``ttl`` and ``loop_wait`` (a failover after an active's crash comes 19-20 s after
  its last lease renewal), and ``retry_timeout`` 5 s (an isolated active demotes within 6 s of
  its last renewal, well before its lease can expire; ``loop_wait + 2 * retry_timeout <= ttl``).
- Every plane is authenticated: etcd by client certificate, PostgreSQL by SCRAM passwords for
  every host connection (superuser, replication, rewind, the center's own user), Patroni's REST
  API by a password for every unsafe call; all of it on the HA IP only.
"""

from __future__ import annotations

import base64
import json
import os
from collections.abc import Mapping
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

from aecp.center.ha.topology import PATRONI_PORT, PG_PORT, HANode, Topology
from aecp.common.errors import InvalidInput
from aecp.common.pki import write_private

PG_BIN = Path("/usr/lib/postgresql/15/bin")
CENTER_DB = "aecp"
CENTER_USER = "aecp"


@dataclass(frozen=True)
class Timing:
    ttl: int = 20
    loop_wait: int = 1
    retry_timeout: int = 5

    def __post_init__(self) -> None:
        # Patroni raises lower values to these floors: the file must say what runs
        if self.ttl < 20 or self.loop_wait < 1 or self.retry_timeout < 3:
            raise ValueError("Patroni's floors: ttl >= 20, loop_wait >= 1, retry_timeout >= 3")
        if self.loop_wait + 2 * self.retry_timeout > self.ttl:
            raise ValueError("loop_wait + 2 * retry_timeout must not exceed ttl")


@dataclass(frozen=True)
class Secrets:
    """The trio's shared secrets (one file, 0600, the same on every node): six passwords and
    ``box_key``, the Fernet key (urlsafe base64 of 32 random bytes) both data nodes' centers
    seal cluster credentials with (``center/secret.key``; ``center.secrets.SecretBox``)."""

    superuser: str
    replication: str
    rewind: str
    center: str
    restapi: str
    agent: str
    box_key: str

    @classmethod
    def generate(cls) -> Secrets:
        """Seven new, distinct values: six passwords and a Fernet key."""
        import secrets

        passwords = {f.name: secrets.token_urlsafe(24) for f in fields(cls) if f.name != "box_key"}
        return cls(**passwords, box_key=base64.urlsafe_b64encode(os.urandom(32)).decode())

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Secrets:
        """The secrets of a parsed secrets file; ``InvalidInput`` naming the first field that
        is missing or not a string, or a ``box_key`` that is no Fernet key. A file made before
        ``box_key`` existed is refused: add one, the same on the three nodes (a running
        center's ``secret.key``, or a new key: ``deploy/center-ha/README.md`` says how)."""
        values: dict[str, str] = {}
        for f in fields(cls):
            value = data.get(f.name)
            if not isinstance(value, str) or not value:
                why = "is missing" if value is None else "must be a non-empty string"
                extra = (
                    " (the centers' Fernet key, 32 random bytes in urlsafe base64, the same on "
                    "the three nodes)"
                    if f.name == "box_key"
                    else ""
                )
                raise InvalidInput(f.name, f"the trio's secrets file: {f.name} {why}{extra}")
            values[f.name] = value
        if not _is_fernet_key(values["box_key"]):
            raise InvalidInput("box_key", "is not a Fernet key (32 bytes in urlsafe base64)")
        return cls(**values)

    def to_dict(self) -> dict[str, str]:
        return dict(self.__dict__)


def _is_fernet_key(key: str) -> bool:
    try:
        return len(base64.urlsafe_b64decode(key.encode("ascii"))) == 32
    except (ValueError, UnicodeEncodeError):
        return False


@dataclass(frozen=True)
class NodePaths:
    """Where a node keeps its state: ``base`` is node-local (``/var/lib/aecp-center-ha``)."""

    base: Path

    @property
    def tls(self) -> Path:
        return self.base / "tls"

    @property
    def etcd_data(self) -> Path:
        return self.base / "etcd"

    @property
    def run(self) -> Path:
        return self.base / "run"

    @property
    def patroni_config(self) -> Path:
        return self.base / "patroni.json"

    @property
    def pgpass(self) -> Path:
        return self.base / "run" / "pgpass"

    @property
    def logs(self) -> Path:
        return self.base / "log"

    def claim(self, cluster_id: str) -> None:
        """Mark this node's directory as a member of trio ``cluster_id``; ``InvalidInput`` if
        it already belongs to another trio (a node never joins with a different cluster id:
        its etcd and PostgreSQL data are another trio's)."""
        stamp = self.base / "cluster-id"
        try:
            found = stamp.read_text().strip()
        except FileNotFoundError:
            self.base.mkdir(parents=True, exist_ok=True)
            stamp.write_text(cluster_id + "\n")
            return
        if found != cluster_id:
            raise InvalidInput(
                "cluster_id",
                f"{self.base} belongs to trio {found!r}, not {cluster_id!r}: a node joins only "
                "the trio it was made for (wipe it to make it a new node)",
            )


def center_url(topology: Topology, node: HANode, secrets: Secrets) -> str:
    """The SQLAlchemy URL by which ``node``'s center reaches its local PostgreSQL."""
    return f"postgresql+psycopg://{CENTER_USER}:{secrets.center}@{node.ha_ip}:{PG_PORT}/{CENTER_DB}"


def config(
    topology: Topology,
    node: HANode,
    paths: NodePaths,
    secrets: Secrets,
    *,
    timing: Timing = Timing(),
    post_bootstrap: str,
) -> dict[str, Any]:
    """Patroni's configuration document for ``node`` (pure). ``post_bootstrap`` is the command
    Patroni runs once on the first primary (it makes the center's role and database)."""
    assert node.data_dir is not None, "the witness runs no Patroni"
    net = topology.ha_cidr
    return {
        "scope": topology.cluster_id,
        "namespace": "/service/",
        "name": node.name,
        "log": {"level": "INFO", "dir": str(paths.logs / "patroni"), "file_num": 2},
        "restapi": {
            "listen": f"{node.ha_ip}:{PATRONI_PORT}",
            "connect_address": f"{node.ha_ip}:{PATRONI_PORT}",
            "authentication": {"username": "patroni", "password": secrets.restapi},
        },
        "etcd3": {
            "hosts": topology.etcd_endpoints(),
            "protocol": "https",
            "cacert": str(paths.tls / "ca.crt"),
            "cert": str(paths.tls / "node.crt"),
            "key": str(paths.tls / "node.key"),
        },
        "bootstrap": {
            "dcs": {
                "ttl": timing.ttl,
                "loop_wait": timing.loop_wait,
                "retry_timeout": timing.retry_timeout,
                # Not 0: Patroni compares the dead leader's last published WAL *flush*
                # position (which includes WAL no standby acknowledged yet) with the standby's,
                # so with 0 any bulk write in flight at the crash would block every failover,
                # forced ones too. In synchronous mode ``/sync`` is the guarantee: only the
                # member it names, which holds every acknowledged commit, may be promoted.
                "maximum_lag_on_failover": 1024 * 1024 * 1024,  # 1 GiB
                # a returning passive far behind is made synchronous only once it is within
                # 16 MiB: before, every commit would wait for its whole catch-up
                "maximum_lag_on_syncnode": 16 * 1024 * 1024,
                "synchronous_mode": True,
                "synchronous_mode_strict": False,
                "postgresql": {
                    "use_pg_rewind": True,
                    "use_slots": True,
                    "parameters": {
                        "wal_level": "replica",
                        "hot_standby": "on",
                        "wal_log_hints": "on",
                        "wal_keep_size": "512MB",
                        "max_wal_senders": 10,
                        "max_replication_slots": 10,
                        "synchronous_commit": "on",
                        "password_encryption": "scram-sha-256",
                    },
                },
            },
            "initdb": [{"encoding": "UTF8"}, "data-checksums", {"auth-host": "scram-sha-256"}],
            "post_bootstrap": post_bootstrap,
        },
        "postgresql": {
            "listen": f"{node.ha_ip}:{PG_PORT}",
            "connect_address": f"{node.ha_ip}:{PG_PORT}",
            "data_dir": str(node.data_dir),
            "bin_dir": str(PG_BIN),
            "pgpass": str(paths.pgpass),
            "authentication": {
                "superuser": {"username": "postgres", "password": secrets.superuser},
                "replication": {"username": "replicator", "password": secrets.replication},
                "rewind": {"username": "rewinder", "password": secrets.rewind},
            },
            "parameters": {"unix_socket_directories": str(paths.run)},
            # a new standby's copy starts at once, not after a spread checkpoint (minutes)
            "basebackup": [{"checkpoint": "fast"}],
            "pg_hba": [
                "local all postgres peer",
                f"host replication replicator {net} scram-sha-256",
                f"host all all {net} scram-sha-256",
            ],
        },
        "tags": {"nofailover": False, "noloadbalance": False, "clonefrom": False},
    }


def write(path: Path, document: dict[str, Any]) -> None:
    """Write a configuration (JSON, which Patroni reads as YAML) readable by its owner only."""
    write_private(path, json.dumps(document, indent=2).encode())


def write_text(path: Path, text: str) -> None:
    """Write a secret-bearing file readable by its owner only."""
    write_private(path, text.encode())
