"""The replica protocol codec: round trips of frames and payloads, any chunking of the byte
stream, and arbitrary bytes never raising anything but ChunkProtocolError."""

from __future__ import annotations

import contextlib
import struct
from array import array

import pytest
from hypothesis import given
from hypothesis import strategies as st

from aecp.common.receive import Intake, Receiver
from aecp.storage.chunk import wire
from aecp.storage.chunk.api import RawBlocks, ReplicaStat
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
from aecp.storage.chunk.wire import Op, Request, Response, Status

u64 = st.integers(0, 2**64 - 1)
ID_CHARS = "abcdefghijklmnopqrstuvwxyz0123456789-"
extent_ids = st.text(ID_CHARS, max_size=64)


@st.composite
def requests(draw: st.DrawFn) -> Request:
    op = draw(st.sampled_from(Op))
    payload = draw(st.binary(max_size=300)) if op in wire.PAYLOAD_OPS else b""
    length = len(payload) if op in (Op.WRITE, Op.REPAIR) else draw(u64)
    return Request(
        op=op,
        request_id=draw(u64),
        extent_id=draw(extent_ids),
        offset=draw(u64),
        length=length,
        epoch=draw(u64),
        generation=draw(u64),
        flags=draw(st.sampled_from([0, wire.FLAG_FUA])),
        payload=payload,
    )


responses = st.builds(
    Response,
    op=st.sampled_from(Op),
    status=st.sampled_from(Status),
    request_id=u64,
    payload=st.binary(max_size=300),
)


def frame(parts: list[wire.Buffer]) -> bytes:
    return b"".join(bytes(p) for p in parts)


def feed_in_chunks(
    decoder: wire.RequestDecoder | wire.ResponseDecoder, data: bytes, cuts: list[int]
) -> list[object]:
    out: list[object] = []
    pos = 0
    for cut in sorted(set(cuts)):
        out += decoder.feed(data[pos:cut])
        pos = cut
    out += decoder.feed(data[pos:])
    return out


def decoder_of(
    cls: type[wire.RequestDecoder] | type[wire.ResponseDecoder], collect_min: int
) -> wire.RequestDecoder | wire.ResponseDecoder:
    """A decoder that gathers payloads from ``collect_min`` bytes (64 KiB normally)."""
    decoder = cls()
    decoder.COLLECT_MIN = collect_min
    return decoder


gather_from = st.sampled_from([wire.RequestDecoder.COLLECT_MIN, 1, 50])


@given(st.lists(requests(), max_size=8), st.lists(st.integers(0, 4000), max_size=10), gather_from)
def test_requests_round_trip_whatever_the_chunking(
    reqs: list[Request], cuts: list[int], collect_min: int
) -> None:
    data = b"".join(frame(r.encode()) for r in reqs)
    cuts = [c for c in cuts if c <= len(data)]
    assert feed_in_chunks(decoder_of(wire.RequestDecoder, collect_min), data, cuts) == reqs


@given(st.lists(responses, max_size=8), st.lists(st.integers(0, 4000), max_size=10), gather_from)
def test_responses_round_trip_whatever_the_chunking(
    resps: list[Response], cuts: list[int], collect_min: int
) -> None:
    data = b"".join(frame(r.encode()) for r in resps)
    cuts = [c for c in cuts if c <= len(data)]
    assert feed_in_chunks(decoder_of(wire.ResponseDecoder, collect_min), data, cuts) == resps


@pytest.mark.parametrize("op", [Op.WRITE, Op.REPAIR])
def test_a_payload_trickled_in_tiny_pieces_is_gathered_compactly(op: Op) -> None:
    """A peer sending a large WRITE (or REPAIR) a byte at a time must not make the server
    keep one object per byte (hundreds of bytes of overhead each)."""
    payload = bytes(range(256)) * 1024  # 256 KiB
    data = frame(Request(op, 1, "e1", 0, len(payload), 0, 0, 0, payload).encode())
    decoder = wire.RequestDecoder()
    assert decoder.feed(data[:100_000]) == []
    for i in range(100_000, 200_000):
        assert decoder.feed(data[i : i + 1]) == []
    if op is Op.WRITE:  # gathered into one buffer of the payload's size
        assert decoder._parts is None and decoder._payload is not None
    else:
        assert decoder._parts is not None and len(decoder._parts) <= 2
    (request,) = decoder.feed(data[200_000:])
    assert request.payload == payload


