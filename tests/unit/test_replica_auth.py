"""Replica authentication, sans-I/O: both ends prove a node certificate of the cluster, nothing
of another connection can be replayed, and bad input is refused (``AuthError``), never a
crash."""

from __future__ import annotations

import datetime
from pathlib import Path

import pytest
from cryptography import x509
from hypothesis import given, settings
from hypothesis import strategies as st

from aecp.common.addresses import client_key
from aecp.common.errors import InvalidInput
from aecp.common.pki import NODE, AuthError, ClusterCA, Identity, verify_peer
from aecp.storage.chunk.auth import MAGIC, ClientAuth, Mode, ServerAuth
from tests.pkikit import TestPKI


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> TestPKI:
    return TestPKI(tmp_path_factory.mktemp("pki"))


def identity(pki: TestPKI, name: str) -> Identity:
    return pki.node(name).load()


def exchange(client: ClientAuth, server: ServerAuth) -> None:
    challenge = server.receive(client.hello())
    result = server.receive(client.answer(challenge))
    client.done(result)


def test_two_nodes_of_the_cluster_authenticate_each_other(pki: TestPKI) -> None:
    client = ClientAuth(identity(pki, "n2"), "n1", Mode.SIGNED)
    server = ServerAuth(identity(pki, "n1"))
    exchange(client, server)
    assert server.accepted and server.peer == "n2"


def test_a_proof_from_another_connection_is_refused(pki: TestPKI) -> None:
    first = ClientAuth(identity(pki, "n2"), "n1", Mode.SIGNED)
    server1 = ServerAuth(identity(pki, "n1"))
    proof = first.answer(server1.receive(first.hello()))
    replayed = ServerAuth(identity(pki, "n1"))
    replayed.receive(first.hello())  # same certificate, fresh nonces on both sides
    with pytest.raises(AuthError, match="did not prove"):
        replayed.receive(proof)


def test_a_certificate_without_its_key_does_not_pass(pki: TestPKI, tmp_path: Path) -> None:
    """A stolen certificate is not enough: the proof is signed with another key."""
    real, thief = identity(pki, "n2"), TestPKI(tmp_path / "ca").node("n2").load()
    impostor = Identity(real.ca, real.cert, thief.key)
    client = ClientAuth(impostor, "n1", Mode.SIGNED)
    server = ServerAuth(identity(pki, "n1"))
    with pytest.raises(AuthError, match="did not prove"):
        server.receive(client.answer(server.receive(client.hello())))


def test_a_relay_that_opens_its_own_connection_gets_no_valid_signature(pki: TestPKI) -> None:
    """Each side signs the connection as it sees it: a relay between two TCP connections
    presents the client with the server's view of the other one (review finding)."""
    client = ClientAuth(identity(pki, "n2"), "n1", Mode.SIGNED, b"10.0.0.2:4000>10.0.0.9:8710")
    server = ServerAuth(identity(pki, "n1"), binding=b"10.0.0.9:5000>10.0.0.1:8710")
    with pytest.raises(AuthError, match="did not prove"):
        client.answer(server.receive(client.hello()))


def test_the_client_refuses_a_server_with_another_name(pki: TestPKI) -> None:
    client = ClientAuth(identity(pki, "n2"), "n3", Mode.SIGNED)
    server = ServerAuth(identity(pki, "n1"))
    with pytest.raises(AuthError, match="expected 'n3'"):
        client.answer(server.receive(client.hello()))


def test_a_server_that_requires_tls_refuses_the_signed_mode(pki: TestPKI) -> None:
    server = ServerAuth(identity(pki, "n1"), require_tls=True)
    with pytest.raises(AuthError, match="requires encrypted"):
        server.receive(ClientAuth(identity(pki, "n2"), "n1", Mode.SIGNED).hello())
    tls = ServerAuth(identity(pki, "n1"), require_tls=True)
    assert tls.receive(ClientAuth(identity(pki, "n2"), "n1", Mode.TLS).hello()) == b"\0"
    assert tls.mode is Mode.TLS


def test_expired_and_client_role_certificates_are_refused(pki: TestPKI) -> None:
    node = identity(pki, "n2")
    later = node.cert.not_valid_after_utc + datetime.timedelta(days=1)
    with pytest.raises(AuthError, match="not valid now"):
        verify_peer(node.ca, node.cert, role=NODE, now=later)
    admin = x509.load_pem_x509_certificate(pki.ca.issue_client("admin").cert_file.read_bytes())
    with pytest.raises(AuthError, match="'admin', not a 'node'"):
        verify_peer(node.ca, admin, role=NODE)


def test_a_rotated_bundle_keeps_its_name_and_addresses_with_a_new_key(tmp_path: Path) -> None:
    ca = ClusterCA.create(tmp_path, "c")
    before = ca.issue_node("n1", ["10.0.0.1"]).load()
    ca.issue_client("admin")
    assert len(ca.rotate()) == 2
    after = ca.node_bundle("n1").load()
    assert after.name == "n1" and after.role == NODE
    assert after.cert.serial_number != before.cert.serial_number
    sans = after.cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert [str(ip) for ip in sans.get_values_for_type(x509.IPAddress)] == ["10.0.0.1"]
    for f in ca.node_bundle("n1").files():
        assert f.stat().st_mode & 0o777 == 0o600


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=600) | st.binary(max_size=300).map(lambda b: MAGIC + b))
def test_garbage_is_refused_with_an_auth_error_and_nothing_else(garbage: bytes) -> None:
    server = ServerAuth(GARBAGE_IDENTITY[0])
    try:
        server.receive(garbage)
        server.receive(garbage)
    except AuthError:
        return
    raise AssertionError("garbage was accepted")


GARBAGE_IDENTITY: list[Identity] = []


@pytest.fixture(autouse=True, scope="module")
def _garbage_identity(pki: TestPKI) -> None:
    GARBAGE_IDENTITY[:] = [identity(pki, "n1")]


@pytest.mark.parametrize(
    ("role", "reason"), [("../nodes/n1", "not a valid name"), ("Admin", "not a valid name")]
)
def test_a_principal_name_cannot_leave_its_directory_in_the_ca(
    tmp_path: Path, role: str, reason: str
) -> None:
    """``aecp cluster cert client ../nodes/n1`` overwrote node n1's credential (review)."""
    ca = ClusterCA.create(tmp_path, "c")
    with pytest.raises(InvalidInput, match=reason):
        ca.issue_client(role)
    with pytest.raises(InvalidInput, match="address"):
        ca.issue_node("n1", ["not-an-ip"])
    assert not (tmp_path / "nodes").exists()


def test_handshake_slots_count_ipv6_clients_by_their_64() -> None:
    assert (
        client_key("2001:db8:1:2::7") == client_key("2001:db8:1:2:ffff::1") == "2001:db8:1:2::/64"
    )
    assert client_key("::ffff:10.0.0.1") == "10.0.0.1" and client_key("10.0.0.2") == "10.0.0.2"
