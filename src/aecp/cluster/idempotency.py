"""Idempotency keys: a mutating request that carries ``Idempotency-Key`` is carried out at
most once; a retry with the same key gets the first answer again.

Per principal and key, ``/aecp/idempotency/<principal>/<sha256(key)>`` holds the request's
fingerprint (method, path, query and JSON body) and, once answered, the answer (status,
body, content type). The record is created before the request is carried out (create-if-
absent), so two concurrent requests with one key cannot both run: the second is told the
first is in progress (409). A retry with another request under the same key is refused (422).
An answer of 5xx (or an error no answer came from) is not kept: the record is deleted and a
retry runs again. A record left ``pending`` by a process that died is taken over after
``ABANDONED`` seconds (the API's requests record intent and answer in well under that).
Records live ``RETENTION`` seconds (on a shared lease, renewed hourly).
"""

from __future__ import annotations

import base64
import hashlib
import logging
import re
from typing import Literal

from aecp.common.clock import SYSTEM_CLOCK, Clock
from aecp.common.errors import Conflict, InvalidInput
from aecp.model.base import Stored
from aecp.store import keys
from aecp.store.base import Lease, Store

log = logging.getLogger(__name__)
HEADER = "Idempotency-Key"
RETENTION = 24 * 3600  # s
LEASE_EVERY = 3600  # s: a new shared lease this often (records live RETENTION..+this)
ABANDONED = 120.0  # s: a pending record older than this was left by a request that died
MAX_ANSWER = 256 * 1024  # bytes of answer body kept (larger ones are not replayable)
_KEY = re.compile(r"^[A-Za-z0-9._:-]{1,128}$")


class IdempotentAnswer(Stored):
    fingerprint: str
    state: Literal["pending", "done"]
    started_at: float
    status: int = 0
    body_b64: str = ""
    content_type: str = ""


def check_key(value: str) -> str:
    if not _KEY.match(value):
        raise InvalidInput(
            HEADER, "must be 1-128 characters of letters, digits and . _ : - (a UUID will do)"
        )
    return value


def fingerprint(method: str, path: str, query: str, body: bytes) -> str:
    h = hashlib.sha256()
    for part in (method.encode(), path.encode(), query.encode(), body):
        h.update(len(part).to_bytes(8, "big") + part)
    return h.hexdigest()


class Claim:
    """A request's hold on its key: ``replay`` is the first answer if there was one; else
    the caller carries the request out and calls ``answered`` or ``abandon``."""

    def __init__(self, key: str, rev: int, replay: IdempotentAnswer | None) -> None:
        self.key = key
        self.rev = rev
        self.replay = replay


class IdempotencyKeys:
    def __init__(self, store: Store, clock: Clock = SYSTEM_CLOCK) -> None:
        self.store = store
        self.clock = clock
        self._lease: Lease | None = None
        self._lease_at = 0.0

    async def claim(self, principal: str, key: str, print_: str) -> Claim:
        """Hold ``key`` for this request, or the first answer to replay; ``InvalidInput``
        if the key was used for another request, ``Conflict`` while that one runs."""
        store_key = keys.idempotency(principal, hashlib.sha256(key.encode()).hexdigest())
        now = self.clock.wall()
        pending = IdempotentAnswer(fingerprint=print_, state="pending", started_at=now)
        for _ in range(5):
            if await self.store.create(store_key, pending.dump(), lease=await self._shared()):
                kv = await self.store.get(store_key)
                return Claim(store_key, kv.mod_revision if kv else 0, None)
            kv = await self.store.get(store_key)
            if kv is None:
                continue  # expired or abandoned meanwhile: again
            old = IdempotentAnswer.load(kv.value)
            if old.fingerprint != print_:
                raise InvalidInput(
                    HEADER, "was used for another request (method, path or body differ)"
                )
            if old.state == "done":
                return Claim(store_key, kv.mod_revision, old)
            if now - old.started_at < ABANDONED:
                raise Conflict(
                    f"a request with this {HEADER} is still being carried out; try again later"
                )
            if await self.store.replace(
                store_key, pending.dump(), mod_revision=kv.mod_revision, lease=await self._shared()
            ):  # taken over from a request that died
                got = await self.store.get(store_key)
                return Claim(store_key, got.mod_revision if got else 0, None)
        raise Conflict(f"the {HEADER} record keeps changing; try again")

    async def answered(
        self, claim: Claim, print_: str, status: int, body: bytes, content_type: str
    ) -> None:
        """Keep the answer for retries (not a 5xx, nor one too large to keep: those delete
        the record, so a retry runs again)."""
        if status >= 500 or len(body) > MAX_ANSWER:
            await self.abandon(claim)
            return
        done = IdempotentAnswer(
            fingerprint=print_,
            state="done",
            started_at=self.clock.wall(),
            status=status,
            body_b64=base64.b64encode(body).decode(),
            content_type=content_type,
        )
        if not await self.store.replace(
            claim.key, done.dump(), mod_revision=claim.rev, lease=await self._shared()
        ):
            log.warning("%s: the answer was not kept (the record changed meanwhile)", HEADER)

    async def abandon(self, claim: Claim) -> None:
        await self.store.delete(claim.key, mod_revision=claim.rev)

    async def _shared(self) -> Lease:
        """The lease records are put on: one per ``LEASE_EVERY``, of ``RETENTION`` plus that."""
        now = self.clock.monotonic()
        if self._lease is None or now - self._lease_at >= LEASE_EVERY:
            self._lease = await self.store.grant_lease(RETENTION + LEASE_EVERY)
            self._lease_at = now
        return self._lease
