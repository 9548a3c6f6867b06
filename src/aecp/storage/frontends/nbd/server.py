"""``NbdServer``: NBD over TCP on asyncio streams, one ``NbdSession`` per connection.

Each connection runs in a guarded task (``common.tasks.spawn``). Negotiation is sequential.
In transmission, requests are read in order (a WRITE's payload with its header) and each one
runs as its own task, at most ``max_inflight`` per connection; replies go out as requests
finish, so they may be out of order (the cookie matches them, proto.md "Transmission").

Ordering: a FLUSH calls ``device.flush()`` when it is received, and the device contract makes
every write that completed (and so every write already answered) durable — what proto.md
"Ordering of messages and writes" asks. On NBD_CMD_DISC, a protocol error, EOF or ``stop()``,
requests already in flight are finished (their replies sent if the socket still works) before
the socket and the device are closed.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging

from aecp.common import tasks
from aecp.storage.frontends.nbd import protocol as p
from aecp.storage.frontends.nbd.session import ListExports, NbdSession, OpenExport, State

log = logging.getLogger(__name__)

READ_SIZE = 1 << 20  # bytes asked of the stream at a time
STREAM_LIMIT = 1 << 20  # StreamReader buffer before it stops reading the socket
HIGH_WATER = 4 << 20  # wait for the socket to drain when more replies than this are queued
INLINE_DATA = 64 * 1024  # READ data up to this size is joined to its header (one send)
CLOSE_TIMEOUT = 5.0  # then unsent replies are dropped (the client stopped reading)
_DISC = int(p.Cmd.DISC)


class NbdServer:
    """Serve exports resolved by ``open_export`` on ``host:port`` (port 0: pick one).

    ``open_export(name)`` returns a ``BlockDevice`` the connection owns and closes; it raises
    ``KeyError`` for an unknown export. ``list_exports()`` names the exports for NBD_OPT_LIST.
    """

    def __init__(
        self,
        host: str,
        port: int,
        open_export: OpenExport,
        list_exports: ListExports,
        *,
        max_inflight: int = 64,
    ) -> None:
        self.host = host
        self._port = port
        self._open_export = open_export
        self._list_exports = list_exports
        self.max_inflight = max_inflight
        self._server: asyncio.Server | None = None
        self._connections: set[asyncio.Task[None]] = set()

    @property
    def port(self) -> int:
        """The bound port (the real one after ``start`` when 0 was asked for)."""
        if self._server is not None and self._server.sockets:
            return int(self._server.sockets[0].getsockname()[1])
        return self._port

    @property
    def connections(self) -> int:
        """Connections currently open."""
        return len(self._connections)

    async def start(self) -> None:
        """Listen; returns once the socket is bound."""
        if self._server is not None:
            return
        self._server = await asyncio.start_server(
            self._accept, self.host, self._port, limit=STREAM_LIMIT
        )
        log.info("nbd: listening on %s:%d", self.host, self.port)

    async def stop(self) -> None:
        """Stop listening, end every connection (in-flight requests finish first) and wait."""
        port = self.port
        server, self._server = self._server, None
        if server is not None:
            server.close()
        await tasks.cancel(*self._connections)
        if server is not None:
            await server.wait_closed()
            log.info("nbd: stopped listening on %s:%d", self.host, port)

    def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        conn = _Connection(self, reader, writer)
        task = tasks.spawn(conn.run(), name=f"nbd-conn-{conn.peer}")
        self._connections.add(task)
        task.add_done_callback(self._connections.discard)


class _Connection:
    """One client: negotiation, then the pipelined request loop."""

    def __init__(
        self, server: NbdServer, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        peer = writer.get_extra_info("peername")
        self.peer = f"{peer[0]}:{peer[1]}" if isinstance(peer, tuple) else str(peer)
        self.reader = reader
        self.writer = writer
        self.session = NbdSession(server._open_export, server._list_exports, peer=self.peer)
        self.max_inflight = server.max_inflight
        self._inflight: set[asyncio.Task[None]] = set()
        self._room: asyncio.Future[None] | None = None
        self._abort = False
        self._out: list[bytes] = []  # replies waiting for the end of this loop iteration

    async def run(self) -> None:
        """Serve until the client leaves; never raises except on cancellation."""
        log.info("nbd %s: connected", self.peer)
        reason = "client disconnected"
        try:
            await self._negotiate()
            if self.session.state is State.TRANSMISSION:
                reason = await self._transmit()
        except p.ProtocolError as e:  # replies already owed are still sent, then we close
            reason = f"protocol error: {e}"
        except OSError as e:
            reason, self._abort = f"connection lost: {e!r}", True
        except asyncio.CancelledError:  # proto.md: finish in-flight requests, then disconnect
            reason = "server stopping"
            raise
        except Exception as e:
            log.exception("nbd %s: unexpected failure", self.peer)
            reason, self._abort = f"internal error: {e!r}", True
        finally:
            await self._finish(reason)

    async def _next_event(self) -> p.ClientFlags | p.OptionRequest | p.Request | None:
        """The next event from the client; None at a clean end of stream."""
        parser = self.session.parser
        while (event := parser.next_event()) is None:
            data = await self.reader.read(READ_SIZE)
            if not data:
                parser.eof()
                return None
            parser.feed(data)
        return event

    async def _negotiate(self) -> None:
        session = self.session
        self.writer.write(session.greeting())
        while session.state in (State.HANDSHAKE, State.OPTIONS):
            event = await self._next_event()
            if event is None:
                return
            if isinstance(event, p.ClientFlags):
                session.client_flags(event)
            elif isinstance(event, p.OptionRequest):
                self.writer.write(await session.option(event))
                await self.writer.drain()
            else:  # the parser yields requests only after enter_transmission
                raise p.ProtocolError("request before the end of negotiation")

    async def _transmit(self) -> str:
        """Read requests and start one task each; returns why the loop ended."""
        parser = self.session.parser
        reader = self.reader
        loop = asyncio.get_running_loop()
        inflight = self._inflight
        while True:
            req = parser.next_event()
            if req is None:
                data = await reader.read(READ_SIZE)
                if not data:
                    parser.eof()
                    return "client closed the connection without NBD_CMD_DISC"
                parser.feed(data)
                continue
            assert type(req) is p.Request
            if req.command == _DISC:
                return "client disconnected (NBD_CMD_DISC)"
            if len(inflight) >= self.max_inflight:
                self._room = loop.create_future()
                await self._room
            inflight.add(loop.create_task(self._serve(req)))

    async def _serve(self, req: p.Request) -> None:
        """Run one request and send (or batch) its reply; never raises.

        Request tasks are never cancelled, so the ``finally`` always removes this one from the
        in-flight set (cheaper than a done callback per request).
        """
        try:
            self._reply(await self.session.execute(req))
            if self.writer.transport.get_write_buffer_size() > HIGH_WATER:
                with contextlib.suppress(ConnectionError):
                    await self.writer.drain()
        except Exception:
            log.exception("nbd %s: request %d failed", self.peer, req.cookie)
            self._abort = True
            self.writer.transport.abort()
        finally:
            self._inflight.discard(asyncio.current_task())
            room = self._room
            if room is not None and not room.done():
                room.set_result(None)

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

    def _flush(self) -> None:
        out = self._out
        if out:
            self._out = []
            self._write(out[0] if len(out) == 1 else b"".join(out))

    def _write(self, data: bytes) -> None:
        if not self.writer.transport.is_closing():
            self.writer.write(data)

    async def _finish(self, reason: str) -> None:
        """Let in-flight requests finish, close the socket, then the session and its device."""
        if self._inflight:
            await asyncio.wait(list(self._inflight))
        self._flush()
        writer = self.writer
        try:
            if self._abort:
                writer.transport.abort()
            else:
                writer.close()
            await asyncio.wait_for(writer.wait_closed(), CLOSE_TIMEOUT)
        except (TimeoutError, ConnectionError, OSError):
            writer.transport.abort()
        finally:
            await self.session.close()
        export = self.session.export_name
        level = logging.WARNING if self._abort or reason.startswith("protocol") else logging.INFO
        log.log(
            level, "nbd %s: closed%s: %s", self.peer, f" (export {export!r})" if export else "",
            reason,
        )  # fmt: skip
