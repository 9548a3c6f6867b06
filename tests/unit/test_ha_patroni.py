"""Patroni's configuration is what ``docs/design/center-ha.md`` says: synchronous but not strict,
rewindable (checksums, ``wal_log_hints``), lease timing that demotes an isolated active before
its lease can expire, every listener on the HA IP, no password-less network access, etcd over
TLS with client certificates; the secrets are seven distinct values (six passwords and the
centers' Fernet key), a file without the key is refused naming it, and they land in 0600
files."""

from __future__ import annotations

import base64
import json
import os
import socket
import stat
import types
from pathlib import Path
from typing import Any

import pytest
import yaml

from aecp.center.ha import patroni as pat
from aecp.center.ha.topology import HANode, Topology, parse
from aecp.common.errors import InvalidInput

BASE = Path("/var/lib/aecp-center-ha")
SECRETS = pat.Secrets(
    superuser="su-secret",
    replication="repl-secret",
    rewind="rewind-secret",
    center="center-secret",
    restapi="api-secret",
    agent="agent-secret",
    box_key="Ym94LWtleS1ib3gta2V5LWJveC1rZXktYm94LWtleS0=",
)
POST = "/opt/aecp/venv-ha/bin/python /opt/aecp/bootstrapdb.py /var/lib/aecp-center-ha/secrets.json"


def trio() -> Topology:
    return parse(
        {
            "cluster_id": "aoc-prod",
            "ha_cidr": "10.232.0.0/24",
            "management_ip": "10.233.0.200/24",
            "nodes": [
                {"name": "aoc1", "role": "active", "ha_ip": "10.232.0.1", "data_dir": "/srv/pg"},
                {"name": "aoc2", "role": "passive", "ha_ip": "10.232.0.2", "data_dir": "/srv/pg"},
                {"name": "aoc3", "role": "witness", "ha_ip": "10.232.0.3"},
            ],
        }
    )


def config_of(name: str = "aoc1", timing: pat.Timing | None = None) -> dict[str, Any]:
    t = trio()
    kw: dict[str, Any] = {} if timing is None else {"timing": timing}
    return pat.config(t, t.node(name), pat.NodePaths(BASE), SECRETS, post_bootstrap=POST, **kw)


def dcs(doc: dict[str, Any]) -> dict[str, Any]:
    result: dict[str, Any] = doc["bootstrap"]["dcs"]
    return result


def strings(value: Any) -> list[str]:
    """Every string anywhere in a JSON-like value (keys too)."""
    if isinstance(value, str):
        return [value]
    if isinstance(value, dict):
        return [s for k, v in value.items() for s in [str(k), *strings(v)]]
    if isinstance(value, list):
        return [s for v in value for s in strings(v)]
    return []


# --- identity -----------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["aoc1", "aoc2"])
def test_scope_namespace_and_name(name: str) -> None:
    doc = config_of(name)
    assert (doc["scope"], doc["namespace"], doc["name"]) == ("aoc-prod", "/service/", name)


def test_the_namespace_and_scope_make_the_topologys_leader_key() -> None:
    doc = config_of()
    assert f"{doc['namespace']}{doc['scope']}/leader" == trio().leader_key


def test_the_witness_runs_no_patroni() -> None:
    t = trio()
    with pytest.raises(AssertionError):
        pat.config(t, t.node("aoc3"), pat.NodePaths(BASE), SECRETS, post_bootstrap=POST)


def test_config_is_a_pure_function() -> None:
    assert config_of() == config_of()


def test_the_two_data_nodes_differ_only_in_name_and_addresses() -> None:
    one = json.dumps(config_of("aoc1")).replace('"aoc1"', '"aoc2"')
    for port in (8008, 5432):
        one = one.replace(f"10.232.0.1:{port}", f"10.232.0.2:{port}")
    assert one == json.dumps(config_of("aoc2"))


# --- replication: synchronous, not strict; only the synchronous standby may be promoted --------


def test_synchronous_mode_on_and_strict_off() -> None:
    d = dcs(config_of())
    assert d["synchronous_mode"] is True and d["synchronous_mode_strict"] is False
    assert d["postgresql"]["parameters"]["synchronous_commit"] == "on"


def test_unacknowledged_wal_in_flight_does_not_block_a_failover() -> None:
    """Patroni compares the lost leader's last published flush position (unacknowledged WAL
    included) with the standby's: 0 would block every failover during a bulk write. ``/sync``
    keeps a promotion from losing a commit (synchronous mode, above)."""
    assert dcs(config_of())["maximum_lag_on_failover"] == 1024 * 1024 * 1024


