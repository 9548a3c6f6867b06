"""NBD export grants (issue 11 §1) and what review found in them: one credential per volume, the
cluster CA never a client's, bad certificates refused with the field named, grants that end
with their volume, and a STARTTLS flood that cannot make the node read the store at its pace."""

from __future__ import annotations

import datetime
import time
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import NameOID

from aecp.common.errors import AlreadyExists, InvalidInput, StoreUnavailable
from aecp.common.pki import ClusterCA, grant_credential
from aecp.common.tls import Credentials
from aecp.storage.exports import Exports, GrantPolicy, check_credential_ca
from aecp.storage.meta.model import VolumeRecord
from aecp.store import keys
from aecp.store.memory import MemoryStore
from tests.pkikit import TestPKI

NOW = datetime.datetime.now(datetime.UTC)


def ca_pem(key: Any = None, *, days: int = 30, path_length: int | None = 0, ca: bool = True) -> str:
    key = key or ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "x")])
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(1)
        .not_valid_before(NOW - datetime.timedelta(days=3))
        .not_valid_after(NOW + datetime.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=ca, path_length=path_length if ca else None), True)
        .sign(key, hashes.SHA256())
    )
    return cert.public_bytes(serialization.Encoding.PEM).decode()


@pytest.mark.parametrize(
    ("pem", "reason"),
    [
        ("hello", "not a PEM certificate"),
        (ca_pem() + ca_pem(), "one certificate expected, got 2"),
        (grant_credential("x", days=3)[1].decode(), "self-signed"),
        (ca_pem(ca=False), "a CA certificate with path length 0"),
        (ca_pem(path_length=None), "a CA certificate with path length 0"),
        (ca_pem(rsa.generate_private_key(65537, 1024)), "at least 2048 bits"),
        (ca_pem(days=400), "at most 366 days"),
        (ca_pem(days=-1), "not valid now"),
    ],
)
def test_a_credential_ca_that_cannot_serve_is_refused_naming_the_field(pem: str, reason: str):
    with pytest.raises(InvalidInput, match=reason) as err:
        check_credential_ca(pem, time.time())
    assert err.value.fields["field"] == "client_ca_certificate"


def test_the_cluster_ca_is_never_a_clients_credential(tmp_path: Path) -> None:
    """Not even in its last year, when its validity no longer refuses it (review finding)."""
    cluster = ClusterCA.create(tmp_path, "c", days=300).cert_file.read_text()
    with pytest.raises(InvalidInput, match="cluster's CA"):
        check_credential_ca(cluster, time.time(), cluster)


async def volume(store: MemoryStore, name: str, uid: str) -> VolumeRecord:
    vol = VolumeRecord(name=name, size=1 << 20, replicas=1, extent_size=1 << 20, uid=uid)
    await store.put(keys.abs_volume(name), vol.dump())
    return vol


async def test_a_volume_has_one_export_and_a_credential_one_volume() -> None:
    store = MemoryStore()
    a, b = await volume(store, "a", "a1"), await volume(store, "b", "b1")
    exports = Exports(store)
    own = grant_credential("x", days=3)[0].decode()
    await exports.grant(a, own, "n1", "admin")
    with pytest.raises(AlreadyExists, match="already exported"):
        await exports.grant(a, grant_credential("y", days=3)[0].decode(), "n1", "admin")
    with pytest.raises(AlreadyExists, match="granted another volume"):
        await exports.grant(b, own, "n1", "admin")


class CountingStore(MemoryStore):
    def __init__(self) -> None:
        super().__init__()
        self.lists = 0

    async def list(self, prefix: str) -> Any:
        self.lists += 1
        return await super().list(prefix)


async def policy_with(tmp_path: Path) -> tuple[CountingStore, GrantPolicy, dict[str, bytes]]:
    """Grants of volumes a and b, each to a credential of its own; the leaf certificates (DER)."""
    store = CountingStore()
    leaves = {}
    for name in ("a", "b"):
        own, leaf, _ = grant_credential(name, days=3)
        await Exports(store).grant(await volume(store, name, name + "1"), own.decode(), "n1", "t")
        cert = x509.load_pem_x509_certificate(leaf)
        leaves[name] = cert.public_bytes(serialization.Encoding.DER)
    return store, GrantPolicy(store, Credentials(TestPKI(tmp_path).node("n1"))), leaves


