"""The NBD codec and session, driven with byte strings (no sockets)."""

from __future__ import annotations

import contextlib
import errno
import struct
from collections.abc import Coroutine
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from aecp.common.errors import InvalidState
from aecp.common.receive import Intake, Receiver
from aecp.storage.blockdev import Allocation, BlockDevice, BlockError, Span, check_range
from aecp.storage.frontends.nbd import protocol as p
from aecp.storage.frontends.nbd.session import NbdSession, State
from tests.receivekit import fail_first_reservation

SIZE = 1 << 20
CLIENT_FLAGS = struct.pack(">I", p.ClientFlag.FIXED_NEWSTYLE | p.ClientFlag.NO_ZEROES)


class MemoryDevice(BlockDevice):
    """A bytearray device that records what it was asked to do."""

    def __init__(self, size: int = SIZE, read_only: bool = False) -> None:
        self.size = size
        self.read_only = read_only
        self.data = bytearray(size)
        self.calls: list[tuple[Any, ...]] = []
        self.closed = False
        self.fail: BaseException | None = None

    def _do(self, *call: Any) -> None:
        self.calls.append(call)
        if self.fail is not None:
            raise self.fail
        if len(call) > 2:
            check_range(self, call[1], call[2])

    async def read(self, offset: int, length: int) -> bytes:
        self._do("read", offset, length)
        return bytes(self.data[offset : offset + length])

    async def write(self, offset: int, data: bytes | bytearray, fua: bool = False) -> None:
        self._do("write", offset, len(data), fua)
        self.data[offset : offset + len(data)] = data

    async def flush(self) -> None:
        self._do("flush")

    async def trim(self, offset: int, length: int) -> None:
        self._do("trim", offset, length)

    async def write_zeroes(
        self, offset: int, length: int, fua: bool = False, may_trim: bool = True
    ) -> None:
        self._do("write_zeroes", offset, length, fua, may_trim)
        self.data[offset : offset + length] = bytes(length)

    async def block_status(self, offset: int, length: int) -> list[Span]:
        self._do("block_status", offset, length)
        half = length // 2
        return [Span(half, Allocation.DATA), Span(length - half, Allocation.HOLE | Allocation.ZERO)]

    async def close(self) -> None:
        self.closed = True


def run(coro: Coroutine[Any, Any, Any]) -> Any:
    """Run a coroutine that never suspends (the memory device never waits)."""
    try:
        coro.send(None)
    except StopIteration as stop:
        return stop.value
    raise AssertionError("coroutine suspended")


class Harness:
    """Feeds client bytes to a session the way the server does; collects what it answers."""

    def __init__(
        self,
        device: MemoryDevice | None = None,
        exports: tuple[str, ...] = ("disk",),
        *,
        local: bool = True,
        tls_offered: bool = True,
    ):
        self.device = device or MemoryDevice()
        self.opened: list[MemoryDevice] = []
        self.exports = exports

        async def open_export(name: str) -> BlockDevice:
            if name not in self.exports:
                raise KeyError(name)
            self.opened.append(self.device)
            return self.device

        async def list_exports() -> list[str]:
            return list(self.exports)

        self.session = NbdSession(
            open_export, list_exports, peer="test", local=local, tls_offered=tls_offered
        )
        self.out = bytearray(self.session.greeting())

    def send(self, data: bytes) -> None:
        parser = self.session.parser
        parser.feed(data)
        while (ev := parser.next_event()) is not None:
            if isinstance(ev, p.ClientFlags):
                self.session.client_flags(ev)
            elif isinstance(ev, p.OptionRequest):
                self.out += run(self.session.option(ev))
            elif ev.command == p.Cmd.DISC:
                return
            else:
                reply = run(self.session.execute(ev))
                self.out += reply if isinstance(reply, bytes) else b"".join(reply)

    def take(self, n: int) -> bytes:
        assert len(self.out) >= n, f"wanted {n} bytes, have {len(self.out)}"
        chunk = bytes(self.out[:n])
        del self.out[:n]
        return chunk

    def option_reply(self) -> tuple[int, int, bytes]:
        magic, opt, rep, length = struct.unpack(">QIII", self.take(20))
        assert magic == p.OPT_REPLY_MAGIC
        return opt, rep, self.take(length)

    def simple_reply(self) -> tuple[int, int]:
        magic, err, cookie = struct.unpack(">IIQ", self.take(16))
        assert magic == p.SIMPLE_REPLY_MAGIC
        return err, cookie

    def chunk(self) -> tuple[int, int, int, bytes]:
        magic, flags, typ, cookie, length = struct.unpack(">IHHQI", self.take(20))
        assert magic == p.STRUCTURED_REPLY_MAGIC
        return flags, typ, cookie, self.take(length)

    def handshake(self) -> None:
        assert self.take(18) == struct.pack(">QQH", p.NBDMAGIC, p.IHAVEOPT, 3)
        self.send(CLIENT_FLAGS)

    def go(self, name: str = "disk", structured: bool = False, meta: bool = False) -> None:
        self.handshake()
        if structured:
            self.send(p.encode_option(p.Opt.STRUCTURED_REPLY))
            assert self.option_reply()[1] == p.Rep.ACK
        if meta:
            self.send(p.encode_option(p.Opt.SET_META_CONTEXT, meta_data(name, [p.BASE_ALLOCATION])))
            assert self.option_reply()[1] == p.Rep.META_CONTEXT
            assert self.option_reply()[1] == p.Rep.ACK
        self.send(p.encode_option(p.Opt.GO, go_data(name)))
        while self.option_reply()[1] != p.Rep.ACK:
            pass
        assert self.session.state is State.TRANSMISSION


