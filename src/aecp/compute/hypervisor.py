"""The hypervisor contract (modelled on Nova's ComputeDriver).

A hypervisor runs *instances*: one QEMU process per VM on this node. Instances outlive the agent
that started them: a new ``Hypervisor`` object over the same ``run_dir`` re-attaches to every
instance still running (``attach_all``).

Per-instance runtime files live in ``run_dir/<name>/``: ``qemu.pid``, ``console.log``
(everything the serial console printed, appended across boots), ``qemu.log`` (QEMU's own
stderr); its unix sockets (QMP, and the serial console, ``InstanceInfo.console_socket``) live
where the driver says, under ``run_dir``, at a path whose length does not grow with the VM's
name. The logs outlive the process; ``remove_files`` deletes them with the directory when the VM
is deleted.

Error contract: a failed launch raises ``LaunchError`` (exit code, argv, output) after cleaning up;
a command on an instance that is not running raises ``InvalidState``; any other failure of QEMU
raises ``HypervisorError``.
"""

from __future__ import annotations

import enum
from abc import ABC, abstractmethod
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path


class Accel(enum.StrEnum):
    KVM = "kvm"
    TCG = "tcg"


class RunState(enum.StrEnum):
    """What an instance is doing, as QEMU reports it."""

    RUNNING = "running"
    PAUSED = "paused"  # stopped by us (suspend)
    SHUTDOWN = "shutdown"  # the guest powered off; the QEMU process still exists
    STOPPED = "stopped"  # no QEMU process
    CRASHED = "crashed"  # guest panicked or QEMU reported an internal error


@dataclass(frozen=True)
class DiskSpec:
    """A disk attached as virtio-blk. ``path`` is a local file or an NBD URI (``nbd://``,
    ``nbd+unix://``)."""

    path: str
    format: str = "qcow2"  # "qcow2" | "raw"
    boot: bool = False
    cache: str = "writeback"


@dataclass(frozen=True)
class PortForward:
    """Host ``address:port`` → guest TCP ``guest_port`` (QEMU user networking)."""

    host_address: str
    host_port: int
    guest_port: int


@dataclass(frozen=True)
class NicSpec:
    """A virtio-net NIC: on QEMU user networking with ``forwards`` (``tap`` empty), or on the
    existing tap interface ``tap`` (made and bridged before the launch; QEMU runs no script)."""

    mac: str
    forwards: tuple[PortForward, ...] = ()
    tap: str = ""


@dataclass(frozen=True)
class InstanceSpec:
    """Everything the driver needs to launch one VM. ``name`` is the VM's name (its identity on
    this node); ``uuid`` is exposed to the guest through SMBIOS together with the name."""

    name: str
    uuid: str
    vcpus: int
    memory_mib: int
    disks: tuple[DiskSpec, ...]
    nics: tuple[NicSpec, ...] = ()
    accel: Accel = Accel.TCG


@dataclass(frozen=True)
class InstanceInfo:
    """A running (or lingering) instance as observed now."""

    name: str
    pid: int
    state: RunState
    console_log: Path
    console_socket: Path


@dataclass(frozen=True)
class MigrationParams:
    """How a live migration may run: its bandwidth cap and the longest pause QEMU may plan
    for its last pass."""

    max_bandwidth: int  # bytes/s
    downtime_limit_ms: int


@dataclass(frozen=True)
class MigrationStatus:
    """A migration as QEMU reports it (``query-migrate``). ``status`` is QEMU's: ``none``,
    ``setup``, ``active``, ``pre-switchover`` (paused before the switch-over, waiting for
    ``migrate_continue``), ``device``, ``completed``, ``failed``, ``cancelling``,
    ``cancelled``."""

    status: str
    ram_total: int = 0
    ram_transferred: int = 0
    ram_remaining: int = 0
    passes: int = 0  # dirty-sync passes over guest memory
    dirty_rate: int = 0  # pages/s
    expected_downtime_ms: int = 0
    downtime_ms: int | None = None  # known once completed
    total_time_ms: int | None = None
    setup_time_ms: int | None = None
    error: str = ""

    @property
    def ended(self) -> bool:
        return self.status in ("completed", "failed", "cancelled", "none")


