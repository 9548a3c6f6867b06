"""Image files: inspection of what a user uploads (format, size, integrity) and verification of a
registered image before a VM is created from it.

Only ``raw`` and ``qcow2`` are accepted. A qcow2 must pass ``qemu-img check``; an image with a
backing file is refused (it would depend on a file outside the catalog).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

from aecp.common.errors import ImageError
from aecp.common.proc import CommandFailed, run
from aecp.model.image import ImageFormat, ImageRecord

CHUNK = 4 * 1024 * 1024


@dataclass(frozen=True)
class Inspection:
    format: ImageFormat
    size_bytes: int
    virtual_size: int
    sha256: str


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(CHUNK):
            h.update(chunk)
    return h.hexdigest()


def inspect(path: Path, declared: ImageFormat | None = None) -> Inspection:
    """Probe ``path`` with ``qemu-img``; ``ImageError`` if it is not a usable raw/qcow2 image.

    Blocking (reads the whole file for its digest): call from a thread.
    """
    if not path.is_file():
        raise ImageError(f"image file {path.name} does not exist", file=path.name)
    size = path.stat().st_size
    if size == 0:
        raise ImageError("image file is empty", file=path.name)
    info = _qemu_img_info(path)
    detected = info.get("format")
    if detected not in (ImageFormat.RAW.value, ImageFormat.QCOW2.value):
        raise ImageError(f"unsupported image format {detected!r} (raw or qcow2 only)")
    fmt = ImageFormat(detected)
    if declared is not None and declared is not fmt:
        raise ImageError(f"declared format {declared.value} but the file is {fmt.value}")
    if info.get("backing-filename"):
        raise ImageError("images with a backing file are not accepted; flatten it first")
    if fmt is ImageFormat.QCOW2:
        _check_qcow2(path)
    elif size % 512:
        raise ImageError(f"a raw image must be a multiple of 512 bytes, got {size}")
    return Inspection(fmt, size, int(str(info.get("virtual-size", size))), sha256_file(path))


def verify(record: ImageRecord, images_dir: Path) -> Path:
    """The image's file, after checking it is present, the recorded size, and the recorded digest.

    Raises ``ImageError`` naming what is wrong (missing, truncated, corrupt). Blocking.
    """
    path = images_dir / record.file
    if not path.is_file():
        raise ImageError(f"image {record.name}: file {record.file} is missing", image=record.name)
    size = path.stat().st_size
    if size != record.size_bytes:
        raise ImageError(
            f"image {record.name}: file is {size} bytes, expected {record.size_bytes} (corrupt)",
            image=record.name,
        )
    if sha256_file(path) != record.sha256:
        raise ImageError(f"image {record.name}: checksum mismatch (corrupt)", image=record.name)
    return path


def _qemu_img_info(path: Path) -> dict[str, object]:
    try:
        res = run(["qemu-img", "info", "--output", "json", str(path)], timeout=60)
    except CommandFailed as exc:
        raise ImageError(f"not a readable disk image: {_said(exc, path)}") from None
    data: dict[str, object] = json.loads(res.stdout)
    return data


def _check_qcow2(path: Path) -> None:
    try:
        run(["qemu-img", "check", "-f", "qcow2", str(path)], timeout=120)
    except CommandFailed as exc:
        raise ImageError(f"qcow2 image is corrupt: {_said(exc, path)}") from None


def _said(exc: CommandFailed, path: Path) -> str:
    """What qemu-img said, naming the file but not where it is (errors reach API callers)."""
    return exc.output.replace(str(path), path.name).strip()[-300:]
