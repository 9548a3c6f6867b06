"""The organization's data centers and the clusters registered in them.

Registering a cluster checks its endpoint and the credentials first (the cluster's API must
answer ``GET /v1/cluster`` with its id to that token) and stores nothing unless both hold; the
token is kept encrypted (``center.secrets``). One cluster is registered once: a second name for
the same endpoint or the same cluster id is refused.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import Callable
from dataclasses import dataclass
from urllib.parse import urlsplit

import httpx
from sqlalchemy import func, select
from sqlalchemy.orm import Session as DB
from sqlalchemy.orm import sessionmaker

from aecp.center.channels import private_host
from aecp.center.db.models import Cluster, Datacenter, InventoryObject, Task
from aecp.center.secrets import SecretBox
from aecp.common.clock import SYSTEM_CLOCK, Clock
from aecp.common.errors import AlreadyExists, Conflict, InvalidInput, InvalidState, NotFound
from aecp.model.base import check_name

log = logging.getLogger(__name__)
CHECK_TIMEOUT = 5.0  # s
FAILOVER_EVERY = 10.0  # s: at most one look for another address of a cluster this often
ClientFactory = Callable[[], httpx.AsyncClient]


@dataclass(frozen=True)
class Checked:
    """What a cluster said of itself when its registration was checked."""

    endpoint: str
    cluster_id: str
    name: str


def check_endpoint(endpoint: str) -> str:
    """``endpoint`` without a trailing slash, if it is an http(s) URL with a host."""
    parts = urlsplit(endpoint)
    if parts.username or parts.password:
        raise InvalidInput(
            "endpoint", "must not carry a user or password (the token is given apart)"
        )
    if parts.scheme not in ("http", "https") or not parts.hostname or parts.query or parts.fragment:
        raise InvalidInput(
            "endpoint", "must be an http(s) URL of a cluster's API, e.g. http://10.0.0.1:8700"
        )
    return endpoint.rstrip("/")


async def probe(client_factory: ClientFactory, endpoint: str, token: str) -> Checked:
    """Ask the cluster at ``endpoint`` who it is, with ``token``: ``InvalidInput`` naming the
    field at fault (``endpoint`` when nothing answers, ``token`` when it is refused)."""
    url = check_endpoint(endpoint)
    try:
        async with client_factory() as client:
            r = await client.get(
                url + "/v1/cluster",
                headers={"authorization": f"Bearer {token}"},
                timeout=CHECK_TIMEOUT,
            )
    except httpx.HTTPError as exc:
        raise InvalidInput(
            "endpoint", f"no cluster API answers at {url}: {type(exc).__name__}"
        ) from None
    if r.status_code in (401, 403):
        raise InvalidInput("token", f"the cluster at {url} refuses this token ({r.status_code})")
    if r.status_code != 200:
        raise InvalidInput("endpoint", f"{url} answered {r.status_code}, not a cluster's API")
    try:
        body = r.json()
        cluster_id, name = str(body["id"]), str(body["name"])
    except (ValueError, KeyError, TypeError):
        raise InvalidInput("endpoint", f"{url} does not answer as a cluster's API") from None
    if not cluster_id:
        raise InvalidInput("endpoint", f"the cluster at {url} has no id yet (an older version?)")
    return Checked(url, cluster_id, name)


class Registry:
    """Data centers and clusters, their credentials, and which address of each cluster's
    API the center uses now (``address``: the registered endpoint, or after it stopped
    answering, another node's API that answers as the same cluster: ``failover``)."""

    def __init__(self, box: SecretBox, clock: Clock = SYSTEM_CLOCK) -> None:
        self.box = box
        self.clock = clock
        self.in_use: dict[str, str] = {}  # cluster → the address that answered last
        self._failover_locks: dict[str, asyncio.Lock] = {}
        self._failover_at: dict[str, float] = {}

    # ---- data centers -----------------------------------------------------------------------
    def datacenters(self, db: DB) -> list[Datacenter]:
        return list(db.scalars(select(Datacenter).order_by(Datacenter.name)))

    def add_datacenter(self, db: DB, name: str) -> Datacenter:
        check_name("name", name)
        if db.get(Datacenter, name) is not None:
            raise AlreadyExists(f"data center {name} already exists", field="name")
        dc = Datacenter(name=name, created_at=self.clock.wall())
        db.add(dc)
        return dc

    def delete_datacenter(self, db: DB, name: str) -> None:
        dc = db.get(Datacenter, name)
        if dc is None:
            raise NotFound(f"data center {name} does not exist", datacenter=name)
        if db.scalars(select(Cluster).where(Cluster.datacenter == name)).first() is not None:
            raise Conflict(f"data center {name} has clusters: move or remove them first")
        db.delete(dc)

    # ---- clusters ---------------------------------------------------------------------------
    def clusters(self, db: DB, datacenter: str | None = None) -> list[Cluster]:
        q = select(Cluster).order_by(Cluster.name)
        if datacenter is not None:
            q = q.where(Cluster.datacenter == datacenter)
        return list(db.scalars(q))

    def cluster(self, db: DB, name: str) -> Cluster:
        found = db.get(Cluster, name)
        if found is None:
            raise NotFound(f"cluster {name} does not exist", cluster=name)
        return found

    def check_new(self, db: DB, name: str, datacenter: str, endpoint: str) -> None:
        """What can be refused before the cluster is asked (nothing stored changes)."""
        check_name("name", name)
        if db.get(Datacenter, datacenter) is None:
            raise InvalidInput("datacenter", f"data center {datacenter!r} does not exist")
        if db.get(Cluster, name) is not None:
            raise AlreadyExists(f"cluster {name} already exists", field="name")
        url = check_endpoint(endpoint)
        other = db.scalars(select(Cluster).where(Cluster.endpoint == url)).first()
        if other is not None:
            raise AlreadyExists(f"{url} is registered already, as {other.name}", field="endpoint")

    def add(self, db: DB, name: str, datacenter: str, checked: Checked, token: str) -> Cluster:
        """Store a cluster whose endpoint and token were checked (``probe``)."""
        self.check_new(db, name, datacenter, checked.endpoint)
        same = db.scalars(select(Cluster).where(Cluster.cluster_id == checked.cluster_id)).first()
        if same is not None:
            raise AlreadyExists(
                f"that cluster (id {checked.cluster_id}) is registered already, as {same.name}",
                field="endpoint",
            )
        c = Cluster(
            name=name,
            datacenter=datacenter,
            endpoint=checked.endpoint,
            cluster_id=checked.cluster_id,
            token_encrypted=self.box.seal(token),
            created_at=self.clock.wall(),
        )
        db.add(c)
        return c

    def move(self, db: DB, name: str, datacenter: str) -> Cluster:
        c = self.cluster(db, name)
        if db.get(Datacenter, datacenter) is None:
            raise InvalidInput("datacenter", f"data center {datacenter!r} does not exist")
        c.datacenter = datacenter
        return c

    def remove(self, db: DB, name: str) -> None:
        """Stop managing a cluster (``InvalidState`` while tasks on it are not finished:
        they would be sent to whatever is registered under its name next)."""
        c = self.cluster(db, name)
        live = db.scalar(
            select(func.count())
            .select_from(Task)
            .where(Task.cluster == name, Task.state.in_(("pending", "executing")))
        )
        if live:
            raise InvalidState(
                f"cluster {name} has {live} unfinished tasks: let them end (or cancel the "
                "pending ones) first",
                cluster=name,
            )
        db.delete(c)
        self.in_use.pop(name, None)

    def token(self, c: Cluster) -> str:
        return self.box.open(c.token_encrypted)

    # ---- which address ------------------------------------------------------------------------
    def address(self, c: Cluster) -> str:
        """Where to reach cluster ``c`` now."""
        return self.in_use.get(c.name, c.endpoint)

    def addresses(self, db: DB, c: Cluster) -> list[str]:
        """Every address of ``c``'s API the center knows: the registered endpoint, then each
        node's API address from the center's copy of its nodes."""
        found = [c.endpoint]
        rows = db.scalars(
            select(InventoryObject.data).where(
                InventoryObject.cluster == c.name, InventoryObject.kind == "node"
            )
        )
        scheme = urlsplit(c.endpoint).scheme
        local = private_host(urlsplit(c.endpoint).hostname or "")
        for data in rows:
            url = str(json.loads(data).get("api_url") or "").rstrip("/")
            with contextlib.suppress(InvalidInput):
                if not url or check_endpoint(url) in found:
                    continue
                parts = urlsplit(url)
                # the token goes only where the registered endpoint's would: the same scheme
                # (never https to http), and no loopback, link-local or metadata address
                # unless the cluster was registered on one (the lab)
                if parts.scheme == scheme and (local or not private_host(parts.hostname or "")):
                    found.append(url)
        return found

    async def failover(
        self, sessions: sessionmaker[DB], client_factory: ClientFactory, cluster: str
    ) -> str | None:
        """The address in use stopped answering: use the next one that answers as the same
        cluster (its id, to the same token); returns it, or None if none does (the address
        stays as it was). One look at a time per cluster, and at most one every
        ``FAILOVER_EVERY`` seconds: callers that fail together share it. Never raises."""
        lock = self._failover_locks.setdefault(cluster, asyncio.Lock())
        async with lock:
            now = self.clock.monotonic()
            if now - self._failover_at.get(cluster, -FAILOVER_EVERY) < FAILOVER_EVERY:
                return None
            self._failover_at[cluster] = now
            try:
                return await self._failover(sessions, client_factory, cluster)
            except Exception:
                log.exception("center: cluster %s: looking for another address failed", cluster)
                return None

    async def _failover(
        self, sessions: sessionmaker[DB], client_factory: ClientFactory, cluster: str
    ) -> str | None:

        def known() -> tuple[Cluster, list[str], str] | None:
            with sessions() as db:
                c = db.get(Cluster, cluster)
                if c is None:
                    return None
                db.expunge(c)
                return c, self.addresses(db, c), self.token(c)

        got = await asyncio.to_thread(known)
        if got is None:
            return None
        c, candidates, token = got
        bad = self.address(c)
        start = candidates.index(bad) + 1 if bad in candidates else 0
        for url in candidates[start:] + candidates[:start]:
            if url == bad:
                continue
            try:
                checked = await probe(client_factory, url, token)
            except InvalidInput:
                continue
            if checked.cluster_id == c.cluster_id:
                log.warning("center: cluster %s: %s does not answer; using %s", cluster, bad, url)
                self.in_use[cluster] = url
                return url
        return None
