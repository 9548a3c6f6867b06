"""The etcd adapter of the cluster store: the only module that imports the etcd client (aetcd).

Owns: turning the ``Store`` contract into etcd v3 calls over one gRPC channel secured with the
cluster's TLS credentials, the deadline on every call, retrying what etcd's routine hiccups
fail, and the translation of client errors into ``StoreUnavailable`` / ``LeaseExpired``.

TLS: etcd runs with client-certificate authentication (``lab/etcd.py``); the store presents
the credential bundle it is given (``common.pki``: a node's or a client role's) and checks
every member against the cluster CA under the one name all member certificates carry
(``pki.ETCD_SERVER_NAME``). When ``aecp cluster rotate-certs`` replaces the bundle's files, the
next call opens a new channel with them; calls and watches on the old channel end normally or
break (``StoreUnavailable``), and their callers open them again.

Connection: lazy. ``EtcdStore(endpoints, tls=...)`` opens nothing; the first call opens one gRPC
channel aimed at a multi-address target (``ipv4:a:p,b:p,c:p``, policy pick_first), so a member
that refuses connections is skipped and a member that dies is replaced by the next one.
``wait_ready`` waits until the cluster answers a linearizable read.

Retries (``_Retry``): a leader election, a member that died or a connection that broke are
routine, so a call that fails with one of them is tried again with a short, growing backoff
until its deadline — the whole call, retries included, still ends within ``timeout`` seconds.
What is retried depends on what the failure leaves unknown:

- the request was refused before etcd could act on it (no connection, "no leader", "not
  leader", "unhealthy cluster", "too many requests"): every call is retried;
- the request may have been carried out (its connection broke, "request timed out", the
  deadline passed): reads, leases and unconditional puts and deletes are retried (doing them
  twice is harmless); a conditional transaction is retried and, if the retry's compare fails,
  counts as done when every key it writes holds its value and every key it deletes is gone
  (its first attempt was applied); one with ``failure`` operations is not retried.

Deadline: every attempt gives up after the time left (a gRPC deadline, plus an asyncio deadline
slightly later as a backstop), so a wedged or partitioned etcd makes the caller see
``StoreUnavailable`` instead of hanging. A watch has no deadline once open, but gRPC keepalive
pings break it (``StoreUnavailable``) about 15 s after its member stops answering.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import ipaddress
import logging
import random
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from typing import Any, TypeVar

import aetcd
import aetcd.exceptions
import aetcd.rpc
import aetcd.watcher
import grpc

from aecp.common import tasks
from aecp.common.errors import AecpError, Compacted, LeaseExpired, StoreUnavailable
from aecp.common.pki import ETCD_SERVER_NAME, Bundle
from aecp.common.tls import RECHECK_S
from aecp.store.base import (
    ChangeKind,
    Compare,
    Delete,
    KeyValue,
    Lease,
    Op,
    Put,
    Store,
    WatchEvent,
)

log = logging.getLogger(__name__)

_CLIENT_ERRORS: tuple[type[Exception], ...] = (
    aetcd.exceptions.ClientError,
    aetcd.rpc.RpcError,
    aetcd.rpc.BaseError,
)
"""What aetcd and gRPC raise when etcd cannot be reached or refuses a call."""

WATCH_BUFFER = 10_000  # events a watch holds for a reader that does not keep up
_CLEANUP_ERRORS: tuple[type[Exception], ...] = (TimeoutError, *_CLIENT_ERRORS)

T = TypeVar("T")

DEFAULT_TIMEOUT = 5.0
"""Seconds one store call may take before it raises ``StoreUnavailable``."""

_BACKSTOP = 1.0
"""Extra seconds the asyncio deadline allows beyond the gRPC deadline."""

CHANNEL_OPTIONS: dict[str, int] = {
    # Each store has its own connections: pick_first then starts at the first endpoint, instead
    # of skipping a member whose connection another store's channel saw fail a moment ago.
    "grpc.use_local_subchannel_pool": 1,
    # Reconnect quickly after a member restarts (gRPC's default starts at 1 s and grows to 120 s).
    "grpc.initial_reconnect_backoff_ms": 100,
    "grpc.min_reconnect_backoff_ms": 100,
    "grpc.max_reconnect_backoff_ms": 2000,
    # Notice a frozen member under a long-lived watch. etcd refuses pings more often than its
    # --grpc-keepalive-min-time (5 s) and pings without an open stream.
    "grpc.keepalive_time_ms": 10_000,
    "grpc.keepalive_timeout_ms": 5_000,
    "grpc.http2.ping_timeout_ms": 5_000,
    "grpc.keepalive_permit_without_calls": 0,
    "grpc.http2.max_pings_without_data": 0,
    # A bandwidth-probe ping that a frozen member never answers would hold keepalive back.
    "grpc.http2.bdp_probe": 0,
}


def grpc_target(endpoints: Sequence[str]) -> tuple[str, int]:
    """The (host, port) pair to give aetcd so that gRPC sees every endpoint.

    aetcd builds its target as ``f"{host}:{port}"``; a multi-address target
    ``ipv4:a:p1,b:p2,c:p3`` is therefore passed as host ``ipv4:a:p1,b:p2,c`` and port ``p3``.
    Several endpoints must be IPv4 literals (``"127.0.0.1:2379"``); a single endpoint may be any
    ``host:port``. Raises ``ValueError`` for anything else.
    """
    if not endpoints:
        raise ValueError("at least one etcd endpoint is needed")
    parsed = [_split_endpoint(e) for e in endpoints]
    if len(parsed) == 1:
        return parsed[0]
    for host, _ in parsed:
        try:
            ipaddress.IPv4Address(host)
        except ValueError:
            raise ValueError(
                f"several etcd endpoints must be IPv4 addresses, got {host!r}"
            ) from None
    *head, (last_host, last_port) = parsed
    listed = ",".join([f"{h}:{p}" for h, p in head] + [last_host])
    return f"ipv4:{listed}", last_port


def _split_endpoint(endpoint: str) -> tuple[str, int]:
    host, sep, port = endpoint.rpartition(":")
    if not sep or not host or not port.isdigit():
        raise ValueError(f"an etcd endpoint is host:port, got {endpoint!r}")
    return host, int(port)


def prefix_range(prefix: str) -> tuple[bytes, bytes]:
    """The etcd key range ``[key, range_end)`` holding every key that starts with ``prefix``."""
    start = prefix.encode()
    end = bytearray(start)
    while end:
        if end[-1] < 0xFF:
            end[-1] += 1
            return start, bytes(end)
        end.pop()
    # Empty prefix (or only 0xff bytes): everything from ``start`` on.
    return (start or b"\0"), b"\0"


class _Retry(enum.Enum):
    """What a call may do after a failure that leaves unknown whether etcd acted on it."""

    AGAIN = "again"  # a read, a lease call or an idempotent write: just try again
    VERIFY = "verify"  # a conditional transaction: try again, then check for its effects
    NEVER = "never"  # give up (only failures before etcd could act are retried)


#: details of gRPC UNAVAILABLE / FAILED_PRECONDITION errors that etcd or gRPC return before
#: the request could have been carried out
_REFUSED_BEFORE_ACTING = (
    "failed to connect",
    "no address available",
    "no connection available",
    "etcdserver: no leader",
    "etcdserver: not leader",
    "etcdserver: not capable",
    "etcdserver: unhealthy cluster",
    "etcdserver: too many requests",
)
_FIRST_BACKOFF, _MAX_BACKOFF = 0.05, 0.5


class EtcdStore(Store):
    """The cluster store on an etcd v3 cluster.

    ``endpoints`` are ``"host:port"`` client addresses of the members (see ``grpc_target``);
    ``tls`` the credential bundle the store presents (``common.pki``); ``timeout`` bounds every
    call, its retries included. Connects lazily (see the module docstring); ``close()`` must be
    awaited when done, and the store is unusable afterwards.
    """

    def __init__(
        self, endpoints: Sequence[str], *, tls: Bundle, timeout: float = DEFAULT_TIMEOUT
    ) -> None:
        if timeout <= 0:
            raise ValueError("timeout must be positive")
        self.endpoints = list(endpoints)
        self.timeout = timeout
        self.tls = tls
        self._target = grpc_target(self.endpoints)
        self._stamp: tuple[int, ...] | None = None
        self._checked = 0.0
        self._client: Any = None
        self._retired: set[asyncio.Task[None]] = set()
        self._retired_clients: list[Any] = []
        self._closed = False
        self.retries = 0  # calls tried again after a routine failure (for tests and logs)

    def __repr__(self) -> str:
        return f"EtcdStore({','.join(self.endpoints)})"

    # -- plumbing ------------------------------------------------------------------------------

    def _current(self) -> Any:
        """The client for this call: a new one when the credential files changed (the old one
        is closed once calls in flight on it had their time)."""
        now = time.monotonic()
        if self._client is not None and now - self._checked < RECHECK_S:
            return self._client
        self._checked = now
        stamp = self.tls.stamp()
        if self._client is not None and stamp == self._stamp:
            return self._client
        try:
            self.tls.load()  # a pair caught half-rotated does not load: keep the old one
            credentials = _channel_credentials(self.tls)
        except (AecpError, ValueError, OSError) as exc:
            if self._client is None:
                raise self._unavailable("connect", f"cannot read TLS credentials: {exc}") from exc
            log.warning("%r: TLS credentials not reloaded: %s", self, exc)
            return self._client
        old, self._stamp = self._client, stamp
        host, port = self._target
        if old is not None:
            self._retired_clients.append(old)
        self._client = _TlsClient(
            credentials, host=host, port=port, timeout=self.timeout, options=dict(CHANNEL_OPTIONS)
        )
        if old is not None:
            log.info("%r: TLS credentials changed: new connections use them", self)
            task = tasks.spawn(self._retire(old), name=f"etcd-retire {self!r}")
            self._retired.add(task)
            task.add_done_callback(self._retired.discard)
        return self._client

    async def _retire(self, client: Any) -> None:
        await asyncio.sleep(self.timeout + _BACKSTOP)
        await self._close_client(client)

    async def _close_client(self, client: Any) -> None:
        with contextlib.suppress(*_CLEANUP_ERRORS):
            async with asyncio.timeout(self.timeout):
                await client.close()
        if client in self._retired_clients:
            self._retired_clients.remove(client)

    async def _call(
        self, what: str, fn: Callable[[Any], Awaitable[T]], retry: _Retry = _Retry.AGAIN
    ) -> T:
        """Run ``fn(client)``, retrying routine failures until the deadline (module docstring).
        ``_Retry.VERIFY`` calls raise ``_Ambiguous`` for a failure they must check."""
        if self._closed:
            raise StoreUnavailable(f"etcd {what}: the store is closed", endpoints=self.endpoints)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.timeout
        backoff = _FIRST_BACKOFF
        uncertain = False
        while True:
            left = deadline - loop.time()
            try:
                async with asyncio.timeout(left + _BACKSTOP):
                    result = await fn(self._current())
            except TimeoutError as e:
                error: Exception = self._unavailable(what, f"no answer within {self.timeout:g} s")
                cause: Exception = e
            except Exception as e:
                translated = self._translate(what, e)
                if not isinstance(translated, StoreUnavailable):
                    if translated is e:
                        raise
                    raise translated from e
                error, cause = translated, e
            else:
                if uncertain and retry is _Retry.VERIFY:
                    raise _Ambiguous(result)
                return result
            refused = _refused_before_acting(cause)
            if not refused and retry is _Retry.NEVER:
                raise error from cause
            uncertain = uncertain or not refused
            pause = min(backoff, _MAX_BACKOFF) * (0.5 + random.random() / 2)
            if loop.time() + pause >= deadline - 0.05:
                raise error from cause
            self.retries += 1
            log.debug("%r: %s failed (%s); trying again in %.2f s", self, what, error, pause)
            await asyncio.sleep(pause)
            backoff *= 2

    def _translate(self, what: str, error: Exception) -> Exception:
        """The contract's exception for a client error; other errors are returned unchanged."""
        if _is_lease_not_found(error):
            return LeaseExpired(f"etcd {what}: the lease is gone")
        text = str(error)
        if "required revision has been compacted" in text:
            return Compacted(f"etcd {what}: the revision asked for is compacted")
        if "required revision is a future revision" in text:
            return ValueError(f"etcd {what}: the revision asked for is in the future")
        if isinstance(error, aetcd.exceptions.RevisionCompactedError):
            return Compacted(
                f"etcd {what}: the history before revision {error.compacted_revision} is compacted",
                compact_revision=error.compacted_revision,
            )
        if isinstance(error, aetcd.exceptions.InvalidArgumentError):
            return ValueError(f"etcd {what}: {error}")
        if isinstance(error, _CLIENT_ERRORS):
            return self._unavailable(what, str(error) or type(error).__name__)
        return error

    def _unavailable(self, what: str, reason: str) -> StoreUnavailable:
        return StoreUnavailable(f"etcd {what}: {reason}", endpoints=self.endpoints)

    # -- reads ---------------------------------------------------------------------------------

    async def get(self, key: str) -> KeyValue | None:
        got = await self._call("get", lambda c: c.get(key.encode()))
        return None if got is None else _key_value(got)

    async def list(self, prefix: str) -> list[KeyValue]:
        start, end = prefix_range(prefix)
        got = await self._call(
            "list", lambda c: c.get_range(start, end, sort_order="ascend", sort_target="key")
        )
        return [_key_value(kv) for kv in got]

    async def revision(self) -> int:
        request = aetcd.rpc.RangeRequest(key=b"\0", count_only=True)

        async def current(c: Any) -> Any:
            await c.connect()
            return await c.kvstub.Range(request, timeout=self.timeout, metadata=c.metadata)

        response = await self._call("revision", current)
        return int(response.header.revision)

    async def wait_ready(self, timeout: float) -> None:
        """Return once the cluster answers a linearizable read; ``StoreUnavailable`` after
        ``timeout`` seconds of trying."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while True:
            try:
                await self.revision()
                return
            except StoreUnavailable as e:
                if loop.time() + 0.1 >= deadline:
                    raise self._unavailable("wait_ready", f"not ready after {timeout:g} s") from e
            await asyncio.sleep(0.1)

    # -- writes --------------------------------------------------------------------------------

    async def put(self, key: str, value: bytes, *, lease: Lease | None = None) -> int:
        lease_id = lease.id if lease else 0
        done = await self._call("put", lambda c: c.put(key.encode(), value, lease=lease_id))
        return int(done.header.revision)

    async def create(self, key: str, value: bytes, *, lease: Lease | None = None) -> bool:
        return await self.txn([Compare.absent(key)], [Put(key, value, lease)])

    async def replace(
        self, key: str, value: bytes, *, mod_revision: int, lease: Lease | None = None
    ) -> bool:
        return await self.txn([Compare.unchanged(key, mod_revision)], [Put(key, value, lease)])

    async def delete(self, key: str, *, mod_revision: int | None = None) -> bool:
        if mod_revision is not None:
            guard = [Compare.unchanged(key, mod_revision), Compare(key, "version", ">", 0)]
            return await self.txn(guard, [Delete(key)])
        done = await self._call("delete", lambda c: c.delete(key.encode()))
        return done is not None

    async def delete_prefix(self, prefix: str) -> int:
        start, end = prefix_range(prefix)
        done = await self._call("delete_prefix", lambda c: c.delete_range(start, end))
        return int(done.deleted)

    async def txn(
        self, compare: Sequence[Compare], success: Sequence[Op], failure: Sequence[Op] = ()
    ) -> bool:
        async def run(c: Any) -> Any:
            return await c.transaction(
                compare=[_compare(c, cmp) for cmp in compare],
                success=[_op(c, op) for op in success],
                failure=[_op(c, op) for op in failure],
            )

        retry = _Retry.NEVER if failure else _Retry.VERIFY
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.timeout
        try:
            succeeded, _ = await self._call("txn", run, retry)
        except _Ambiguous as amb:
            succeeded, _ = amb.result
            if not succeeded and success:
                succeeded = await self._verified(success, deadline - loop.time())
        return bool(succeeded)

    async def _verified(self, ops: Sequence[Op], left: float) -> bool:
        """``_in_place`` within what is left of the call's deadline (at least a moment)."""
        try:
            async with asyncio.timeout(max(left, 0.5)):
                applied = await self._in_place(ops)
        except TimeoutError as e:
            raise self._unavailable("txn", "its outcome could not be read back in time") from e
        if applied:
            log.info("%r: a transaction retried after a lost answer had been applied", self)
        return applied

    async def _in_place(self, ops: Sequence[Op]) -> bool:
        """True if every put of ``ops`` holds its value and every delete's keys are gone."""
        for op in ops:
            if isinstance(op, Put):
                kv = await self.get(op.key)
                if kv is None or kv.value != op.value:
                    return False
            elif op.prefix:
                if await self.list(op.key):
                    return False
            elif await self.get(op.key) is not None:
                return False
        return True

    # -- leases --------------------------------------------------------------------------------

    async def grant_lease(self, ttl: int) -> Lease:
        if ttl < 1:
            raise ValueError(f"a lease TTL is at least 1 s, got {ttl}")
        granted = await self._call("grant_lease", lambda c: c.lease(ttl))
        return Lease(int(granted.id), int(granted.ttl))

    async def refresh_lease(self, lease: Lease) -> int:
        """etcd answers a keep-alive for an unknown lease with TTL 0: that is ``LeaseExpired``."""
        reply = await self._call(
            "refresh_lease", lambda c: _keep_alive_once(c, lease.id, self.timeout)
        )
        ttl = getattr(reply, "TTL", None)
        if ttl is None:
            raise self._unavailable("refresh_lease", "the keep-alive stream ended without answer")
        if int(ttl) <= 0:
            raise LeaseExpired(f"etcd refresh_lease: lease {lease.id:x} is gone")
        return int(ttl)

    async def revoke_lease(self, lease: Lease) -> None:
        with contextlib.suppress(LeaseExpired):
            await self._call("revoke_lease", lambda c: c.revoke_lease(lease.id))

    # -- watches -------------------------------------------------------------------------------

    def watch(
        self, prefix: str, *, start_revision: int | None = None
    ) -> contextlib.AbstractAsyncContextManager[AsyncIterator[WatchEvent]]:
        return self._watch(prefix, start_revision)

    @contextlib.asynccontextmanager
    async def _watch(
        self, prefix: str, start_revision: int | None
    ) -> AsyncIterator[AsyncIterator[WatchEvent]]:
        start, end = prefix_range(prefix)
        if start_revision is not None:
            await self._check_kept(start_revision)
        handle = await self._call(
            "watch", lambda c: c.watch(start, range_end=end, start_revision=start_revision)
        )
        events = _WatchEvents(self, prefix, handle)
        try:
            yield events
        finally:
            await events.cancel()

    async def _check_kept(self, revision: int) -> None:
        """``Compacted`` if the history at ``revision`` is gone. etcd would tell a watch so
        only after confirming it; a read at that revision tells at once. A revision not
        written yet is kept, of course."""
        request = aetcd.rpc.RangeRequest(key=b"\0", count_only=True, revision=revision)

        async def probe(c: Any) -> Any:
            await c.connect()
            return await c.kvstub.Range(request, timeout=self.timeout, metadata=c.metadata)

        try:
            await self._call("watch", probe)
        except ValueError:
            return  # in the future: the watch waits for it

    async def compact(self, revision: int) -> None:
        await self._call("compact", lambda c: c.compact(revision))

    # -- lifecycle -----------------------------------------------------------------------------

    async def close(self) -> None:
        """Close the channel (ending every watch). Idempotent; never raises for a dead cluster."""
        if self._closed:
            return
        self._closed = True
        await tasks.cancel(*self._retired)
        for client in list(self._retired_clients):
            await self._close_client(client)
        if self._client is None:
            return
        try:
            async with asyncio.timeout(self.timeout):
                await self._client.close()
        except _CLEANUP_ERRORS as e:
            log.warning("%r: closing the etcd client failed: %r", self, e)


