"""The center's copy of every cluster's objects, kept current from the cluster's change feed.

``resync`` reads a cluster's lists whole (after noting the feed's position) and replaces the
cluster's copy in one transaction; ``follow`` reads the feed from the kept position for a
while, reads each changed object again (the feed says what changed, not what it is) and keeps
the position of the last event handled, so a reconnect misses nothing. A position the cluster
compacted (410) is a resync. A cluster that does not answer is marked ``unreachable`` with
its error; its copy and the time of its last good sync stay, and are served with their age.
Each cluster is its own task (``Syncer``), with a timeout on every call, so a slow or dead
cluster never holds up another.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import AsyncIterator
from typing import Any

import httpx
from sqlalchemy import delete, select
from sqlalchemy.orm import Session as DB
from sqlalchemy.orm import sessionmaker

from aecp.center.db.models import Cluster, ClusterSync, InventoryObject
from aecp.center.registry import ClientFactory, Registry
from aecp.common.clock import SYSTEM_CLOCK, Clock
from aecp.common.errors import AecpError
from aecp.common.tasks import cancel, spawn

log = logging.getLogger(__name__)
CALL_TIMEOUT = 10.0  # s: one call to a cluster
FOLLOW_FOR = 25.0  # s: one stream of the feed, then another from the position reached
RESYNC_EVERY = 600.0  # s: a whole read as a safety net
RETRY_AFTER = 5.0  # s: after a failure
# the kinds kept, the list each is read from, and the key that names an object of it
KINDS: dict[str, tuple[str, str]] = {
    "node": ("/v1/nodes", "name"),
    "vm": ("/v1/vms", "name"),
    "volume": ("/v1/volumes", "name"),
    "template": ("/v1/templates", "name"),
    "operation": ("/v1/operations", "id"),
}


class Gone(Exception):
    """The kept position is compacted in the cluster (410): read everything again."""


class Inventory:
    def __init__(
        self,
        sessions: sessionmaker[DB],
        registry: Registry,
        client_factory: ClientFactory,
        clock: Clock = SYSTEM_CLOCK,
    ) -> None:
        self.sessions, self.registry = sessions, registry
        self.client_factory, self.clock = client_factory, clock

    def _target(self, cluster: str) -> tuple[str, dict[str, str]]:
        with self.sessions() as db:
            c = db.get(Cluster, cluster)
            if c is None:
                raise LookupError(cluster)
            return self.registry.address(c), {"authorization": f"Bearer {self.registry.token(c)}"}

    async def resync(self, cluster: str) -> int:
        """Read the cluster whole and replace its copy; returns how many objects it has."""
        endpoint, auth = await asyncio.to_thread(self._target, cluster)
        async with self.client_factory() as http:
            position = await _position(http, endpoint, auth)
            lists = {
                kind: await _get(http, endpoint + path, auth) for kind, (path, _) in KINDS.items()
            }
        now = self.clock.wall()

        def replace() -> int:
            with self.sessions.begin() as db:
                db.execute(delete(InventoryObject).where(InventoryObject.cluster == cluster))
                count = 0
                for kind, items in lists.items():
                    key = KINDS[kind][1]
                    for item in items:
                        db.add(
                            InventoryObject(
                                cluster=cluster,
                                kind=kind,
                                name=str(item[key]),
                                data=json.dumps(item),
                                synced_at=now,
                                **_columns(item),
                            )
                        )
                        count += 1
                self._synced(db, cluster, position, now)
            return count

        count = await asyncio.to_thread(replace)  # never the event loop: other clusters go on
        log.info("center: cluster %s read whole (%d objects)", cluster, count)
        return count

    async def follow(self, cluster: str, wait: float = FOLLOW_FOR) -> int:
        """Handle the feed's events from the kept position for ``wait`` seconds; returns how
        many. ``Gone`` if the position is compacted."""
        endpoint, auth = await asyncio.to_thread(self._target, cluster)
        position = await asyncio.to_thread(self._position_kept, cluster)
        if not position:
            raise Gone(cluster)
        handled = 0
        async with self.client_factory() as http:
            async for ident, event, data in _events(http, endpoint, auth, position, wait):
                if event == "error":
                    if data.get("error") == "compacted":
                        raise Gone(cluster)
                    raise httpx.HTTPError(f"the feed ended with an error: {data}")
                if event in KINDS:
                    await self._refresh(http, endpoint, auth, cluster, event, data)
                await asyncio.to_thread(self._mark, cluster, ident)
                handled += 1
        await asyncio.to_thread(self._mark, cluster, None)
        return handled

    def _position_kept(self, cluster: str) -> str:
        with self.sessions() as db:
            sync = db.get(ClusterSync, cluster)
            return sync.position if sync else ""

    def _mark(self, cluster: str, position: str | None) -> None:
        with self.sessions.begin() as db:
            self._synced(db, cluster, position, self.clock.wall())

    async def _refresh(
        self,
        http: httpx.AsyncClient,
        endpoint: str,
        auth: dict[str, str],
        cluster: str,
        kind: str,
        data: dict[str, Any],
    ) -> None:
        """Read the changed object again (or its list, for kinds without a page of their own)
        and keep it, or forget it if it is gone."""
        name = str(data["name"])
        path, key = KINDS[kind]
        now = self.clock.wall()
        if kind == "template":
            items = {str(t[key]): t for t in await _get(http, endpoint + path, auth)}
            item = items.get(name)
        else:
            r = await http.get(f"{endpoint}{path}/{name}", headers=auth, timeout=CALL_TIMEOUT)
            item = r.json() if r.status_code == 200 else None
            if r.status_code not in (200, 404):
                r.raise_for_status()
        await asyncio.to_thread(self._keep, cluster, kind, name, item, now)

    def _keep(
        self, cluster: str, kind: str, name: str, item: dict[str, Any] | None, now: float
    ) -> None:
        with self.sessions.begin() as db:
            row = db.get(InventoryObject, (cluster, kind, name))
            if item is None:
                if row is not None:
                    db.delete(row)
            elif row is None:
                db.add(
                    InventoryObject(
                        cluster=cluster,
                        kind=kind,
                        name=name,
                        data=json.dumps(item),
                        synced_at=now,
                        **_columns(item),
                    )
                )
            else:
                row.data, row.synced_at = json.dumps(item), now
                for column, value in _columns(item).items():
                    setattr(row, column, value)

    def unreachable(self, cluster: str, error: str) -> None:
        """Say so; the copy and the time of its last good sync stay."""
        with self.sessions.begin() as db:
            sync = db.get(ClusterSync, cluster)
            if sync is None:
                if db.get(Cluster, cluster) is None:
                    return
                sync = ClusterSync(cluster=cluster, position="", last_sync_at=0.0)
                db.add(sync)
            sync.state, sync.error = "unreachable", error[:500]

    @staticmethod
    def _synced(db: DB, cluster: str, position: str | None, now: float) -> None:
        sync = db.get(ClusterSync, cluster)
        if sync is None:
            sync = ClusterSync(cluster=cluster, position=position or "", last_sync_at=now)
            db.add(sync)
        if position is not None:
            sync.position = position
        sync.last_sync_at, sync.state, sync.error = now, "ok", ""

    def objects(self, db: DB, kind: str, cluster: str | None = None) -> list[InventoryObject]:
        q = select(InventoryObject).where(InventoryObject.kind == kind)
        if cluster is not None:
            q = q.where(InventoryObject.cluster == cluster)
        return list(db.scalars(q.order_by(InventoryObject.cluster, InventoryObject.name)))


def _columns(item: dict[str, Any]) -> dict[str, str]:
    """What lists filter and sort on, out of an object's JSON."""
    return {"state": str(item.get("state") or "")[:32], "node": str(item.get("node") or "")[:64]}


