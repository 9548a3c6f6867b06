"""TLS contexts built from the cluster's credential bundles (``common.pki``), and a bundle that
reloads itself after ``aecp cluster rotate-certs`` replaced its files.

Contexts are TLS 1.2 or newer, verify the peer against the cluster CA (a server asks for a
client certificate when told to) and check the server's name: a node's certificate names the
node (and ``pki.ETCD_SERVER_NAME``), so a client says which node it meant to reach.
"""

from __future__ import annotations

import logging
import ssl
import time

from aecp.common.errors import AecpError
from aecp.common.pki import Bundle, Identity

log = logging.getLogger(__name__)

RECHECK_S = 2.0
"""How often (at most) a ``Credentials`` looks whether its files changed."""


def server_context(bundle: Bundle, *, client_ca: bytes | None = None) -> ssl.SSLContext:
    """A server context presenting ``bundle``'s certificate that requires a client certificate
    issued by the cluster CA, or, with ``client_ca``, by one of those PEM certificates."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.load_cert_chain(bundle.cert_file, bundle.key_file)
    ctx.verify_mode = ssl.CERT_REQUIRED
    if client_ca is None:
        ctx.load_verify_locations(cafile=bundle.ca_file)
    elif client_ca:
        ctx.load_verify_locations(cadata=client_ca.decode())
    ctx.num_tickets = 0  # no session resumption: every connection proves its key again
    return ctx


def client_context(bundle: Bundle) -> ssl.SSLContext:
    """A client context presenting ``bundle``'s certificate and trusting only the cluster CA;
    the caller passes the expected node name as ``server_hostname``."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.load_cert_chain(bundle.cert_file, bundle.key_file)
    ctx.load_verify_locations(cafile=bundle.ca_file)
    ctx.check_hostname = True
    ctx.verify_mode = ssl.CERT_REQUIRED
    return ctx


class Credentials:
    """A bundle's identity and contexts, loaded once and again whenever its files change.

    A change is looked for at most every ``RECHECK_S`` seconds. A bundle caught half-rotated
    (the certificate does not match the key yet) or unreadable keeps the last good identity
    and is looked at again on the next check; only a bundle that never loaded raises.
    """

    def __init__(self, bundle: Bundle) -> None:
        self.bundle = bundle
        self._stamp: tuple[int, ...] | None = None
        self._checked = 0.0
        self._identity: Identity | None = None
        self._server: ssl.SSLContext | None = None
        self._client: ssl.SSLContext | None = None

    def identity(self) -> Identity:
        self._refresh()
        assert self._identity is not None
        return self._identity

    def server_context(self) -> ssl.SSLContext:
        """Server side, client certificates from the cluster CA required."""
        self._refresh()
        if self._server is None:
            self._server = server_context(self.bundle)
        return self._server

    def client_context(self) -> ssl.SSLContext:
        self._refresh()
        if self._client is None:
            self._client = client_context(self.bundle)
        return self._client

    def _refresh(self) -> None:
        now = time.monotonic()
        if self._identity is not None and now - self._checked < RECHECK_S:
            return
        self._checked = now
        stamp = self.bundle.stamp()
        if stamp == self._stamp and self._identity is not None:
            return
        try:
            identity = self.bundle.load()
        except (AecpError, ValueError, OSError) as exc:
            if self._identity is None:
                raise
            log.warning("credentials in %s not reloaded: %s", self.bundle.dir, exc)
            return
        if self._identity is not None:
            log.info("credentials in %s reloaded (new certificate)", self.bundle.dir)
        self._identity, self._stamp = identity, stamp
        self._server = self._client = None
