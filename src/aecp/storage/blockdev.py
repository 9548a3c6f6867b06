"""The volume I/O interface every front end (NBD, later iSCSI and NFS) serves.

Offsets and lengths are bytes. A device has a fixed ``size`` (a multiple of 512) for the life of
an open handle. Errors are ``BlockError`` subclasses; each names the POSIX errno a protocol sends
back (NBD replies carry errno values: ``NBD_EIO`` = 5, ``NBD_EINVAL`` = 22, ``NBD_ENOSPC`` = 28,
``NBD_EPERM`` = 1, ``NBD_EOVERFLOW`` = 75, ``NBD_ESHUTDOWN`` = 108).

Durability contract: ``write`` returns when every valid replica holds the data (in memory at
least); with ``fua`` it returns only once the data is durable. ``flush`` makes every write that
completed before it durable.
"""

from __future__ import annotations

import asyncio
import enum
import errno
from abc import ABC, abstractmethod
from dataclasses import dataclass

from aecp.common.errors import AecpError


class BlockError(AecpError):
    """An I/O request failed; ``errno`` is what the front end reports."""

    code = "io_error"
    errno: int = errno.EIO


class InvalidRequest(BlockError):
    """Out of range, misaligned, or otherwise malformed."""

    code = "invalid_request"
    errno = errno.EINVAL


class NoSpace(BlockError):
    code = "no_space"
    errno = errno.ENOSPC


class ReadOnly(BlockError):
    code = "read_only"
    errno = errno.EPERM


class Fenced(BlockError):
    """This access point lost the volume's lease (a newer epoch attached it): no more I/O."""

    code = "fenced"
    errno = errno.ESHUTDOWN


class Allocation(enum.IntFlag):
    """``base:allocation`` flags of a range (NBD proto.md "Metadata querying")."""

    DATA = 0
    HOLE = 1  # NBD_STATE_HOLE
    ZERO = 2  # NBD_STATE_ZERO


@dataclass(frozen=True)
class Span:
    """A run of bytes with the same allocation state."""

    length: int
    flags: Allocation


class BlockDevice(ABC):
    """One open volume."""

    size: int
    read_only: bool = False
    #: the same data is seen through every connection to the same export (NBD_FLAG_CAN_MULTI_CONN)
    multi_conn: bool = True

    @abstractmethod
    async def read(self, offset: int, length: int) -> bytes:
        """Exactly ``length`` bytes (holes read as zeros)."""

    @abstractmethod
    async def write(self, offset: int, data: bytes | bytearray, fua: bool = False) -> None:
        """Write ``data``; see the module docstring for durability."""

    def read_nowait(self, offset: int, length: int) -> bytes | None:
        """``read`` done at once if the device can without waiting; None, having done
        nothing, if the caller must await ``read`` (also for anything ``read`` would raise).
        The default never can; a front end uses it to answer a read without a task."""
        return None

    def write_nowait(self, offset: int, data: bytes | bytearray) -> asyncio.Future[None] | None:
        """``write`` (without ``fua``) started at once if the device can, with a future for
        its outcome; None, having done nothing, if the caller must await ``write`` instead.
        The default never can; a front end uses it to serve a write without a task."""
        return None

    @abstractmethod
    async def flush(self) -> None:
        """Make every completed write durable."""

    @abstractmethod
    async def trim(self, offset: int, length: int) -> None:
        """Hint that the range is unused; it may read back as zeros afterwards."""

    @abstractmethod
    async def write_zeroes(
        self, offset: int, length: int, fua: bool = False, may_trim: bool = True
    ) -> None:
        """Make the range read as zeros (deallocating it when ``may_trim``)."""

    @abstractmethod
    async def block_status(self, offset: int, length: int) -> list[Span]:
        """Allocation state from ``offset``: spans covering at least one byte and at most
        ``length`` bytes, in order."""

    async def close(self) -> None:  # noqa: B027 - optional hook, a no-op by default
        """Release the device (flushes nothing by itself)."""


def check_range(dev: BlockDevice, offset: int, length: int) -> None:
    """``InvalidRequest`` unless ``[offset, offset+length)`` lies inside the device."""
    if offset < 0 or length < 0 or offset + length > dev.size:
        raise InvalidRequest(
            f"range {offset}+{length} is outside the device (size {dev.size})",
            offset=offset,
            length=length,
            size=dev.size,
        )