class Syncer:
    """One task per registered cluster: resync, then follow the feed; a failure marks the
    cluster unreachable and is retried; a safety resync every ``RESYNC_EVERY`` seconds."""

    def __init__(self, inventory: Inventory, clock: Clock = SYSTEM_CLOCK) -> None:
        self.inventory, self.clock = inventory, clock
        self._tasks: dict[str, asyncio.Task[None]] = {}

    def watch(self, cluster: str) -> None:
        if cluster not in self._tasks or self._tasks[cluster].done():
            self._tasks[cluster] = spawn(self._run(cluster), name=f"sync-{cluster}")

    async def forget(self, cluster: str) -> None:
        await cancel(self._tasks.pop(cluster, None))

    async def close(self) -> None:
        await cancel(*self._tasks.values())
        self._tasks.clear()

    async def _run(self, cluster: str) -> None:
        resync_at = 0.0
        while True:
            try:
                if self.clock.monotonic() >= resync_at:
                    await self.inventory.resync(cluster)
                    resync_at = self.clock.monotonic() + RESYNC_EVERY
                await self.inventory.follow(cluster)
            except LookupError:
                return  # removed
            except Gone:
                resync_at = 0.0
            except Exception as exc:
                why = exc.message if isinstance(exc, AecpError) else f"{type(exc).__name__}: {exc}"
                try:
                    await asyncio.to_thread(self.inventory.unreachable, cluster, why)
                except Exception:
                    log.exception("center: cluster %s: its sync state was not kept", cluster)
                if isinstance(exc, httpx.TransportError) and await self._failover(cluster):
                    continue  # another node of the cluster answers: at once
                await self.clock.sleep(RETRY_AFTER)

    async def _failover(self, cluster: str) -> bool:
        inv = self.inventory
        try:
            return (
                await inv.registry.failover(inv.sessions, inv.client_factory, cluster) is not None
            )
        except Exception:
            log.exception("center: cluster %s: looking for another address failed", cluster)
            return False


async def _get(http: httpx.AsyncClient, url: str, auth: dict[str, str]) -> list[dict[str, Any]]:
    r = await http.get(url, headers=auth, timeout=CALL_TIMEOUT)
    r.raise_for_status()
    body: list[dict[str, Any]] = r.json()
    return body


async def _position(http: httpx.AsyncClient, endpoint: str, auth: dict[str, str]) -> str:
    """The feed's position now (its ``sync`` event, from a stream that ends at once)."""
    async for ident, event, _ in _events(http, endpoint, auth, None, 0.001):
        if event == "sync":
            return ident
    raise ValueError("the cluster's change feed sent no sync event")


async def _events(
    http: httpx.AsyncClient, endpoint: str, auth: dict[str, str], since: str | None, wait: float
) -> AsyncIterator[tuple[str, str, dict[str, Any]]]:
    """(id, event, data) of the feed's events after ``since`` for ``wait`` seconds; ``Gone``
    on 410."""
    params: dict[str, Any] = {"timeout": wait}
    if since is not None:
        params["since"] = since
    async with http.stream(
        "GET", endpoint + "/v1/events", params=params, headers=auth, timeout=wait + CALL_TIMEOUT
    ) as r:
        if r.status_code == 410:
            raise Gone(endpoint)
        r.raise_for_status()
        fields: dict[str, str] = {}
        async for line in r.aiter_lines():
            if line:
                if not line.startswith(":"):
                    name, _, value = line.partition(": ")
                    fields[name] = value
                continue
            if "event" in fields:
                with contextlib.suppress(ValueError):
                    data = json.loads(fields.get("data", "{}"))
                    if fields["event"] != "sync" or since is None:
                        yield fields.get("id", ""), fields["event"], data
            fields = {}
