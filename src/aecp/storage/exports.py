"""NBD export grants: which outside client may reach which volume over NBD with TLS.

A grant (``/aecp/abs/exports/<volume>``) names one volume (by name and unique id) and the CA
certificate of the one client credential that may open it: a CA of that credential alone,
whose key was thrown away once it signed the client's certificate (``pki.grant_credential``;
``aecp volume export`` makes it on the client's machine, and the client's key never leaves
it). The cluster stores only the CA certificate and its fingerprint. A volume has at most one
grant; ``revoke`` (``aecp volume unexport``) deletes it, deleting the volume deletes it too,
and a grant of an earlier volume of the same name opens nothing (the unique id differs).

``GrantPolicy`` is what a node's NBD server asks (the ``TlsPolicy`` of
``frontends/nbd/server.py``): a TLS context trusting exactly the granted certificates, and
the volumes a presented certificate may open. The storage daemon also asks it which
credentials are still valid, and closes the connections of the others.
"""

from __future__ import annotations

import datetime
import logging
import ssl

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from aecp.common.clock import SYSTEM_CLOCK, Clock
from aecp.common.errors import AlreadyExists, InvalidInput, NotFound
from aecp.common.pki import fingerprint
from aecp.common.tls import Credentials
from aecp.model.base import Stored, check_name
from aecp.storage.meta.model import VolumeRecord
from aecp.store import keys
from aecp.store.base import Store
from aecp.store.typed import read

log = logging.getLogger(__name__)

MAX_PEM = 8192
MAX_DAYS = 366


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
    """Grants, as the cluster API reads and changes them."""

    def __init__(self, store: Store, clock: Clock = SYSTEM_CLOCK) -> None:
        self.store = store
        self.clock = clock

    async def grant(
        self, vol: VolumeRecord, certificate: str, node: str, created_by: str
    ) -> ExportGrant:
        """Store a grant of ``vol`` to the credential whose CA certificate is ``certificate``
        (checked first); ``AlreadyExists`` if the volume has one."""
        cert = check_credential_ca(certificate, self.clock.wall())
        der = cert.public_bytes(serialization.Encoding.DER)
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
        """Delete the volume's grant; ``NotFound`` if it has none."""
        grant = await self.get(volume)
        await self.store.delete(keys.abs_export(volume))
        log.info("volume %s: export revoked (credential %s)", volume, grant.fingerprint[:23])

    async def all(self) -> list[ExportGrant]:
        return [ExportGrant.load(kv.value) for kv in await self.store.list(keys.ABS_EXPORTS)]


def check_credential_ca(pem: str, now: float) -> x509.Certificate:
    """The certificate in ``pem`` if it can be a credential's CA: one self-signed CA
    certificate that signs no other CA (path length 0), valid now and for at most
    ``MAX_DAYS`` more days, with an ECDSA or (2048-bit or larger) RSA key. ``InvalidInput``
    naming ``client_ca_certificate`` otherwise."""
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
    return cert


class GrantPolicy:
    """A node's NBD TLS policy over the grants in the store (see the module docstring)."""

    def __init__(self, store: Store, credentials: Credentials, clock: Clock = SYSTEM_CLOCK):
        self.store = store
        self.credentials = credentials
        self.clock = clock
        self._cached: tuple[object, ssl.SSLContext] | None = None

    async def current(self) -> dict[str, ExportGrant]:
        """The grants in force now, by fingerprint: unexpired, of a volume that still exists
        with the same unique id."""
        now = self.clock.wall()
        grants = [g for g in await Exports(self.store).all() if g.expires_at > now]
        vols = [VolumeRecord.load(kv.value) for kv in await self.store.list(keys.ABS_VOLUMES)]
        uids = {v.name: v.owner_id for v in vols}
        return {g.fingerprint: g for g in grants if uids.get(g.volume) == g.volume_uid}

    async def context(self) -> ssl.SSLContext:
        grants = await self.current()
        self.credentials.identity()  # loads the bundle (again, after a rotation)
        bundle = self.credentials.bundle
        key = (tuple(sorted(grants)), bundle.stamp())
        if self._cached is None or self._cached[0] != key:
            ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            ctx.minimum_version = ssl.TLSVersion.TLSv1_2
            ctx.load_cert_chain(bundle.cert_file, bundle.key_file)
            ctx.verify_mode = ssl.CERT_REQUIRED
            ctx.num_tickets = 0
            if grants:
                ctx.load_verify_locations(cadata="".join(g.certificate for g in grants.values()))
            self._cached = (key, ctx)
        return self._cached[1]

    async def grants(self, cert_der: bytes) -> tuple[str, frozenset[str]]:
        """The grant whose CA issued ``cert_der`` (its fingerprint) and what it opens."""
        cert = x509.load_der_x509_certificate(cert_der)
        for fp, grant in (await self.current()).items():
            ca = x509.load_pem_x509_certificate(grant.certificate.encode())
            try:
                cert.verify_directly_issued_by(ca)
            except (ValueError, TypeError, InvalidSignature):
                continue
            return fp, frozenset([grant.volume])
        return "", frozenset()
