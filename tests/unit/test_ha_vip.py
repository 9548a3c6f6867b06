"""The management-IP mover holds the IP exactly while it may: it takes it when the leader key is
its own and PostgreSQL here is the primary, drops it at once on a definite no, and without
answers keeps it only until the last lease it saw could expire, all in virtual time."""

from __future__ import annotations

import asyncio
import ipaddress
from collections.abc import Sequence
from dataclasses import dataclass

import httpx
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from aecp.center.ha.etcdgw import GatewayError, LeaderLease
from aecp.center.ha.vip import (
    ANNOUNCE_ROUNDS,
    DECISIONS_KEPT,
    GatewayLeader,
    Mover,
    NetnsAddress,
    PatroniRole,
    garp_frame,
)
from aecp.common.clock import FakeClock
from aecp.common.errors import InvalidInput, Unavailable
from aecp.common.proc import Result
from aecp.network import rootops
from tests.unit._sync import run_ready

START = 1000.0
MARGIN = 2.0

# --- fakes ----------------------------------------------------------------------------------------


class FakeAddress:
    """The address on an imaginary interface; counts what was done to it."""

    def __init__(self, present: bool = False) -> None:
        self.on = present
        self.adds = self.removes = self.announces = self.renews = 0
        self.fail_remove = False

    async def present(self) -> bool:
        return self.on

    async def add(self) -> None:
        assert not self.on, "added an address that was already there"
        self.on = True
        self.adds += 1

    async def renew(self) -> None:
        assert self.on, "renewed an address that is not there"
        self.renews += 1

    async def remove(self) -> None:
        if self.fail_remove:
            raise OSError("ip addr del failed")
        self.on = False
        self.removes += 1

    async def announce(self) -> None:
        assert self.on, "announced an address that is not there"
        self.announces += 1


class ScriptedLeader:
    """Answers what ``answer`` is now: a lease, ``None`` (no key) or an exception to raise;
    while ``hang`` is set, a read waits until it is cleared (or forever)."""

    def __init__(self) -> None:
        self.answer: LeaderLease | Exception | None = GatewayError("not scripted")
        self.hang: asyncio.Event | None = None
        self.reads = 0

    def mine(self, ttl: float = 10.0, holder: str = "n1") -> None:
        self.answer = LeaderLease(holder=holder, ttl_remaining_s=ttl, revision=7)

    async def leader(self) -> LeaderLease | None:
        self.reads += 1
        if self.hang is not None:
            await self.hang.wait()
        if isinstance(self.answer, Exception):
            raise self.answer
        return self.answer


class FakeRole:
    def __init__(self, primary: bool | Exception = True) -> None:
        self.primary = primary

    async def is_primary(self) -> bool:
        if isinstance(self.primary, Exception):
            raise self.primary
        return self.primary


@dataclass
class Rig:
    clock: FakeClock
    address: FakeAddress
    leader: ScriptedLeader
    role: FakeRole
    mover: Mover


def rig(
    present: bool = False,
    interval_s: float = 0.25,
    hold_s: float = 1000.0,
    take_after_s: float = 0.0,
) -> Rig:
    """A mover over fakes; by default without the hold limit and the take delay (the tests of
    those pass them)."""
    clock, address, leader, role = (
        FakeClock(START),
        FakeAddress(present),
        ScriptedLeader(),
        FakeRole(),
    )
    mover = Mover(
        "n1",
        address,
        leader,
        role,
        clock,
        interval_s=interval_s,
        margin_s=MARGIN,
        hold_s=hold_s,
        take_after_s=take_after_s,
    )
    return Rig(clock, address, leader, role, mover)


async def held(r: Rig, ttl: float = 10.0) -> None:
    """Bring the mover to holding the IP, confirmed at the current time with ``ttl``."""
    r.leader.mine(ttl)
    await r.mover.step()
    assert r.mover.holds


# --- taking and dropping --------------------------------------------------------------------------


async def test_it_takes_the_ip_when_the_key_is_mine_and_postgresql_is_the_primary() -> None:
    r = rig()
    r.leader.mine(19.2)
    sentence = await r.mover.step()
    assert sentence == (
        "took the management IP: the leader key is mine (lease 19.2 s left) "
        "and PostgreSQL here is the primary"
    )
    assert r.mover.holds and r.address.on
    assert (r.address.adds, r.address.announces) == (1, 1)
    assert r.mover.valid_until == START + 19.2 - MARGIN


