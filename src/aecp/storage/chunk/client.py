"""Replica clients: ``ChunkClient`` (a chunk server over TCP) and ``LocalChunkClient`` (this
node's ``ReplicaStore`` called directly). Both implement ``api.ReplicaClient`` (the spec).

``ChunkClient`` keeps ``connections`` persistent TCP connections and sends each call on the next
one in turn. Each connection is authenticated first (``auth``: the client proves its node
certificate and checks that the server is the node it meant to reach; with encryption on, the
protocol then runs in TLS).

A connection (``_Connection``) is a state machine READY -> CLOSED: requests are pipelined
with request ids and matched to responses in any order; frames queued in one event-loop
iteration leave in one ``send``. The connection fails as a whole — every pending request raises
``ReplicaUnavailable`` — when the server closes it, a malformed frame arrives, or the oldest
pending request has waited ``timeout`` seconds. The next call then connects again (one attempt,
bounded by ``timeout``; no retry loop: retrying is the caller's decision).
"""

from __future__ import annotations

import asyncio
import enum
import itertools
import logging
import socket
import ssl
from array import array
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any, TypeVar, cast

from aecp.common.pki import AuthError
from aecp.storage.chunk import wire
from aecp.storage.chunk.api import Buffer, RawBlocks, ReplicaClient, ReplicaStat
from aecp.storage.chunk.auth import Mode, ReplicaAuth, client_handshake
from aecp.storage.chunk.errors import (
    ChunkError,
    ChunkInvalid,
    ChunkProtocolError,
    ReplicaUnavailable,
)
from aecp.storage.chunk.store import ReplicaStore
from aecp.storage.chunk.wire import MAX_DATA, Op, Status

log = logging.getLogger(__name__)

T = TypeVar("T")
#: queued request bytes before new requests wait for the socket (several large writes in flight)
SEND_HIGH_WATER = 8 << 20
#: offset, length, epoch, generation, flags, payload of a request
_Fields = tuple[int, int, int, int, int, Buffer, bytes]
#: a request waiting for its response: future, op, time sent, extent id, epoch, decode
_Pending = tuple["asyncio.Future[Any]", Op, float, str, int, Callable[[bytes], Any] | None]


class ConnState(enum.Enum):
    READY = "ready"
    CLOSED = "closed"


