"""The management-IP mover: an agent on each data node holds the management IP exactly while it
may (``docs/design/center-ha.md``, "The management IP").

The rule, decided by ``Mover.step`` once a round:

- **take** when a quorum read of etcd says the leader key is this member's *and* the local
  Patroni says its PostgreSQL is the primary, and has said so without a break for
  ``take_after_s``: ``add``, then ``announce`` (gratuitous ARP, repeated on the next rounds);
- **drop at once** when a read says otherwise (the key is another member's or absent, or
  PostgreSQL here is not the primary; also when etcd gives no answer but Patroni here says its
  PostgreSQL is not the primary): ``remove``;
- **without an answer** keep holding only until the deadline of the last confirmation,
  ``read start + min(hold_s, remaining TTL - margin)``, where ``read start`` is the monotonic
  time taken *before* the etcd read. A read that is still running at the deadline does not
  delay the drop: the read is abandoned and the IP dropped on time.

Why two nodes never hold it: a rival may take the leader key either when the lease expires
(never before this node's deadline) or at once when Patroni releases it on purpose (a
switchover, a stop). In the second case this node's last "mine" was read before the release,
so it drops the IP within ``hold_s`` of that read, while the rival, whose first "mine" came
after the release, waits ``take_after_s`` > ``hold_s`` before adding it. The wait is skipped
when the rival's first "mine" was read after the old holder's lease, as last seen, had surely
run out (its remaining TTL + 2 s): the old holder's deadline fell at least the margin before
that. The kernel backs this
up: the address is put on with a lifetime (``ADDRESS_LIFETIME_S``) that each round renews, so a
node whose agent died gives it up by itself.

Also: an IP found on the interface that may not be held is removed (a restarted agent never
inherits one it may not hold); an IP that should be held but is gone is added back; and
``run`` removes the IP when it is cancelled (an agent that stops does not leave it behind).

Everything outside is behind a protocol (``Address``, ``LeaderSource``, ``LocalRole``) and time
comes from a ``Clock``, so the mover runs in virtual time in tests. The real façades are here
too: ``NetnsAddress`` (``ip addr`` through ``rootops``, gratuitous ARP on an ``AF_PACKET``
socket), ``GatewayLeader`` (``EtcdGateway`` bound to the leader key) and ``PatroniRole``
(``GET /primary``).
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import socket
import ssl
import struct
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Literal, Protocol

import httpx

from aecp.center.ha.etcdgw import EtcdGateway, LeaderLease
from aecp.common.clock import Clock
from aecp.common.errors import InvalidInput, Unavailable
from aecp.network import rootops

log = logging.getLogger(__name__)

ADDRESS_LIFETIME_S = 2
"""The management IP's lifetime in the kernel, renewed every round: an agent that dies (and
with it every renewal) leaves the IP for at most this long (plus the kernel's check, about a
second), less than ``TAKE_AFTER_S`` minus ``HOLD_S``... and far less than the ``ttl`` before
another node may take an expired leader key."""
HOLD_S = 1.5
"""How long one confirmation lets the mover go on holding without another."""
TAKE_AFTER_S = 4.0
"""How long a node must have been confirmed without a break before it adds the IP: more than
``HOLD_S`` + ``ADDRESS_LIFETIME_S`` - a round, so a holder that was confirmed just before a
voluntary release has dropped it (or its kernel has) first."""
ANNOUNCE_ROUNDS = 3
DECISIONS_KEPT = 50
"""How many of the mover's last sentences ``Mover.decisions`` keeps."""

# --- the protocols the mover acts through -------------------------------------------------------


class Address(Protocol):
    """The management IP on this node's interface. Each call raises when it could not act."""

    async def present(self) -> bool:
        """True if the address is on the interface now."""
        ...

    async def add(self) -> None:
        """Put the address on the interface."""
        ...

    async def renew(self) -> None:
        """Renew the address's lifetime (it is there): the kernel drops an address nobody
        renews, so a node whose agent died gives the IP up by itself."""
        ...

    async def remove(self) -> None:
        """Take the address off the interface; one that is not there is not an error."""
        ...

    async def announce(self) -> None:
        """Tell the segment where the address is now (gratuitous ARP)."""
        ...


class LeaderSource(Protocol):
    async def leader(self) -> LeaderLease | None:
        """The leader key's holder and lease (quorum read); ``None``: no key. Raises on failure."""
        ...


class LocalRole(Protocol):
    async def is_primary(self) -> bool:
        """True if the local PostgreSQL is the primary. Raises when it could not be told."""
        ...


# --- the mover ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Answer:
    """What one round learnt: ``mine`` (confirmed until ``until``, monotonic), ``not mine`` (a
    definite no) or ``no answer``; ``why`` is the clause the round's sentence ends with."""

    kind: Literal["mine", "not mine", "no answer"]
    why: str
    until: float | None = None
    started: float = 0.0


