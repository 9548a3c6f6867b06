"""The QEMU argv builder, tested as text (it is a pure function)."""

from __future__ import annotations

import hashlib
from pathlib import Path

from aecp.compute.hypervisor import Accel, DiskSpec, InstanceSpec, NicSpec, PortForward
from aecp.compute.qemu.argv import RuntimePaths, build_argv, escape, name_option, nic_args

UUID = "0d4f3a52-8c1e-4f7a-9d6b-2a1c3e5f7b90"
PATHS = RuntimePaths.for_instance(Path("/run/aecp"), "vm-1")


def spec(**over: object) -> InstanceSpec:
    base: dict[str, object] = {
        "name": "vm-1",
        "uuid": UUID,
        "vcpus": 2,
        "memory_mib": 512,
        "disks": (DiskSpec("/var/lib/aecp/vm-1.qcow2", boot=True),),
    }
    base.update(over)
    return InstanceSpec(**base)  # type: ignore[arg-type]


def option(argv: list[str], flag: str) -> list[str]:
    """Every value given to ``flag``."""
    return [argv[i + 1] for i, a in enumerate(argv) if a == flag]


def test_the_machine_is_q35_with_tcg_and_cpu_max_by_default() -> None:
    argv = build_argv(spec(), PATHS)
    assert argv[0] == "qemu-system-x86_64"
    assert option(argv, "-machine") == ["q35,accel=tcg"]
    assert option(argv, "-cpu") == ["max"]
    assert option(argv, "-smp") == ["2"]
    assert option(argv, "-m") == ["512"]
    assert option(argv, "-uuid") == [UUID]


def test_kvm_uses_the_host_cpu() -> None:
    argv = build_argv(spec(accel=Accel.KVM), PATHS, qemu_binary="/opt/qemu/bin/qemu")
    assert argv[0] == "/opt/qemu/bin/qemu"
    assert option(argv, "-machine") == ["q35,accel=kvm"]
    assert option(argv, "-cpu") == ["host"]


def test_the_process_is_headless_and_survives_a_guest_power_off() -> None:
    argv = build_argv(spec(), PATHS)
    for flag in ("-nodefaults", "-no-user-config", "-no-shutdown"):
        assert flag in argv
    assert option(argv, "-display") == ["none"]
    assert option(argv, "-name") == ["guest=vm-1,debug-threads=on"]


def test_runtime_files_are_the_pidfile_qmp_socket_and_logged_serial_console() -> None:
    argv = build_argv(spec(), PATHS)
    sid = hashlib.sha256(b"vm-1").hexdigest()[:16]
    assert option(argv, "-pidfile") == ["/run/aecp/vm-1/qemu.pid"]
    assert option(argv, "-qmp") == [f"unix:/run/aecp/.sock/{sid}.qmp,server=on,wait=off"]
    assert option(argv, "-chardev") == [
        f"socket,id=console0,path=/run/aecp/.sock/{sid}.console,server=on,wait=off,"
        "logfile=/run/aecp/vm-1/console.log,logappend=on"
    ]
    assert option(argv, "-serial") == ["chardev:console0"]


def test_smbios_names_the_guest_with_its_vm_name_and_uuid() -> None:
    argv = build_argv(spec(), PATHS)
    assert option(argv, "-smbios") == [f"type=1,manufacturer=AECP,product=vm-1,serial={UUID}"]


def test_a_local_disk_is_a_file_node_under_a_format_node_on_virtio_blk() -> None:
    argv = build_argv(spec(), PATHS)
    assert option(argv, "-blockdev") == [
        "driver=file,node-name=disk0-file,filename=/var/lib/aecp/vm-1.qcow2,"
        "cache.direct=off,cache.no-flush=off",
        "driver=qcow2,node-name=disk0,file=disk0-file,cache.direct=off,cache.no-flush=off",
    ]
    assert option(argv, "-device")[0] == (
        "virtio-blk-pci,drive=disk0,id=virtio-disk0,write-cache=on,bootindex=1"
    )


def test_only_the_boot_disk_gets_a_bootindex_and_cache_modes_map_to_blockdev_options() -> None:
    disks = (
        DiskSpec("/d/root.qcow2", boot=True),
        DiskSpec("/d/data.raw", format="raw", cache="none"),
        DiskSpec("/d/scratch.raw", format="raw", cache="writethrough"),
    )
    argv = build_argv(spec(disks=disks), PATHS)
    blockdevs = option(argv, "-blockdev")
    assert "driver=raw,node-name=disk1,file=disk1-file,cache.direct=on,cache.no-flush=off" in (
        blockdevs
    )
    devices = [d for d in option(argv, "-device") if d.startswith("virtio-blk-pci")]
    assert [d.endswith("bootindex=1") for d in devices] == [True, False, False]
    assert devices[2] == "virtio-blk-pci,drive=disk2,id=virtio-disk2,write-cache=off"


