"""The channels that carry one notification each: a webhook (a JSON ``POST``) and SMTP, plus
an in-memory one for tests; and which addresses a webhook may not point at (loopback,
link-local, unspecified, cloud metadata) unless the center allows private targets.
``center.notify`` decides what is sent when; a channel only sends, within ``SEND_DEADLINE``.
"""

from __future__ import annotations

import abc
import asyncio
import contextlib
import ipaddress
import logging
import smtplib
import socket
import ssl
import threading
import time
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from email.message import EmailMessage
from typing import Any
from urllib.parse import urlsplit

import httpx

log = logging.getLogger(__name__)
SEND_TIMEOUT = 10.0  # s: one network operation of a send (connect, one read, one write)
SEND_DEADLINE = 30.0  # s: one send in all, whatever the receiver does
SMTP_THREADS = 2  # the SMTP channel's own threads (never the default executor's)
# loopback, "this network", link-local (with the clouds' metadata at 169.254.169.254), and
# AWS's IPv6 metadata address; RFC 1918 networks are allowed: on-premises receivers live there
_DENIED = tuple(
    ipaddress.ip_network(n)
    for n in (
        "127.0.0.0/8",
        "0.0.0.0/8",
        "169.254.0.0/16",
        "::1/128",
        "::/128",
        "fe80::/10",
        "fd00:ec2::254/128",
    )
)


class DeliveryError(Exception):
    """A message was not accepted. The text says why in short, for people and the API (a class
    of error, never a secret nor the receiver's words); ``detail`` is for the log."""

    def __init__(self, why: str, detail: str = "") -> None:
        super().__init__(why)
        self.detail = detail


@dataclass(frozen=True)
class Target:
    """A notifier as a channel needs it: its kind, its settings, and its secret opened (the
    SMTP password, or the webhook's whole URL)."""

    id: int
    name: str
    kind: str
    config: Mapping[str, Any]
    secret: str = field(default="", repr=False)

    @property
    def url(self) -> str:
        """A webhook's whole URL (sealed; an unsealed one of an older center is in its
        config)."""
        return self.secret or str(self.config.get("url", ""))


@dataclass(frozen=True)
class Message:
    """One message: ``payload`` is the webhook's JSON body; ``subject`` and ``text`` the mail."""

    payload: Mapping[str, Any]
    subject: str
    text: str


# ---- where a webhook may point ----------------------------------------------------------------
def denied_address(addr: ipaddress.IPv4Address | ipaddress.IPv6Address) -> bool:
    """Whether ``addr`` is loopback, unspecified, link-local or a metadata address."""
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
        addr = addr.ipv4_mapped
    return any(addr.version == net.version and addr in net for net in _DENIED)


def private_host(host: str) -> bool:
    """Whether a URL's host (a name or an address, as ``urlsplit`` gives it) names a denied
    address without asking DNS: ``localhost`` (and ``*.localhost``) or a denied literal,
    including the forms ``inet_aton`` takes (``127.1``, ``2130706433``, ``0x7f.0.0.1``)."""
    h = host.strip("[]").rstrip(".").lower()
    if h == "localhost" or h.endswith(".localhost"):
        return True
    addr: ipaddress.IPv4Address | ipaddress.IPv6Address
    try:
        addr = ipaddress.ip_address(h.partition("%")[0])  # fe80::1%eth0: a zone
    except ValueError:
        try:
            addr = ipaddress.IPv4Address(socket.inet_aton(h))
        except OSError:
            return False
    return denied_address(addr)


async def _refuse_private(url: str) -> None:
    """``DeliveryError`` if ``url``'s host is, or resolves to, a denied address."""
    parts = urlsplit(url)
    host, port = parts.hostname or "", parts.port or (443 if parts.scheme == "https" else 80)
    if private_host(host):
        raise DeliveryError("the webhook's address is loopback or link-local: refused")
    try:
        infos = await asyncio.get_running_loop().getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except OSError as exc:
        raise DeliveryError(type(exc).__name__, str(exc)) from None
    for *_, sockaddr in infos:
        if denied_address(ipaddress.ip_address(str(sockaddr[0]).partition("%")[0])):
            raise DeliveryError("the webhook's name resolves to a loopback or link-local address")