class _Connection(asyncio.Protocol):
    """One TCP connection to a chunk server."""

    def __init__(self, address: str, timeout: float) -> None:
        self.state = ConnState.READY
        self.address = address
        self._timeout = timeout
        self._loop = asyncio.get_running_loop()
        self._transport: asyncio.Transport | None = None
        self._decoder = wire.ResponseDecoder()
        self._ids = itertools.count(1)
        #: request id -> (future, op, time sent, extent id, epoch, decode); insertion order = age
        self._pending: dict[int, _Pending] = {}
        self._out: list[Buffer] = []
        self._timer: asyncio.TimerHandle | None = None
        self._writable: asyncio.Future[None] | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = cast(asyncio.Transport, transport)  # uvloop's is no subclass
        self._transport.set_write_buffer_limits(high=SEND_HIGH_WATER)

    def send(
        self,
        op: Op,
        extent_id: str,
        fields: _Fields,
        decode: Callable[[bytes], Any] | None = None,
    ) -> asyncio.Future[Any]:
        """Queue one request. The future gets the decoded payload of an OK response (None
        without ``decode``), else the error the response carries; ``ReplicaUnavailable`` if
        the connection fails first or the answer is malformed (the connection then fails)."""
        if self.state is not ConnState.READY:
            raise ReplicaUnavailable(self.address, "connection closed")
        request_id = next(self._ids)
        frame = wire.encode_request(op, request_id, extent_id, *fields)
        fut: asyncio.Future[Any] = self._loop.create_future()
        self._pending[request_id] = (fut, op, self._loop.time(), extent_id, fields[2], decode)
        if not self._out:
            self._loop.call_soon(self._flush_out)
        self._out += frame
        if self._timer is None:
            self._timer = self._loop.call_later(self._timeout, self._check_age)
        return fut

    @property
    def paused(self) -> bool:
        """The socket's send buffer is above its high-water mark."""
        return self._writable is not None

    async def writable(self) -> None:
        """Return once the socket's send buffer is below its high-water mark."""
        if self._writable is not None:
            await asyncio.shield(self._writable)

    def data_received(self, data: bytes) -> None:
        try:
            responses = self._decoder.feed(data)
        except ChunkProtocolError as e:
            self.fail(f"protocol error: {e}")
            return
        for response in responses:
            entry = self._pending.pop(response.request_id, None)
            if entry is None or entry[1] != response.op:
                self.fail(f"unexpected response to request {response.request_id}")
                return
            fut, _, _, extent_id, epoch, decode = entry
            if fut.done():
                continue
            try:
                if response.status is not Status.OK:
                    error = wire.decode_error(response.status, response.payload, extent_id, epoch)
                    fut.set_exception(error)
                else:
                    fut.set_result(None if decode is None else decode(response.payload))
            except ChunkProtocolError as e:
                fut.set_exception(ReplicaUnavailable(self.address, f"malformed answer: {e}"))
                self.fail(f"malformed answer: {e}")
                return

    def connection_lost(self, exc: Exception | None) -> None:
        self.fail(f"connection lost ({exc})" if exc else "connection closed by the server")

    def pause_writing(self) -> None:
        self._writable = self._loop.create_future()

    def resume_writing(self) -> None:
        writable, self._writable = self._writable, None
        if writable is not None and not writable.done():
            writable.set_result(None)

    def fail(self, reason: str) -> None:
        """Close the connection and fail every pending request (idempotent)."""
        if self.state is ConnState.CLOSED:
            return
        self.state = ConnState.CLOSED
        if self._pending:
            log.warning(
                "replica %s: %s; failing %d requests", self.address, reason, len(self._pending)
            )
        if self._transport is not None:
            self._transport.abort()
        if self._timer is not None:
            self._timer.cancel()
        pending, self._pending = self._pending, {}
        for fut, *_ in pending.values():
            if not fut.done():
                fut.set_exception(ReplicaUnavailable(self.address, reason))
        self.resume_writing()

    def _flush_out(self) -> None:
        out, self._out = self._out, []
        if self.state is ConnState.READY and self._transport is not None and out:
            self._transport.writelines(out)

    def _check_age(self) -> None:
        self._timer = None
        if not self._pending or self.state is not ConnState.READY:
            return
        oldest = next(iter(self._pending.values()))[2]
        waited = self._loop.time() - oldest
        if waited >= self._timeout:
            self.fail(f"no answer within {self._timeout:g} s")
        else:
            self._timer = self._loop.call_later(self._timeout - waited, self._check_age)


