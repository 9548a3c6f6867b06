"""The controller runtime: one node runs each role; decisions are logged and recorded once per
change; one failing controller does not stop the others; an object's events are bounded."""

from __future__ import annotations

import logging

import pytest

from aecp.common.clock import FakeClock
from aecp.common.errors import Conflict
from aecp.store import keys
from aecp.store.controllers import ControllerHost, Decision
from aecp.store.history import History
from aecp.store.memory import MemoryStore


class Counting:
    """A controller that says ``sentence`` about VM ``x`` and counts its passes and terms."""

    def __init__(self, role: str = "demo", sentence: str = "looked at") -> None:
        self.role = role
        self.sentence = sentence
        self.passes = 0
        self.terms = 0

    async def run_pass(self, new_term: bool) -> list[Decision]:
        self.passes += 1
        self.terms += new_term
        return [Decision(self.sentence, "vm", "x")]


class Failing:
    role = "broken"

    async def run_pass(self, new_term: bool) -> list[Decision]:
        raise Conflict("it went wrong")


async def test_two_hosts_race_for_a_role_and_only_one_runs_it_until_its_lease_goes(
    store: MemoryStore,
) -> None:
    a, b = Counting(), Counting()
    host_a = ControllerHost(store, "n1", controllers=[a])
    host_b = ControllerHost(store, "n2", controllers=[b])
    lease_a, lease_b = await store.grant_lease(10), await store.grant_lease(10)
    for _ in range(3):
        await host_a.run_pass(lease_a)
        await host_b.run_pass(lease_b)
    assert (a.passes, b.passes) == (3, 0)
    assert host_a.leads("demo") and not host_b.leads("demo")
    await store.revoke_lease(lease_a)  # n1 is gone: its leader key goes with its lease
    host_a.step_down()
    await host_b.run_pass(lease_b)
    assert (b.passes, b.terms) == (1, 1)
    await host_b.run_pass(lease_b)
    assert (b.passes, b.terms) == (2, 1)  # the same term


async def test_a_host_without_a_certain_lease_leads_nothing(store: MemoryStore) -> None:
    c = Counting()
    host = ControllerHost(store, "n1", controllers=[c])
    assert await host.run_pass(None) == []
    assert c.passes == 0 and not host.leads("demo")


async def test_a_decision_is_logged_and_recorded_once_until_it_changes(
    store: MemoryStore, clock: FakeClock, caplog: pytest.LogCaptureFixture
) -> None:
    await store.put(keys.vm_spec("x"), b"{}")  # events are kept only for a VM that exists
    history = History(store, "n1", clock)
    c = Counting(sentence="cannot be placed now: no room")
    host = ControllerHost(store, "n1", history, [c])
    lease = await store.grant_lease(10)
    with caplog.at_level(logging.INFO, logger="aecp.store.controllers"):
        for _ in range(3):
            await host.run_pass(lease)
            await clock.advance(1)
        c.sentence = "placed on n2"
        await host.run_pass(lease)
    logged = [r.getMessage() for r in caplog.records]
    assert logged == ["demo: vm x: cannot be placed now: no room", "demo: vm x: placed on n2"]
    events = await history.events("vm", "x")
    assert [e.sentence for e in events] == ["placed on n2", "cannot be placed now: no room"]
    assert {(e.role, e.node) for e in events} == {("demo", "n1")}


async def test_a_failing_controller_does_not_stop_the_others(
    store: MemoryStore, caplog: pytest.LogCaptureFixture
) -> None:
    c = Counting()
    host = ControllerHost(store, "n1", controllers=[Failing(), c])
    lease = await store.grant_lease(10)
    with caplog.at_level(logging.WARNING, logger="aecp.store.controllers"):
        decided = await host.run_pass(lease)
    assert [str(d) for d in decided] == ["vm x: looked at"]
    assert c.passes == 1
    assert "broken: pass stopped: it went wrong" in caplog.text


def test_a_role_is_registered_once(store: MemoryStore) -> None:
    host = ControllerHost(store, "n1", controllers=[Counting()])
    with pytest.raises(ValueError, match="role demo registered twice"):
        host.register(Counting())


async def test_an_objects_events_are_bounded_and_newest_first(
    store: MemoryStore, clock: FakeClock
) -> None:
    history = History(store, "n1", clock, keep=3)
    for vm in ("x", "y"):
        await store.put(keys.vm_spec(vm), b"{}")
    for i in range(5):
        await history.record("vm", "x", "scheduler", f"decision {i}")
        await clock.advance(1)
    await history.record("vm", "y", "scheduler", "elsewhere")
    got = await history.events("vm", "x")
    assert [e.sentence for e in got] == ["decision 4", "decision 3", "decision 2"]
    assert [e.at for e in got] == sorted((e.at for e in got), reverse=True)
    assert [e.sentence for e in await history.events("vm", "y")] == ["elsewhere"]


class SweepFailsOnce(Counting):
    """Its first pass of a term fails (a store hiccup during the sweep of strays)."""

    async def run_pass(self, new_term: bool) -> list[Decision]:
        if new_term and not self.terms:
            self.terms += 1
            raise Conflict("store hiccup")
        return await super().run_pass(new_term)


async def test_a_new_term_whose_first_pass_failed_is_still_new_on_the_next(
    store: MemoryStore,
) -> None:
    c = SweepFailsOnce()
    host = ControllerHost(store, "n1", controllers=[c])
    lease = await store.grant_lease(10)
    assert await host.run_pass(lease) == [] and not host.leads("demo")
    await host.run_pass(lease)
    assert (c.passes, c.terms) == (1, 2) and host.leads("demo")


async def test_no_event_is_written_for_a_vm_that_does_not_exist(
    store: MemoryStore, clock: FakeClock
) -> None:
    history = History(store, "n1", clock)
    assert not await history.record("vm", "gone", "scheduler", "cannot be placed now")
    assert await store.list(keys.object_events("vm", "gone")) == []
    assert await history.record("volume", "v", "abs-meta", "repaired")  # no existence rule


async def test_events_keep_the_order_they_were_written_in_whatever_the_clocks_say(
    store: MemoryStore, clock: FakeClock
) -> None:
    late, early = History(store, "n1", clock), History(store, "n2", FakeClock(start=1.0))
    await late.record("volume", "v", "abs-meta", "first")
    await early.record("volume", "v", "abs-meta", "second")  # a node whose clock is behind
    assert [e.sentence for e in await late.events("volume", "v")] == ["second", "first"]