class _Ambiguous(Exception):
    """A conditional call answered only after a failure that may have applied it: ``result``
    is the retry's answer, to be checked by the caller."""

    def __init__(self, result: Any) -> None:
        super().__init__("ambiguous")
        self.result = result


def _refused_before_acting(error: BaseException) -> bool:
    """The failure happened before etcd could carry the request out (safe to send again)."""
    seen: BaseException | None = error
    while seen is not None:
        text = str(seen)
        if any(marker in text for marker in _REFUSED_BEFORE_ACTING):
            return True
        seen = seen.__cause__
    return False


def _channel_credentials(bundle: Bundle) -> grpc.ChannelCredentials:
    """gRPC credentials from a bundle: its certificate and key, the cluster CA as the only
    root (read now; ``OSError`` if a file is missing)."""
    ca, cert, key = (f.read_bytes() for f in bundle.files())
    return grpc.ssl_channel_credentials(
        root_certificates=ca, private_key=key, certificate_chain=cert
    )


class _TlsClient(aetcd.Client):  # type: ignore[misc]
    """aetcd's client on a TLS channel (aetcd itself opens only insecure channels).

    ``connect`` does what aetcd's does, with ``secure_channel`` and our credentials; every other
    method is aetcd's own."""

    def __init__(self, credentials: grpc.ChannelCredentials, **kwargs: Any) -> None:
        options = dict(kwargs.pop("options", {}))
        options["grpc.ssl_target_name_override"] = ETCD_SERVER_NAME
        super().__init__(options=options, **kwargs)
        self._credentials = credentials

    async def connect(self) -> None:
        if self._connected.is_set():
            return
        if self._is_connecting:  # type: ignore[has-type]  # another task is connecting: wait for it
            await asyncio.wait_for(self._connected.wait(), self._connect_wait_timeout)
            return
        self._is_connecting = True
        try:
            target = f"{self._host}:{self._port}"
            self.channel = aetcd.rpc.secure_channel(
                target, self._credentials, options=list(self._options.items())
            )
            self.kvstub = aetcd.rpc.KVStub(self.channel)
            self.clusterstub = aetcd.rpc.ClusterStub(self.channel)
            self.leasestub = aetcd.rpc.LeaseStub(self.channel)
            self.maintenancestub = aetcd.rpc.MaintenanceStub(self.channel)
            self._watcher = aetcd.watcher.Watcher(
                aetcd.rpc.WatchStub(self.channel), timeout=self._timeout, metadata=self.metadata
            )
            self._connected.set()
        finally:
            self._is_connecting = False


