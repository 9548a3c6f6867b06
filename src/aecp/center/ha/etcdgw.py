"""Who holds Patroni's leader key, and for how long yet: a tiny client of etcd's v3 JSON gateway.

The HA agent asks its *own* etcd member (the first endpoint, and only that one) over TLS with a
client certificate. Two requests per question, in this order:

1. ``POST /v3/kv/range`` of the key, linearizable (``serializable: false``): the member must
   confirm the read with a quorum, so a member cut off from the others cannot answer. That is
   the point: an agent whose member has no quorum learns nothing, and lets its lease deadline
   run out.
2. ``POST /v3/lease/timetolive`` of the lease attached to the key: the seconds left. etcd
   truncates them to a whole second, so the answer is a lower bound of the time left when it
   was read.

Wire format (etcd 3.4 gateway, proto field names): keys and values are base64, 64-bit integers
(revisions, lease IDs, TTLs) are decimal strings, and fields that hold their zero value are left
out (a missing ``TTL`` is 0; an expired lease answers ``TTL: "-1"``).

Contract of ``EtcdGateway.leader``: a ``LeaderLease`` when the key exists and its lease is
alive; ``None`` when the key does not exist; ``GatewayError`` on anything else (connection,
TLS, timeout, a non-200 answer, an unreadable body, a key without a lease or with an expired
one). It never retries: the caller asks again on its next round.
"""

from __future__ import annotations

import base64
import json
import ssl
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

from aecp.common.errors import InvalidInput, Unavailable


class GatewayError(Unavailable):
    """etcd could not be asked, or its answer says nothing usable about the leader key."""

    code = "etcd_gateway_error"


@dataclass(frozen=True)
class LeaderLease:
    """The leader key's holder (a Patroni member name), a lower bound of the seconds its lease
    has left, and the key's ``mod_revision`` (it changes when another member takes the key)."""

    holder: str
    ttl_remaining_s: float
    revision: int


def leader_key(scope: str, namespace: str = "/service/") -> str:
    """Patroni's leader key for cluster ``scope`` (``/service/<scope>/leader``)."""
    return f"{namespace.rstrip('/')}/{scope}/leader"


def client_context(ca: Path, cert: Path, key: Path) -> ssl.SSLContext:
    """TLS 1.2+ trusting only ``ca`` and presenting the client certificate ``cert``/``key``."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.load_verify_locations(cafile=str(ca))
    ctx.load_cert_chain(str(cert), str(key))
    return ctx


def _b64(text: str) -> str:
    return base64.b64encode(text.encode()).decode()


def _unb64(text: str) -> str:
    return base64.b64decode(text, validate=True).decode()


class EtcdGateway:
    """Reads of the leader key through ``endpoints`` (``host:port``), in order: the first that
    answers both calls gives the answer (a linearizable read needs a quorum through whichever
    member serves it, so asking another member when one is down is as safe).

    ``server_name``: the name the member's certificate must carry, when it is not the endpoint's
    host. ``transport`` replaces the network (tests pass an ``httpx.MockTransport``); no TLS
    context is built then.
    """

    def __init__(
        self,
        endpoints: Sequence[str],
        ca: Path,
        cert: Path,
        key: Path,
        timeout: float = 1.0,
        *,
        server_name: str | None = None,
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        if not endpoints:
            raise InvalidInput("endpoints", "no etcd endpoint given")
        self.endpoints = list(endpoints)
        self.endpoint = self.endpoints[0]
        self._extensions = {"sni_hostname": server_name} if server_name else {}
        verify: ssl.SSLContext | bool = True
        if transport is None:
            verify = client_context(ca, cert, key)
        self._clients = {
            e: httpx.AsyncClient(
                base_url=f"https://{e}",
                verify=verify,
                timeout=timeout,
                trust_env=False,  # no proxy from the environment between an agent and etcd
                transport=transport,
            )
            for e in self.endpoints
        }
        self._http = self._clients[self.endpoint]

    async def leader(self, key: str) -> LeaderLease | None:
        """Who holds ``key`` and how long its lease has left; ``None`` if there is no such key.
        ``GatewayError`` (the last one) if no endpoint answers."""
        error: GatewayError | None = None
        for endpoint in self.endpoints:
            self.endpoint, self._http = endpoint, self._clients[endpoint]
            try:
                return await self._leader(key)
            except GatewayError as exc:
                error = exc
        assert error is not None
        raise error

    async def _leader(self, key: str) -> LeaderLease | None:
        body = await self._post("/v3/kv/range", {"key": _b64(key), "serializable": False})
        kvs = body.get("kvs") or []
        if not kvs:
            return None
        kv = kvs[0]
        try:
            holder = _unb64(kv.get("value", ""))
            revision = int(kv.get("mod_revision", 0))
            lease_id = int(kv.get("lease", 0))
        except (ValueError, TypeError, AttributeError) as exc:
            raise GatewayError(f"etcd at {self.endpoint}: unreadable key-value: {exc}") from None
        if lease_id == 0:
            raise GatewayError(f"{key} has no lease: its holder could not be timed out")
        ttl = await self._ttl(lease_id)
        return LeaderLease(holder=holder, ttl_remaining_s=float(ttl), revision=revision)

    async def _ttl(self, lease_id: int) -> int:
        body = await self._post("/v3/lease/timetolive", {"ID": str(lease_id)})
        try:
            ttl = int(body.get("TTL", 0))
        except (ValueError, TypeError) as exc:
            raise GatewayError(f"etcd at {self.endpoint}: unreadable TTL: {exc}") from None
        if ttl < 0:
            raise GatewayError(f"lease {lease_id:x} is gone (expired or revoked)")
        return ttl

    async def _post(self, path: str, payload: dict[str, Any]) -> dict[str, Any]:
        """One gateway call: the JSON body of a 200 answer, ``GatewayError`` otherwise."""
        try:
            resp = await self._http.post(path, json=payload, extensions=self._extensions)
        except httpx.HTTPError as exc:
            raise GatewayError(f"etcd at {self.endpoint} did not answer {path}: {exc!r}") from None
        if resp.status_code != 200:
            raise GatewayError(
                f"etcd at {self.endpoint} answered {path} with {resp.status_code}: "
                f"{resp.text[:300]}"
            )
        try:
            body = resp.json()
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise GatewayError(f"etcd at {self.endpoint}: {path} body is not JSON: {exc}") from None
        if not isinstance(body, dict):
            raise GatewayError(f"etcd at {self.endpoint}: {path} body is not a JSON object")
        return body

    async def aclose(self) -> None:
        for client in self._clients.values():
            await client.aclose()