def test_an_nbd_disk_is_a_drive_with_the_uri_as_its_file() -> None:
    nbd = DiskSpec("nbd://127.0.41.9:10809/vm-1", format="raw", boot=True)
    argv = build_argv(spec(disks=(nbd,)), PATHS)
    assert option(argv, "-blockdev") == []
    assert option(argv, "-drive") == [
        "file=nbd://127.0.41.9:10809/vm-1,format=raw,if=none,id=disk0,cache=writeback"
    ]
    assert option(argv, "-device")[0] == (
        "virtio-blk-pci,drive=disk0,id=virtio-disk0,write-cache=auto,bootindex=1"
    )


def test_each_nic_is_user_networking_with_its_host_forwards_on_virtio_net() -> None:
    nics = (
        NicSpec(
            "52:54:00:aa:bb:01",
            (PortForward("127.0.41.5", 10022, 22), PortForward("127.0.41.5", 10080, 80)),
        ),
        NicSpec("52:54:00:aa:bb:02"),
    )
    argv = build_argv(spec(nics=nics), PATHS)
    assert option(argv, "-netdev") == [
        "user,id=net0,hostfwd=tcp:127.0.41.5:10022-:22,hostfwd=tcp:127.0.41.5:10080-:80",
        "user,id=net1",
    ]
    assert option(argv, "-device")[1:] == [
        "virtio-net-pci,netdev=net0,mac=52:54:00:aa:bb:01,id=nic0",
        "virtio-net-pci,netdev=net1,mac=52:54:00:aa:bb:02,id=nic1",
    ]


def test_commas_in_values_are_doubled_as_qemu_requires() -> None:
    paths = RuntimePaths.for_instance(Path("/run/a,b"), "vm,x")
    argv = build_argv(spec(name="vm,x", disks=(DiskSpec("/d/a,b.qcow2", boot=True),)), paths)
    assert option(argv, "-name") == ["guest=vm,,x,debug-threads=on"]
    assert option(argv, "-smbios") == [f"type=1,manufacturer=AECP,product=vm,,x,serial={UUID}"]
    assert option(argv, "-qmp") == [f"unix:{escape(paths.qmp_socket)},server=on,wait=off"]
    assert option(argv, "-qmp")[0].startswith("unix:/run/a,,b/.sock/")
    assert option(argv, "-blockdev")[0].startswith(
        "driver=file,node-name=disk0-file,filename=/d/a,,b.qcow2,"
    )
    assert option(argv, "-pidfile") == ["/run/a,b/vm,x/qemu.pid"]  # a plain argument: as is


def test_escape_and_name_option_agree_with_what_attach_looks_for() -> None:
    assert escape("a,b,,c") == "a,,b,,,,c"
    assert name_option("vm,1") == "guest=vm,,1,debug-threads=on"
    assert name_option("vm,1") in build_argv(spec(name="vm,1"), PATHS)


def test_runtime_paths_keep_the_logs_out_of_the_transient_files() -> None:
    assert PATHS.run_dir == Path("/run/aecp/vm-1")
    assert set(PATHS.transient()) == {
        Path("/run/aecp/vm-1/qemu.pid"),
        PATHS.qmp_socket,
        PATHS.console_socket,
        Path("/run/aecp/vm-1/acpi-pressed"),
    }
    assert PATHS.console_log not in PATHS.transient()


def test_socket_paths_do_not_grow_with_the_vm_name() -> None:
    """A unix socket path has at most 107 bytes: a long VM name must not push it over."""
    short = RuntimePaths.for_instance(Path("/var/lib/aecp/run"), "a")
    longest = RuntimePaths.for_instance(Path("/var/lib/aecp/run"), "a" * 63)
    assert len(str(longest.qmp_socket)) == len(str(short.qmp_socket))
    assert len(str(longest.console_socket)) == len(str(short.console_socket))
    assert longest.qmp_socket != short.qmp_socket
    assert longest.console_log == Path("/var/lib/aecp/run") / ("a" * 63) / "console.log"


def test_a_tap_nic_becomes_a_tap_netdev_without_scripts() -> None:
    args = nic_args(1, NicSpec(mac="52:54:00:01:02:03", tap="vt0123abcdn1"))
    assert args == [
        "-netdev",
        "tap,id=net1,ifname=vt0123abcdn1,script=no,downscript=no",
        "-device",
        "virtio-net-pci,netdev=net1,mac=52:54:00:01:02:03,id=nic1",
    ]
