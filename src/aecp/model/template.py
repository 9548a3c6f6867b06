"""VM templates: frozen VM disks (volumes never attached) plus the shape of the VM."""

from __future__ import annotations

from aecp.model.base import Stored


class TemplateRecord(Stored):
    """``/aecp/templates/<name>``. ``volumes`` are this template's own volumes (boot first);
    ``aecp vm create --template`` clones them in O(1)."""

    name: str
    vcpus: int
    memory_mib: int
    data_disks_mib: list[int]
    volumes: list[str]
    source_vm: str
    created_at: float
    op: str = ""  # the conversion that made it (records before it have none)


def template_volume(template: str, vm_volume: str, vm: str) -> str:
    """``web-boot`` of VM ``web`` → ``tpl-T-boot`` (the suffix after the VM name)."""
    return f"tpl-{template}{vm_volume[len(vm) :]}"