class _WatchEvents:
    """The iterator handed out by ``EtcdStore.watch``: aetcd events in, ``WatchEvent`` out.

    A pump task drains aetcd's event generator into a queue, so a caller may time out or cancel
    a wait for the next event (``asyncio.timeout`` around ``anext``) without losing the watch.

    States: open → cancelled (by ``cancel()``: iteration then ends quietly) or open → broken (the
    stream failed or ended on its own: this and every later ``__anext__`` raises
    ``StoreUnavailable``).
    """

    def __init__(self, store: EtcdStore, prefix: str, handle: Any) -> None:
        self._store = store
        self._prefix = prefix
        self._handle = handle
        self._queue: asyncio.Queue[WatchEvent | Exception | None] = asyncio.Queue()
        self._cancelled = False
        self._error: Exception | None = None
        self._pump = tasks.spawn(self._drain(), name=f"etcd-watch {prefix!r}")

    def __aiter__(self) -> _WatchEvents:
        return self

    async def __anext__(self) -> WatchEvent:
        if self._error is None:
            item = await self._queue.get()
            if isinstance(item, WatchEvent):
                return item
            self._error = item or self._store._unavailable(
                "watch", f"the watch on {self._prefix!r} ended"
            )
        if self._cancelled:
            raise StopAsyncIteration
        raise self._error

    async def _drain(self) -> None:
        """Move aetcd's events into the queue; finish with the error that broke the stream, or
        None when it ended."""
        try:
            async for event in self._handle:
                if self._queue.qsize() >= WATCH_BUFFER:  # its reader fell behind: break it
                    self._queue.put_nowait(
                        self._store._unavailable(
                            "watch", f"the reader of {self._prefix!r} fell {WATCH_BUFFER} behind"
                        )
                    )
                    return
                self._queue.put_nowait(_watch_event(event))
        except Exception as e:
            translated = self._store._translate("watch", e)
            self._queue.put_nowait(translated)
        else:
            self._queue.put_nowait(None)

    async def cancel(self) -> None:
        """Stop the watch on the server and the pump (best effort, bounded by the timeout)."""
        if self._cancelled:
            return
        self._cancelled = True
        try:
            async with asyncio.timeout(self._store.timeout):
                await self._handle.cancel()
        except _CLEANUP_ERRORS as e:
            log.debug("cancelling the watch on %r failed: %r", self._prefix, e)
        await tasks.cancel(self._pump)


