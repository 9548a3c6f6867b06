"""The replica protocol between access points and chunk servers: a sans-I/O codec.

Spec — AECP replica protocol, version 1. TCP, one stream per connection, integers big-endian.
The client sends request frames, the server answers each with one response frame carrying the
same request id, in any order (many requests may be in flight: pipelining).

Request frame: a 52-byte header, the extent id (``id_len`` ASCII bytes), the payload::

    magic u32 = 0x41435251 "ACRQ" | op u8 | flags u8 | id_len u8 (<= 64) | reserved u8 = 0
    | request_id u64 | offset u64 | length u64 | epoch u64 | generation u64 | payload_len u32

Response frame: a 20-byte header, the payload::

    magic u32 = 0x41435253 "ACRS" | op u8 (echoed) | status u8 | reserved u16 = 0
    | request_id u64 | payload_len u32

Ops (fields not named are 0; only WRITE, REPAIR and WRITE_RAW carry a request payload; for
WRITE and REPAIR ``length`` equals ``payload_len``)::

    op  name            request                          OK response payload
    0   PING            -                                -
    1   CREATE          id, length=size, epoch, gen      -
    2   DELETE          id                               -
    3   STAT            id                               size|epoch|generation|allocated|valid u64
    4   LIST            -                                per id: len u8, ASCII bytes
    5   WRITE           id, offset, epoch, gen, data     -          (flags: below)
    6   READ            id, offset, length               the data (exactly length bytes)
    7   TRIM            id, offset, length, epoch, gen   -
    8   ZERO            id, offset, length, epoch, gen   -
    9   FLUSH           id (empty: every replica)        -
    10  FENCE           id, epoch                        the stored epoch u64
    11  SET_GEN         id, gen                          -
    12  MODIFIED_SINCE  id, gen                          per range: offset u64, length u64
    13  ALLOCATION      id                               per run: offset u64, length u64, valid u8
    14  READ_RAW        id, offset, length               raw blocks (below)
    15  WRITE_RAW       id, epoch (0: unchecked), raw blk -
    16  SCRUB           id                               per bad sector: index u64
    17  REPAIR          id, offset, data                 -

WRITE flags: bit 0 FUA (durable before the answer); bit 1 CRCS: the payload starts with the
CRC-32 (zlib's) of each 4 KiB sector of the data, u32 little-endian (as the replica stores
them), and ``length`` counts the data only, a multiple of 4096. The replica records those
checksums instead of computing its own (the access point computes them once for all
replicas); they are verified on every read like any other.

Raw blocks: offset u64 | block_size u32 | sector u32 | count u32 | count x (bitmap u64,
modgen u64) | the valid sectors' data, in order.

Status: 0 OK, 1 STALE_EPOCH, 2 CHECKSUM, 3 NOT_FOUND, 4 EXISTS, 5 INVALID, 6 IO_ERROR,
7 INTERNAL. An error payload is ``arg u64 | count u32 | count x sector u64 | message UTF-8``,
where ``arg`` is the stored epoch (STALE_EPOCH) or the errno (IO_ERROR) and the sectors are
those of a CHECKSUM error.

Limits: ``payload_len <= MAX_PAYLOAD``; READ and READ_RAW ask for at most ``MAX_DATA`` bytes.
A frame with a bad magic, unknown op, status or flag bits, non-zero reserved bits, ``id_len``
over 64, an oversized or unexpected payload, or a WRITE/REPAIR whose length differs from its
payload (for a CRCS write: a length that is not a whole number of sectors, or a payload that
is not the checksums and the data) is malformed: the decoder raises ``ChunkProtocolError``
and the receiver closes the connection. Payloads that do not parse raise it too.
"""

from __future__ import annotations

import enum
import struct
import sys
from array import array
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Generic, TypeVar

from aecp.common.receive import Intake, payload_buffer
from aecp.storage.chunk.api import Buffer, RawBlocks, ReplicaStat
from aecp.storage.chunk.errors import (
    ChecksumError,
    ChunkError,
    ChunkInvalid,
    ChunkIOError,
    ChunkProtocolError,
    ExtentExists,
    ExtentNotFound,
    StaleEpoch,
)

REQUEST_MAGIC = 0x41435251
RESPONSE_MAGIC = 0x41435253
MAX_DATA = 32 << 20
MAX_PAYLOAD = MAX_DATA + (1 << 20)
MAX_ID = 64
FLAG_FUA = 0x01
FLAG_CRCS = 0x02
#: the sector a CRCS write's checksums cover
CRC_SECTOR = 4096

