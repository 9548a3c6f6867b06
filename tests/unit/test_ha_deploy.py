"""The production layout: ``deploy.node_files`` gives each node what its role needs (the witness
no Patroni or center files; a data node the center's ``secret.key``, the trio's ``box_key``),
``etcd.env`` is the lab's etcd command line as ``ETCD_*`` variables and holds no secret,
``write_node`` writes secrets 0600, a secrets file without ``box_key`` is refused naming it, the
center's role is made from a SCRAM verifier (RFC 7677's vector), and the example topology and
the systemd units in ``deploy/center-ha/`` agree with the code."""

from __future__ import annotations

import ast
import base64
import hashlib
import hmac
import json
import re
import stat
import sys
import types
from dataclasses import asdict, fields
from pathlib import Path
from typing import Any

import pytest

from aecp.center.ha import bootstrapdb, deploy
from aecp.center.ha import patroni as pat
from aecp.center.ha.model import Role
from aecp.center.ha.topology import Topology, load, parse
from aecp.center.settings import CenterHA
from aecp.common.errors import InvalidInput
from aecp.common.pki import Bundle
from aecp.lab.etcd import EtcdMember, EtcdTuning, etcd_argv

REPO = Path(__file__).resolve().parents[2]
DEPLOY = REPO / "deploy" / "center-ha"
EXAMPLE = DEPLOY / "topology.example.json"
UNITS = DEPLOY / "systemd"
SECRETS = pat.Secrets(
    superuser="su-Secret-1",
    replication="repl-Secret-2",
    rewind="rewind-Secret-3",
    center="center-Secret-4",
    restapi="api-Secret-5",
    agent="agent-Secret-6",
    box_key="Ym94LWtleS1ib3gta2V5LWJveC1rZXktYm94LWtleS0=",
)
DATA_FILES = {
    "topology.json",
    "secrets.json",
    "etcd.env",
    "node.env",
    "patroni.json",
    "center/database-url",
    "center/agent-token",
    "center/secret.key",
}
WITNESS_FILES = {"topology.json", "secrets.json", "etcd.env", "node.env"}


def trio(data_dir: Path = Path("/var/lib/aecp-center-ha/pg")) -> Topology:
    doc = json.loads(EXAMPLE.read_text())
    for node in doc["nodes"]:
        if "data_dir" in node:
            node["data_dir"] = str(data_dir)
    return parse(doc)


PATHS = pat.NodePaths(deploy.BASE)


def files_of(name: str, **kw: Any) -> dict[str, str]:
    return deploy.node_files(trio(), name, PATHS, SECRETS, **kw)


def read_env(text: str) -> dict[str, str]:
    """An ``EnvironmentFile=`` as systemd reads these (comments, ``NAME=value``)."""
    out = {}
    for line in text.splitlines():
        if line.strip() and not line.startswith("#"):
            name, _, value = line.partition("=")
            out[name] = value
    return out


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


# --- the example topology -----------------------------------------------------------------------


def test_the_example_topology_loads() -> None:
    t = load(EXAMPLE)
    assert [(n.name, n.role) for n in t.nodes] == [
        ("aoc1", Role.ACTIVE),
        ("aoc2", Role.PASSIVE),
        ("aoc3", Role.WITNESS),
    ]
    assert all(str(n.data_dir).startswith(str(deploy.BASE)) for n in t.data_nodes)


# --- which files which node gets ----------------------------------------------------------------


@pytest.mark.parametrize("name", ["aoc1", "aoc2"])
def test_a_data_node_gets_patroni_and_center_files(name: str) -> None:
    assert set(files_of(name)) == DATA_FILES


def test_the_witness_gets_no_patroni_json_and_no_center_files() -> None:
    assert set(files_of("aoc3")) == WITNESS_FILES


def test_a_node_outside_the_trio_is_refused() -> None:
    with pytest.raises(InvalidInput) as e:
        files_of("aoc9")
    assert e.value.fields["field"] == "node"


def test_node_files_is_pure() -> None:
    assert files_of("aoc1") == files_of("aoc1")


