"""Images as the API shows them (not where the file is kept on the nodes)."""

from __future__ import annotations

from pydantic import BaseModel

from aecp.model.image import ImageFormat, ImageRecord


class ImagePublic(BaseModel):
    name: str
    format: ImageFormat
    size_bytes: int
    virtual_size: int
    sha256: str
    created_at: float
    source: str

    @classmethod
    def of(cls, rec: ImageRecord) -> ImagePublic:
        return cls(**rec.model_dump(exclude={"file"}))
