"""Templates as the API shows them."""

from __future__ import annotations

from pydantic import BaseModel

from aecp.model.template import TemplateRecord


class TemplatePublic(BaseModel):
    name: str
    vcpus: int
    memory_mib: int
    data_disks_mib: list[int]
    volumes: list[str]
    source_vm: str
    created_at: float

    @classmethod
    def of(cls, rec: TemplateRecord) -> TemplatePublic:
        return cls(**rec.model_dump(exclude={"op"}))
