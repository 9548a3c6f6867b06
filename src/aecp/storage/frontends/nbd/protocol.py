"""Sans-I/O NBD codec, server side: client bytes in, events out; replies and option answers out
as bytes. Nothing here does I/O or keeps time.

``ServerParser`` turns the client's stream into ``ClientFlags``, ``OptionRequest`` and
``Request`` events, validating every transmission request against the negotiated export so
that a ``Request`` with ``error == 0`` is always in range and a WRITE carries exactly ``length``
bytes. Problems come in two kinds:

* the stream is still in sync (bad flags, a range outside the export, an oversized payload,
  which is skipped): the event carries an NBD errno (``Request.error``) or a ``too_big`` mark
  and the session answers with an error reply;
* the stream is out of sync or a MUST was broken (bad magic, unknown client flags, a message
  cut off by EOF): ``ProtocolError`` is raised and the connection must be closed.

Spec references are to NBD ``proto.md``.
"""

from __future__ import annotations

import enum
import errno
import struct
from typing import NamedTuple

from aecp.common.errors import AecpError
from aecp.common.receive import Intake, payload_buffer

# --- magic numbers (proto.md "Newstyle negotiation", "Transmission") -------------------------
NBDMAGIC = 0x4E42444D41474943  # 'NBDMAGIC'
IHAVEOPT = 0x49484156454F5054  # 'IHAVEOPT'
OPT_REPLY_MAGIC = 0x3E889045565A9
REQUEST_MAGIC = 0x25609513
SIMPLE_REPLY_MAGIC = 0x67446698
STRUCTURED_REPLY_MAGIC = 0x668E33EF

MAX_STRING = 4096  # proto.md "Conventions": strings MUST be no longer than 4096 bytes
MAX_OPTION_DATA = 64 * 1024  # larger option payloads are skipped and answered ERR_TOO_BIG
MAX_PAYLOAD = 32 * 1024 * 1024  # largest READ/WRITE we accept (advertised NBD_INFO_BLOCK_SIZE)
PREFERRED_BLOCK = 4096
BASE_ALLOCATION = "base:allocation"
BASE_ALLOCATION_ID = 1  # our metadata context id for base:allocation


class HandshakeFlag(enum.IntFlag):
    """proto.md "Handshake flags" (server, 16 bits)."""

    FIXED_NEWSTYLE = 1 << 0
    NO_ZEROES = 1 << 1


class ClientFlag(enum.IntFlag):
    """proto.md "Client flags" (32 bits)."""

    FIXED_NEWSTYLE = 1 << 0
    NO_ZEROES = 1 << 1


class TransmissionFlag(enum.IntFlag):
    """proto.md "Transmission flags" (16 bits)."""

    HAS_FLAGS = 1 << 0
    READ_ONLY = 1 << 1
    SEND_FLUSH = 1 << 2
    SEND_FUA = 1 << 3
    ROTATIONAL = 1 << 4
    SEND_TRIM = 1 << 5
    SEND_WRITE_ZEROES = 1 << 6
    SEND_DF = 1 << 7
    CAN_MULTI_CONN = 1 << 8
    SEND_CACHE = 1 << 10
    SEND_FAST_ZERO = 1 << 11


class Opt(enum.IntEnum):
    """proto.md "Option types"."""

    EXPORT_NAME = 1
    ABORT = 2
    LIST = 3
    STARTTLS = 5
    INFO = 6
    GO = 7
    STRUCTURED_REPLY = 8
    LIST_META_CONTEXT = 9
    SET_META_CONTEXT = 10


class Rep(enum.IntEnum):
    """proto.md "Option reply types"; errors have bit 31 set."""

    ACK = 1
    SERVER = 2
    INFO = 3
    META_CONTEXT = 4
    ERR_UNSUP = (1 << 31) + 1
    ERR_POLICY = (1 << 31) + 2
    ERR_INVALID = (1 << 31) + 3
    ERR_TLS_REQD = (1 << 31) + 5
    ERR_UNKNOWN = (1 << 31) + 6
    ERR_SHUTDOWN = (1 << 31) + 7
    ERR_TOO_BIG = (1 << 31) + 9


class Info(enum.IntEnum):
    """proto.md ``NBD_REP_INFO`` information types."""

    EXPORT = 0
    NAME = 1
    DESCRIPTION = 2
    BLOCK_SIZE = 3


