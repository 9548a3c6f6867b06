"""Images VMs boot from: raw or qcow2 files registered in the cluster."""

from __future__ import annotations

import enum

from aecp.model.base import Stored


class ImageFormat(enum.StrEnum):
    RAW = "raw"
    QCOW2 = "qcow2"


class ImageRecord(Stored):
    """``/aecp/images/<name>``: a verified image file in the cluster's image directory."""

    name: str
    format: ImageFormat
    file: str  # file name inside the images directory
    size_bytes: int  # bytes of the file
    virtual_size: int  # bytes the guest sees
    sha256: str
    created_at: float
    source: str = ""