async def test_every_confirmed_round_renews_the_address_lifetime() -> None:
    """The kernel drops an address nobody renews: each round that confirms renews it."""
    r = rig()
    await held(r)
    assert r.address.renews == 0  # just added, with a fresh lifetime
    for _ in range(3):
        r.leader.mine(10.0)
        assert await r.mover.step() is None
    assert (r.address.renews, r.address.adds) == (3, 1)
    assert r.address.announces == ANNOUNCE_ROUNDS  # the take's, then one a round


async def test_it_drops_the_ip_at_once_when_the_key_names_another_member() -> None:
    r = rig()
    await held(r)
    r.leader.mine(holder="n2")
    assert await r.mover.step() == "dropped the management IP: the leader key is n2's"
    assert not r.mover.holds and not r.address.on
    assert r.mover.valid_until is None


async def test_it_drops_the_ip_at_once_when_there_is_no_leader_key() -> None:
    r = rig()
    await held(r)
    r.leader.answer = None
    assert await r.mover.step() == "dropped the management IP: there is no leader key"
    assert not r.address.on


async def test_it_never_holds_the_ip_while_postgresql_here_is_a_replica() -> None:
    r = rig()
    r.leader.mine()
    r.role.primary = False
    for _ in range(3):
        assert await r.mover.step() is None
        await r.clock.advance(0.25)
    assert not r.mover.holds and r.address.adds == 0
    r.role.primary = True
    await r.mover.step()
    r.role.primary = False
    assert await r.mover.step() == "dropped the management IP: PostgreSQL here is not the primary"


async def test_an_unchanged_round_says_nothing_and_announces_only_the_takes_arps() -> None:
    r = rig()
    await held(r)
    for _ in range(5):
        await r.clock.advance(0.25)
        assert await r.mover.step() is None
    assert (r.address.adds, r.address.announces) == (1, ANNOUNCE_ROUNDS)


async def test_each_take_announces_on_its_round_and_the_next_ones() -> None:
    r = rig()
    for take in (1, 2, 3):
        await held(r)
        for _ in range(ANNOUNCE_ROUNDS + 2):
            await r.mover.step()
        r.leader.mine(holder="n2")
        await r.mover.step()
        assert (r.address.adds, r.address.removes) == (take, take)
        assert r.address.announces == take * ANNOUNCE_ROUNDS


# --- the hold limit and the take delay (a voluntary release of the leader key) ------------------


async def test_a_confirmation_lets_it_hold_for_hold_s_at_most() -> None:
    r = rig(hold_s=1.5)
    await held(r, ttl=19.0)
    assert r.mover.valid_until == START + 1.5
    r.leader.answer = OSError("etcd down")
    await r.clock.advance(1.4)
    await r.mover.step()
    assert r.mover.holds
    await r.clock.advance(0.1)
    await r.mover.step()
    assert not r.mover.holds and not r.address.on


async def test_a_new_holder_waits_take_after_s_of_unbroken_confirmations() -> None:
    r = rig(hold_s=1.5, take_after_s=4.0)
    for _ in range(16):  # 3.75 s of rounds: not yet
        r.leader.mine(19.0)
        assert await r.mover.step() is None
        await r.clock.advance(0.25)
    assert not r.address.on
    r.leader.mine(19.0)
    assert (await r.mover.step() or "").startswith("took the management IP")
    assert r.address.on


async def test_no_wait_once_the_last_holders_lease_has_surely_run_out() -> None:
    """The old holder crashed: its lease, last seen with 5 s left, expired; past 5 + 2 s the
    key is mine and there is nothing to wait for (its holder dropped the IP a margin before)."""
    r = rig(hold_s=1.5, take_after_s=4.0)
    r.leader.mine(5.0, holder="n2")
    await r.mover.step()
    await r.clock.advance(6.9)
    r.leader.mine(19.0)
    assert await r.mover.step() is None  # 6.9 s: not surely gone yet
    await r.clock.advance(0.1)
    assert (await r.mover.step() or "").startswith("took the management IP")