class Cmd(enum.IntEnum):
    """proto.md "Request types"."""

    READ = 0
    WRITE = 1
    DISC = 2
    FLUSH = 3
    TRIM = 4
    CACHE = 5
    WRITE_ZEROES = 6
    BLOCK_STATUS = 7


class CmdFlag(enum.IntFlag):
    """proto.md "Command flags"."""

    FUA = 1 << 0
    NO_HOLE = 1 << 1
    DF = 1 << 2
    REQ_ONE = 1 << 3
    FAST_ZERO = 1 << 4


class ReplyType(enum.IntEnum):
    """proto.md "Structured reply types"."""

    NONE = 0
    OFFSET_DATA = 1
    OFFSET_HOLE = 2
    BLOCK_STATUS = 5
    ERROR = (1 << 15) + 1
    ERROR_OFFSET = (1 << 15) + 2


REPLY_FLAG_DONE = 1  # proto.md "Structured reply flags"

# Plain ints for the hot path (enum member access is slow).
_READ, _WRITE, _DISC, _FLUSH, _TRIM, _WZ, _BS = 0, 1, 2, 3, 4, 6, 7
_FUA, _NO_HOLE, _DF, _REQ_ONE = 1, 2, 4, 8
#: command flags each command accepts (FUA is valid on every command, proto.md "Command flags");
#: None: the command is not supported (CACHE and unknown types answer EINVAL)
_ALLOWED_FLAGS: tuple[int | None, ...] = (
    _FUA | _DF, _FUA, 0xFFFF, _FUA, _FUA, None, _FUA | _NO_HOLE, _FUA | _REQ_ONE,
)  # fmt: skip
_WRITES = frozenset((_WRITE, _TRIM, _WZ))

# --- wire structures ----------------------------------------------------------------------
_GREETING = struct.Struct(">QQH")  # "Newstyle negotiation": NBDMAGIC, IHAVEOPT, handshake flags
_CLIENT_FLAGS = struct.Struct(">I")
_OPTION = struct.Struct(">QII")  # "Newstyle negotiation": IHAVEOPT, option, length
_OPTION_REPLY = struct.Struct(">QIII")  # "Fixed newstyle negotiation": magic, option, type, len
_EXPORT_NAME_REPLY = struct.Struct(">QH")  # NBD_OPT_EXPORT_NAME: size, transmission flags
_REQUEST = struct.Struct(">IHHQQI")  # "Request message": magic, flags, type, cookie, off, len
_SIMPLE = struct.Struct(">IIQ")  # "Simple reply message": magic, error, cookie
_CHUNK = struct.Struct(">IHHQI")  # "Structured reply chunk message": magic, flags, type, ...
_CHUNK_DATA = struct.Struct(">IHHQIQ")  # chunk header + NBD_REPLY_TYPE_OFFSET_DATA offset
_CHUNK_HOLE = struct.Struct(">IHHQIQI")  # chunk header + NBD_REPLY_TYPE_OFFSET_HOLE payload
_CHUNK_ERROR = struct.Struct(">IHHQIIH")  # chunk header + NBD_REPLY_TYPE_ERROR error, msg len
_CHUNK_STATUS = struct.Struct(">IHHQII")  # chunk header + NBD_REPLY_TYPE_BLOCK_STATUS ctx id
_EXTENT = struct.Struct(">II")  # block status descriptor: length, flags
_U16 = struct.Struct(">H")
_U32 = struct.Struct(">I")
_INFO_EXPORT = struct.Struct(">HQH")  # NBD_INFO_EXPORT: type, size, transmission flags
_INFO_BLOCK_SIZE = struct.Struct(">HIII")  # NBD_INFO_BLOCK_SIZE: type, min, preferred, max
REQUEST_SIZE = _REQUEST.size
ZERO_PAD = bytes(124)


class NbdError(AecpError):
    """Root of the NBD front end's errors."""

    code = "nbd_error"


class ProtocolError(NbdError):
    """The client broke the protocol so that the stream cannot be trusted: close the connection."""

    code = "nbd_protocol_error"


class OptionError(NbdError):
    """An option cannot be honoured; the stream is in sync. ``reply`` is the NBD_REP_ERR_* type."""

    code = "nbd_option_error"

    def __init__(self, reply: Rep, message: str) -> None:
        super().__init__(message, reply=int(reply))
        self.reply = reply