def go_data(name: str, infos: tuple[int, ...] = ()) -> bytes:
    raw = name.encode()
    return struct.pack(">I", len(raw)) + raw + struct.pack(f">H{len(infos)}H", len(infos), *infos)


def meta_data(name: str, queries: list[str]) -> bytes:
    raw = name.encode()
    out = struct.pack(">I", len(raw)) + raw + struct.pack(">I", len(queries))
    for q in queries:
        out += struct.pack(">I", len(q.encode())) + q.encode()
    return out


# --- handshake and options ----------------------------------------------------------------


def test_a_full_handshake_with_opt_go_reports_size_flags_and_block_sizes() -> None:
    h = Harness()
    h.handshake()
    h.send(p.encode_option(p.Opt.GO, go_data("disk", (p.Info.BLOCK_SIZE, p.Info.NAME))))
    infos = {}
    while True:
        opt, rep, data = h.option_reply()
        assert opt == p.Opt.GO
        if rep == p.Rep.ACK:
            break
        assert rep == p.Rep.INFO
        infos[struct.unpack(">H", data[:2])[0]] = data[2:]
    size, flags = struct.unpack(">QH", infos[p.Info.EXPORT])
    assert size == SIZE
    f = p.TransmissionFlag
    assert flags == f.HAS_FLAGS | f.SEND_FLUSH | f.SEND_FUA | f.SEND_TRIM | f.SEND_WRITE_ZEROES | (
        f.CAN_MULTI_CONN
    )
    assert struct.unpack(">III", infos[p.Info.BLOCK_SIZE]) == (1, 4096, 32 << 20)
    assert infos[p.Info.NAME] == b"disk"
    assert h.session.state is State.TRANSMISSION and h.session.export_name == "disk"
    assert not h.out


def test_a_read_only_device_is_advertised_read_only_without_trim_or_zeroes() -> None:
    h = Harness(MemoryDevice(read_only=True))
    h.handshake()
    h.send(p.encode_option(p.Opt.INFO, go_data("disk")))
    _, _, data = h.option_reply()
    flags = struct.unpack(">HQH", data)[2]
    assert flags & p.TransmissionFlag.READ_ONLY
    assert not flags & (p.TransmissionFlag.SEND_TRIM | p.TransmissionFlag.SEND_WRITE_ZEROES)


def test_opt_info_answers_without_entering_transmission_and_closes_the_device() -> None:
    h = Harness()
    h.handshake()
    h.send(p.encode_option(p.Opt.INFO, go_data("disk")))
    reps = [h.option_reply()[1] for _ in range(3)]
    assert reps == [p.Rep.INFO, p.Rep.INFO, p.Rep.ACK]
    assert h.session.state is State.OPTIONS and h.device.closed


def test_opt_list_names_every_export_then_acks() -> None:
    h = Harness(exports=("disk", "other"))
    h.handshake()
    h.send(p.encode_option(p.Opt.LIST))
    names = []
    while (r := h.option_reply())[1] == p.Rep.SERVER:
        (n,) = struct.unpack(">I", r[2][:4])
        names.append(r[2][4 : 4 + n].decode())
    assert names == ["disk", "other"] and r[1] == p.Rep.ACK


def test_opt_list_with_data_is_invalid() -> None:
    h = Harness()
    h.handshake()
    h.send(p.encode_option(p.Opt.LIST, b"x"))
    assert h.option_reply()[1] == p.Rep.ERR_INVALID


