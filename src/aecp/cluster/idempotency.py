"""Idempotency keys: a mutating request that carries ``Idempotency-Key`` is carried out at
most once; a retry with the same key gets the first answer again.

Per principal and key, ``/aecp/idempotency/<principal>/<sha256(key)>`` holds the request's
fingerprint (method, path, query and JSON body, canonically written) and, once answered, the
answer (status, body, content type). The record is created before the request is carried
out (create-if-absent), so two requests with one key never both run. While a request runs,
its *hold* (a key on a short lease, kept alive by the request) says so: a retry meanwhile is
told to wait (409). A retry with another request under the same key is refused (422).

Strictly at most once: if the first request's outcome cannot be known — its server stopped
(the hold expired without an answer), it was stopped because its hold could not be kept, or
it failed in a way that may have written (the store did not answer, even on a read: which
call failed is not tracked; an internal error) — the record says ``unknown`` and every retry
with that key is refused (409) saying so: the client looks at the object and goes on with a
new key. A failure known to have changed nothing (the request refused before the endpoint
ran; a 503 of the API's own checks) releases the key, so a retry runs. Records live
``RETENTION`` seconds (on a shared lease, renewed hourly and re-granted if the store lost
it).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import json
import logging
import re
import secrets
from collections.abc import AsyncIterator
from typing import Any, Literal
from urllib.parse import parse_qsl, urlencode

from aecp.common.clock import SYSTEM_CLOCK, Clock
from aecp.common.errors import (
    AecpError,
    Conflict,
    InvalidInput,
    LeaseExpired,
    StoreUnavailable,
)
from aecp.common.tasks import cancel, spawn
from aecp.model.base import Stored
from aecp.store import keys
from aecp.store.base import Compare, Delete, Lease, Put, Store

log = logging.getLogger(__name__)
HEADER = "Idempotency-Key"
RETENTION = 24 * 3600  # s
LEASE_EVERY = 3600  # s: a new shared lease this often (records live RETENTION..+this)
HOLD_TTL = 30  # s: a running request's hold lives this long unless kept alive
HOLD_MARGIN = 5.0  # s: the request is stopped this long before its hold could lapse
MAX_ANSWER = 256 * 1024  # bytes of answer body kept (larger ones are not replayable)
_KEY = re.compile(r"^[A-Za-z0-9._:-]{1,128}$")


class IdempotentAnswer(Stored):
    fingerprint: str
    state: Literal["pending", "done", "unknown"]
    started_at: float
    status: int = 0
    body_b64: str = ""
    content_type: str = ""
    error: str = ""  # unknown: why
    nonce: str = ""  # pending: this claim's, so that undoing it never undoes another's


def check_key(value: str) -> str:
    if not _KEY.match(value):
        raise InvalidInput(
            HEADER, "must be 1-128 characters of letters, digits and . _ : - (a UUID will do)"
        )
    return value


def fingerprint(method: str, path: str, query: str, body: bytes) -> str:
    """The request's identity: the same JSON written in another key order or spacing, or
    the query's parameters in another order, is the same request."""
    try:
        canonical = json.dumps(json.loads(body), sort_keys=True, separators=(",", ":")).encode()
    except ValueError:
        canonical = body  # not JSON (the route refuses it anyway)
    pairs = urlencode(sorted(parse_qsl(query, keep_blank_values=True))).encode()
    h = hashlib.sha256()
    for part in (method.encode(), path.encode(), pairs, canonical if body else b""):
        h.update(len(part).to_bytes(8, "big") + part)
    return h.hexdigest()


class Claim:
    """A request's hold on its key: ``replay`` is the first answer if there was one; else
    the caller carries the request out while ``holding`` it, and ends the claim with
    ``answered``, ``unknown`` or ``release``."""

    def __init__(
        self, key: str, rev: int, replay: IdempotentAnswer | None, hold: Lease | None = None
    ) -> None:
        self.key = key
        self.rev = rev
        self.replay = replay
        self.hold = hold


def _holder(key: str) -> str:
    return key + ".held"


