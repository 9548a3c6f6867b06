"""Pure QEMU command-line builder: ``InstanceSpec`` + runtime paths → argv list.

Nothing here touches the system. Values are escaped for QEMU's ``key=value,...`` option
syntax (a literal comma is written ``,,``); nothing else is validated — choosing values is the
caller's job.

Device naming (relied upon by block/migration code): disk *i* is the block node or drive
``disk<i>`` attached to the virtio-blk device ``virtio-disk<i>``; NIC *i* is netdev ``net<i>``
on the virtio-net device ``nic<i>``; the serial console is chardev ``console0``.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass, replace
from pathlib import Path

from aecp.compute.hypervisor import Accel, DiskSpec, InstanceSpec, NicSpec

# cache mode → (cache.direct, cache.no-flush, device write-cache) for -blockdev local files.
_CACHE_MODES: dict[str, tuple[str, str, str]] = {
    "writeback": ("off", "off", "on"),
    "none": ("on", "off", "on"),
    "unsafe": ("off", "on", "on"),
    "writethrough": ("off", "off", "off"),
    "directsync": ("on", "off", "off"),
}


SOCKET_DIR = ".sock"  # under the run dir; no VM can have this name (names start alphanumeric)


@dataclass(frozen=True)
class RuntimePaths:
    """Where one instance keeps its runtime files (all inside ``run_dir``)."""

    run_dir: Path
    pidfile: Path
    qmp_socket: Path
    console_socket: Path
    console_log: Path
    qemu_log: Path
    acpi_pressed: Path  # exists while a power-off would answer our ACPI press

    @classmethod
    def for_instance(cls, base: Path, name: str) -> RuntimePaths:
        """The standard layout: ``base/<name>/`` holding ``qemu.pid``, ``console.log``,
        ``qemu.log`` and ``acpi-pressed``; the unix sockets in ``base/.sock/`` as ``<id>.qmp`` and
        ``<id>.console``, ``<id>`` a short digest of the name: a unix socket path has at most
        107 bytes, so its length must not grow with the VM's name."""
        d = base / name
        sockets = base / SOCKET_DIR
        sid = hashlib.sha256(name.encode()).hexdigest()[:16]
        return cls(
            run_dir=d,
            pidfile=d / "qemu.pid",
            qmp_socket=sockets / f"{sid}.qmp",
            console_socket=sockets / f"{sid}.console",
            console_log=d / "console.log",
            qemu_log=d / "qemu.log",
            acpi_pressed=d / "acpi-pressed",
        )

    @classmethod
    def before_sockets_moved(cls, base: Path, name: str) -> RuntimePaths:
        """The layout of instances started by an older agent: sockets in ``base/<name>/``."""
        d = base / name
        return replace(
            cls.for_instance(base, name),
            qmp_socket=d / "qmp.sock",
            console_socket=d / "console.sock",
        )

    def sockets(self) -> tuple[Path, Path]:
        return (self.qmp_socket, self.console_socket)

    def transient(self) -> tuple[Path, ...]:
        """The files removed after the instance stops (the logs are kept)."""
        return (self.pidfile, self.qmp_socket, self.console_socket, self.acpi_pressed)


def longest_socket(base: Path) -> Path:
    """The longest unix socket path of any instance under run dir ``base`` (the same for every
    VM name: check it once, at start-up)."""
    return max(RuntimePaths.for_instance(base, "x").sockets(), key=lambda p: len(os.fsencode(p)))


def escape(value: object) -> str:
    """``value`` as one QEMU option value: every ``,`` doubled."""
    return str(value).replace(",", ",,")


def name_option(name: str) -> str:
    """The ``-name`` value; ``attach_all`` recognises a VM's process by it in /proc cmdline."""
    return f"guest={escape(name)},debug-threads=on"