def test_pg_rewind_with_data_checksums_and_wal_log_hints() -> None:
    doc = config_of()
    pg = dcs(doc)["postgresql"]
    assert pg["use_pg_rewind"] is True
    assert pg["parameters"]["wal_log_hints"] == "on"
    assert "data-checksums" in doc["bootstrap"]["initdb"]
    assert pg["parameters"]["wal_keep_size"]  # the WAL a rewind needs is kept
    assert pg["parameters"]["wal_level"] == "replica" and pg["parameters"]["hot_standby"] == "on"


def test_a_rewind_user_is_configured() -> None:
    auth = config_of()["postgresql"]["authentication"]
    assert auth["rewind"] == {"username": "rewinder", "password": "rewind-secret"}


def test_a_new_standby_copies_without_waiting_for_a_spread_checkpoint() -> None:
    assert {"checkpoint": "fast"} in config_of()["postgresql"]["basebackup"]


def test_post_bootstrap_is_the_given_command() -> None:
    assert config_of()["bootstrap"]["post_bootstrap"] == POST


# --- timing -------------------------------------------------------------------------------------


def test_default_timing() -> None:
    d = dcs(config_of())
    assert (d["ttl"], d["loop_wait"], d["retry_timeout"]) == (20, 1, 5)
    assert d["loop_wait"] + 2 * d["retry_timeout"] <= d["ttl"]


def test_the_default_timing_is_at_or_above_patronis_floors() -> None:
    t = pat.Timing()
    assert t.ttl >= 20 and t.loop_wait >= 1 and t.retry_timeout >= 3


def test_a_given_timing_reaches_the_dcs() -> None:
    d = dcs(config_of(timing=pat.Timing(ttl=30, loop_wait=2, retry_timeout=10)))
    assert (d["ttl"], d["loop_wait"], d["retry_timeout"]) == (30, 2, 10)


@pytest.mark.parametrize(
    ("ttl", "loop_wait", "retry_timeout"), [(20, 1, 10), (20, 11, 5), (10, 1, 5), (20, 10, 6)]
)
def test_timing_refuses_loop_wait_plus_two_retries_over_ttl(
    ttl: int, loop_wait: int, retry_timeout: int
) -> None:
    with pytest.raises(ValueError, match="loop_wait"):
        pat.Timing(ttl=ttl, loop_wait=loop_wait, retry_timeout=retry_timeout)


def test_timing_accepts_the_bound_itself() -> None:
    t = pat.Timing(ttl=20, loop_wait=10, retry_timeout=5)
    assert t.loop_wait + 2 * t.retry_timeout == t.ttl


@pytest.mark.parametrize(
    ("ttl", "loop_wait", "retry_timeout"), [(11, 1, 5), (20, 0, 5), (20, 1, 2)]
)
def test_refused_timing_below_patronis_floors(ttl: int, loop_wait: int, retry_timeout: int) -> None:
    """Patroni raises ttl < 20, loop_wait < 1, retry_timeout < 3 to those floors (config.py,
    ``_validate_and_adjust_timeouts``): the timing in the file would not be the one that runs."""
    with pytest.raises(ValueError):
        pat.Timing(ttl=ttl, loop_wait=loop_wait, retry_timeout=retry_timeout)


# --- listeners: the HA IP only ------------------------------------------------------------------


@pytest.mark.parametrize(("name", "ip"), [("aoc1", "10.232.0.1"), ("aoc2", "10.232.0.2")])
def test_every_listener_is_on_the_ha_ip(name: str, ip: str) -> None:
    doc = config_of(name)
    assert doc["restapi"]["listen"] == doc["restapi"]["connect_address"] == f"{ip}:8008"
    assert doc["postgresql"]["listen"] == doc["postgresql"]["connect_address"] == f"{ip}:5432"


def test_no_wildcard_or_loopback_address_anywhere() -> None:
    found = [
        s
        for s in strings(config_of())
        if any(bad in s for bad in ("0.0.0.0", "127.0.0.1", "localhost", "::"))
        or s.split(":")[0] == "*"
    ]
    assert found == []


def test_the_local_socket_lives_in_the_nodes_run_directory() -> None:
    pg = config_of()["postgresql"]
    assert pg["parameters"]["unix_socket_directories"] == str(BASE / "run")
    assert pg["pgpass"] == str(BASE / "run" / "pgpass")


# --- authentication -----------------------------------------------------------------------------


def test_pg_hba_has_no_trust_and_scram_on_every_network_line() -> None:
    hba = config_of()["postgresql"]["pg_hba"]
    assert not any("trust" in line for line in hba)
    network = [line.split() for line in hba if line.split()[0].startswith("host")]
    assert network and all(f[-1] == "scram-sha-256" for f in network)
    assert all(f[0] == "host" and f[3] == "10.232.0.0/24" for f in network)