def test_every_file_has_a_layout_entry_and_secrets_are_0600() -> None:
    for name in ("aoc1", "aoc2", "aoc3"):
        entries = deploy.layout(trio(), name)
        files = files_of(name)
        assert set(files) <= set(entries)
        for rel, content in files.items():
            secret = any(v in content for v in SECRETS.to_dict().values())
            assert (entries[rel].mode == 0o600) == secret, rel


def test_the_topology_and_secrets_files_read_back() -> None:
    files = files_of("aoc3")
    assert parse(json.loads(files["topology.json"])) == trio()
    assert pat.Secrets(**json.loads(files["secrets.json"])) == SECRETS


# --- patroni.json -------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["aoc1", "aoc2"])
def test_patroni_json_is_patroni_config(name: str) -> None:
    t = trio()
    expected = pat.config(
        t, t.node(name), PATHS, SECRETS, post_bootstrap=deploy.post_bootstrap(PATHS)
    )
    assert json.loads(files_of(name)["patroni.json"]) == expected


def test_post_bootstrap_runs_the_installed_bootstrapdb_on_patronis_python() -> None:
    command = deploy.post_bootstrap(PATHS).split()
    assert command[0] == "/opt/aecp/venv-ha/bin/python"
    assert Path(command[1]).name == "bootstrapdb.py" and Path(command[1]).is_file()
    assert command[2:] == ["/var/lib/aecp-center-ha/secrets.json"]


def test_post_bootstrap_follows_the_install() -> None:
    install = deploy.Install(ha_venv=Path("/srv/ha"), bootstrap_script=Path("/srv/b.py"))
    assert deploy.post_bootstrap(PATHS, install) == (
        "/srv/ha/bin/python /srv/b.py /var/lib/aecp-center-ha/secrets.json"
    )


def test_the_center_files() -> None:
    files = files_of("aoc2")
    assert files["center/database-url"].strip() == (
        "postgresql+psycopg://aecp:center-Secret-4@10.232.0.2:5432/aecp"
    )
    assert files["center/agent-token"].strip() == "agent-Secret-6"


@pytest.mark.parametrize("name", ["aoc1", "aoc2"])
def test_both_data_nodes_get_the_trios_box_key_as_the_centers_secret_key(name: str) -> None:
    """The center in a trio refuses to start without ``data_dir/secret.key`` and both need the
    same: the deploy step writes it from the shared secrets, readable by the center only."""
    assert files_of(name)["center/secret.key"] == SECRETS.box_key + "\n"
    entry = deploy.layout(trio(), name)["center/secret.key"]
    assert entry == deploy.Entry(0o600, deploy.CENTER_USER, deploy.CENTER_USER)
    assert deploy.layout(trio(), name)["center/"].user == entry.user


def test_the_box_key_is_in_no_file_but_the_secrets_and_the_centers_key() -> None:
    for name in ("aoc1", "aoc2", "aoc3"):
        holders = {rel for rel, content in files_of(name).items() if SECRETS.box_key in content}
        want = {"secrets.json"} if name == "aoc3" else {"secrets.json", "center/secret.key"}
        assert holders == want, name


def test_the_centers_secret_key_opens_with_the_centers_secret_box(tmp_path: Path) -> None:
    from aecp.center.secrets import SecretBox

    t = trio(tmp_path / "pg")
    sealed = ""
    for name in ("aoc1", "aoc2"):
        paths = pat.NodePaths(tmp_path / name)
        deploy.write_node(t, name, paths, SECRETS)
        box = SecretBox.at(paths.base / "center" / "secret.key")
        sealed = sealed or box.seal("cluster credential")
        assert box.open(sealed) == "cluster credential"  # what one sealed, the other opens


# --- etcd.env -----------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["aoc1", "aoc2", "aoc3"])
def test_etcd_env_names_the_three_members(name: str) -> None:
    env = read_env(files_of(name)["etcd.env"])
    assert env["ETCD_NAME"] == name
    assert env["ETCD_INITIAL_CLUSTER"] == (
        "aoc1=https://10.232.0.1:2380,aoc2=https://10.232.0.2:2380,aoc3=https://10.232.0.3:2380"
    )
    assert env["ETCD_INITIAL_CLUSTER_TOKEN"] == "aoc-prod"
    assert env["ETCD_INITIAL_CLUSTER_STATE"] == "new"


