"""The QEMU driver against real QEMU (TCG) booting the tiny guest image.

One long-lived guest ("vm-a", module scope) goes through boot, pause/resume, reboot, an agent
restart (re-attach) and finally an ACPI shutdown, in that order; the other tests use short-lived
guests that never need to finish booting. At most two guests run at once. Every QEMU process is
killed by pid in teardown, whatever happened.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import uuid
from collections.abc import AsyncIterator, Iterator
from contextlib import aclosing
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import pytest_asyncio

from aecp.common.errors import InvalidState, LaunchError
from aecp.common.proc import pid_alive
from aecp.compute.hypervisor import (
    Accel,
    DiskSpec,
    EventKind,
    InstanceEvent,
    InstanceSpec,
    NicSpec,
    PortForward,
    RunState,
)
from aecp.compute.images.tiny import BOOT_MARKER, ensure_tiny_image
from aecp.compute.qemu.accel import probe_accel
from aecp.compute.qemu.driver import QemuHypervisor

pytestmark = [pytest.mark.integration, pytest.mark.asyncio(loop_scope="module")]

PROMPT = "aecp:/# "  # the guest's shell: init has started acpid, ACPI presses are honoured
BOOT_TIMEOUT = 90.0
EVENT_TIMEOUT = 30.0


# --- helpers --------------------------------------------------------------------------------------


def kill_by_pid(pid: int) -> None:
    """SIGKILL and reap (the test process is QEMU's parent), ignoring a process already gone."""
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGKILL)
    with contextlib.suppress(ChildProcessError):
        os.waitpid(pid, 0)


def overlay(directory: Path, name: str) -> Path:
    """A qcow2 overlay on the tiny image, private to one guest."""
    path = directory / f"{name}.qcow2"
    subprocess.run(
        ["qemu-img", "create", "-f", "qcow2", "-b", str(ensure_tiny_image()), "-F", "raw", path],
        check=True,
        capture_output=True,
    )
    return path


def make_spec(name: str, disk: str, nics: tuple[NicSpec, ...] = ()) -> InstanceSpec:
    return InstanceSpec(name, str(uuid.uuid4()), 1, 160, (DiskSpec(disk, boot=True),), nics)


async def wait_console(log: Path, text: str, count: int = 1) -> str:
    """Wait until ``text`` appears ``count`` times in the console log; return the log."""
    async with asyncio.timeout(BOOT_TIMEOUT):
        while True:
            content = log.read_text(errors="replace") if log.exists() else ""
            if content.count(text) >= count:
                return content
            await asyncio.sleep(0.2)


async def next_event(hv: QemuHypervisor, *kinds: EventKind) -> list[InstanceEvent]:
    """Read events until one of ``kinds`` arrives; return every event read."""
    seen: list[InstanceEvent] = []
    async with aclosing(hv.events()) as stream, asyncio.timeout(EVENT_TIMEOUT):  # type: ignore[type-var]
        async for event in stream:
            seen.append(event)
            if event.kind in kinds:
                return seen
    raise AssertionError("event stream ended")


def free_port(address: str) -> int:
    with socket.socket() as s:
        s.bind((address, 0))
        return int(s.getsockname()[1])


@dataclass
class Guests:
    """The run dir of a test and every pid started in it (killed at teardown)."""

    base: Path
    pids: set[int] = field(default_factory=set)
    hvs: list[QemuHypervisor] = field(default_factory=list)

    @property
    def run_dir(self) -> Path:
        return self.base / "run"

    def hypervisor(self) -> QemuHypervisor:
        hv = QemuHypervisor(self.run_dir, accel=Accel.TCG)
        self.hvs.append(hv)
        return hv

    async def teardown(self) -> None:
        try:
            for hv in self.hvs:
                await hv.close()
        finally:
            for pid in self.pids:
                kill_by_pid(pid)
            shutil.rmtree(self.base, ignore_errors=True)


@contextlib.asynccontextmanager
async def guests(prefix: str = "aecp-q-") -> AsyncIterator[Guests]:
    g = Guests(Path(tempfile.mkdtemp(prefix=prefix, dir="/tmp")))
    try:
        yield g
    finally:
        await g.teardown()