# -- conversions between the contract's types and aetcd's -------------------------------------


def _is_lease_not_found(error: BaseException) -> bool:
    """etcd says "requested lease not found" (gRPC NOT_FOUND) for a write naming a dead lease."""
    seen: BaseException | None = error
    while seen is not None:
        if "lease not found" in str(seen):
            return True
        seen = seen.__cause__
    return False


async def _keep_alive_once(client: Any, lease_id: int, grpc_timeout: float) -> Any:
    """One keep-alive round trip on a stream that is closed again before returning."""
    await client.connect()
    call = client.leasestub.LeaseKeepAlive(timeout=grpc_timeout, metadata=client.metadata)
    try:
        await call.write(aetcd.rpc.LeaseKeepAliveRequest(ID=lease_id))
        await call.done_writing()
        return await call.read()
    finally:
        call.cancel()


def _key_value(kv: Any) -> KeyValue:
    return KeyValue(
        key=bytes(kv.key).decode(),
        value=bytes(kv.value),
        create_revision=int(kv.create_revision),
        mod_revision=int(kv.mod_revision),
        lease=int(kv.lease),
    )


def _watch_event(event: Any) -> WatchEvent:
    kind = ChangeKind.PUT if str(event.kind) == "PUT" else ChangeKind.DELETE
    value = bytes(event.kv.value) if kind is ChangeKind.PUT else None
    return WatchEvent(kind, bytes(event.kv.key).decode(), value, int(event.kv.mod_revision))


def _compare(client: Any, cmp: Compare) -> Any:
    """An aetcd compare for ``cmp`` (aetcd builds them with Python's comparison operators)."""
    if (cmp.target == "value") != isinstance(cmp.operand, bytes):
        raise TypeError(f"compare on {cmp.target!r} needs a matching operand, got {cmp.operand!r}")
    targets = client.transactions
    target = {
        "value": targets.value,
        "mod": targets.mod,
        "create": targets.create,
        "version": targets.version,
    }[cmp.target](cmp.key.encode())
    if cmp.op == "==":
        return target == cmp.operand
    if cmp.op == "!=":
        return target != cmp.operand
    if cmp.op == "<":
        return target < cmp.operand
    return target > cmp.operand


def _op(client: Any, op: Op) -> Any:
    ops = client.transactions
    if isinstance(op, Put):
        return ops.put(op.key.encode(), op.value, lease=op.lease.id if op.lease else 0)
    if op.prefix:
        start, end = prefix_range(op.key)
        return ops.delete(start, range_end=end)
    return ops.delete(op.key.encode())