class Mover:
    """Holds the management IP for member ``me`` exactly while it may (module docstring).

    ``holds``: the mover added the address and has not removed it since. ``valid_until``: the
    monotonic deadline of the last confirmation (``None`` after a definite no). ``decisions``:
    the last ``DECISIONS_KEPT`` sentences, each prefixed with its UTC wall time.
    """

    def __init__(
        self,
        me: str,
        address: Address,
        leader: LeaderSource,
        role: LocalRole,
        clock: Clock,
        *,
        interval_s: float = 0.25,
        margin_s: float = 2.0,
        hold_s: float = HOLD_S,
        take_after_s: float = TAKE_AFTER_S,
    ) -> None:
        self.me = me
        self._address, self._leader, self._role, self._clock = address, leader, role, clock
        self.interval_s, self.margin_s = interval_s, margin_s
        self.hold_s, self.take_after_s = hold_s, take_after_s
        self._holds = False
        self._rounds = 0
        self._swept = False  # an IP found here that may not be held has been looked for
        self._mine_since: float | None = None  # start of an unbroken run of "mine" answers
        # by when the lease of the last rival holder seen has surely run out (monotonic)
        self._rival_gone_by: float | None = None
        self._announce_left = 0
        self._valid_until: float | None = None
        self.decisions: list[str] = []

    @property
    def holds(self) -> bool:
        return self._holds

    @property
    def valid_until(self) -> float | None:
        return self._valid_until

    async def run(self) -> None:
        """``step`` every ``interval_s`` (sooner when a deadline falls due) until cancelled; a
        failed step is logged and the next round tries again. On the way out the address is
        removed, best effort."""
        try:
            while True:
                try:
                    sentence = await self.step()
                except Exception:
                    log.exception("management IP: a round failed; trying again")
                else:
                    if sentence:
                        log.info("management IP: %s", sentence)
                await self._clock.sleep(self._pause())
        finally:
            await self._release()

    async def step(self) -> str | None:
        """One round: read, decide, act. One sentence when something changed, else ``None``."""
        self._rounds += 1
        if self._holds and self._expired():
            if self._valid_until is None:  # a drop that failed last round: try again
                return await self._drop("the last answer said I may not hold it")
            return await self._drop("etcd did not answer and the lease I last saw may have expired")
        answer = await self._ask_by_deadline()
        if answer.kind == "mine":
            self._valid_until = answer.until
            if self._mine_since is None:
                self._mine_since = answer.started
            return await self._on_mine(answer)
        self._mine_since = None
        if answer.kind == "not mine":
            self._valid_until = None
            return await self._on_no(answer.why)
        if self._holds and not self._expired():
            return await self._keep(answer.why)
        why = f"{answer.why} and the lease I last saw may have expired"
        return await self._on_no(why if self._holds else answer.why)

    # --- deciding -------------------------------------------------------------------------------

    async def _on_mine(self, answer: _Answer) -> str | None:
        if self._expired():
            return await self._on_no(f"the lease has less than the {self.margin_s:g} s margin left")
        if self._holds:
            return await self._keep(answer.why)
        if self._rounds == 1 and await self._address.present():
            return await self._take(answer.why)  # this node's own, from an agent before me
        assert self._mine_since is not None
        expired = self._rival_gone_by is not None and answer.started >= self._rival_gone_by
        if not expired and self._clock.monotonic() - self._mine_since < self.take_after_s:
            return None  # a holder confirmed before a voluntary release may still hold it
        return await self._take(answer.why)

    async def _on_no(self, why: str) -> str | None:
        """May not hold: drop what is held, and on the first round what is found."""
        if self._holds:
            return await self._drop(why)
        if not self._swept:
            found = await self._address.present()
            self._swept = True
            if found:
                await self._address.remove()
                return self._note(
                    f"removed the management IP found here (I may not hold it): {why}"
                )
        return None

    async def _keep(self, why: str) -> str | None:
        """Holding and may go on: renew the address, or put it back if someone removed it."""
        if await self._address.present():
            await self._address.renew()
            await self._announce_again()
            return None
        await self._address.add()
        self._announce_left = ANNOUNCE_ROUNDS
        await self._announce_again()
        return self._note(f"put the management IP back (it had been removed): {why}")

    async def _announce_again(self) -> None:
        """One of the gratuitous ARPs owed after a take; a failure is logged and retried."""
        if self._announce_left <= 0:
            return
        try:
            await self._address.announce()
        except Exception:
            log.warning("management IP: announcing it failed; trying again next round")
            return
        self._announce_left -= 1

    async def _take(self, why: str) -> str:
        found = await self._address.present()
        if not found:
            await self._address.add()
        self._holds = True
        self._swept = True
        self._announce_left = ANNOUNCE_ROUNDS
        await self._announce_again()
        verb = "kept the management IP found here" if found else "took the management IP"
        return self._note(f"{verb}: {why}")

    async def _drop(self, why: str) -> str:
        await self._address.remove()
        self._holds = False
        return self._note(f"dropped the management IP: {why}")

    # --- asking ---------------------------------------------------------------------------------

    async def _ask_by_deadline(self) -> _Answer:
        """``_ask``, abandoned at the confirmation deadline while the address is held."""
        if not self._holds or self._valid_until is None:
            return await self._ask()
        left = self._valid_until - self._clock.monotonic()
        answer = await _before(self._ask(), self._clock.sleep(left))
        return answer or _Answer("no answer", "etcd did not answer in time")

    async def _ask(self) -> _Answer:
        """The leader key (quorum read), then, if it is mine, the local role."""
        started = self._clock.monotonic()
        try:
            lease = await self._leader.leader()
        except Exception as exc:
            return await self._without_etcd(f"etcd did not answer ({_short(exc)})")
        if lease is None:
            return _Answer("not mine", "there is no leader key")
        if lease.holder != self.me:
            # its lease runs out before this (etcd rounds the TTL down; a second more for the
            # kernel to drop an address its holder renewed last): past it, that holder has
            # dropped the IP, so a take need not wait
            gone_by = self._clock.monotonic() + lease.ttl_remaining_s + 2.0
            self._rival_gone_by = gone_by
            return _Answer("not mine", f"the leader key is {lease.holder}'s")
        try:
            primary = await self._role.is_primary()
        except Exception as exc:
            return _Answer("no answer", f"Patroni here did not answer ({_short(exc)})")
        if not primary:
            return _Answer("not mine", "PostgreSQL here is not the primary")
        why = (
            f"the leader key is mine (lease {lease.ttl_remaining_s:.1f} s left) "
            "and PostgreSQL here is the primary"
        )
        until = started + min(self.hold_s, lease.ttl_remaining_s - self.margin_s)
        return _Answer("mine", why, until, started)

    async def _without_etcd(self, why: str) -> _Answer:
        """etcd gave no answer: a definite "not the primary" from Patroni here still drops."""
        try:
            primary = await self._role.is_primary()
        except Exception:
            return _Answer("no answer", why)
        if not primary:
            return _Answer("not mine", f"{why} and PostgreSQL here is not the primary")
        return _Answer("no answer", why)

    # --- time and bookkeeping -------------------------------------------------------------------

    def _expired(self) -> bool:
        return self._valid_until is None or self._clock.monotonic() >= self._valid_until

    def _pause(self) -> float:
        """The interval, or less when the confirmation deadline falls due sooner."""
        if self._holds and self._valid_until is not None:
            left = self._valid_until - self._clock.monotonic()
            if 0 < left < self.interval_s:
                return left
        return self.interval_s

    async def _release(self) -> None:
        """Remove the address on the way out; a failure is logged, not raised."""
        try:
            await self._address.remove()
        except Exception:
            log.exception("management IP: could not remove it on stopping")
            return
        if self._holds:
            self._holds = False
            log.info("management IP: %s", self._note("dropped the management IP: stopping"))

    def _note(self, sentence: str) -> str:
        stamp = datetime.fromtimestamp(self._clock.wall(), UTC).isoformat(timespec="milliseconds")
        self.decisions.append(f"{stamp} {sentence}")
        del self.decisions[:-DECISIONS_KEPT]
        return sentence


