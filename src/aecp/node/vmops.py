"""What the node agent does to one VM: each method carries one change through — hypervisor,
local disks, then status and operation in the store, in that order — so a crash between steps is
repaired by the next reconcile pass (it re-reads both sides).

Operations: an action finishes the operation of the spec it acted on, by compare-and-swap; if
a later request superseded that operation meanwhile, the API has already cancelled it and it
stays cancelled (a finished operation never changes). A failed action records state ``error``
with the reason, keeping everything else the status knew (the disks stay ready, the reboots
done stay done); its operation keeps running, saying that the action is retried, until the
retry succeeds or the reconciler gives up, which fails it (never a later one)."""

from __future__ import annotations

import hashlib
import logging
import socket
from pathlib import Path

from aecp.cluster.networks import release
from aecp.common.clock import SYSTEM_CLOCK, Clock
from aecp.common.errors import Conflict, ImageError
from aecp.compute.hypervisor import (
    Accel,
    DiskSpec,
    Hypervisor,
    InstanceSpec,
)
from aecp.model.image import ImageRecord
from aecp.model.operation import Operation
from aecp.model.vm import Placement, Power, VMSpec, VMState, VMStatus
from aecp.model.vmjob import JobKind, VMJob
from aecp.node.vmdisks import DiskProvider
from aecp.node.vmnics import ensure_taps, http_url_for, nics_for, remove_taps
from aecp.store import keys
from aecp.store.base import Compare, Delete, Put, Store
from aecp.store.opsend import end_strays, succeed
from aecp.store.typed import read, update_op
from aecp.store.view import VMEntry

log = logging.getLogger(__name__)

GUEST_HTTP_PORT = 80