async def test_a_break_in_the_confirmations_restarts_the_wait() -> None:
    r = rig(hold_s=1.5, take_after_s=4.0)
    for _ in range(12):
        r.leader.mine(19.0)
        await r.mover.step()
        await r.clock.advance(0.25)
    r.leader.answer = OSError("etcd down")
    await r.mover.step()
    for _ in range(12):  # 3 s since the break: still waiting
        r.leader.mine(19.0)
        await r.mover.step()
        await r.clock.advance(0.25)
    assert not r.address.on


async def test_two_movers_never_hold_at_once_across_a_voluntary_release() -> None:
    """n1 holds; Patroni releases the key on purpose and n2 takes it at once (a switchover):
    n1's last "mine" was read just before, and then neither its etcd nor its Patroni answer.
    Round by round, at most one node holds the IP."""
    clock = FakeClock(START)
    world = {"holder": "n1", "n1 silent": False}

    class Key:
        def __init__(self, me: str) -> None:
            self.me = me

        async def leader(self) -> LeaderLease | None:
            if self.me == "n1" and world["n1 silent"]:
                raise OSError("etcd down")
            return LeaderLease(holder=str(world["holder"]), ttl_remaining_s=19.0, revision=1)

        async def is_primary(self) -> bool:
            if self.me == "n1" and world["n1 silent"]:
                raise OSError("Patroni down")
            return world["holder"] == self.me

    a1, a2 = FakeAddress(), FakeAddress()
    m1 = Mover("n1", a1, Key("n1"), Key("n1"), clock, take_after_s=4.0)
    m2 = Mover("n2", a2, Key("n2"), Key("n2"), clock, take_after_s=4.0)
    for _ in range(20):
        await m1.step()
        await m2.step()
        await clock.advance(0.25)
    assert a1.on and not a2.on
    await m1.step()  # n1's last "mine"
    world.update({"holder": "n2", "n1 silent": True})
    for _ in range(40):
        await m2.step()
        await m1.step()
        assert not (a1.on and a2.on), f"both hold at {clock.monotonic() - START:.2f} s"
        await clock.advance(0.25)
    assert a2.on and not a1.on


async def test_a_lease_with_less_than_the_margin_left_is_not_taken() -> None:
    r = rig()
    r.leader.mine(ttl=MARGIN)
    assert await r.mover.step() is None
    assert not r.mover.holds


# --- no answer: the lease deadline ----------------------------------------------------------------


async def test_it_keeps_the_ip_through_a_short_etcd_outage() -> None:
    r = rig()
    await held(r, ttl=10.0)
    r.leader.answer = GatewayError("timed out")
    await r.clock.advance(3.0)
    assert await r.mover.step() is None
    r.leader.mine(ttl=10.0)
    await r.clock.advance(3.0)
    assert await r.mover.step() is None  # confirmed again: the deadline moved on
    assert r.mover.holds and r.mover.valid_until == START + 6.0 + 10.0 - MARGIN
    assert r.address.removes == 0


async def test_without_answers_it_drops_the_ip_exactly_at_the_lease_deadline() -> None:
    r = rig()
    await held(r, ttl=10.0)
    deadline = START + 10.0 - MARGIN
    r.leader.answer = GatewayError("timed out")
    await r.clock.advance(deadline - START - 0.001)
    assert await r.mover.step() is None
    assert r.mover.holds
    await r.clock.advance(0.001)
    assert r.clock.now == deadline
    assert await r.mover.step() == (
        "dropped the management IP: etcd did not answer and the lease I last saw may have expired"
    )
    assert not r.mover.holds and not r.address.on


async def test_a_failing_primary_check_while_the_key_is_mine_counts_as_no_answer() -> None:
    r = rig()
    await held(r, ttl=10.0)
    r.role.primary = Unavailable("Patroni did not answer")
    await r.clock.advance(7.9)
    assert await r.mover.step() is None
    assert r.mover.valid_until == START + 10.0 - MARGIN  # not moved on by the unconfirmed read
    await r.clock.advance(0.1)
    sentence = await r.mover.step()
    assert sentence is not None and sentence.startswith("dropped the management IP")
    assert not r.address.on