class IdempotencyKeys:
    def __init__(self, store: Store, clock: Clock = SYSTEM_CLOCK) -> None:
        self.store = store
        self.clock = clock
        self._lease: Lease | None = None
        self._lease_at = 0.0

    async def claim(self, principal: str, key: str, print_: str) -> Claim:
        """Hold ``key`` for this request, or the first answer to replay; ``InvalidInput``
        if the key was used for another request, ``Conflict`` while that one runs or if its
        outcome is unknown."""
        store_key = keys.idempotency(principal, hashlib.sha256(key.encode()).hexdigest())
        pending = IdempotentAnswer(
            fingerprint=print_,
            state="pending",
            started_at=self.clock.wall(),
            nonce=secrets.token_hex(8),
        )
        for _ in range(5):
            hold = await self.store.grant_lease(HOLD_TTL)
            try:
                made = await self.store.txn(
                    [Compare.absent(store_key)],
                    [
                        Put(store_key, pending.dump(), lease=await self._shared()),
                        Put(_holder(store_key), b"", lease=hold),
                    ],
                )
            except LeaseExpired:
                self._lease = None  # the store lost the shared lease: a new one
                await self.store.revoke_lease(hold)
                continue
            if made:
                return await self._held(store_key, pending, hold)
            await self.store.revoke_lease(hold)
            kv = await self.store.get(store_key)
            if kv is None:
                continue  # expired meanwhile: again
            return await self._taken(
                store_key, IdempotentAnswer.load(kv.value), print_, kv.mod_revision
            )
        raise Conflict(f"the {HEADER} record keeps changing; try again", idempotency="retry")

    async def _held(self, store_key: str, pending: IdempotentAnswer, hold: Lease) -> Claim:
        """The claim just made, with its record's revision. If that cannot be read, the
        claim is undone (the record only while still this one) and the error raised: the
        request did not run, and a retry must not find the key held."""
        try:
            kv = await self.store.get(store_key)
            if kv is None:
                raise Conflict(
                    f"the {HEADER} record vanished as it was made; try again", idempotency="retry"
                )
            return Claim(store_key, kv.mod_revision, None, hold)
        except AecpError:
            with contextlib.suppress(AecpError):
                await self.store.txn(
                    [Compare(store_key, "value", "==", pending.dump())], [Delete(store_key)]
                )
                await self.store.revoke_lease(hold)
            raise

    async def _taken(self, store_key: str, old: IdempotentAnswer, print_: str, rev: int) -> Claim:
        if old.fingerprint != print_:
            raise InvalidInput(HEADER, "was used for another request (method, path or body differ)")
        if old.state == "done":
            return Claim(store_key, rev, old)
        unknown = (
            f"the first request with this {HEADER} ended without an answer ({{why}}): whether "
            "it took effect is unknown; look at the object, then use a new key"
        )
        if old.state == "unknown":
            raise Conflict(unknown.format(why=old.error or "?"), idempotency="unknown")
        if await self.store.get(_holder(store_key)) is not None:
            raise Conflict(
                f"a request with this {HEADER} is still being carried out; try again later",
                idempotency="in_progress",
            )
        raise Conflict(
            unknown.format(why="the server carrying it out stopped"), idempotency="unknown"
        )

    @contextlib.asynccontextmanager
    async def holding(self, claim: Claim, work: asyncio.Future[Any]) -> AsyncIterator[None]:
        """Keep the claim's hold alive while ``work`` (the request) runs, and release it
        after. If the hold cannot be kept (the store does not answer), ``work`` is cancelled
        before the hold can lapse: a retry is never told the outcome is unknown while this
        request can still take effect."""
        hold = claim.hold
        keeper = spawn(self._keep(hold, work), name="idempotency-hold") if hold else None
        try:
            yield
        finally:
            await cancel(keeper)
            if hold is not None:
                with contextlib.suppress(AecpError):
                    await self.store.revoke_lease(hold)

    async def _keep(self, hold: Lease, work: asyncio.Future[Any]) -> None:
        certain = self.clock.monotonic() + HOLD_TTL - HOLD_MARGIN
        while True:
            await self.clock.sleep(min(HOLD_TTL / 3, max(0.0, certain - self.clock.monotonic())))
            sent = self.clock.monotonic()
            try:
                await self.store.refresh_lease(hold)
                certain = sent + HOLD_TTL - HOLD_MARGIN
            except AecpError as exc:
                if self.clock.monotonic() >= certain:
                    log.warning("%s: the hold lapsed (%s): the request is stopped", HEADER, exc)
                    work.cancel()
                    return

    async def answered(
        self, claim: Claim, print_: str, status: int, body: bytes, content_type: str
    ) -> None:
        """Keep the answer for retries (tried a few times: a retry must not find the key
        without it). One too large to keep makes the outcome unknown to retries."""
        if len(body) > MAX_ANSWER:
            await self.unknown(claim, print_, f"its {len(body)}-byte answer was too large to keep")
            return
        done = IdempotentAnswer(
            fingerprint=print_,
            state="done",
            started_at=self.clock.wall(),
            status=status,
            body_b64=base64.b64encode(body).decode(),
            content_type=content_type,
        )
        await self._settle(claim, done)

    async def unknown(self, claim: Claim, print_: str, why: str) -> None:
        """The request may have taken effect, or not: retries with the key are refused."""
        rec = IdempotentAnswer(
            fingerprint=print_, state="unknown", started_at=self.clock.wall(), error=why[:300]
        )
        await self._settle(claim, rec)

    async def _settle(self, claim: Claim, rec: IdempotentAnswer) -> None:
        for attempt in range(3):
            try:
                lease = await self._shared()
                if not await self.store.replace(
                    claim.key, rec.dump(), mod_revision=claim.rev, lease=lease
                ):
                    log.warning("%s: the record changed meanwhile; kept as it is", HEADER)
                return
            except LeaseExpired:
                self._lease = None
                if attempt == 2:
                    raise
            except StoreUnavailable:
                if attempt == 2:
                    raise

    async def release(self, claim: Claim) -> None:
        """The request changed nothing (it was refused before acting): a retry runs again."""
        await self.store.delete(claim.key, mod_revision=claim.rev)

    async def _shared(self) -> Lease:
        """The lease records are put on: one per ``LEASE_EVERY``, of ``RETENTION`` plus that."""
        now = self.clock.monotonic()
        if self._lease is None or now - self._lease_at >= LEASE_EVERY:
            self._lease = await self.store.grant_lease(RETENTION + LEASE_EVERY)
            self._lease_at = now
        return self._lease