def shown_url(url: str) -> str:
    """A webhook URL as readers see it: ``scheme://host[:port]/``, with ``…`` in place of any
    path, query or user (they often carry a token)."""
    try:
        parts = urlsplit(url)
        host, port = parts.hostname or "", parts.port
    except ValueError:
        return "[unreadable]"
    if ":" in host:
        host = f"[{host}]"
    base = f"{parts.scheme}://{host}" + (f":{port}" if port is not None else "")
    hidden = parts.path not in ("", "/") or parts.query or parts.fragment or "@" in parts.netloc
    return base + ("/…" if hidden else "/")


# ---- channels ---------------------------------------------------------------------------------
class Channel(abc.ABC):
    """Carries one message to one receiver.

    ``send`` returns once the receiver has accepted the message, and raises ``DeliveryError``
    otherwise. It never retries: the outbox does, with backoff; and the outbox cancels it at
    ``SEND_DEADLINE``. It never blocks the event loop. ``aclose`` lets go of what it holds.
    """

    @abc.abstractmethod
    async def send(self, target: Target, message: Message) -> None: ...

    async def aclose(self) -> None:
        return None


def _client() -> httpx.AsyncClient:
    return httpx.AsyncClient(
        timeout=httpx.Timeout(SEND_TIMEOUT),
        follow_redirects=False,
        headers={"user-agent": "aecp-center"},
    )


class WebhookChannel(Channel):
    """A JSON ``POST`` to the notifier's URL; any 2xx is accepted. Redirects are not followed.
    One HTTP client for every message (its connections are kept), made at the first send and
    closed by ``aclose``. A URL whose host is or resolves to a denied address is refused unless
    ``allow_private``."""

    def __init__(
        self,
        client_factory: Callable[[], httpx.AsyncClient] = _client,
        allow_private: bool = False,
    ) -> None:
        self.client_factory, self.allow_private = client_factory, allow_private
        self._client: httpx.AsyncClient | None = None

    def client(self) -> httpx.AsyncClient:
        if self._client is None or self._client.is_closed:
            self._client = self.client_factory()
        return self._client

    async def send(self, target: Target, message: Message) -> None:
        url = target.url
        if not self.allow_private:
            await _refuse_private(url)
        try:
            r = await self.client().post(
                url,
                json=message.payload,
                headers={"user-agent": "aecp-center"},
                timeout=SEND_TIMEOUT,
                follow_redirects=False,
            )
        except (httpx.HTTPError, httpx.InvalidURL) as exc:
            detail = str(exc).replace(url, shown_url(url))
            raise DeliveryError(type(exc).__name__, detail) from None
        if not 200 <= r.status_code < 300:
            raise DeliveryError(f"the webhook answered HTTP {r.status_code}")

    async def aclose(self) -> None:
        if self._client is not None:
            await self._client.aclose()
            self._client = None


class SmtpChannel(Channel):
    """A mail through the notifier's SMTP server, with STARTTLS and a login when the notifier
    says so (``tls``: the TLS settings, the system's trusted CAs by default). ``smtplib`` runs
    in the channel's own few threads (``SMTP_THREADS``), never the default executor, with every
    socket operation bounded by what is left of ``SEND_DEADLINE``; a send the outbox gives up
    has its socket shut at once, so its thread ends with it."""

    def __init__(
        self,
        tls: Callable[[], ssl.SSLContext] = ssl.create_default_context,
        threads: int = SMTP_THREADS,
    ) -> None:
        self.tls, self.threads = tls, threads
        self._pool: ThreadPoolExecutor | None = None

    def pool(self) -> ThreadPoolExecutor:
        if self._pool is None:
            self._pool = ThreadPoolExecutor(self.threads, thread_name_prefix="aecp-smtp")
        return self._pool

    async def send(self, target: Target, message: Message) -> None:
        abort = _Abort()
        job = asyncio.get_running_loop().run_in_executor(
            self.pool(), _mail, target, message, self.tls, abort
        )
        try:
            await job
        except asyncio.CancelledError:
            abort.fire()  # the thread's socket is shut: it ends now, not at its timeout
            raise
        except (OSError, ValueError, smtplib.SMTPException) as exc:
            raise DeliveryError(type(exc).__name__, str(exc)[:300]) from None

    async def aclose(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)
            self._pool = None