def test_an_unknown_export_is_refused_with_err_unknown_naming_it() -> None:
    h = Harness()
    h.handshake()
    h.send(p.encode_option(p.Opt.GO, go_data("nope")))
    opt, rep, msg = h.option_reply()
    assert (opt, rep) == (p.Opt.GO, p.Rep.ERR_UNKNOWN) and b"nope" in msg
    assert h.session.state is State.OPTIONS  # the client may try another name
    h.send(p.encode_option(p.Opt.GO, go_data("disk")))
    assert h.option_reply()[1] == p.Rep.INFO


def test_export_name_of_an_unknown_export_drops_the_connection() -> None:
    h = Harness()
    h.handshake()
    with pytest.raises(p.ProtocolError, match="nope"):
        h.send(p.encode_option(p.Opt.EXPORT_NAME, b"nope"))


@pytest.mark.parametrize("no_zeroes", [True, False])
def test_export_name_answers_size_and_flags_padded_unless_no_zeroes(no_zeroes: bool) -> None:
    h = Harness()
    h.take(18)
    h.send(struct.pack(">I", 1 | (2 if no_zeroes else 0)))
    h.send(p.encode_option(p.Opt.EXPORT_NAME, b"disk"))
    assert struct.unpack(">Q", h.take(8))[0] == SIZE
    h.take(2)
    assert len(h.out) == (0 if no_zeroes else 124)
    assert h.session.state is State.TRANSMISSION


@pytest.mark.parametrize("option", [4, 11, 0x7FFF])
def test_an_unknown_option_gets_err_unsup_and_parsing_goes_on(option: int) -> None:
    h = Harness()
    h.handshake()
    h.send(p.encode_option(option, b"ignored data") + p.encode_option(p.Opt.LIST))
    assert h.option_reply()[:2] == (option, p.Rep.ERR_UNSUP)
    assert h.option_reply()[1] == p.Rep.SERVER


def test_an_oversized_option_is_skipped_and_answered_too_big() -> None:
    h = Harness()
    h.handshake()
    big = p.encode_option(p.Opt.LIST, bytes(p.MAX_OPTION_DATA + 1))
    for i in range(0, len(big), 1000):  # arrives in pieces
        h.send(big[i : i + 1000])
    h.send(p.encode_option(p.Opt.LIST))
    assert h.option_reply()[1] == p.Rep.ERR_TOO_BIG
    assert h.option_reply()[1] == p.Rep.SERVER


def test_structured_replies_then_base_allocation_is_selected_with_an_id() -> None:
    h = Harness()
    h.handshake()
    query = meta_data("disk", [p.BASE_ALLOCATION, "qemu:allocation-depth"])
    h.send(p.encode_option(p.Opt.SET_META_CONTEXT, query))
    assert h.option_reply()[1] == p.Rep.ERR_INVALID  # structured replies come first
    h.send(p.encode_option(p.Opt.STRUCTURED_REPLY))
    assert h.option_reply()[1] == p.Rep.ACK
    h.send(p.encode_option(p.Opt.SET_META_CONTEXT, query))
    _, rep, data = h.option_reply()
    assert rep == p.Rep.META_CONTEXT
    assert struct.unpack(">I", data[:4])[0] == p.BASE_ALLOCATION_ID
    assert data[4:] == b"base:allocation"
    assert h.option_reply()[1] == p.Rep.ACK  # the unknown namespace is ignored


@pytest.mark.parametrize("queries", [[], ["base:"], ["base:allocation"]])
def test_list_meta_context_offers_base_allocation(queries: list[str]) -> None:
    h = Harness()
    h.handshake()
    h.send(p.encode_option(p.Opt.STRUCTURED_REPLY))
    h.option_reply()
    h.send(p.encode_option(p.Opt.LIST_META_CONTEXT, meta_data("disk", queries)))
    _, rep, data = h.option_reply()
    assert rep == p.Rep.META_CONTEXT and data[4:] == b"base:allocation"
    assert h.option_reply()[1] == p.Rep.ACK


def test_malformed_meta_context_data_is_invalid() -> None:
    h = Harness()
    h.handshake()
    h.send(p.encode_option(p.Opt.STRUCTURED_REPLY))
    h.option_reply()
    h.send(p.encode_option(p.Opt.SET_META_CONTEXT, meta_data("disk", ["base:allocation"])[:-3]))
    assert h.option_reply()[1] == p.Rep.ERR_INVALID


