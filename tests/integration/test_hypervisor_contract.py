"""One hypervisor contract, two drivers: every test runs against ``FakeHypervisor`` (the
double the unit and functional tiers use) and the QEMU driver, so the double cannot drift
from what QEMU does. Covered: start, a second start refused, state, pause and resume, power
off, an instance killed from outside, a new driver re-attaching to running instances, and
the events each of these emits."""

from __future__ import annotations

import asyncio
import os
import signal
from collections.abc import AsyncIterator
from contextlib import aclosing
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from aecp.common.errors import InvalidState
from aecp.compute.fake import FakeHypervisor, FakeInstance
from aecp.compute.hypervisor import EventKind, Hypervisor, InstanceEvent, RunState
from aecp.compute.qemu.driver import QemuHypervisor
from tests.integration.test_qemu_driver import guests, kill_by_pid, make_spec, overlay

pytestmark = pytest.mark.integration
EVENT_TIMEOUT = 30.0


@dataclass
class Driver:
    """A driver under test and what the outside world does to it."""

    kind: str
    base: Path
    hv: Hypervisor
    world: dict[str, FakeInstance] = field(default_factory=dict)
    pids: set[int] = field(default_factory=set)
    others: list[Hypervisor] = field(default_factory=list)
    specs: dict[str, object] = field(default_factory=dict)

    def spec(self, name: str) -> object:
        disk = str(overlay(self.base, name)) if self.kind == "qemu" else f"/nonexistent/{name}"
        return make_spec(name, disk)

    def restarted(self) -> Hypervisor:
        """A new driver over the same host (an agent that restarted, after the old one's
        ``close``: a QMP socket takes one client)."""
        if self.kind == "qemu":
            hv: Hypervisor = QemuHypervisor(self.base / "run")
        else:
            hv = FakeHypervisor(persistent=self.world)
        self.others.append(hv)
        return hv

    async def kill_from_outside(self, name: str, pid: int) -> None:
        if self.kind == "qemu":
            os.kill(pid, signal.SIGKILL)
        else:
            assert isinstance(self.hv, FakeHypervisor)
            self.hv.crash(name)


@pytest.fixture(params=["fake", "qemu"])
async def driver(request: pytest.FixtureRequest) -> AsyncIterator[Driver]:
    async with guests(prefix="aecp-contract-") as g:
        if request.param == "qemu":
            d = Driver("qemu", g.base, g.hypervisor())
        else:
            world: dict[str, FakeInstance] = {}
            d = Driver("fake", g.base, FakeHypervisor(g.run_dir, persistent=world), world)
        try:
            yield d
        finally:
            for hv in [d.hv, *d.others]:
                await hv.close()
            for pid in d.pids:
                kill_by_pid(pid)


async def until(hv: Hypervisor, *kinds: EventKind) -> list[InstanceEvent]:
    """Events up to the first of ``kinds``."""
    seen: list[InstanceEvent] = []
    async with aclosing(hv.events()) as stream, asyncio.timeout(EVENT_TIMEOUT):  # type: ignore[type-var]
        async for ev in stream:
            seen.append(ev)
            if ev.kind in kinds:
                return seen
    raise AssertionError("the event stream ended")


async def started(d: Driver, name: str) -> int:
    d.specs[name] = d.spec(name)
    info = await d.hv.start(d.specs[name])  # type: ignore[arg-type]
    d.pids.add(info.pid)
    return info.pid


async def test_a_started_instance_runs_is_listed_and_says_started(driver: Driver) -> None:
    pid = await started(driver, "c1")
    assert pid > 0
    assert await driver.hv.state("c1") is RunState.RUNNING
    assert [i.name for i in driver.hv.instances()] == ["c1"]
    assert (await until(driver.hv, EventKind.STARTED))[-1].name == "c1"


async def test_starting_a_running_name_again_is_refused(driver: Driver) -> None:
    await started(driver, "c1")
    with pytest.raises(InvalidState, match="already running"):
        await driver.hv.start(driver.specs["c1"])  # type: ignore[arg-type]
    assert len(driver.hv.instances()) == 1


async def test_an_unknown_name_is_stopped(driver: Driver) -> None:
    assert await driver.hv.state("nobody") is RunState.STOPPED


async def test_pause_and_resume_change_the_state_and_say_so(driver: Driver) -> None:
    await started(driver, "c1")
    await driver.hv.pause("c1")
    assert await driver.hv.state("c1") is RunState.PAUSED
    assert (await until(driver.hv, EventKind.PAUSED))[-1].kind is EventKind.PAUSED
    await driver.hv.resume("c1")
    assert await driver.hv.state("c1") is RunState.RUNNING
    assert (await until(driver.hv, EventKind.RESUMED))[-1].kind is EventKind.RESUMED


async def test_power_off_ends_the_instance(driver: Driver) -> None:
    await started(driver, "c1")
    await driver.hv.poweroff("c1")
    assert (await until(driver.hv, EventKind.STOPPED))[-1].name == "c1"
    assert await driver.hv.state("c1") is RunState.STOPPED
    assert driver.hv.instances() == []


async def test_an_instance_killed_from_outside_is_stopped_and_says_so(driver: Driver) -> None:
    pid = await started(driver, "c1")
    await until(driver.hv, EventKind.STARTED)
    await driver.kill_from_outside("c1", pid)
    assert (await until(driver.hv, EventKind.STOPPED))[-1].name == "c1"
    assert await driver.hv.state("c1") is RunState.STOPPED


async def test_a_new_driver_re_attaches_to_running_instances_with_their_pids(
    driver: Driver,
) -> None:
    pid = await started(driver, "c1")
    await driver.hv.close()  # the agent stops (its instances run on)
    new = driver.restarted()
    attached = await new.attach_all()
    assert [(i.name, i.pid) for i in attached] == [("c1", pid)]
    assert await new.state("c1") is RunState.RUNNING
