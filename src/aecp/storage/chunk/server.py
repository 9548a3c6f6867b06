"""The chunk server: a node's ``ReplicaStore`` served over the replica protocol (``wire``).

Admission: the server accepts connections itself and authenticates each one (``auth``: a
signed handshake, or TLS when the client asks for encryption) before the replica protocol
starts on it; a connection that does not send its hello within ``HELLO_TIMEOUT`` or prove a
node certificate of the cluster within ``handshake_timeout`` is closed. At most
``MAX_HANDSHAKES_PER_ADDRESS`` handshakes run at once from one client (an IPv4 address or an
IPv6 /64; more are closed at once) and ``MAX_HANDSHAKES`` in all; when all are taken, the
oldest handshake of the client holding the most gives way to the new one, so connections that
hold slots without authenticating cannot lock the nodes out (nodes connect from their own
address: ``ChunkClient(source=...)``). Refusals are
logged at most once per ``REFUSAL_LOG_EVERY`` seconds, with the count of those not logged.

Three pieces: the codec (``wire.RequestDecoder``), the session (``_Session``: one connection,
a small state machine OPEN -> CLOSED), and the handler (``_Handler``: one request -> one store
call -> one response). A session runs up to ``max_inflight`` requests of its connection at once
and answers each as it finishes (out of order); beyond that it stops reading the socket until
requests finish. Responses produced in one event-loop iteration leave in one ``send``.

A malformed frame closes the connection (logged); an error of one request is answered with its
status code and the connection goes on. ``stop`` closes every connection and cancels the
requests in flight (their clients see ``ReplicaUnavailable``); it does not close the store.
"""

from __future__ import annotations

import asyncio
import collections
import enum
import functools
import logging
import socket
import ssl
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, cast

from cryptography import x509

from aecp.common import tasks
from aecp.common.addresses import client_key
from aecp.common.pki import NODE, AuthError, verify_peer
from aecp.common.ratelog import RefusalLog
from aecp.common.receive import Intake, Receiver
from aecp.storage.chunk import wire
from aecp.storage.chunk.api import Buffer
from aecp.storage.chunk.auth import Mode, ReplicaAuth, server_handshake
from aecp.storage.chunk.errors import ChunkError, ChunkInvalid, ChunkProtocolError
from aecp.storage.chunk.store import ReplicaStore
from aecp.storage.chunk.wire import MAX_DATA, MAX_PAYLOAD, Op, Request, Status

log = logging.getLogger(__name__)
MAX_HANDSHAKES = 64
MAX_HANDSHAKES_PER_ADDRESS = 8  # a node's two pools hold 2 connections each to every peer
HELLO_TIMEOUT = 1.0
REFUSAL_LOG_EVERY = 10.0


