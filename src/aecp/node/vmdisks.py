"""VM disks on ABS: a VM's boot disk is a volume ``<vm>-boot`` filled from its image, each data
disk a blank volume ``<vm>-dataN``; QEMU reads them over NBD from this node's storage server,
on its Unix socket (only root can open it; outside clients go through TLS exports).

Ownership: every volume of a VM records the VM (name and uuid) as its owner, from the moment it
is created (here, or as a clone by the API). A VM only uses, fills or deletes volumes it owns: a
volume of the same name that belongs to anyone else (or to nobody) is never overwritten or
deleted, and a start that meets one fails saying so.

Ordering: create the volume, copy the image into it through this node's NBD export, and only
then report the disks ready (``VMStatus.disks_ready``) — a crash in between leaves a volume that
the next attempt overwrites from the image again, never a VM booting a half-copied disk. Once
ready, later starts use the volumes as they are (``reuse``): a volume without an owner there,
made for the VM before volumes recorded owners, is then stamped as the VM's, once.
"""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path
from typing import Protocol

from aecp.common.errors import AlreadyExists, InvalidInput, InvalidState, NotFound
from aecp.common.proc import arun
from aecp.compute.hypervisor import DiskSpec
from aecp.model.vm import VMSpec, boot_volume, data_volume
from aecp.storage.meta.model import MIB, VolumeOwner
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

    async def reuse(self, spec: VMSpec) -> tuple[DiskSpec, ...]:
        """The disks of a VM whose volumes were prepared before (``disks_ready``), checked
        to be its own; ``InvalidState`` naming one that is not (or is missing)."""
        ...

    async def released(self, spec: VMSpec) -> None: ...

    async def remove(self, spec: VMSpec) -> list[str]:
        """Delete the VM's disks it owns; returns the names of those left alone."""
        ...


def owner(spec: VMSpec) -> VolumeOwner:
    """The owner recorded on ``spec``'s VM's volumes."""
    return VolumeOwner.vm(spec.name, spec.uuid)


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
        """Create and fill the VM's volumes (idempotent: the VM's own existing volumes are
        reused, the boot volume is filled again from the image). ``InvalidState`` naming a
        volume of that name that the VM does not own: it is left as it is."""
        if spec.disks_prepared:  # cloned from a template or a VM: nothing to copy
            for name in spec.volumes():
                self._require_own(spec, (await self.meta.volume(name))[0].owner, name)
            return self.disks(spec)
        size = -(-virtual_size // 512) * 512
        await self._ensure(spec, boot_volume(spec.name), size)
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
            await self._ensure(spec, data_volume(spec.name, i), mib * MIB)
        log.info(
            "vm %s: boot volume filled from %s; %d data volumes ready",
            spec.name,
            image.name,
            len(spec.data_disks_mib),
        )
        return self.disks(spec)

    async def reuse(self, spec: VMSpec) -> tuple[DiskSpec, ...]:
        """The disks of a VM whose status says its volumes are ready: each must be the VM's
        own. One without an owner is a disk this VM made before volumes recorded owners (the
        status says this VM prepared it, and its name is derived from the VM's, which no one
        else could take while the VM exists): it is given to the VM by compare-and-swap, once.
        ``InvalidState`` naming a volume that belongs to anyone else, or that is missing."""
        for name in spec.volumes():
            try:
                vol, _ = await self.meta.volume(name)
            except NotFound:
                raise InvalidState(
                    f"volume {name} of VM {spec.name} no longer exists: the VM cannot start "
                    "without it",
                    volume=name,
                ) from None
            if vol.owner is None:
                await self.meta.adopt_volume(name, owner(spec))
                log.info(
                    "vm %s: volume %s had no owner (made before owners): now the VM's",
                    spec.name,
                    name,
                )
            else:
                self._require_own(spec, vol.owner, name)
        return self.disks(spec)

    async def _ensure(self, spec: VMSpec, name: str, size: int) -> None:
        """Create volume ``name`` as the VM's, or find it is already the VM's own."""
        try:
            await self.meta.create_volume(name, size, owner=owner(spec))
        except AlreadyExists:
            self._require_own(spec, (await self.meta.volume(name))[0].owner, name)

    @staticmethod
    def _require_own(spec: VMSpec, found: VolumeOwner | None, name: str) -> None:
        if found != owner(spec):
            raise InvalidState(
                f"volume {name} belongs to {found or 'nobody (a standalone volume)'}, not to "
                f"this VM: VM {spec.name} will not use it",
                volume=name,
            )

    async def released(self, spec: VMSpec) -> None:
        """Return once the storage server has detached every volume of the stopped VM (so a
        stopped VM's disks can be rolled back, cloned or deleted at once)."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + DETACH_WAIT
        for name in spec.volumes():
            while await self.meta.attachment(name) is not None and loop.time() < deadline:  # noqa: ASYNC110 - polls etcd
                await asyncio.sleep(0.1)

    async def remove(self, spec: VMSpec) -> list[str]:
        """Delete the volumes the VM owns and their replicas; returns the names of its
        volumes' namesakes left alone (they belong to someone else, or to nobody: a volume
        made before volumes recorded owners is kept, never guessed to be the VM's). Waits for
        the storage server to release them after QEMU has exited."""
        kept = []
        for name in spec.volumes():
            if not await self._delete(spec, name):
                kept.append(name)
        if kept:
            log.warning("vm %s: volumes not its own left alone: %s", spec.name, ", ".join(kept))
        return kept

    async def _delete(self, spec: VMSpec, name: str) -> bool:
        """Delete volume ``name`` if the VM owns it; False if it exists and is not the VM's."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + DETACH_WAIT
        while True:
            try:
                vol, _ = await self.meta.volume(name)
                if vol.owner != owner(spec):
                    return False
                freed = await self.meta.delete_volume(name, owner(spec))
                break
            except (NotFound, InvalidInput):  # gone, or a name no volume can have
                return True
            except InvalidState:  # only an attachment goes away by waiting (not snapshots)
                if loop.time() > deadline or await self.meta.attachment(name) is None:
                    raise
                await asyncio.sleep(0.2)
        await self.pool.delete_replicas(freed)
        return True
