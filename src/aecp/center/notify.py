"""Notifications of alerts: the notifiers (a webhook, or an SMTP server), the outbox they are
sent from, and the channels that carry one message each.

Ordering: an alert's change and its notifications are written in one transaction
(``enqueue``), so a change is never stored without its messages, nor a message without its
change, and a message waiting when the center stops is sent after it starts again. Each
notifier's messages go out in the order they were written: the oldest pending one first, and
the next only once it is sent or given up, so a receiver never learns of a resolution before
the opening. A failed attempt is tried again after ``backoff(attempts)`` (5 s, doubling, at
most 10 min), ``MAX_ATTEMPTS`` times in all; then the message is marked ``failed``.

Secrets: the SMTP password is sealed with the center's key (``center.secrets``) before it is
stored, is opened only to log in, and is never returned, logged or audited. A delivery error
is kept as the channel words it, which never includes it.
"""

from __future__ import annotations

import abc
import asyncio
import json
import logging
import re
import smtplib
import ssl
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from email.message import EmailMessage
from typing import Any
from urllib.parse import urlsplit

import httpx
from sqlalchemy import select
from sqlalchemy.orm import Session as DB
from sqlalchemy.orm import sessionmaker

from aecp.center.db.models import Alert, Notification, Notifier
from aecp.center.secrets import SecretBox
from aecp.common.clock import SYSTEM_CLOCK, Clock
from aecp.common.errors import AecpError, AlreadyExists, InvalidInput, NotFound
from aecp.model.base import check_name

log = logging.getLogger(__name__)
SEND_TIMEOUT = 10.0  # s: one attempt
BACKOFF_FIRST = 5.0  # s
BACKOFF_MAX = 600.0  # s
MAX_ATTEMPTS = 10
BATCH = 200  # pending messages read per pass
LEVELS = ("info", "notice", "critical")  # the order of ``center.alerts.Level``
KINDS = ("webhook", "smtp")
_ADDRESS = re.compile(r"^[^@\s<>,;]+@[^@\s<>,;]+$")
_HOST = re.compile(r"^[A-Za-z0-9]([A-Za-z0-9.:-]{0,251}[A-Za-z0-9])?$")


def backoff(attempts: int) -> float:
    """The wait before attempt ``attempts + 1``."""
    return float(min(BACKOFF_MAX, BACKOFF_FIRST * 2 ** max(0, attempts - 1)))


class DeliveryError(Exception):
    """A message was not accepted; the text says why, for people (never a secret)."""


@dataclass(frozen=True)
class Target:
    """A notifier as a channel needs it: its kind, its settings, and its secret opened."""

    id: int
    name: str
    kind: str
    config: Mapping[str, Any]
    secret: str = field(default="", repr=False)


@dataclass(frozen=True)
class Message:
    """One message: ``payload`` is the webhook's JSON body; ``subject`` and ``text`` the mail."""

    payload: Mapping[str, Any]
    subject: str
    text: str


# ---- channels ---------------------------------------------------------------------------------
class Channel(abc.ABC):
    """Carries one message to one receiver.

    ``send`` returns once the receiver has accepted the message, and raises ``DeliveryError``
    otherwise (a receiver that does not answer within ``SEND_TIMEOUT`` has not accepted it). It
    never retries: the outbox does, with backoff. It never blocks the event loop.
    """

    @abc.abstractmethod
    async def send(self, target: Target, message: Message) -> None: ...


class WebhookChannel(Channel):
    """A JSON ``POST`` to the notifier's URL; any 2xx is accepted. Redirects are not followed."""

    def __init__(self, client_factory: Callable[[], httpx.AsyncClient] = httpx.AsyncClient):
        self.client_factory = client_factory

    async def send(self, target: Target, message: Message) -> None:
        try:
            async with self.client_factory() as http:
                r = await http.post(
                    str(target.config["url"]),
                    json=message.payload,
                    headers={"user-agent": "aecp-center"},
                    timeout=SEND_TIMEOUT,
                    follow_redirects=False,
                )
        except (httpx.HTTPError, httpx.InvalidURL) as exc:
            raise DeliveryError(f"{type(exc).__name__}: {exc}"[:300]) from None
        if not 200 <= r.status_code < 300:
            raise DeliveryError(f"the webhook answered HTTP {r.status_code}")