class ClientFlags(NamedTuple):
    """The client's 32-bit flags (proto.md "Client flags")."""

    flags: int


class OptionRequest(NamedTuple):
    """One option from the haggling phase; ``too_big``: its data was skipped, not kept."""

    option: int
    data: bytes
    too_big: bool = False


class Request(NamedTuple):
    """A transmission request (proto.md "Request message").

    ``error`` is 0 when the request is valid for the export (then ``offset + length`` lies
    inside it and a WRITE's ``payload`` holds exactly ``length`` bytes); otherwise it is the
    NBD errno to answer with and ``payload`` is None.
    """

    flags: int
    command: int
    cookie: int
    offset: int
    length: int
    payload: bytes | bytearray | None
    error: int


class ExportParams(NamedTuple):
    """What the parser needs to validate requests once transmission starts."""

    size: int
    read_only: bool = False
    structured: bool = False
    block_status: bool = False  # a metadata context was negotiated for this export
    max_payload: int = MAX_PAYLOAD


class _Mode(enum.Enum):
    CLIENT_FLAGS = "client flags"
    OPTIONS = "options"
    TRANSMISSION = "transmission"
    DONE = "done"


class ServerParser:
    """Incremental parser of what an NBD client sends (fixed newstyle, server side).

    ``feed`` bytes in any split; ``next_event`` returns one event at a time or None when more
    bytes are needed. Call ``enter_transmission`` after accepting NBD_OPT_GO/EXPORT_NAME and
    before asking for the next event. ``eof`` tells whether the client stopped mid-message.

    A WRITE of at least ``collect_min`` bytes whose payload is still incomplete gets a buffer of
    its own (the request's ``payload``, a ``bytearray``): ``feed`` copies into it, or the caller
    reads the socket straight into ``payload_view`` and reports with ``payload_received``.
    """

    #: WRITE payloads at least this large are gathered into a buffer of their own
    collect_min = 64 * 1024

    def __init__(
        self,
        handshake_flags: int = HandshakeFlag.FIXED_NEWSTYLE | HandshakeFlag.NO_ZEROES,
        intake: Intake | None = None,
    ):
        self._handshake_flags = int(handshake_flags)
        self._intake = intake  # the budget of payload buffers (none: unlimited)
        self._buf = bytearray()
        self._skip = 0  # bytes of an oversized payload still to drop
        self._need = 0  # bytes of a large WRITE payload still to come into _payload
        self._payload = bytearray()
        self._filled = 0  # bytes of _payload received
        self._header: tuple[int, int, int, int, int] | None = None  # the collected WRITE
        self._mode = _Mode.CLIENT_FLAGS
        self._export = ExportParams(size=0)

    @property
    def buffered(self) -> int:
        """Bytes received and not yet turned into events."""
        return len(self._buf)

    def feed(self, data: bytes | bytearray | memoryview) -> None:
        """Take bytes received from the client (copied: ``data`` may be reused after)."""
        if self._mode is _Mode.DONE:
            return
        if self._skip or self._need:
            view = memoryview(data).cast("B")
            n = min(self._skip, len(view))
            self._skip -= n
            view = view[n:]
            n = min(self._need, len(view))
            if n:
                self._payload[self._filled : self._filled + n] = view[:n]
                self._filled += n
                self._need -= n
                view = view[n:]
            if view:
                self._buf += view
        else:
            self._buf += data

    def payload_view(self) -> memoryview | None:
        """Writable memory for exactly the rest of the large WRITE payload being gathered, or
        None (then ``feed`` what arrives). After filling some, call ``payload_received``."""
        if not self._need:
            return None
        return memoryview(self._payload)[self._filled :]

    def payload_received(self, n: int) -> None:
        """``n`` bytes were written at the start of the last ``payload_view``."""
        if not 0 <= n <= self._need:
            raise ValueError(f"{n} bytes received outside a payload view")
        self._filled += n
        self._need -= n

    def enter_transmission(self, export: ExportParams) -> None:
        """Switch to transmission requests, validated against ``export``."""
        self._export = export
        self._mode = _Mode.TRANSMISSION

    def eof(self) -> None:
        """The client closed its side; ``ProtocolError`` if that cut a message in two."""
        if self._mode is not _Mode.DONE and (self._buf or self._skip or self._need):
            raise ProtocolError(
                f"connection closed in the middle of a message ({self._mode.value} phase, "
                f"{len(self._buf) or self._skip or self._need} bytes missing or pending)"
            )

    def next_event(self) -> ClientFlags | OptionRequest | Request | None:
        """The next complete event, or None when more bytes are needed."""
        if self._mode is _Mode.TRANSMISSION:
            return self._next_request()
        if self._mode is _Mode.OPTIONS:
            return self._next_option()
        if self._mode is _Mode.CLIENT_FLAGS:
            return self._next_client_flags()
        return None

    def _next_client_flags(self) -> ClientFlags | None:
        if len(self._buf) < 4:
            return None
        (flags,) = _CLIENT_FLAGS.unpack_from(self._buf)
        del self._buf[:4]
        if flags & ~self._handshake_flags:  # proto.md "Client flags": server MUST drop
            self._mode = _Mode.DONE
            raise ProtocolError(f"client flags {flags:#x} not offered by the server")
        self._mode = _Mode.OPTIONS
        return ClientFlags(flags)

    def _next_option(self) -> OptionRequest | None:
        buf = self._buf
        if len(buf) < _OPTION.size:
            return None
        magic, option, length = _OPTION.unpack_from(buf)
        if magic != IHAVEOPT:
            self._mode = _Mode.DONE
            raise ProtocolError(f"bad option magic {magic:#x}")
        if length > MAX_OPTION_DATA:
            del buf[: _OPTION.size]
            self._discard(length)
            return OptionRequest(option, b"", too_big=True)
        end = _OPTION.size + length
        if len(buf) < end:
            return None
        data = bytes(buf[_OPTION.size : end])
        del buf[:end]
        return OptionRequest(option, data)

    def _next_request(self) -> Request | None:
        if self._header is not None:
            return self._collected()
        buf = self._buf
        if len(buf) < 28:
            return None
        magic, flags, cmd, cookie, offset, length = _REQUEST.unpack_from(buf)
        if magic != REQUEST_MAGIC:
            self._mode = _Mode.DONE
            raise ProtocolError(f"bad request magic {magic:#x}")
        error = self._check(flags, cmd, offset, length)
        if cmd == _WRITE:
            if error:
                del buf[:28]
                self._discard(length)
                return Request(flags, cmd, cookie, offset, length, None, error)
            end = 28 + length
            if len(buf) < end:
                space = self._reserve(length) if length >= self.collect_min else None
                if space is not None:  # gather the rest without growing the buffer
                    self._header = (flags, cmd, cookie, offset, length)
                    self._payload = space
                    self._filled = len(buf) - 28
                    self._payload[: self._filled] = memoryview(buf)[28:]
                    self._need = end - len(buf)
                    buf.clear()
                return None
            payload = memoryview(buf)[28:end].tobytes()
            del buf[:end]
            return Request(flags, cmd, cookie, offset, length, payload, 0)
        del buf[:28]
        if cmd == _DISC:
            self._mode = _Mode.DONE
            buf.clear()
        return Request(flags, cmd, cookie, offset, length, None, error)

    def _collected(self) -> Request | None:
        """The large WRITE being collected, once its payload is complete."""
        if self._need or self._header is None:
            return None
        flags, cmd, cookie, offset, length = self._header
        payload, self._payload, self._filled = self._payload, bytearray(), 0
        self._header = None
        if self._intake is not None:
            self._intake.release(length)
        return Request(flags, cmd, cookie, offset, length, payload, 0)

    def _reserve(self, size: int) -> bytearray | None:
        """A buffer for a WRITE payload of ``size`` bytes, or None past the intake's budget
        (then the payload is buffered as it arrives)."""
        return payload_buffer(size) if self._intake is None else self._intake.reserve(size)

    def abandon(self) -> None:
        """The connection is gone: give back the buffer of a payload being gathered, and
        take no more bytes."""
        if self._header is not None and self._intake is not None:
            self._intake.release(self._header[4])
        self._header, self._payload, self._need = None, bytearray(), 0
        self._mode = _Mode.DONE

    def _check(self, flags: int, cmd: int, offset: int, length: int) -> int:
        """The NBD errno a request deserves, 0 if valid (proto.md "Error values")."""
        allowed = _ALLOWED_FLAGS[cmd] if cmd < len(_ALLOWED_FLAGS) else None
        if allowed is None or flags & ~allowed:
            return errno.EINVAL
        if cmd in (_DISC, _FLUSH):
            return 0
        export = self._export
        if cmd <= _WRITE and (
            length > export.max_payload or (flags & _DF and not export.structured)
        ):
            return errno.EINVAL
        if export.read_only and cmd in _WRITES:
            return errno.EPERM
        if cmd == _BS and (length == 0 or not export.block_status):
            return errno.EINVAL
        if offset + length > export.size:
            return errno.ENOSPC if cmd in (_WRITE, _WZ) else errno.EINVAL
        return 0

    def _discard(self, n: int) -> None:
        """Drop the next ``n`` bytes of the stream (those buffered now and those to come)."""
        here = min(n, len(self._buf))
        del self._buf[:here]
        self._skip = n - here


