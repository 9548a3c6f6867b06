"""NBD export grants: which outside client may reach which volume over NBD with TLS.

A grant (``/aecp/abs/exports/<volume>``) names one volume (by name and unique id) and the CA
certificate of the one client credential that may open it: a CA of that credential alone,
whose key was thrown away once it signed the client's certificate (``pki.grant_credential``;
``aecp volume export`` makes it on the client's machine, and the client's key never leaves
it). The cluster stores only the CA certificate and its fingerprint. A volume has at most one
grant; ``revoke`` (``aecp volume unexport``) deletes it, deleting the volume deletes it too,
and a grant of an earlier volume of the same name opens nothing (the unique id differs).

A credential's CA is granted one volume only: a grant of a CA that another grant names is
refused, and should two grants name one CA anyway (two requests at once), that CA opens
nothing. The cluster's own CA is never accepted as a credential's.

``GrantPolicy`` is what a node's NBD server asks (the ``TlsPolicy`` of
``frontends/nbd/server.py``): a TLS context trusting exactly the granted CAs, the volume a
presented certificate may open, and, when a volume is opened, whether that grant still holds
(read again then: a grant revoked, or its volume deleted and made again, since the TLS
handshake opens nothing). It keeps the grants in memory: the storage daemon refreshes them
every few seconds (and closes the connections of grants that went away); the unauthenticated
path (a client's STARTTLS) may refresh them at most once per ``REFRESH_AT_MOST_EVERY``
seconds, so connecting clients cannot make the node read the store at their pace.
"""

from __future__ import annotations

import asyncio
import datetime
import logging
import ssl
import time
from collections import Counter

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from pydantic import ValidationError

from aecp.common.clock import SYSTEM_CLOCK, Clock
from aecp.common.errors import AecpError, AlreadyExists, InvalidInput, NotFound
from aecp.common.pki import fingerprint
from aecp.common.tls import Credentials, server_context
from aecp.model.base import Stored, check_name
from aecp.storage.meta.model import VolumeRecord
from aecp.store import keys
from aecp.store.base import Store
from aecp.store.typed import read

log = logging.getLogger(__name__)

MAX_PEM = 8192
MAX_DAYS = 366
REFRESH_AT_MOST_EVERY = 1.0


class ExportGrant(Stored):
    """``/aecp/abs/exports/<volume>``: the client credential that may open the volume."""

    volume: str
    volume_uid: str
    node: str  # the node whose NBD server the URI names
    fingerprint: str  # sha256:<hex> of the credential's CA certificate (DER)
    certificate: str  # the credential's CA certificate, PEM
    created_at: float
    expires_at: float
    created_by: str = ""


class Exports:
    """Grants, as the cluster API reads and changes them. ``cluster_ca``: the cluster CA's
    certificate (PEM), refused as a credential's CA."""

    def __init__(self, store: Store, clock: Clock = SYSTEM_CLOCK, *, cluster_ca: str = "") -> None:
        self.store = store
        self.clock = clock
        self.cluster_ca = cluster_ca

    async def grant(
        self, vol: VolumeRecord, certificate: str, node: str, created_by: str
    ) -> ExportGrant:
        """Store a grant of ``vol`` to the credential whose CA certificate is ``certificate``
        (checked first); ``AlreadyExists`` if the volume has one, or if another grant names
        that CA."""
        cert = check_credential_ca(certificate, self.clock.wall(), self.cluster_ca)
        der = cert.public_bytes(serialization.Encoding.DER)
        for other in await self.all():
            if other.fingerprint == fingerprint(der):
                raise AlreadyExists(
                    "this credential is granted another volume already; make a new one",
                    field="client_ca_certificate",
                )
            if _subject(other.certificate) == cert.subject:  # OpenSSL would try only one
                raise AlreadyExists(
                    "another granted credential's CA has this subject; use another name",
                    field="client_ca_certificate",
                )
        grant = ExportGrant(
            volume=vol.name,
            volume_uid=vol.owner_id,
            node=node,
            fingerprint=fingerprint(der),
            certificate=cert.public_bytes(serialization.Encoding.PEM).decode(),
            created_at=self.clock.wall(),
            expires_at=cert.not_valid_after_utc.timestamp(),
            created_by=created_by,
        )
        if not await self.store.create(keys.abs_export(vol.name), grant.dump()):
            raise AlreadyExists(
                f"volume {vol.name} is already exported; unexport it first to revoke that "
                "credential",
                volume=vol.name,
            )
        log.info("volume %s: exported to credential %s", vol.name, grant.fingerprint[:23])
        return grant

    async def get(self, volume: str) -> ExportGrant:
        check_name("volume", volume)
        got = await read(self.store, keys.abs_export(volume), ExportGrant)
        if got is None:
            raise NotFound(f"volume {volume} is not exported", volume=volume)
        return got[0]

    async def revoke(self, volume: str) -> None:
        """Delete the volume's grant; ``NotFound`` if it has none. Only the grant read here
        is deleted, never a new one made meanwhile."""
        check_name("volume", volume)
        got = await read(self.store, keys.abs_export(volume), ExportGrant)
        if got is None or not await self.store.delete(keys.abs_export(volume), mod_revision=got[1]):
            raise NotFound(f"volume {volume} is not exported", volume=volume)
        log.info("volume %s: export revoked (credential %s)", volume, got[0].fingerprint[:23])

    async def all(self) -> list[ExportGrant]:
        return [ExportGrant.load(kv.value) for kv in await self.store.list(keys.ABS_EXPORTS)]


