"""Notifications of alerts: the notifiers (a webhook, or an SMTP server), the outbox they are
sent from, and the channels that carry one message each.

Ordering: an alert's change and its notifications are written in one transaction
(``enqueue``), so a change is never stored without its messages, nor a message without its
change, and a message waiting when the center stops is sent after it starts again. Each
notifier's messages go out in the order they were written: the oldest pending one (its queue's
head) first, and the next only once it is sent or given up, so a receiver never learns of a
resolution before the opening. Each notifier's queue is read and drained apart from the others,
so one that does not answer holds up none but itself.

Failures: a failed attempt backs the whole notifier off (a circuit breaker): no message goes to
it before ``backoff(n)`` has passed (5 s, doubling, at most 10 min; ``n`` failed attempts in a
row), whichever message is next. A message is tried ``MAX_ATTEMPTS`` times in all, then marked
``failed``. One send has ``SEND_DEADLINE`` in all, however slowly the receiver trickles.

Several centers on one database: a message is claimed (a conditional ``UPDATE`` of a pending,
unclaimed row) before it is sent, so one center sends it; since only a queue's head is ever
claimed, the order holds across centers too. A center that dies while sending leaves its claim
to lapse after ``CLAIM_S``; the message is then sent again (at least once, never lost).

Secrets: the SMTP password and the webhook URL (whose path, query or user often carries a
token) are sealed with the center's key (``center.secrets``) before they are stored, are
opened only to send, and are never returned, logged or audited; readers see a webhook as
``scheme://host[:port]/…`` (``shown_url``). A delivery error is kept as a short class of
error, never the receiver's own words.

Targets: a webhook URL on a loopback, link-local, unspecified or cloud-metadata address (or a
name that resolves to one, checked again at each send) is refused unless the center allows
private targets (``AlertSettings.allow_private_webhooks``): a webhook would otherwise let
anyone who may add one make the center call its own services.
"""

from __future__ import annotations

import asyncio
import functools
import json
import logging
import os
import re
import socket
import uuid
from collections.abc import Awaitable, Mapping
from dataclasses import dataclass, field
from typing import Any, TypeVar, cast
from urllib.parse import urlsplit

from sqlalchemy import CursorResult, delete, func, or_, select, update
from sqlalchemy.orm import Session as DB
from sqlalchemy.orm import sessionmaker

from aecp.center.channels import SEND_DEADLINE as SEND_DEADLINE  # re-exported
from aecp.center.channels import Channel as Channel
from aecp.center.channels import DeliveryError as DeliveryError
from aecp.center.channels import MemoryChannel as MemoryChannel
from aecp.center.channels import Message as Message
from aecp.center.channels import SmtpChannel as SmtpChannel
from aecp.center.channels import Target as Target
from aecp.center.channels import WebhookChannel as WebhookChannel
from aecp.center.channels import default_channels as default_channels
from aecp.center.channels import private_host as private_host
from aecp.center.channels import shown_url as shown_url
from aecp.center.db.models import Alert, Notification, Notifier
from aecp.center.secrets import SecretBox
from aecp.common.clock import SYSTEM_CLOCK, Clock
from aecp.common.errors import AecpError, AlreadyExists, InvalidInput, NotFound
from aecp.common.tasks import cancel, spawn
from aecp.model.base import check_name

log = logging.getLogger(__name__)
T = TypeVar("T")
CLAIM_S = 2 * SEND_DEADLINE  # s: a center's claim on the message it sends
BACKOFF_FIRST = 5.0  # s
BACKOFF_MAX = 600.0  # s
MAX_ATTEMPTS = 10
PER_PASS = 20  # messages of one notifier sent in one pass at most
DELIVERY_TICK = 1.0  # s between two looks at the outbox (an alert's change wakes it at once)
KEEP_SENT_S = 30 * 86400.0  # sent or failed messages are deleted after this (retention)
LEVELS = ("info", "notice", "critical")  # the order of ``center.alerts.Level``
KINDS = ("webhook", "smtp")
_ADDRESS = re.compile(r"^[^@\s<>,;]+@[^@\s<>,;]+$")
_HOST = re.compile(r"^[A-Za-z0-9]([A-Za-z0-9.:-]{0,251}[A-Za-z0-9])?$")