def test_abort_is_acknowledged_and_ends_the_session() -> None:
    h = Harness()
    h.handshake()
    h.send(p.encode_option(p.Opt.ABORT))
    assert h.option_reply()[:2] == (p.Opt.ABORT, p.Rep.ACK)
    assert h.session.state is State.CLOSED


def test_unknown_client_flags_close_the_connection() -> None:
    h = Harness()
    with pytest.raises(p.ProtocolError, match="client flags"):
        h.send(struct.pack(">I", 1 | 4))


def test_a_bad_option_magic_is_a_protocol_error() -> None:
    h = Harness()
    h.handshake()
    with pytest.raises(p.ProtocolError, match="magic"):
        h.send(b"NOTMAGIC" + bytes(8))


# --- transmission -------------------------------------------------------------------------


def test_read_gets_a_simple_reply_with_data_without_structured_replies() -> None:
    h = Harness()
    h.device.data[100:104] = b"abcd"
    h.go()
    h.send(p.encode_request(p.Cmd.READ, cookie=7, offset=100, length=4))
    assert h.simple_reply() == (0, 7) and h.take(4) == b"abcd"


def test_read_gets_one_final_offset_data_chunk_with_structured_replies() -> None:
    h = Harness()
    h.device.data[100:104] = b"abcd"
    h.go(structured=True)
    h.send(p.encode_request(p.Cmd.READ, cookie=7, offset=100, length=4, flags=p.CmdFlag.DF))
    flags, typ, cookie, payload = h.chunk()
    assert (flags, typ, cookie) == (p.REPLY_FLAG_DONE, p.ReplyType.OFFSET_DATA, 7)
    assert payload == struct.pack(">Q", 100) + b"abcd"


@pytest.mark.parametrize("fua", [False, True])
def test_write_lands_at_its_offset_and_passes_fua(fua: bool) -> None:
    h = Harness()
    h.go()
    flags = p.CmdFlag.FUA if fua else 0
    h.send(p.encode_request(p.Cmd.WRITE, 9, 4096, 3, flags, b"xyz"))
    assert h.simple_reply() == (0, 9)
    assert h.device.data[4096:4099] == b"xyz" and h.device.calls[-1] == ("write", 4096, 3, fua)


def test_flush_trim_and_write_zeroes_reach_the_device() -> None:
    h = Harness()
    h.go()
    h.send(p.encode_request(p.Cmd.FLUSH, 1))
    h.send(p.encode_request(p.Cmd.TRIM, 2, 0, 512))
    h.send(p.encode_request(p.Cmd.WRITE_ZEROES, 3, 512, 512, p.CmdFlag.NO_HOLE | p.CmdFlag.FUA))
    h.send(p.encode_request(p.Cmd.WRITE_ZEROES, 4, 1024, 512))
    assert [h.simple_reply() for _ in range(4)] == [(0, 1), (0, 2), (0, 3), (0, 4)]
    assert h.device.calls == [
        ("flush",),
        ("trim", 0, 512),
        ("write_zeroes", 512, 512, True, False),
        ("write_zeroes", 1024, 512, False, True),
    ]


def test_block_status_answers_base_allocation_extents() -> None:
    h = Harness()
    h.go(structured=True, meta=True)
    h.send(p.encode_request(p.Cmd.BLOCK_STATUS, 5, 0, 8192))
    flags, typ, cookie, payload = h.chunk()
    assert (flags, typ, cookie) == (p.REPLY_FLAG_DONE, p.ReplyType.BLOCK_STATUS, 5)
    assert struct.unpack(">IIIII", payload) == (p.BASE_ALLOCATION_ID, 4096, 0, 4096, 3)
    h.send(p.encode_request(p.Cmd.BLOCK_STATUS, 6, 0, 8192, p.CmdFlag.REQ_ONE))
    assert struct.unpack(">III", h.chunk()[3]) == (p.BASE_ALLOCATION_ID, 4096, 0)


def test_block_status_without_a_negotiated_context_is_einval() -> None:
    h = Harness()
    h.go(structured=True)
    h.send(p.encode_request(p.Cmd.BLOCK_STATUS, 5, 0, 8192))
    _, typ, _, payload = h.chunk()
    assert typ == p.ReplyType.ERROR and struct.unpack(">I", payload[:4])[0] == errno.EINVAL
    assert h.device.calls == []