async def test_a_read_that_hangs_past_the_deadline_does_not_delay_the_drop() -> None:
    r = rig()
    await held(r, ttl=10.0)
    r.leader.hang = asyncio.Event()
    step = asyncio.create_task(r.mover.step())
    await r.clock.until_sleeping()  # the mover waits for the read, or for the deadline
    await r.clock.advance(7.999)
    assert not step.done() and r.address.on
    await r.clock.advance(0.001)
    await run_ready()
    r.leader.hang.set()  # whatever happened, let the read end (a failing test ends too)
    assert step.done(), "the drop waited for the hanging read"
    assert step.result() == (
        "dropped the management IP: etcd did not answer in time "
        "and the lease I last saw may have expired"
    )
    assert not r.address.on and r.clock.sleeping() == 0


async def test_the_deadline_counts_from_the_start_of_the_read() -> None:
    r = rig()
    r.leader.mine(ttl=10.0)
    r.leader.hang = asyncio.Event()
    step = asyncio.create_task(r.mover.step())
    await run_ready()
    await r.clock.advance(1.5)  # the answer comes 1.5 s after the read started
    r.leader.hang.set()
    await step
    assert r.mover.holds and r.mover.valid_until == START + 10.0 - MARGIN


async def test_after_a_drop_on_the_deadline_a_fresh_confirmation_takes_the_ip_again() -> None:
    r = rig()
    await held(r, ttl=10.0)
    r.leader.answer = GatewayError("timed out")
    await r.clock.advance(8.0)
    await r.mover.step()
    assert await r.mover.step() is None  # still no answer, not holding: nothing to say
    r.leader.mine(ttl=10.0)
    sentence = await r.mover.step()
    assert sentence is not None and sentence.startswith("took the management IP")
    assert r.address.announces == 2


# --- what is found on the interface ---------------------------------------------------------------


async def test_a_restarted_mover_removes_an_inherited_ip_it_may_not_hold() -> None:
    for answer in (GatewayError("no quorum"), None, LeaderLease("n2", 10.0, 3)):
        r = rig(present=True)
        r.leader.answer = answer
        sentence = await r.mover.step()
        assert sentence is not None
        assert sentence.startswith("removed the management IP found here (I may not hold it)")
        assert not r.address.on and not r.mover.holds


async def test_a_restarted_mover_that_may_hold_the_ip_keeps_it_and_announces_it() -> None:
    r = rig(present=True)
    r.leader.mine()
    sentence = await r.mover.step()
    assert sentence is not None and sentence.startswith("kept the management IP found here")
    assert (r.address.adds, r.address.removes, r.address.announces) == (0, 0, 1)
    assert r.mover.holds


async def test_only_the_first_round_removes_an_ip_it_did_not_add() -> None:
    r = rig()
    r.leader.answer = GatewayError("no quorum")
    await r.mover.step()
    r.address.on = True  # appeared later: not the mover's business until it may hold it
    assert await r.mover.step() is None
    assert r.address.on


async def test_it_puts_back_an_ip_someone_removed() -> None:
    r = rig()
    await held(r)
    r.address.on = False
    assert await r.mover.step() == (
        "put the management IP back (it had been removed): the leader key is mine "
        "(lease 10.0 s left) and PostgreSQL here is the primary"
    )
    assert r.address.on and (r.address.adds, r.address.announces) == (2, 2)


async def idle(r: Rig) -> None:
    """Let ``run`` finish its round and wait in its pause (a round that holds the IP also
    sleeps, on its deadline timer, while it asks)."""
    await run_ready()
    await r.clock.until_sleeping()


# --- the loop -------------------------------------------------------------------------------------


async def test_run_takes_the_ip_and_removes_it_when_cancelled() -> None:
    r = rig()
    r.leader.mine()
    task = asyncio.create_task(r.mover.run())
    await idle(r)
    assert r.mover.holds
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert not r.address.on and not r.mover.holds
    assert r.mover.decisions[-1].endswith("dropped the management IP: stopping")


async def test_run_removes_the_ip_on_cancel_even_when_it_never_held_it() -> None:
    r = rig()
    r.leader.answer = GatewayError("no quorum")
    task = asyncio.create_task(r.mover.run())
    await idle(r)
    r.address.on = True
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert not r.address.on