def backoff(attempts: int) -> float:
    """The wait after ``attempts`` failed attempts in a row."""
    return float(min(BACKOFF_MAX, BACKOFF_FIRST * 2 ** max(0, attempts - 1)))


async def within(clock: Clock, seconds: float, work: Awaitable[T]) -> T:
    """``work``'s result, or ``TimeoutError`` once ``seconds`` have passed on ``clock``
    (``work`` is cancelled then): a hard deadline, as ``asyncio.timeout`` sets one, on the
    center's clock."""
    timer = asyncio.ensure_future(clock.sleep(seconds))
    job = asyncio.ensure_future(work)
    try:
        await asyncio.wait((job, timer), return_when=asyncio.FIRST_COMPLETED)
    finally:
        timer.cancel()
        if not job.done():
            job.cancel()
            await asyncio.gather(job, return_exceptions=True)
    if job.cancelled():
        raise TimeoutError(f"no answer within {seconds:.0f} s")
    return job.result()


# ---- notifiers --------------------------------------------------------------------------------
@dataclass(frozen=True)
class NotifierSpec:
    """A notifier as asked for. Only the fields of its ``kind`` count."""

    name: str
    kind: str
    min_level: str = "info"
    url: str = field(default="", repr=False)
    host: str = ""
    port: int = 25
    sender: str = ""
    recipients: tuple[str, ...] = ()
    starttls: bool = False
    user: str = ""
    password: str = field(default="", repr=False)


def check_spec(spec: NotifierSpec, allow_private: bool = False) -> tuple[dict[str, Any], str]:
    """The stored settings of ``spec`` and its secret (sealed apart: the password, or the
    webhook's URL); ``InvalidInput`` naming the field at fault."""
    check_name("name", spec.name)
    if spec.min_level not in LEVELS:
        raise InvalidInput("min_level", f"must be one of {', '.join(LEVELS)}")
    if spec.kind == "webhook":
        url = check_webhook_url(spec.url, allow_private)
        return {"url": shown_url(url)}, url
    if spec.kind != "smtp":
        raise InvalidInput("kind", f"must be one of {', '.join(KINDS)}")
    if not _HOST.match(spec.host):
        raise InvalidInput("host", "must be the SMTP server's host name or IP address")
    if not 1 <= spec.port <= 65535:
        raise InvalidInput("port", "must be a TCP port, 1..65535")
    if not _ADDRESS.match(spec.sender):
        raise InvalidInput("sender", "must be a mail address, e.g. aoc@example.com")
    if not spec.recipients or any(not _ADDRESS.match(r) for r in spec.recipients):
        raise InvalidInput("recipients", "must be one or more mail addresses")
    if spec.password and not spec.user:
        raise InvalidInput("user", "a password needs a user to log in with")
    if spec.user and not spec.starttls:
        raise InvalidInput(
            "starttls", "a login needs STARTTLS: without it the password would cross in clear"
        )
    config = {
        "host": spec.host,
        "port": spec.port,
        "sender": spec.sender,
        "recipients": list(spec.recipients),
        "starttls": spec.starttls,
        "user": spec.user,
    }
    return config, spec.password


def check_webhook_url(url: str, allow_private: bool = False) -> str:
    try:
        parts = urlsplit(url)
        scheme, host, _ = parts.scheme, parts.hostname, parts.port
    except ValueError:  # a bad IPv6 literal, a port out of range
        scheme, host = "", None
    if scheme not in ("http", "https") or not host or any(c.isspace() for c in url):
        raise InvalidInput("url", "must be an http(s) URL, e.g. https://hooks.example.com/aecp")
    if not allow_private and private_host(host):
        raise InvalidInput(
            "url",
            "must not point at a loopback, link-local or metadata address (the center does "
            "not allow private webhook targets)",
        )
    return url


