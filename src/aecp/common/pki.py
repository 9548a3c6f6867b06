"""The cluster certificate authority and the credentials it issues (the ``cryptography`` package
does every cryptographic step; nothing here is hand-written crypto).

A cluster has one CA (ECDSA P-256). It issues one *bundle* per principal: a directory holding
``ca.crt`` (the CA's certificate), ``tls.crt`` (the principal's certificate) and ``tls.key``
(its private key, PKCS#8 PEM). Every file is mode 0600, every directory 0700. Principals:

- a **node** (role ``node``): CN and DNS name = the node name, plus ``ETCD_SERVER_NAME`` and an
  IP name per address; usable as a TLS server and client (etcd member and client, replica
  protocol, NBD server);
- a **client role** (``admin``, ...): CN = the role; a TLS client only.

The role is the certificate's organizational unit, so a verifier tells a node from a tool.

Layout of a CA directory (``ClusterCA.create``)::

    ca.crt  ca.key  nodes/<node>/{ca.crt,tls.crt,tls.key}  clients/<role>/{...}

``ClusterCA.rotate`` re-issues every bundle under the CA directory with a new key and a new
validity, keeping its names and addresses. Each file is replaced atomically (write, fsync,
rename; key first, then certificate), so a reader sees the old or the new file, and
``Bundle.load`` refuses a certificate that does not match its key (a reader caught between the
two renames tries again later). The CA itself is not rotated here.
"""

from __future__ import annotations

import datetime
import hashlib
import ipaddress
import os
import secrets
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from aecp.common.errors import AecpError, InvalidInput, NotFound
from aecp.common.names import NAME_RE, NAME_RULE

#: a DNS name in every node certificate: what etcd clients check the server against (one name
#: for every member, so a client with several endpoints needs no per-address name)
ETCD_SERVER_NAME = "etcd.aecp.internal"
NODE = "node"
CA_DAYS = 3650
LEAF_DAYS = 365
CA_CERT, CA_KEY = "ca.crt", "ca.key"
CERT, KEY = "tls.crt", "tls.key"
_CURVE = ec.SECP256R1()
_CLOCK_SKEW = datetime.timedelta(minutes=5)  # certificates start this much in the past


class AuthError(AecpError):
    """A peer's credentials were refused (wrong CA, expired, wrong role or name)."""

    code = "auth_failed"
    http_status = 401


@dataclass(frozen=True)
class Identity:
    """One loaded bundle: the CA certificate, the principal's certificate and private key."""

    ca: x509.Certificate
    cert: x509.Certificate
    key: ec.EllipticCurvePrivateKey

    @property
    def name(self) -> str:
        return common_name(self.cert)

    @property
    def role(self) -> str:
        return role_of(self.cert)

    def cert_der(self) -> bytes:
        return self.cert.public_bytes(serialization.Encoding.DER)


@dataclass(frozen=True)
class Bundle:
    """A bundle directory (``ca.crt``, ``tls.crt``, ``tls.key``)."""

    dir: Path

    @property
    def ca_file(self) -> Path:
        return self.dir / CA_CERT

    @property
    def cert_file(self) -> Path:
        return self.dir / CERT

    @property
    def key_file(self) -> Path:
        return self.dir / KEY

    def files(self) -> tuple[Path, Path, Path]:
        return self.ca_file, self.cert_file, self.key_file

    def stamp(self) -> tuple[int, ...]:
        """Changes whenever one of the three files is replaced (for reloading)."""
        out: list[int] = []
        for f in self.files():
            try:
                st = f.stat()
            except FileNotFoundError:
                out += [0, 0]
                continue
            out += [st.st_mtime_ns, st.st_ino]
        return tuple(out)

    def load(self) -> Identity:
        """Read and check the three files. ``NotFound`` if one is missing; ``AuthError`` if
        the certificate does not match its key or was not issued by the CA."""
        try:
            ca_pem, cert_pem, key_pem = (f.read_bytes() for f in self.files())
        except FileNotFoundError as exc:
            raise NotFound(f"TLS credentials missing: {exc.filename}") from None
        ca = x509.load_pem_x509_certificate(ca_pem)
        cert = x509.load_pem_x509_certificate(cert_pem)
        key = serialization.load_pem_private_key(key_pem, password=None)
        if not isinstance(key, ec.EllipticCurvePrivateKey):
            raise AuthError(f"{self.key_file}: not an ECDSA key")
        if _public_der(key.public_key()) != _public_der(cert.public_key()):
            raise AuthError(f"{self.cert_file} does not match {self.key_file}")
        check_issued(ca, cert)
        return Identity(ca, cert, key)