class SmtpChannel(Channel):
    """A mail through the notifier's SMTP server (``smtplib`` in a thread), with STARTTLS and
    a login when the notifier says so."""

    async def send(self, target: Target, message: Message) -> None:
        try:
            await asyncio.to_thread(_mail, target, message)
        except (OSError, ValueError, smtplib.SMTPException) as exc:
            raise DeliveryError(f"{type(exc).__name__}: {exc}"[:300]) from None


def _mail(target: Target, message: Message) -> None:
    cfg = target.config
    mail = EmailMessage()
    mail["From"] = str(cfg["sender"])
    mail["To"] = ", ".join(cfg["recipients"])
    mail["Subject"] = message.subject
    mail.set_content(message.text)
    with smtplib.SMTP(str(cfg["host"]), int(cfg["port"]), timeout=SEND_TIMEOUT) as smtp:
        if cfg.get("starttls"):
            smtp.starttls(context=ssl.create_default_context())
        if cfg.get("user"):
            smtp.login(str(cfg["user"]), target.secret)
        smtp.send_message(mail)


class MemoryChannel(Channel):
    """The test double: keeps what it is given; the first ``fail_first`` sends fail."""

    def __init__(self, fail_first: int = 0) -> None:
        self.sent: list[tuple[Target, Message]] = []
        self.fail_first = fail_first
        self.attempts = 0

    async def send(self, target: Target, message: Message) -> None:
        self.attempts += 1
        if self.attempts <= self.fail_first:
            raise DeliveryError(f"attempt {self.attempts} refused (fail_first)")
        self.sent.append((target, message))


def default_channels() -> dict[str, Channel]:
    return {"webhook": WebhookChannel(), "smtp": SmtpChannel()}


# ---- notifiers --------------------------------------------------------------------------------
@dataclass(frozen=True)
class NotifierSpec:
    """A notifier as asked for. Only the fields of its ``kind`` count."""

    name: str
    kind: str
    min_level: str = "info"
    url: str = ""
    host: str = ""
    port: int = 25
    sender: str = ""
    recipients: tuple[str, ...] = ()
    starttls: bool = False
    user: str = ""
    password: str = field(default="", repr=False)


def check_spec(spec: NotifierSpec) -> dict[str, Any]:
    """The stored settings of ``spec`` (without its password); ``InvalidInput`` naming the
    field at fault."""
    check_name("name", spec.name)
    if spec.min_level not in LEVELS:
        raise InvalidInput("min_level", f"must be one of {', '.join(LEVELS)}")
    if spec.kind == "webhook":
        return {"url": check_webhook_url(spec.url)}
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
    return {
        "host": spec.host,
        "port": spec.port,
        "sender": spec.sender,
        "recipients": list(spec.recipients),
        "starttls": spec.starttls,
        "user": spec.user,
    }


def check_webhook_url(url: str) -> str:
    try:
        parts = urlsplit(url)
        scheme, host, _ = parts.scheme, parts.hostname, parts.port
    except ValueError:  # a bad IPv6 literal, a port out of range
        scheme, host = "", None
    if scheme not in ("http", "https") or not host or any(c.isspace() for c in url):
        raise InvalidInput("url", "must be an http(s) URL, e.g. https://hooks.example.com/aecp")
    return url


def add_notifier(db: DB, box: SecretBox, spec: NotifierSpec, now: float) -> Notifier:
    config = check_spec(spec)
    if db.scalars(select(Notifier).where(Notifier.name == spec.name)).first() is not None:
        raise AlreadyExists(f"notifier {spec.name} already exists", field="name")
    n = Notifier(
        name=spec.name,
        kind=spec.kind,
        min_level=spec.min_level,
        config=json.dumps(config, sort_keys=True),
        secret_encrypted=box.seal(spec.password) if spec.password else "",
        created_at=now,
    )
    db.add(n)
    db.flush()  # its id
    return n


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
    """Write a message about ``alert`` for every notifier whose ``min_level`` it reaches, in
    unit of work ``db`` (the one that changed the alert); returns how many."""
    rank = LEVELS.index(alert.level) if alert.level in LEVELS else len(LEVELS)
    doc = json.dumps({"event": event, "alert": alert_document(alert, now)}, sort_keys=True)
    count = 0
    for n in notifiers(db):
        if rank >= LEVELS.index(n.min_level):
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
                )
            )
            count += 1
    return count