def add_notifier(
    db: DB, box: SecretBox, spec: NotifierSpec, now: float, allow_private: bool = False
) -> Notifier:
    config, secret = check_spec(spec, allow_private)
    if db.scalars(select(Notifier).where(Notifier.name == spec.name)).first() is not None:
        raise AlreadyExists(f"notifier {spec.name} already exists", field="name")
    n = Notifier(
        name=spec.name,
        kind=spec.kind,
        min_level=spec.min_level,
        config=json.dumps(config, sort_keys=True),
        secret_encrypted=box.seal(secret) if secret else "",
        created_at=now,
    )
    db.add(n)
    db.flush()  # its id
    return n


def seal_webhook_urls(db: DB, box: SecretBox) -> int:
    """Seal the URL of every webhook an older center stored in the clear (at start, with the
    center's key, which the migrations do not have); returns how many."""
    count = 0
    for n in notifiers(db):
        config = json.loads(n.config)
        if n.kind != "webhook" or n.secret_encrypted or not config.get("url"):
            continue
        n.secret_encrypted = box.seal(str(config["url"]))
        n.config = json.dumps(dict(config, url=shown_url(str(config["url"]))), sort_keys=True)
        count += 1
    return count


def notifiers(db: DB) -> list[Notifier]:
    return list(db.scalars(select(Notifier).order_by(Notifier.id)))


def notifier(db: DB, ident: int) -> Notifier:
    found = db.get(Notifier, ident)
    if found is None:
        raise NotFound(f"notifier {ident} does not exist", notifier=ident)
    return found


def delete_notifier(db: DB, ident: int) -> None:
    """The notifier and its messages not sent yet."""
    n = notifier(db, ident)
    for row in db.scalars(select(Notification).where(Notification.notifier == ident)):
        db.delete(row)
    db.delete(n)


def target_of(n: Notifier, box: SecretBox) -> Target:
    secret = box.open(n.secret_encrypted) if n.secret_encrypted else ""
    return Target(n.id, n.name, n.kind, json.loads(n.config), secret)


# ---- messages ---------------------------------------------------------------------------------
def alert_document(a: Alert, now: float) -> dict[str, Any]:
    """An alert as the API and the webhooks show it."""
    end = a.resolved_at if a.state == "resolved" else now
    return {
        "id": a.id,
        "rule": a.rule,
        "level": a.level,
        "cluster": a.cluster,
        "object": {"kind": a.object_kind, "name": a.object_name},
        "state": a.state,
        "opened_at": a.opened_at,
        "updated_at": a.updated_at,
        "resolved_at": a.resolved_at,
        "duration_s": max(0.0, end - a.opened_at),
        "value": a.value,
        "cause": a.cause,
        "impact": a.impact,
        "action": a.action,
        "resolution": a.resolution,
    }


def message_of(event: str, alert: Mapping[str, Any]) -> Message:
    where = f"cluster {alert['cluster']}" if alert["cluster"] else "the center"
    subject = f"[AECP {alert['level']}] {event}: {alert['cause']}"[:200]
    lines = [
        f"Alert {alert['id']} {event} ({alert['level']}, rule {alert['rule']}).",
        "",
        f"Where:  {where}, {alert['object']['kind']} {alert['object']['name']}",
        f"Cause:  {alert['cause']}",
        f"Impact: {alert['impact']}",
        f"Action: {alert['action']}",
    ]
    if alert["state"] == "resolved":
        lines.append(f"Resolved: {alert['resolution']} after {alert['duration_s']:.0f} s")
    payload = {"event": event, "alert": dict(alert)}
    return Message(payload=payload, subject=" ".join(subject.split()), text="\n".join(lines))