class ChunkClient(ReplicaClient):
    """Node ``node``'s replicas (its chunk server at ``host:port``) over ``connections``
    pipelined, authenticated TCP connections."""

    def __init__(
        self,
        host: str,
        port: int,
        *,
        node: str,
        auth: ReplicaAuth,
        timeout: float = 5.0,
        connections: int = 1,
        source: str | None = None,
    ) -> None:
        if connections < 1 or timeout <= 0:
            raise ValueError("a ChunkClient needs at least one connection and a positive timeout")
        self.host, self.port, self.timeout = host, port, timeout
        self.node, self.auth = node, auth
        self.source = source  # connect from this address (a node's own: servers count by it)
        self.address = f"{host}:{port}"
        self._conns: list[_Connection | None] = [None] * connections
        self._connecting: list[asyncio.Task[_Connection] | None] = [None] * connections
        self._turn = 0
        self._closed = False

    def _ready(self) -> _Connection | None:
        """The next connection in turn if it can take a request now (connected, not paused)."""
        slot = self._turn
        conn = self._conns[slot]
        if conn is None or conn.state is not ConnState.READY or conn.paused:
            return None
        self._turn = (slot + 1) % len(self._conns)
        return conn

    async def _connection(self) -> _Connection:
        """The next connection in turn, connecting it first if it is not ready."""
        slot = self._turn
        self._turn = (slot + 1) % len(self._conns)
        conn = self._conns[slot]
        if conn is not None and conn.state is ConnState.READY:
            return conn
        if self._closed:
            raise ReplicaUnavailable(self.address, "client closed")
        task = self._connecting[slot]
        if task is None:
            task = asyncio.get_running_loop().create_task(self._connect(slot))
            task.add_done_callback(lambda t: t.cancelled() or t.exception())
            self._connecting[slot] = task
        return await asyncio.shield(task)

    async def _connect(self, slot: int) -> _Connection:
        try:
            conn = await self._authenticated()
        finally:
            self._connecting[slot] = None
        if self._closed:
            conn.fail("client closed")
            raise ReplicaUnavailable(self.address, "client closed")
        self._conns[slot] = conn
        log.debug("replica %s: connected (slot %d)", self.address, slot)
        return conn

    async def _authenticated(self) -> _Connection:
        """A new connection, authenticated both ways (module docstring); ``ReplicaUnavailable``
        saying why if it cannot be had within the timeout."""
        loop = asyncio.get_running_loop()
        family = socket.AF_INET6 if ":" in self.host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setblocking(False)
        try:
            if self.source is not None:
                sock.bind((self.source, 0))
            async with asyncio.timeout(self.timeout):
                await loop.sock_connect(sock, (self.host, self.port))
                mode = await client_handshake(sock, self.auth, self.node, self.timeout)
                tls = self.auth.credentials.client_context() if mode is Mode.TLS else None
                conn = _Connection(self.address, self.timeout)
                await loop.create_connection(  # (uvloop returns its TLS wrapper as protocol)
                    lambda: conn, sock=sock, ssl=tls, server_hostname=self.node if tls else None
                )
        except AuthError as e:
            sock.close()
            log.warning("replica %s (node %s): %s", self.address, self.node, e.message)
            raise ReplicaUnavailable(self.address, f"authentication failed: {e.message}") from e
        except (OSError, TimeoutError, ssl.SSLError) as e:
            sock.close()
            raise ReplicaUnavailable(self.address, f"cannot connect: {e or 'timed out'}") from e
        except Exception as e:  # whatever a peer's bytes provoke
            sock.close()
            raise ReplicaUnavailable(self.address, f"authentication failed: {e!r}") from e
        return conn

    async def _call(
        self,
        op: Op,
        extent_id: str = "",
        decode: Callable[[bytes], T] | None = None,
        *,
        offset: int = 0,
        length: int = 0,
        epoch: int = 0,
        generation: int = 0,
        flags: int = 0,
        payload: Buffer = b"",
    ) -> T | None:
        """Send one request; raise the error its response carries, else decode its payload."""
        conn = self._ready() or await self._connection()
        if conn.paused:
            await conn.writable()
        fields = (offset, length, epoch, generation, flags, payload, b"")
        result: T | None = await conn.send(op, extent_id, fields, decode)
        return result

    async def create(
        self, extent_id: str, size: int, *, epoch: int = 0, generation: int = 0
    ) -> None:
        await self._call(Op.CREATE, extent_id, length=size, epoch=epoch, generation=generation)

    async def delete(self, extent_id: str, epoch: int = 0) -> None:
        await self._call(Op.DELETE, extent_id, epoch=epoch)

    async def stat(self, extent_id: str) -> ReplicaStat:
        return _some(await self._call(Op.STAT, extent_id, wire.decode_stat))

    async def list_extents(self) -> list[str]:
        return _some(await self._call(Op.LIST, "", wire.decode_ids))

    def write(
        self,
        extent_id: str,
        offset: int,
        data: Buffer,
        *,
        epoch: int,
        generation: int,
        fua: bool = False,
        crcs: array[int] | None = None,
    ) -> Awaitable[None]:
        """On a ready connection, the request's future itself: no coroutine, no task."""
        view = data if isinstance(data, bytes) else memoryview(data).cast("B")
        conn = self._ready()
        if conn is None or len(view) > MAX_DATA:
            return self._write(extent_id, offset, view, epoch, generation, fua)
        sums = b""
        if crcs is not None and len(crcs) * wire.CRC_SECTOR == len(view):
            sums = wire.pack_crcs(crcs)
        flags = wire.FLAG_FUA if fua else 0
        fields = (offset, len(view), epoch, generation, flags, view, sums)
        try:
            fut: asyncio.Future[None] = conn.send(Op.WRITE, extent_id, fields)
        except ChunkError as e:  # a bad argument, or the connection just closed
            fut = asyncio.get_running_loop().create_future()
            fut.set_exception(e)
        return fut

    async def _write(
        self, extent_id: str, offset: int, data: Buffer, epoch: int, generation: int, fua: bool
    ) -> None:
        view = data if isinstance(data, bytes) else memoryview(data).cast("B")
        if len(view) > MAX_DATA:
            raise ChunkInvalid(f"a write carries at most {MAX_DATA} bytes")
        flags = wire.FLAG_FUA if fua else 0
        await self._call(
            Op.WRITE,
            extent_id,
            offset=offset,
            length=len(view),
            epoch=epoch,
            generation=generation,
            flags=flags,
            payload=view,
        )

    async def read(self, extent_id: str, offset: int, length: int) -> bytes:
        if not 0 <= length <= MAX_DATA:
            raise ChunkInvalid(f"a read returns 0 to {MAX_DATA} bytes, not {length}")
        return _some(
            await self._call(Op.READ, extent_id, _exactly(length), offset=offset, length=length)
        )

    async def trim(
        self, extent_id: str, offset: int, length: int, *, epoch: int, generation: int
    ) -> None:
        await self._call(
            Op.TRIM, extent_id, offset=offset, length=length, epoch=epoch, generation=generation
        )

    async def write_zeroes(
        self, extent_id: str, offset: int, length: int, *, epoch: int, generation: int
    ) -> None:
        await self._call(
            Op.ZERO, extent_id, offset=offset, length=length, epoch=epoch, generation=generation
        )

    async def flush(self, extent_id: str | None = None) -> None:
        await self._call(Op.FLUSH, extent_id or "")

    async def fence(self, extent_id: str, epoch: int) -> int:
        return _some(await self._call(Op.FENCE, extent_id, wire.decode_u64, epoch=epoch))

    async def set_generation(self, extent_id: str, generation: int) -> None:
        await self._call(Op.SET_GEN, extent_id, generation=generation)

    async def modified_since(self, extent_id: str, generation: int) -> list[tuple[int, int]]:
        return _some(
            await self._call(
                Op.MODIFIED_SINCE, extent_id, wire.decode_ranges, generation=generation
            )
        )

    async def allocation(self, extent_id: str) -> list[tuple[int, int, bool]]:
        return _some(await self._call(Op.ALLOCATION, extent_id, wire.decode_runs))

    async def read_raw(self, extent_id: str, offset: int, length: int) -> RawBlocks:
        if not 0 <= length <= MAX_DATA:
            raise ChunkInvalid(f"a raw read returns 0 to {MAX_DATA} bytes, not {length}")
        return _some(
            await self._call(Op.READ_RAW, extent_id, wire.decode_raw, offset=offset, length=length)
        )

    async def write_raw(self, extent_id: str, raw: RawBlocks, epoch: int | None = None) -> None:
        payload = wire.encode_raw(raw)
        await self._call(Op.WRITE_RAW, extent_id, epoch=epoch or 0, payload=payload)

    async def scrub(self, extent_id: str) -> list[int]:
        return _some(await self._call(Op.SCRUB, extent_id, wire.decode_sectors))

    async def repair(self, extent_id: str, offset: int, data: Buffer, epoch: int = 0) -> None:
        view = data if isinstance(data, bytes) else memoryview(data).cast("B")
        if len(view) > MAX_DATA:
            raise ChunkInvalid(f"a repair carries at most {MAX_DATA} bytes")
        await self._call(
            Op.REPAIR, extent_id, offset=offset, length=len(view), epoch=epoch, payload=view
        )

    async def ping(self) -> None:
        await self._call(Op.PING)

    async def close(self) -> None:
        self._closed = True
        for task in self._connecting:
            if task is not None:
                task.cancel()
        for conn in self._conns:
            if conn is not None:
                conn.fail("client closed")


