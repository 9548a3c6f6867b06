"""The cluster's request logic, below the REST layer: validate, then write desired state and an
operation in one transaction. Nothing here talks HTTP; every error is an ``AecpError``.

Ordering: a mutating request checks everything it can *before* its single store transaction, so
a refused request changes nothing that was stored.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Protocol

from aecp.cluster.images import ImageService
from aecp.cluster.networks import NetworkService, release
from aecp.cluster.operations import OperationService
from aecp.cluster.scheduler import choose_node
from aecp.common.clock import SYSTEM_CLOCK, Clock
from aecp.common.errors import (
    AecpError,
    AlreadyExists,
    Conflict,
    InvalidInput,
    InvalidState,
    NotFound,
    StoreUnavailable,
)
from aecp.common.requester import REQUESTED_BY
from aecp.model.base import check_name
from aecp.model.event import ObjectEvent
from aecp.model.image import ImageRecord
from aecp.model.node import NodeState
from aecp.model.operation import Operation, new_op_id
from aecp.model.vm import (
    PowerOp,
    VMCreate,
    VMSpec,
    VMState,
    VMStatus,
    apply_power_op,
    check_deletable,
)
from aecp.model.vmjob import VMJob
from aecp.store import keys
from aecp.store.base import Compare, Delete, Put, Store
from aecp.store.history import History
from aecp.store.opsend import end_strays, succeed, supersede
from aecp.store.typed import read, update_op
from aecp.store.view import ClusterView, VMEntry, read_cluster

log = logging.getLogger(__name__)
CREATE_ATTEMPTS = 32


class DiskRemover(Protocol):
    async def remove(self, spec: VMSpec) -> list[str]:
        """Delete the volumes ``spec``'s VM owns; returns those of its names left alone."""
        ...