async def _before(
    work: Coroutine[Any, Any, _Answer], timer: Coroutine[Any, Any, None]
) -> _Answer | None:
    """``work``'s answer if it comes before ``timer`` ends, else ``None`` (``work`` is then
    cancelled). Both are cancelled, and waited for, whichever way this returns or raises."""
    work_task = asyncio.ensure_future(work)
    timer_task = asyncio.ensure_future(timer)
    try:
        await asyncio.wait({work_task, timer_task}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for task in (work_task, timer_task):
            task.cancel()
        await asyncio.wait({work_task, timer_task})
    if work_task.cancelled():
        return None
    return work_task.result()


def _short(exc: BaseException) -> str:
    text = str(exc).strip() or type(exc).__name__
    return text if len(text) <= 120 else text[:117] + "..."


# --- the real façades ---------------------------------------------------------------------------


class GatewayLeader:
    """``LeaderSource`` over an ``EtcdGateway``, bound to one key (``etcdgw.leader_key``)."""

    def __init__(self, gateway: EtcdGateway, key: str) -> None:
        self.gateway, self.key = gateway, key

    async def leader(self) -> LeaderLease | None:
        return await self.gateway.leader(self.key)


class PatroniRole:
    """``LocalRole`` from the local Patroni's ``GET {url}/primary``: 200 is the primary, 503 is
    not; anything else, or no answer within ``timeout``, raises ``Unavailable``."""

    def __init__(
        self,
        url: str,
        *,
        timeout: float = 1.0,
        verify: ssl.SSLContext | bool = True,
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        self.url = url.rstrip("/")
        self._http = httpx.AsyncClient(
            timeout=timeout, verify=verify, trust_env=False, transport=transport
        )

    async def is_primary(self) -> bool:
        try:
            resp = await self._http.get(f"{self.url}/primary")
        except httpx.HTTPError as exc:
            raise Unavailable(f"Patroni at {self.url} did not answer: {exc!r}") from None
        if resp.status_code == 200:
            return True
        if resp.status_code == 503:
            return False
        raise Unavailable(f"Patroni at {self.url} answered /primary with {resp.status_code}")

    async def aclose(self) -> None:
        await self._http.aclose()


ETH_P_ARP = 0x0806
ETH_P_IP = 0x0800
ARPHRD_ETHER = 1
ARPOP_REPLY = 2
BROADCAST = b"\xff" * 6


def garp_frame(mac: bytes, ip: ipaddress.IPv4Address) -> bytes:
    """A gratuitous ARP reply, as ``arping -A`` sends it: RFC 5944 §4.6 "Gratuitous ARP" in the
    RFC 826 packet format, in a broadcast Ethernet frame; sender and target hardware and
    protocol addresses are all ``mac`` and ``ip``. Padded to the 60-byte Ethernet minimum."""
    if len(mac) != 6:
        raise ValueError(f"a MAC address has 6 bytes, not {len(mac)}")
    ether = BROADCAST + mac + struct.pack("!H", ETH_P_ARP)
    arp = struct.pack("!HHBBH", ARPHRD_ETHER, ETH_P_IP, 6, 4, ARPOP_REPLY)
    arp += mac + ip.packed + mac + ip.packed
    return (ether + arp).ljust(60, b"\0")


def send_gratuitous_arp(iface: str, ip: ipaddress.IPv4Address, count: int = 3) -> None:
    """Send ``count`` gratuitous ARP replies for ``ip`` out of ``iface`` (blocking; needs
    CAP_NET_RAW). The socket, and so the interface, belong to the calling process's network
    namespace. The interface's MAC is read from the bound socket's own address."""
    with socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(ETH_P_ARP)) as sock:
        sock.bind((iface, 0))
        mac = sock.getsockname()[4]
        frame = garp_frame(mac, ip)
        for _ in range(count):
            sock.send(frame)


class NetnsAddress:
    """``Address`` for ``cidr`` on ``iface`` through ``rootops`` (``ip addr``).

    ``netns=None`` (the normal case: the agent runs inside its node's namespace): every action
    happens in the current namespace. With ``netns``, ``ip -n NS`` manages the address from
    outside, but ``announce`` cannot: a raw socket belongs to the namespace of the process that
    opens it, so it logs a warning and sends nothing. IPv4 only (gratuitous ARP).
    ``arp``: the sender, replaced in tests.
    """

    def __init__(
        self,
        iface: str,
        cidr: str,
        *,
        netns: str | None = None,
        arp: Callable[[str, ipaddress.IPv4Address, int], None] = send_gratuitous_arp,
        lifetime_s: int = ADDRESS_LIFETIME_S,
    ) -> None:
        self.lifetime_s = lifetime_s
        self.iface = rootops.check_ifname(iface)
        self.cidr = rootops.check_iface_cidr(cidr)
        ip = ipaddress.ip_interface(self.cidr)
        if not isinstance(ip, ipaddress.IPv4Interface):
            raise InvalidInput("address", f"{cidr} is not IPv4: only IPv4 is announced (ARP)")
        self.ip = ip
        self.netns = None if netns is None else rootops.check_netns(netns)
        self._arp = arp

    async def present(self) -> bool:
        for iface, cidr in await rootops.addr_list(netns=self.netns):
            with contextlib.suppress(ValueError):
                if iface == self.iface and ipaddress.ip_interface(cidr) == self.ip:
                    return True
        return False

    async def add(self) -> None:
        await rootops.addr_lease(self.iface, self.cidr, self.lifetime_s, netns=self.netns)

    async def renew(self) -> None:
        await rootops.addr_lease(self.iface, self.cidr, self.lifetime_s, netns=self.netns)

    async def remove(self) -> None:
        await rootops.addr_del(self.iface, self.cidr, netns=self.netns)

    async def announce(self) -> None:
        if self.netns is not None:
            log.warning(
                "%s: not announced (the agent runs outside namespace %s)", self.cidr, self.netns
            )
            return
        await asyncio.to_thread(self._arp, self.iface, self.ip.ip, 3)