async def test_run_wakes_at_the_deadline_rather_than_a_whole_interval_later() -> None:
    r = rig(interval_s=5.0)
    r.leader.mine(ttl=10.0)
    task = asyncio.create_task(r.mover.run())
    await idle(r)
    r.leader.answer = GatewayError("timed out")
    await r.clock.advance(5.0)  # a round without an answer at 1005: keeps the IP
    await idle(r)
    assert r.address.on
    await r.clock.advance(3.0)  # 1008 = 1000 + 10 - 2: the deadline, not 1010
    await idle(r)
    assert not r.address.on
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task


async def test_run_goes_on_after_a_failed_round() -> None:
    r = rig()
    await held(r)
    r.leader.mine(holder="n2")
    r.address.fail_remove = True
    task = asyncio.create_task(r.mover.run())
    await idle(r)
    assert r.mover.holds  # the removal failed: still held, as far as anyone can tell
    r.address.fail_remove = False
    await r.clock.advance(0.25)
    await idle(r)
    assert not r.mover.holds and not r.address.on
    assert r.mover.decisions[-1].endswith(
        "dropped the management IP: the last answer said I may not hold it"
    )
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task


async def test_decisions_keep_the_last_sentences_with_their_time() -> None:
    r = rig()
    for _ in range(DECISIONS_KEPT + 5):
        await held(r)
        r.leader.mine(holder="n2")
        await r.mover.step()
    assert len(r.mover.decisions) == DECISIONS_KEPT
    assert r.mover.decisions[-1] == (
        "1970-01-01T00:16:40.000+00:00 dropped the management IP: the leader key is n2's"
    )


# --- the safety property --------------------------------------------------------------------------

ANSWER = st.one_of(
    st.tuples(st.just("mine"), st.floats(0.0, 20.0)),
    st.tuples(st.sampled_from(["rival", "no key", "etcd fails", "replica", "patroni fails"])),
)
EVENT = st.tuples(st.floats(0.0, 6.0), ANSWER)


async def play(events: Sequence[tuple[float, tuple[object, ...]]]) -> None:
    """Feed the mover ``events`` (advance the clock, then a round with that answer) and check
    after every round: it holds the IP only before the last lease it saw could expire (from
    then on a rival could hold the key), and before its own deadline, ``margin`` earlier than
    the last lease it confirmed; never right after a definite no."""
    r = rig()
    rival_from = confirmed_until = float("-inf")
    for dt, answer in events:
        await r.clock.advance(dt)
        kind = answer[0]
        r.role.primary = True
        if kind in ("rival", "no key"):
            r.leader.answer = LeaderLease("n2", 10.0, 9) if kind == "rival" else None
            rival_from = float("-inf")
        elif kind == "etcd fails":
            r.leader.answer = GatewayError("no quorum")
        else:  # the key is mine; confirmed only when PostgreSQL here says it is the primary
            ttl = float(answer[1]) if kind == "mine" else 10.0  # type: ignore[arg-type]
            r.leader.mine(ttl)
            rival_from = r.clock.now + ttl
            if kind == "mine":
                confirmed_until = rival_from - MARGIN
            else:
                r.role.primary = False if kind == "replica" else Unavailable("no answer")
        await r.mover.step()
        assert r.mover.holds == r.address.on
        if r.mover.holds:
            assert r.clock.now < rival_from
            assert r.clock.now < confirmed_until
            assert kind in ("mine", "etcd fails", "patroni fails")


@settings(max_examples=300, deadline=None)
@given(st.lists(EVENT, max_size=30))
def test_the_mover_never_holds_the_ip_when_a_rival_could_hold_the_key(
    events: list[tuple[float, tuple[object, ...]]],
) -> None:
    asyncio.run(play(events))


# --- the real façades -----------------------------------------------------------------------------


async def test_gateway_leader_reads_its_bound_key() -> None:
    class Gateway:
        async def leader(self, key: str) -> LeaderLease | None:
            return LeaderLease(key, 5.0, 1)

    source = GatewayLeader(Gateway(), "/service/aoc/leader")  # type: ignore[arg-type]
    assert await source.leader() == LeaderLease("/service/aoc/leader", 5.0, 1)