class VMActions:
    """Carries out reconcile decisions for the VMs of node ``node``."""

    def __init__(
        self,
        node: str,
        address: str,
        store: Store,
        hv: Hypervisor,
        disks: DiskProvider,
        images_dir: Path,
        accel: Accel,
        clock: Clock = SYSTEM_CLOCK,
    ) -> None:
        self.node = node
        self.address = address
        self.store = store
        self.hv = hv
        self.disks = disks
        self.images_dir = images_dir
        self.accel = accel
        self.clock = clock
        self._status: dict[str, VMStatus] = {}
        self._ops_done: set[str] = set()
        self._arrivals: dict[str, dict[str, object]] = {}

    # ---- lifecycle ----------------------------------------------------------------------
    async def start(self, e: VMEntry) -> None:
        spec = e.spec
        await self._op(spec, 40, f"preparing disks on {self.node}")
        last = self._last(e)
        if last is not None and last.disks_ready:
            vm_disks = await self.disks.reuse(spec)
        else:
            if spec.disks_prepared:
                vm_disks = await self.disks.prepare(spec, Path(), "raw", 0)
            else:
                path, fmt, vsize = await self._image(spec.image)
                vm_disks = await self.disks.prepare(spec, path, fmt, vsize)
            await self._write(e, VMState.STARTING, disks_ready=True, message="disks ready")
        port = free_port(self.address)
        inst = self.instance_spec(spec, vm_disks, port)
        await self._write(e, VMState.STARTING, message="starting QEMU")
        await self._op(spec, 60, f"starting QEMU on {self.node}")
        await ensure_taps(spec, self.node)
        info = await self.hv.start(inst)
        last = self._last(e)
        boots = (last.boots if last else 0) + 1
        await self._write(
            e,
            VMState.RUNNING,
            pid=info.pid,
            boots=boots,
            message="",
            http_url=self.http_url(spec, port),
            reboot_seq=spec.reboot_seq,
        )
        if spec.power is Power.PAUSED:
            await self.hv.pause(spec.name)
            await self._write(e, VMState.PAUSED)
        await self._finish(spec, f"{spec.name} is {spec.power.value} on {self.node}")

    def instance_spec(
        self, spec: VMSpec, vm_disks: tuple[DiskSpec, ...], port: int
    ) -> InstanceSpec:
        """What QEMU runs for ``spec`` here: its NICs on its VM networks' taps, or (without
        networks) one user-mode NIC with its guest's HTTP port forwarded to ``port``."""
        return InstanceSpec(
            name=spec.name,
            uuid=spec.uuid,
            vcpus=spec.vcpus,
            memory_mib=spec.memory_mib,
            disks=vm_disks,
            accel=self.accel,
            nics=nics_for(spec, self.node, self.address, port),
        )

    def http_url(self, spec: VMSpec, port: int) -> str:
        return http_url_for(spec, self.address, port)

    def expect_arrival(self, name: str, **fields: object) -> None:
        """A VM migrating here: the status fields to record once it is placed here
        (its pid, its forwarded HTTP port)."""
        self._arrivals[name] = fields

    async def stop(self, e: VMEntry, hard: bool) -> None:
        spec = e.spec
        await self._write(e, VMState.STOPPING)
        if hard:
            await self.hv.poweroff(spec.name)
            how = "powered off"
        else:
            await self._op(spec, 50, "ACPI power button pressed; waiting for the guest")
            clean = await self.hv.shutdown(spec.name, spec.shutdown_timeout)
            how = (
                "shut down cleanly"
                if clean
                else (f"powered off after the guest ignored ACPI for {spec.shutdown_timeout:.0f}s")
            )
        await remove_taps(spec, self.node)
        await self.disks.released(spec)
        await self._write(e, VMState.STOPPED, pid=None, http_url="")
        log.info("vm %s: %s", spec.name, how)
        await self._finish(spec, f"{spec.name} {how}")

    async def reboot(self, e: VMEntry) -> None:
        spec = e.spec
        await self._write(e, VMState.REBOOTING)
        clean = await self.hv.reboot(spec.name, spec.shutdown_timeout)
        last = self._last(e)
        await self._write(
            e, VMState.RUNNING, boots=(last.boots if last else 0) + 1, reboot_seq=spec.reboot_seq
        )
        await self._finish(spec, f"{spec.name} rebooted" + ("" if clean else " (reset hard)"))

    async def pause(self, e: VMEntry) -> None:
        await self.hv.pause(e.spec.name)
        await self._write(e, VMState.PAUSED)
        await self._finish(e.spec, f"{e.spec.name} suspended")

    async def resume(self, e: VMEntry) -> None:
        await self.hv.resume(e.spec.name)
        await self._write(e, VMState.RUNNING)
        await self._finish(e.spec, f"{e.spec.name} resumed")

    async def delete(self, e: VMEntry) -> None:
        """Power off, delete the volumes the VM owns, remove its runtime files (logs
        included), then delete its keys and end its operations in one transaction: a crash
        anywhere before that leaves the spec saying ``deleting``, and the next pass goes on."""
        name = e.spec.name
        await self.hv.poweroff(name)
        await remove_taps(e.spec, self.node)
        kept = await self.disks.remove(e.spec)
        await self.hv.remove_files(name)
        note = f"; volumes not its own left alone: {', '.join(kept)}" if kept else ""
        await self._delete_keys(name, f"{name} deleted{note}")
        self._status.pop(name, None)

    async def _delete_keys(self, name: str, message: str) -> None:
        """End the VM's stray operations (one compare-and-swap each), then delete its keys and
        succeed its current operation (the delete) in one transaction (retried if the spec or
        the operation changes)."""
        for _ in range(5):
            got = await read(self.store, keys.vm_spec(name), VMSpec)
            if got is None:
                return
            spec, rev = got
            await end_strays(self.store, name, self.clock.wall())
            cmp, puts = await succeed(self.store, spec.op_id, message, self.clock.wall())
            ok = await self.store.txn(
                [Compare.unchanged(keys.vm_spec(name), rev), *cmp],
                [
                    Delete(keys.vm_prefix(name), prefix=True),
                    Delete(keys.vm_job(name)),
                    *release(spec),
                    Delete(keys.object_events("vm", name), prefix=True),
                    *puts,
                ],
            )
            if ok:
                self._ops_done.add(spec.op_id)
                log.info("vm %s: %s (operation %s)", name, message, spec.op_id or "none")
                return
        raise Conflict(f"VM {name} kept changing while its keys were deleted", vm=name)

    async def poweroff_orphan(self, name: str) -> None:
        """Power off an instance the reconciler found not placed here, after reading its
        placement and job again: a view read across a migration's end (its placement read
        before the move, its job after) must not power off the VM that just arrived."""
        placement = await read(self.store, keys.vm_placement(name), Placement)
        job = await read(self.store, keys.vm_job(name), VMJob)
        here = placement is not None and placement[0].node == self.node
        coming = job is not None and job[0].kind is JobKind.MIGRATE and job[0].target == self.node
        if here or coming:
            log.info("vm %s: placed or migrating here after all: left running", name)
            return
        await self.poweroff(name)

    async def poweroff(self, name: str) -> None:
        """Power off an instance that is not (or no longer) this node's, and remove its
        taps (a VM migrated away, or a failed migration's destination)."""
        await self.hv.poweroff(name)
        got = await read(self.store, keys.vm_spec(name), VMSpec)
        if got is not None:
            await remove_taps(got[0], self.node)

    async def guest_powered_off(self, name: str) -> str:
        """Record a power-off decided inside the guest as the desired state (not a failure:
        the VM must not be restarted). Returns a sentence."""
        got = await read(self.store, keys.vm_spec(name), VMSpec)
        if got is None:
            return f"{name} powered off from inside but has no spec: nothing to record"
        spec, rev = got
        if spec.power is Power.STOPPED:
            return f"{name} powered off from inside, as desired"
        new = spec.model_copy(update={"power": Power.STOPPED, "stop_mode": "acpi"})
        ok = await self.store.txn(
            [Compare.unchanged(keys.vm_spec(name), rev)], [Put(keys.vm_spec(name), new.dump())]
        )
        if not ok:
            return f"{name} powered off from inside while its spec changed: reconciling"
        return f"{name} powered off from inside: recorded it as stopped"

    # ---- status and operations ----------------------------------------------------------
    async def record(self, e: VMEntry, state: VMState, pid: int | None) -> None:
        arrived = self._arrivals.pop(e.spec.name, {})
        await self._write(e, state, **{**arrived, "pid": pid})
        await self.finish_op(e)

    async def finish_op(self, e: VMEntry) -> None:
        await self._finish(e.spec, f"{e.spec.name} is {e.spec.power.value} on {self.node}")

    def op_done(self, op_id: str) -> bool:
        return op_id in self._ops_done

    async def record_failure(
        self, name: str, op_id: str, error: str, attempt: int, retry_in: float, give_up: bool
    ) -> bool:
        """Record that attempt ``attempt`` of the action for operation ``op_id`` failed: state
        ``error`` with the reason, built on the last status (disks_ready, reboot_seq, boots
        and the rest stay as they were). The operation, if still running, says it is retried
        in ``retry_in`` s; with ``give_up`` it fails instead, in the same transaction as the
        status that says the agent gave up (so no later pass retries it). Returns whether it
        gave up: False if the operation had already ended (there is nothing to give up: the
        agent keeps the VM's desired state on its own)."""
        error = error[:500]
        for _ in range(5):
            if await self.store.get(keys.vm_spec(name)) is None:
                return False
            last = self._status.get(name) or await self._stored_status(name)
            op_kv = await self.store.get(keys.op(op_id)) if op_id else None
            op = Operation.load(op_kv.value) if op_kv else None
            running = op is not None and not op.state.done
            status = self._failed_status(last, op_id, error, gave_up=give_up and running)
            if not (running and give_up) or op is None or op_kv is None:
                await self.store.put(keys.vm_status(name), status.dump())
                self._status[name] = status
                if running:
                    why = error.splitlines()[0][:200] if error else "?"
                    note = f"retrying: {why} (attempt {attempt}, next in {retry_in:.0f} s)"
                    await update_op(self.store, op_id, message=note, clock=self.clock)
                return False
            failed = op.fail(f"{error} (gave up after {attempt} attempts)", self.clock.wall())
            if await self.store.txn(
                [Compare.unchanged(op_kv.key, op_kv.mod_revision)],
                [Put(keys.vm_status(name), status.dump()), Put(op_kv.key, failed.dump())],
            ):
                self._status[name] = status
                self._ops_done.add(op_id)
                log.info("operation %s (%s %s) failed: %s", op_id, op.kind, name, failed.error)
                return True
        raise Conflict(f"operation {op_id} kept changing while its failure was recorded")

    def _failed_status(
        self, last: VMStatus | None, op_id: str, error: str, gave_up: bool
    ) -> VMStatus:
        base = last.model_dump() if last is not None else {}
        base.update(
            state=VMState.ERROR,
            node=self.node,
            message=error,
            failed_op=op_id,
            gave_up=gave_up,
            updated_at=self.clock.wall(),
        )
        return VMStatus.model_validate(base)

    async def _stored_status(self, name: str) -> VMStatus | None:
        got = await read(self.store, keys.vm_status(name), VMStatus)
        return got[0] if got else None

    async def _finish(self, spec: VMSpec, message: str) -> None:
        if spec.op_id and spec.op_id not in self._ops_done:
            await update_op(
                self.store, spec.op_id, succeeded=True, message=message, clock=self.clock
            )
            self._ops_done.add(spec.op_id)

    async def _op(self, spec: VMSpec, progress: int, message: str) -> None:
        await update_op(
            self.store, spec.op_id, progress=progress, message=message, clock=self.clock
        )

    def _last(self, e: VMEntry) -> VMStatus | None:
        return self._status.get(e.spec.name) or e.status

    async def _write(self, e: VMEntry, state: VMState, **fields: object) -> None:
        last = self._last(e)
        base = last.model_dump() if last else {}
        base.update(state=state, node=self.node, updated_at=self.clock.wall())
        if state is not VMState.ERROR:  # no failure to report any more
            base.update(failed_op="", gave_up=False)
            if "message" not in fields:
                base["message"] = ""
        base.update(fields)
        status = VMStatus.model_validate(base)
        await self.store.put(keys.vm_status(e.spec.name), status.dump())
        self._status[e.spec.name] = status

    async def _image(self, name: str) -> tuple[Path, str, int]:
        got = await read(self.store, keys.image(name), ImageRecord)
        if got is None:
            raise ImageError(f"image {name} no longer exists", image=name)
        record = got[0]
        path = self.images_dir / record.file
        if not path.is_file() or path.stat().st_size != record.size_bytes:
            raise ImageError(
                f"image {name} is missing or truncated on node {self.node}", image=name
            )
        return path, record.format.value, record.virtual_size


def mac_for(uuid: str) -> str:
    """A stable locally administered MAC for a VM (QEMU's 52:54:00 prefix)."""
    h = hashlib.sha256(uuid.encode()).digest()
    return f"52:54:00:{h[0]:02x}:{h[1]:02x}:{h[2]:02x}"


def free_port(address: str) -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((address, 0))
        port: int = s.getsockname()[1]
        return port