class ClusterCA:
    """A CA directory: the CA's key and certificate, and the bundles it issued."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)

    @property
    def cert_file(self) -> Path:
        return self.root / CA_CERT

    @property
    def key_file(self) -> Path:
        return self.root / CA_KEY

    def exists(self) -> bool:
        return self.cert_file.exists() and self.key_file.exists()

    @classmethod
    def create(cls, root: Path, cluster: str, *, days: int = CA_DAYS) -> ClusterCA:
        """A new CA for ``cluster`` under ``root``. Refuses to overwrite an existing one."""
        ca = cls(root)
        if ca.exists():
            raise InvalidInput("pki_dir", f"a cluster CA already exists in {root}")
        _private_dir(ca.root)
        key = ec.generate_private_key(_CURVE)
        subject = x509.Name(
            [
                x509.NameAttribute(NameOID.ORGANIZATION_NAME, f"aecp:{cluster}"),
                x509.NameAttribute(NameOID.COMMON_NAME, f"AECP cluster CA {cluster}"),
            ]
        )
        signs_certs = x509.KeyUsage(
            digital_signature=False,
            content_commitment=False,
            key_encipherment=False,
            data_encipherment=False,
            key_agreement=False,
            key_cert_sign=True,
            crl_sign=True,
            encipher_only=False,
            decipher_only=False,
        )
        cert = _self_signed(
            key,
            subject,
            days,
            (x509.BasicConstraints(ca=True, path_length=0), True),
            (signs_certs, True),
            (x509.SubjectKeyIdentifier.from_public_key(key.public_key()), False),
        )
        write_private(ca.key_file, _key_pem(key))
        write_private(ca.cert_file, _cert_pem(cert))
        return ca

    def _load(self) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
        try:
            cert = x509.load_pem_x509_certificate(self.cert_file.read_bytes())
            key = serialization.load_pem_private_key(self.key_file.read_bytes(), password=None)
        except FileNotFoundError:
            raise NotFound(f"no cluster CA in {self.root}") from None
        if not isinstance(key, ec.EllipticCurvePrivateKey):
            raise AuthError(f"{self.key_file}: not an ECDSA key")
        return cert, key

    def cluster(self) -> str:
        """The cluster name the CA was made for."""
        cert, _ = self._load()
        org = cert.subject.get_attributes_for_oid(NameOID.ORGANIZATION_NAME)
        return str(org[0].value).removeprefix("aecp:") if org else ""

    def node_bundle(self, node: str) -> Bundle:
        return Bundle(self.root / "nodes" / node)

    def client_bundle(self, role: str) -> Bundle:
        return Bundle(self.root / "clients" / role)

    def issue_node(self, node: str, addresses: Sequence[str], *, days: int = LEAF_DAYS) -> Bundle:
        """A node's bundle (server and client use); ``addresses`` are its IP addresses.
        ``InvalidInput`` for a name off the naming rule or an address that is not an IP."""
        _check_principal("node", node)
        try:
            ips = [ipaddress.ip_address(a) for a in addresses]
        except ValueError as exc:
            raise InvalidInput("address", str(exc)) from None
        names: list[x509.GeneralName] = [x509.DNSName(node), x509.DNSName(ETCD_SERVER_NAME)]
        names += [x509.IPAddress(ip) for ip in ips]
        return self._issue(self.node_bundle(node), node, NODE, names, server=True, days=days)

    def issue_client(self, role: str, *, days: int = LEAF_DAYS) -> Bundle:
        """A client role's bundle (TLS client use only)."""
        _check_principal("role", role)
        if role == NODE:
            raise InvalidInput("role", "'node' is the role of node certificates")
        return self._issue(self.client_bundle(role), role, role, [], server=False, days=days)

    def bundles(self) -> list[Bundle]:
        """Every bundle issued under this CA directory."""
        out = []
        for kind in ("nodes", "clients"):
            base = self.root / kind
            if base.is_dir():
                out += [Bundle(d) for d in sorted(base.iterdir()) if (d / CERT).exists()]
        return out

    def rotate(self, *, days: int = LEAF_DAYS) -> list[Bundle]:
        """Re-issue every bundle with a new key and validity, keeping names, role and
        addresses. Returns the bundles rotated."""
        done = []
        for bundle in self.bundles():
            old = x509.load_pem_x509_certificate(bundle.cert_file.read_bytes())
            try:
                sans = list(
                    old.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
                )
            except x509.ExtensionNotFound:
                sans = []
            role = role_of(old)
            self._issue(bundle, common_name(old), role, sans, server=role == NODE, days=days)
            done.append(bundle)
        return done

    def _issue(
        self,
        bundle: Bundle,
        name: str,
        role: str,
        sans: Iterable[x509.GeneralName],
        *,
        server: bool,
        days: int,
    ) -> Bundle:
        ca_cert, ca_key = self._load()
        key = ec.generate_private_key(_CURVE)
        now = _now()
        usages = [ExtendedKeyUsageOID.CLIENT_AUTH] + ([ExtendedKeyUsageOID.SERVER_AUTH] * server)
        builder = (
            x509.CertificateBuilder()
            .subject_name(_subject(ca_cert, name, role))
            .issuer_name(ca_cert.subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - _CLOCK_SKEW)
            .not_valid_after(min(now + datetime.timedelta(days=days), ca_cert.not_valid_after_utc))
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage(usages), critical=False)
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), False
            )
        )
        sans = list(sans)
        if sans:
            builder = builder.add_extension(x509.SubjectAlternativeName(sans), critical=False)
        cert = builder.sign(ca_key, hashes.SHA256())
        _private_dir(bundle.dir)
        write_private(bundle.ca_file, _cert_pem(ca_cert))
        write_private(bundle.key_file, _key_pem(key))
        write_private(bundle.cert_file, _cert_pem(cert))
        return bundle


