"""Named failure doubles of a replica, as an access point's replica client sees it (like
``compute/fake.py`` for the hypervisor): a real ``ReplicaStore`` behind, and failures switched
on by name, never by assigning over a store's methods.

``FakeReplica``:
- ``down = True``: the node is switched off: every call raises ``ReplicaUnavailable`` (and
  the ``*_nowait`` fast paths decline, as they do when they cannot answer at once);
- ``gate(method)``: each call of ``method`` sets the gate's ``entered`` event, then waits for
  ``open()`` before it runs (an operation in flight, for a test to act meanwhile); a gated
  method's ``*_nowait`` twin declines, so the caller takes the gated path;
- ``fail(method, error)``: calls of ``method`` raise ``error`` (after their gate, if any);
  ``heal(method)`` ends it;
- ``calls``: the methods called, in order.
"""

from __future__ import annotations

import asyncio
from typing import Any

from aecp.storage.chunk.client import LocalChunkClient
from aecp.storage.chunk.errors import ReplicaUnavailable
from aecp.storage.chunk.store import ReplicaStore


class Gate:
    """Holds the calls of one method: ``entered`` is set by the first; ``open()`` lets them
    all through (and later ones at once)."""

    def __init__(self) -> None:
        self.entered = asyncio.Event()
        self._open = asyncio.Event()
        self.calls = 0

    @property
    def is_open(self) -> bool:
        return self._open.is_set()

    def open(self) -> None:
        self._open.set()

    async def pass_(self) -> None:
        self.calls += 1
        self.entered.set()
        await self._open.wait()


class FakeReplica:
    def __init__(self, store: ReplicaStore, node: str = "test-node") -> None:
        self.store = store
        self.node = node
        self.down = False
        self._gates: dict[str, Gate] = {}
        self._failures: dict[str, BaseException] = {}
        self.calls: list[str] = []  # the methods called, in order (for assertions)

    def gate(self, method: str) -> Gate:
        gate = self._gates[method] = Gate()
        return gate

    def fail(self, method: str, error: BaseException) -> None:
        self._failures[method] = error

    def heal(self, method: str) -> None:
        self._failures.pop(method, None)

    def __getattr__(self, name: str) -> Any:
        target = getattr(LocalChunkClient(self.store), name)
        if name.endswith("_nowait"):  # answers at once or declines (None)
            slow = name.removesuffix("_nowait")

            def nowait(*args: Any, **kw: Any) -> Any:
                gate = self._gates.get(slow)
                held = (gate is not None and not gate.is_open) or slow in self._failures
                return None if self.down or held else target(*args, **kw)

            return nowait

        async def call(*args: Any, **kw: Any) -> Any:
            self.calls.append(name)
            if self.down:
                raise ReplicaUnavailable(self.node, "switched off by the test")
            gate = self._gates.get(name)
            if gate is not None:
                await gate.pass_()
            error = self._failures.get(name)
            if error is not None:
                raise error
            return await target(*args, **kw)

        return call