REQUEST = struct.Struct("!IBBBBQQQQQI")
RESPONSE = struct.Struct("!IBBHQI")
STAT = struct.Struct("!QQQQQ")
RANGE = struct.Struct("!QQ")
RUN = struct.Struct("!QQB")
U64 = struct.Struct("!Q")
RAW_HEAD = struct.Struct("!QIII")
ERROR_HEAD = struct.Struct("!QI")


class Op(enum.IntEnum):
    PING = 0
    CREATE = 1
    DELETE = 2
    STAT = 3
    LIST = 4
    WRITE = 5
    READ = 6
    TRIM = 7
    ZERO = 8
    FLUSH = 9
    FENCE = 10
    SET_GEN = 11
    MODIFIED_SINCE = 12
    ALLOCATION = 13
    READ_RAW = 14
    WRITE_RAW = 15
    SCRUB = 16
    REPAIR = 17


class Status(enum.IntEnum):
    OK = 0
    STALE_EPOCH = 1
    CHECKSUM = 2
    NOT_FOUND = 3
    EXISTS = 4
    INVALID = 5
    IO_ERROR = 6
    INTERNAL = 7


PAYLOAD_OPS = frozenset({Op.WRITE, Op.REPAIR, Op.WRITE_RAW})
_OP_OF = {int(o): o for o in Op}  # a dict lookup is cheaper than Op(value)
_WRITE_CODE = int(Op.WRITE)
_STATUS_OF = {int(s): s for s in Status}


@dataclass(slots=True)
class Request:
    op: Op
    request_id: int
    extent_id: str = ""
    offset: int = 0
    length: int = 0
    epoch: int = 0
    generation: int = 0
    flags: int = 0
    payload: bytes | bytearray = b""

    def encode(self) -> list[Buffer]:
        return encode_request(
            self.op,
            self.request_id,
            self.extent_id,
            self.offset,
            self.length,
            self.epoch,
            self.generation,
            self.flags,
            self.payload,
        )


@dataclass(slots=True)
class Response:
    op: Op
    status: Status
    request_id: int
    payload: bytes = b""

    def encode(self) -> list[Buffer]:
        return encode_response(self.op, self.status, self.request_id, self.payload)


def encode_request(
    op: Op,
    request_id: int,
    extent_id: str = "",
    offset: int = 0,
    length: int = 0,
    epoch: int = 0,
    generation: int = 0,
    flags: int = 0,
    payload: Buffer = b"",
    crcs: bytes = b"",
) -> list[Buffer]:
    """The buffers of one request frame (header + id, then the payload if any). ``crcs``
    (a WRITE's sector checksums, see the module docstring) go before the payload and set
    ``FLAG_CRCS``."""
    try:
        ident = extent_id.encode("ascii")
    except UnicodeEncodeError:
        raise ChunkInvalid(f"bad extent id {extent_id!r}") from None
    size = len(crcs) + len(payload)
    if len(ident) > MAX_ID or size > MAX_PAYLOAD:
        raise ChunkInvalid("extent id or payload too long for the replica protocol")
    if crcs:
        flags |= FLAG_CRCS
    if flags & FLAG_CRCS:
        try:
            _check_write_length(op, flags, length, size)
        except ChunkProtocolError:
            raise ChunkInvalid(
                "sector checksums go with a WRITE of whole 4 KiB sectors, one each"
            ) from None
    try:
        fields = (request_id, offset, length, epoch, generation, size)
        head = REQUEST.pack(REQUEST_MAGIC, op, flags, len(ident), 0, *fields)
    except struct.error as e:
        raise ChunkInvalid(f"a request field is out of range: {e}") from None
    if crcs:
        return [head + ident + crcs, payload]
    return [head + ident, payload] if payload else [head + ident]