class ChunkServer:
    """Serves ``store`` on ``host:port`` (port 0: any free port, see ``port`` after start) to
    the nodes ``auth`` lets in."""

    def __init__(
        self,
        store: ReplicaStore,
        host: str,
        port: int = 0,
        *,
        auth: ReplicaAuth,
        max_inflight: int = 256,
        handshake_timeout: float = 5.0,
    ) -> None:
        self.host = host
        self._port = port
        self._auth = auth
        self._handler = _Handler(store)
        self._max_inflight = max_inflight
        self._handshake_timeout = handshake_timeout
        self._listener: socket.socket | None = None
        self._acceptor: asyncio.Task[None] | None = None
        self._admitting: dict[asyncio.Task[None], _Pending] = {}  # in arrival order
        self._per_client: collections.Counter[str] = collections.Counter()
        self._sessions: set[_Session] = set()
        self.intake = Intake()  # staging and payload budget shared by the sessions
        self.refused = 0  # connections refused (authentication, limits): for tests and logs
        self._refusals = RefusalLog(log, REFUSAL_LOG_EVERY)

    @property
    def port(self) -> int:
        """The port listened on (the real one once started)."""
        return self._port

    async def start(self) -> None:
        """Listen; raises ``OSError`` if the address cannot be bound."""
        if self._listener is not None:
            return
        family = socket.AF_INET6 if ":" in self.host else socket.AF_INET
        listener = socket.create_server((self.host, self._port), family=family, backlog=256)
        listener.setblocking(False)
        self._listener = listener
        self._port = listener.getsockname()[1]
        self._acceptor = tasks.spawn(self._accept_loop(listener), name=f"chunk-accept-{self.port}")
        log.info("chunk server listening on %s:%d", self.host, self._port)

    async def stop(self) -> None:
        """Stop listening, drop every connection and cancel its requests (idempotent)."""
        listener, self._listener = self._listener, None
        if listener is None:
            return
        await tasks.cancel(self._acceptor, *self._admitting)
        listener.close()
        sessions = list(self._sessions)
        for session in sessions:
            session.abort("server stopping", logging.INFO)
        await asyncio.gather(*(s.wait_closed() for s in sessions))
        log.info("chunk server on %s:%d stopped", self.host, self._port)

    async def _accept_loop(self, listener: socket.socket) -> None:
        loop = asyncio.get_running_loop()
        while True:
            try:
                conn, addr = await loop.sock_accept(listener)
            except OSError as exc:  # out of file descriptors, say: try again soon
                log.warning("chunk server: accepting failed: %s", exc)
                await asyncio.sleep(0.1)
                continue
            peer, client = f"{addr[0]}:{addr[1]}", client_key(str(addr[0]))
            if self._per_client[client] >= MAX_HANDSHAKES_PER_ADDRESS:
                self._refuse(conn, peer, f"{MAX_HANDSHAKES_PER_ADDRESS} handshakes from {client}")
                continue
            if len(self._admitting) >= MAX_HANDSHAKES:
                self._evict()
            task = loop.create_task(self._admit(conn, peer))
            self._admitting[task] = _Pending(conn, peer, client)
            self._per_client[client] += 1
            task.add_done_callback(self._handshake_done)

    def _evict(self) -> None:
        """Give a slot back: the oldest handshake of the client that holds the most."""
        busiest = max(self._per_client, key=self._per_client.__getitem__)
        task = next(t for t, p in self._admitting.items() if p.client == busiest)
        pending = self._forget(task)
        if pending is not None:
            self._refuse(pending.conn, pending.peer, "not authenticated yet: every slot taken")
        task.cancel()

    def _forget(self, task: asyncio.Task[None]) -> _Pending | None:
        pending = self._admitting.pop(task, None)
        if pending is not None:
            self._per_client[pending.client] -= 1
            if self._per_client[pending.client] <= 0:
                del self._per_client[pending.client]
        return pending

    def _handshake_done(self, task: asyncio.Task[None]) -> None:
        self._forget(task)

    async def _admit(self, conn: socket.socket, peer: str) -> None:
        """Authenticate ``conn``, then serve the replica protocol on it (in TLS if asked)."""
        conn.setblocking(False)
        try:
            auth = await server_handshake(conn, self._auth, self._handshake_timeout, HELLO_TIMEOUT)
        except (AuthError, OSError, TimeoutError) as exc:
            self._refuse(conn, peer, f"authentication failed: {exc or 'timed out'}")
            return
        except asyncio.CancelledError:  # evicted (closed and counted already), or stopping
            conn.close()
            raise
        except Exception as exc:  # whatever a peer's bytes provoke: refuse, never crash
            self._refuse(conn, peer, f"authentication failed: {exc!r}")
            return
        tls = None
        try:
            tls = self._auth.credentials.server_context() if auth.mode is Mode.TLS else None
            session = await self._serve(conn, tls)
        except (OSError, TimeoutError, ssl.SSLError) as exc:
            self._refuse(conn, peer, f"TLS failed: {exc}" if tls else str(exc))
            return
        except Exception as exc:  # e.g. credentials that could not be loaded just now
            self._refuse(conn, peer, f"not served: {exc!r}")
            return
        name = auth.peer or session.peer_node
        if not name:  # a TLS peer without a node certificate: the session dropped it
            self.refused += 1
            return
        how = "TLS" if tls else "signed handshake"
        log.info("chunk server: %s authenticated as node %s (%s)", peer, name, how)

    async def _serve(self, conn: socket.socket, tls: ssl.SSLContext | None) -> _Session:
        """Hand ``conn`` to a session (after the TLS handshake, with ``tls``). The session is
        the one the factory made (uvloop returns its TLS wrapper as the protocol)."""
        ca = self._auth.credentials.identity().ca if tls is not None else None
        session = self._session(ca)
        await asyncio.get_running_loop().connect_accepted_socket(
            lambda: session,
            conn,
            ssl=tls,
            ssl_handshake_timeout=self._handshake_timeout if tls is not None else None,
        )
        return session

    def _refuse(self, conn: socket.socket, peer: str, reason: str) -> None:
        """Close ``conn``; log it unless another refusal was logged in the last
        ``REFUSAL_LOG_EVERY`` seconds (then it is counted in the next line)."""
        self.refused += 1
        conn.close()
        self._refusals.warning("chunk server: refused the connection from %s: %s", peer, reason)

    def _session(self, tls_ca: x509.Certificate | None = None) -> _Session:
        return _Session(self._handler, self._max_inflight, self._sessions, self.intake, tls_ca)