def receive(
    decoder: wire.RequestDecoder, data: bytes, reads: list[int], header: int = 4096
) -> list[Request]:
    """``data`` as a transport delivers it to a ``BufferedProtocol`` using ``Receiver``:
    each read fills at most the buffer offered, and at most the next of ``reads`` bytes."""
    receiver = Receiver(Intake(staging=8192), header=header)
    out: list[Request] = []
    pos, i = 0, 0
    while pos < len(data):
        buf = receiver.get(decoder)
        n = min(len(buf), reads[i % len(reads)] if reads else len(buf), len(data) - pos)
        i += 1
        buf[:n] = data[pos : pos + n]
        pos += n
        out += receiver.updated(decoder, n)
    return out


@given(
    st.lists(requests(), max_size=8),
    st.lists(st.integers(1, 5000), max_size=10),
    gather_from,
    st.sampled_from([64, 4096, 8192]),
)
def test_requests_received_into_offered_buffers_round_trip(
    reqs: list[Request], reads: list[int], collect_min: int, header: int
) -> None:
    """Through ``Receiver`` (staging, or straight into a WRITE's own payload buffer), in any
    split of the stream, the same frames come out."""
    data = b"".join(frame(r.encode()) for r in reqs)
    decoder = decoder_of(wire.RequestDecoder, collect_min)
    assert isinstance(decoder, wire.RequestDecoder)
    assert receive(decoder, data, reads, header) == reqs


def test_a_large_write_lands_in_its_own_buffer_and_staging_is_not_kept() -> None:
    """After its header, a 1 MiB WRITE's payload is read straight into the buffer that
    becomes ``Request.payload``; the staging buffer's later contents change no frame."""
    payloads = [bytes([i]) * (1 << 20) for i in (1, 2)]
    data = b"".join(
        frame(Request(Op.WRITE, i, "e1", 0, 1 << 20, 0, 0, 0, p).encode())
        for i, p in enumerate(payloads)
    )
    decoder = wire.RequestDecoder()
    receiver = Receiver(Intake(staging=8192))
    got: list[Request] = []
    direct = 0
    pos = 0
    while pos < len(data):
        buf = receiver.get(decoder)
        if decoder._payload is not None:
            direct += len(buf)
        n = min(len(buf), len(data) - pos)
        buf[:n] = data[pos : pos + n]
        pos += n
        got += receiver.updated(decoder, n)
    assert [r.payload for r in got] == payloads
    assert all(type(r.payload) is bytearray for r in got)
    # only what the first read (8 KiB) and the header read (4 KiB) brought was copied
    assert direct >= 2 * (1 << 20) - 8192 - 4096


def test_payload_received_outside_a_payload_view_is_refused() -> None:
    decoder = wire.RequestDecoder()
    with pytest.raises(ValueError):
        decoder.payload_received(1)


@given(st.integers(1, 3), u64, gather_from)
def test_a_write_with_its_sector_checksums_round_trips(
    sectors: int, epoch: int, collect_min: int
) -> None:
    data = bytes(range(256)) * 16 * sectors
    crcs = array("I", range(7, 7 + sectors))
    parts = wire.encode_request(
        Op.WRITE, 1, "e1", 4096, len(data), epoch, 2, wire.FLAG_FUA, data, wire.pack_crcs(crcs)
    )
    (request,) = decoder_of(wire.RequestDecoder, collect_min).feed(frame(parts))
    assert request.flags == wire.FLAG_FUA | wire.FLAG_CRCS and request.length == len(data)
    got_data, got_crcs = wire.split_crcs(request)
    assert bytes(got_data) == data and got_crcs == crcs
    assert wire.split_crcs(Request(Op.WRITE, 2, "e1", 0, 3, payload=b"abc")) == (b"abc", None)


def test_sector_checksums_that_do_not_fit_their_write_are_malformed() -> None:
    def header(op: Op, length: int, plen: int) -> bytes:
        return (
            wire.REQUEST.pack(
                wire.REQUEST_MAGIC, op, wire.FLAG_CRCS, 2, 0, 1, 0, length, 0, 0, plen
            )
            + b"e1"
        )

    for op, length, plen in [
        (Op.WRITE, 4096, 4096),  # no room for the checksum
        (Op.WRITE, 4096, 4104),  # one checksum too many
        (Op.WRITE, 1000, 1004),  # not a whole sector
        (Op.REPAIR, 4096, 4100),  # only a WRITE carries them
        (Op.READ, 4096, 0),
    ]:
        with pytest.raises(ChunkProtocolError):
            wire.RequestDecoder().feed(header(op, length, plen) + bytes(plen))
    sums = wire.pack_crcs(array("I", [1]))
    for op, data in [(Op.WRITE, bytes(4000)), (Op.WRITE, bytes(8192)), (Op.REPAIR, bytes(4096))]:
        with pytest.raises(ChunkInvalid):
            wire.encode_request(op, 1, "e1", 0, len(data), 0, 0, 0, data, sums)
    with pytest.raises(ChunkInvalid):  # a length that is not the data's
        wire.encode_request(Op.WRITE, 1, "e1", 0, 8192, 0, 0, 0, bytes(4096), sums)
    with pytest.raises(ChunkInvalid):  # the flag without the checksums
        wire.encode_request(Op.WRITE, 1, "e1", 0, 4096, 0, 0, wire.FLAG_CRCS, bytes(4096))