def enqueue(db: DB, alert: Alert, event: str, now: float) -> int:
    """Write a message about ``alert`` in unit of work ``db`` (the one that changed the alert)
    for every notifier whose ``min_level`` it reaches, and for every notifier already written
    to about it (so one that heard of the opening hears of the resolution, even if the alert
    fell below its level meanwhile); returns how many."""
    rank = LEVELS.index(alert.level) if alert.level in LEVELS else len(LEVELS)
    told = set(
        db.scalars(select(Notification.notifier).where(Notification.alert == alert.id).distinct())
    )
    doc = json.dumps({"event": event, "alert": alert_document(alert, now)}, sort_keys=True)
    count = 0
    for n in notifiers(db):
        if rank >= LEVELS.index(n.min_level) or n.id in told:
            db.add(
                Notification(
                    notifier=n.id,
                    alert=alert.id,
                    event=event,
                    payload=doc,
                    state="pending",
                    attempts=0,
                    next_at=now,
                    last_error="",
                    created_at=now,
                    sent_at=0.0,
                    claimed_by="",
                    claimed_until=0.0,
                )
            )
            count += 1
    return count


def prune(db: DB, before: float, limit: int) -> int:
    """Delete up to ``limit`` messages sent or given up before ``before``, oldest first,
    except those of an alert still open (they say whom its resolution goes to); returns how
    many."""
    still_open = select(Alert.id).where(Alert.state == "open")
    ids = list(
        db.scalars(
            select(Notification.id)
            .where(
                Notification.state.in_(("sent", "failed")),
                Notification.created_at < before,
                Notification.alert.not_in(still_open),
            )
            .order_by(Notification.id)
            .limit(limit)
        )
    )
    if ids:
        db.execute(delete(Notification).where(Notification.id.in_(ids)))
    return len(ids)


# ---- the outbox -------------------------------------------------------------------------------
@dataclass(frozen=True)
class Pending:
    id: int
    notifier: int
    attempts: int
    next_at: float
    payload: str


def _rowcount(result: Any) -> int:
    return int(cast(CursorResult[Any], result).rowcount)


