"""``NbdServer``: NBD on a Unix socket (this node's QEMU: every export, no TLS; only root can
open it) and over TCP (outside clients: TLS required, each sees the exports its certificate is
granted), one ``NbdSession`` per connection.

Limits (``Limits``): a client that has not finished negotiating within ``handshake_timeout``
is dropped; a TCP connection idle (no request in flight, nothing received) for
``idle_timeout`` is closed; one client (an IPv4 address or an IPv6 /64) holds at most
``max_per_client`` TCP connections, and at most ``max_negotiating`` TCP connections negotiate
at once (more are closed at once); a negotiation of more than ``MAX_OPTIONS`` options is ended.
``revoke`` closes the TLS connections of credentials no longer granted.

A connection is an ``asyncio.BufferedProtocol`` whose bytes go straight into the session's
sans-I/O parser (no stream buffer in between; a large WRITE's payload is read into its own
buffer, ``common.receive``). Its life runs in a guarded task
(``common.tasks.spawn``): negotiation is sequential; in transmission, ``buffer_updated`` starts
each complete request (a WRITE's payload with its header) as its own task — or, for a WRITE
the device starts at once (``BlockDevice.write_nowait``), as a future answered from its
callback — at most
``max_inflight`` per connection, and stops reading the socket while all slots are taken or
replies back up. Replies go out as requests finish, so they may be out of order (the cookie
matches them, proto.md "Transmission").

Ordering: a FLUSH calls ``device.flush()`` when it is received, and the device contract makes
every write that completed (and so every write already answered) durable — what proto.md
"Ordering of messages and writes" asks. On NBD_CMD_DISC, a protocol error, EOF or ``stop()``,
requests already in flight are finished (their replies sent if the socket still works) before
the socket and the device are closed.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import functools
import logging
import os
import ssl
import stat
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol, cast

from aecp.common import tasks
from aecp.common.addresses import client_key
from aecp.common.errors import AecpError
from aecp.common.pki import fingerprint
from aecp.common.ratelog import RefusalLog
from aecp.common.receive import Intake, Receiver
from aecp.storage.frontends.nbd import protocol as p
from aecp.storage.frontends.nbd.session import ListExports, NbdSession, OpenExport, State

log = logging.getLogger(__name__)

NEGOTIATION_BUFFER = 1 << 20  # unparsed bytes before negotiation stops reading the socket
HIGH_WATER = 4 << 20  # stop reading requests while more replies than this wait to be sent
INLINE_DATA = 64 * 1024  # READ data up to this size is joined to its header (one send)
CLOSE_TIMEOUT = 5.0  # then unsent replies are dropped (the client stopped reading)
MAX_OPTIONS = 256  # options in one negotiation
REFUSAL_LOG_EVERY = 10.0
_DISC = int(p.Cmd.DISC)


class TlsPolicy(Protocol):
    """How TCP clients get TLS and what their certificates may open."""

    async def context(self) -> ssl.SSLContext:
        """A server context: this node's certificate, the client certificates trusted now."""

    async def grants(self, cert_der: bytes) -> tuple[str, frozenset[str]]:
        """The credential the client presenting ``cert_der`` holds (an id that ``revoke``
        is later asked about; "" for none) and the exports it may open."""

    async def still_granted(self, credential: str, export: str) -> bool:
        """Asked when the client opens ``export``: does ``credential`` still open it?"""


@dataclass(frozen=True)
class Limits:
    handshake_timeout: float = 10.0
    idle_timeout: float = 600.0
    max_per_client: int = 16
    max_negotiating: int = 128