@dataclass
class BootedVm:
    guests: Guests
    hv: QemuHypervisor
    spec: InstanceSpec
    pid: int
    console_log: Path


@pytest_asyncio.fixture(loop_scope="module", scope="module")
async def vm_a() -> AsyncIterator[BootedVm]:
    async with guests() as g:
        spec = make_spec("vm-a", str(overlay(g.base, "vm-a")))
        hv = g.hypervisor()
        info = await hv.start(spec)
        g.pids.add(info.pid)
        await wait_console(info.console_log, PROMPT)
        yield BootedVm(g, hv, spec, info.pid, info.console_log)


@pytest.fixture
def image() -> Iterator[Path]:
    yield ensure_tiny_image()


# --- the long-lived guest, in order ---------------------------------------------------------------


async def test_a_vm_boots_its_disk_to_the_boot_marker_with_its_name_and_uuid(
    vm_a: BootedVm,
) -> None:
    console = vm_a.console_log.read_text(errors="replace")
    assert f"{BOOT_MARKER} name=vm-a uuid={vm_a.spec.uuid}" in console
    assert await vm_a.hv.state("vm-a") is RunState.RUNNING
    run = vm_a.guests.run_dir / "vm-a"
    assert int((run / "qemu.pid").read_text()) == vm_a.pid
    [info] = vm_a.hv.instances()
    assert (info.name, info.pid) == ("vm-a", vm_a.pid)
    assert info.console_socket.is_socket() and info.console_socket.parent.name == ".sock"


async def test_starting_a_running_vm_again_is_invalid_state(vm_a: BootedVm) -> None:
    with pytest.raises(InvalidState):
        await vm_a.hv.start(vm_a.spec)


async def test_pause_and_resume_change_the_state_qemu_reports(vm_a: BootedVm) -> None:
    hv = vm_a.hv
    with pytest.raises(InvalidState):
        await hv.resume("vm-a")
    await hv.pause("vm-a")
    assert await hv.state("vm-a") is RunState.PAUSED
    assert [e.kind for e in await next_event(hv, EventKind.PAUSED)][-1] is EventKind.PAUSED
    with pytest.raises(InvalidState):
        await hv.pause("vm-a")
    await hv.resume("vm-a")
    assert await hv.state("vm-a") is RunState.RUNNING
    assert (await next_event(hv, EventKind.RESUMED))[-1].kind is EventKind.RESUMED


async def test_reboot_runs_the_guest_again_in_the_same_process(vm_a: BootedVm) -> None:
    assert await vm_a.hv.reboot("vm-a", 60) is True
    assert await vm_a.hv.state("vm-a") is RunState.RUNNING
    seen = await next_event(vm_a.hv, EventKind.RESET)
    assert EventKind.GUEST_SHUTDOWN not in [e.kind for e in seen]
    console = await wait_console(vm_a.console_log, PROMPT, count=2)
    assert console.count(f"{BOOT_MARKER} name=vm-a") == 2
    assert [i.pid for i in vm_a.hv.instances()] == [vm_a.pid]


async def test_a_new_hypervisor_on_the_same_run_dir_reattaches_the_running_vm(
    vm_a: BootedVm,
) -> None:
    ghost = vm_a.guests.run_dir / "ghost"  # a pidfile naming a live process that is not QEMU
    ghost.mkdir()
    (ghost / "qemu.pid").write_text(f"{os.getpid()}\n")
    (ghost / "qmp.sock").write_text("")
    await vm_a.hv.close()  # the agent goes away; QEMU stays

    vm_a.hv = vm_a.guests.hypervisor()
    attached = await vm_a.hv.attach_all()

    assert [(i.name, i.pid, i.state) for i in attached] == [("vm-a", vm_a.pid, RunState.RUNNING)]
    assert await vm_a.hv.state("vm-a") is RunState.RUNNING
    assert not (ghost / "qemu.pid").exists() and not (ghost / "qmp.sock").exists()


