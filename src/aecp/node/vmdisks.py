"""VM disks on ABS: a VM's boot disk is a volume ``<vm>-boot`` filled from its image, each data
disk a blank volume ``<vm>-dataN``; QEMU reads them over NBD from this node's storage server,
on its Unix socket (only root can open it; outside clients go through TLS exports).

Ordering: create the volume, copy the image into it through this node's NBD export, and only
then report the disks ready (``VMStatus.disks_ready``) — a crash in between leaves a volume that
the next attempt overwrites from the image again, never a VM booting a half-copied disk. Once
ready, later starts use the volumes as they are.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from pathlib import Path
from typing import Protocol

from aecp.common.errors import AlreadyExists, InvalidState, NotFound
from aecp.common.proc import arun
from aecp.compute.hypervisor import DiskSpec
from aecp.model.vm import VMSpec, boot_volume, data_volume
from aecp.storage.meta.model import MIB
from aecp.storage.meta.service import MetaService
from aecp.storage.pool import ReplicaPool

log = logging.getLogger(__name__)
DETACH_WAIT = 15.0  # s for the storage server to release a volume after QEMU closed it


def local_uri(socket: Path, volume: str) -> str:
    """The URI of ``volume`` on a node's local NBD socket (QEMU, qemu-img, libnbd tools)."""
    return f"nbd+unix:///{volume}?socket={socket}"


class DiskProvider(Protocol):
    """Where a VM's disks come from (ABS volumes in the product; a local double in tests)."""

    async def prepare(
        self, spec: VMSpec, image: Path, image_format: str, virtual_size: int
    ) -> tuple[DiskSpec, ...]: ...

    def disks(self, spec: VMSpec) -> tuple[DiskSpec, ...]: ...

    async def released(self, spec: VMSpec) -> None: ...

    async def remove(self, spec: VMSpec) -> None: ...


class VMDisks:
    """Creates, fills and removes the volumes of the VMs of one node."""

    def __init__(self, meta: MetaService, pool: ReplicaPool, nbd_socket: Path):
        self.meta = meta
        self.pool = pool
        self.nbd_socket = nbd_socket

    def uri(self, volume: str) -> str:
        return local_uri(self.nbd_socket, volume)

    def disks(self, spec: VMSpec) -> tuple[DiskSpec, ...]:
        boot = DiskSpec(
            path=self.uri(boot_volume(spec.name)), format="raw", boot=True, cache="none"
        )
        data = [
            DiskSpec(path=self.uri(data_volume(spec.name, i)), format="raw", cache="none")
            for i in range(1, len(spec.data_disks_mib) + 1)
        ]
        return (boot, *data)

    async def prepare(
        self, spec: VMSpec, image: Path, image_format: str, virtual_size: int
    ) -> tuple[DiskSpec, ...]:
        """Create and fill the VM's volumes (idempotent: existing ones are reused, the boot
        volume is filled again from the image)."""
        if spec.disks_prepared:  # cloned from a template or a VM: nothing to copy
            for name in spec.volumes():
                await self.meta.volume(name)
            return self.disks(spec)
        size = -(-virtual_size // 512) * 512
        await self._ensure(boot_volume(spec.name), size)
        await arun(
            [
                "qemu-img",
                "convert",
                "-n",
                "-f",
                image_format,
                "-O",
                "raw",
                "-t",
                "none",
                str(image),
                self.uri(boot_volume(spec.name)),
            ],
            timeout=1800,
        )
        for i, mib in enumerate(spec.data_disks_mib, start=1):
            await self._ensure(data_volume(spec.name, i), mib * MIB)
        log.info(
            "vm %s: boot volume filled from %s; %d data volumes ready",
            spec.name,
            image.name,
            len(spec.data_disks_mib),
        )
        return self.disks(spec)

    async def _ensure(self, name: str, size: int) -> None:
        with contextlib.suppress(AlreadyExists):
            await self.meta.create_volume(name, size)

    async def released(self, spec: VMSpec) -> None:
        """Return once the storage server has detached every volume of the stopped VM (so a
        stopped VM's disks can be rolled back, cloned or deleted at once)."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + DETACH_WAIT
        for name in spec.volumes():
            while await self.meta.attachment(name) is not None and loop.time() < deadline:  # noqa: ASYNC110 - polls etcd
                await asyncio.sleep(0.1)

    async def remove(self, spec: VMSpec) -> None:
        """Delete the VM's volumes and their replicas. Waits for the storage server to release
        them after QEMU has exited."""
        for name in spec.volumes():
            await self._delete(name)

    async def _delete(self, name: str) -> None:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + DETACH_WAIT
        while True:
            try:
                freed = await self.meta.delete_volume(name)
                break
            except NotFound:
                return
            except InvalidState:
                if loop.time() > deadline:
                    raise
                await asyncio.sleep(0.2)
        await self.pool.delete_replicas(freed)
