"""A replica store on a disk that runs out of room: a journal append the disk tore is cut away
again (so the records after it survive a crash), a flush that found no room fails alone and
the next one writes its records, and the space a store counts on disk is in the unit its writes
reserve (whole blocks), so a capacity holds."""

from __future__ import annotations

import asyncio
import errno
import os
import shutil
from pathlib import Path

import pytest

from aecp.storage.chunk.diskio import Journal, NotDone
from aecp.storage.chunk.errors import ChunkIOError, StaleEpoch
from aecp.storage.chunk.store import ReplicaStore

KIB = 1024
BLOCK = 256 * KIB
SECTOR = 4 * KIB


class FullDisk:
    """From ``on`` until ``off``, the disk has room for half of the next write to file
    descriptor ``fd`` (``os.write`` writes that half and returns), and none after it."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, fd: int) -> None:
        self.fd = fd
        self.writes = 0
        self._real = os.write
        monkeypatch.setattr(os, "write", self._write)
        self.armed = True

    def _write(self, fd: int, data: bytes | memoryview) -> int:
        if fd != self.fd or not self.armed:
            return self._real(fd, data)
        self.writes += 1
        if self.writes == 1 and len(data) > 1:
            return self._real(fd, bytes(data)[: len(data) // 2])
        raise OSError(errno.ENOSPC, "No space left on device")

    def off(self) -> None:
        self.armed = False


def open_fd(path: Path) -> int:
    """The descriptor this process holds ``path`` open with."""
    for fd in os.listdir("/proc/self/fd"):
        try:
            if os.readlink(f"/proc/self/fd/{fd}") == str(path):
                return int(fd)
        except OSError:
            continue
    raise AssertionError(f"{path} is not open")


def crash(root: Path, to: Path) -> Path:
    """What a process killed now would leave: the files as the page cache holds them (the
    store is not closed, so nothing is compacted or flushed)."""
    shutil.copytree(root, to)
    return to


async def test_a_journal_append_torn_by_a_full_disk_is_cut_back_and_later_records_survive_a_crash(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Loading stops at the first torn record: left in place, it took every record after it,
    # so a flushed write read back as zeros after a crash and the generation went back.
    root = tmp_path / "r"
    async with ReplicaStore(root) as s:
        await s.create("e1", 16 * BLOCK)
        await s.write("e1", 0, b"A" * SECTOR, epoch=1, generation=1)
        await s.flush("e1")
        rep = s._replicas["e1"]
        disk = FullDisk(monkeypatch, open_fd(root / "e1.jrnl"))
        with pytest.raises(ChunkIOError) as err:  # its INTENT record is torn
            await s.write("e1", BLOCK, b"B" * SECTOR, epoch=1, generation=2)
        assert err.value.errno == errno.ENOSPC and disk.writes == 2
        assert rep.failed is None  # nothing it held was lost
        disk.off()
        await s.write("e1", 2 * BLOCK, b"C" * SECTOR, epoch=1, generation=3)
        await s.write("e1", BLOCK, b"D" * SECTOR, epoch=1, generation=3)
        await s.flush("e1")
        crashed = crash(root, tmp_path / "crashed")
    async with ReplicaStore(crashed) as s:
        assert await s.read("e1", 0, SECTOR) == b"A" * SECTOR
        assert await s.read("e1", BLOCK, SECTOR) == b"D" * SECTOR
        assert await s.read("e1", 2 * BLOCK, SECTOR) == b"C" * SECTOR
        assert (await s.stat("e1")).generation == 3
        assert await s.scrub("e1") == []


async def test_a_flush_that_finds_no_room_fails_alone_and_the_next_one_writes_its_records(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # It marked the replica failed: the next write failed with EIO and the access point
    # dropped the replica, so a full disk shared by every replica cost every copy.
    root = tmp_path / "r"
    async with ReplicaStore(root) as s:
        await s.create("e1", 16 * BLOCK)
        await s.write("e1", 0, b"A" * SECTOR, epoch=1, generation=1)
        rep = s._replicas["e1"]
        disk = FullDisk(monkeypatch, open_fd(root / "e1.jrnl"))
        first = asyncio.ensure_future(s.flush("e1"))
        second = asyncio.ensure_future(s.flush("e1"))  # ordered behind the first one
        for flush in (first, second):  # neither answers before block 0's record is written
            with pytest.raises(ChunkIOError) as err:
                await flush
            assert err.value.errno == errno.ENOSPC
        assert rep.failed is None
        disk.off()
        await s.write("e1", BLOCK, b"B" * SECTOR, epoch=2, generation=2)  # still takes writes
        await s.flush("e1")
        crashed = crash(root, tmp_path / "crashed")
    async with ReplicaStore(crashed) as s:
        assert await s.read("e1", 0, SECTOR) == b"A" * SECTOR  # the failed flush's record
        assert await s.read("e1", BLOCK, SECTOR) == b"B" * SECTOR
        stat = await s.stat("e1")
        assert (stat.epoch, stat.generation) == (2, 2)
        assert await s.scrub("e1") == []


async def test_a_fence_that_finds_no_room_is_refused_yet_holds_and_the_next_flush_persists_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    root = tmp_path / "r"
    async with ReplicaStore(root) as s:
        await s.create("e1", 16 * BLOCK, epoch=1)
        disk = FullDisk(monkeypatch, open_fd(root / "e1.jrnl"))
        with pytest.raises(ChunkIOError) as err:
            await s.fence("e1", 5)
        assert err.value.errno == errno.ENOSPC
        assert s._replicas["e1"].failed is None
        with pytest.raises(StaleEpoch):  # an older writer is refused all the same
            await s.write("e1", 0, b"A" * SECTOR, epoch=1, generation=1)
        disk.off()
        await s.flush("e1")
        crashed = crash(root, tmp_path / "crashed")
    async with ReplicaStore(crashed) as s:
        assert (await s.stat("e1")).epoch == 5


async def test_a_compaction_without_room_for_its_snapshot_leaves_the_journal_to_hold_the_flush(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    root = tmp_path / "r"
    async with ReplicaStore(root) as s:
        await s.create("e1", 16 * BLOCK)
        rep = s._replicas["e1"]
        await s.write("e1", 0, b"A" * SECTOR, epoch=1, generation=1)
        rep.compact_at = 0  # the next flush compacts
        real_open = os.open

        def no_room_for_snapshots(path: str | os.PathLike[str], *args: object) -> int:
            if str(path).endswith(".meta.tmp"):
                raise OSError(errno.ENOSPC, "No space left on device")
            return real_open(path, *args)  # type: ignore[arg-type]

        monkeypatch.setattr(os, "open", no_room_for_snapshots)
        await s.flush("e1")  # the records went to the journal instead
        monkeypatch.setattr(os, "open", real_open)
        assert rep.failed is None
        crashed = crash(root, tmp_path / "crashed")
    async with ReplicaStore(crashed) as s:
        assert await s.read("e1", 0, SECTOR) == b"A" * SECTOR
        assert (await s.stat("e1")).generation == 1


async def test_space_measured_on_disk_counts_whole_blocks_as_writes_do_so_a_capacity_holds(
    tmp_path: Path,
) -> None:
    # ``measure`` counted sectors on disk while writes reserve whole blocks: 4 KiB written
    # into each block, re-measured every few writes, the store took 7 times its capacity.
    root = tmp_path / "r"
    capacity = 8 * BLOCK
    async with ReplicaStore(root, capacity=capacity) as s:
        await s.create("e1", 64 * BLOCK)
        taken = 0
        for block in range(64):
            try:
                await s.write("e1", block * BLOCK, b"x" * SECTOR, epoch=1, generation=1)
                taken += 1
            except ChunkIOError as exc:
                assert exc.errno == errno.ENOSPC
            if block % 4 == 3:
                await s.space.measure()  # as the server does every few seconds
        assert taken <= 8
        for block in range(taken):  # filling the blocks taken needs no more space
            await s.write("e1", block * BLOCK, b"y" * BLOCK, epoch=1, generation=2)
        await s.flush("e1")
        data = os.stat(root / "e1.data").st_blocks * 512
        assert data <= capacity
        assert await s.space.measure() >= taken * BLOCK


async def test_a_replica_create_a_full_disk_refuses_leaves_no_files_behind(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Its data file and journal stayed, without a snapshot: the orphan collector, which
    # looks for snapshots, never saw them.
    root = tmp_path / "r"
    async with ReplicaStore(root) as s:
        await s.create("e1", 16 * BLOCK)
        real_write = os.write

        def full(fd: int, data: bytes | memoryview) -> int:
            raise OSError(errno.ENOSPC, "No space left on device")

        monkeypatch.setattr(os, "write", full)
        with pytest.raises(ChunkIOError) as err:
            await s.create("e2", 16 * BLOCK)
        assert err.value.errno == errno.ENOSPC
        monkeypatch.setattr(os, "write", real_write)
        assert sorted(p.name for p in root.iterdir() if p.name.startswith("e2")) == []
        assert not await s.exists("e2")
        await s.create("e2", 16 * BLOCK)  # once there is room
        await s.write("e2", 0, b"A" * SECTOR, epoch=0, generation=1)


def test_journal_appends_keep_its_end_without_seeking_and_a_torn_one_is_still_cut_back(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Every append asked the kernel where the file ended (an lseek each).
    path = tmp_path / "j"
    journal = Journal()
    journal.open(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600))
    real_lseek = os.lseek
    seeks: list[int] = []

    def lseek(fd: int, pos: int, how: int) -> int:
        seeks.append(fd)
        return real_lseek(fd, pos, how)

    monkeypatch.setattr(os, "lseek", lseek)
    journal.append(b"a" * 100)
    journal.append(b"b" * 50)
    assert seeks == [] and journal.end == 150
    disk = FullDisk(monkeypatch, journal.fd)
    with pytest.raises(NotDone):
        journal.append(b"c" * 64)
    disk.off()
    assert path.read_bytes() == b"a" * 100 + b"b" * 50 and journal.end == 150
    journal.append(b"d" * 10)
    assert path.read_bytes()[150:] == b"d" * 10 and journal.end == 160
    os.close(journal.fd)