@pytest.mark.parametrize(
    ("cmd", "flags", "offset", "length", "err"),
    [
        (p.Cmd.CACHE, 0, 0, 512, errno.EINVAL),
        (99, 0, 0, 512, errno.EINVAL),
        (p.Cmd.READ, 1 << 9, 0, 512, errno.EINVAL),  # unknown flag
        (p.Cmd.READ, p.CmdFlag.DF, 0, 512, errno.EINVAL),  # DF needs structured replies
        (p.Cmd.READ, 0, SIZE - 1, 2, errno.EINVAL),
        (p.Cmd.READ, 0, 0, p.MAX_PAYLOAD + 1, errno.EINVAL),
        (p.Cmd.TRIM, 0, SIZE, 1, errno.EINVAL),
        (p.Cmd.WRITE_ZEROES, 0, 2**64 - 1, 1, errno.ENOSPC),
    ],
)
def test_invalid_requests_get_an_error_and_never_reach_the_device(
    cmd: int, flags: int, offset: int, length: int, err: int
) -> None:
    h = Harness()
    h.go()
    h.send(p.encode_request(cmd, 11, offset, length, flags))
    assert h.simple_reply() == (err, 11) and h.device.calls == []


@pytest.mark.parametrize(
    ("offset", "length", "err"),
    [(SIZE - 2, 4, errno.ENOSPC), (0, p.MAX_PAYLOAD + 1, errno.EINVAL)],
)
def test_a_refused_write_skips_its_payload_and_the_stream_stays_in_sync(
    offset: int, length: int, err: int
) -> None:
    h = Harness()
    h.go()
    stream = p.encode_request(p.Cmd.WRITE, 1, offset, length, payload=b"\xee" * length)
    stream += p.encode_request(p.Cmd.WRITE, 2, 0, 2, payload=b"ok")
    for i in range(0, len(stream), 1 << 20):
        h.send(stream[i : i + (1 << 20)])
    assert h.simple_reply() == (err, 1) and h.simple_reply() == (0, 2)
    assert h.device.calls == [("write", 0, 2, False)] and bytes(h.device.data[:2]) == b"ok"


def test_writes_to_a_read_only_export_are_eperm() -> None:
    h = Harness(MemoryDevice(read_only=True))
    h.go()
    h.send(p.encode_request(p.Cmd.WRITE, 1, 0, 2, payload=b"no"))
    h.send(p.encode_request(p.Cmd.TRIM, 2, 0, 2))
    assert [h.simple_reply() for _ in range(2)] == [(errno.EPERM, 1), (errno.EPERM, 2)]
    assert h.device.calls == []


def test_device_errors_become_structured_error_chunks_with_their_errno() -> None:
    h = Harness()
    h.go(structured=True)
    h.device.fail = BlockError("disk on fire")
    h.send(p.encode_request(p.Cmd.READ, 3, 0, 512))
    _, typ, cookie, payload = h.chunk()
    err, n = struct.unpack(">IH", payload[:6])
    assert (typ, cookie, err, payload[6 : 6 + n]) == (
        p.ReplyType.ERROR, 3, errno.EIO, b"disk on fire",
    )  # fmt: skip


def test_an_unexpected_device_exception_is_answered_eio() -> None:
    h = Harness()
    h.go()
    h.device.fail = RuntimeError("bug")
    h.send(p.encode_request(p.Cmd.FLUSH, 3))
    assert h.simple_reply() == (errno.EIO, 3)


def test_a_bad_request_magic_is_a_protocol_error() -> None:
    h = Harness()
    h.go()
    with pytest.raises(p.ProtocolError, match="magic"):
        h.send(b"\x00" * 28)


def test_a_header_cut_off_by_eof_is_a_protocol_error() -> None:
    h = Harness()
    h.go()
    h.send(p.encode_request(p.Cmd.READ, 1, 0, 512)[:20])
    assert h.session.parser.buffered == 20
    with pytest.raises(p.ProtocolError, match="middle of a message"):
        h.session.parser.eof()


def test_a_write_payload_cut_off_by_eof_is_never_applied() -> None:
    h = Harness()
    h.go()
    h.send(p.encode_request(p.Cmd.WRITE, 1, 0, 512, payload=bytes(100)))
    with pytest.raises(p.ProtocolError):
        h.session.parser.eof()
    assert h.device.calls == []