async def test_an_acpi_shutdown_ends_in_stopped_and_returns_true(vm_a: BootedVm) -> None:
    hv = vm_a.hv
    assert await hv.shutdown("vm-a", 60) is True
    events = await next_event(hv, EventKind.STOPPED)
    assert [e.kind for e in events][-2:] == [EventKind.GUEST_SHUTDOWN, EventKind.STOPPED]
    assert events[-2].detail["requested"] is True  # our press, not the guest's own decision
    assert await hv.state("vm-a") is RunState.STOPPED
    assert not pid_alive(vm_a.pid)
    assert hv.instances() == []
    run = vm_a.guests.run_dir / "vm-a"
    assert sorted(p.name for p in run.iterdir()) == ["console.log", "qemu.log"]
    with pytest.raises(InvalidState):
        await hv.pause("vm-a")


# --- short-lived guests ---------------------------------------------------------------------------

AGENT_SCRIPT = """
import asyncio, sys
from pathlib import Path
from aecp.compute.hypervisor import DiskSpec, InstanceSpec
from aecp.compute.qemu.driver import QemuHypervisor

async def main():
    hv = QemuHypervisor(Path(sys.argv[1]))
    disk = DiskSpec(sys.argv[2], boot=True)
    info = await hv.start(InstanceSpec("vm-o", sys.argv[3], 1, 160, (disk,)))
    await hv.close()
    print(info.pid)

asyncio.run(main())
"""


async def test_a_vm_outlives_the_agent_process_that_started_it_and_is_reattached(
    image: Path,
) -> None:
    async with guests() as g:
        disk = overlay(g.base, "vm-o")
        agent = await asyncio.to_thread(
            subprocess.run,
            [sys.executable, "-c", AGENT_SCRIPT, str(g.run_dir), str(disk), str(uuid.uuid4())],
            capture_output=True,
            text=True,
            check=True,
        )
        pid = int(agent.stdout.strip())
        g.pids.add(pid)
        assert pid_alive(pid)  # the agent is gone, QEMU is not

        hv = g.hypervisor()
        assert [(i.name, i.pid) for i in await hv.attach_all()] == [("vm-o", pid)]
        await hv.poweroff("vm-o")  # not our child: its exit is seen by polling the pid

        assert not pid_alive(pid)
        assert (await next_event(hv, EventKind.STOPPED))[-1].name == "vm-o"


async def test_poweroff_stops_qemu_keeps_the_logs_and_is_idempotent(image: Path) -> None:
    async with guests() as g:
        port = free_port("127.0.41.1")
        nic = NicSpec("52:54:00:41:00:01", (PortForward("127.0.41.1", port, 80),))
        hv = g.hypervisor()
        info = await hv.start(make_spec("vm-p", str(overlay(g.base, "vm-p")), (nic,)))
        g.pids.add(info.pid)
        with socket.create_connection(("127.0.41.1", port), timeout=5):
            pass  # QEMU listens on the forwarded host port

        await hv.poweroff("vm-p")

        assert not pid_alive(info.pid)
        assert await hv.state("vm-p") is RunState.STOPPED
        run = g.run_dir / "vm-p"
        assert sorted(p.name for p in run.iterdir()) == ["console.log", "qemu.log"]
        await hv.poweroff("vm-p")


async def test_a_vm_with_the_longest_name_starts_under_a_deep_run_dir_and_its_files_go(
    image: Path,
) -> None:
    """Regression: the unix socket paths grew with the VM name and broke the 107-byte limit;
    and a deleted VM's run directory and console log stayed behind."""
    async with guests(prefix="aecp-q-" + "deep-" * 8) as g:
        name = "r" * 57
        hv = g.hypervisor()
        info = await hv.start(make_spec(name, str(overlay(g.base, "vm-r"))))
        g.pids.add(info.pid)
        assert len(str(g.run_dir / name / "console.sock")) > 107  # where it used to be
        with pytest.raises(InvalidState):
            await hv.remove_files(name)
        await hv.poweroff(name)
        assert (g.run_dir / name / "console.log").exists()

        await hv.remove_files(name)

        assert not (g.run_dir / name).exists()
        assert list((g.run_dir / ".sock").iterdir()) == []
        await hv.remove_files(name)  # idempotent


