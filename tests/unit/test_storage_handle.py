"""The NBD export handle of the storage daemon passes every request through to its volume,
the fast paths (``read_nowait``, ``write_nowait``) included: a wrapper that dropped them would
silently send every request down the slow path. A volume opened again while its last
handle's close is still flushing waits for that flush."""

from __future__ import annotations

import asyncio
from types import SimpleNamespace
from typing import Any, cast

import pytest

from aecp.node.storage_server import StorageDaemon, _Handle
from aecp.storage.access import VolumeDevice
from aecp.storage.blockdev import BlockDevice
from aecp.storage.meta.service import AttachedElsewhere
from tests.unit._sync import run_ready


class Recorder:
    size = 1 << 20

    def __init__(self) -> None:
        self.calls: list[tuple[str, tuple[Any, ...]]] = []
        self.started: asyncio.Future[None] | None = None

    def read_nowait(self, offset: int, length: int) -> bytes:
        self.calls.append(("read_nowait", (offset, length)))
        return b"r" * length

    def write_nowait(self, offset: int, data: bytes) -> asyncio.Future[None]:
        self.calls.append(("write_nowait", (offset, data)))
        self.started = asyncio.get_running_loop().create_future()
        return self.started


async def test_the_handle_forwards_the_fast_paths_to_its_volume() -> None:
    dev = Recorder()
    owner = cast(StorageDaemon, SimpleNamespace(handles={}))
    handle = _Handle(owner, "v", cast(VolumeDevice, dev), dev.size)
    for name in ("read_nowait", "write_nowait"):  # overridden, not BlockDevice's "never can"
        assert getattr(type(handle), name) is not getattr(BlockDevice, name), name
    assert handle.read_nowait(4096, 8) == b"r" * 8
    started = handle.write_nowait(0, b"w")
    assert started is not None and started is dev.started
    assert dev.calls == [("read_nowait", (4096, 8)), ("write_nowait", (0, b"w"))]


class Device:
    """A volume device that records what is done to it; its flush waits for ``gate``."""

    size = 1 << 20
    holder = None

    def __init__(self, n: int, events: list[str], gate: asyncio.Event, fail: bool) -> None:
        self.n, self.events, self.gate, self.fail = n, events, gate, fail

    async def flush(self) -> None:
        self.events.append(f"flush {self.n}")
        await self.gate.wait()
        if self.fail:
            raise OSError(5, "Input/output error")

    async def close(self) -> None:
        self.events.append(f"closed {self.n}")


def daemon(
    monkeypatch: pytest.MonkeyPatch, events: list[str], gate: asyncio.Event, fail: bool = False
) -> StorageDaemon:
    """A storage daemon whose exports open ``Device``s (only its export bookkeeping runs)."""
    opened: list[Device] = []

    async def open_volume(*args: Any, **kw: Any) -> Device:
        opened.append(Device(len(opened), events, gate, fail))
        events.append(f"opened {opened[-1].n}")
        return opened[-1]

    monkeypatch.setattr("aecp.node.storage_server.open_volume", open_volume)
    d = StorageDaemon.__new__(StorageDaemon)
    d.keeper = cast(Any, SimpleNamespace(lease=object(), held=lambda: True))

    async def mark_closing(holder: object) -> None:
        events.append("marked closing")

    d.meta = cast(Any, SimpleNamespace(mark_closing=mark_closing))
    d.pool, d.node = cast(Any, None), "n1"
    d._lock, d._exports, d._closing = asyncio.Lock(), {}, {}
    d._deferred, d.handles = {}, {}
    return d


async def test_reopening_a_volume_waits_until_its_last_close_has_flushed(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # A FLUSH on the new device must cover the writes the old device acknowledged.
    events: list[str] = []
    gate = asyncio.Event()
    d = daemon(monkeypatch, events, gate)
    first = await d.open_export("v")
    closing = asyncio.ensure_future(first.close())
    await asyncio.sleep(0)
    reopening = asyncio.ensure_future(d.open_export("v"))
    await run_ready()  # nothing to do but wait for the close: no I/O before that
    assert not reopening.done()
    gate.set()
    await closing
    await reopening
    assert events == ["opened 0", "marked closing", "flush 0", "closed 0", "opened 1"]


async def test_a_handle_from_before_a_lost_lease_leaves_the_new_device_open(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    events: list[str] = []
    gate = asyncio.Event()
    gate.set()
    d = daemon(monkeypatch, events, gate)
    old = await d.open_export("v")
    await d._close_exports()  # the storage lease was lost
    await d.open_export("v")  # back, and the client reconnected
    await old.close()  # the old connection goes away only now
    assert events == ["opened 0", "flush 0", "closed 0", "opened 1"]


async def test_the_last_close_detaches_even_when_its_flush_fails(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    events: list[str] = []
    gate = asyncio.Event()
    gate.set()
    handle = await daemon(monkeypatch, events, gate, fail=True).open_export("v")
    with pytest.raises(OSError):
        await handle.close()
    assert events == ["opened 0", "marked closing", "flush 0", "closed 0"]


async def test_opening_a_volume_another_nodes_export_is_closing_waits_for_its_detach(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A client moving to another node right after leaving the first was refused 'attached on
    node3' while that export flushed and detached (the lab's nbdcopy round trip)."""
    events: list[str] = []
    detached = asyncio.Event()
    attempts: list[int] = []

    async def open_volume(*args: Any, **kw: Any) -> Device:
        attempts.append(1)
        if len(attempts) == 1:
            raise AttachedElsewhere("volume v is attached on n3", volume="v", node="n3")
        return Device(0, events, asyncio.Event(), False)

    async def wait_detached(name: str, wait: float, settle: float) -> bool:
        events.append("waited")
        await detached.wait()
        return True

    d = daemon(monkeypatch, events, asyncio.Event())
    monkeypatch.setattr("aecp.node.storage_server.open_volume", open_volume)

    async def volume(name: str) -> tuple[object, int]:  # a standalone volume: no migration
        return SimpleNamespace(owner=None), 1

    d.meta = cast(Any, SimpleNamespace(wait_detached=wait_detached, volume=volume))
    opening = asyncio.ensure_future(d.open_export("v"))
    await asyncio.sleep(0)
    assert not opening.done() and events == ["waited"]
    assert not d._lock.locked()  # other volumes open meanwhile
    detached.set()
    assert isinstance(await opening, _Handle) and len(attempts) == 2
