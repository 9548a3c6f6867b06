"""Random interleavings of power requests with the node's reconcile passes (hypothesis): every
operation ends, and the VM ends up where the last accepted request asked it to be.

The whole control path runs in one event loop (``tests.unit.vmstack``): requests through the
API's service, reconcile passes started, stepped one event-loop turn at a time, or finished, in
the order hypothesis draws, so each example is deterministic and a failure shrinks to a short
script.
"""

from __future__ import annotations

import asyncio
import contextlib
import tempfile
from pathlib import Path

from hypothesis import given, settings
from hypothesis import strategies as st

from aecp.common.clock import FakeClock
from aecp.common.errors import InvalidState
from aecp.model.operation import OpState
from aecp.model.vm import PowerOp, VMState
from aecp.store.memory import MemoryStore
from tests.unit.conftest import add_node
from tests.unit.vmstack import Stack

TARGET = {
    PowerOp.START: VMState.RUNNING,
    PowerOp.RESUME: VMState.RUNNING,
    PowerOp.REBOOT: VMState.RUNNING,
    PowerOp.SHUTDOWN: VMState.STOPPED,
    PowerOp.POWEROFF: VMState.STOPPED,
    PowerOp.SUSPEND: VMState.PAUSED,
}
REQUEST = st.tuples(st.just("request"), st.sampled_from(list(PowerOp)))
STEP = st.one_of(
    REQUEST,
    REQUEST,
    st.just(("pass", None)),  # decide and start actions, without waiting for them
    st.just(("turn", None)),  # let in-flight actions run one event-loop turn
    st.just(("settle", None)),  # wait for every in-flight action
)
Step = tuple[str, PowerOp | None]


async def play(steps: list[Step], images_dir: Path) -> None:
    clock = FakeClock()
    store = MemoryStore(clock)
    await add_node(store, "n1")
    stack = Stack(store, clock, images_dir)
    await stack.add_vm("vm1")
    await stack.converge()
    accepted: list[tuple[str, PowerOp]] = []
    for kind, op in steps:
        if kind == "request":
            assert op is not None
            with contextlib.suppress(InvalidState):  # not valid now: refused, nothing stored
                accepted.append(((await stack.svc.power("vm1", op)).id, op))
        elif kind == "pass":
            await stack.run_pass()
        elif kind == "turn":
            await asyncio.sleep(0)
            stack.feed_events()
        else:
            await stack.settle()
    await stack.settle()
    await stack.converge()

    ops = {op.id: op for op in await stack.ops()}
    assert [o for o in ops.values() if o.state is OpState.RUNNING] == []
    if not accepted:
        assert await stack.state("vm1") is VMState.RUNNING
        return
    last_id, last_op = accepted[-1]
    assert ops[last_id].state is OpState.SUCCEEDED, ops[last_id]
    assert await stack.state("vm1") is TARGET[last_op]
    for op_id, _ in accepted[:-1]:
        ended = ops[op_id]
        assert ended.state in (OpState.SUCCEEDED, OpState.CANCELLED), ended
        if ended.state is OpState.CANCELLED:
            assert ended.error == f"superseded by {ended.superseded_by}"


@settings(max_examples=150, deadline=None)
@given(st.lists(STEP, max_size=24))
def test_random_power_interleavings_all_end_in_the_last_requests_state(steps: list[Step]) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        asyncio.run(play(steps, Path(tmp)))


def test_the_probe_sequence_sent_while_actions_run_ends_every_operation() -> None:
    """The issue's probe: shutdown, start, shutdown, poweroff, start, poweroff, each sent while
    the previous one is being carried out."""
    ops = [
        PowerOp.SHUTDOWN,
        PowerOp.START,
        PowerOp.SHUTDOWN,
        PowerOp.POWEROFF,
        PowerOp.START,
        PowerOp.POWEROFF,
    ]
    steps: list[Step] = []
    for op in ops:
        steps += [("request", op), ("pass", None), ("turn", None)]
    with tempfile.TemporaryDirectory() as tmp:
        asyncio.run(play(steps, Path(tmp)))