def crc_bytes(length: int) -> int:
    """The size of the checksums of a CRCS write of ``length`` data bytes."""
    return 4 * (length // CRC_SECTOR)


def split_crcs(request: Request) -> tuple[Buffer, array[int] | None]:
    """A WRITE's data and, if it carries them (``FLAG_CRCS``), its sector checksums."""
    if not request.flags & FLAG_CRCS:
        return request.payload, None
    n = crc_bytes(request.length)
    crcs = array("I")
    crcs.frombytes(request.payload[:n])
    if sys.byteorder != "little":  # pragma: no cover - big-endian hosts
        crcs.byteswap()
    return memoryview(request.payload)[n:], crcs


def pack_crcs(crcs: array[int]) -> bytes:
    """The wire (and on-disk) form of sector checksums: u32 little-endian."""
    if sys.byteorder == "little":
        return crcs.tobytes()
    swapped = array("I", crcs)  # pragma: no cover - big-endian hosts
    swapped.byteswap()  # pragma: no cover
    return swapped.tobytes()  # pragma: no cover


def encode_response(op: Op, status: Status, request_id: int, payload: Buffer = b"") -> list[Buffer]:
    head = RESPONSE.pack(RESPONSE_MAGIC, op, status, 0, request_id, len(payload))
    return [head, payload] if payload else [head]


F = TypeVar("F")


_REQUEST_FLAGS = FLAG_FUA | FLAG_CRCS


def _check_write_length(code: Op, flags: int, length: int, plen: int) -> None:
    """A WRITE or REPAIR carries exactly its data (and a CRCS write its checksums first)."""
    if not flags & FLAG_CRCS:
        if length != plen:
            raise ChunkProtocolError(f"length {length} differs from payload {plen}")
    elif code is not Op.WRITE or length % CRC_SECTOR or plen != length + crc_bytes(length):
        raise ChunkProtocolError(
            f"a CRCS write of {length} bytes with a payload of {plen} (whole 4 KiB sectors, "
            "4 bytes of checksum each)"
        )


class _Decoder(Generic[F]):
    """Bytes in, frames out; ``ChunkProtocolError`` on a malformed frame (then useless).

    A frame whose payload of at least ``COLLECT_MIN`` bytes is still incomplete is gathered
    apart from the small frames: by reference, chunk by chunk as received, and joined once
    when whole (a growing buffer would copy a 1 MiB write several times) -- or, for the frames
    ``_direct`` accepts, into one buffer of the payload's size that the caller may also fill
    straight from the socket (``payload_view``/``payload_received``: no copy at all)."""

    head: struct.Struct
    #: incomplete payloads at least this large are gathered apart
    COLLECT_MIN = 64 * 1024
    #: received pieces smaller than this are copied while gathering, not referenced: each
    #: reference keeps its whole ``bytes`` object (and its overhead) alive
    REFERENCE_MIN = 16 * 1024

    def __init__(self, max_payload: int = MAX_PAYLOAD, intake: Intake | None = None) -> None:
        self._max = max_payload
        self._intake = intake  # the budget of payload buffers (none: unlimited)
        self._buf = bytearray()
        self._need = 0
        self._broken = False
        self._head = b""  # the header (and id) of the frame being gathered
        self._parts: list[Buffer] | None = None  # its payload so far (by reference)
        self._payload: bytearray | None = None  # or its payload's own buffer
        self._filled = 0  # bytes of ``_payload`` received
        self._missing = 0  # payload bytes still to come

    def feed(self, data: Buffer) -> list[F]:
        """Every frame completed by ``data``, in order. ``bytes`` may be kept by reference;
        any other buffer is only read during the call (what is kept is copied)."""
        if self._broken:
            raise ChunkProtocolError("the stream is already broken")
        if self._missing:
            return self._gather(data)
        buf = self._buf
        if buf:
            buf += data
            if len(buf) < self._need:
                if self._need - len(buf) >= self.COLLECT_MIN and len(buf) >= self.head.size:
                    self._start_gathering(buf)  # its header (and id) may be whole only now
                return []
        try:
            frames, used, self._need = self._parse(buf if buf else data)
        except ChunkProtocolError:
            self._broken = True
            raise
        if buf:
            del buf[:used]
            rest: Buffer = buf
        else:
            rest = memoryview(data).cast("B")[used:]
        if self._need - len(rest) >= self.COLLECT_MIN and len(rest) >= self.head.size:
            self._start_gathering(rest)
        elif rest is not buf:
            buf += rest
        return frames

    def payload_view(self) -> memoryview | None:
        """Where the next bytes of the stream go, when they are all payload of a frame being
        gathered into its own buffer (exactly the bytes still missing); None otherwise (then
        ``feed`` the bytes). Fill it, then call ``payload_received``."""
        if self._payload is None:
            return None
        return memoryview(self._payload)[self._filled :]

    def payload_received(self, n: int) -> list[F]:
        """``n`` bytes were written at the start of the last ``payload_view``: the frame, if
        that completed it."""
        if self._payload is None or not 0 <= n <= self._missing:
            raise ValueError(f"{n} bytes received outside a payload view")
        self._filled += n
        self._missing -= n
        return [] if self._missing else [self._complete()]

    def _start_gathering(self, rest: Buffer) -> None:
        """Gather the rest of the large frame that ``rest`` (the unparsed bytes, ``_buf`` or
        what follows the last whole frame of the data fed) starts, if its header (and id) is
        whole; else keep ``rest`` in ``_buf``."""
        buf = self._buf
        with memoryview(rest) as view:
            head = self._head_size(view)
            if len(view) < head:
                if rest is not buf:
                    buf += view
                return
            payload = self._reserve(self._need - head) if self._direct(view) else None
            self._head = bytes(view[:head])
            if payload is not None:
                self._payload, self._filled = payload, len(view) - head
                payload[: self._filled] = view[head:]
            else:
                self._parts = [bytes(view[head:])]
            self._missing = self._need - len(view)
        buf.clear()

    def _gather(self, data: Buffer) -> list[F]:
        view = memoryview(data).cast("B")
        n = min(self._missing, len(view))
        self._missing -= n
        if self._payload is not None:
            self._payload[self._filled : self._filled + n] = view[:n]
            self._filled += n
        else:
            self._keep(view[:n], type(data) is bytes)
        if self._missing:
            return []
        frame = self._complete()
        return [frame, *self.feed(view[n:])] if n < len(view) else [frame]

    def _keep(self, piece: memoryview, immutable: bool) -> None:
        parts = self._parts
        assert parts is not None
        if immutable and len(piece) >= self.REFERENCE_MIN:
            parts.append(piece)
        elif parts and type(parts[-1]) is bytearray:
            parts[-1] += piece
        else:
            parts.append(bytearray(piece))

    def _reserve(self, size: int) -> bytearray | None:
        """A buffer for a payload of ``size`` bytes, or None past the intake's budget."""
        return payload_buffer(size) if self._intake is None else self._intake.reserve(size)

    def abandon(self) -> None:
        """The connection is gone: give back the buffer of a payload being gathered."""
        if self._payload is not None and self._intake is not None:
            self._intake.release(len(self._payload))
        self._payload, self._parts, self._missing, self._broken = None, None, 0, True

    def _complete(self) -> F:
        """The frame whose payload was gathered (now whole)."""
        payload: bytes | bytearray
        if self._payload is not None:
            payload, self._payload, self._filled = self._payload, None, 0
            if self._intake is not None:
                self._intake.release(len(payload))
        else:
            payload, self._parts = b"".join(self._parts or ()), None
        head, self._need = self._head, 0
        try:
            return self._frame_with(memoryview(head), payload)
        except ChunkProtocolError:
            self._broken = True
            raise

    def _parse(self, src: Buffer) -> tuple[list[F], int, int]:
        frames: list[F] = []
        pos, hsize, frame = 0, self.head.size, self._frame
        with memoryview(src) as view:
            end = len(view)
            while end - pos >= hsize:
                item, total = frame(view, pos, end)
                if item is None:
                    return frames, pos, total
                frames.append(item)
                pos += total
        return frames, pos, hsize

    def _frame(self, view: memoryview, pos: int, end: int) -> tuple[F | None, int]:
        """The frame at ``pos`` (None if it ends after ``end``) and its size in bytes."""
        raise NotImplementedError

    def _head_size(self, view: memoryview) -> int:
        """Bytes before the payload of the (validated) frame header at the start of ``view``."""
        raise NotImplementedError

    def _direct(self, head: memoryview) -> bool:
        """Whether the payload of the (validated) frame header at the start of ``head`` is
        gathered into its own buffer (a ``bytearray`` in the frame) rather than joined."""
        return False

    def _frame_with(self, head: memoryview, payload: bytes | bytearray) -> F:
        """The frame of a validated ``head`` (``_head_size`` bytes) and its whole payload."""
        raise NotImplementedError


class RequestDecoder(_Decoder[Request]):
    """The server side: bytes from a client in, ``Request`` frames out."""

    head = REQUEST

    def _frame(self, view: memoryview, pos: int, end: int) -> tuple[Request | None, int]:
        magic, op, flags, id_len, reserved, rid, offset, length, epoch, gen, plen = (
            REQUEST.unpack_from(view, pos)
        )
        if magic != REQUEST_MAGIC:
            raise ChunkProtocolError(f"bad request magic {magic:#x}")
        code = _OP_OF.get(op)
        if code is None or flags & ~_REQUEST_FLAGS or reserved or id_len > MAX_ID:
            raise ChunkProtocolError(f"malformed request header (op {op}, flags {flags})")
        if plen > self._max or (plen and code not in PAYLOAD_OPS):
            raise ChunkProtocolError(f"unexpected payload of {plen} bytes for op {op}")
        if code is Op.WRITE or code is Op.REPAIR:
            _check_write_length(code, flags, length, plen)
        elif flags & FLAG_CRCS:
            raise ChunkProtocolError(f"sector checksums on op {op}")
        start = pos + REQUEST.size
        total = REQUEST.size + id_len + plen
        if end - pos < total:
            return None, total
        ident = bytes(view[start : start + id_len]).decode("latin-1")
        payload = bytes(view[start + id_len : pos + total])
        return Request(code, rid, ident, offset, length, epoch, gen, flags, payload), total

    def _head_size(self, view: memoryview) -> int:
        return REQUEST.size + view[6]  # id_len

    def _direct(self, head: memoryview) -> bool:
        return head[4] == _WRITE_CODE  # a WRITE's data goes to disk as received

    def _frame_with(self, head: memoryview, payload: bytes | bytearray) -> Request:
        _, op, flags, id_len, _, rid, offset, length, epoch, gen, _ = REQUEST.unpack_from(head)
        ident = bytes(head[REQUEST.size : REQUEST.size + id_len]).decode("latin-1")
        return Request(_OP_OF[op], rid, ident, offset, length, epoch, gen, flags, payload)


class ResponseDecoder(_Decoder[Response]):
    """The client side: bytes from a server in, ``Response`` frames out."""

    head = RESPONSE

    def _frame(self, view: memoryview, pos: int, end: int) -> tuple[Response | None, int]:
        magic, op, status, reserved, rid, plen = RESPONSE.unpack_from(view, pos)
        if magic != RESPONSE_MAGIC:
            raise ChunkProtocolError(f"bad response magic {magic:#x}")
        code, outcome = _OP_OF.get(op), _STATUS_OF.get(status)
        if code is None or outcome is None or reserved or plen > self._max:
            raise ChunkProtocolError(f"malformed response header (op {op}, status {status})")
        total = RESPONSE.size + plen
        if end - pos < total:
            return None, total
        payload = bytes(view[pos + RESPONSE.size : pos + total]) if plen else b""
        return Response(code, outcome, rid, payload), total

    def _head_size(self, view: memoryview) -> int:
        return RESPONSE.size

    def _frame_with(self, head: memoryview, payload: bytes | bytearray) -> Response:
        _, op, status, _, rid, _ = RESPONSE.unpack_from(head)
        assert type(payload) is bytes  # never gathered into its own buffer (``_direct``)
        return Response(_OP_OF[op], _STATUS_OF[status], rid, payload)


# --- payloads ------------------------------------------------------------------------------


def _records(payload: Buffer, record: struct.Struct, what: str) -> list[tuple[int, ...]]:
    if len(payload) % record.size:
        raise ChunkProtocolError(f"{what}: {len(payload)} bytes is not a whole number of records")
    return list(record.iter_unpack(payload))


def encode_stat(stat: ReplicaStat) -> bytes:
    return STAT.pack(stat.size, stat.epoch, stat.generation, stat.allocated_bytes, stat.valid_bytes)


def decode_stat(payload: Buffer) -> ReplicaStat:
    if len(payload) != STAT.size:
        raise ChunkProtocolError("stat: wrong size")
    return ReplicaStat(*STAT.unpack(payload))


def encode_ids(ids: Sequence[str]) -> bytes:
    return b"".join(bytes((len(i),)) + i.encode("ascii") for i in ids)


def decode_ids(payload: Buffer) -> list[str]:
    data, out, pos = bytes(payload), [], 0
    while pos < len(data):
        n = data[pos]
        if not n or pos + 1 + n > len(data):
            raise ChunkProtocolError("extent id list: truncated")
        out.append(data[pos + 1 : pos + 1 + n].decode("latin-1"))
        pos += 1 + n
    return out


def encode_u64(value: int) -> bytes:
    return U64.pack(value)


def decode_u64(payload: Buffer) -> int:
    if len(payload) != U64.size:
        raise ChunkProtocolError("u64: wrong size")
    value: int = U64.unpack(payload)[0]
    return value


def encode_ranges(ranges: Sequence[tuple[int, int]]) -> bytes:
    return b"".join(RANGE.pack(o, n) for o, n in ranges)


def decode_ranges(payload: Buffer) -> list[tuple[int, int]]:
    return [(o, n) for o, n in _records(payload, RANGE, "ranges")]


def encode_runs(runs: Sequence[tuple[int, int, bool]]) -> bytes:
    return b"".join(RUN.pack(o, n, v) for o, n, v in runs)


def decode_runs(payload: Buffer) -> list[tuple[int, int, bool]]:
    runs = _records(payload, RUN, "allocation")
    if any(v > 1 for _, _, v in runs):
        raise ChunkProtocolError("allocation: bad valid flag")
    return [(o, n, bool(v)) for o, n, v in runs]


def encode_sectors(sectors: Sequence[int]) -> bytes:
    return b"".join(U64.pack(s) for s in sectors)


def decode_sectors(payload: Buffer) -> list[int]:
    return [s for (s,) in _records(payload, U64, "sectors")]


def encode_raw(raw: RawBlocks) -> bytes:
    try:
        head = RAW_HEAD.pack(raw.offset, raw.block_size, raw.sector, len(raw.bitmaps))
        pairs = zip(raw.bitmaps, raw.modgens, strict=True)
        table = b"".join(RANGE.pack(b, g) for b, g in pairs)
    except (struct.error, ValueError) as e:
        raise ChunkInvalid(f"raw blocks do not fit the replica protocol: {e}") from None
    return b"".join((head, table, raw.data))


def decode_raw(payload: bytes | bytearray) -> RawBlocks:
    if len(payload) < RAW_HEAD.size:
        raise ChunkProtocolError("raw blocks: truncated")
    offset, block_size, sector, count = RAW_HEAD.unpack_from(payload)
    start = RAW_HEAD.size + count * RANGE.size
    if len(payload) < start:
        raise ChunkProtocolError("raw blocks: truncated table")
    table = list(RANGE.iter_unpack(memoryview(payload)[RAW_HEAD.size : start]))
    bitmaps = tuple(b for b, _ in table)
    modgens = tuple(g for _, g in table)
    return RawBlocks(offset, block_size, sector, bitmaps, modgens, bytes(payload[start:]))


# --- errors --------------------------------------------------------------------------------


def encode_error(exc: ChunkError) -> tuple[Status, bytes]:
    """The status and payload that carry ``exc``."""
    status, arg, sectors = Status.INTERNAL, 0, []
    if isinstance(exc, StaleEpoch):
        status, arg = Status.STALE_EPOCH, exc.stored
    elif isinstance(exc, ChecksumError):
        status, sectors = Status.CHECKSUM, exc.sectors[: (1 << 16)]
    elif isinstance(exc, ExtentNotFound):
        status = Status.NOT_FOUND
    elif isinstance(exc, ExtentExists):
        status = Status.EXISTS
    elif isinstance(exc, ChunkInvalid):
        status = Status.INVALID
    elif isinstance(exc, ChunkIOError):
        status, arg = Status.IO_ERROR, exc.errno
    message = exc.message.encode("utf-8", "replace")[:4096]
    return status, ERROR_HEAD.pack(arg, len(sectors)) + encode_sectors(sectors) + message


def decode_error(status: Status, payload: bytes, extent_id: str, epoch: int) -> ChunkError:
    """The error a non-OK response stands for (``extent_id``/``epoch``: of the request)."""
    if len(payload) < ERROR_HEAD.size:
        raise ChunkProtocolError("error payload truncated")
    arg, count = ERROR_HEAD.unpack_from(payload)
    end = ERROR_HEAD.size + count * U64.size
    if len(payload) < end:
        raise ChunkProtocolError("error payload truncated")
    sectors = decode_sectors(memoryview(payload)[ERROR_HEAD.size : end])
    message = payload[end:].decode("utf-8", "replace")
    if status == Status.STALE_EPOCH:
        return StaleEpoch(extent_id, epoch, arg)
    if status == Status.CHECKSUM:
        return ChecksumError(extent_id, sectors)
    if status == Status.NOT_FOUND:
        return ExtentNotFound(extent_id)
    if status == Status.EXISTS:
        return ExtentExists(extent_id, message)
    if status == Status.INVALID:
        return ChunkInvalid(message)
    if status == Status.IO_ERROR:
        return ChunkIOError(message, arg)
    return ChunkError(message)