async def test_killing_qemu_from_outside_yields_a_stopped_event(image: Path) -> None:
    async with guests() as g:
        hv = g.hypervisor()
        info = await hv.start(make_spec("vm-k", str(overlay(g.base, "vm-k"))))
        g.pids.add(info.pid)
        await next_event(hv, EventKind.STARTED)

        os.kill(info.pid, signal.SIGKILL)

        stopped = (await next_event(hv, EventKind.STOPPED))[-1]
        assert stopped.name == "vm-k"
        assert stopped.detail["exit_code"] == -signal.SIGKILL
        assert await hv.state("vm-k") is RunState.STOPPED
        assert not (g.run_dir / "vm-k" / "qemu.pid").exists()


async def test_a_launch_with_a_bad_disk_path_raises_launch_error_with_qemus_message() -> None:
    async with guests() as g:
        hv = g.hypervisor()
        missing = str(g.base / "no-such-disk.qcow2")
        with pytest.raises(LaunchError) as caught:
            await hv.start(make_spec("vm-bad", missing))
        err = caught.value
        assert err.fields["exit_code"] == 1
        assert "no-such-disk.qcow2" in err.fields["output"]
        assert "No such file or directory" in err.fields["output"]
        assert missing in " ".join(err.argv)
        run = g.run_dir / "vm-bad"
        assert sorted(p.name for p in run.iterdir()) == ["console.log", "qemu.log"]
        assert hv.instances() == []


async def test_the_kvm_probe_decides_tcg_on_this_machine_and_caches_it(
    image: Path, tmp_path: Path
) -> None:
    cache = tmp_path / "accel.json"
    accel = await asyncio.to_thread(probe_accel, cache, probe_image=image, timeout=10)
    assert accel is Accel.TCG
    assert '"accel": "tcg"' in cache.read_text()
    assert await asyncio.to_thread(probe_accel, cache, probe_image=None) is Accel.TCG


async def test_without_a_probe_image_the_decision_is_tcg(tmp_path: Path) -> None:
    cache = tmp_path / "accel.json"
    assert await asyncio.to_thread(probe_accel, cache, probe_image=None) is Accel.TCG
    assert not cache.exists()


async def test_a_shutdown_requested_while_the_guest_still_boots_ends_cleanly(image: Path) -> None:
    # Regression: a single ACPI press sent before the guest's acpid runs was lost, and the VM
    # was powered off hard after the timeout. The driver presses again until the guest listens.
    async with guests() as g:
        hv = g.hypervisor()
        info = await hv.start(make_spec("vm-early", str(overlay(g.base, "vm-early"))))
        g.pids.add(info.pid)
        assert await hv.shutdown("vm-early", timeout=60) is True
        assert not pid_alive(info.pid)
        assert "AECP-POWEROFF" in info.console_log.read_text(errors="replace")


async def test_a_power_off_answering_our_acpi_press_stays_ours_after_the_agent_restarts(
    image: Path,
) -> None:
    """Review finding: "our own press" lived only in the driver's memory; an agent restarted
    during an ACPI shutdown reported the power-off as the guest's own decision, which the
    reconciler then recorded over a start sent meanwhile."""
    async with guests() as g:
        hv = g.hypervisor()
        info = await hv.start(make_spec("vm-acpi", str(overlay(g.base, "vm-acpi"))))
        g.pids.add(info.pid)
        await wait_console(info.console_log, PROMPT)
        await hv.pause("vm-acpi")  # the guest acts on the press only once resumed
        marker = g.run_dir / "vm-acpi" / "acpi-pressed"
        press = asyncio.create_task(hv.shutdown("vm-acpi", 60))
        async with asyncio.timeout(EVENT_TIMEOUT):
            while not marker.exists():  # noqa: ASYNC110 - a file the driver writes
                await asyncio.sleep(0.05)
        await hv.state("vm-acpi")  # answered after the press queued before it
        press.cancel()  # the agent goes away in the middle of the shutdown
        with contextlib.suppress(asyncio.CancelledError):
            await press
        await hv.close()

        hv = g.hypervisor()
        assert [i.name for i in await hv.attach_all()] == ["vm-acpi"]
        await hv.resume("vm-acpi")
        events = await next_event(hv, EventKind.STOPPED)

        [powered_off] = [e for e in events if e.kind is EventKind.GUEST_SHUTDOWN]
        assert powered_off.detail["requested"] is True
        assert not pid_alive(info.pid)
        assert not marker.exists()