def test_etcd_env_is_tls_with_client_certificates_on_the_ha_ip() -> None:
    env = read_env(files_of("aoc3")["etcd.env"])
    assert env["ETCD_LISTEN_CLIENT_URLS"] == env["ETCD_ADVERTISE_CLIENT_URLS"]
    assert env["ETCD_LISTEN_CLIENT_URLS"] == "https://10.232.0.3:2379"
    assert env["ETCD_LISTEN_PEER_URLS"] == env["ETCD_INITIAL_ADVERTISE_PEER_URLS"]
    assert env["ETCD_LISTEN_PEER_URLS"] == "https://10.232.0.3:2380"
    assert env["ETCD_CLIENT_CERT_AUTH"] == env["ETCD_PEER_CLIENT_CERT_AUTH"] == "true"
    tls = "/var/lib/aecp-center-ha/tls"
    for prefix in ("ETCD_", "ETCD_PEER_"):
        assert env[f"{prefix}CERT_FILE"] == f"{tls}/node.crt"
        assert env[f"{prefix}KEY_FILE"] == f"{tls}/node.key"
        assert env[f"{prefix}TRUSTED_CA_FILE"] == f"{tls}/ca.crt"
    assert env["ETCD_DATA_DIR"] == "/var/lib/aecp-center-ha/etcd"


def _argv_as_env(argv: list[str]) -> dict[str, str]:
    """etcd's rule: ``--some-flag value`` is ``ETCD_SOME_FLAG=value``, a bare flag ``=true``."""
    env: dict[str, str] = {}
    flags = argv[1:]
    i = 0
    while i < len(flags):
        name = "ETCD_" + flags[i].removeprefix("--").replace("-", "_").upper()
        if i + 1 < len(flags) and not flags[i + 1].startswith("--"):
            env[name] = flags[i + 1]
            i += 2
        else:
            env[name] = "true"
            i += 1
    return env


@pytest.mark.parametrize("name", ["aoc1", "aoc3"])
def test_etcd_env_is_the_labs_etcd_command_line(name: str) -> None:
    """The same flags and values as ``aecp.lab.etcd.etcd_argv`` for the same member and tuning;
    only the certificate files are named as the node's ``tls/`` has them."""
    t = trio()
    node = t.node(name)
    tuning = EtcdTuning(**asdict(deploy.EtcdSettings()))
    member = EtcdMember(
        node.name,
        f"{node.ha_ip}:2379",
        f"{node.ha_ip}:2380",
        PATHS.etcd_data,
        Bundle(PATHS.tls),
        tuning=tuning,
    )
    argv = etcd_argv(
        member, initial_cluster=t.initial_cluster(), token=t.cluster_id, state="new", tuning=tuning
    )
    lab = {
        k: v.replace("/tls.crt", "/node.crt").replace("/tls.key", "/node.key")
        for k, v in _argv_as_env(argv).items()
    }
    assert read_env(files_of(name)["etcd.env"]) == lab


def test_etcd_settings_have_the_lab_tunings_fields() -> None:
    assert [f.name for f in fields(deploy.EtcdSettings)] == [f.name for f in fields(EtcdTuning)]


def test_a_rejoining_member_starts_existing() -> None:
    env = read_env(files_of("aoc1", etcd_state="existing")["etcd.env"])
    assert env["ETCD_INITIAL_CLUSTER_STATE"] == "existing"


@pytest.mark.parametrize("name", ["aoc1", "aoc2", "aoc3"])
def test_no_secret_in_the_environment_files(name: str) -> None:
    files = files_of(name)
    for env_file in ("etcd.env", "node.env"):
        for value in SECRETS.to_dict().values():
            assert value not in files[env_file]


def test_an_env_value_systemd_would_misread_is_refused() -> None:
    with pytest.raises(InvalidInput) as e:
        deploy.env_file({"AECP_HA_BASE": "/var/lib/aecp center"}, "x")
    assert e.value.fields["field"] == "AECP_HA_BASE"


# --- node.env -----------------------------------------------------------------------------------