# ---- verification --------------------------------------------------------------------------


def check_issued(ca: x509.Certificate, cert: x509.Certificate) -> None:
    """``AuthError`` unless ``ca`` signed ``cert``."""
    try:
        cert.verify_directly_issued_by(ca)
    except (ValueError, TypeError, InvalidSignature) as exc:
        raise AuthError(
            f"certificate {common_name(cert)!r} was not issued by the cluster CA"
        ) from exc


def verify_peer(
    ca: x509.Certificate,
    cert: x509.Certificate,
    *,
    role: str,
    name: str | None = None,
    now: datetime.datetime | None = None,
) -> str:
    """Check a peer's certificate: issued by ``ca``, valid now, of ``role`` (and ``name``).
    Returns the peer's name; ``AuthError`` says what is wrong."""
    check_issued(ca, cert)
    now = now or _now()
    if not cert.not_valid_before_utc <= now <= cert.not_valid_after_utc:
        raise AuthError(
            f"certificate {common_name(cert)!r} is not valid now (valid "
            f"{cert.not_valid_before_utc:%Y-%m-%d} to {cert.not_valid_after_utc:%Y-%m-%d})"
        )
    if role_of(cert) != role:
        raise AuthError(f"certificate {common_name(cert)!r} is a {role_of(cert)!r}, not a {role!r}")
    peer = common_name(cert)
    if name is not None and peer != name:
        raise AuthError(f"certificate is for {peer!r}, expected {name!r}")
    return peer


