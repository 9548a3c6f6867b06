"""Nodes as the API reads them, and what the administrator says of them: cordon, and the
maintenance requests (the agent's own record is the agent's: ``docs/design/foundation.md``;
maintenance mode: ``docs/design/maintenance.md``).

Every write of a node's admin key is a compare-and-swap on the revision read, so the API's
writes and the drain controller's (``cluster.drain``) never overwrite each other's fields.
"""

from __future__ import annotations

import asyncio
import logging

from aecp.cluster.maintenance import Action, Failure, Storage, check_exit, precheck
from aecp.cluster.scheduler import node_views
from aecp.common.clock import SYSTEM_CLOCK, Clock
from aecp.common.errors import AecpError, Conflict, InvalidState, NotFound
from aecp.common.requester import REQUESTED_BY
from aecp.model.event import ObjectEvent
from aecp.model.node import MaintenanceState, NodeAdmin, NodeView
from aecp.model.operation import Operation, new_op_id
from aecp.storage.meta.model import ExtentRecord, RecoveryRecord, VolumeRecord
from aecp.store import keys
from aecp.store.base import Compare, Put, Store
from aecp.store.history import History
from aecp.store.view import ClusterView, read_cluster

log = logging.getLogger(__name__)

MAINTENANCE_KIND = "node.maintenance"
TRIES = 5


class NodeService:
    def __init__(self, store: Store, clock: Clock = SYSTEM_CLOCK) -> None:
        self.store = store
        self.clock = clock

    async def nodes(self) -> list[NodeView]:
        return node_views(await read_cluster(self.store))

    async def node(self, name: str) -> NodeView:
        return _view(await self._known(name), name)

    async def events(self, name: str) -> list[ObjectEvent]:
        """The events of an existing node, newest first (``NotFound`` otherwise)."""
        await self.node(name)
        return await History(self.store, "").events("node", name)

    async def set_cordon(self, name: str, cordoned: bool, reason: str = "") -> NodeView:
        """Cordon node ``name`` (no new VM is placed on it; those there stay) or uncordon it.
        Writes the node's admin key only while the node exists, by compare-and-swap (its
        maintenance fields are kept); a change (not a repeat) is recorded as a node event,
        and a failure to record it fails nothing."""
        for _ in range(TRIES):
            snap = await self._known(name)
            before = snap.admin.get(name, NodeAdmin())
            admin = before.model_copy(
                update={"cordoned": cordoned, "reason": reason, "updated_at": self.clock.wall()}
            )
            if await self._swap(snap, name, admin):
                break
        else:
            raise Conflict(f"node {name} keeps changing; try again", node=name)
        if (before.cordoned, before.reason) != (cordoned, reason):
            if cordoned:
                sentence = f"cordoned: {reason}" if reason else "cordoned"
            else:
                sentence = "uncordoned: VMs may be placed on it again"
            await self._record(name, sentence)
        return await self.node(name)

    # ---- maintenance ---------------------------------------------------------------------
    async def enter_maintenance(self, name: str, shutdown_unmigratable: bool = False) -> Operation:
        """Run the pre-checks (``cluster.maintenance``); if any fails, ``InvalidState`` listing
        every one (``checks``: ``[{check, reason}]``) and nothing changed. Else, in one
        transaction guarded on every node's admin key as read (two nodes asked at once cannot
        both pass the one-at-a-time check), the node ``entering_maintenance`` and its
        ``node.maintenance`` operation, which the drain controller carries out."""
        for _ in range(TRIES):
            snap = await self._known(name)
            check = precheck(snap, name, await read_storage(self.store), shutdown_unmigratable)
            if not check.ok:
                raise _refused(name, check.failures)
            moving = sum(m.action is not Action.STAY for m in check.plan)
            op = self._new_op(name, f"entering maintenance: {moving} VMs to move or power off")
            now = self.clock.wall()
            admin = snap.admin.get(name, NodeAdmin()).model_copy(
                update={
                    "maintenance": MaintenanceState.ENTERING,
                    "maintenance_since": now,
                    "maintenance_op": op.id,
                    "maintenance_error": "",
                    "shutdown_unmigratable": shutdown_unmigratable,
                    "restore_vms": False,
                    "drain_vm": "",
                    "drain_op": "",
                    "evacuated": [],
                    "cold_moved": [],
                    "powered_off": [],
                    "restoring": [],
                    "updated_at": now,
                }
            )
            guards = [snap.admin_unchanged(n) for n in snap.nodes if n != name]
            if await self._swap(snap, name, admin, op, guards):
                how = " (powering off what cannot move)" if shutdown_unmigratable else ""
                await self._record(name, f"entering maintenance{how} as {op.id}")
                return op
        raise Conflict(f"the nodes keep changing; try entering maintenance on {name} again")

    async def exit_maintenance(self, name: str, restore_vms: bool = False) -> Operation:
        """``InvalidState`` unless node ``name`` is in maintenance; else the node
        ``exiting_maintenance`` with a ``node.maintenance`` operation (the drain controller
        returns it to use and, with ``restore_vms``, moves its evacuated VMs back)."""
        for _ in range(TRIES):
            snap = await self._known(name)
            why = check_exit(snap, name)
            if why:
                state = snap.admin.get(name, NodeAdmin()).maintenance
                raise InvalidState(why, node=name, state=state.value)
            how = ", moving its VMs back" if restore_vms else ""
            op = self._new_op(name, f"exiting maintenance{how}")
            admin = snap.admin[name].model_copy(
                update={
                    "maintenance": MaintenanceState.EXITING,
                    "maintenance_op": op.id,
                    "restore_vms": restore_vms,
                    "updated_at": self.clock.wall(),
                }
            )
            if await self._swap(snap, name, admin, op):
                await self._record(name, f"exiting maintenance{how} as {op.id}")
                return op
        raise Conflict(f"node {name} keeps changing; try again", node=name)

    # ---- helpers -------------------------------------------------------------------------
    async def _known(self, name: str) -> ClusterView:
        snap = await read_cluster(self.store)
        if name not in snap.nodes:
            raise NotFound(f"node {name} does not exist", node=name)
        return snap

    async def _swap(
        self,
        snap: ClusterView,
        name: str,
        admin: NodeAdmin,
        op: Operation | None = None,
        guards: list[Compare] | None = None,
    ) -> bool:
        """Write ``admin`` (and ``op``) if the node exists and its admin key is as read;
        ``NotFound`` if the node is gone."""
        exists = Compare(keys.node(name), "create", ">", 0)
        puts = [Put(keys.node_admin(name), admin.dump())]
        if op is not None:
            puts.append(Put(keys.op(op.id), op.dump()))
        cmp = [exists, snap.admin_unchanged(name), *(guards or [])]
        if await self.store.txn(cmp, puts):
            return True
        if await self.store.get(keys.node(name)) is None:
            raise NotFound(f"node {name} does not exist", node=name)
        return False

    def _new_op(self, name: str, message: str) -> Operation:
        now = self.clock.wall()
        return Operation(
            id=new_op_id(),
            kind=MAINTENANCE_KIND,
            target=name,
            message=message,
            requested_by=REQUESTED_BY.get(),
            created_at=now,
            updated_at=now,
        )

    async def _record(self, name: str, sentence: str) -> None:
        log.info("node %s: %s", name, sentence)
        try:
            await History(self.store, "", self.clock).record("node", name, "api", sentence)
        except AecpError as exc:
            log.warning("node %s: event not recorded: %s", name, exc)


