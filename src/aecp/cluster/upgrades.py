"""What a node does once at start so that records written by older versions gain what newer
ones have: the cluster gets its stable id, and its one token from before principals becomes
the ``admin`` principal's. Each step writes only if nobody did it yet (create-if-absent or
compare-and-swap), so every node may run them, at once.
"""

from __future__ import annotations

import logging

from aecp.cluster.principals import legacy_admin
from aecp.common.clock import SYSTEM_CLOCK, Clock
from aecp.common.errors import AecpError
from aecp.model.cluster import ClusterInfo, new_cluster_id
from aecp.model.principal import FIRST_ADMIN
from aecp.store import keys
from aecp.store.base import Store
from aecp.store.typed import read

log = logging.getLogger(__name__)


async def upgrade_records(store: Store, clock: Clock = SYSTEM_CLOCK) -> None:
    await give_cluster_id(store)
    await adopt_first_token(store, clock)


async def give_cluster_id(store: Store) -> str:
    """The cluster's id, made now if its record has none. "" if there is no record."""
    for _ in range(5):
        got = await read(store, keys.CLUSTER, ClusterInfo)
        if got is None:
            return ""
        info, rev = got
        if info.id:
            return info.id
        new = info.model_copy(update={"id": new_cluster_id()})
        if await store.replace(keys.CLUSTER, new.dump(), mod_revision=rev):
            log.info("cluster %s: its id is %s", info.name, new.id)
            return new.id
    return ""


async def adopt_first_token(store: Store, clock: Clock = SYSTEM_CLOCK) -> bool:
    """Make the token of a cluster from before principals the ``admin`` principal's (once,
    while none exists). True if it did."""
    if await store.list(keys.PRINCIPALS):
        return False
    got = await read(store, keys.CLUSTER, ClusterInfo)
    if got is None or not got[0].token_sha256:
        return False
    rec = legacy_admin(got[0].token_sha256, clock.wall())
    made = await store.create(keys.principal(FIRST_ADMIN), rec.dump())
    if made:
        log.info("the cluster's token is now principal %s (admin)", FIRST_ADMIN)
    return made


async def upgrade_until_done(store: Store, clock: Clock = SYSTEM_CLOCK, every: float = 5.0) -> None:
    """``upgrade_records`` until it succeeds (a task of its own: never in a lease's way)."""
    while True:
        try:
            await upgrade_records(store, clock)
            return
        except AecpError as exc:
            log.warning("records not upgraded yet (again in %.0f s): %s", every, exc)
        await clock.sleep(every)
