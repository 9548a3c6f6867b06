"""Finished operations go after the retention period; running ones never do."""

from __future__ import annotations

from aecp.cluster.reaper import EVERY, OperationReaper
from aecp.common.clock import FakeClock
from aecp.model.operation import Operation
from aecp.store import keys
from aecp.store.memory import MemoryStore

DAY = 86400.0


async def put_op(store: MemoryStore, op_id: str, at: float, done: bool) -> None:
    op = Operation(id=op_id, kind="vm.start", target="vm1", created_at=at, updated_at=at)
    await store.put(keys.op(op_id), (op.succeed("started", at) if done else op).dump())


async def test_finished_operations_past_the_retention_go_and_the_rest_stay(
    store: MemoryStore, clock: FakeClock
) -> None:
    now = clock.wall()
    await put_op(store, "op-old", now - 8 * DAY, done=True)
    await put_op(store, "op-recent", now - 1 * DAY, done=True)
    await put_op(store, "op-running", now - 30 * DAY, done=False)
    reaper = OperationReaper(store, 7 * DAY, clock)
    [decision] = await reaper.run_pass(new_term=True)
    assert decision.sentence == "deleted 1 operations finished more than 7 days ago"
    left = sorted(kv.key for kv in await store.list(keys.OPS))
    assert left == [keys.op("op-recent"), keys.op("op-running")]


async def test_it_looks_at_most_once_a_minute(store: MemoryStore, clock: FakeClock) -> None:
    reaper = OperationReaper(store, 7 * DAY, clock)
    assert await reaper.run_pass(new_term=True) == []
    await put_op(store, "op-old", clock.wall() - 8 * DAY, done=True)
    assert await reaper.run_pass(new_term=False) == []  # too soon: not looked at
    assert await store.get(keys.op("op-old")) is not None
    await clock.advance(EVERY)
    assert len(await reaper.run_pass(new_term=False)) == 1
    assert await store.get(keys.op("op-old")) is None