# --- option data decoders -----------------------------------------------------------------


def decode_string(raw: bytes, what: str = "name") -> str:
    """A protocol string (proto.md "Conventions"): UTF-8, no NUL, at most 4096 bytes."""
    if len(raw) > MAX_STRING:
        raise OptionError(Rep.ERR_TOO_BIG, f"{what} is longer than {MAX_STRING} bytes")
    if b"\0" in raw:
        raise OptionError(Rep.ERR_INVALID, f"{what} contains NUL")
    try:
        return raw.decode()
    except UnicodeDecodeError:
        raise OptionError(Rep.ERR_INVALID, f"{what} is not UTF-8") from None


def _take_string(data: bytes, pos: int, what: str) -> tuple[str, int]:
    if pos + 4 > len(data):
        raise OptionError(Rep.ERR_INVALID, f"option data too short for the {what} length")
    (n,) = _U32.unpack_from(data, pos)
    pos += 4
    if pos + n > len(data):
        raise OptionError(Rep.ERR_INVALID, f"{what} runs past the option data")
    return decode_string(data[pos : pos + n], what), pos + n


def parse_info_request(data: bytes) -> tuple[str, list[int]]:
    """NBD_OPT_INFO / NBD_OPT_GO data: export name and the requested NBD_INFO types."""
    name, pos = _take_string(data, 0, "export name")
    if pos + 2 > len(data):
        raise OptionError(Rep.ERR_INVALID, "option data too short for the request count")
    (count,) = _U16.unpack_from(data, pos)
    pos += 2
    if pos + 2 * count != len(data):
        raise OptionError(Rep.ERR_INVALID, "information request list has the wrong length")
    return name, [_U16.unpack_from(data, pos + 2 * i)[0] for i in range(count)]


