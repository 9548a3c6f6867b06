"""Receive buffers for an ``asyncio.BufferedProtocol`` whose parser can take large payloads
straight from the socket.

With a plain ``asyncio.Protocol``, every byte received is copied twice in user space before a
parser sees it whole: the event loop reads into its own buffer and copies that into a new
``bytes`` for ``data_received``, and a payload that arrived in pieces is joined. For a 1 MiB
write that is two copies of 1 MiB, per process it passes through. A ``BufferedProtocol`` lets
the transport read into memory we choose (``get_buffer``): ``Receiver`` hands it either the
rest of the payload being gathered (the parser's own buffer: no copy at all) or a staging
buffer whose bytes the parser then copies what it keeps of (headers, small frames).

After a payload taken straight from the socket, the next read is offered only ``header``
bytes of staging: the header of a following large frame arrives alone (plus a little), and
its payload then lands in its own buffer too, instead of up to ``size`` bytes of it being
copied out of staging. As soon as a read brings no large payload the full staging size is
offered again, so streams of small frames keep one read per batch.

The connections of one server share an ``Intake``: one staging buffer (an event loop reads
one socket at a time, and parsers copy what they keep, so idle connections cost no buffer
each) and a budget for the payload buffers being filled. A payload's buffer is reserved at
its full announced size when its header arrives; past the budget, a parser gathers the
payload as it arrives instead (copies, but memory follows the bytes received), so headers
announcing large payloads and then stalling cannot reserve more than the budget.
"""

from __future__ import annotations

import ctypes
from typing import Protocol, TypeVar

R_co = TypeVar("R_co", covariant=True)

STAGING = 256 * 1024  # what uvloop reads at once for a plain Protocol
HEADER_READ = 4096  # staging offered right after a payload read straight into its buffer
PAYLOAD_BUDGET = 512 << 20  # bytes of payload buffers a server may have reserved and unfilled


_new_bytearray = ctypes.pythonapi.PyByteArray_FromStringAndSize
_new_bytearray.argtypes = (ctypes.c_void_p, ctypes.c_ssize_t)
_new_bytearray.restype = ctypes.py_object


def payload_buffer(size: int) -> bytearray:
    """A ``bytearray`` of ``size`` bytes whose contents are undefined: CPython's
    ``PyByteArray_FromStringAndSize(NULL, size)`` skips the zeroing ``bytearray(size)`` does
    (a 1 MiB memset per large write, 3% of a storage server's CPU at 1 MiB writes). For
    buffers that are filled whole before anything reads them."""
    if size < 0:
        raise ValueError(f"buffer size {size} < 0")
    buf = _new_bytearray(None, size)
    assert type(buf) is bytearray
    return buf


class Intake:
    """What the connections of one server (on one event-loop thread) share: a staging
    buffer for ``Receiver``, and the budget of payload buffers reserved and not yet filled."""

    __slots__ = ("budget", "reserved", "staging")

    def __init__(self, staging: int = STAGING, budget: int = PAYLOAD_BUDGET) -> None:
        if staging <= 0 or budget < 0:
            raise ValueError(f"staging {staging} must be > 0 and budget {budget} >= 0")
        self.staging = memoryview(payload_buffer(staging))
        self.budget = budget
        self.reserved = 0

    def reserve(self, size: int) -> bytearray | None:
        """A payload buffer of ``size`` bytes counted against the budget, or None (nothing
        changed) if it would exceed it. ``MemoryError`` leaves nothing changed either.
        Give it back with ``release(size)`` once filled, or when abandoned."""
        if self.reserved + size > self.budget:
            return None
        buf = payload_buffer(size)
        self.reserved += size
        return buf

    def release(self, size: int) -> None:
        """``size`` bytes reserved are filled or abandoned."""
        self.reserved -= size


class Parser(Protocol[R_co]):
    """What ``Receiver`` needs of a parser (``chunk.wire.RequestDecoder``, ``ServerParser``)."""

    def feed(self, data: memoryview) -> R_co:
        """Take bytes received; ``data`` is only valid during the call (copy what is kept)."""
        ...

    def payload_view(self) -> memoryview | None:
        """Writable memory for exactly the payload bytes still missing, or None."""
        ...

    def payload_received(self, n: int) -> R_co:
        """``n`` bytes were written at the start of the last ``payload_view``."""
        ...


class Receiver:
    """The ``get_buffer``/``buffer_updated`` pair of one connection, over its parser.

    ``get`` and ``updated`` must alternate, as the transport calls them."""

    __slots__ = ("_after_payload", "_direct", "_header", "_staging")

    def __init__(self, intake: Intake, header: int = HEADER_READ) -> None:
        if not 0 < header <= len(intake.staging):
            raise ValueError(f"header read {header} must be in 1..{len(intake.staging)}")
        self._staging = intake.staging
        self._header = header
        self._direct = False  # the last buffer handed out was the parser's payload
        self._after_payload = False

    def get(self, parser: Parser[object]) -> memoryview:
        """The buffer for the next read: the parser's payload, else staging."""
        view = parser.payload_view()
        if view is not None:
            self._direct = True
            return view
        self._direct = False
        return self._staging[: self._header] if self._after_payload else self._staging

    def updated(self, parser: Parser[R_co], n: int) -> R_co:
        """``n`` bytes arrived in the buffer of the last ``get``: hand them to ``parser`` and
        return what it returns. The parser's exceptions propagate."""
        if self._direct:
            self._after_payload = True
            return parser.payload_received(n)
        self._after_payload = False
        return parser.feed(self._staging[:n])
