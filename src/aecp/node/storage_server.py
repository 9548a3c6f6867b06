"""``aecp storage run``: a node's storage server — the local replica store served over the
replica protocol, and every volume served over NBD through an access point on this node: to
this node's QEMU on a Unix socket only root can open, to outside clients over TCP with TLS,
each seeing only the volume its credential is granted (``storage/exports.py``). Grants that
are revoked or expire close their connections within ``GRANT_CHECK_EVERY`` seconds.

The server registers ``/aecp/abs/servers/<node>`` on its own lease. Losing the lease (etcd
unreachable) closes every export: their attachments vanished with the lease, so another access
point may already have attached the volumes under a newer epoch.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import ctypes.util
import dataclasses
import functools
import gc
import logging
import os
import signal
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any

import uvloop

from aecp.common import log as logsetup
from aecp.common.clock import SYSTEM_CLOCK, Clock
from aecp.common.errors import AecpError, NotFound, Unavailable
from aecp.common.pki import Bundle
from aecp.common.tasks import cancel, spawn
from aecp.common.tls import Credentials
from aecp.conf.settings import NodeSettings
from aecp.model.vmjob import JobKind, VMJob
from aecp.node.storagewiring import meta_service, replica_auth
from aecp.storage.access import VolumeDevice
from aecp.storage.attach import open_volume
from aecp.storage.blockdev import BlockDevice, Span
from aecp.storage.chunk.server import ChunkServer
from aecp.storage.chunk.store import ReplicaStore
from aecp.storage.collect import OrphanCollector
from aecp.storage.exports import GrantPolicy, granted_by
from aecp.storage.frontends.nbd.server import Limits, NbdServer
from aecp.storage.handoff import Handoff, HandoffDone
from aecp.storage.leader import MetaLeader, volume_work
from aecp.storage.meta.model import MIB, StorageServer
from aecp.storage.meta.service import CLOSE_WAIT, SETTLE, AttachedElsewhere
from aecp.storage.pool import ReplicaPool
from aecp.storage.progress import RecoveryBoard
from aecp.storage.recovery import RecoveryPolicy
from aecp.store import keys
from aecp.store.base import Lease, Store
from aecp.store.controllers import ControllerHost
from aecp.store.etcd import EtcdStore
from aecp.store.lease import LeaseKeeper
from aecp.store.typed import read

log = logging.getLogger(__name__)
REPORT_EVERY = 5.0
GRANT_CHECK_EVERY = 2.0
GRANT_FAIL_CLOSED_AFTER = 5


class _Handle(BlockDevice):
    """One NBD connection's view of a shared ``VolumeDevice``; closing it releases one
    reference (the volume detaches when the last connection closes). A handle opened for a
    migration's destination before the hand-off has no device yet (``dev`` None, see
    ``storage.handoff``): its requests wait for the hand-off."""

    def __init__(
        self, daemon: StorageDaemon, name: str, dev: VolumeDevice | None, size: int
    ) -> None:
        self.daemon, self.name, self.dev = daemon, name, dev
        self.size = size
        self._closed = False
        daemon.handles.setdefault(name, set()).add(self)

    async def _device(self) -> VolumeDevice:
        return await self.daemon.handed_over(self.name, self)

    def read(self, offset: int, length: int) -> Coroutine[Any, Any, bytes]:
        dev = self.dev
        if dev is None:
            return self._read_later(offset, length)
        return dev.read(offset, length)  # the device's coroutine: one frame less

    async def _read_later(self, offset: int, length: int) -> bytes:
        peek = self.daemon.peek(self.name)
        if peek is not None and self.dev is None:  # QEMU reads a sector as it starts
            return await peek.read(offset, length)
        return await (await self._device()).read(offset, length)

    def write(
        self, offset: int, data: bytes | bytearray, fua: bool = False
    ) -> Coroutine[Any, Any, None]:
        dev = self.dev
        if dev is None:
            return self._write_later(offset, data, fua)
        return dev.write(offset, data, fua)

    async def _write_later(self, offset: int, data: bytes | bytearray, fua: bool) -> None:
        await (await self._device()).write(offset, data, fua)

    def read_nowait(self, offset: int, length: int) -> bytes | None:
        dev = self.dev
        return None if dev is None else dev.read_nowait(offset, length)

    def write_nowait(self, offset: int, data: bytes | bytearray) -> asyncio.Future[None] | None:
        dev = self.dev
        return None if dev is None else dev.write_nowait(offset, data)

    async def flush(self) -> None:
        if self.dev is not None:  # before the hand-off nothing was written here
            await self.dev.flush()

    async def trim(self, offset: int, length: int) -> None:
        await (self.dev or await self._device()).trim(offset, length)

    async def write_zeroes(
        self, offset: int, length: int, fua: bool = False, may_trim: bool = True
    ) -> None:
        await (self.dev or await self._device()).write_zeroes(offset, length, fua, may_trim)

    async def block_status(self, offset: int, length: int) -> list[Span]:
        return await (self.dev or await self._device()).block_status(offset, length)

    async def close(self) -> None:
        if not self._closed:
            self._closed = True
            handles = self.daemon.handles.get(self.name)
            if handles is not None:
                handles.discard(self)
                if not handles:
                    del self.daemon.handles[self.name]
            await self.daemon.release_handle(self)


@dataclasses.dataclass(eq=False)
class _Deferred:
    """The opens of a volume waiting for its hand-off to this node."""

    vm: str
    peek: VolumeDevice  # reads only, attached nowhere (epoch 0: it could write nothing)
    refs: int = 0
    ready: asyncio.Event = dataclasses.field(default_factory=asyncio.Event)
    error: str = ""


class StorageDaemon:
    """Chunk server + NBD server + access points of one node."""

    def __init__(self, settings: NodeSettings, store: Store, clock: Clock = SYSTEM_CLOCK):
        self.settings = settings
        self.store = store
        self.clock = clock
        self.node = settings.name
        self.replicas = ReplicaStore(settings.chunk_dir, capacity=settings.storage.capacity_bytes)
        self.meta = meta_service(settings, store, clock)
        self.credentials = Credentials(Bundle(settings.security.tls_dir))
        auth = replica_auth(settings, self.credentials)
        self.pool = ReplicaPool(
            self.meta, self.node, self.replicas, auth=auth, source=settings.storage_address
        )
        self.chunk = ChunkServer(
            self.replicas, settings.storage_address, settings.storage.chunk_port, auth=auth
        )
        self.grants = GrantPolicy(store, self.credentials, clock)
        st = settings.storage
        self.nbd = NbdServer(
            settings.storage_address,
            st.nbd_port,
            self.open_export,
            self.list_exports,
            unix_path=settings.nbd_socket,
            tls=self.grants,
            limits=Limits(
                handshake_timeout=st.nbd_handshake_timeout_s,
                idle_timeout=st.nbd_idle_timeout_s,
                max_per_client=st.nbd_max_connections_per_client,
            ),
        )
        self.keeper = LeaseKeeper(
            store,
            settings.agent.lease_ttl,
            settings.agent.fence_margin,
            self._register,
            self._lost,
            clock,
            node=f"{self.node}/storage",
        )
        self._exports: dict[str, tuple[VolumeDevice, int]] = {}
        self._deferred: dict[str, _Deferred] = {}  # opens waiting for a migration's hand-off
        self.handles: dict[str, set[_Handle]] = {}  # the open handles of each volume
        self._closing: dict[str, asyncio.Future[None]] = {}  # last handle gone, device closing
        self.board = RecoveryBoard(store, self._lease_held)
        self.controllers = ControllerHost(store, self.node)
        self.leader = MetaLeader(
            self.meta,
            self.pool,
            self.node,
            self.board,
            self._policy,
            self._lease_held,
            self._gc_every(),
            clock,
        )
        self.controllers.register(self.leader)
        self._lock = asyncio.Lock()
        self._stop = asyncio.Event()

    async def run(self) -> None:
        await self.chunk.start()
        while not self.keeper.held():  # registered before the first client can connect
            log.info("node %s/storage: %s", self.node, await self.keeper.step())
            if not self.keeper.held():
                await self.clock.sleep(1.0)
        await self.nbd.start()
        keeper = asyncio.create_task(self.keeper.run(), name=f"storage-lease-{self.node}")
        report = asyncio.create_task(self._report_loop(), name=f"storage-report-{self.node}")
        repair = asyncio.create_task(self._recovery_loop(), name=f"recovery-{self.node}")
        scrub = asyncio.create_task(self._scrub_loop(), name=f"scrub-{self.node}")
        grants = spawn(self._grants_loop(), name=f"nbd-grants-{self.node}")
        watch = spawn(self._grants_watch(), name=f"nbd-grants-watch-{self.node}")
        handoffs = spawn(self._handoffs_watch(), name=f"handoffs-{self.node}")
        log.info(
            "node %s: storage server up: replicas on %s:%d, NBD on %s:%d (TLS) and %s",
            self.node,
            self.settings.storage_address,
            self.settings.storage.chunk_port,
            self.settings.storage_address,
            self.settings.storage.nbd_port,
            self.settings.nbd_socket,
        )
        try:
            await self._stop.wait()
        finally:
            await cancel(keeper, report, repair, scrub, grants, watch, handoffs)
            await self.nbd.stop()
            await self._close_exports()
            await self.chunk.stop()
            await self.pool.close()
            await self.replicas.close()

    def stop(self) -> None:
        self._stop.set()

    async def _register(self, lease: Lease) -> None:
        """Publish this server (and its free space) on ``lease``."""
        st = os.statvfs(self.settings.chunk_dir)
        capacity = self.settings.storage.capacity_bytes or st.f_blocks * st.f_frsize
        used = await self.replicas.space.measure()
        free = max(0, min(capacity - used, st.f_bavail * st.f_frsize))
        rec = StorageServer(
            node=self.node,
            address=self.settings.storage_address,
            chunk_port=self.settings.storage.chunk_port,
            nbd_port=self.settings.storage.nbd_port,
            capacity_bytes=capacity,
            free_bytes=free,
            used_bytes=used,
            rack=self.settings.storage.rack,
            chassis=self.settings.storage.chassis,
            overcommit_ratio=self.settings.storage.overcommit_ratio,
        )
        await self.store.put(keys.abs_server(self.node), rec.dump(), lease=lease)

    async def _grants_watch(self) -> None:
        """Tell the grant policy when a grant changes, so a new export works at once (a
        client's STARTTLS alone may make it read the grants only once a second)."""
        while True:
            try:
                async with self.store.watch(keys.ABS_EXPORTS) as events:
                    self.grants.invalidate()  # what changed before the watch began
                    async for _ in events:
                        self.grants.invalidate()
            except AecpError as exc:
                log.debug("node %s: grants watch broke: %s", self.node, exc)
                self.grants.invalidate()
                await self.clock.sleep(1.0)

    async def _grants_loop(self) -> None:
        """Close the NBD connections whose grant was revoked, expired or moved to another
        volume. A store that cannot say keeps them open for ``GRANT_FAIL_CLOSED_AFTER``
        checks, then every TLS connection is closed (fail closed)."""
        failures = 0
        while True:
            await self.clock.sleep(GRANT_CHECK_EVERY)
            try:
                valid = await self.grants.refresh()
            except Exception as exc:  # a corrupt or newer record too: never stop checking
                failures += 1
                log.warning("node %s: NBD grants not checked (%d): %s", self.node, failures, exc)
                if failures >= GRANT_FAIL_CLOSED_AFTER and (
                    closed := self.nbd.revoke(lambda *_: False)
                ):
                    log.warning("node %s: closed %d NBD TLS connections", self.node, closed)
                continue
            failures = 0
            if closed := self.nbd.revoke(functools.partial(granted_by, valid)):
                log.warning("node %s: closed %d NBD connections: grant revoked", self.node, closed)

    async def _report_loop(self) -> None:
        """Refresh the published free space every few seconds (placement balances on it)."""
        while True:
            await self.clock.sleep(REPORT_EVERY)
            lease = self.keeper.lease
            if lease is not None and self.keeper.held():
                with contextlib.suppress(AecpError):
                    await self._register(lease)

    # ---- recovery and scrubbing ----------------------------------------------------------
    def _policy(self) -> RecoveryPolicy:
        st = self.settings.storage
        return RecoveryPolicy(
            grace=st.recovery_grace_s,
            rate=st.recovery_mib_s * MIB,
            maintenance_grace=st.maintenance_grace_s,
        )

    def _lease_held(self) -> Lease | None:
        """The storage lease while it is held (copies are published on it)."""
        return self.keeper.lease if self.keeper.held() else None

    async def _recovery_loop(self) -> None:
        """Repair the volumes attached here; run the controllers of the roles this server
        holds (the Meta leader: ``storage.leader``). Every ``_gc_every`` seconds, collect the
        replicas in this node's store that no extent record names (``storage.collect``)."""
        st = self.settings.storage
        orphans = OrphanCollector(
            self.replicas, self.meta, self.node, st.orphan_grace_s, self.clock
        )
        collected = self.clock.monotonic()
        while True:
            await self.clock.sleep(st.recovery_interval_s)
            await self._each_attached("repair")
            try:
                await self.controllers.run_pass(self._lease_held())
            except AecpError as exc:
                log.warning("node %s: controllers skipped: %s", self.node, exc)
            if self.clock.monotonic() - collected >= self._gc_every():
                collected = self.clock.monotonic()
                await self._logged("orphans", orphans.run_pass)

    def _gc_every(self) -> float:
        """Orphans are looked at a few times per grace period (no more than recovery)."""
        st = self.settings.storage
        return max(st.recovery_interval_s, st.orphan_grace_s / 4)

    async def _logged(self, what: str, work: Callable[[], Awaitable[list[str]]]) -> None:
        """Run ``work`` and log its sentences; a failure is logged and the loop goes on."""
        try:
            for sentence in await work():
                log.info("node %s: %s", self.node, sentence)
        except AecpError as exc:
            log.warning("node %s: %s stopped: %s", self.node, what, exc)
        except Exception:  # a bug here must not stop recovery
            log.exception("node %s: %s failed", self.node, what)

    async def _scrub_loop(self) -> None:
        while True:
            await self.clock.sleep(self.settings.storage.scrub_interval_s)
            await self._each_attached("scrub")
            if self.controllers.leads(self.leader.role):
                await self._logged("scrub as the Meta leader", self.leader.scrub_pass)

    async def _each_attached(self, what: str) -> None:
        """``what`` (repair or scrub) on each volume attached here, one after the other."""
        if not self.keeper.held():
            return
        async with self._lock:
            attached = {name: dev for name, (dev, _) in self._exports.items()}
        for name, dev in attached.items():
            work = functools.partial(volume_work, dev, what, self._policy(), self.board)
            await self._logged(f"volume {name}: {what}", work)

    async def _lost(self, reason: str) -> None:
        log.warning(
            "node %s: storage lease lost (%s): closing %d exports",
            self.node,
            reason,
            len(self._exports),
        )
        self.controllers.step_down()
        await self._close_exports()

    async def _close_exports(self) -> None:
        async with self._lock:
            devs = [d for d, _ in self._exports.values()]
            self._exports.clear()
        for d in devs:
            with contextlib.suppress(Exception):
                await _flush_and_close(d)

    # ---- NBD exports ----------------------------------------------------------------------
    async def list_exports(self) -> list[str]:
        return sorted(v.name for v in await self.meta.volumes())

    async def open_export(self, name: str) -> BlockDevice:
        """A handle on volume ``name`` (attached here on first use). ``KeyError`` if unknown.
        While the volume's last handle is still being closed (flushed, detached), waits for
        that first: a FLUSH through the new handle must cover what the old one acknowledged.
        While another node's export of it is closing (its client just left), waits for that
        to detach too (``MetaService.wait_detached``, outside the lock), then tries once more:
        a client that moves from one node to another must not be refused for that moment."""
        waited = False
        while True:
            if (closing := self._closing.get(name)) is not None:
                await asyncio.shield(closing)
                continue
            try:
                async with self._lock:
                    if name in self._closing:
                        continue  # a close began meanwhile
                    return await self._open_locked(name)
            except AttachedElsewhere:
                if waited or not await self.meta.wait_detached(name, CLOSE_WAIT, SETTLE):
                    raise
                waited = True

    async def _open_locked(self, name: str) -> BlockDevice:
        lease = self.keeper.lease
        if lease is None or not self.keeper.held():
            raise Unavailable(f"node {self.node} holds no storage lease")
        entry = self._exports.get(name)
        if entry is None:
            deferred = self._deferred.get(name)
            if deferred is not None:
                deferred.refs += 1
                return _Handle(self, name, None, deferred.peek.size)
            try:
                dev = await open_volume(self.meta, self.pool, self.node, name, lease)
            except NotFound:
                raise KeyError(name) from None
            except AttachedElsewhere:
                vm = await self._migrating_here(name)
                if vm is None:
                    raise
                vol = (await self.meta.volume(name))[0]
                peek = VolumeDevice(self.meta, self.pool, self.node, vol, 0)
                self._deferred[name] = _Deferred(vm, peek, refs=1)
                log.info("volume %s: opened for VM %s migrating here: deferred", name, vm)
                return _Handle(self, name, None, vol.size)
            entry = (dev, 0)
        self._exports[name] = (entry[0], entry[1] + 1)
        return _Handle(self, name, entry[0], entry[0].size)

    # ---- migration hand-off (``storage.handoff``) -------------------------------------------
    async def _migrating_here(self, volume: str) -> str | None:
        """The VM owning ``volume`` if it has a live migration to this node, else None."""
        vol, _ = await self.meta.volume(volume)
        if vol.owner is None or vol.owner.kind != "vm":
            return None
        got = await read(self.store, keys.vm_job(vol.owner.name), VMJob)
        if got is None:
            return None
        job = got[0]
        here = job.kind is JobKind.MIGRATE and job.target == self.node
        return job.vm if here and job.vm_uuid == vol.owner.uid else None

    def peek(self, name: str) -> VolumeDevice | None:
        """A read-only view of a volume whose hand-off to this node is awaited."""
        deferred = self._deferred.get(name)
        return None if deferred is None else deferred.peek

    async def handed_over(self, name: str, handle: _Handle) -> VolumeDevice:
        """The device of a deferred ``handle`` once the hand-off attached it here."""
        deferred = self._deferred.get(name)
        if deferred is not None:
            await deferred.ready.wait()
            if deferred.error:
                raise Unavailable(f"volume {name}: {deferred.error}", volume=name)
        if handle.dev is None:
            raise Unavailable(f"volume {name} was not handed over to node {self.node}")
        return handle.dev

    def release_deferred(self, name: str) -> None:
        deferred = self._deferred.get(name)
        if deferred is None:
            return
        deferred.refs -= 1
        if deferred.refs <= 0:
            del self._deferred[name]
            deferred.error = "its last client left before the hand-off"
            deferred.ready.set()

    async def _handoffs_watch(self) -> None:
        """Carry out the hand-offs naming this node as they are written, each volume's at
        once (a VM's disks are handed over together: the guest is paused meanwhile)."""
        running: set[asyncio.Task[None]] = set()
        try:
            while True:
                try:
                    async with self.store.watch(keys.ABS_HANDOFFS) as events:
                        async for ev in events:
                            if ev.value is None:
                                continue
                            rec = Handoff.load(ev.value)
                            if rec.to == self.node:
                                task = spawn(self._hand_over(rec), f"handoff-{rec.volume}")
                                running.add(task)
                                task.add_done_callback(running.discard)
                except AecpError as exc:
                    log.debug("node %s: hand-off watch broke: %s", self.node, exc)
                    await self.clock.sleep(0.2)
        finally:
            await cancel(*running)

    async def _hand_over(self, rec: Handoff) -> None:
        """Attach ``rec.volume`` here with takeover and give it to the handles waiting (a
        migration's destination) or still open (its source, taking a volume back); answer
        with a ``HandoffDone`` either way."""
        name = rec.volume
        epoch, error = 0, ""
        try:
            epoch = await self._take_over(name)
            log.info("volume %s: handed over to %s, epoch %d (%s)", name, self.node, epoch, rec.op)
        except Exception as exc:  # the answer says why; the source decides
            error = exc.message if isinstance(exc, AecpError) else f"{type(exc).__name__}: {exc}"
            log.warning("volume %s: hand-off to %s failed: %s", name, self.node, error)
        done = HandoffDone(
            volume=name,
            node=self.node,
            op=rec.op,
            ok=not error,
            epoch=epoch,
            error=error,
            at=self.clock.wall(),
        )
        with contextlib.suppress(AecpError):
            await self.store.put(keys.abs_handoff_done(name), done.dump())

    async def _take_over(self, name: str) -> int:
        """Attach ``name`` here with takeover (outside the exports' lock, so that a VM's
        volumes are attached in parallel) and give the device to its handles; ``Unavailable``
        if none is open here, or all closed meanwhile."""
        lease = self.keeper.lease
        if lease is None or not self.keeper.held():
            raise Unavailable(f"node {self.node} holds no storage lease")
        async with self._lock:
            deferred = self._deferred.get(name)
            entry = self._exports.get(name)
        if deferred is None and entry is None:
            raise Unavailable(f"no client of volume {name} is open on node {self.node}")
        dev = await open_volume(self.meta, self.pool, self.node, name, lease, takeover=True)
        old: VolumeDevice | None = None
        async with self._lock:
            current = self._exports.get(name)
            if not self.keeper.held() or self.keeper.lease is not lease:
                old = dev  # the lease was lost meanwhile: every export closed
            elif deferred is not None and self._deferred.get(name) is deferred:
                del self._deferred[name]
                self._exports[name] = (dev, deferred.refs)
                deferred.ready.set()
            elif deferred is None and entry is not None and current and current[0] is entry[0]:
                old = current[0]
                self._exports[name] = (dev, current[1])
            else:
                old = dev  # every client left meanwhile: nobody to give it to
            if old is not dev:
                for handle in self.handles.get(name, ()):
                    handle.dev = dev
        if old is dev:
            await _flush_and_close(dev)
            raise Unavailable(f"the clients of volume {name} left during the hand-off")
        if old is not None:
            with contextlib.suppress(Exception):
                await old.close()  # fenced by the takeover: detaches nothing
        return dev.epoch

    async def release_handle(self, handle: _Handle) -> None:
        """``handle`` closed: one reference less on whatever device it holds when the
        exports' lock is taken (a hand-off may give it another one until then)."""
        await self.release(handle.name, handle.dev, handle)

    async def release(
        self, name: str, dev: VolumeDevice | None, handle: _Handle | None = None
    ) -> None:
        """One handle on ``dev`` closed; the last one flushes and detaches it, its attachment
        marked closing meanwhile (a delete of the volume waits for it). A handle whose
        device was closed already (the lease was lost, then the volume opened again) leaves
        the new device alone."""
        async with self._lock:
            if handle is not None:
                dev = handle.dev
                if dev is None:
                    self.release_deferred(name)
                    return
            entry = self._exports.get(name)
            if entry is None or entry[0] is not dev:
                return
            refs = entry[1]
            if refs > 1:
                self._exports[name] = (dev, refs - 1)
                return
            del self._exports[name]
            closing = self._closing[name] = asyncio.get_running_loop().create_future()
        try:
            try:
                await self.meta.mark_closing(dev.holder)
            except AecpError as exc:  # the delete that comes meanwhile answers "in use"
                log.info("volume %s: not marked closing: %s", name, exc)
            await _flush_and_close(dev)
        finally:
            closing.set_result(None)
            if self._closing.get(name) is closing:
                del self._closing[name]


async def _flush_and_close(dev: VolumeDevice) -> None:
    """Flush, then detach even if the flush failed (the error is raised after)."""
    try:
        await dev.flush()
    finally:
        await dev.close()


#: collect the youngest generation every this many allocations (CPython's default: 700)
GC_GEN0 = 20_000


def tune_gc() -> None:
    """Make cyclic garbage collection rare on the data path.

    Every I/O allocates futures, tasks and coroutines; with CPython's default threshold a young
    collection runs every few hundred requests, and in ``benchmarks/access_point.py`` that cost
    about a tenth of the 4 KiB write rate and doubled its p99 latency. Objects alive after
    start-up are frozen (never scanned again); the young generation is collected every
    ``GC_GEN0`` allocations, which bounds the cyclic garbage held in between to a few MiB.
    """
    gc.freeze()
    _, gen1, gen2 = gc.get_threshold()
    gc.set_threshold(GC_GEN0, gen1, gen2)


#: request buffers up to this size come from the heap, not from a fresh ``mmap`` each
MALLOC_MMAP_THRESHOLD = 32 * MIB
#: free memory at the top of the heap kept for the next requests rather than returned
MALLOC_TRIM_THRESHOLD = 128 * MIB
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3


def tune_malloc() -> bool:
    """Keep glibc from mapping and unmapping a fresh region for every large request buffer.

    A 1 MiB WRITE allocates its payload (and a replica its frame) per request; above glibc's
    mmap threshold each one is a new mapping, so every request paid page faults and the
    kernel's zeroing of 256 pages, then an ``munmap``. With the threshold raised, buffers up to
    ``MALLOC_MMAP_THRESHOLD`` are reused from the heap; the heap keeps up to
    ``MALLOC_TRIM_THRESHOLD`` free at its top. Measured in ``benchmarks/access_point.py``
    (factor 2, 1 MiB writes): about a fifth less CPU per MiB. Returns False (and changes
    nothing) where the C library is not glibc."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    return bool(
        mallopt(_M_MMAP_THRESHOLD, MALLOC_MMAP_THRESHOLD)
        and mallopt(_M_TRIM_THRESHOLD, MALLOC_TRIM_THRESHOLD)
    )


def main(settings: NodeSettings) -> None:
    """The ``aecp storage run`` process: ``run_storage`` on uvloop, with ``tune_gc`` and
    ``tune_malloc`` (docs/design/abs.md, "Disk I/O", gives what each was measured to bring)."""
    tune_gc()
    tune_malloc()
    uvloop.run(run_storage(settings))


async def run_storage(settings: NodeSettings) -> None:
    """Run the storage server until SIGTERM/SIGINT."""
    logsetup.setup(settings.log_level)
    settings.chunk_dir.mkdir(parents=True, exist_ok=True)
    store = EtcdStore(
        settings.store.endpoints,
        tls=Bundle(settings.security.tls_dir),
        timeout=settings.store.timeout,
    )
    daemon = StorageDaemon(settings, store)
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, daemon.stop)
    try:
        await daemon.run()
    finally:
        await store.close()