@dataclass(frozen=True)
class _Pending:
    """A connection whose handshake runs: its socket, who sent it, and the client it counts
    against (``client_key``)."""

    conn: socket.socket
    peer: str
    client: str


def tls_peer(transport: asyncio.BaseTransport, ca: x509.Certificate) -> str:
    """The node name in a TLS peer's certificate (OpenSSL checked it against the CA; a client
    role's certificate is refused here). ``AuthError`` otherwise."""
    obj = transport.get_extra_info("ssl_object")
    der = obj.getpeercert(binary_form=True) if obj is not None else None
    if not der:
        raise AuthError("no client certificate")
    return verify_peer(ca, x509.load_der_x509_certificate(der), role=NODE)


class SessionState(enum.Enum):
    OPEN = "open"
    CLOSED = "closed"


class _Session(asyncio.BufferedProtocol):
    """One client connection. Bytes are read into buffers ``common.receive.Receiver``
    chooses: a WRITE's data lands in the buffer the store then writes from.

    Over TLS (``tls_ca``), the peer's certificate must be a node's: checked when the
    connection is made, before any byte of it is read as a request."""

    def __init__(
        self,
        handler: _Handler,
        max_inflight: int,
        registry: set[_Session],
        intake: Intake,
        tls_ca: x509.Certificate | None = None,
    ) -> None:
        self.state = SessionState.OPEN
        self.peer_node = ""
        self._tls_ca = tls_ca
        self._handler = handler
        self._max = max_inflight
        self._registry = registry
        self._decoder = wire.RequestDecoder(intake=intake)
        self._receiver = Receiver(intake)
        self._transport: asyncio.Transport | None = None
        self._peer = "?"
        self._tasks: set[asyncio.Future[None]] = set()  # requests running (tasks or writes)
        self._backlog: collections.deque[Request] = collections.deque()
        self._out: list[Buffer] = []
        self._reading_paused = False
        self._writing_paused = False
        self._closed: asyncio.Future[None] | None = None

    # --- asyncio.Protocol ----------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = cast(asyncio.Transport, transport)  # uvloop's is no subclass
        self._closed = asyncio.get_running_loop().create_future()
        peer = transport.get_extra_info("peername")
        self._peer = f"{peer[0]}:{peer[1]}" if peer else "?"
        if self._tls_ca is not None:
            try:
                self.peer_node = tls_peer(transport, self._tls_ca)
            except AuthError as exc:
                log.warning("chunk server: refused the connection from %s: %s", self._peer, exc)
                self.state = SessionState.CLOSED
                self._closed.set_result(None)
                self._transport.abort()
                return
        self._registry.add(self)
        log.info("chunk server: connection from %s", self._peer)

    def get_buffer(self, sizehint: int) -> memoryview:
        return self._receiver.get(self._decoder)

    def buffer_updated(self, nbytes: int) -> None:
        if self.state is not SessionState.OPEN:
            return
        try:
            requests = self._receiver.updated(self._decoder, nbytes)
        except ChunkProtocolError as e:
            self.abort(f"protocol error: {e}")
            return
        for request in requests:
            if len(self._tasks) < self._max:
                self._start(request)
            else:
                self._backlog.append(request)
        self._update_reading()

    def connection_lost(self, exc: Exception | None) -> None:
        self.state = SessionState.CLOSED
        self._decoder.abandon()
        self._registry.discard(self)
        self._backlog.clear()
        for task in self._tasks:
            task.cancel()
        if self._closed is not None and not self._closed.done():
            self._closed.set_result(None)
        log.info("chunk server: connection from %s closed%s", self._peer, f": {exc}" if exc else "")

    def pause_writing(self) -> None:
        self._writing_paused = True
        self._update_reading()

    def resume_writing(self) -> None:
        self._writing_paused = False
        self._update_reading()

    # --- session -------------------------------------------------------------------------

    def abort(self, reason: str, level: int = logging.WARNING) -> None:
        """Drop the connection at once (its requests are cancelled)."""
        if self.state is SessionState.OPEN and self._transport is not None:
            log.log(level, "chunk server: dropping connection from %s: %s", self._peer, reason)
            self._transport.abort()

    async def wait_closed(self) -> None:
        """Return once the connection is closed and its requests have ended."""
        if self._closed is not None:
            await self._closed
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)

    def _start(self, request: Request) -> None:
        if request.op is Op.WRITE and not request.flags & wire.FLAG_FUA:
            data, crcs = wire.split_crcs(request)
            fut = self._handler.store.write_nowait(
                request.extent_id,
                request.offset,
                data,
                epoch=request.epoch,
                generation=request.generation,
                crcs=crcs,
            )
            if fut is not None:  # started at once: no task, answered from its callback
                self._tasks.add(fut)
                fut.add_done_callback(functools.partial(self._written, request.request_id))
                return
        task = asyncio.get_running_loop().create_task(self._serve(request))
        self._tasks.add(task)
        task.add_done_callback(self._finished)

    def _written(self, request_id: int, fut: asyncio.Future[None]) -> None:
        if not fut.cancelled():
            exc = fut.exception()
            status, payload = (Status.OK, b"") if exc is None else self._handler.error(exc)
            self._send(wire.encode_response(Op.WRITE, status, request_id, payload))
        self._finished(fut)

    def _finished(self, task: asyncio.Future[None]) -> None:
        self._tasks.discard(task)
        if self.state is SessionState.OPEN:
            while self._backlog and len(self._tasks) < self._max:
                self._start(self._backlog.popleft())
            self._update_reading()

    def _update_reading(self) -> None:
        transport = self._transport
        if transport is None or self.state is not SessionState.OPEN:
            return
        pause = self._writing_paused or len(self._backlog) >= self._max
        if pause != self._reading_paused:
            self._reading_paused = pause
            (transport.pause_reading if pause else transport.resume_reading)()

    async def _serve(self, request: Request) -> None:
        status, payload = await self._handler.handle(request)
        self._send(wire.encode_response(request.op, status, request.request_id, payload))

    def _send(self, buffers: list[Buffer]) -> None:
        if self.state is not SessionState.OPEN:
            return
        if not self._out:
            asyncio.get_running_loop().call_soon(self._flush_out)
        self._out += buffers

    def _flush_out(self) -> None:
        out, self._out = self._out, []
        if self.state is SessionState.OPEN and self._transport is not None and out:
            self._transport.writelines(out)


