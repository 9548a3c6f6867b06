"""Local VM disks (until ABS volumes replace them): a qcow2 overlay on the image for the boot
disk, and blank qcow2 files for data disks, in ``<vm_dir>/<vm>/``."""

from __future__ import annotations

import shutil
from pathlib import Path

from aecp.common.proc import run
from aecp.compute.hypervisor import DiskSpec


def boot_disk(vm_dir: Path, vm: str) -> Path:
    return vm_dir / vm / "disk0.qcow2"


def prepare(
    vm_dir: Path, vm: str, image: Path, image_format: str, data_disks_mib: list[int]
) -> tuple[DiskSpec, ...]:
    """Create the VM's disks if they do not exist yet; returns them boot disk first.

    Idempotent: existing disks (a VM started before) are kept as they are. Blocking.
    """
    d = vm_dir / vm
    d.mkdir(parents=True, exist_ok=True)
    boot = boot_disk(vm_dir, vm)
    if not boot.exists():
        tmp = boot.with_suffix(".tmp")
        run(
            [
                "qemu-img",
                "create",
                "-q",
                "-f",
                "qcow2",
                "-F",
                image_format,
                "-b",
                str(image.resolve()),
                str(tmp),
            ]
        )
        tmp.rename(boot)
    disks = [DiskSpec(path=str(boot), format="qcow2", boot=True)]
    for i, size in enumerate(data_disks_mib, start=1):
        p = d / f"disk{i}.qcow2"
        if not p.exists():
            tmp = p.with_suffix(".tmp")
            run(["qemu-img", "create", "-q", "-f", "qcow2", str(tmp), f"{size}M"])
            tmp.rename(p)
        disks.append(DiskSpec(path=str(p), format="qcow2"))
    return tuple(disks)


def remove(vm_dir: Path, vm: str) -> None:
    """Delete every disk of the VM. Idempotent."""
    shutil.rmtree(vm_dir / vm, ignore_errors=True)