def test_a_large_write_is_gathered_once_and_the_next_frame_follows() -> None:
    payload = bytes(range(256)) * 4096  # 1 MiB
    big = Request(Op.WRITE, 7, "e1", 0, len(payload), 3, 4, 0, payload)
    small = Request(Op.PING, 8)
    data = frame(big.encode()) + frame(small.encode())
    decoder = wire.RequestDecoder()
    out: list[object] = []
    for pos in range(0, len(data), 65536):  # as a socket delivers it
        out += decoder.feed(data[pos : pos + 65536])
        if pos and pos + 65536 < len(data) - 1000:
            assert decoder._payload is not None and not decoder._buf  # in its own buffer
    assert out == [big, small]


@given(st.binary(max_size=2000), st.lists(st.integers(0, 2000), max_size=6))
def test_arbitrary_bytes_never_raise_anything_but_a_protocol_error(
    data: bytes, cuts: list[int]
) -> None:
    for decoder in (wire.RequestDecoder(), wire.ResponseDecoder()):
        with contextlib.suppress(ChunkProtocolError):
            feed_in_chunks(decoder, data, [c for c in cuts if c <= len(data)])


@given(
    st.binary(min_size=0, max_size=200), st.sampled_from([wire.REQUEST_MAGIC, wire.RESPONSE_MAGIC])
)
def test_a_valid_magic_followed_by_garbage_is_handled(tail: bytes, magic: int) -> None:
    data = struct.pack("!I", magic) + tail
    for decoder in (wire.RequestDecoder(), wire.ResponseDecoder()):
        try:
            decoder.feed(data)
        except ChunkProtocolError:
            with pytest.raises(ChunkProtocolError):
                decoder.feed(b"")


def test_malformed_frames_are_protocol_errors() -> None:
    good = frame(Request(Op.READ, 1, "e1", 0, 4096).encode())
    cases = {
        "magic": b"XXXX" + good[4:],
        "op": good[:4] + bytes([99]) + good[5:],
        "flags": good[:5] + bytes([0x80]) + good[6:],
        "id_len": good[:6] + bytes([65]) + good[7:],
        "reserved": good[:7] + bytes([1]) + good[8:],
        "payload on READ": good[:-6] + struct.pack("!I", 1) + b"e1" + b"x",
        "oversized": frame(Request(Op.WRITE, 1, "e1").encode())[:-6]
        + struct.pack("!I", wire.MAX_PAYLOAD + 1)
        + b"e1",
    }
    for name, data in cases.items():
        with pytest.raises(ChunkProtocolError):
            wire.RequestDecoder().feed(data)
            pytest.fail(f"{name} was accepted")


def test_a_write_whose_length_differs_from_its_payload_is_malformed() -> None:
    data = frame(wire.encode_request(Op.WRITE, 1, "e1", 0, 5, 0, 0, 0, b"abcd"))
    with pytest.raises(ChunkProtocolError):
        wire.RequestDecoder().feed(data)


def test_a_broken_decoder_stays_broken() -> None:
    decoder = wire.ResponseDecoder()
    with pytest.raises(ChunkProtocolError):
        decoder.feed(b"\0" * 64)
    with pytest.raises(ChunkProtocolError):
        decoder.feed(frame(Response(Op.PING, Status.OK, 1).encode()))


def test_request_fields_out_of_range_are_refused_before_sending() -> None:
    with pytest.raises(ChunkInvalid):
        wire.encode_request(Op.READ, 1, "e1", -1, 10)
    with pytest.raises(ChunkInvalid):
        wire.encode_request(Op.READ, 1, "x" * 65)
    with pytest.raises(ChunkInvalid):
        wire.encode_request(Op.READ, 1, "é")


@given(st.builds(ReplicaStat, u64, u64, u64, u64, u64))
def test_stat_round_trips(stat: ReplicaStat) -> None:
    assert wire.decode_stat(wire.encode_stat(stat)) == stat