def test_pg_hba_lets_only_postgres_in_over_the_local_socket_by_peer() -> None:
    local = [line for line in config_of()["postgresql"]["pg_hba"] if line.startswith("local")]
    assert local == ["local all postgres peer"]


def test_pg_hba_allows_replication_only_for_the_replication_user() -> None:
    hba = [line.split() for line in config_of()["postgresql"]["pg_hba"]]
    assert [f[2] for f in hba if f[1] == "replication"] == ["replicator"]


def test_initdb_makes_host_logins_need_a_scram_password() -> None:
    initdb = config_of()["bootstrap"]["initdb"]
    assert {"auth-host": "scram-sha-256"} in initdb
    assert dcs(config_of())["postgresql"]["parameters"]["password_encryption"] == "scram-sha-256"


def test_postgres_users_get_the_secrets() -> None:
    auth = config_of()["postgresql"]["authentication"]
    assert auth["superuser"] == {"username": "postgres", "password": "su-secret"}
    assert auth["replication"] == {"username": "replicator", "password": "repl-secret"}


def test_the_rest_api_needs_the_restapi_secret() -> None:
    assert config_of()["restapi"]["authentication"] == {
        "username": "patroni",
        "password": "api-secret",
    }


def test_etcd_over_https_with_the_nodes_certificate() -> None:
    etcd = config_of()["etcd3"]
    assert etcd["protocol"] == "https"
    assert etcd["hosts"] == ["10.232.0.1:2379", "10.232.0.2:2379", "10.232.0.3:2379"]
    assert (etcd["cacert"], etcd["cert"], etcd["key"]) == (
        str(BASE / "tls" / "ca.crt"),
        str(BASE / "tls" / "node.crt"),
        str(BASE / "tls" / "node.key"),
    )


def test_the_agent_and_center_secrets_are_not_in_patronis_config() -> None:
    text = json.dumps(config_of())
    assert "agent-secret" not in text and "center-secret" not in text
    assert SECRETS.box_key not in text


def test_paths() -> None:
    doc = config_of()
    assert doc["postgresql"]["data_dir"] == "/srv/pg"
    assert doc["postgresql"]["bin_dir"] == "/usr/lib/postgresql/15/bin"
    assert doc["log"]["dir"] == str(BASE / "log" / "patroni")


def test_center_url_reaches_the_local_postgres_on_the_ha_ip() -> None:
    t = trio()
    assert pat.center_url(t, t.node("aoc2"), SECRETS) == (
        "postgresql+psycopg://aecp:center-secret@10.232.0.2:5432/aecp"
    )


# --- Patroni reads it ---------------------------------------------------------------------------


def test_the_json_document_is_the_same_read_as_yaml() -> None:
    """Patroni reads its configuration as YAML; JSON is YAML."""
    doc = config_of()
    assert yaml.safe_load(json.dumps(doc)) == doc


class _NoNetwork:
    """Stands in for ``socket.socket`` in Patroni's validator: etcd "answers", nothing else is
    in use, and no packet is sent."""

    def __init__(self, *args: Any) -> None:
        pass

    def connect_ex(self, address: tuple[str, int]) -> int:
        return 0 if address[1] == 2379 else 111

    def close(self) -> None:
        pass


def test_patronis_own_schema_accepts_it(monkeypatch: pytest.MonkeyPatch) -> None:
    import patroni.validator as validator

    fake = types.SimpleNamespace(
        SOCK_STREAM=socket.SOCK_STREAM,
        AI_PASSIVE=socket.AI_PASSIVE,
        gaierror=socket.gaierror,
        getaddrinfo=lambda host, *a: [(socket.AF_INET, socket.SOCK_STREAM, 6, "", (host, 0))],
        socket=_NoNetwork,
    )
    monkeypatch.setattr(validator, "socket", fake)
    errors = validator.schema(config_of())
    # PostgreSQL 15 itself may be missing where the unit tests run
    assert [e for e in errors if not e.startswith("postgresql.bin_dir")] == []


# --- secrets and files --------------------------------------------------------------------------


def test_secrets_generate_seven_distinct_values() -> None:
    s = pat.Secrets.generate()
    values = list(s.to_dict().values())
    assert len(values) == 7 and len(set(values)) == 7
    passwords = [v for k, v in s.to_dict().items() if k != "box_key"]
    assert all(len(v) >= 32 and v.replace("-", "").replace("_", "").isalnum() for v in passwords)