def _some(value: T | None) -> T:
    assert value is not None
    return value


def _exactly(length: int) -> Callable[[bytes], bytes]:
    def check(payload: bytes) -> bytes:
        if len(payload) != length:
            raise ChunkProtocolError(f"asked for {length} bytes, got {len(payload)}")
        return payload

    return check


class LocalChunkClient(ReplicaClient):
    """This node's ``ReplicaStore``, called directly (no TCP, no copies). ``close`` does not
    close the store: the node owns it."""

    def __init__(self, store: ReplicaStore, name: str = "local") -> None:
        self.store = store
        self.address = name
        self._closed = False

    def _open(self) -> ReplicaStore:
        if self._closed:
            raise ReplicaUnavailable(self.address, "client closed")
        return self.store

    async def create(
        self, extent_id: str, size: int, *, epoch: int = 0, generation: int = 0
    ) -> None:
        await self._open().create(extent_id, size, epoch=epoch, generation=generation)

    async def delete(self, extent_id: str, epoch: int = 0) -> None:
        await self._open().delete(extent_id, epoch)

    async def stat(self, extent_id: str) -> ReplicaStat:
        return await self._open().stat(extent_id)

    async def list_extents(self) -> list[str]:
        return await self._open().list_extents()

    def write(  # the store's future or coroutine itself: no frame of ours on the hot path
        self,
        extent_id: str,
        offset: int,
        data: Buffer,
        *,
        epoch: int,
        generation: int,
        fua: bool = False,
        crcs: array[int] | None = None,
    ) -> Awaitable[None]:
        if self._closed:
            return self._refuse()
        if not fua:
            started = self.store.write_nowait(
                extent_id, offset, data, epoch=epoch, generation=generation, crcs=crcs
            )
            if started is not None:
                return started
        return self.store.write(
            extent_id, offset, data, epoch=epoch, generation=generation, fua=fua, crcs=crcs
        )

    def read(  # the store's coroutine itself: one frame less on the hot path
        self, extent_id: str, offset: int, length: int
    ) -> Coroutine[Any, Any, bytes]:
        if self._closed:
            return self._refuse()
        return self.store.read(extent_id, offset, length)

    def read_nowait(self, extent_id: str, offset: int, length: int) -> bytes | None:
        return None if self._closed else self.store.read_nowait(extent_id, offset, length)

    async def _refuse(self) -> Any:
        self._open()

    async def trim(
        self, extent_id: str, offset: int, length: int, *, epoch: int, generation: int
    ) -> None:
        await self._open().trim(extent_id, offset, length, epoch=epoch, generation=generation)

    async def write_zeroes(
        self, extent_id: str, offset: int, length: int, *, epoch: int, generation: int
    ) -> None:
        store = self._open()
        await store.write_zeroes(extent_id, offset, length, epoch=epoch, generation=generation)

    async def flush(self, extent_id: str | None = None) -> None:
        await self._open().flush(extent_id)

    async def fence(self, extent_id: str, epoch: int) -> int:
        return await self._open().fence(extent_id, epoch)

    async def set_generation(self, extent_id: str, generation: int) -> None:
        await self._open().set_generation(extent_id, generation)

    async def modified_since(self, extent_id: str, generation: int) -> list[tuple[int, int]]:
        return await self._open().modified_since(extent_id, generation)

    async def allocation(self, extent_id: str) -> list[tuple[int, int, bool]]:
        return await self._open().allocation(extent_id)

    async def read_raw(self, extent_id: str, offset: int, length: int) -> RawBlocks:
        return await self._open().read_raw(extent_id, offset, length)

    async def write_raw(self, extent_id: str, raw: RawBlocks, epoch: int | None = None) -> None:
        await self._open().write_raw(extent_id, raw, epoch or None)  # 0: unchecked, as on TCP

    async def scrub(self, extent_id: str) -> list[int]:
        return await self._open().scrub(extent_id)

    async def repair(self, extent_id: str, offset: int, data: Buffer, epoch: int = 0) -> None:
        await self._open().repair(extent_id, offset, data, epoch)

    async def ping(self) -> None:
        self._open()

    async def close(self) -> None:
        self._closed = True