@pytest.mark.parametrize(("status", "primary"), [(200, True), (503, False)])
async def test_patroni_role_reads_the_primary_endpoint(status: int, primary: bool) -> None:
    seen: list[str] = []

    def answer(request: httpx.Request) -> httpx.Response:
        seen.append(str(request.url))
        return httpx.Response(status, json={"role": "primary" if primary else "replica"})

    role = PatroniRole("http://10.232.0.1:8008/", transport=httpx.MockTransport(answer))
    assert await role.is_primary() is primary
    assert seen == ["http://10.232.0.1:8008/primary"]
    await role.aclose()


async def test_patroni_role_raises_on_another_status_or_no_answer() -> None:
    def answer(request: httpx.Request) -> httpx.Response:
        if request.url.host == "down":
            raise httpx.ConnectError("refused", request=request)
        return httpx.Response(500)

    for url in ("http://up:8008", "http://down:8008"):
        role = PatroniRole(url, transport=httpx.MockTransport(answer))
        with pytest.raises(Unavailable):
            await role.is_primary()
        await role.aclose()


def test_a_gratuitous_arp_frame_is_a_broadcast_reply_naming_the_ip_and_mac_twice() -> None:
    mac = bytes.fromhex("020000e80001")
    frame = garp_frame(mac, ipaddress.IPv4Address("10.232.0.100"))
    assert len(frame) == 60
    assert frame[:14] == b"\xff" * 6 + mac + b"\x08\x06"
    assert frame[14:22] == bytes.fromhex("0001 0800 06 04 0002")
    assert frame[22:42] == mac + bytes([10, 232, 0, 100]) + mac + bytes([10, 232, 0, 100])
    assert frame[42:] == b"\0" * 18
    with pytest.raises(ValueError):
        garp_frame(b"\x01", ipaddress.IPv4Address("10.0.0.1"))


class RootRecorder:
    def __init__(self, stdout: str = "") -> None:
        self.calls: list[list[str]] = []
        self.stdout = stdout

    async def __call__(self, argv: Sequence[str], *, input_data: bytes | None = None) -> Result:
        self.calls.append(list(argv))
        return Result(0, self.stdout, "")


async def test_netns_address_manages_the_ip_through_rootops(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    rec = RootRecorder("3: mgmt0@if9    inet 10.232.0.100/24 scope global mgmt0\n")
    monkeypatch.setattr(rootops, "run_root", rec)
    sent: list[tuple[str, ipaddress.IPv4Address, int]] = []
    address = NetnsAddress("mgmt0", "10.232.0.100/24", arp=lambda *a: sent.append(a))
    assert await address.present()
    await address.add()
    await address.renew()
    await address.remove()
    await address.announce()
    lease = ["10.232.0.100/24", "dev", "mgmt0", "valid_lft", "2", "preferred_lft", "2"]
    assert rec.calls == [
        ["ip", "-o", "addr", "show"],
        ["ip", "addr", "replace", *lease],
        ["ip", "addr", "replace", *lease],
        ["ip", "addr", "del", "10.232.0.100/24", "dev", "mgmt0"],
    ]
    assert sent == [("mgmt0", ipaddress.IPv4Address("10.232.0.100"), 3)]


async def test_netns_address_from_outside_uses_ip_dash_n_and_does_not_announce(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    rec = RootRecorder("3: mgmt0    inet 10.232.0.100/32 scope global mgmt0\n")
    monkeypatch.setattr(rootops, "run_root", rec)
    sent: list[object] = []
    address = NetnsAddress(
        "mgmt0", "10.232.0.100/24", netns="aecp-x-n1", arp=lambda *a: sent.append(a)
    )
    assert not await address.present()  # another prefix: not the management IP as configured
    await address.announce()
    assert rec.calls == [["ip", "-n", "aecp-x-n1", "-o", "addr", "show"]]
    assert sent == []


def test_netns_address_refuses_bad_input() -> None:
    with pytest.raises(InvalidInput):
        NetnsAddress("mgmt 0", "10.232.0.100/24")
    with pytest.raises(InvalidInput):
        NetnsAddress("mgmt0", "10.232.0.100")
    with pytest.raises(InvalidInput):
        NetnsAddress("mgmt0", "fd00::1/64")