class _Handler:
    """One request in, one store call, (status, payload) out."""

    def __init__(self, store: ReplicaStore) -> None:
        self.store = store
        self._ops: dict[Op, Callable[[Request], Awaitable[bytes]]] = {
            op: getattr(self, f"_{op.name.lower()}") for op in Op
        }

    async def handle(self, request: Request) -> tuple[Status, bytes]:
        try:
            return Status.OK, await self._ops[request.op](request)
        except Exception as e:
            if not isinstance(e, ChunkError):
                log.exception("chunk server: %s on %s failed", request.op.name, request.extent_id)
            return self.error(e)

    @staticmethod
    def error(exc: BaseException) -> tuple[Status, bytes]:
        """The status and payload that answer a request which raised ``exc``."""
        if isinstance(exc, ChunkProtocolError):
            return wire.encode_error(ChunkInvalid(f"malformed payload: {exc}"))
        if isinstance(exc, ChunkError):
            return wire.encode_error(exc)
        return wire.encode_error(ChunkError(f"internal error: {exc!r}"))

    async def _ping(self, r: Request) -> bytes:
        return b""

    async def _create(self, r: Request) -> bytes:
        await self.store.create(r.extent_id, r.length, epoch=r.epoch, generation=r.generation)
        return b""

    async def _delete(self, r: Request) -> bytes:
        await self.store.delete(r.extent_id, r.epoch)
        return b""

    async def _stat(self, r: Request) -> bytes:
        return wire.encode_stat(await self.store.stat(r.extent_id))

    async def _list(self, r: Request) -> bytes:
        return wire.encode_ids(await self.store.list_extents())

    async def _write(self, r: Request) -> bytes:
        fua = bool(r.flags & wire.FLAG_FUA)
        data, crcs = wire.split_crcs(r)
        await self.store.write(
            r.extent_id, r.offset, data, epoch=r.epoch, generation=r.generation, fua=fua,
            crcs=crcs,
        )  # fmt: skip
        return b""

    async def _read(self, r: Request) -> bytes:
        _check_length(r.length)
        return await self.store.read(r.extent_id, r.offset, r.length)

    async def _trim(self, r: Request) -> bytes:
        await self.store.trim(r.extent_id, r.offset, r.length, **_versions(r))
        return b""

    async def _zero(self, r: Request) -> bytes:
        await self.store.write_zeroes(r.extent_id, r.offset, r.length, **_versions(r))
        return b""

    async def _flush(self, r: Request) -> bytes:
        await self.store.flush(r.extent_id or None)
        return b""

    async def _fence(self, r: Request) -> bytes:
        return wire.encode_u64(await self.store.fence(r.extent_id, r.epoch))

    async def _set_gen(self, r: Request) -> bytes:
        await self.store.set_generation(r.extent_id, r.generation)
        return b""

    async def _modified_since(self, r: Request) -> bytes:
        return _bounded(
            wire.encode_ranges(await self.store.modified_since(r.extent_id, r.generation))
        )

    async def _allocation(self, r: Request) -> bytes:
        return _bounded(wire.encode_runs(await self.store.allocation(r.extent_id)))

    async def _read_raw(self, r: Request) -> bytes:
        _check_length(r.length)
        return wire.encode_raw(await self.store.read_raw(r.extent_id, r.offset, r.length))

    async def _write_raw(self, r: Request) -> bytes:
        await self.store.write_raw(r.extent_id, wire.decode_raw(r.payload), r.epoch or None)
        return b""

    async def _scrub(self, r: Request) -> bytes:
        return _bounded(wire.encode_sectors(await self.store.scrub(r.extent_id)))

    async def _repair(self, r: Request) -> bytes:
        await self.store.repair(r.extent_id, r.offset, r.payload, r.epoch)
        return b""


def _versions(r: Request) -> dict[str, Any]:
    return {"epoch": r.epoch, "generation": r.generation}


def _check_length(length: int) -> None:
    if length > MAX_DATA:
        raise ChunkInvalid(f"{length} bytes is more than one request may read ({MAX_DATA})")


def _bounded(payload: bytes) -> bytes:
    if len(payload) > MAX_PAYLOAD:
        raise ChunkInvalid("the answer is larger than the replica protocol allows")
    return payload