def check_credential_ca(pem: str, now: float, cluster_ca: str = "") -> x509.Certificate:
    """The certificate in ``pem`` if it can be a credential's CA: one self-signed CA
    certificate that signs no other CA (path length 0), valid now and for at most
    ``MAX_DAYS`` more days, with an ECDSA or (2048-bit or larger) RSA key, and not the
    cluster's CA (``cluster_ca``, PEM). ``InvalidInput`` naming ``client_ca_certificate``
    otherwise."""
    field = "client_ca_certificate"
    if len(pem) > MAX_PEM:
        raise InvalidInput(field, f"at most {MAX_PEM} characters of PEM")
    try:
        certs = x509.load_pem_x509_certificates(pem.encode())
    except ValueError:
        raise InvalidInput(field, "not a PEM certificate") from None
    if len(certs) != 1:
        raise InvalidInput(field, f"one certificate expected, got {len(certs)}")
    cert = certs[0]
    key = cert.public_key()
    if not isinstance(key, ec.EllipticCurvePublicKey | rsa.RSAPublicKey):
        raise InvalidInput(field, "the key must be ECDSA or RSA")
    if isinstance(key, rsa.RSAPublicKey) and key.key_size < 2048:
        raise InvalidInput(field, "an RSA key must have at least 2048 bits")
    try:
        cert.verify_directly_issued_by(cert)
    except (ValueError, TypeError, InvalidSignature):
        raise InvalidInput(field, "the certificate must be self-signed") from None
    try:
        basic = cert.extensions.get_extension_for_class(x509.BasicConstraints).value
    except x509.ExtensionNotFound:
        basic = None
    if basic is None or not basic.ca or basic.path_length != 0:
        raise InvalidInput(field, "must be a CA certificate with path length 0")
    when = datetime.datetime.fromtimestamp(now, datetime.UTC)
    if not cert.not_valid_before_utc <= when < cert.not_valid_after_utc:
        raise InvalidInput(field, "the certificate is not valid now")
    if cert.not_valid_after_utc - when > datetime.timedelta(days=MAX_DAYS):
        raise InvalidInput(field, f"the certificate may be valid for at most {MAX_DAYS} days")
    if cluster_ca and _same_key(cert, x509.load_pem_x509_certificate(cluster_ca.encode())):
        raise InvalidInput(field, "the cluster's CA cannot be a client credential's")
    return cert


def _subject(pem: str) -> x509.Name | None:
    try:
        return x509.load_pem_x509_certificate(pem.encode()).subject
    except ValueError:
        return None


def _same_key(a: x509.Certificate, b: x509.Certificate) -> bool:
    form = serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    return a.public_key().public_bytes(*form) == b.public_key().public_bytes(*form)


async def _readable_grants(store: Store) -> list[ExportGrant]:
    """Every grant record that loads (one that does not, a newer or damaged one, opens nothing
    and does not stop the others from being read)."""
    out = []
    for kv in await store.list(keys.ABS_EXPORTS):
        try:
            out.append(ExportGrant.load(kv.value))
        except ValidationError:
            log.warning("%s does not load: it opens nothing", kv.key)
    return out


