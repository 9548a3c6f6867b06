"""``common.receive``: which buffer a connection reads into next, and payload buffers."""

from __future__ import annotations

import sys

import pytest

from aecp.common import receive
from aecp.common.receive import Intake, Receiver, payload_buffer


class OnePayload:
    """A parser that, after a 4-byte header, gathers a payload of ``size`` bytes."""

    def __init__(self, size: int) -> None:
        self.size = size
        self.payload: bytearray | None = None
        self.filled = 0
        self.fed = b""
        self.done: list[bytes] = []

    def feed(self, data: memoryview) -> int:
        self.fed += bytes(data)
        if self.payload is None and len(self.fed) >= 4:
            self.payload = payload_buffer(self.size)
            rest = self.fed[4:]
            self.payload[: len(rest)] = rest
            self.filled, self.fed = len(rest), b""
        return len(data)

    def payload_view(self) -> memoryview | None:
        return None if self.payload is None else memoryview(self.payload)[self.filled :]

    def payload_received(self, n: int) -> int:
        assert self.payload is not None
        self.filled += n
        if self.filled == self.size:
            self.done.append(bytes(self.payload))
            self.payload = None
        return n


def test_reads_go_to_staging_then_straight_into_the_payload_then_a_header_read() -> None:
    parser = OnePayload(100)
    rx = Receiver(Intake(staging=64), header=8)
    assert len(rx.get(parser)) == 64  # nothing known yet: full staging
    buf = rx.get(parser)
    buf[:10] = b"HEAD" + b"x" * 6
    assert rx.updated(parser, 10) == 10
    view = rx.get(parser)  # the rest of the payload, in the parser's own buffer
    assert len(view) == 94
    view[:94] = b"y" * 94
    assert rx.updated(parser, 94) == 94
    assert parser.done == [b"x" * 6 + b"y" * 94]
    assert len(rx.get(parser)) == 8  # right after a payload: only a header's worth
    rx.updated(parser, 0)
    assert len(rx.get(parser)) == 64  # that read brought no payload: full staging again


def test_a_receiver_needs_a_header_read_inside_its_staging() -> None:
    for header in (0, 65):
        with pytest.raises(ValueError):
            Receiver(Intake(staging=64), header=header)


def test_payload_buffers_have_the_size_asked_and_no_extra_reference() -> None:
    buf = payload_buffer(1 << 20)
    assert type(buf) is bytearray and len(buf) == 1 << 20
    assert sys.getrefcount(buf) == 2  # ours and the argument's: nothing leaked
    buf[-3:] = b"end"
    assert bytes(buf[-3:]) == b"end"
    assert payload_buffer(0) == bytearray()
    with pytest.raises(ValueError):
        payload_buffer(-1)


def test_the_connections_of_one_intake_share_its_staging() -> None:
    intake = Intake(staging=64)
    first, second = Receiver(intake, header=8), Receiver(intake, header=8)
    parser = OnePayload(10)
    assert first.get(parser).obj is second.get(parser).obj is intake.staging.obj


def test_an_intake_reserves_payload_buffers_within_its_budget() -> None:
    intake = Intake(staging=64, budget=100)
    a = intake.reserve(60)
    assert a is not None and len(a) == 60 and intake.reserved == 60
    assert intake.reserve(41) is None and intake.reserved == 60  # past the budget: nothing
    b = intake.reserve(40)
    assert b is not None and intake.reserved == 100
    intake.release(60)
    intake.release(40)
    assert intake.reserved == 0
    with pytest.raises(ValueError):
        Intake(staging=0)


def test_an_allocation_failure_reserves_nothing(monkeypatch: pytest.MonkeyPatch) -> None:
    def no_memory(size: int) -> bytearray:
        raise MemoryError

    intake = Intake(staging=64, budget=100)
    monkeypatch.setattr(receive, "payload_buffer", no_memory)
    with pytest.raises(MemoryError):
        intake.reserve(10)
    assert intake.reserved == 0