def test_a_large_write_arriving_in_pieces_lands_whole_and_a_cut_one_never() -> None:
    h = Harness()
    h.go()
    payload = bytes(range(256)) * 800  # 200 KiB: collected in pieces, joined once
    stream = p.encode_request(p.Cmd.WRITE, 1, 4096, len(payload), payload=payload)
    stream += p.encode_request(p.Cmd.FLUSH, 2)
    for i in range(0, len(stream), 7000):
        h.send(stream[i : i + 7000])
    assert [h.simple_reply() for _ in range(2)] == [(0, 1), (0, 2)]
    assert bytes(h.device.data[4096 : 4096 + len(payload)]) == payload
    h.send(p.encode_request(p.Cmd.WRITE, 3, 0, len(payload), payload=payload[:-1]))
    with pytest.raises(p.ProtocolError, match="1 bytes missing"):
        h.session.parser.eof()
    assert len(h.device.calls) == 2


def test_disc_ends_parsing_and_a_clean_eof_is_fine() -> None:
    parser = p.ServerParser()
    parser.enter_transmission(p.ExportParams(size=SIZE))
    parser.feed(p.encode_request(p.Cmd.DISC, 1) + b"junk after disc")
    ev = parser.next_event()
    assert isinstance(ev, p.Request) and ev.command == p.Cmd.DISC
    assert parser.next_event() is None
    parser.eof()


def test_block_status_needs_the_context_chosen_for_the_same_export() -> None:
    h = Harness(exports=("disk", "other"))
    h.handshake()
    h.send(p.encode_option(p.Opt.STRUCTURED_REPLY))
    h.option_reply()
    h.send(p.encode_option(p.Opt.SET_META_CONTEXT, meta_data("other", [p.BASE_ALLOCATION])))
    assert [h.option_reply()[1] for _ in range(2)] == [p.Rep.META_CONTEXT, p.Rep.ACK]
    h.send(p.encode_option(p.Opt.GO, go_data("disk")))
    while h.option_reply()[1] != p.Rep.ACK:
        pass
    h.send(p.encode_request(p.Cmd.BLOCK_STATUS, 1, 0, 512))
    assert h.chunk()[1] == p.ReplyType.ERROR and h.device.calls == []


def test_session_methods_refuse_the_wrong_state_and_close_releases_the_device() -> None:
    h = Harness()
    with pytest.raises(InvalidState, match="execute needs state transmission"):
        h.session.execute(p.Request(0, 0, 1, 0, 1, None, 0))
    h.go()
    with pytest.raises(InvalidState):
        h.session.greeting()
    run(h.session.close())
    assert h.session.state is State.CLOSED and h.device.closed


def test_reply_encoders_follow_the_wire_layout() -> None:
    assert p.simple_reply(5, 22) == struct.pack(">IIQ", p.SIMPLE_REPLY_MAGIC, 22, 5)
    assert p.chunk_hole(5, 4096, 512) == struct.pack(
        ">IHHQIQI", p.STRUCTURED_REPLY_MAGIC, 1, 2, 5, 12, 4096, 512
    )
    assert p.chunk_done(5) == struct.pack(">IHHQI", p.STRUCTURED_REPLY_MAGIC, 1, 0, 5, 0)
    assert (
        p.chunk_error(5, 5, "x", done=False)
        == struct.pack(">IHHQIIH", p.STRUCTURED_REPLY_MAGIC, 0, 0x8001, 5, 7, 5, 1) + b"x"
    )
    assert p.chunk_data_header(5, 8, 3) == struct.pack(
        ">IHHQIQ", p.STRUCTURED_REPLY_MAGIC, 1, 1, 5, 11, 8
    )


# --- properties ---------------------------------------------------------------------------

export_params = st.builds(
    p.ExportParams,
    size=st.sampled_from([0, 512, 4096, SIZE]),
    read_only=st.booleans(),
    structured=st.booleans(),
    block_status=st.booleans(),
    max_payload=st.sampled_from([16, 4096, p.MAX_PAYLOAD]),
)
splits = st.lists(st.integers(min_value=1, max_value=64), min_size=1, max_size=40)


def feed_in_pieces(
    parser: p.ServerParser, data: bytes, sizes: list[int], receiver: Receiver | None = None
) -> list[Any]:
    """Events of ``data`` fed in pieces of ``sizes`` (cycled); with ``receiver``, read as the
    server's ``BufferedProtocol`` does: each piece is at most what the buffer offered holds
    (staging, or straight into a large WRITE's own payload buffer)."""
    events, pos, i = [], 0, 0
    while pos < len(data):
        n = sizes[i % len(sizes)]
        if receiver is None:
            parser.feed(data[pos : pos + n])
        else:
            buf = receiver.get(parser)
            n = min(n, len(buf), len(data) - pos)
            buf[:n] = data[pos : pos + n]
            receiver.updated(parser, n)
        pos, i = pos + n, i + 1
        while (ev := parser.next_event()) is not None:
            events.append(ev)
    return events