def parse_meta_context_request(data: bytes) -> tuple[str, list[str]]:
    """NBD_OPT_{LIST,SET}_META_CONTEXT data: export name and the queries."""
    name, pos = _take_string(data, 0, "export name")
    if pos + 4 > len(data):
        raise OptionError(Rep.ERR_INVALID, "option data too short for the query count")
    (count,) = _U32.unpack_from(data, pos)
    pos += 4
    queries: list[str] = []
    for _ in range(count):
        query, pos = _take_string(data, pos, "query")
        queries.append(query)
    if pos != len(data):
        raise OptionError(Rep.ERR_INVALID, "trailing bytes after the queries")
    return name, queries


# --- handshake encoders ---------------------------------------------------------------------


def server_greeting(flags: int = HandshakeFlag.FIXED_NEWSTYLE | HandshakeFlag.NO_ZEROES) -> bytes:
    """The first bytes a newstyle server sends (proto.md "Newstyle negotiation")."""
    return _GREETING.pack(NBDMAGIC, IHAVEOPT, flags)


def option_reply(option: int, reply: int, data: bytes = b"") -> bytes:
    """One fixed-newstyle option reply (proto.md "Fixed newstyle negotiation")."""
    return _OPTION_REPLY.pack(OPT_REPLY_MAGIC, option, reply, len(data)) + data


def rep_server(option: int, name: str) -> bytes:
    """NBD_REP_SERVER: one export in the answer to NBD_OPT_LIST."""
    raw = name.encode()
    return option_reply(option, Rep.SERVER, _U32.pack(len(raw)) + raw)


def rep_meta_context(option: int, context_id: int, name: str) -> bytes:
    """NBD_REP_META_CONTEXT: a metadata context id and name."""
    return option_reply(option, Rep.META_CONTEXT, _U32.pack(context_id) + name.encode())


def rep_info_export(option: int, size: int, tflags: int) -> bytes:
    """NBD_REP_INFO carrying NBD_INFO_EXPORT (size and transmission flags)."""
    return option_reply(option, Rep.INFO, _INFO_EXPORT.pack(Info.EXPORT, size, tflags))


