"""The NBD export handle of the storage daemon passes every request through to its volume,
the fast paths (``read_nowait``, ``write_nowait``) included: a wrapper that dropped them would
silently send every request down the slow path."""

from __future__ import annotations

import asyncio
from typing import Any, cast

from aecp.node.storage import StorageDaemon, _Handle
from aecp.storage.access import VolumeDevice
from aecp.storage.blockdev import BlockDevice


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
    handle = _Handle(cast(StorageDaemon, None), "v", cast(VolumeDevice, dev))
    for name in ("read_nowait", "write_nowait"):  # overridden, not BlockDevice's "never can"
        assert getattr(type(handle), name) is not getattr(BlockDevice, name), name
    assert handle.read_nowait(4096, 8) == b"r" * 8
    started = handle.write_nowait(0, b"w")
    assert started is not None and started is dev.started
    assert dev.calls == [("read_nowait", (4096, 8)), ("write_nowait", (0, b"w"))]