@given(st.lists(st.text(ID_CHARS, min_size=1, max_size=64), max_size=20))
def test_id_lists_round_trip(ids: list[str]) -> None:
    assert wire.decode_ids(wire.encode_ids(ids)) == ids


@given(st.lists(st.tuples(u64, u64), max_size=20))
def test_ranges_round_trip(ranges: list[tuple[int, int]]) -> None:
    assert wire.decode_ranges(wire.encode_ranges(ranges)) == ranges


@given(st.lists(st.tuples(u64, u64, st.booleans()), max_size=20))
def test_runs_round_trip(runs: list[tuple[int, int, bool]]) -> None:
    assert wire.decode_runs(wire.encode_runs(runs)) == runs


@given(st.lists(u64, max_size=20))
def test_sector_lists_round_trip(sectors: list[int]) -> None:
    assert wire.decode_sectors(wire.encode_sectors(sectors)) == sectors


@st.composite
def raw_blocks(draw: st.DrawFn) -> RawBlocks:
    n = draw(st.integers(0, 4))
    bitmaps = tuple(draw(st.lists(st.integers(0, 2**64 - 1), min_size=n, max_size=n)))
    modgens = tuple(draw(st.lists(u64, min_size=n, max_size=n)))
    return RawBlocks(draw(u64), 256 * 1024, 4096, bitmaps, modgens, draw(st.binary(max_size=64)))


@given(raw_blocks())
def test_raw_blocks_round_trip(raw: RawBlocks) -> None:
    assert wire.decode_raw(wire.encode_raw(raw)) == raw


@given(st.binary(max_size=100))
def test_payload_decoders_raise_only_protocol_errors(data: bytes) -> None:
    decoders = [
        wire.decode_stat,
        wire.decode_ids,
        wire.decode_u64,
        wire.decode_ranges,
        wire.decode_runs,
        wire.decode_sectors,
        wire.decode_raw,
        lambda p: wire.decode_error(Status.CHECKSUM, p, "e1", 0),
    ]
    for decode in decoders:
        with contextlib.suppress(ChunkProtocolError):
            decode(data)


@pytest.mark.parametrize(
    "error",
    [
        StaleEpoch("e1", 3, 7),
        ChecksumError("e1", [5, 9]),
        ExtentNotFound("e1"),
        ExtentExists("e1", "exists with size 4"),
        ChunkInvalid("bad range"),
        ChunkIOError("disk full", 28),
        ChunkError("something else"),
    ],
)
def test_errors_cross_the_wire_with_their_class_and_fields(error: ChunkError) -> None:
    status, payload = wire.encode_error(error)
    again = wire.decode_error(status, payload, "e1", 3)
    assert type(again) is type(error)
    assert again.fields == error.fields


def test_a_write_whose_id_arrives_late_is_still_gathered_into_its_own_buffer() -> None:
    """A read may end inside the extent id of a large WRITE: once the id is whole, the rest
    of the payload still goes to its own buffer (not through the small-frame buffer)."""
    payload = bytes(range(256)) * 4096  # 1 MiB
    data = frame(Request(Op.WRITE, 1, "extent-0001", 0, len(payload), 0, 0, 0, payload).encode())
    intake = Intake(staging=4096)
    decoder = wire.RequestDecoder(intake=intake)
    assert decoder.feed(data[: wire.REQUEST.size + 3]) == []  # the id cut after 3 bytes
    assert decoder.feed(data[wire.REQUEST.size + 3 : 4096]) == []
    assert decoder._payload is not None and intake.reserved == len(payload)
    (request,) = receive(decoder, data[4096:], [])
    assert request.payload == payload and intake.reserved == 0


def test_a_payload_past_the_budget_is_gathered_as_it_arrives_and_abandon_releases() -> None:
    payload = bytes(range(256)) * 1024  # 256 KiB
    data = frame(Request(Op.WRITE, 1, "e1", 0, len(payload), 0, 0, 0, payload).encode())
    small = wire.RequestDecoder(intake=Intake(staging=4096, budget=len(payload) - 1))
    assert small.feed(data[:1000]) == [] and small._payload is None
    assert small.feed(data[1000:]) == [
        Request(Op.WRITE, 1, "e1", 0, len(payload), 0, 0, 0, payload)
    ]
    intake = Intake(staging=4096)
    decoder = wire.RequestDecoder(intake=intake)
    assert decoder.feed(data[:1000]) == [] and intake.reserved == len(payload)
    decoder.abandon()  # the connection is gone
    assert intake.reserved == 0
