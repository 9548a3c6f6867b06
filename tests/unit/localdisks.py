"""A test double of ``node.vmdisks.DiskProvider``: qcow2 files in a directory, so reconciler
tests run without storage servers. (The product's VM disks are ABS volumes.)"""

from __future__ import annotations

import asyncio
import shutil
from pathlib import Path

from aecp.common.proc import run
from aecp.compute.hypervisor import DiskSpec
from aecp.model.vm import VMSpec


class LocalDisks:
    def __init__(self, root: Path) -> None:
        self.root = root

    async def prepare(
        self, spec: VMSpec, image: Path, image_format: str, virtual_size: int
    ) -> tuple[DiskSpec, ...]:
        return await asyncio.to_thread(self._prepare, spec, image, image_format)

    def _prepare(self, spec: VMSpec, image: Path, image_format: str) -> tuple[DiskSpec, ...]:
        d = self.root / spec.name
        d.mkdir(parents=True, exist_ok=True)
        boot = d / "disk0.qcow2"
        if not boot.exists():
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
                    str(boot),
                ]
            )
        disks = [DiskSpec(path=str(boot), format="qcow2", boot=True)]
        for i, size in enumerate(spec.data_disks_mib, start=1):
            p = d / f"disk{i}.qcow2"
            if not p.exists():
                run(["qemu-img", "create", "-q", "-f", "qcow2", str(p), f"{size}M"])
            disks.append(DiskSpec(path=str(p), format="qcow2"))
        return tuple(disks)

    async def remove(self, spec: VMSpec) -> list[str]:
        shutil.rmtree(self.root / spec.name, ignore_errors=True)
        return []

    def disks(self, spec: VMSpec) -> tuple[DiskSpec, ...]:
        d = self.root / spec.name
        boot = DiskSpec(path=str(d / "disk0.qcow2"), format="qcow2", boot=True)
        data = [
            DiskSpec(path=str(d / f"disk{i}.qcow2"), format="qcow2")
            for i in range(1, len(spec.data_disks_mib) + 1)
        ]
        return (boot, *data)

    async def reuse(self, spec: VMSpec) -> tuple[DiskSpec, ...]:
        return self.disks(spec)

    async def released(self, spec: VMSpec) -> None:
        return None