def receiver_or_none(direct: bool) -> Receiver | None:
    return Receiver(Intake(staging=48), header=16) if direct else None


@settings(max_examples=300)
@given(
    export=export_params,
    data=st.binary(max_size=600),
    sizes=splits,
    small=st.booleans(),
    direct=st.booleans(),
)
def test_arbitrary_bytes_in_transmission_never_yield_a_write_outside_the_device(
    export: p.ExportParams, data: bytes, sizes: list[int], small: bool, direct: bool
) -> None:
    parser = p.ServerParser()
    parser.collect_min = 8 if small else parser.collect_min
    parser.enter_transmission(export)
    try:
        events = feed_in_pieces(parser, data, sizes, receiver_or_none(direct))
    except p.ProtocolError:
        return
    for ev in events:
        assert isinstance(ev, p.Request)
        if ev.command == p.Cmd.WRITE and not ev.error:
            assert ev.payload is not None and len(ev.payload) == ev.length
            assert ev.offset + ev.length <= export.size and not export.read_only


request_magic_prefix = st.builds(
    lambda rest: struct.pack(">I", p.REQUEST_MAGIC) + rest, st.binary(min_size=24, max_size=40)
)


@settings(max_examples=300)
@given(chunks=st.lists(request_magic_prefix | st.binary(max_size=40), max_size=12), sizes=splits)
def test_arbitrary_requests_through_a_session_only_touch_the_device_in_range(
    chunks: list[bytes], sizes: list[int]
) -> None:
    h = Harness(MemoryDevice(size=4096))
    h.go(structured=True, meta=True)
    try:
        data = b"".join(chunks)
        for i in range(0, len(data), sizes[0]):
            h.send(data[i : i + sizes[0]])
    except p.ProtocolError:
        pass
    for call in h.device.calls:
        if len(call) > 2:
            assert call[1] >= 0 and call[1] + call[2] <= 4096


@settings(max_examples=300)
@given(data=st.binary(max_size=300), sizes=splits)
def test_arbitrary_bytes_in_negotiation_raise_only_protocol_errors(
    data: bytes, sizes: list[int]
) -> None:
    parser = p.ServerParser()
    try:
        for ev in feed_in_pieces(parser, CLIENT_FLAGS + data, sizes):
            if isinstance(ev, p.OptionRequest):
                for decode in (p.parse_info_request, p.parse_meta_context_request):
                    with contextlib.suppress(p.OptionError):
                        decode(ev.data)
    except p.ProtocolError:
        pass


requests = st.lists(
    st.tuples(
        st.sampled_from([p.Cmd.READ, p.Cmd.WRITE, p.Cmd.FLUSH, p.Cmd.TRIM, p.Cmd.WRITE_ZEROES]),
        st.integers(0, 2**64 - 1),
        st.integers(0, 3000),
        st.integers(0, 1000),
    ),
    max_size=10,
)


@settings(max_examples=300)
@given(
    reqs=requests,
    sizes=splits,
    collect_min=st.sampled_from([1, 100, 64 * 1024]),
    direct=st.booleans(),
)
def test_a_valid_request_stream_split_anywhere_parses_to_the_same_requests(
    reqs: list[tuple[int, int, int, int]], sizes: list[int], collect_min: int, direct: bool
) -> None:
    expected, stream = [], b""
    for cmd, cookie, offset, length in reqs:
        payload = bytes([cookie % 256]) * length if cmd == p.Cmd.WRITE else None
        expected.append(p.Request(0, cmd, cookie, offset, length, payload, 0))
        stream += p.encode_request(cmd, cookie, offset, length, payload=payload or b"")
    parser = p.ServerParser()
    parser.collect_min = collect_min  # large payloads are gathered in pieces, small ones buffered
    parser.enter_transmission(p.ExportParams(size=4096))
    assert feed_in_pieces(parser, stream, sizes, receiver_or_none(direct)) == expected
    parser.eof()


@settings(max_examples=200)
@given(data=st.binary(max_size=200))
def test_option_data_decoders_raise_only_option_errors(data: bytes) -> None:
    for decode in (p.parse_info_request, p.parse_meta_context_request):
        with contextlib.suppress(p.OptionError):
            decode(data)


