"""Nodes as the API reads them, and what the administrator says of them (cordon; the agent's
own record is the agent's: ``docs/design/foundation.md``)."""

from __future__ import annotations

import logging

from aecp.common.clock import SYSTEM_CLOCK, Clock
from aecp.common.errors import AecpError, NotFound
from aecp.model.event import ObjectEvent
from aecp.model.node import NodeAdmin, NodeView
from aecp.store import keys
from aecp.store.base import Compare, Put, Store
from aecp.store.history import History
from aecp.store.view import read_cluster

log = logging.getLogger(__name__)


class NodeService:
    def __init__(self, store: Store, clock: Clock = SYSTEM_CLOCK) -> None:
        self.store = store
        self.clock = clock

    async def nodes(self) -> list[NodeView]:
        return (await read_cluster(self.store)).node_views()

    async def node(self, name: str) -> NodeView:
        view = await read_cluster(self.store)
        if name not in view.nodes:
            raise NotFound(f"node {name} does not exist", node=name)
        return view.node_view(name)

    async def events(self, name: str) -> list[ObjectEvent]:
        """The events of an existing node, newest first (``NotFound`` otherwise)."""
        await self.node(name)
        return await History(self.store, "").events("node", name)

    async def set_cordon(self, name: str, cordoned: bool, reason: str = "") -> NodeView:
        """Cordon node ``name`` (no new VM is placed on it; those there stay) or uncordon it.
        Writes the node's admin key only while the node exists; a change (not a repeat) is
        recorded as a node event, and a failure to record it fails nothing."""
        before = (await read_cluster(self.store)).admin.get(name, NodeAdmin())
        admin = NodeAdmin(cordoned=cordoned, reason=reason, updated_at=self.clock.wall())
        exists = Compare(keys.node(name), "create", ">", 0)
        if not await self.store.txn([exists], [Put(keys.node_admin(name), admin.dump())]):
            raise NotFound(f"node {name} does not exist", node=name)
        if (before.cordoned, before.reason) != (cordoned, reason):
            if cordoned:
                sentence = f"cordoned: {reason}" if reason else "cordoned"
            else:
                sentence = "uncordoned: VMs may be placed on it again"
            log.info("node %s: %s", name, sentence)
            try:
                await History(self.store, "", self.clock).record("node", name, "api", sentence)
            except AecpError as exc:
                log.warning("node %s: event not recorded: %s", name, exc)
        return await self.node(name)
