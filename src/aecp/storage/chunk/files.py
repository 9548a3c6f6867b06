"""The files of a replica and their life cycle: create, load (journal replay, crash recovery),
persist (flush), compact, delete. Blocking; run on the replica's ``IoPool`` lane.

Files (format in ``meta``): ``<id>.data`` (sparse, the extent's size), ``<id>.meta`` (the
snapshot: its rename is the commit point of ``create``, its unlink that of ``delete``) and
``<id>.jrnl`` (the journal). A ``.data`` file without ``.meta`` is debris of a crashed create or
delete and is overwritten by the next create.

Ordering: ``create`` writes data and journal before the snapshot; ``flush`` fsyncs data before
appending the metadata that describes it; ``compact`` fsyncs data, replaces the snapshot, then
resets the journal (a crash in between leaves a stale journal, ignored on load).
"""

from __future__ import annotations

import contextlib
import errno
import os
from pathlib import Path

from aecp.storage.chunk.diskio import Journal, NotDone, append_all, crc32, pread_full
from aecp.storage.chunk.errors import ChunkInvalid, ExtentNotFound
from aecp.storage.chunk.journal import ReplicaMeta
from aecp.storage.chunk.replica import Replica

_OPEN_FLAGS = os.O_RDWR | os.O_CLOEXEC


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_snapshot(path: Path, snapshot: bytes) -> None:
    """Replace ``path`` atomically with ``snapshot`` (temp file, fsync, rename, dir fsync).
    ``NotDone`` if the temp file could not be written: ``path`` is as it was."""
    tmp = path.with_name(path.name + ".tmp")
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
        try:
            append_all(fd, snapshot)
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError as exc:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise NotDone(exc.errno or errno.EIO, f"snapshot not written: {exc}") from exc
    os.replace(tmp, path)
    fsync_dir(path.parent)


def create_files(rep: Replica) -> None:
    """Create the files of the new replica ``rep`` and open them."""
    rep.data_path.parent.mkdir(parents=True, exist_ok=True)
    meta = rep.meta
    try:
        rep.data_fd = os.open(rep.data_path, _OPEN_FLAGS | os.O_CREAT | os.O_TRUNC, 0o600)
        os.ftruncate(rep.data_fd, meta.size)
        rep.journal.open(
            os.open(rep.journal_path, _OPEN_FLAGS | os.O_CREAT | os.O_TRUNC | os.O_APPEND, 0o600)
        )
        rep.journal.append(meta.journal_header())
        os.fsync(rep.data_fd)
        os.fsync(rep.journal.fd)
        write_snapshot(rep.meta_path, meta.encode_snapshot())
    except BaseException:  # e.g. a full disk: nothing is left behind (the collector only
        close_files(rep)  # sees replicas with a snapshot, and these would never get one)
        for path in (rep.meta_path, rep.journal_path, rep.data_path):
            with contextlib.suppress(OSError):
                path.unlink()
        raise


def load_files(
    root: Path, extent_id: str, block_size: int, sector: int, lane: int
) -> tuple[Replica, int]:
    """Open an existing replica: snapshot, journal replay, and after a crash re-verification
    of the blocks named by INTENT records. Returns it and the number of sectors whose checksum
    was adopted from disk (0 after a clean close)."""
    try:
        snapshot = (root / f"{extent_id}.meta").read_bytes()
    except FileNotFoundError:
        raise ExtentNotFound(extent_id) from None
    meta = ReplicaMeta.decode_snapshot(snapshot)
    if (meta.block_size, meta.sector) != (block_size, sector):
        raise ChunkInvalid(
            f"extent {extent_id} has blocks of {meta.block_size}/{meta.sector} bytes, "
            f"this store uses {block_size}/{sector}"
        )
    rep = Replica(root, extent_id, meta, lane)
    try:
        rep.data_fd = os.open(rep.data_path, _OPEN_FLAGS)
        rep.journal.open(os.open(rep.journal_path, _OPEN_FLAGS | os.O_CREAT | os.O_APPEND, 0o600))
        suspects = _replay(rep)
        adopted = _adopt(rep, suspects)
        if suspects:
            meta.serial += 1
            compact_files(rep, meta.encode_snapshot(), meta.journal_header())
            rep.touched.clear()
            rep.journal_size = 0
        return rep, adopted
    except BaseException:
        close_files(rep)
        raise


def _replay(rep: Replica) -> set[int]:
    """Apply the journal to ``rep.meta``; cut a torn tail; reset a stale journal."""
    fd = rep.journal.fd
    size = os.fstat(fd).st_size
    journal = pread_full(fd, size, 0)
    replayed = rep.meta.replay(journal)
    if replayed is None:
        rep.journal.reset(rep.meta.journal_header())
        return set()
    good, suspects = replayed
    if good < size:
        rep.journal.cut(good)
        os.fsync(fd)
    rep.journal_size = good - len(rep.meta.journal_header())
    rep.touched = set(suspects)
    return suspects


def _adopt(rep: Replica, suspects: set[int]) -> int:
    """Take the checksums of what is on disk for the valid sectors of ``suspects``."""
    meta, adopted = rep.meta, 0
    sec, spb = meta.sector, meta.spb
    for block in sorted(suspects):
        bitmap = meta.bitmaps[block]
        if not bitmap:
            continue
        raw = memoryview(pread_full(rep.data_fd, meta.block_size, block * meta.block_size))
        for i in range(spb):
            if bitmap >> i & 1:
                crc = crc32(raw[i * sec : (i + 1) * sec])
                if crc != meta.crcs[block * spb + i]:
                    meta.crcs[block * spb + i] = crc
                    adopted += 1
    return adopted


def flush_files(data_fd: int, journal: Journal, records: bytes, sync_data: bool) -> None:
    """Make data durable, then append ``records`` to the journal and make them durable.
    ``NotDone`` if the records could not be appended (the journal is as it was)."""
    if sync_data:
        os.fdatasync(data_fd)
    if records:
        journal.append(records)
        os.fdatasync(journal.fd)


def compact_files(rep: Replica, snapshot: bytes, header: bytes) -> None:
    """Data fsync, new snapshot (atomically), then a new journal of the new serial: ``header``
    (the journal header, and any records that start it). ``NotDone`` if the snapshot could not
    be written: the old snapshot and journal still hold everything."""
    os.fdatasync(rep.data_fd)
    write_snapshot(rep.meta_path, snapshot)
    rep.journal.reset(header)


def close_files(rep: Replica) -> None:
    for fd in (rep.data_fd, rep.journal.fd):
        if fd >= 0:
            os.close(fd)
    rep.data_fd = rep.journal.fd = -1


def delete_files(rep: Replica) -> None:
    """Close and remove the replica's files."""
    close_files(rep)
    remove_files(rep.meta_path.parent, rep.id)


def remove_files(root: Path, extent_id: str) -> None:
    """Remove the files of a replica (open or not, damaged or not); the snapshot goes first
    (the commit point). ``ExtentNotFound`` if there is no snapshot."""
    try:
        (root / f"{extent_id}.meta").unlink()
    except FileNotFoundError:
        raise ExtentNotFound(extent_id) from None
    for suffix in (".jrnl", ".data", ".meta.tmp"):
        with contextlib.suppress(FileNotFoundError):
            (root / f"{extent_id}{suffix}").unlink()
    fsync_dir(root)


def list_ids(root: Path) -> list[str]:
    if not root.is_dir():
        return []
    return sorted(p.name[: -len(".meta")] for p in root.glob("*.meta"))


def meta_exists(root: Path, extent_id: str) -> bool:
    return (root / f"{extent_id}.meta").exists()