async def test_each_credential_opens_its_own_volume_and_nothing_else(tmp_path: Path) -> None:
    _, policy, leaves = await policy_with(tmp_path)
    await policy.context()
    for name, der in leaves.items():
        credential, granted = await policy.grants(der)
        assert granted == {name} and await policy.still_granted(credential, name)
        other = "b" if name == "a" else "a"
        assert not await policy.still_granted(credential, other)


async def test_a_grant_opens_nothing_once_its_volume_is_made_again_under_its_name(
    tmp_path: Path,
) -> None:
    store, policy, leaves = await policy_with(tmp_path)
    await policy.context()
    credential, _ = await policy.grants(leaves["a"])
    await volume(store, "a", "a2")  # deleted and created again: another unique id
    assert not await policy.still_granted(credential, "a")
    await policy.refresh()
    assert await policy.grants(leaves["a"]) == ("", frozenset())


async def test_a_credential_granted_two_volumes_opens_neither(tmp_path: Path) -> None:
    store, policy, leaves = await policy_with(tmp_path)
    grant_a = (await Exports(store).get("a")).model_copy(update={"volume": "b", "volume_uid": "b1"})
    await store.put(keys.abs_export("b"), grant_a.dump())  # as two requests at once could
    grants = await policy.refresh()
    assert grant_a.fingerprint not in grants
    await policy.context()
    assert await policy.grants(leaves["a"]) == ("", frozenset())


async def test_connecting_clients_refresh_the_grants_at_most_once_a_second(tmp_path: Path):
    store, policy, _ = await policy_with(tmp_path)
    before = store.lists
    for _ in range(50):  # fifty STARTTLS in a row
        await policy.context()
    assert store.lists - before == 1


async def test_a_changed_grant_is_read_again_at_once_however_recent_the_last_read(
    tmp_path: Path,
) -> None:
    """An export made just after a read failed to open for up to a second (full suite)."""
    store, policy, _ = await policy_with(tmp_path)
    await policy.context()
    own, leaf, _ = grant_credential("c", days=3)
    await Exports(store).grant(await volume(store, "c", "c1"), own.decode(), "n1", "t")
    policy.invalidate()  # what the storage daemon's watch does
    await policy.context()
    der = x509.load_pem_x509_certificate(leaf).public_bytes(serialization.Encoding.DER)
    assert (await policy.grants(der))[1] == {"c"}


async def test_a_store_that_cannot_answer_is_asked_at_most_once_a_second(tmp_path: Path):
    store, policy, _ = await policy_with(tmp_path)
    store.set_reachable(False)
    before = store.lists
    for _ in range(20):  # twenty STARTTLS while the store is down
        with pytest.raises(StoreUnavailable):
            await policy.context()
    assert store.lists - before == 1
    store.set_reachable(True)


async def test_a_grant_record_that_does_not_load_opens_nothing_and_stops_no_other(
    tmp_path: Path,
) -> None:
    store, policy, leaves = await policy_with(tmp_path)
    await store.put(keys.abs_export("zzz"), b'{"volume": 1}')
    await policy.refresh()
    await policy.context()
    assert (await policy.grants(leaves["a"]))[1] == {"a"}


async def test_two_granted_cas_may_not_share_a_subject() -> None:
    """OpenSSL tries one CA per subject: the second credential would fail everywhere."""
    store = MemoryStore()
    key_a, key_b = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(ec.SECP256R1())
    await Exports(store).grant(await volume(store, "a", "a1"), ca_pem(key_a), "n1", "t")
    with pytest.raises(AlreadyExists, match="has this subject"):
        await Exports(store).grant(await volume(store, "b", "b1"), ca_pem(key_b), "n1", "t")