class VMService:
    """VM requests over the cluster store (nodes: ``cluster.nodes``; images:
    ``cluster.images``; operations: ``cluster.operations``). ``disks`` deletes the
    volumes of a VM deleted before it reached a node (a clone or a template's VM owns its
    volumes from the start); without it (tests without storage) they are not touched."""

    def __init__(
        self,
        store: Store,
        images_dir: Path,
        clock: Clock = SYSTEM_CLOCK,
        disks: DiskRemover | None = None,
    ) -> None:
        self.store = store
        self.images_dir = images_dir
        self.clock = clock
        self.disks = disks
        self.image_service = ImageService(store, images_dir, clock)
        self.networks = NetworkService(store, clock)

    # ---- reads -------------------------------------------------------------------------
    async def cluster_view(self) -> ClusterView:
        return await read_cluster(self.store)

    async def vm_events(self, name: str) -> list[ObjectEvent]:
        """The events of an existing VM, newest first (``NotFound`` otherwise)."""
        await self.vm(name)
        return await History(self.store, "").events("vm", name)

    async def operation(self, op_id: str) -> Operation:
        return await OperationService(self.store).operation(op_id)

    async def vm(self, name: str) -> tuple[VMEntry, ClusterView]:
        check_name("name", name)
        snap = await self.cluster_view()
        if name not in snap.vms:
            raise NotFound(f"VM {name} does not exist", vm=name)
        return snap.vms[name], snap

    # ---- VM create / power / delete -------------------------------------------------------
    async def create_vm(self, req: VMCreate) -> tuple[VMSpec, Operation]:
        """Validate ``req`` fully, then store the spec and a ``vm.create`` operation atomically
        (while none of the VM's volume names is taken: the node creates them as its own)."""
        image = await self.validate_new(req)
        assert image is not None
        op = self.new_op("vm.create", req.name, f"creating from image {image.name}")
        spec = await self.new_spec(req, op.id)
        spec = spec.model_copy(update={"source": f"image {image.name}"})
        spec = await self.store_new(spec, op, volumes_free=True)
        return spec, op

    async def new_spec(self, req: VMCreate, op_id: str) -> VMSpec:
        """The spec of a new VM; its NICs (one per network of ``req``) get their addresses
        when it is stored (``store_new``)."""
        vlans = await self.networks.vlans(req.networks)
        return VMSpec.from_create(req, op_id, self.clock.wall(), vlans)

    async def validate_new(self, req: VMCreate, image: bool = True) -> ImageRecord | None:
        """Every check of a new VM that can be made before storing it (``image``: it boots
        from an image, not from cloned volumes), including that no volume holds one of the
        names its disks will have."""
        req.validate_fields()
        snap = await self.cluster_view()
        if req.name in snap.vms:
            raise AlreadyExists(f"VM {req.name} already exists", field="name")
        for e in snap.vms.values():
            if e.job is not None and e.job.kind == "clone" and e.job.target == req.name:
                raise AlreadyExists(
                    f"VM {req.name} is being made as a clone of {e.spec.name} ({e.job.op_id})",
                    field="name",
                )
        await self._check_volume_names(VMSpec.from_create(req, "", 0.0))
        self._check_fits(req, snap)
        await self.networks.vlans(req.networks)  # each exists
        return await self._usable_image(req.image) if image else None

    async def _check_volume_names(self, spec: VMSpec) -> None:
        """``AlreadyExists`` naming the first volume that already holds a name of ``spec``'s
        disks: a VM never takes over a volume it did not create."""
        for name in spec.volumes():
            if await self.store.get(keys.abs_volume(name)) is not None:
                raise AlreadyExists(
                    f"volume {name} already exists and VM {spec.name} would keep its disk "
                    f"there; choose another VM name (or delete the volume)",
                    field="name",
                    volume=name,
                )

    async def store_new(
        self,
        spec: VMSpec,
        op: Operation,
        volumes_free: bool = False,
        guards: Sequence[Compare] = (),
        also: Sequence[Put | Delete] = (),
    ) -> VMSpec:
        """Store a new VM's spec and its operation (and ``also``) in one transaction, its NICs
        given their addresses in the same transaction (``NetworkService.allocate_nics``; an
        address taken meanwhile: picked again); ``volumes_free``: only while no volume holds
        one of its disks' names (``AlreadyExists`` naming it); ``guards``: only while they hold
        too (``Conflict`` if one failed: the volumes made for the VM, or the job making it,
        changed meanwhile). Returns the spec as stored."""
        cmp = [Compare.absent(keys.vm_spec(spec.name)), *guards]
        if volumes_free:
            cmp += [Compare.absent(keys.abs_volume(v)) for v in spec.volumes()]
        # a lost race means another creation took an address (progress): enough attempts for
        # that many VMs created at once on one network
        for _ in range(CREATE_ATTEMPTS):
            alloc = await self.networks.allocate_nics(spec)
            stored = spec.model_copy(update={"nics": alloc.nics})
            puts = [Put(keys.vm_spec(spec.name), stored.dump()), Put(keys.op(op.id), op.dump())]
            if await self.store.txn([*cmp, *alloc.guards], [*puts, *also, *alloc.puts]):
                break
            if await self.store.get(keys.vm_spec(spec.name)) is not None:
                raise AlreadyExists(f"VM {spec.name} already exists", field="name")
            if volumes_free:
                await self._check_volume_names(spec)
            if not await self.networks.taken_meanwhile(alloc):
                raise Conflict(
                    f"VM {spec.name}: its disks changed while it was created; try again",
                    vm=spec.name,
                )
        else:
            raise Conflict(
                f"VM {spec.name}: its networks' addresses kept changing; try again", vm=spec.name
            )
        log.info(
            "vm %s: created (%d vCPUs, %d MiB, %s%s) as %s",
            spec.name,
            spec.vcpus,
            spec.memory_mib,
            spec.source,
            "".join(f", {n.network} {n.ip}" for n in stored.nics),
            op.id,
        )
        return stored

    def _check_fits(self, req: VMCreate, snap: ClusterView) -> None:
        views = snap.node_views()
        if req.node is not None and req.node not in snap.nodes:
            raise InvalidInput("node", f"node {req.node} does not exist")
        most = max((v.capacity.cpus for v in views), default=0)
        if req.vcpus > most:
            raise InvalidInput("vcpus", f"{req.vcpus} vCPUs is more than any node has ({most})")
        most_mem = max((v.capacity.memory_mib for v in views), default=0)
        if req.memory_mib > most_mem:
            raise InvalidInput(
                "memory_mib", f"{req.memory_mib} MiB is more than any node has ({most_mem} MiB)"
            )
        if req.node is not None and snap.node_view(req.node).state is not NodeState.READY:
            raise Conflict(f"node {req.node} is unreachable", field="node")
        probe = VMSpec.from_create(req, "", 0.0)
        choose_node(probe, views)  # raises NoCapacity with the reason per node

    async def _usable_image(self, name: str) -> ImageRecord:
        return await self.image_service.usable(name)

    async def power(self, name: str, op: PowerOp) -> Operation:
        """Apply a power operation; ``InvalidState`` when it is not valid in the VM's state.
        The VM's previous operation, if still running, is cancelled as superseded in the same
        transaction."""
        for _ in range(5):
            entry, snap = await self.vm(name)
            _refuse_start_in_maintenance(op, entry, snap)
            new_op = self.new_op(f"vm.{op.value}", name, f"{op.value} requested")
            spec = apply_power_op(op, entry.spec, snap.vm_state(name), new_op.id)
            if await self._swap_spec(entry, spec, new_op):
                log.info("vm %s: %s requested as %s", name, op.value, new_op.id)
                return new_op
        raise Conflict(f"VM {name} keeps changing; try again", vm=name)

    async def delete_vm(self, name: str) -> Operation:
        """Delete a stopped (or failed) VM: mark its spec ``deleting`` with a ``vm.delete``
        operation (its previous operation, if still running, is superseded), then its node
        carries the delete out; a VM no node has is deleted by this call (``_delete_unplaced``).
        Deleting such a VM again after an interrupted delete finishes that delete."""
        for _ in range(5):
            entry, snap = await self.vm(name)
            state = snap.vm_state(name)
            if entry.spec.deleting and entry.placement is None and state is not VMState.ERROR:
                return await self._delete_unplaced(name, entry.spec.op_id)
            check_deletable(entry.spec, state)
            if entry.job is not None:
                raise InvalidState(
                    f"VM {name} has a {entry.job.describe()} in progress ({entry.job.op_id}); "
                    "wait for it to end",
                    operation=entry.job.op_id,
                )
            op = self.new_op("vm.delete", name, "delete requested")
            spec = entry.spec.model_copy(update={"deleting": True, "op_id": op.id})
            unplaced = entry.placement is None
            guard = [await self.job_guard(entry.spec)]
            if unplaced:
                guard.append(Compare.absent(keys.vm_placement(name)))
            if await self._swap_spec(entry, spec, op, guard):
                log.info("vm %s: delete requested as %s", name, op.id)
                return await self._delete_unplaced(name, op.id) if unplaced else op
        raise Conflict(f"VM {name} keeps changing; try again", vm=name)

    async def _delete_unplaced(self, name: str, op_id: str) -> Operation:
        """Carry out delete ``op_id`` of VM ``name``, marked ``deleting`` while no node had it:
        delete the volumes it owns (a clone's), end its stray operations, then delete its keys
        and succeed the operation in one transaction. The spec says ``deleting`` until that
        transaction, so a crash anywhere before it is finished by the next delete request; a
        failure to delete a volume fails the operation and leaves the VM in state ``error``
        (it can be deleted again). If a node has the VM meanwhile, that node carries it out."""
        for _ in range(5):
            got = await read(self.store, keys.vm_spec(name), VMSpec)
            if got is None or not got[0].deleting or got[0].op_id != op_id:
                return await self.operation(op_id)  # done, or taken over by a later delete
            spec, rev = got
            if await self.store.get(keys.vm_placement(name)) is not None:
                return await self.operation(op_id)  # its node carries the delete out
            try:
                kept = await self.disks.remove(spec) if self.disks is not None else []
            except StoreUnavailable:
                raise  # nothing known to be wrong with the VM: the next request goes on
            except AecpError as exc:
                return await self._delete_failed(spec, exc.message)
            await end_strays(self.store, name, self.clock.wall())
            note = f"; volumes left alone (not its own): {', '.join(kept)}" if kept else ""
            cmp, puts = await succeed(self.store, op_id, f"{name} deleted{note}", self.clock.wall())
            if await self.store.txn(
                [
                    Compare.unchanged(keys.vm_spec(name), rev),
                    Compare.absent(keys.vm_placement(name)),
                    *cmp,
                ],
                [
                    Delete(keys.vm_prefix(name), prefix=True),
                    Delete(keys.vm_job(name)),
                    Delete(keys.object_events("vm", name), prefix=True),
                    *release(spec),
                    *puts,
                ],
            ):
                log.info("vm %s: deleted at once (never placed) as %s", name, op_id)
                return await self.operation(op_id)
        raise Conflict(f"VM {name} kept changing while it was deleted; try again", vm=name)

    async def _delete_failed(self, spec: VMSpec, error: str) -> Operation:
        """Record that deleting an unplaced VM failed: state ``error`` with the reason (it can
        be deleted again) and its delete operation failed."""
        status = VMStatus(
            state=VMState.ERROR,
            message=error[:500],
            failed_op=spec.op_id,
            updated_at=self.clock.wall(),
        )
        await self.store.put(keys.vm_status(spec.name), status.dump())
        failed = await update_op(self.store, spec.op_id, error=error[:500], clock=self.clock)
        log.warning("vm %s: delete failed: %s", spec.name, error)
        return failed if failed is not None else await self.operation(spec.op_id)

    async def _ending(self, entry: VMEntry, new_op: str) -> tuple[list[Compare], list[Put]]:
        """Guards and writes that supersede the VM's current operation by ``new_op``."""
        return await supersede(self.store, entry.spec.op_id, new_op, self.clock.wall())

    async def _swap_spec(
        self, entry: VMEntry, spec: VMSpec, op: Operation, guards: Sequence[Compare] = ()
    ) -> bool:
        cmp, puts = await self._ending(entry, op.id)
        return await self.store.txn(
            [Compare.unchanged(keys.vm_spec(spec.name), entry.spec_rev), *guards, *cmp],
            [Put(keys.vm_spec(spec.name), spec.dump()), Put(keys.op(op.id), op.dump()), *puts],
        )

    async def job_guard(self, spec: VMSpec) -> Compare:
        """A guard that the VM has no job: its job key is absent, or still the one left by
        an earlier VM of that name (a VM deleted by a version before jobs; the delete of this
        one deletes it)."""
        kv = await self.store.get(keys.vm_job(spec.name))
        if kv is not None and VMJob.load(kv.value).vm_uuid != spec.uuid:
            return Compare.unchanged(kv.key, kv.mod_revision)
        return Compare.absent(keys.vm_job(spec.name))

    def new_op(self, kind: str, target: str, message: str) -> Operation:
        now = self.clock.wall()
        return Operation(
            id=new_op_id(),
            kind=kind,
            target=target,
            message=message,
            requested_by=REQUESTED_BY.get(),
            created_at=now,
            updated_at=now,
        )

    # ---- images (``cluster.images``) -------------------------------------------------------
    async def images(self) -> list[ImageRecord]:
        return await self.image_service.images()

    async def image(self, name: str) -> ImageRecord:
        return await self.image_service.image(name)

    async def register_image(self, record: ImageRecord) -> None:
        await self.image_service.register(record)

    async def delete_image(self, name: str) -> None:
        await self.image_service.delete(name)


def _refuse_start_in_maintenance(op: PowerOp, entry: VMEntry, snap: ClusterView) -> None:
    """A stopped VM left on a node in maintenance (pinned there, or no room elsewhere) is not
    started there: ``InvalidState`` naming the node's state."""
    node = entry.node
    admin = snap.admin.get(node) if node else None
    if op is PowerOp.START and admin is not None and not admin.in_use:
        raise InvalidState(
            f"VM {entry.spec.name} is on node {node}, which is {admin.maintenance.value}: "
            "migrate it to another node, or end the maintenance, to start it",
            node=node,
        )