class NbdServer:
    """Serve exports resolved by ``open_export`` on ``host:port`` (port 0: pick one; host None:
    no TCP) and on the Unix socket ``unix_path``.

    ``open_export(name)`` returns a ``BlockDevice`` the connection owns and closes; it raises
    ``KeyError`` for an unknown export. ``list_exports()`` names the exports for NBD_OPT_LIST.
    TCP clients need TLS (``tls``; without it they are offered nothing).
    """

    def __init__(
        self,
        host: str | None,
        port: int,
        open_export: OpenExport,
        list_exports: ListExports,
        *,
        unix_path: Path | None = None,
        tls: TlsPolicy | None = None,
        limits: Limits = Limits(),
        max_inflight: int = 64,
    ) -> None:
        self.host = host
        self._port = port
        self.unix_path = unix_path
        self.tls = tls
        self.limits = limits
        self._open_export = open_export
        self._list_exports = list_exports
        self.max_inflight = max_inflight
        self._servers: list[asyncio.Server] = []
        self._tcp: asyncio.Server | None = None
        self._connections: dict[asyncio.Task[None], _Connection] = {}
        self._per_client: collections.Counter[str] = collections.Counter()
        self.intake = Intake()  # staging and payload budget shared by the connections
        self.refused = 0  # connections closed for a limit (per client, negotiation time)
        self.negotiating = 0  # TCP connections not in transmission yet
        self._refusals = RefusalLog(log, REFUSAL_LOG_EVERY)  # one line per interval

    @property
    def port(self) -> int:
        """The bound TCP port (the real one after ``start`` when 0 was asked for)."""
        if self._tcp is not None and self._tcp.sockets:
            return int(self._tcp.sockets[0].getsockname()[1])
        return self._port

    @property
    def connections(self) -> int:
        """Connections currently open."""
        return len(self._connections)

    async def start(self) -> None:
        """Listen; returns once the sockets are bound. The Unix socket is made in a directory
        of mode 0700 and is itself mode 0600 (only its owner, root, may connect)."""
        if self._servers:
            return
        loop = asyncio.get_running_loop()
        if self.host is not None:
            self._tcp = await loop.create_server(
                lambda: _Connection(self, local=False), self.host, self._port
            )
            self._servers.append(self._tcp)
            log.info("nbd: listening on %s:%d (TLS required)", self.host, self.port)
        if self.unix_path is not None:
            path = self.unix_path
            path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
            path.parent.chmod(0o700)
            with contextlib.suppress(FileNotFoundError):
                if stat.S_ISSOCK(path.lstat().st_mode):
                    path.unlink()  # left by a process that died
            server = await loop.create_unix_server(lambda: _Connection(self, local=True), path)
            os.chmod(path, 0o600)
            self._servers.append(server)
            log.info("nbd: listening on %s (local)", path)

    async def stop(self) -> None:
        """Stop listening, end every connection (in-flight requests finish first) and wait."""
        servers, self._servers, self._tcp = self._servers, [], None
        for server in servers:
            server.close()
        await tasks.cancel(*self._connections)
        for server in servers:
            await server.wait_closed()
        if servers:
            log.info("nbd: stopped listening")

    def revoke(self, granted: Callable[[str, frozenset[str]], bool]) -> int:
        """Close every TLS connection unless ``granted(credential, exports)`` (the id and
        the exports ``TlsPolicy.grants`` gave it); returns how many were closed."""
        gone = [
            c
            for c in self._connections.values()
            if c.credential and not granted(c.credential, c.session.granted)
        ]
        for conn in gone:
            conn.drop("its credential was revoked")
        return len(gone)

    def _admit(self, conn: _Connection) -> bool:
        """Register a new connection; False (it must close) past a limit (``Limits``)."""
        if not conn.local:
            why = ""
            if self._per_client[conn.client] >= self.limits.max_per_client:
                why = f"{self.limits.max_per_client} connections from {conn.client} already"
            elif self.negotiating >= self.limits.max_negotiating:
                why = f"{self.limits.max_negotiating} connections negotiating already"
            if why:
                self.refused += 1
                self._refusals.warning("nbd %s: refused: %s", conn.peer, why)
                return False
            self._per_client[conn.client] += 1
            self.negotiating += 1
            conn.negotiating = True
        task = tasks.spawn(conn.run(), name=f"nbd-conn-{conn.peer}")
        self._connections[task] = conn
        task.add_done_callback(functools.partial(self._closed, conn))
        return True

    def _closed(self, conn: _Connection, task: asyncio.Task[None]) -> None:
        self._connections.pop(task, None)
        self.negotiated(conn)
        if not conn.local:
            self._per_client[conn.client] -= 1
            if self._per_client[conn.client] <= 0:
                del self._per_client[conn.client]

    def negotiated(self, conn: _Connection) -> None:
        """``conn`` no longer counts against ``max_negotiating`` (transmission, or gone)."""
        if conn.negotiating:
            conn.negotiating = False
            self.negotiating -= 1


