"""One NBD connection's state machine: HANDSHAKE → OPTIONS → TRANSMISSION → CLOSED.

The session owns the codec (``protocol.ServerParser``), answers options (resolving export names
through the injected ``open_export`` / ``list_exports``), and runs transmission requests on the
opened ``BlockDevice``, turning each into reply bytes. It does no socket I/O: the server feeds it
events and writes what it returns.

Device ownership: ``open_export(name)`` hands the session a device it owns. The session closes
it once NBD_OPT_INFO is answered, or in ``close`` (the connection ended). ``open_export`` raises
``KeyError`` for an unknown export; any other exception is logged and answered ERR_UNKNOWN.

Access (proto.md "TLS support", FORCEDTLS mode): a *local* session (the node's Unix socket,
which only root can open) sees every export. Any other session is offered nothing before TLS:
every option but NBD_OPT_STARTTLS and NBD_OPT_ABORT is answered NBD_REP_ERR_TLS_REQD (so
NBD_OPT_LIST lists no export and NBD_OPT_GO is refused) and NBD_OPT_EXPORT_NAME ends the
session. NBD_OPT_STARTTLS is answered ACK and marks ``starttls``: the connection then runs
the TLS handshake and calls ``tls_established`` with the exports the client's certificate is
granted; from then on only those exist for it (others are "unknown", whether they exist or
not), and nothing negotiated before TLS is kept.
"""

from __future__ import annotations

import asyncio
import enum
import errno
import functools
import logging
from collections.abc import Awaitable, Callable
from typing import Concatenate, ParamSpec, TypeVar

from aecp.common.errors import InvalidState
from aecp.common.receive import Intake
from aecp.storage.blockdev import BlockDevice, BlockError
from aecp.storage.frontends.nbd import protocol as p

log = logging.getLogger(__name__)

OpenExport = Callable[[str], Awaitable[BlockDevice]]
ListExports = Callable[[], Awaitable[list[str]]]
Authorize = Callable[[str], Awaitable[bool]]
#: at most this many block status descriptors in one reply (the client asks again for the rest)
MAX_EXTENTS = 1024
_U32_MAX = 0xFFFFFFFF
_READ, _WRITE, _FLUSH, _TRIM, _WZ, _BS = (
    int(c) for c in (p.Cmd.READ, p.Cmd.WRITE, p.Cmd.FLUSH, p.Cmd.TRIM, p.Cmd.WRITE_ZEROES,
                     p.Cmd.BLOCK_STATUS)
)  # fmt: skip
_FUA = int(p.CmdFlag.FUA)


class State(enum.Enum):
    """Where a connection is: greeting and client flags, option haggling, requests, gone."""

    HANDSHAKE = "handshake"
    OPTIONS = "options"
    TRANSMISSION = "transmission"
    CLOSED = "closed"


_P = ParamSpec("_P")
_R = TypeVar("_R")
_Method = Callable[Concatenate["NbdSession", _P], _R]


def require(*states: State) -> Callable[[_Method[_P, _R]], _Method[_P, _R]]:
    """The decorated method may only run in one of ``states`` (else ``InvalidState``).

    The check runs when the method is called, before any coroutine is created.
    """

    def decorate(fn: _Method[_P, _R]) -> _Method[_P, _R]:
        @functools.wraps(fn)
        def checked(self: NbdSession, /, *args: _P.args, **kwargs: _P.kwargs) -> _R:
            if self.state not in states:
                raise InvalidState(
                    f"NBD session {self.peer}: {fn.__name__} needs state "
                    f"{'/'.join(s.value for s in states)}, not {self.state.value}"
                )
            return fn(self, *args, **kwargs)

        return checked

    return decorate


_REQUEST_ERRORS = {
    errno.EINVAL: "invalid request (command, flags, length or range)",
    errno.ENOSPC: "write beyond the end of the export",
    errno.EPERM: "the export is read-only",
}