class Outbox:
    """Sends the messages waiting in the ``notifications`` table: ``run`` as a loop of its own
    (each notifier drained by a task of its own), ``deliver_due`` for one pass; and a test
    message to one notifier (``test``). ``aclose`` stops it and closes its channels."""

    def __init__(
        self,
        sessions: sessionmaker[DB],
        box: SecretBox,
        clock: Clock = SYSTEM_CLOCK,
        channels: Mapping[str, Channel] | None = None,
        *,
        allow_private: bool = False,
        owner: str = "",
    ) -> None:
        self.sessions, self.box, self.clock = sessions, box, clock
        self.channels = dict(channels) if channels is not None else default_channels(allow_private)
        # who claims messages: this center process (several may share the database)
        self.owner = (owner or f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}")[:64]
        self._drains: dict[int, asyncio.Task[int]] = {}
        # notifier: (failed attempts in a row, no attempt before): the circuit breaker
        self._breaker: dict[int, tuple[int, float]] = {}
        self._wake = asyncio.Event()

    def wake(self) -> None:
        """New messages are waiting: the loop looks now, not at its next tick."""
        self._wake.set()

    async def run(self, every_s: float = DELIVERY_TICK) -> None:
        """Deliver until cancelled: a pass every ``every_s`` or when woken; never waits for a
        notifier's sends (each drains in a task of its own)."""
        while True:
            self._wake.clear()
            try:
                await self.deliver_due(wait=False)
            except Exception:
                log.exception("notify: this delivery pass failed; the next runs as usual")
            await self._nap(every_s)

    async def _nap(self, seconds: float) -> None:
        if self._wake.is_set():
            return
        sleeper = asyncio.ensure_future(self.clock.sleep(seconds))
        woken = asyncio.ensure_future(self._wake.wait())
        try:
            await asyncio.wait((sleeper, woken), return_when=asyncio.FIRST_COMPLETED)
        finally:
            sleeper.cancel()
            woken.cancel()

    async def aclose(self) -> None:
        """Stop the drains in flight (their claims lapse) and close the channels."""
        await cancel(*self._drains.values())
        self._drains.clear()
        for channel in self.channels.values():
            try:
                await channel.aclose()
            except Exception:
                log.exception("notify: a channel did not close cleanly")

    async def settle(self) -> None:
        """Return once the drains in flight have ended."""
        while self._drains:
            await asyncio.gather(*self._drains.values(), return_exceptions=True)

    async def deliver_due(self, wait: bool = True) -> int:
        """One pass: each notifier whose queue's head is due, not backed off and not being
        drained already is drained by a task of its own (up to ``PER_PASS`` messages, in order,
        until one fails). ``wait``: return once those drains end, with how many were sent."""
        now = self.clock.wall()
        due = await asyncio.to_thread(self._due, now)
        started = []
        for ident in due:
            if ident in self._drains or self._breaker.get(ident, (0, 0.0))[1] > now:
                continue
            task = spawn(self._drain(ident), name=f"notify-{ident}")
            self._drains[ident] = task
            task.add_done_callback(functools.partial(self._done, ident))
            started.append(task)
        if not wait or not started:
            return 0
        sent = await asyncio.gather(*started, return_exceptions=True)
        return sum(s for s in sent if isinstance(s, int))

    def _done(self, ident: int, task: asyncio.Task[Any]) -> None:
        if self._drains.get(ident) is task:
            del self._drains[ident]

    def _due(self, now: float) -> list[int]:
        """The notifiers whose queue's head is due and not claimed by another center."""
        heads = (
            select(func.min(Notification.id))
            .where(Notification.state == "pending")
            .group_by(Notification.notifier)
        )
        with self.sessions() as db:
            found = db.scalars(
                select(Notification.notifier).where(
                    Notification.id.in_(heads),
                    Notification.next_at <= now,
                    or_(Notification.claimed_until <= now, Notification.claimed_by == self.owner),
                )
            )
            return sorted(set(found))

    def _queue(self, ident: int) -> tuple[Target | str, list[Pending]]:
        """The notifier as a channel needs it (or why it cannot be used) and the head of its
        queue, oldest first."""
        with self.sessions() as db:
            n = db.get(Notifier, ident)
            if n is None:
                return "the notifier is gone", []
            target: Target | str
            try:
                target = target_of(n, self.box)
            except AecpError:
                target = "its secret does not open with this center's key (secret.key replaced?)"
            rows = db.scalars(
                select(Notification)
                .where(Notification.notifier == ident, Notification.state == "pending")
                .order_by(Notification.id)
                .limit(PER_PASS)
            )
            return target, [
                Pending(r.id, r.notifier, r.attempts, r.next_at, r.payload) for r in rows
            ]

    async def _drain(self, ident: int) -> int:
        sent = 0
        try:
            target, queue = await asyncio.to_thread(self._queue, ident)
            for p in queue:
                now = self.clock.wall()
                if p.next_at > now or self._breaker.get(ident, (0, 0.0))[1] > now:
                    break  # it waits, and so do those after it: the order holds
                if not await asyncio.to_thread(self._claim, p.id, now):
                    break  # another center sends it (or it is gone)
                try:
                    if isinstance(target, str):
                        error = target
                    else:
                        doc = json.loads(p.payload)
                        error = await self._attempt(target, message_of(doc["event"], doc["alert"]))
                except asyncio.CancelledError:
                    await asyncio.to_thread(self._release, p.id)
                    raise
                retry_at = self._failed(ident, p.attempts + 1) if error else 0.0
                if not error:
                    self._breaker.pop(ident, None)
                await asyncio.to_thread(self._mark, p, error, retry_at)
                if error:
                    break
                sent += 1
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("notify: notifier %d: this delivery pass failed", ident)
        return sent

    def _failed(self, ident: int, attempts: int) -> float:
        """Open the notifier's breaker after a failed attempt; when it lets one through next."""
        streak = max(self._breaker.get(ident, (0, 0.0))[0] + 1, attempts)
        retry_at = self.clock.wall() + backoff(streak)
        self._breaker[ident] = (streak, retry_at)
        return retry_at

    def _claim(self, ident: int, now: float) -> bool:
        with self.sessions.begin() as db:
            result = db.execute(
                update(Notification)
                .where(
                    Notification.id == ident,
                    Notification.state == "pending",
                    Notification.next_at <= now,
                    or_(Notification.claimed_until <= now, Notification.claimed_by == self.owner),
                )
                .values(claimed_by=self.owner, claimed_until=now + CLAIM_S)
            )
            return _rowcount(result) == 1

    def _release(self, ident: int) -> None:
        with self.sessions.begin() as db:
            db.execute(
                update(Notification)
                .where(Notification.id == ident, Notification.claimed_by == self.owner)
                .values(claimed_by="", claimed_until=0.0)
            )

    async def _attempt(self, target: Target, message: Message) -> str:
        """ "" if the message was accepted, else why not (in short)."""
        channel = self.channels.get(target.kind)
        if channel is None:
            return f"no channel for notifiers of kind {target.kind}"
        try:
            await within(self.clock, SEND_DEADLINE, channel.send(target, message))
        except TimeoutError:
            return f"TimeoutError: no answer within {SEND_DEADLINE:.0f} s"
        except DeliveryError as exc:
            if exc.detail:
                log.info("notify: notifier %d: %s (%s)", target.id, exc, exc.detail)
            return str(exc) or "refused"
        except Exception as exc:  # a bug must not hold the notifier's queue: a failed attempt
            log.exception("notify: notifier %d: the %s channel failed", target.id, target.kind)
            return f"internal error ({type(exc).__name__})"
        return ""

    def _mark(self, p: Pending, error: str, retry_at: float) -> None:
        now = self.clock.wall()
        with self.sessions.begin() as db:
            row = db.get(Notification, p.id)
            if row is None or row.state != "pending" or row.claimed_by != self.owner:
                log.warning("notify: message %d was no longer this center's to mark", p.id)
                return
            row.attempts += 1
            row.claimed_by, row.claimed_until = "", 0.0
            if not error:
                row.state, row.sent_at, row.last_error = "sent", now, ""
                log.info("notify: message %d sent to notifier %d", p.id, p.notifier)
                return
            row.last_error = error
            if row.attempts >= MAX_ATTEMPTS:
                row.state = "failed"
                log.warning(
                    "notify: message %d to notifier %d given up after %d attempts: %s",
                    p.id,
                    p.notifier,
                    row.attempts,
                    error,
                )
            else:
                log.info(
                    "notify: message %d to notifier %d failed (attempt %d), again in %.0f s: %s",
                    p.id,
                    p.notifier,
                    row.attempts,
                    retry_at - now,
                    error,
                )
            # the notifier is backed off as a whole: its next message waits as well, also
            # for another center or after a restart
            db.flush()
            db.execute(
                update(Notification)
                .where(
                    Notification.notifier == p.notifier,
                    Notification.state == "pending",
                    Notification.next_at < retry_at,
                )
                .values(next_at=retry_at)
            )

    async def test(self, ident: int) -> str:
        """Send a test message to notifier ``ident`` now, once (nothing is stored): "" if it
        was accepted, else why not (in short). ``NotFound`` if there is no such notifier."""

        def load() -> Target:
            with self.sessions() as db:
                return target_of(notifier(db, ident), self.box)

        target = await asyncio.to_thread(load)
        now = self.clock.wall()
        alert = {
            "id": 0,
            "rule": "test",
            "level": "info",
            "cluster": "",
            "object": {"kind": "notifier", "name": target.name},
            "state": "open",
            "opened_at": now,
            "updated_at": now,
            "resolved_at": 0.0,
            "duration_s": 0.0,
            "value": None,
            "cause": f"a test of notifier {target.name}",
            "impact": "none: this is a test",
            "action": "none",
            "resolution": "",
        }
        return await self._attempt(target, message_of("test", alert))


def outbox_state(db: DB, notifier_id: int | None = None) -> list[Notification]:
    """The messages, oldest first (of one notifier, if given)."""
    q = select(Notification).order_by(Notification.id)
    if notifier_id is not None:
        q = q.where(Notification.notifier == notifier_id)
    return list(db.scalars(q))
