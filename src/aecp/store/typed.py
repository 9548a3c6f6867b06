"""Typed access to stored models and operations on top of the ``Store`` contract."""

from __future__ import annotations

import logging
from typing import TypeVar

from aecp.common.clock import SYSTEM_CLOCK, Clock
from aecp.model.base import Stored
from aecp.model.operation import Operation
from aecp.store import keys
from aecp.store.base import Store

log = logging.getLogger(__name__)

M = TypeVar("M", bound=Stored)


async def read(store: Store, key: str, cls: type[M]) -> tuple[M, int] | None:
    """The model at ``key`` and its mod_revision, or None when absent."""
    kv = await store.get(key)
    if kv is None:
        return None
    return cls.load(kv.value), kv.mod_revision


async def update_op(
    store: Store,
    op_id: str,
    *,
    progress: int | None = None,
    message: str = "",
    succeeded: bool = False,
    error: str = "",
    clock: Clock = SYSTEM_CLOCK,
) -> Operation | None:
    """Advance, finish or fail operation ``op_id`` (compare-and-swap, retried on races).

    A finished operation is never changed again; returns the operation as stored afterwards, or
    None if there is no such operation.
    """
    if not op_id:
        return None
    for _ in range(5):
        got = await read(store, keys.op(op_id), Operation)
        if got is None:
            return None
        op, rev = got
        if op.state.done:
            return op
        now = clock.wall()
        if error:
            new = op.fail(error, now)
        elif succeeded:
            new = op.succeed(message or op.message, now)
        else:
            new = op.advance(progress if progress is not None else op.progress, message, now)
        if new == op:
            return op
        if await store.replace(keys.op(op_id), new.dump(), mod_revision=rev):
            if new.state.done:
                log.info(
                    "operation %s (%s %s) %s: %s",
                    op_id,
                    op.kind,
                    op.target,
                    new.state.value,
                    new.message,
                )
            return new
    log.warning("operation %s: gave up updating after repeated races", op_id)
    return None