class NbdSession:
    """Negotiation results and the open device of one NBD connection."""

    def __init__(
        self,
        open_export: OpenExport,
        list_exports: ListExports,
        *,
        peer: str = "?",
        intake: Intake | None = None,
        local: bool = False,
        tls_offered: bool = True,
    ) -> None:
        self.peer = peer
        self.parser = p.ServerParser(intake=intake)
        self.state = State.HANDSHAKE
        self.device: BlockDevice | None = None
        self.export_name: str | None = None
        self.structured = False
        self.local = local  # the node's Unix socket: every export, no TLS
        self.tls_offered = tls_offered and not local
        self.tls = False  # TLS is established
        self.starttls = False  # STARTTLS was accepted: the connection must start TLS now
        self.granted: frozenset[str] = frozenset()  # what the TLS credential may open
        self._authorize: Authorize | None = None  # asked again when an export is opened
        self._open_export = open_export
        self._list_exports = list_exports
        self._no_zeroes = False
        self._meta: tuple[str, bool] | None = None  # (export name, base:allocation selected)
        self._block_status = False

    # --- handshake ------------------------------------------------------------------------

    @require(State.HANDSHAKE)
    def greeting(self) -> bytes:
        """What the server sends first (proto.md "Newstyle negotiation")."""
        return p.server_greeting()

    @require(State.HANDSHAKE)
    def client_flags(self, event: p.ClientFlags) -> None:
        """Record the client's flags (the parser already refused unknown ones)."""
        self._no_zeroes = bool(event.flags & p.ClientFlag.NO_ZEROES)
        self.state = State.OPTIONS

    # --- options ----------------------------------------------------------------------------

    @require(State.OPTIONS)
    async def option(self, event: p.OptionRequest) -> bytes:
        """Answer one option; afterwards the state may be TRANSMISSION (GO, EXPORT_NAME) or
        CLOSED (ABORT), or ``starttls`` may be set. Raises ``ProtocolError`` when the
        connection must be dropped."""
        if event.too_big:
            if event.option == p.Opt.EXPORT_NAME:
                raise p.ProtocolError("NBD_OPT_EXPORT_NAME data too large")
            return p.option_reply(event.option, p.Rep.ERR_TOO_BIG, b"option data too large")
        if not self.local and not self.tls and event.option not in _BEFORE_TLS:
            if event.option == p.Opt.EXPORT_NAME:  # it cannot be refused: end the session
                raise p.ProtocolError("NBD_OPT_EXPORT_NAME without TLS (TLS is required)")
            msg = b"TLS is required: send NBD_OPT_STARTTLS first"
            return p.option_reply(event.option, p.Rep.ERR_TLS_REQD, msg)
        handler = _OPTION_HANDLERS.get(event.option)
        if handler is None:
            msg = f"option {event.option} is not supported".encode()
            return p.option_reply(event.option, p.Rep.ERR_UNSUP, msg)
        try:
            return await handler(self, event.data)
        except p.OptionError as e:
            return p.option_reply(event.option, e.reply, e.message.encode())

    async def _opt_export_name(self, data: bytes) -> bytes:
        try:
            name = p.decode_string(data, "export name")
            device = await self._open(name)
        except p.OptionError as e:  # proto.md: no error reply exists, terminate the session
            raise p.ProtocolError(f"NBD_OPT_EXPORT_NAME refused: {e.message}") from None
        self._start_transmission(name, device)
        return p.export_name_reply(device.size, self._tflags(device), self._no_zeroes)

    async def _opt_info(self, data: bytes) -> bytes:
        return await self._info_or_go(p.Opt.INFO, data)

    async def _opt_go(self, data: bytes) -> bytes:
        return await self._info_or_go(p.Opt.GO, data)

    async def _info_or_go(self, opt: p.Opt, data: bytes) -> bytes:
        """NBD_OPT_INFO / NBD_OPT_GO: NBD_INFO_EXPORT, NBD_INFO_BLOCK_SIZE (always; our
        constraints are the defaults), NBD_INFO_NAME if asked, then ACK."""
        name, wanted = p.parse_info_request(data)
        device = await self._open(name)
        size = device.size
        replies = [
            p.rep_info_export(opt, size, self._tflags(device)),
            p.rep_info_block_size(opt, 1, p.PREFERRED_BLOCK, p.MAX_PAYLOAD),
        ]
        if p.Info.NAME in wanted:
            replies.append(p.rep_info_name(opt, name))
        replies.append(p.option_reply(opt, p.Rep.ACK))
        if opt == p.Opt.GO:
            self._start_transmission(name, device)
        else:
            await device.close()
        return b"".join(replies)

    async def _opt_starttls(self, data: bytes) -> bytes:
        if data:
            raise p.OptionError(p.Rep.ERR_INVALID, "NBD_OPT_STARTTLS takes no data")
        if self.tls:
            raise p.OptionError(p.Rep.ERR_INVALID, "TLS is already established")
        if not self.tls_offered:
            why = "the local socket needs no TLS" if self.local else "TLS is not configured"
            raise p.OptionError(p.Rep.ERR_POLICY, why)
        self.starttls = True
        return p.option_reply(p.Opt.STARTTLS, p.Rep.ACK)

    @require(State.OPTIONS)
    def tls_established(self, granted: frozenset[str], authorize: Authorize | None = None) -> None:
        """TLS is up; the client's credential may open ``granted`` (and ``authorize(name)``
        is asked again when it opens one: the grant may have gone since). Nothing negotiated
        before TLS is kept (proto.md: no per-export state survives STARTTLS)."""
        self.starttls = False
        self.tls = True
        self.granted = granted
        self._authorize = authorize
        self.structured = False
        self._meta = None

    def allowed(self, name: str) -> bool:
        """May this session open (or see) export ``name``?"""
        return self.local or (self.tls and name in self.granted)

    async def _opt_list(self, data: bytes) -> bytes:
        if data:
            raise p.OptionError(p.Rep.ERR_INVALID, "NBD_OPT_LIST takes no data")
        if self.tls:  # what the credential opens (its volume exists: the grant says so)
            names = sorted(self.granted)
        else:
            names = [n for n in await self._list_exports() if self.allowed(n)]
        out = [p.rep_server(p.Opt.LIST, name) for name in names]
        out.append(p.option_reply(p.Opt.LIST, p.Rep.ACK))
        return b"".join(out)

    async def _opt_abort(self, data: bytes) -> bytes:
        self.state = State.CLOSED
        return p.option_reply(p.Opt.ABORT, p.Rep.ACK)

    async def _opt_structured_reply(self, data: bytes) -> bytes:
        if data:
            raise p.OptionError(p.Rep.ERR_INVALID, "NBD_OPT_STRUCTURED_REPLY takes no data")
        self.structured = True
        return p.option_reply(p.Opt.STRUCTURED_REPLY, p.Rep.ACK)

    async def _opt_set_meta_context(self, data: bytes) -> bytes:
        """Select ``base:allocation`` if asked; other queries are ignored (proto.md "Metadata
        querying"). The selection holds only if NBD_OPT_GO names the same export."""
        self._meta = None  # replaced even when this option fails
        opt = p.Opt.SET_META_CONTEXT
        if not self.structured:
            raise p.OptionError(p.Rep.ERR_INVALID, "negotiate structured replies first")
        name, queries = p.parse_meta_context_request(data)
        selected = p.BASE_ALLOCATION in queries
        self._meta = (name, selected)
        out = [p.rep_meta_context(opt, p.BASE_ALLOCATION_ID, p.BASE_ALLOCATION)] if selected else []
        out.append(p.option_reply(opt, p.Rep.ACK))
        return b"".join(out)

    async def _opt_list_meta_context(self, data: bytes) -> bytes:
        opt = p.Opt.LIST_META_CONTEXT
        if not self.structured:
            raise p.OptionError(p.Rep.ERR_INVALID, "negotiate structured replies first")
        _, queries = p.parse_meta_context_request(data)
        match = not queries or any(q in ("base:", p.BASE_ALLOCATION) for q in queries)
        out = [p.rep_meta_context(opt, 0, p.BASE_ALLOCATION)] if match else []
        out.append(p.option_reply(opt, p.Rep.ACK))
        return b"".join(out)

    async def _open(self, name: str) -> BlockDevice:
        """The device behind ``name``; ``OptionError(ERR_UNKNOWN)`` if there is none, or if
        this session may not open it (the same answer: its existence is not revealed)."""
        if not self.allowed(name) or (
            self._authorize is not None and not await self._authorize(name)
        ):
            raise p.OptionError(p.Rep.ERR_UNKNOWN, f"unknown export {name!r}")
        try:
            return await self._open_export(name)
        except KeyError:
            raise p.OptionError(p.Rep.ERR_UNKNOWN, f"unknown export {name!r}") from None
        except Exception as e:
            log.warning("nbd %s: export %r cannot be opened: %r", self.peer, name, e)
            raise p.OptionError(
                p.Rep.ERR_UNKNOWN, f"export {name!r} is not available: {e}"
            ) from None

    def _tflags(self, device: BlockDevice) -> int:
        """Transmission flags for ``device`` (proto.md "Transmission flags")."""
        f = p.TransmissionFlag
        flags = f.HAS_FLAGS | f.SEND_FLUSH | f.SEND_FUA
        if device.read_only:
            flags |= f.READ_ONLY
        else:
            flags |= f.SEND_TRIM | f.SEND_WRITE_ZEROES
        if device.multi_conn:
            flags |= f.CAN_MULTI_CONN
        if self.structured:
            flags |= f.SEND_DF  # every READ is answered with a single data chunk
        return int(flags)

    def _start_transmission(self, name: str, device: BlockDevice) -> None:
        self.device = device
        self.export_name = name
        self._block_status = self._meta is not None and self._meta == (name, True)
        export = p.ExportParams(
            size=device.size,
            read_only=device.read_only,
            structured=self.structured,
            block_status=self._block_status,
        )
        self.parser.enter_transmission(export)
        self.state = State.TRANSMISSION
        log.info(
            "nbd %s: export %r, %d bytes%s%s", self.peer, name, device.size,
            ", read-only" if device.read_only else "",
            ", structured replies" if self.structured else "",
        )  # fmt: skip

    # --- transmission -----------------------------------------------------------------------

    @require(State.TRANSMISSION)
    async def execute(self, req: p.Request) -> bytes | tuple[bytes, bytes]:
        """Run one request on the device; the reply as bytes (or header and data for a READ).

        Never raises for a failed request: device errors become NBD error replies
        (``BlockError.errno``; anything unexpected is logged and answered EIO).
        """
        if req.error:
            return self._error(req.cookie, req.error, _REQUEST_ERRORS.get(req.error, "error"))
        dev = self.device
        assert dev is not None
        cmd = req.command
        try:
            if cmd == _READ:
                data = await dev.read(req.offset, req.length) if req.length else b""
                return self._read_reply(req, data)
            if cmd == _WRITE:
                assert req.payload is not None
                if req.length:
                    await dev.write(req.offset, req.payload, bool(req.flags & _FUA))
            elif cmd == _FLUSH:
                await dev.flush()
            elif cmd == _TRIM:
                await self._trim(dev, req)
            elif cmd == _WZ:
                await self._write_zeroes(dev, req)
            elif cmd == _BS:
                return await self._block_status_reply(dev, req)
        except Exception as e:
            return self.failed(req, e)
        return p.simple_reply(req.cookie)

    def read_now(self, req: p.Request) -> bytes | tuple[bytes, bytes] | None:
        """The reply to a valid READ the device answers at once (``read_nowait``); None if
        the request must go to ``execute``."""
        if req.command != _READ or req.error or not req.length:
            return None
        dev = self.device
        assert dev is not None
        data = dev.read_nowait(req.offset, req.length)
        return None if data is None else self._read_reply(req, data)

    def start_write(self, req: p.Request) -> asyncio.Future[None] | None:
        """A valid WRITE without FUA started at once by the device (``write_nowait``): the
        future of its outcome, for ``written``. None if the request must go to ``execute``."""
        if req.command != _WRITE or req.error or req.flags & _FUA or not req.length:
            return None
        dev = self.device
        assert dev is not None and req.payload is not None
        return dev.write_nowait(req.offset, req.payload)

    def written(self, req: p.Request, fut: asyncio.Future[None]) -> bytes:
        """The reply to a WRITE started by ``start_write``, once its future is done."""
        if fut.cancelled():
            return self._error(req.cookie, errno.EIO, "the write was cancelled")
        exc = fut.exception()
        return p.simple_reply(req.cookie) if exc is None else self.failed(req, exc)

    def failed(self, req: p.Request, exc: BaseException) -> bytes:
        """The error reply to a request the device failed: ``BlockError.errno``, else EIO
        (logged: the device broke its contract)."""
        if isinstance(exc, BlockError):
            return self._error(req.cookie, exc.errno, str(exc))
        log.error("nbd %s: %s failed", self.peer, _describe(req), exc_info=exc)
        return self._error(req.cookie, errno.EIO, f"internal error: {exc!r}")

    def _read_reply(self, req: p.Request, data: bytes) -> bytes | tuple[bytes, bytes]:
        if not self.structured:
            return p.simple_reply(req.cookie), data
        if not data:
            return p.chunk_done(req.cookie)
        return p.chunk_data_header(req.cookie, req.offset, len(data)), data

    async def _trim(self, dev: BlockDevice, req: p.Request) -> None:
        if req.length:
            await dev.trim(req.offset, req.length)
            if req.flags & p.CmdFlag.FUA:
                await dev.flush()

    async def _write_zeroes(self, dev: BlockDevice, req: p.Request) -> None:
        if req.length:
            fua = bool(req.flags & _FUA)
            may_trim = not req.flags & p.CmdFlag.NO_HOLE
            await dev.write_zeroes(req.offset, req.length, fua=fua, may_trim=may_trim)

    async def _block_status_reply(self, dev: BlockDevice, req: p.Request) -> bytes:
        """One NBD_REPLY_TYPE_BLOCK_STATUS chunk for base:allocation (proto.md
        "NBD_CMD_BLOCK_STATUS"): descriptors never exceed the request; REQ_ONE keeps one."""
        spans = await dev.block_status(req.offset, req.length)
        limit = 1 if req.flags & p.CmdFlag.REQ_ONE else MAX_EXTENTS
        extents: list[tuple[int, int]] = []
        left = req.length
        for span in spans:
            n = min(span.length, left, _U32_MAX)
            if n <= 0:
                continue
            extents.append((n, int(span.flags)))
            left -= n
            if left == 0 or len(extents) == limit:
                break
        if not extents:  # a device that reports nothing: "status 0" is always safe
            extents.append((req.length, 0))
        return p.chunk_block_status(req.cookie, p.BASE_ALLOCATION_ID, extents)

    def _error(self, cookie: int, error: int, message: str) -> bytes:
        if self.structured:
            return p.chunk_error(cookie, error, message)
        return p.simple_reply(cookie, error)

    async def close(self) -> None:
        """End the session and close the device (idempotent)."""
        self.state = State.CLOSED
        device, self.device = self.device, None
        if device is not None:
            await device.close()


def _describe(req: p.Request) -> str:
    try:
        name = p.Cmd(req.command).name
    except ValueError:
        name = f"command {req.command}"
    return f"{name} {req.offset}+{req.length}"


_BEFORE_TLS = frozenset((p.Opt.STARTTLS, p.Opt.ABORT))
_OPTION_HANDLERS: dict[int, Callable[[NbdSession, bytes], Awaitable[bytes]]] = {
    p.Opt.STARTTLS: NbdSession._opt_starttls,
    p.Opt.EXPORT_NAME: NbdSession._opt_export_name,
    p.Opt.INFO: NbdSession._opt_info,
    p.Opt.GO: NbdSession._opt_go,
    p.Opt.LIST: NbdSession._opt_list,
    p.Opt.ABORT: NbdSession._opt_abort,
    p.Opt.STRUCTURED_REPLY: NbdSession._opt_structured_reply,
    p.Opt.SET_META_CONTEXT: NbdSession._opt_set_meta_context,
    p.Opt.LIST_META_CONTEXT: NbdSession._opt_list_meta_context,
}
