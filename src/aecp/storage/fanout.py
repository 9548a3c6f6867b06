"""Requests to the replicas of an extent: cut at extent boundaries, fanned out to every
replica, fanned back in, and the small operations sent that way."""

from __future__ import annotations

import asyncio
import errno
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass
from typing import Any

from aecp.common.errors import AecpError
from aecp.storage.blockdev import Allocation, BlockError, NoSpace, Span
from aecp.storage.chunk.api import ReplicaClient
from aecp.storage.chunk.errors import ChunkIOError, ReplicaUnavailable
from aecp.storage.meta.model import ExtentRecord

ReplicaOp = Callable[[ReplicaClient, ExtentRecord], Awaitable[object]]


@dataclass(frozen=True)
class Piece:
    """The part of a request that falls in one extent slot."""

    slot: int
    offset: int  # inside the extent
    length: int
    at: int  # offset of the piece inside the request


def split(offset: int, length: int, extent_size: int) -> Iterator[Piece]:
    """Cut ``[offset, offset+length)`` at extent boundaries."""
    at = 0
    while at < length:
        pos = offset + at
        slot, inside = divmod(pos, extent_size)
        n = min(length - at, extent_size - inside)
        yield Piece(slot, inside, n, at)
        at += n


def clip_runs(runs: list[tuple[int, int, bool]], offset: int, length: int) -> list[Span]:
    """``base:allocation`` spans of ``[offset, offset+length)`` from a replica's
    ``(start, length, valid)`` runs."""
    spans: list[Span] = []
    end = offset + length
    for start, n, valid in runs:
        lo, hi = max(start, offset), min(start + n, end)
        if lo >= hi:
            continue
        flags = Allocation.DATA if valid else Allocation.HOLE | Allocation.ZERO
        if spans and spans[-1].flags == flags:
            spans[-1] = Span(spans[-1].length + hi - lo, flags)
        else:
            spans.append(Span(hi - lo, flags))
    return spans or [Span(length, Allocation.HOLE | Allocation.ZERO)]


def flush_op(ext_id: str) -> ReplicaOp:
    def op(c: ReplicaClient, e: ExtentRecord) -> Awaitable[object]:
        return c.flush(ext_id)

    return op


def fence_op(ext_id: str, epoch: int) -> ReplicaOp:
    def op(c: ReplicaClient, e: ExtentRecord) -> Awaitable[object]:
        return c.fence(ext_id, epoch)

    return op


async def fan_out(aws: list[Awaitable[object]]) -> list[object]:
    """``asyncio.gather(*aws, return_exceptions=True)``, but the first awaitable runs in the
    calling task: the usual single-replica case creates no task at all. If the caller is
    cancelled, the others are cancelled too."""
    rest = [asyncio.ensure_future(a) for a in aws[1:]]
    try:
        first: object = await aws[0]
    except asyncio.CancelledError:
        for t in rest:
            t.cancel()
        raise
    except Exception as exc:
        first = exc
    if not rest:
        return [first]
    return [first, *await asyncio.gather(*rest, return_exceptions=True)]


class FanIn:
    """Waits for the replica writes of one ``write_nowait``: once all are done, calls
    ``then(failed, *args)``, ``failed`` telling whether any raised or was cancelled."""

    __slots__ = ("args", "failed", "left", "then")

    def __init__(self, count: int, then: Callable[..., None], args: tuple[Any, ...]) -> None:
        self.left = count
        self.failed = False
        self.then = then
        self.args = args

    def one_done(self, fut: asyncio.Future[Any]) -> None:
        if fut.cancelled() or fut.exception() is not None:
            self.failed = True
        self.left -= 1
        if not self.left:
            self.then(self.failed, *self.args)


async def unavailable() -> None:
    raise ReplicaUnavailable("-", "no storage server registered for the node")


def no_space(exc: object) -> bool:
    """Whether a replica refused a request for want of space (it changed nothing)."""
    return isinstance(exc, ChunkIOError) and exc.errno == errno.ENOSPC


def as_block_error(exc: BaseException) -> BaseException:
    """The error a front end reports for a replica's: out of space stays ENOSPC."""
    if no_space(exc):
        return NoSpace(f"no space left: {exc}")
    if isinstance(exc, AecpError) and not isinstance(exc, BlockError):
        return BlockError(f"replica error: {exc}")
    return exc