class _Connection(asyncio.BufferedProtocol):
    """One client: negotiation (a task), then requests dispatched as their bytes arrive.
    Bytes are read into buffers ``common.receive.Receiver`` chooses: a large WRITE's payload
    lands in the buffer that becomes the request's data."""

    def __init__(self, server: NbdServer, *, local: bool) -> None:
        self._server = server
        self.local = local
        self.peer = "?"
        self.client = ""  # the client (``client_key`` of its address), for the per-client limit
        self.negotiating = False  # counted in the server's ``negotiating``
        self.options = 0  # options received in negotiation
        self.credential = ""  # the TLS client certificate's fingerprint, once TLS is up
        self.session = NbdSession(
            server._open_export,
            server._list_exports,
            intake=server.intake,
            local=local,
            tls_offered=server.tls is not None,
        )
        self._receiver = Receiver(server.intake)
        self.max_inflight = server.max_inflight
        self._transport: asyncio.Transport | None = None
        self._inflight: set[asyncio.Future[None]] = set()
        self._out: list[bytes] = []  # replies waiting for the end of this loop iteration
        self._wakeup: asyncio.Future[None] | None = None  # negotiation waiting for bytes
        self._ended: asyncio.Future[str] | None = None  # transmission's end, with the reason
        self._closed: asyncio.Future[None] | None = None  # set by connection_lost
        self._transmitting = False
        self._eof = False
        self._lost = False
        self._abort = False
        self._reading_paused = False
        self._writing_paused = False
        self._last_read = 0.0  # loop time of the last bytes received (idle timeout)
        self._idle: asyncio.TimerHandle | None = None

    # --- asyncio.BufferedProtocol --------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = cast(asyncio.Transport, transport)  # uvloop's is no subclass
        self._transport.set_write_buffer_limits(high=HIGH_WATER)
        loop = asyncio.get_running_loop()
        self._ended, self._closed = loop.create_future(), loop.create_future()
        self._last_read = loop.time()
        peer = transport.get_extra_info("peername")
        if isinstance(peer, tuple):
            self.client, self.peer = client_key(str(peer[0])), f"{peer[0]}:{peer[1]}"
        else:
            self.peer = "local"
        self.session.peer = self.peer
        if not self._server._admit(self):
            self._lost = True
            self._transport.abort()

    def get_buffer(self, sizehint: int) -> memoryview:
        return self._receiver.get(self.session.parser)

    def buffer_updated(self, nbytes: int) -> None:
        self._last_read = asyncio.get_running_loop().time()
        self._receiver.updated(self.session.parser, nbytes)
        if self._transmitting:
            self._dispatch()
        else:
            self._wake()
            self._update_reading()

    def eof_received(self) -> bool:
        self._eof = True
        if self._transmitting:
            self._dispatch()
        else:
            self._wake()
        return True  # keep our side open: replies still owed are sent before closing

    def connection_lost(self, exc: Exception | None) -> None:
        self._lost = True
        if self._idle is not None:
            self._idle.cancel()
        self.session.parser.abandon()
        if exc is not None:
            self._abort = True
        self._end(f"connection lost: {exc!r}" if exc else "client disconnected")
        self._wake()
        if self._closed is not None and not self._closed.done():
            self._closed.set_result(None)

    def pause_writing(self) -> None:
        self._writing_paused = True
        self._update_reading()

    def resume_writing(self) -> None:
        self._writing_paused = False
        if self._transmitting:
            self._dispatch()
        else:
            self._update_reading()

    # --- the connection's life -----------------------------------------------------------

    def drop(self, reason: str) -> None:
        """Close the connection at once (a revoked credential): requests in flight still end."""
        log.warning("nbd %s: dropping the connection: %s", self.peer, reason)
        self._abort = True
        self._end(reason)
        if self._transport is not None:
            self._transport.abort()

    async def run(self) -> None:
        """Serve until the client leaves; never raises except on cancellation."""
        log.info("nbd %s: connected", self.peer)
        reason = "client disconnected"
        limit = self._server.limits.handshake_timeout
        try:
            try:
                async with asyncio.timeout(limit):
                    await self._negotiate()
            except TimeoutError:
                self._server.refused += 1
                raise p.ProtocolError(f"negotiation not finished within {limit:g} s") from None
            self._server.negotiated(self)
            if self.session.state is State.TRANSMISSION and not self._lost:
                if not self.local:
                    self._arm_idle(self._server.limits.idle_timeout)
                self._transmitting = True
                self._dispatch()
                assert self._ended is not None
                reason = await asyncio.shield(self._ended)
        except p.ProtocolError as e:  # replies already owed are still sent, then we close
            reason = f"protocol error: {e}"
        except asyncio.CancelledError:  # proto.md: finish in-flight requests, then disconnect
            reason = "server stopping"
            raise
        except (ssl.SSLError, OSError) as e:  # the TLS handshake failed: nothing was offered
            reason, self._abort = f"TLS failed: {e}", True
        except Exception as e:
            log.exception("nbd %s: unexpected failure", self.peer)
            reason, self._abort = f"internal error: {e!r}", True
        finally:
            self._transmitting = False
            await self._finish(reason)

    async def _next_event(self) -> p.ClientFlags | p.OptionRequest | p.Request | None:
        """The next negotiation event; None once the client is gone (or sent EOF cleanly)."""
        parser = self.session.parser
        while (event := parser.next_event()) is None:
            if self._lost:
                return None
            if self._eof:
                parser.eof()
                return None
            self._update_reading()
            self._wakeup = asyncio.get_running_loop().create_future()
            try:
                await self._wakeup
            finally:
                self._wakeup = None
        return event

    async def _negotiate(self) -> None:
        session = self.session
        self._write(session.greeting())
        while session.state in (State.HANDSHAKE, State.OPTIONS):
            event = await self._next_event()
            if event is None:
                return
            if isinstance(event, p.ClientFlags):
                session.client_flags(event)
            elif isinstance(event, p.OptionRequest):
                self.options += 1
                if self.options > MAX_OPTIONS:
                    raise p.ProtocolError(f"more than {MAX_OPTIONS} options in one negotiation")
                reply = await session.option(event)
                if session.starttls:
                    await self._start_tls(reply)
                else:
                    self._write(reply)
            else:  # the parser yields requests only after enter_transmission
                raise p.ProtocolError("request before the end of negotiation")

    async def _start_tls(self, ack: bytes) -> None:
        """Send ``ack`` (NBD_OPT_STARTTLS accepted) and upgrade to TLS, then learn what the
        client's certificate may open.

        The client sends nothing between its STARTTLS and our reply (bytes already buffered
        are a protocol error); its TLS hello follows the reply at once, so the socket is not
        read from before the reply until TLS owns it (else the parser would take the hello).
        """
        policy = self._server.tls
        transport = self._transport
        assert policy is not None and transport is not None
        if self.session.parser.buffered:
            raise p.ProtocolError("data sent after NBD_OPT_STARTTLS before its reply")
        transport.pause_reading()
        self._reading_paused = True
        try:
            context = await policy.context()
        except AecpError as exc:  # the grants cannot be read now: say so, stay in clear
            log.warning("nbd %s: STARTTLS refused: %s", self.peer, exc.message)
            self.session.starttls = False
            self._write(p.option_reply(p.Opt.STARTTLS, p.Rep.ERR_POLICY, b"try again later"))
            self._reading_paused = False
            transport.resume_reading()
            return
        self._write(ack)
        upgraded = await asyncio.get_running_loop().start_tls(
            transport,
            self,
            context,
            server_side=True,
            ssl_handshake_timeout=self._server.limits.handshake_timeout,
        )
        if upgraded is None:
            raise p.ProtocolError("the connection closed during the TLS handshake")
        self._transport = upgraded
        self._reading_paused = False  # start_tls resumed reading
        self._transport.set_write_buffer_limits(high=HIGH_WATER)
        ssl_object = upgraded.get_extra_info("ssl_object")
        der = ssl_object.getpeercert(binary_form=True) if ssl_object is not None else None
        if not der:
            raise p.ProtocolError("TLS without a client certificate")
        credential, granted = await policy.grants(der)
        self.credential = credential or fingerprint(der)

        async def authorize(export: str) -> bool:
            return bool(credential) and await policy.still_granted(credential, export)

        self.session.tls_established(granted, authorize)
        log.info(
            "nbd %s: TLS established, credential %s grants %s",
            self.peer, self.credential[:23], ", ".join(sorted(granted)) or "nothing",
        )  # fmt: skip

    def _arm_idle(self, after: float) -> None:
        self._idle = asyncio.get_running_loop().call_later(after, self._idle_check)

    def _idle_check(self) -> None:
        """Close a TCP connection that received nothing and had no request running for the
        idle timeout; otherwise look again when it could be reached."""
        limit = self._server.limits.idle_timeout
        idle = asyncio.get_running_loop().time() - self._last_read
        if self._inflight or idle < limit:
            self._arm_idle(limit - idle if not self._inflight else limit)
            return
        log.info("nbd %s: closing after %.0f s without requests", self.peer, idle)
        self._end(f"idle for {idle:.0f} s")

    def _dispatch(self) -> None:
        """Start every complete request buffered, up to ``max_inflight`` at once; end the
        transmission on NBD_CMD_DISC, EOF or a protocol error."""
        if self._ended is None or self._ended.done():
            return
        parser = self.session.parser
        inflight = self._inflight
        answered = 0  # replies queued at once in this call
        try:
            while len(inflight) < self.max_inflight and not self._writing_paused:
                if answered >= self.max_inflight:  # the rest after these replies are sent
                    asyncio.get_running_loop().call_soon(self._dispatch)
                    break
                req = parser.next_event()
                if req is None:
                    if self._eof:
                        parser.eof()
                        self._end("client closed the connection without NBD_CMD_DISC")
                    break
                assert type(req) is p.Request
                if req.command == _DISC:
                    self._end("client disconnected (NBD_CMD_DISC)")
                    break
                reply = self.session.read_now(req)
                if reply is not None:
                    self._queue(reply)
                    answered += 1
                    continue
                started = self.session.start_write(req)
                if started is not None:  # no task: answered from the future's callback
                    inflight.add(started)
                    started.add_done_callback(functools.partial(self._written, req))
                    continue
                task = asyncio.get_running_loop().create_task(self._serve(req))
                inflight.add(task)
        except p.ProtocolError as e:
            self._end(f"protocol error: {e}")
        except Exception as e:  # e.g. MemoryError for a payload buffer: drop the client
            log.exception("nbd %s: dispatching failed", self.peer)
            self._abort = True
            if self._transport is not None:
                self._transport.abort()
            self._end(f"internal error: {e!r}")
        self._update_reading()

    async def _serve(self, req: p.Request) -> None:
        """Run one request and send (or batch) its reply; never raises.

        Request tasks are never cancelled, so the ``finally`` always removes this one from the
        in-flight set (cheaper than a done callback per request).
        """
        try:
            self._reply(await self.session.execute(req))
        except Exception:
            log.exception("nbd %s: request %d failed", self.peer, req.cookie)
            self._abort = True
            if self._transport is not None:
                self._transport.abort()
        finally:
            self._request_done(cast("asyncio.Future[None]", asyncio.current_task()))

    def _written(self, req: p.Request, fut: asyncio.Future[None]) -> None:
        self._reply(self.session.written(req, fut))
        self._request_done(fut)

    def _request_done(self, fut: asyncio.Future[None]) -> None:
        inflight = self._inflight
        full = len(inflight) >= self.max_inflight
        inflight.discard(fut)
        if full and self._transmitting:
            self._dispatch()

    def _end(self, reason: str) -> None:
        """End the transmission phase (the first reason wins)."""
        ended = self._ended
        if ended is not None and not ended.done():
            ended.set_result(reason)

    def _wake(self) -> None:
        wakeup = self._wakeup
        if wakeup is not None and not wakeup.done():
            wakeup.set_result(None)

    def _update_reading(self) -> None:
        """Stop reading the socket while replies back up, every request slot is taken, or
        negotiation has more unparsed bytes than it may buffer."""
        transport = self._transport
        if transport is None or self._lost:
            return
        pause = (
            self._writing_paused
            or len(self._inflight) >= self.max_inflight
            or (not self._transmitting and self.session.parser.buffered > NEGOTIATION_BUFFER)
        )
        if pause != self._reading_paused:
            self._reading_paused = pause
            (transport.pause_reading if pause else transport.resume_reading)()

    # --- replies -------------------------------------------------------------------------

    def _reply(self, reply: bytes | tuple[bytes, bytes]) -> None:
        """Send a reply now if no other request is running, else batch it with the replies
        that finish in the same loop iteration (one send for all)."""
        if not isinstance(reply, bytes):
            head, data = reply
            if len(data) > INLINE_DATA:  # large: no copy into a batch
                self._flush()
                self._write(head)
                self._write(data)
                return
            reply = head + data
        if len(self._inflight) > 1:
            if not self._out:
                asyncio.get_running_loop().call_soon(self._flush)
            self._out.append(reply)
        elif self._out:
            self._out.append(reply)
            self._flush()
        else:
            self._write(reply)

    def _queue(self, reply: bytes | tuple[bytes, bytes]) -> None:
        """Batch a reply produced at once with the others of this loop iteration."""
        if not isinstance(reply, bytes):
            reply = reply[0] + reply[1]  # a READ at most CACHED_READ_MAX long
        if not self._out:
            asyncio.get_running_loop().call_soon(self._flush)
        self._out.append(reply)

    def _flush(self) -> None:
        out = self._out
        if out:
            self._out = []
            self._write(out[0] if len(out) == 1 else b"".join(out))

    def _write(self, data: bytes) -> None:
        transport = self._transport
        if transport is not None and not transport.is_closing():
            transport.write(data)

    async def _finish(self, reason: str) -> None:
        """Let in-flight requests finish, close the socket, then the session and its device."""
        if self._inflight:
            await asyncio.wait(list(self._inflight))
        self._flush()
        transport = self._transport
        try:
            if transport is not None:
                if self._abort:
                    transport.abort()
                else:
                    transport.close()
            if self._closed is not None:
                await asyncio.wait_for(asyncio.shield(self._closed), CLOSE_TIMEOUT)
        except TimeoutError:
            if transport is not None:
                transport.abort()
        finally:
            await self.session.close()
        export = self.session.export_name
        level = logging.WARNING if self._abort or reason.startswith("protocol") else logging.INFO
        log.log(
            level, "nbd %s: closed%s: %s", self.peer, f" (export {export!r})" if export else "",
            reason,
        )  # fmt: skip