def test_the_witness_node_env_has_the_agents_arguments_only() -> None:
    assert read_env(files_of("aoc3")["node.env"]) == {
        "AECP_HA_TOPOLOGY": "/var/lib/aecp-center-ha/topology.json",
        "AECP_HA_NODE": "aoc3",
        "AECP_HA_BASE": "/var/lib/aecp-center-ha",
        "AECP_HA_SECRETS": "/var/lib/aecp-center-ha/secrets.json",
    }


def test_a_data_node_env_configures_a_valid_ha_center() -> None:
    env = read_env(files_of("aoc1")["node.env"])
    assert env["AECP_HA_NODE"] == "aoc1"
    ha = CenterHA(
        patroni_url=env["AECP_HA_PATRONI_URL"],
        management_ip=env["AECP_HA_MANAGEMENT_IP"],
        status_url=env["AECP_HA_STATUS_URL"],
    )
    assert ha.patroni_url == "http://10.232.0.1:8008"
    assert ha.status_url == "http://10.232.0.1:8009/status"
    assert ha.management_ip == "10.233.0.200"
    assert env["AECP_HA_DATABASE_URL_FILE"] == "/var/lib/aecp-center-ha/center/database-url"
    assert env["AECP_HA_STATUS_TOKEN_FILE"] == "/var/lib/aecp-center-ha/center/agent-token"
    assert env["AECP_HA_CENTER_DATA_DIR"] == "/var/lib/aecp-center-ha/center"


# --- write_node ---------------------------------------------------------------------------------


def test_write_node_writes_a_data_node(tmp_path: Path) -> None:
    t = trio(tmp_path / "pg")
    paths = pat.NodePaths(tmp_path / "base")
    written = deploy.write_node(t, "aoc1", paths, SECRETS)
    files = deploy.node_files(t, "aoc1", paths, SECRETS)
    assert {str(p.relative_to(paths.base)) for p in written} == DATA_FILES
    for rel, content in files.items():
        assert (paths.base / rel).read_text() == content
    for rel in (
        "secrets.json",
        "patroni.json",
        "center/database-url",
        "center/agent-token",
        "center/secret.key",
    ):
        assert mode(paths.base / rel) == 0o600, rel
    for rel in ("topology.json", "etcd.env", "node.env"):
        assert mode(paths.base / rel) == 0o644, rel
    for rel, want in (("tls", 0o750), ("etcd", 0o700), ("run", 0o700), ("center", 0o700)):
        assert mode(paths.base / rel) == want, rel
    assert mode(tmp_path / "pg") == 0o700
    assert not list(paths.base.rglob(".*"))  # no temporary file left behind


def test_write_node_on_the_witness_writes_no_patroni_json(tmp_path: Path) -> None:
    paths = pat.NodePaths(tmp_path / "base")
    deploy.write_node(trio(tmp_path / "pg"), "aoc3", paths, SECRETS)
    assert not (paths.base / "patroni.json").exists()
    assert not (paths.base / "center").exists() and not (tmp_path / "pg").exists()
    assert mode(paths.base / "secrets.json") == 0o600
    assert (paths.base / "etcd.env").exists() and (paths.base / "etcd").is_dir()


def test_write_node_makes_a_world_readable_secret_file_0600(tmp_path: Path) -> None:
    paths = pat.NodePaths(tmp_path / "base")
    paths.base.mkdir()
    (paths.base / "secrets.json").write_text("{}")
    (paths.base / "secrets.json").chmod(0o644)
    deploy.write_node(trio(tmp_path / "pg"), "aoc3", paths, SECRETS)
    assert mode(paths.base / "secrets.json") == 0o600
    assert json.loads((paths.base / "secrets.json").read_text())["agent"] == "agent-Secret-6"


def test_write_node_leaves_an_existing_data_dir_as_it_is(tmp_path: Path) -> None:
    data = tmp_path / "pg"
    data.mkdir(mode=0o700)
    (data / "PG_VERSION").write_text("15\n")
    deploy.write_node(trio(data), "aoc2", pat.NodePaths(tmp_path / "base"), SECRETS)
    assert (data / "PG_VERSION").read_text() == "15\n"


