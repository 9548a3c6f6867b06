"""Authentication of replica connections: before any request, both ends prove that they hold
the private key of a node certificate issued by the cluster CA (``common.pki``).

Spec — AECP replica authentication, version 1. It runs on a new TCP connection before the
replica protocol (``wire``). Each message is a u32 length (big-endian, at most
``MAX_MESSAGE``) and a body. The client picks the mode:

- ``SIGNED``: a signed challenge-response on the plain connection, then the replica protocol
  in clear (the default: a dedicated storage network, no per-byte cost)::

    C→S HELLO      magic "AECPREP1" | mode u8 = 0 | client nonce (32) | client cert (DER)
    S→C CHALLENGE  status u8 = 0 | server nonce (32) | u16 cert length | server cert (DER)
                   | signature of SERVER_LABEL + HELLO body + nonce + cert
    C→S PROOF      signature of CLIENT_LABEL + HELLO body + CHALLENGE body
    S→C RESULT     status u8 = 0

- ``TLS``: the stream is encrypted; TLS with certificates required on both sides does the
  authentication (``common.tls``)::

    C→S HELLO      magic "AECPREP1" | mode u8 = 1
    S→C RESULT     status u8 = 0, then both start TLS (the client names the node it expects)

A refusal is a CHALLENGE or RESULT with status 1 and a UTF-8 reason; the server closes the
connection after it. Signatures are ECDSA with SHA-256; both nonces are fresh random bytes, so
no message of an earlier connection can be replayed. Each side also signs the connection as it
sees it (``binding``: client address and port, then server address and port), so a relay that
ends the client's TCP connection and opens its own to the server gets signatures that do not
check out (the storage network has no NAT between nodes). The server accepts any node of the
cluster; the client accepts only the node it meant to reach (the certificate's name). A server
that requires encryption refuses ``SIGNED``.

``ClientAuth`` and ``ServerAuth`` are sans-I/O (bytes in, bytes out); ``client_handshake`` and
``server_handshake`` run them on a socket under a deadline.
"""

from __future__ import annotations

import asyncio
import enum
import secrets
import socket
import struct
from dataclasses import dataclass

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec

from aecp.common.pki import NODE, AuthError, Identity, verify_peer
from aecp.common.tls import Credentials

MAGIC = b"AECPREP1"
MAX_MESSAGE = 8192
NONCE = 32
SERVER_LABEL = b"aecp replica auth v1 server\0"
CLIENT_LABEL = b"aecp replica auth v1 client\0"
OK, REFUSED = 0, 1
_LEN = struct.Struct(">I")
_U16 = struct.Struct(">H")
_SIGNATURE = ec.ECDSA(hashes.SHA256())


class Mode(enum.IntEnum):
    SIGNED = 0
    TLS = 1


@dataclass(frozen=True)
class ReplicaAuth:
    """A node's side of replica authentication: its credentials, and whether it encrypts (as
    a client: asks for TLS; as a server: refuses connections that do not)."""

    credentials: Credentials
    encrypt: bool = False

    @property
    def mode(self) -> Mode:
        return Mode.TLS if self.encrypt else Mode.SIGNED


class ClientAuth:
    """The client's half: ``hello()``, then ``answer(challenge)`` (SIGNED) and ``done(result)``.

    ``expected`` is the node the client means to reach; ``AuthError`` for any refusal or any
    message that does not check out."""

    def __init__(self, identity: Identity, expected: str, mode: Mode, binding: bytes = b"") -> None:
        self.identity = identity
        self.expected = expected
        self.mode = mode
        self.binding = binding
        self._hello = b""

    def hello(self) -> bytes:
        body = MAGIC + bytes([self.mode])
        if self.mode is Mode.SIGNED:
            body += secrets.token_bytes(NONCE) + self.identity.cert_der()
        self._hello = body
        return body

    def answer(self, challenge: bytes) -> bytes:
        """The PROOF answering the server's CHALLENGE (the server is checked first)."""
        _check_status(challenge, "server")
        try:
            nonce = challenge[1 : 1 + NONCE]
            (cert_len,) = _U16.unpack_from(challenge, 1 + NONCE)
            start = 1 + NONCE + _U16.size
            cert_der, signature = challenge[start : start + cert_len], challenge[start + cert_len :]
            if len(nonce) != NONCE or len(cert_der) != cert_len or not signature:
                raise ValueError("short")
            cert = x509.load_der_x509_certificate(cert_der)
        except (ValueError, struct.error) as exc:
            raise AuthError(f"malformed challenge from {self.expected}") from exc
        verify_peer(self.identity.ca, cert, role=NODE, name=self.expected)
        signed = SERVER_LABEL + self.binding + self._hello + nonce + cert_der
        _verify(cert, signature, signed, self.expected)
        return self.identity.key.sign(
            CLIENT_LABEL + self.binding + self._hello + challenge, _SIGNATURE
        )

    def done(self, result: bytes) -> None:
        _check_status(result, "server")