def rep_info_block_size(option: int, minimum: int, preferred: int, maximum: int) -> bytes:
    """NBD_REP_INFO carrying NBD_INFO_BLOCK_SIZE (proto.md "Block size constraints")."""
    payload = _INFO_BLOCK_SIZE.pack(Info.BLOCK_SIZE, minimum, preferred, maximum)
    return option_reply(option, Rep.INFO, payload)


def rep_info_name(option: int, name: str) -> bytes:
    """NBD_REP_INFO carrying NBD_INFO_NAME (the canonical export name)."""
    return option_reply(option, Rep.INFO, _U16.pack(Info.NAME) + name.encode())


def export_name_reply(size: int, tflags: int, no_zeroes: bool) -> bytes:
    """The answer to NBD_OPT_EXPORT_NAME: size, flags and (unless NO_ZEROES) 124 zero bytes."""
    return _EXPORT_NAME_REPLY.pack(size, tflags) + (b"" if no_zeroes else ZERO_PAD)


# --- transmission encoders ----------------------------------------------------------------


def simple_reply(cookie: int, error: int = 0) -> bytes:
    """Simple reply header (proto.md "Simple reply message"); READ data follows it."""
    return _SIMPLE.pack(SIMPLE_REPLY_MAGIC, error, cookie)


def chunk_data_header(cookie: int, offset: int, length: int, done: bool = True) -> bytes:
    """Header of an NBD_REPLY_TYPE_OFFSET_DATA chunk; ``length`` data bytes follow it."""
    flags = REPLY_FLAG_DONE if done else 0
    return _CHUNK_DATA.pack(
        STRUCTURED_REPLY_MAGIC, flags, ReplyType.OFFSET_DATA, cookie, length + 8, offset
    )


def chunk_hole(cookie: int, offset: int, length: int, done: bool = True) -> bytes:
    """An NBD_REPLY_TYPE_OFFSET_HOLE chunk: ``length`` bytes at ``offset`` read as zeros."""
    flags = REPLY_FLAG_DONE if done else 0
    return _CHUNK_HOLE.pack(
        STRUCTURED_REPLY_MAGIC, flags, ReplyType.OFFSET_HOLE, cookie, 12, offset, length
    )


def chunk_block_status(
    cookie: int, context_id: int, extents: list[tuple[int, int]], done: bool = True
) -> bytes:
    """An NBD_REPLY_TYPE_BLOCK_STATUS chunk: (length, flags) descriptors for one context."""
    flags = REPLY_FLAG_DONE if done else 0
    head = _CHUNK_STATUS.pack(
        STRUCTURED_REPLY_MAGIC, flags, ReplyType.BLOCK_STATUS, cookie,
        4 + 8 * len(extents), context_id,
    )  # fmt: skip
    return head + b"".join(_EXTENT.pack(n, f) for n, f in extents)


def chunk_error(cookie: int, error: int, message: str = "", done: bool = True) -> bytes:
    """An NBD_REPLY_TYPE_ERROR chunk with a human-readable message."""
    raw = message.encode()[:MAX_STRING]
    flags = REPLY_FLAG_DONE if done else 0
    return (
        _CHUNK_ERROR.pack(
            STRUCTURED_REPLY_MAGIC, flags, ReplyType.ERROR, cookie, 6 + len(raw), error, len(raw)
        )
        + raw
    )


def chunk_done(cookie: int) -> bytes:
    """The final NBD_REPLY_TYPE_NONE chunk of a successful structured reply."""
    return _CHUNK.pack(STRUCTURED_REPLY_MAGIC, REPLY_FLAG_DONE, ReplyType.NONE, cookie, 0)


# --- client-side encoders (for tests and tools) -------------------------------------------


def encode_option(option: int, data: bytes = b"") -> bytes:
    """What a client sends for one option."""
    return _OPTION.pack(IHAVEOPT, option, len(data)) + data


def encode_request(
    command: int, cookie: int, offset: int = 0, length: int = 0, flags: int = 0,
    payload: bytes = b"",
) -> bytes:  # fmt: skip
    """What a client sends for one transmission request (WRITE: ``payload`` follows)."""
    return _REQUEST.pack(REQUEST_MAGIC, flags, command, cookie, offset, length) + payload