def test_write_node_sets_owners_only_when_asked(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls: dict[str, tuple[str, str]] = {}

    def chown(path: Path, user: str, group: str) -> None:
        calls[Path(path).name] = (user, group)

    monkeypatch.setattr(deploy.shutil, "chown", chown)
    paths = pat.NodePaths(tmp_path / "base")
    deploy.write_node(trio(tmp_path / "pg"), "aoc1", paths, SECRETS)
    assert calls == {}
    deploy.write_node(trio(tmp_path / "pg"), "aoc1", paths, SECRETS, chown=True)
    # a file is owned while it is still its temporary ".<name>.<hex>", before its rename
    owners = {n[1:].rsplit(".", 1)[0] if n.startswith(".") else n: o for n, o in calls.items()}
    assert owners["patroni.json"] == ("postgres", "postgres")
    assert owners["secrets.json"] == ("postgres", "postgres")
    assert owners["database-url"] == owners["agent-token"] == ("aecp", "aecp")
    assert owners["secret.key"] == owners["center"] == ("aecp", "aecp")
    assert owners["etcd"] == ("etcd", "etcd") and owners["tls"] == ("root", "aecp-ha")
    assert owners["etcd.env"] == ("root", "root")


def test_write_node_names_a_missing_user(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def chown(path: Path, user: str, group: str) -> None:
        raise LookupError(f"no such user: {user!r}")

    monkeypatch.setattr(deploy.shutil, "chown", chown)
    with pytest.raises(InvalidInput) as e:
        deploy.write_node(trio(), "aoc3", pat.NodePaths(tmp_path), SECRETS, chown=True)
    assert e.value.fields["field"] == "owner"


def test_install_bundle_renames_and_protects_the_key(tmp_path: Path) -> None:
    bundle = tmp_path / "aoc1"
    bundle.mkdir()
    for name in ("ca.crt", "tls.crt", "tls.key"):
        (bundle / name).write_text(f"--- {name} ---\n")
    paths = pat.NodePaths(tmp_path / "base")
    deploy.install_bundle(paths, bundle)
    assert (paths.tls / "node.key").read_text() == "--- tls.key ---\n"
    assert (paths.tls / "node.crt").read_text() == "--- tls.crt ---\n"
    assert mode(paths.tls / "node.key") == 0o640 and mode(paths.tls / "ca.crt") == 0o644


def test_install_bundle_of_an_incomplete_credential(tmp_path: Path) -> None:
    with pytest.raises(InvalidInput) as e:
        deploy.install_bundle(pat.NodePaths(tmp_path / "base"), tmp_path / "missing")
    assert e.value.fields["field"] == "bundle"


# --- the command line ---------------------------------------------------------------------------


def test_main_makes_secrets_once_and_writes_a_node(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    secrets = tmp_path / "secrets.json"
    assert deploy.main(["secrets", str(secrets)]) == 0
    assert mode(secrets) == 0o600 and len(set(json.loads(secrets.read_text()).values())) == 7
    assert deploy.main(["secrets", str(secrets)]) == 2  # never overwritten
    base = tmp_path / "base"
    argv = ["node", "--topology", str(EXAMPLE), "--node", "aoc3", "--secrets", str(secrets)]
    assert deploy.main([*argv, "--base", str(base)]) == 0
    assert (base / "secrets.json").read_text() == secrets.read_text()
    capsys.readouterr()
    assert deploy.main([*argv[:4], "aoc9", *argv[5:], "--base", str(base)]) == 2
    assert "aoc9" in capsys.readouterr().err


def test_main_refuses_a_secrets_file_without_every_secret(tmp_path: Path) -> None:
    secrets = tmp_path / "secrets.json"
    secrets.write_text(json.dumps({"agent": "x"}))
    argv = ["node", "--topology", str(EXAMPLE), "--node", "aoc3", "--secrets", str(secrets)]
    assert deploy.main([*argv, "--base", str(tmp_path / "base")]) == 2


def test_a_secrets_file_from_before_the_box_key_is_refused_naming_it(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    secrets = tmp_path / "secrets.json"
    secrets.write_text(json.dumps({k: v for k, v in SECRETS.to_dict().items() if k != "box_key"}))
    with pytest.raises(InvalidInput) as e:
        deploy.read_secrets(secrets)
    assert e.value.fields["field"] == "box_key" and str(secrets) in e.value.message
    argv = ["node", "--topology", str(EXAMPLE), "--node", "aoc1", "--secrets", str(secrets)]
    assert deploy.main([*argv, "--base", str(tmp_path / "base")]) == 2
    assert "box_key is missing" in capsys.readouterr().err
    assert not (tmp_path / "base").exists()  # nothing written
    secrets.write_text("[]")
    with pytest.raises(InvalidInput) as e:
        deploy.read_secrets(secrets)
    assert e.value.fields["field"] == "secrets"


# --- the center's role: a SCRAM verifier, never the password -------------------------------------


def test_the_scram_verifier_matches_rfc_7677s_example() -> None:
    """RFC 7677, section 3: user ``user``, password ``pencil``, this salt, 4096 iterations. The
    server's signature there is HMAC(ServerKey, AuthMessage); the client's proof XOR
    HMAC(StoredKey, AuthMessage) is the ClientKey, whose SHA-256 is the StoredKey."""
    salt = base64.b64decode("W22ZaJ0SNY7soEsUEjb6gQ==")
    verifier = bootstrapdb.scram_verifier("pencil", salt, 4096)
    match = re.fullmatch(r"SCRAM-SHA-256\$4096:([^$]+)\$([^:]+):(.+)", verifier)
    assert match is not None, verifier
    assert base64.b64decode(match[1]) == salt
    stored_key, server_key = base64.b64decode(match[2]), base64.b64decode(match[3])
    nonce = "rOprNGfwEbeRWgbNEkqO%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0"
    auth = (
        f"n=user,r=rOprNGfwEbeRWgbNEkqO,r={nonce},s=W22ZaJ0SNY7soEsUEjb6gQ==,i=4096,"
        f"c=biws,r={nonce}"
    ).encode()
    server_signature = hmac.digest(server_key, auth, "sha256")
    assert base64.b64encode(server_signature) == b"6rriTRBi23WpRR/wtup+mMhUZUn/dB5nLTJRsjl95G4="
    proof = base64.b64decode("dHzbZapWIk4jUhN+Ute9ytag9zjfMHgsqmmiz7AndVQ=")
    client_key = bytes(
        p ^ s for p, s in zip(proof, hmac.digest(stored_key, auth, "sha256"), strict=True)
    )
    assert hashlib.sha256(client_key).digest() == stored_key


def test_the_scram_verifier_is_salted_afresh_and_refuses_what_saslprep_would_change() -> None:
    one, two = bootstrapdb.scram_verifier("pw"), bootstrapdb.scram_verifier("pw")
    assert one != two and one.startswith("SCRAM-SHA-256$4096:")
    assert len(base64.b64decode(one.split("$")[1].split(":")[1])) == 16
    with pytest.raises(ValueError):
        bootstrapdb.scram_verifier("pässword")


def test_bootstrapdb_imports_only_psycopg_and_the_standard_library() -> None:
    """Patroni's interpreter runs it: it has psycopg and nothing of AECP's."""
    tree = ast.parse(Path(bootstrapdb.__file__).read_text())
    imported: set[str] = set()
    for n in ast.walk(tree):
        if isinstance(n, ast.Import):
            imported |= {a.name.split(".")[0] for a in n.names}
        elif isinstance(n, ast.ImportFrom):
            imported.add((n.module or "").split(".")[0])
    imported.discard("__future__")
    assert imported - set(sys.stdlib_module_names) == {"psycopg"}


def test_bootstrapdb_sends_the_verifier_not_the_password(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    sent: list[str] = []

    class Conn:
        def __enter__(self) -> Conn:
            return self

        def __exit__(self, *_: object) -> None:
            return None

        def execute(self, statement: Any, params: Any = None) -> Any:
            text = statement if isinstance(statement, str) else statement.as_string(None)
            sent.append(text)
            return types.SimpleNamespace(fetchone=lambda: None)

    monkeypatch.setattr("psycopg.connect", lambda *a, **kw: Conn())
    secrets = tmp_path / "secrets.json"
    secrets.write_text(json.dumps(SECRETS.to_dict()))
    assert bootstrapdb.main([str(secrets), "host=x"]) == 0
    create = next(s for s in sent if s.startswith("CREATE ROLE"))
    assert SECRETS.center not in " ".join(sent)
    assert "PASSWORD 'SCRAM-SHA-256$4096:" in create


# --- the systemd units --------------------------------------------------------------------------


def unit(name: str) -> dict[str, dict[str, list[str]]]:
    """A unit file as {section: {key: [values]}} (repeated keys keep every value)."""
    out: dict[str, dict[str, list[str]]] = {}
    section = ""
    for raw in (UNITS / name).read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line.startswith("["):
            section = line.strip("[]")
            out[section] = {}
            continue
        key, _, value = line.partition("=")
        out[section].setdefault(key, []).append(value)
    return out


def one(u: dict[str, dict[str, list[str]]], section: str, key: str) -> str:
    values = u[section][key]
    assert len(values) == 1, f"{key} given {len(values)} times"
    return values[0]


def test_the_four_units_exist() -> None:
    assert {p.name for p in UNITS.glob("*.service")} == {
        "aecp-ha-etcd.service",
        "aecp-ha-patroni.service",
        "aecp-ha-agent.service",
        "aecp-center.service",
    }


def test_the_patroni_unit() -> None:
    u = unit("aecp-ha-patroni.service")
    assert one(u, "Service", "User") == "postgres"
    assert one(u, "Service", "ExecStart") == (
        "/opt/aecp/venv-ha/bin/patroni /var/lib/aecp-center-ha/patroni.json"
    )
    assert one(u, "Service", "Restart") == "on-failure"
    assert one(u, "Service", "KillMode") == "process"
    assert "aecp-ha-etcd.service" in one(u, "Unit", "After").split()
    assert one(u, "Unit", "ConditionPathExists") == str(PATHS.patroni_config)


def test_the_etcd_unit_reads_etcd_env() -> None:
    u = unit("aecp-ha-etcd.service")
    assert one(u, "Service", "EnvironmentFile") == "/var/lib/aecp-center-ha/etcd.env"
    assert one(u, "Service", "ExecStart") == "/usr/bin/etcd"
    assert one(u, "Service", "User") == "etcd"
    assert "aecp-ha" in one(u, "Service", "SupplementaryGroups").split()
    assert one(u, "Service", "ReadWritePaths") == str(PATHS.etcd_data)


def test_the_agent_runs_as_root() -> None:
    u = unit("aecp-ha-agent.service")
    assert one(u, "Service", "User") == "root"
    caps = one(u, "Service", "CapabilityBoundingSet").split()
    assert {"CAP_NET_ADMIN", "CAP_NET_RAW"} <= set(caps)


def test_the_center_unit_comes_after_patroni() -> None:
    u = unit("aecp-center.service")
    assert "aecp-ha-patroni.service" in one(u, "Unit", "After").split()
    assert one(u, "Service", "User") == deploy.CENTER_USER
    assert one(u, "Service", "ReadWritePaths") == str(deploy.BASE / deploy.CENTER_DIR)


@pytest.mark.parametrize(
    ("name", "env_file", "node"),
    [
        ("aecp-ha-agent.service", "node.env", "aoc3"),
        ("aecp-ha-agent.service", "node.env", "aoc1"),
        ("aecp-center.service", "node.env", "aoc1"),
    ],
)
def test_every_variable_a_unit_uses_is_in_its_environment_file(
    name: str, env_file: str, node: str
) -> None:
    u = unit(name)
    assert one(u, "Service", "EnvironmentFile") == str(deploy.BASE / env_file)
    used = set(re.findall(r"\$\{(\w+)\}", one(u, "Service", "ExecStart")))
    assert used and used <= set(read_env(files_of(node)[env_file]))


def _options(command: Any) -> set[str]:
    return {opt for p in command.params for opt in getattr(p, "opts", [])}


def test_the_units_give_only_options_the_cli_has() -> None:
    """The center and agent command lines of the units against ``aecp center run`` and
    ``aecp center ha agent`` as the CLI defines them."""
    import typer.main as typer_main

    from aecp.cli.center import app

    center = typer_main.get_command(app)
    commands = center.commands
    for unit_name, command in (
        ("aecp-center.service", commands["run"]),
        ("aecp-ha-agent.service", commands["ha"].commands["agent"]),
    ):
        argv = one(unit(unit_name), "Service", "ExecStart").split()
        given = {a for a in argv if a.startswith("--")}
        assert given <= _options(command), unit_name