class EventKind(enum.StrEnum):
    STARTED = "started"
    PAUSED = "paused"
    RESUMED = "resumed"
    RESET = "reset"
    # the guest powered itself off; detail "requested" is True when it did so in answer to
    # ``shutdown`` or ``reboot`` (our ACPI press, also one pressed before a re-attach), not by
    # its own decision
    GUEST_SHUTDOWN = "guest-shutdown"
    STOPPED = "stopped"  # the QEMU process is gone (after any cause)
    CRASHED = "crashed"


@dataclass(frozen=True)
class InstanceEvent:
    name: str
    kind: EventKind
    detail: dict[str, object] = field(default_factory=dict)


class Hypervisor(ABC):
    """Launches, observes and powers QEMU instances on this node."""

    run_dir: Path

    @abstractmethod
    async def start(self, spec: InstanceSpec) -> InstanceInfo:
        """Launch the instance and return once QMP is connected and the guest is running.

        Post-condition: ``run_dir/<name>/qemu.pid`` names the live process. On failure every
        runtime file except the logs is removed and ``LaunchError`` is raised.
        Raises ``InvalidState`` if an instance of that name is already running.
        """

    @abstractmethod
    async def attach_all(self) -> list[InstanceInfo]:
        """Re-attach to every instance whose pidfile names a live QEMU process (after an agent
        restart); remove the runtime files of dead ones. Returns the attached instances."""

    @abstractmethod
    def instances(self) -> list[InstanceInfo]:
        """Instances this object currently tracks (started or attached), with their state."""

    @abstractmethod
    async def state(self, name: str) -> RunState:
        """The instance's state now (``STOPPED`` when there is no process)."""

    @abstractmethod
    async def shutdown(self, name: str, timeout: float) -> bool:
        """Press the ACPI power button and wait up to ``timeout`` s for the guest to power off.

        Returns True if the guest powered off by itself, False if it had to be powered off hard
        after the timeout. Post-condition either way: the process is gone (``STOPPED``).
        """

    @abstractmethod
    async def poweroff(self, name: str) -> None:
        """Stop the instance now (QMP ``quit``; SIGKILL if it does not exit within seconds).
        Post-condition: the process is gone and runtime files other than logs are removed.
        Idempotent: no error if it is already stopped."""

    @abstractmethod
    async def reboot(self, name: str, timeout: float) -> bool:
        """Clean reboot: ACPI power-off (up to ``timeout`` s), then reset and run again in the
        same QEMU process. Returns False if the guest did not power off in time and was reset
        hard. Post-condition: ``RUNNING``."""

    @abstractmethod
    async def pause(self, name: str) -> None:
        """Suspend (vCPUs stopped, memory kept). Post-condition: ``PAUSED``."""

    @abstractmethod
    async def resume(self, name: str) -> None:
        """Resume a paused instance. Post-condition: ``RUNNING``."""

    @abstractmethod
    async def remove_files(self, name: str) -> None:
        """Delete everything the instance left on this node (``run_dir/<name>/`` with its
        logs): its VM is being deleted. ``InvalidState`` if it is running. Idempotent."""

    # --- live migration (the source runs ``migrate``, the destination ``start_incoming``) ---

    @abstractmethod
    async def start_incoming(self, spec: InstanceSpec, listen: str) -> InstanceInfo:
        """Launch the instance waiting for a migration (``-incoming defer``), then listen on
        ``listen`` (``tcp:<address>:<port>``). Its disks are opened but not used until the
        migration completes; then the guest runs here (``RUNNING``, a RESUMED event).
        ``LaunchError`` as for ``start``."""

    @abstractmethod
    async def migrate(self, name: str, uri: str, params: MigrationParams) -> None:
        """Start migrating the running instance to ``uri``, pausing before the switch-over
        (status ``pre-switchover``) until ``migrate_continue``. ``InvalidState`` if it is not
        running."""

    @abstractmethod
    async def migration(self, name: str) -> MigrationStatus:
        """The instance's migration now (``none`` if none ever ran)."""

    @abstractmethod
    async def migrate_continue(self, name: str) -> None:
        """Go on from ``pre-switchover``: the rest of the state goes to the destination."""

    @abstractmethod
    async def migrate_cancel(self, name: str) -> None:
        """Cancel the migration: the instance goes on running here (resumed if the migration
        had paused it). Idempotent."""

    @abstractmethod
    def events(self) -> AsyncIterator[InstanceEvent]:
        """Every state change of every tracked instance, as it happens (one consumer)."""

    @abstractmethod
    async def close(self) -> None:
        """Disconnect from all instances WITHOUT stopping them (they outlive the agent)."""