def common_name(cert: x509.Certificate) -> str:
    """The certificate's CN; "" without one, "?" if its subject cannot be decoded (a peer's
    certificate is anything the peer sent)."""
    return _attribute(cert, NameOID.COMMON_NAME)


def role_of(cert: x509.Certificate) -> str:
    """The certificate's OU (the principal's role), as ``common_name``."""
    return _attribute(cert, NameOID.ORGANIZATIONAL_UNIT_NAME)


def _attribute(cert: x509.Certificate, oid: x509.ObjectIdentifier) -> str:
    try:
        attrs = cert.subject.get_attributes_for_oid(oid)
    except ValueError:
        return "?"
    return str(attrs[0].value) if attrs else ""


def fingerprint(cert_der: bytes) -> str:
    """``sha256:<hex>`` of a DER certificate."""
    return "sha256:" + hashlib.sha256(cert_der).hexdigest()


# ---- one-grant client credentials (NBD exports) --------------------------------------------


def grant_credential(name: str, *, days: int) -> tuple[bytes, bytes, bytes]:
    """A client credential of its own for one grant (an NBD export), apart from the cluster CA:
    (CA certificate PEM, client certificate PEM, client key PEM).

    The CA is made here, signs the client certificate and its key is thrown away, so nothing
    can issue another certificate under it; the grant names the CA's certificate. (A CA, not
    a lone self-signed certificate, because QEMU checks that its own certificate chains to a
    CA certificate in its ca-cert.pem.)"""
    ca_key = ec.generate_private_key(_CURVE)
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, f"{name} CA")])
    ca = _self_signed(
        ca_key,
        ca_name,
        days,
        (x509.BasicConstraints(ca=True, path_length=0), True),
        (x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), False),
    )
    key = ec.generate_private_key(_CURVE)
    now = _now()
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)]))
        .issuer_name(ca_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - _CLOCK_SKEW)
        .not_valid_after(ca.not_valid_after_utc)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), False
        )
        .sign(ca_key, hashes.SHA256())
    )
    return _cert_pem(ca), _cert_pem(cert), _key_pem(key)


def _self_signed(
    key: ec.EllipticCurvePrivateKey,
    subject: x509.Name,
    days: int,
    *extensions: tuple[x509.ExtensionType, bool],
) -> x509.Certificate:
    """A certificate for ``key`` signed by itself, valid ``days`` (extension, critical)."""
    now = _now()
    builder = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - _CLOCK_SKEW)
        .not_valid_after(now + datetime.timedelta(days=days))
    )
    for extension, critical in extensions:
        builder = builder.add_extension(extension, critical=critical)
    return builder.sign(key, hashes.SHA256())


# ---- files ----------------------------------------------------------------------------------


def write_private(path: Path, data: bytes) -> None:
    """Replace ``path`` atomically with ``data``, mode 0600 from the first byte."""
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _check_principal(field: str, name: str) -> None:
    """A node or role name is a directory name in the CA: the object-name rule, nothing
    that could leave its directory (``../nodes/n1``)."""
    if not NAME_RE.fullmatch(name):
        raise InvalidInput(field, f"{name!r} is not a valid name ({NAME_RULE})")


def _private_dir(path: Path) -> None:
    path.mkdir(parents=True, exist_ok=True, mode=0o700)
    path.chmod(0o700)


def _subject(ca_cert: x509.Certificate, name: str, role: str) -> x509.Name:
    org = ca_cert.subject.get_attributes_for_oid(NameOID.ORGANIZATION_NAME)
    attrs = [x509.NameAttribute(NameOID.ORGANIZATION_NAME, str(org[0].value))] if org else []
    attrs += [
        x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, role),
        x509.NameAttribute(NameOID.COMMON_NAME, name),
    ]
    return x509.Name(attrs)


def _now() -> datetime.datetime:
    return datetime.datetime.now(datetime.UTC)


def _cert_pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def _public_der(key: object) -> bytes:
    return key.public_bytes(  # type: ignore[attr-defined, no-any-return]
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