# ---- the outbox -------------------------------------------------------------------------------
@dataclass(frozen=True)
class Pending:
    id: int
    notifier: int
    attempts: int
    next_at: float
    payload: str


class Outbox:
    """Sends the messages waiting in the ``notifications`` table (``deliver_due``), and a
    test message to one notifier (``test``)."""

    def __init__(
        self,
        sessions: sessionmaker[DB],
        box: SecretBox,
        clock: Clock = SYSTEM_CLOCK,
        channels: Mapping[str, Channel] | None = None,
    ) -> None:
        self.sessions, self.box, self.clock = sessions, box, clock
        self.channels = dict(channels) if channels is not None else default_channels()

    async def deliver_due(self) -> int:
        """One pass: each notifier's due messages in order, until one fails; the notifiers
        side by side. Returns how many were sent."""
        queues = await asyncio.to_thread(self._pending)
        sent = await asyncio.gather(*(self._drain(t, q) for t, q in queues))
        return sum(sent)

    def _pending(self) -> list[tuple[Target, list[Pending]]]:
        with self.sessions() as db:
            rows = db.scalars(
                select(Notification)
                .where(Notification.state == "pending")
                .order_by(Notification.id)
                .limit(BATCH)
            )
            queues: dict[int, list[Pending]] = {}
            for r in rows:
                queues.setdefault(r.notifier, []).append(
                    Pending(r.id, r.notifier, r.attempts, r.next_at, r.payload)
                )
            out = []
            for ident, queue in queues.items():
                n = db.get(Notifier, ident)
                try:
                    if n is not None:
                        out.append((target_of(n, self.box), queue))
                except AecpError as exc:  # its password does not open: the others go on
                    log.warning("notify: notifier %d cannot be used: %s", ident, exc.message)
            return out

    async def _drain(self, target: Target, queue: list[Pending]) -> int:
        sent = 0
        for p in queue:
            if p.next_at > self.clock.wall():
                break  # a later message waits for this one: the order holds
            doc = json.loads(p.payload)
            error = await self._attempt(target, message_of(doc["event"], doc["alert"]))
            await asyncio.to_thread(self._mark, p, error)
            if error:
                break
            sent += 1
        return sent

    async def _attempt(self, target: Target, message: Message) -> str:
        """ "" if the message was accepted, else why not."""
        channel = self.channels.get(target.kind)
        if channel is None:
            return f"no channel for notifiers of kind {target.kind}"
        try:
            await channel.send(target, message)
        except DeliveryError as exc:
            return str(exc) or "refused"
        except Exception as exc:  # a bug must not hold the notifier's queue: a failed attempt
            log.exception("notify: notifier %d: the %s channel failed", target.id, target.kind)
            return f"internal error ({type(exc).__name__})"
        return ""

    def _mark(self, p: Pending, error: str) -> None:
        now = self.clock.wall()
        with self.sessions.begin() as db:
            row = db.get(Notification, p.id)
            if row is None:
                return  # its notifier was deleted meanwhile
            row.attempts = p.attempts + 1
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
                row.next_at = now + backoff(row.attempts)
                log.info(
                    "notify: message %d to notifier %d failed (attempt %d), again in %.0f s: %s",
                    p.id,
                    p.notifier,
                    row.attempts,
                    backoff(row.attempts),
                    error,
                )

    async def test(self, ident: int) -> str:
        """Send a test message to notifier ``ident`` now, once (nothing is stored): "" if it
        was accepted, else why not. ``NotFound`` if there is no such notifier."""

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