def _view(snap: ClusterView, name: str) -> NodeView:
    return snap.node_view(name).under(snap.admin.get(name, NodeAdmin()))


def _refused(name: str, failures: list[Failure]) -> InvalidState:
    listed = "; ".join(str(f) for f in failures)
    return InvalidState(
        f"node {name} cannot enter maintenance: {len(failures)} pre-checks failed: {listed}",
        node=name,
        checks=[{"check": f.check, "reason": f.reason} for f in failures],
    )


async def read_storage(store: Store) -> Storage:
    """What the storage pre-checks read: extents, volumes, live servers, copies running."""
    ext_kvs, vol_kvs, server_kvs, copy_kvs = await asyncio.gather(
        store.list(keys.ABS_EXTENTS),
        store.list(keys.ABS_VOLUMES),
        store.list(keys.ABS_SERVERS),
        store.list(keys.ABS_RECOVERY),
    )
    servers = {keys.last_segment(kv.key, keys.ABS_SERVERS) for kv in server_kvs}
    return Storage(
        extents=[ExtentRecord.load(kv.value) for kv in ext_kvs],
        volumes=[VolumeRecord.load(kv.value) for kv in vol_kvs],
        servers=servers or None,  # no server registered (no ABS here): every replica counts
        recovering=[RecoveryRecord.load(kv.value) for kv in copy_kvs],
    )