def test_a_failed_payload_allocation_changes_nothing_in_the_parser(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """If a large WRITE's buffer cannot be had, the parser raises and stays where it was:
    asked again (memory permitting), it yields the whole WRITE, never one without its data."""
    intake = Intake(staging=4096)
    fail_first_reservation(monkeypatch)
    parser = p.ServerParser(intake=intake)
    parser.enter_transmission(p.ExportParams(size=SIZE))
    payload = bytes(range(256)) * 1024  # 256 KiB
    stream = p.encode_request(p.Cmd.WRITE, 7, 0, len(payload), payload=payload)
    parser.feed(stream[:1000])
    with pytest.raises(MemoryError):
        parser.next_event()
    assert parser.next_event() is None and intake.reserved == len(payload)
    parser.feed(stream[1000:])
    req = parser.next_event()
    assert req is not None and req.cookie == 7 and req.payload == payload
    assert intake.reserved == 0


# -- TLS (issue 11: the NBD port served any volume, a running VM's boot disk included) --------


def outside(exports: tuple[str, ...] = ("disk", "vm-boot"), **kw: Any) -> Harness:
    h = Harness(exports=exports, local=False, **kw)
    h.handshake()
    return h


def list_names(h: Harness) -> tuple[int, list[str]]:
    h.send(p.encode_option(p.Opt.LIST))
    names = []
    while True:
        _, rep, data = h.option_reply()
        if rep != p.Rep.SERVER:
            return rep, names
        names.append(data[4:].decode())


def test_without_tls_the_tcp_port_lists_nothing_and_opens_nothing() -> None:
    h = outside()
    assert list_names(h) == (p.Rep.ERR_TLS_REQD, [])
    for opt in (p.Opt.GO, p.Opt.INFO):
        h.send(p.encode_option(opt, go_data("vm-boot")))
        assert h.option_reply()[1] == p.Rep.ERR_TLS_REQD
    h.send(p.encode_option(p.Opt.STRUCTURED_REPLY))
    assert h.option_reply()[1] == p.Rep.ERR_TLS_REQD
    assert h.opened == [] and h.session.state is State.OPTIONS


def test_export_name_without_tls_ends_the_session() -> None:
    h = outside()
    with pytest.raises(p.ProtocolError, match="TLS"):
        h.send(p.encode_option(p.Opt.EXPORT_NAME, b"vm-boot"))
    assert h.opened == []


def test_after_starttls_only_the_granted_export_exists() -> None:
    h = outside()
    h.send(p.encode_option(p.Opt.STARTTLS))
    assert h.option_reply()[1] == p.Rep.ACK and h.session.starttls
    h.session.tls_established(frozenset({"disk"}))
    assert list_names(h) == (p.Rep.ACK, ["disk"])
    h.send(p.encode_option(p.Opt.GO, go_data("vm-boot")))
    assert h.option_reply()[1] == p.Rep.ERR_UNKNOWN
    h.send(p.encode_option(p.Opt.GO, go_data("disk")))
    while h.option_reply()[1] != p.Rep.ACK:
        pass
    assert h.session.state is State.TRANSMISSION and h.session.export_name == "disk"


def test_a_credential_that_grants_nothing_sees_nothing() -> None:
    h = outside()
    h.send(p.encode_option(p.Opt.STARTTLS))
    h.option_reply()
    h.session.tls_established(frozenset())
    assert list_names(h) == (p.Rep.ACK, [])
    h.send(p.encode_option(p.Opt.GO, go_data("disk")))
    assert h.option_reply()[1] == p.Rep.ERR_UNKNOWN


def test_starttls_is_refused_when_repeated_with_data_locally_or_unconfigured() -> None:
    h = outside()
    h.send(p.encode_option(p.Opt.STARTTLS, b"x"))
    assert h.option_reply()[1] == p.Rep.ERR_INVALID
    h.send(p.encode_option(p.Opt.STARTTLS))
    h.option_reply()
    h.session.tls_established(frozenset({"disk"}))
    h.send(p.encode_option(p.Opt.STARTTLS))
    assert h.option_reply()[1] == p.Rep.ERR_INVALID
    for h in (Harness(local=True), Harness(local=False, tls_offered=False)):
        h.handshake()
        h.send(p.encode_option(p.Opt.STARTTLS))
        assert h.option_reply()[1] == p.Rep.ERR_POLICY
        assert not h.session.starttls


def test_the_local_socket_sees_every_export_without_tls() -> None:
    h = Harness(exports=("disk", "vm-boot"), local=True)
    h.handshake()
    assert list_names(h) == (p.Rep.ACK, ["disk", "vm-boot"])