def test_the_box_key_is_a_fernet_key() -> None:
    import cryptography.fernet as fernet

    key = pat.Secrets.generate().box_key
    assert len(base64.urlsafe_b64decode(key)) == 32
    box = fernet.Fernet(key.encode())
    assert box.decrypt(box.encrypt(b"cluster credential")) == b"cluster credential"


def test_secrets_without_the_box_key_are_refused_naming_it() -> None:
    """A file made before ``box_key`` existed: no silent default (the centers would each make
    their own key and could not open what the other sealed)."""
    old = {k: v for k, v in SECRETS.to_dict().items() if k != "box_key"}
    with pytest.raises(InvalidInput) as e:
        pat.Secrets.from_dict(old)
    assert e.value.fields["field"] == "box_key" and "box_key is missing" in e.value.message
    with pytest.raises(InvalidInput) as e:
        pat.Secrets.from_dict({**old, "box_key": "not-a-key"})
    assert e.value.fields["field"] == "box_key"
    with pytest.raises(InvalidInput) as e:
        pat.Secrets.from_dict({**SECRETS.to_dict(), "agent": 7})
    assert e.value.fields["field"] == "agent"
    assert pat.Secrets.from_dict(SECRETS.to_dict()) == SECRETS


def test_secrets_differ_between_two_trios() -> None:
    a, b = pat.Secrets.generate().to_dict(), pat.Secrets.generate().to_dict()
    assert not set(a.values()) & set(b.values())


def test_secrets_round_trip_through_their_dict() -> None:
    s = pat.Secrets.generate()
    d = s.to_dict()
    assert set(d) == {
        "superuser",
        "replication",
        "rewind",
        "center",
        "restapi",
        "agent",
        "box_key",
    }
    assert pat.Secrets(**json.loads(json.dumps(d))) == s
    assert pat.Secrets.from_dict(json.loads(json.dumps(d))) == s


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_write_makes_a_0600_json_file(tmp_path: Path) -> None:
    path = tmp_path / "patroni.json"
    pat.write(path, config_of())
    assert _mode(path) == 0o600
    assert json.loads(path.read_text()) == config_of()


def test_write_text_makes_a_0600_file(tmp_path: Path) -> None:
    path = tmp_path / "database-url"
    pat.write_text(path, "postgresql+psycopg://aecp:x@10.232.0.1:5432/aecp")
    assert _mode(path) == 0o600 and path.read_text().startswith("postgresql+psycopg://")


def test_write_replaces_the_old_content(tmp_path: Path) -> None:
    path = tmp_path / "patroni.json"
    path.write_text("x" * 100_000)
    os.chmod(path, 0o600)
    pat.write(path, {"scope": "aoc-prod"})
    assert json.loads(path.read_text()) == {"scope": "aoc-prod"}


def test_refused_write_over_a_world_readable_file(tmp_path: Path) -> None:
    """``os.open(..., 0o600)`` sets the mode only when it creates the file: a patroni.json an
    operator made first (umask 022) keeps 0644 and every password in it is world-readable."""
    path = tmp_path / "patroni.json"
    path.write_text("{}")
    os.chmod(path, 0o644)
    pat.write(path, config_of())
    assert _mode(path) == 0o600


def test_node_paths() -> None:
    p = pat.NodePaths(BASE)
    assert (p.tls, p.etcd_data, p.run, p.logs) == (
        BASE / "tls",
        BASE / "etcd",
        BASE / "run",
        BASE / "log",
    )
    assert p.patroni_config == BASE / "patroni.json" and p.pgpass == BASE / "run" / "pgpass"


def test_hanode_type_is_what_config_takes() -> None:
    """A data node built in code (as the lab does) works as well as a parsed one."""
    node = HANode(name="aoc1", role="active", ha_ip="10.232.0.1", data_dir=Path("/srv/pg"))
    doc = pat.config(trio(), node, pat.NodePaths(BASE), SECRETS, post_bootstrap=POST)
    assert doc == config_of("aoc1")


def test_a_node_directory_joins_only_the_trio_it_was_made_for(tmp_path: Path) -> None:
    paths = pat.NodePaths(tmp_path / "node")
    paths.claim("aoc-prod")
    paths.claim("aoc-prod")  # the same trio again: fine
    with pytest.raises(InvalidInput) as e:
        paths.claim("aoc-other")
    assert e.value.fields["field"] == "cluster_id" and "aoc-prod" in e.value.message


def test_a_standby_far_behind_is_not_made_synchronous_until_it_is_near() -> None:
    """Every commit would wait for a returning passive's whole catch-up otherwise."""
    dcs = config_of()["bootstrap"]["dcs"]
    assert 0 < dcs["maximum_lag_on_syncnode"] <= 64 * 1024 * 1024