def build_argv(
    spec: InstanceSpec, paths: RuntimePaths, qemu_binary: str = "qemu-system-x86_64"
) -> list[str]:
    """The full argv launching ``spec``: machine, QMP, serial console, disks, NICs, SMBIOS.

    The VM does not power off QEMU when the guest shuts down (``-no-shutdown``): the driver
    observes the SHUTDOWN event and quits QEMU itself (or resets it, for a reboot).
    """
    return [
        qemu_binary,
        *_machine_args(spec),
        *_runtime_args(paths),
        *(arg for i, disk in enumerate(spec.disks) for arg in disk_args(i, disk)),
        *(arg for i, nic in enumerate(spec.nics) for arg in nic_args(i, nic)),
        "-smbios",
        f"type=1,manufacturer=AECP,product={escape(spec.name)},serial={escape(spec.uuid)}",
    ]


def _machine_args(spec: InstanceSpec) -> list[str]:
    cpu = "host" if spec.accel is Accel.KVM else "max"
    return [
        "-name", name_option(spec.name),
        "-uuid", spec.uuid,
        "-machine", f"q35,accel={spec.accel.value}",
        "-cpu", cpu,
        "-smp", str(spec.vcpus),
        "-m", str(spec.memory_mib),
        "-nodefaults",
        "-no-user-config",
        "-display", "none",
        "-no-shutdown",
    ]  # fmt: skip


def _runtime_args(paths: RuntimePaths) -> list[str]:
    chardev = (
        f"socket,id=console0,path={escape(paths.console_socket)},server=on,wait=off,"
        f"logfile={escape(paths.console_log)},logappend=on"
    )
    return [
        "-pidfile", str(paths.pidfile),
        "-qmp", f"unix:{escape(paths.qmp_socket)},server=on,wait=off",
        "-chardev", chardev,
        "-serial", "chardev:console0",
    ]  # fmt: skip


def disk_args(index: int, disk: DiskSpec) -> list[str]:
    """``-blockdev`` (local file) or ``-drive`` (an ``nbd://`` or ``nbd+unix://`` URI) plus the
    virtio-blk device.

    The boot disk gets ``bootindex=1``. An NBD disk is opened with ``disk.format`` as given
    (normally ``raw``: the export is the guest disk itself).
    """
    node = f"disk{index}"
    direct, no_flush, write_cache = _CACHE_MODES.get(disk.cache, _CACHE_MODES["writeback"])
    if disk.path.startswith(("nbd://", "nbd+unix://")):
        backend = [
            "-drive",
            f"file={escape(disk.path)},format={escape(disk.format)},if=none,id={node},"
            f"cache={escape(disk.cache)}",
        ]
        write_cache = "auto"  # the -drive cache= mode decides the device's write cache
    else:
        backend = [
            "-blockdev",
            f"driver=file,node-name={node}-file,filename={escape(disk.path)},"
            f"cache.direct={direct},cache.no-flush={no_flush}",
            "-blockdev",
            f"driver={escape(disk.format)},node-name={node},file={node}-file,"
            f"cache.direct={direct},cache.no-flush={no_flush}",
        ]
    device = f"virtio-blk-pci,drive={node},id=virtio-{node},write-cache={write_cache}"
    if disk.boot:
        device += ",bootindex=1"
    return [*backend, "-device", device]


def nic_args(index: int, nic: NicSpec) -> list[str]:
    """A virtio-net device on the NIC's tap interface (``nic.tap``, no scripts: it is bridged
    already), or on user-mode networking with the NIC's TCP host forwards."""
    if nic.tap:
        netdev = f"tap,id=net{index},ifname={escape(nic.tap)},script=no,downscript=no"
    else:
        netdev = f"user,id=net{index}"
        for fwd in nic.forwards:
            netdev += f",hostfwd=tcp:{escape(fwd.host_address)}:{fwd.host_port}-:{fwd.guest_port}"
    device = f"virtio-net-pci,netdev=net{index},mac={escape(nic.mac)},id=nic{index}"
    return ["-netdev", netdev, "-device", device]