def granted_by(valid: dict[str, ExportGrant], credential: str, exports: frozenset[str]) -> bool:
    """Do the grants ``valid`` (``GrantPolicy.refresh``) still give ``credential`` the
    ``exports`` its connection was given?"""
    grant = valid.get(credential)
    return grant is not None and grant.volume in exports


class GrantPolicy:
    """A node's NBD TLS policy over the grants in the store (see the module docstring)."""

    def __init__(self, store: Store, credentials: Credentials, clock: Clock = SYSTEM_CLOCK):
        self.store = store
        self.credentials = credentials
        self.clock = clock
        self._grants: dict[str, ExportGrant] = {}
        self._fetched = float("-inf")  # time.monotonic() of the last refresh
        self._stale = True  # a grant changed since (``invalidate``)
        self._failure: tuple[float, AecpError] | None = None  # the last failed refresh
        self._lock = asyncio.Lock()
        self._context: tuple[object, ssl.SSLContext] | None = None

    def invalidate(self) -> None:
        """A grant changed (the storage daemon watches them): the next ``context`` reads
        them again, however recent the last read."""
        self._stale = True

    async def refresh(self, *, at_most_every: float = 0.0) -> dict[str, ExportGrant]:
        """Read the grants in force (unexpired, of a volume that still exists with the same
        unique id, naming a CA no other grant names), by fingerprint. Unless a grant changed
        since (``invalidate``), a read younger than ``at_most_every`` seconds is reused, and
        so is a failure (``StoreUnavailable``) younger than that: a client's STARTTLS never
        makes the node read the store more often."""
        async with self._lock:
            now = time.monotonic()
            if self._failure is not None and now - self._failure[0] < at_most_every:
                raise self._failure[1]
            if self._stale or now - self._fetched >= at_most_every:
                self._stale = False
                try:
                    self._grants = await self._read()
                except AecpError as exc:
                    self._stale, self._failure = True, (time.monotonic(), exc)
                    raise
                self._failure, self._fetched = None, time.monotonic()
            return self._grants

    async def _read(self) -> dict[str, ExportGrant]:
        now = self.clock.wall()
        grants = [g for g in await _readable_grants(self.store) if g.expires_at > now]
        shared = {fp for fp, n in Counter(g.fingerprint for g in grants).items() if n > 1}
        if shared:
            log.warning("credentials granted several volumes open nothing: %s", sorted(shared))
        out = {}
        for g in grants:
            if g.fingerprint not in shared and await self._volume_uid(g.volume) == g.volume_uid:
                out[g.fingerprint] = g
        return out

    async def _volume_uid(self, name: str) -> str | None:
        try:
            got = await read(self.store, keys.abs_volume(name), VolumeRecord)
        except ValidationError:  # unreadable: not the volume the grant names
            log.warning("volume %s: its record does not load; its export opens nothing", name)
            return None
        return got[0].owner_id if got else None

    async def context(self) -> ssl.SSLContext:
        grants = await self.refresh(at_most_every=REFRESH_AT_MOST_EVERY)
        self.credentials.identity()  # loads the bundle (again, after a rotation)
        bundle = self.credentials.bundle
        key = (tuple(sorted(grants)), bundle.stamp())
        if self._context is None or self._context[0] != key:
            cas = "".join(g.certificate for g in grants.values())
            self._context = (key, server_context(bundle, client_ca=cas.encode()))
        return self._context[1]

    async def grants(self, cert_der: bytes) -> tuple[str, frozenset[str]]:
        """The grant whose CA issued ``cert_der`` (its fingerprint) and the volume it opens
        (from the grants the TLS context trusted)."""
        cert = x509.load_der_x509_certificate(cert_der)
        for fp, grant in self._grants.items():
            ca = x509.load_pem_x509_certificate(grant.certificate.encode())
            try:
                cert.verify_directly_issued_by(ca)
            except (ValueError, TypeError, InvalidSignature):
                continue
            return fp, frozenset([grant.volume])
        return "", frozenset()

    async def still_granted(self, credential: str, volume: str) -> bool:
        """Does ``credential`` still open ``volume``, read from the store now (the grant
        unchanged, unexpired, its volume the same one)?"""
        try:
            got = await read(self.store, keys.abs_export(volume), ExportGrant)
        except ValidationError:
            return False
        if got is None:
            return False
        grant = got[0]
        return (
            grant.fingerprint == credential
            and grant.expires_at > self.clock.wall()
            and await self._volume_uid(volume) == grant.volume_uid
        )