class ServerAuth:
    """The server's half: ``receive(hello)`` answers a HELLO; in SIGNED mode ``receive(proof)``
    answers the PROOF. ``peer`` names the client once ``accepted``.

    ``AuthError`` for a client that does not check out (the server sends ``refusal(reason)``
    and closes)."""

    def __init__(
        self, identity: Identity, *, require_tls: bool = False, binding: bytes = b""
    ) -> None:
        self.identity = identity
        self.require_tls = require_tls
        self.binding = binding
        self.mode: Mode | None = None
        self.peer = ""
        self.accepted = False
        self._hello = b""
        self._challenge = b""
        self._client: x509.Certificate | None = None

    def receive(self, message: bytes) -> bytes:
        if self.mode is None:
            return self._on_hello(message)
        return self._on_proof(message)

    def _on_hello(self, hello: bytes) -> bytes:
        if not hello.startswith(MAGIC) or len(hello) < len(MAGIC) + 1:
            raise AuthError("not an AECP replica connection (bad greeting)")
        try:
            mode = Mode(hello[len(MAGIC)])
        except ValueError:
            raise AuthError(f"unknown authentication mode {hello[len(MAGIC)]}") from None
        if mode is Mode.TLS:
            if len(hello) != len(MAGIC) + 1:
                raise AuthError("malformed hello")
            self.mode = mode
            return bytes([OK])
        if self.require_tls:
            raise AuthError("this server requires encrypted replica connections (TLS)")
        try:
            cert = x509.load_der_x509_certificate(hello[len(MAGIC) + 1 + NONCE :])
        except ValueError as exc:
            raise AuthError("malformed hello: no certificate") from exc
        if len(hello) < len(MAGIC) + 1 + NONCE:
            raise AuthError("malformed hello")
        self.peer = verify_peer(self.identity.ca, cert, role=NODE)
        self.mode, self._hello, self._client = mode, hello, cert
        nonce = secrets.token_bytes(NONCE)
        own = self.identity.cert_der()
        signed = SERVER_LABEL + self.binding + hello + nonce + own
        signature = self.identity.key.sign(signed, _SIGNATURE)
        self._challenge = bytes([OK]) + nonce + _U16.pack(len(own)) + own + signature
        return self._challenge

    def _on_proof(self, proof: bytes) -> bytes:
        if self.mode is not Mode.SIGNED or self._client is None or self.accepted:
            raise AuthError("unexpected message")
        signed = CLIENT_LABEL + self.binding + self._hello + self._challenge
        _verify(self._client, proof, signed, self.peer)
        self.accepted = True
        return bytes([OK])


def refusal(reason: str) -> bytes:
    return bytes([REFUSED]) + reason.encode()[: MAX_MESSAGE - 1]


def _check_status(message: bytes, who: str) -> None:
    if not message:
        raise AuthError(f"empty answer from the {who}")
    if message[0] != OK:
        raise AuthError(f"refused by the {who}: {message[1:].decode(errors='replace')}")


def _verify(cert: x509.Certificate, signature: bytes, data: bytes, who: str) -> None:
    key = cert.public_key()
    if not isinstance(key, ec.EllipticCurvePublicKey):
        raise AuthError(f"{who}: not an ECDSA certificate")
    try:
        key.verify(signature, data, _SIGNATURE)
    except InvalidSignature:
        raise AuthError(f"{who} did not prove it holds its certificate's key") from None


# ---- on a socket ----------------------------------------------------------------------------


async def client_handshake(
    sock: socket.socket, auth: ReplicaAuth, expected: str, timeout: float
) -> Mode:
    """Authenticate a connected socket as a client of node ``expected``; returns the mode
    (for ``TLS`` the caller starts TLS next). ``AuthError``, ``OSError`` or ``TimeoutError``
    on failure (the caller closes the socket)."""
    binding = connection_binding(sock.getsockname(), sock.getpeername())
    client = ClientAuth(auth.credentials.identity(), expected, auth.mode, binding)
    async with asyncio.timeout(timeout):
        await send(sock, client.hello())
        if client.mode is Mode.SIGNED:
            await send(sock, client.answer(await receive(sock)))
        client.done(await receive(sock))
    return client.mode


async def server_handshake(
    sock: socket.socket, auth: ReplicaAuth, timeout: float, hello_timeout: float | None = None
) -> ServerAuth:
    """Authenticate a client on an accepted socket; returns the finished ``ServerAuth`` (its
    ``mode`` and ``peer``). The hello must arrive within ``hello_timeout``, everything within
    ``timeout``. On ``AuthError`` the refusal has been sent; the caller closes."""
    binding = connection_binding(sock.getpeername(), sock.getsockname())
    server = ServerAuth(auth.credentials.identity(), require_tls=auth.encrypt, binding=binding)
    async with asyncio.timeout(timeout):
        try:
            async with asyncio.timeout(hello_timeout):
                hello = await receive(sock)
            await send(sock, server.receive(hello))
            if server.mode is Mode.SIGNED:
                await send(sock, server.receive(await receive(sock)))
        except AuthError as exc:
            await send(sock, refusal(exc.message))
            raise
    return server


def connection_binding(client: tuple[object, ...], server: tuple[object, ...]) -> bytes:
    """The connection as one side sees it: client host:port > server host:port."""
    return f"{client[0]}:{client[1]}>{server[0]}:{server[1]}".encode()


async def send(sock: socket.socket, body: bytes) -> None:
    await asyncio.get_running_loop().sock_sendall(sock, _LEN.pack(len(body)) + body)


async def receive(sock: socket.socket) -> bytes:
    """One message; ``AuthError`` if it is too long, ``ConnectionError`` at EOF."""
    (length,) = _LEN.unpack(await _exactly(sock, _LEN.size))
    if length > MAX_MESSAGE:
        raise AuthError(f"handshake message of {length} bytes (at most {MAX_MESSAGE})")
    return await _exactly(sock, length)


async def _exactly(sock: socket.socket, n: int) -> bytes:
    loop = asyncio.get_running_loop()
    buf = bytearray(n)
    view = memoryview(buf)
    got = 0
    while got < n:
        k = await loop.sock_recv_into(sock, view[got:])
        if k == 0:
            raise ConnectionError("the peer closed the connection during authentication")
        got += k
    return bytes(buf)
