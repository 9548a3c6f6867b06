"""Images VMs boot from: the upload (received to a temporary file, checked, then registered
under a file name of its own), the list, and delete (refused while a VM uses the image)."""

from __future__ import annotations

import asyncio
import contextlib
import secrets
import shutil
from collections.abc import AsyncIterator
from pathlib import Path

from aecp.common.clock import SYSTEM_CLOCK, Clock
from aecp.common.errors import (
    AlreadyExists,
    Conflict,
    ImageError,
    InvalidInput,
    NotFound,
    Unavailable,
)
from aecp.compute.images import catalog
from aecp.model.base import check_name
from aecp.model.image import ImageFormat, ImageRecord
from aecp.model.vm import VMSpec
from aecp.store import keys
from aecp.store.base import Store
from aecp.store.typed import read

MAX_IMAGE_BYTES = 256 * 1024**3


class ImageService:
    def __init__(self, store: Store, images_dir: Path, clock: Clock = SYSTEM_CLOCK) -> None:
        self.store = store
        self.images_dir = images_dir
        self.clock = clock

    async def images(self) -> list[ImageRecord]:
        return [ImageRecord.load(kv.value) for kv in await self.store.list(keys.IMAGES)]

    async def image(self, name: str) -> ImageRecord:
        check_name("image", name)
        got = await read(self.store, keys.image(name), ImageRecord)
        if got is None:
            raise NotFound(f"image {name} does not exist", image=name)
        return got[0]

    async def usable(self, name: str) -> ImageRecord:
        """Image ``name`` for a new VM: it exists (``InvalidInput`` on field ``image`` if
        not) and its file is intact."""
        try:
            record = await self.image(name)
        except NotFound:
            raise InvalidInput("image", f"image {name} does not exist") from None
        await asyncio.to_thread(catalog.verify, record, self.images_dir)
        return record

    async def register(self, record: ImageRecord) -> None:
        if not await self.store.create(keys.image(record.name), record.dump()):
            raise AlreadyExists(f"image {record.name} already exists", field="name")

    async def delete(self, name: str) -> None:
        record = await self.image(name)
        users = sorted(
            VMSpec.load(kv.value).name
            for kv in await self.store.list(keys.VMS)
            if kv.key.endswith("/spec") and VMSpec.load(kv.value).image == name
        )
        if users:
            raise Conflict(f"image {name} is used by VMs: {', '.join(users)}", vms=users)
        await self.store.delete(keys.image(name))
        (self.images_dir / record.file).unlink(missing_ok=True)

    async def upload(
        self,
        name: str,
        body: AsyncIterator[bytes],
        declared: int | None,
        fmt: ImageFormat | None,
        source: str,
    ) -> ImageRecord:
        """Store ``body`` as image ``name`` after checking its format and integrity (422
        names what is wrong with the file; 503 if this node cannot store it)."""
        check_name("name", name)
        if await self.store.get(keys.image(name)) is not None:
            raise AlreadyExists(f"image {name} already exists", field="name")
        try:
            return await self._store(name, body, declared, fmt, source)
        except OSError as exc:  # the images directory: full, read-only... (never say where)
            raise Unavailable(f"cannot store image {name}: {exc.strerror or 'I/O error'}") from None

    async def _store(
        self,
        name: str,
        body: AsyncIterator[bytes],
        declared: int | None,
        fmt: ImageFormat | None,
        source: str,
    ) -> ImageRecord:
        self.images_dir.mkdir(parents=True, exist_ok=True)
        tmp = self.images_dir / f".upload-{name}-{secrets.token_hex(4)}"
        try:
            await _receive(body, declared, tmp)
            info = await asyncio.to_thread(catalog.inspect, tmp, fmt)
            # a name of its own: a concurrent upload of the same image name that loses the
            # race deletes its own file, never the winner's
            final = self.images_dir / f"{name}-{secrets.token_hex(4)}.{info.format.value}"
            record = ImageRecord(
                name=name,
                format=info.format,
                file=final.name,
                size_bytes=info.size_bytes,
                virtual_size=info.virtual_size,
                sha256=info.sha256,
                created_at=self.clock.wall(),
                source=source,
            )
            tmp.rename(final)
            try:
                await self.register(record)
            except BaseException:
                final.unlink(missing_ok=True)
                raise
            return record
        finally:
            tmp.unlink(missing_ok=True)


async def _receive(body: AsyncIterator[bytes], declared: int | None, dest: Path) -> None:
    free = shutil.disk_usage(dest.parent).free
    if declared is not None and declared > min(free, MAX_IMAGE_BYTES):
        raise InvalidInput("body", f"{declared} bytes do not fit ({free} bytes free)")
    written = 0
    with dest.open("wb") as f:
        async for chunk in body:
            written += len(chunk)
            if written > MAX_IMAGE_BYTES:
                raise InvalidInput("body", "image larger than the 256 GiB limit")
            await asyncio.to_thread(f.write, chunk)
    if written == 0:
        with contextlib.suppress(OSError):
            dest.unlink()
        raise ImageError("the uploaded image is empty", field="body")
