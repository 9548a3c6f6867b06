"""The cluster's answer to ABS about volume owners (``storage.meta.owners.VolumeOwners``): VMs
and templates are the owners, and a name derived from a VM's (``x-boot``, ``x-data1``) is
reserved for VM ``x``'s own disks while that VM exists."""

from __future__ import annotations

from aecp.common.errors import AlreadyExists
from aecp.model.vm import VMSpec, vm_of_volume
from aecp.storage.meta.model import VolumeOwner
from aecp.store import keys
from aecp.store.base import Compare, Store


class ClusterOwners:
    """``VolumeOwners`` over the cluster store."""

    def __init__(self, store: Store) -> None:
        self.store = store

    async def alive(self, owner: VolumeOwner) -> tuple[bool, Compare]:
        key = keys.vm_spec(owner.name) if owner.kind == "vm" else keys.template(owner.name)
        kv = await self.store.get(key)
        if kv is None:
            return False, Compare.absent(key)
        same = owner.kind != "vm" or VMSpec.load(kv.value).uuid == owner.uid
        return same, Compare.unchanged(key, kv.mod_revision)

    async def reserve(self, volume: str, owner: VolumeOwner | None) -> list[Compare]:
        vm = vm_of_volume(volume)
        if vm is None or (owner is not None and owner.kind == "vm" and owner.name == vm):
            return []
        if await self.store.get(keys.vm_spec(vm)) is not None:
            raise AlreadyExists(
                f"volume name {volume} is reserved for the disks of VM {vm}; choose another name",
                field="name",
                volume=volume,
                vm=vm,
            )
        return [Compare.absent(keys.vm_spec(vm))]