class _Abort:
    """The socket a send in a thread uses, so that the event loop can shut it (``fire``)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._sock: socket.socket | None = None
        self.fired = False

    def attach(self, sock: socket.socket | None) -> None:
        with self._lock:
            self._sock = sock
            fired = self.fired
        if fired and sock is not None:
            _shut(sock)

    def fire(self) -> None:
        with self._lock:
            self.fired = True
            sock = self._sock
        if sock is not None:
            _shut(sock)


def _shut(sock: socket.socket) -> None:
    # the plain socket's shutdown, also under TLS: a read blocked in another thread returns
    with contextlib.suppress(OSError):
        socket.socket.shutdown(sock, socket.SHUT_RDWR)


class _SMTP(smtplib.SMTP):
    """``smtplib.SMTP`` that hands its socket to ``abort`` as soon as it is connected."""

    def __init__(self, abort: _Abort, host: str, port: int, timeout: float) -> None:
        self._abort = abort
        super().__init__(host, port, timeout=timeout)  # connects (and names the TLS server)

    def _get_socket(self, host: str, port: int, timeout: float) -> socket.socket:
        sock = socket.create_connection((host, port), timeout, self.source_address)
        self._abort.attach(sock)
        return sock


def _mail(
    target: Target, message: Message, tls: Callable[[], ssl.SSLContext], abort: _Abort
) -> None:
    deadline = time.monotonic() + SEND_DEADLINE

    def left() -> float:
        if abort.fired:
            raise TimeoutError("given up")
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise TimeoutError(f"no answer within {SEND_DEADLINE:.0f} s")
        return min(SEND_TIMEOUT, remaining)

    cfg = target.config
    mail = EmailMessage()
    mail["From"] = str(cfg["sender"])
    mail["To"] = ", ".join(cfg["recipients"])
    mail["Subject"] = message.subject
    mail.set_content(message.text)
    try:
        with _SMTP(abort, str(cfg["host"]), int(cfg["port"]), timeout=left()) as smtp:
            if cfg.get("starttls"):
                _bound(smtp, left())
                smtp.starttls(context=tls())
                abort.attach(smtp.sock)  # the TLS socket now
            if cfg.get("user"):
                _bound(smtp, left())
                smtp.login(str(cfg["user"]), target.secret)
            _bound(smtp, left())
            smtp.send_message(mail)
            _bound(smtp, left())
    finally:
        abort.attach(None)


def _bound(smtp: smtplib.SMTP, seconds: float) -> None:
    if smtp.sock is not None:
        smtp.sock.settimeout(seconds)


class MemoryChannel(Channel):
    """The test double: keeps what it is given; the first ``fail_first`` sends fail. ``until``
    waits for what it has seen."""

    def __init__(self, fail_first: int = 0) -> None:
        self.sent: list[tuple[Target, Message]] = []
        self.fail_first = fail_first
        self.attempts = 0
        self._seen: asyncio.Condition | None = None

    def _condition(self) -> asyncio.Condition:
        if self._seen is None:
            self._seen = asyncio.Condition()
        return self._seen

    async def send(self, target: Target, message: Message) -> None:
        self.attempts += 1
        try:
            if self.attempts <= self.fail_first:
                raise DeliveryError(f"attempt {self.attempts} refused (fail_first)")
            self.sent.append((target, message))
        finally:
            async with self._condition():
                self._condition().notify_all()

    async def until(self, check: Callable[[], bool]) -> None:
        """Return once ``check()`` holds (checked again after every send)."""
        async with self._condition():
            await self._condition().wait_for(check)


def default_channels(allow_private: bool = False) -> dict[str, Channel]:
    return {"webhook": WebhookChannel(allow_private=allow_private), "smtp": SmtpChannel()}
