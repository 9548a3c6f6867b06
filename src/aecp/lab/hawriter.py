"""A client's-eye writer for failover tests, the drill and the benchmark: a stream of changes
through the center's management IP, each recorded the moment the center acknowledged it.

Each write creates a data center named ``<prefix>-<seq>`` (a row and its audit record, one
transaction). A write is **acknowledged** when the center answered 2xx; one that failed or
timed out is **ambiguous** (it may or may not have committed) and is never counted as
acknowledged. After recovery ``verify`` reads the data centers and the audit trail back: every
acknowledged write must be in both.

The RTO as the client saw it is the time from the last acknowledged write before the fault to
the first acknowledged write after it (``rto``).
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field

import httpx

from aecp.common.errors import Unavailable


@dataclass
class Ack:
    seq: int
    name: str
    at: float  # wall-clock time of the answer (s)


@dataclass
class Writer:
    """Writes through ``url`` (the management IP) as ``user``; see the module docstring."""

    url: str
    user: str
    password: str
    prefix: str = "w"
    timeout: float = 2.0
    acked: list[Ack] = field(default_factory=list)
    failures: list[tuple[float, str]] = field(default_factory=list)
    _token: str | None = None
    _seq: int = 0

    async def login(self, http: httpx.AsyncClient) -> None:
        r = await http.post(
            f"{self.url}/v1/login",
            json={"user": self.user, "password": self.password},
            timeout=self.timeout,
        )
        r.raise_for_status()
        self._token = r.json()["token"]

    async def write_once(self, http: httpx.AsyncClient) -> Ack | None:
        """One write; the ``Ack`` if the center acknowledged it, else None (noted)."""
        self._seq += 1
        name = f"{self.prefix}-{self._seq}"
        try:
            if self._token is None:
                await self.login(http)
            r = await http.post(
                f"{self.url}/v1/datacenters",
                json={"name": name},
                headers={"Authorization": f"Bearer {self._token}"},
                timeout=self.timeout,
            )
        except (httpx.HTTPError, OSError) as e:
            self.failures.append((time.time(), f"{name}: {type(e).__name__}"))
            return None
        if r.status_code == 401:
            self._token = None
        if r.status_code // 100 != 2:
            self.failures.append((time.time(), f"{name}: {r.status_code}"))
            return None
        ack = Ack(self._seq, name, time.time())
        self.acked.append(ack)
        return ack

    async def run(self, stop: asyncio.Event, pause: float = 0.02) -> None:
        """Write until ``stop`` is set (a short pause after a failure, none after a success)."""
        async with httpx.AsyncClient(trust_env=False) as http:
            while not stop.is_set():
                if await self.write_once(http) is None:
                    await asyncio.sleep(pause * 5)

    def rto(self, fault_at: float) -> float | None:
        """Last ack at or before ``fault_at`` to the first ack after it (None if either is
        missing)."""
        before = [a.at for a in self.acked if a.at <= fault_at]
        after = [a.at for a in self.acked if a.at > fault_at]
        if not before or not after:
            return None
        return min(after) - max(before)

    async def verify(self) -> list[str]:
        """The acknowledged writes missing from the center (data centers or audit); [] is the
        pass. Raises ``Unavailable`` if the center cannot be read."""
        async with httpx.AsyncClient(trust_env=False) as http:
            try:
                await self.login(http)
                headers = {"Authorization": f"Bearer {self._token}"}
                dcs = await http.get(f"{self.url}/v1/datacenters", headers=headers, timeout=10)
                dcs.raise_for_status()
                audited = await self._audited(http, headers)
            except httpx.HTTPError as e:
                raise Unavailable(f"cannot read the center back: {e}") from None
        present = {d["name"] for d in dcs.json()}
        missing = [a.name for a in self.acked if a.name not in present]
        missing += [f"audit:{a.name}" for a in self.acked if a.name not in audited]
        return missing

    async def _audited(self, http: httpx.AsyncClient, headers: dict[str, str]) -> set[str]:
        names: set[str] = set()
        before: int | None = None
        while True:
            params: dict[str, str | int] = {"action": "datacenter.create", "limit": 1000}
            if before is not None:
                params["before"] = before
            r = await http.get(f"{self.url}/v1/audit", headers=headers, params=params, timeout=10)
            r.raise_for_status()
            page = r.json()
            records = page if isinstance(page, list) else page.get("records", [])
            if not records:
                return names
            names |= {str(rec["target"]) for rec in records if rec.get("result") == "ok"}
            before = min(int(rec["id"]) for rec in records)
            if len(records) < 1000:
                return names
