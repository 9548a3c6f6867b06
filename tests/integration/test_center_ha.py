"""The AOC HA trio's failure table on the netns lab (root): real etcd, Patroni, PostgreSQL,
agents and centers, each node in a namespace of its own.

The tests run in order on one trio, each leaving it whole again (every node up, a standby in
sync). Each failure test runs a writer through the management IP that records every
acknowledged write, and afterwards reads all of them back (data centers and audit records);
an IP sampler reads, every 50 ms, which namespaces hold the management IP and fails if two
ever do.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import os
import shutil
import tempfile
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import httpx
import pytest
import pytest_asyncio

from aecp.center.ha.model import HAStatus, Replication, RPOKind
from aecp.lab.centerha import Trio, TrioPlan
from aecp.lab.hawriter import Writer
from tests.labkit import wait_for

pytestmark = [pytest.mark.integration, pytest.mark.asyncio(loop_scope="module")]

HA_CIDR = "10.232.64.0/24"
MGMT_CIDR = "10.233.64.0/24"
FAILOVER = 90.0  # s: patience for one failover (Patroni's ttl is 20 s)


@pytest.fixture(scope="module")
def trio_root() -> Iterator[Path]:
    # PostgreSQL runs as user postgres: its directories must be reachable (pytest's are 0700)
    root = Path(tempfile.mkdtemp(prefix="aecp-trio-"))
    os.chmod(root, 0o755)
    yield root
    shutil.rmtree(root, ignore_errors=True)


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def trio(trio_root: Path) -> AsyncIterator[Trio]:
    assert os.geteuid() == 0, "the HA trio tests need root (CI runs them as root)"
    t = Trio(trio_root / "trio", TrioPlan("t" + os.urandom(1).hex(), HA_CIDR, MGMT_CIDR))
    try:
        await t.create()
        await t.start()
        await t.wait_ready(180)
        yield t
    finally:
        await t.destroy()


def root_password(trio: Trio) -> str:
    return (trio.base(1) / "center" / "root-password").read_text().strip()


class Sampler:
    """Which nodes hold the management IP, every 50 ms, in the background."""

    def __init__(self, trio: Trio) -> None:
        self.trio = trio
        self.samples: list[tuple[float, list[int]]] = []
        self._task: asyncio.Task[None] | None = None

    async def _run(self) -> None:
        while True:
            self.samples.append((time.time(), await self.trio.holders()))
            await asyncio.sleep(0.05)

    def __enter__(self) -> Sampler:
        self._task = asyncio.create_task(self._run())
        return self

    def __exit__(self, *exc: object) -> None:
        assert self._task is not None
        self._task.cancel()

    def assert_never_two(self) -> None:
        doubles = [(t, h) for t, h in self.samples if len(h) > 1]
        assert not doubles, f"the management IP was on two nodes: {doubles[:3]}"
        assert len(self.samples) > 20


class RoleWatch:
    """A center's role (its ``/healthz``), every 50 ms, in the background."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.seen: list[tuple[float, str]] = []
        self._task: asyncio.Task[None] | None = None

    async def _run(self) -> None:
        async with httpx.AsyncClient(trust_env=False) as http:
            while True:
                try:
                    r = await http.get(self.url, timeout=1.0)
                    self.seen.append((time.time(), str(r.json().get("role"))))
                except (httpx.HTTPError, ValueError):
                    self.seen.append((time.time(), "unreachable"))
                await asyncio.sleep(0.05)

    def __enter__(self) -> RoleWatch:
        self._task = asyncio.create_task(self._run())
        return self

    def __exit__(self, *exc: object) -> None:
        assert self._task is not None
        self._task.cancel()


@contextlib.asynccontextmanager
async def writing(trio: Trio, prefix: str) -> AsyncIterator[Writer]:
    """A writer through the management IP for the block; every acknowledged write is checked
    afterwards (the caller calls ``verify`` once the trio has recovered)."""
    w = Writer(trio.center_url, "root", root_password(trio), prefix=prefix)
    stop = asyncio.Event()
    task = asyncio.create_task(w.run(stop))
    await wait_for(lambda: _true(len(w.acked) >= 5), "the first acknowledged writes")
    try:
        yield w
    finally:
        stop.set()
        await task


async def _true(value: bool) -> bool:
    return value


async def status(trio: Trio, k: int = 3) -> HAStatus:
    async with httpx.AsyncClient() as http:
        return await trio.status(k, http)


async def reading(trio: Trio, k: int = 3) -> HAStatus | None:
    try:
        return await status(trio, k)
    except Exception:
        return None


async def acks_after(w: Writer, t: float, n: int = 5) -> bool:
    return sum(1 for a in w.acked if a.at > t) >= n


def member(st: HAStatus, name: str) -> Replication | None:
    return next(m.replication for m in st.members if m.name == name)


async def whole_again(trio: Trio, leader: str) -> HAStatus:
    """Wait until ``leader`` is the active with the other data node in sync and the IP on it."""

    async def check() -> HAStatus | None:
        st = await reading(trio)
        if st is None or st.leader != leader or st.rpo.kind is not RPOKind.IN_SYNC:
            return None
        return st if st.ip_holders == [leader] and st.automatic_failover else None

    return await wait_for(check, f"the trio whole with {leader} active", timeout=FAILOVER)


# --- the trio up -------------------------------------------------------------------------------


async def test_the_trio_comes_up_with_the_active_in_sync(trio: Trio) -> None:
    st = await whole_again(trio, "aoc1")
    assert st.epoch is not None and st.epoch >= 1
    assert member(st, "aoc2") is Replication.IN_SYNC
    assert await trio.holders() == [1]
    # the passive's center serves reads and refuses writes, naming the active
    async with httpx.AsyncClient(trust_env=False) as http:
        r = await http.get(f"{trio.center_url_of(2)}/healthz", timeout=5)
        assert r.status_code == 200
    r = await write_on(trio, trio.center_url_of(2), "on-the-passive")
    assert r.status_code == 503
    assert trio.management_address in r.text


async def write_on(trio: Trio, url: str, name: str) -> httpx.Response:
    """Log in through the management IP, then try to make data center ``name`` on the center
    at ``url``."""
    async with httpx.AsyncClient(trust_env=False) as http:
        login = await http.post(
            f"{trio.center_url}/v1/login",
            json={"user": "root", "password": root_password(trio)},
            timeout=5,
        )
        token = login.json()["token"]
        return await http.post(
            f"{url}/v1/datacenters",
            json={"name": name},
            headers={"Authorization": f"Bearer {token}"},
            timeout=10,
        )


# --- the failure table -------------------------------------------------------------------------


async def test_witness_lost_changes_nothing_but_disables_automatic_failover(trio: Trio) -> None:
    async with writing(trio, "witness") as w:
        trio.kill_node(3)
        lost = time.time()

        async def off() -> HAStatus | None:
            st = await reading(trio, 1)
            return st if st is not None and not st.automatic_failover else None

        st = await wait_for(off, "automatic failover off")
        assert "witness" in st.failover_note and st.leader == "aoc1"
        assert st.rpo.kind is RPOKind.IN_SYNC
        await wait_for(lambda: acks_after(w, lost), "writes going on without the witness")
        trio.start_node(3)
        await whole_again(trio, "aoc1")
    assert await w.verify() == []


async def test_passive_lost_the_active_serves_and_the_passive_catches_up(trio: Trio) -> None:
    async with writing(trio, "passive") as w:
        trio.kill_node(2)
        lost = time.time()

        async def unprotected() -> HAStatus | None:
            st = await reading(trio)
            return st if st is not None and st.rpo.kind is not RPOKind.IN_SYNC else None

        st = await wait_for(unprotected, "the RPO state to leave 'in sync'", timeout=FAILOVER)
        assert st.leader == "aoc1"
        await wait_for(lambda: acks_after(w, lost), "writes going on without the passive")
        trio.start_node(2)
        st = await whole_again(trio, "aoc1")
        assert member(st, "aoc2") is Replication.IN_SYNC
    assert await w.verify() == []


async def test_active_killed_the_passive_is_promoted_and_nothing_is_lost(trio: Trio) -> None:
    before = (await status(trio)).epoch or 0
    with Sampler(trio) as sampler:
        async with writing(trio, "kill") as w:
            pids = trio.kill_node(1)
            assert pids
            killed = time.time()
            await wait_for(
                lambda: acks_after(w, killed), "writes after the failover", timeout=FAILOVER
            )
            rto = w.rto(killed)
        st = await wait_for(
            lambda: _leader(trio, "aoc2", before), "aoc2 active, a new epoch", timeout=FAILOVER
        )
    sampler.assert_never_two()
    assert rto is not None
    assert await w.verify() == []
    # the old active returns as the passive (rewound), and there is no failback
    trio.start_node(1)
    st = await whole_again(trio, "aoc2")
    assert member(st, "aoc1") is Replication.IN_SYNC


async def _leader(trio: Trio, name: str, epoch_above: int = 0) -> HAStatus | None:
    st = await reading(trio)
    if st is None or st.leader != name or st.ip_holders != [name]:
        return None
    return st if (st.epoch or 0) > epoch_above else None


async def test_active_isolated_steps_down_before_the_passive_is_promoted(trio: Trio) -> None:
    # aoc2 is the active now; cut its HA link: it loses etcd's quorum
    roles = RoleWatch(f"http://{trio.plan.address('mgmt', 2)}:8800/healthz")
    with Sampler(trio) as sampler, roles:
        async with writing(trio, "isolated") as w:
            await trio.cut(2, ("ha",))
            cut = time.time()
            await wait_for(
                lambda: acks_after(w, cut), "writes after the failover", timeout=FAILOVER
            )
        st = await wait_for(lambda: _leader(trio, "aoc1"), "aoc1 active", timeout=FAILOVER)
    # the isolated center stopped being the active, and its node dropped the IP, before aoc1
    # held it
    took = min(t for t, h in sampler.samples if h == [1])
    dropped = max(t for t, h in sampler.samples if t < took and h == [2])
    stepped_down = min(t for t, role in roles.seen if role == "passive" and t > cut)
    assert stepped_down < took and dropped < took
    # the isolated node (still reachable on its management address) refuses writes
    isolated = f"http://{trio.plan.address('mgmt', 2)}:8800"
    assert (await write_on(trio, isolated, "on-the-isolated")).status_code == 503
    sampler.assert_never_two()
    assert st.leader == "aoc1"
    await trio.restore(2)
    await whole_again(trio, "aoc1")
    assert await w.verify() == []


async def test_a_switchover_and_back_never_puts_the_ip_on_two_nodes(trio: Trio) -> None:
    """Patroni releases the leader key on purpose and the other node takes it at once: the
    hand-over the lease alone does not cover."""
    password = trio.secrets().restapi
    with Sampler(trio) as sampler:
        async with writing(trio, "switchover") as w:
            for old, new in (("aoc1", "aoc2"), ("aoc2", "aoc1")):
                k_old = int(old[-1])
                async with httpx.AsyncClient(trust_env=False) as http:
                    r = await http.post(
                        f"http://{trio.plan.address('ha', k_old)}:8008/switchover",
                        json={"leader": old, "candidate": new},
                        auth=("patroni", password),
                        timeout=60,
                    )
                assert r.status_code == 200, r.text
                moved = time.time()
                await wait_for(functools.partial(_leader, trio, new), f"{new} active", FAILOVER)
                await wait_for(functools.partial(acks_after, w, moved), "writes after", FAILOVER)
                await whole_again(trio, new)  # the old one in sync: it may be the candidate
    sampler.assert_never_two()
    await whole_again(trio, "aoc1")
    assert await w.verify() == []


async def test_active_and_witness_lost_no_promotion_until_forced(trio: Trio) -> None:
    from aecp.cli.centerha import promote
    from aecp.common.errors import InvalidInput, InvalidState

    await whole_again(trio, "aoc1")
    with pytest.raises(InvalidInput):
        promote("aoc2", force=False, lab_dir=trio.root)
    with pytest.raises(InvalidState):  # the active answers
        await asyncio.to_thread(promote, "aoc2", True, trio.root)
    async with writing(trio, "forced") as w:
        trio.kill_node(1)
        with pytest.raises(InvalidState):  # the witness answers: failover comes by itself
            await asyncio.to_thread(promote, "aoc2", True, trio.root)
        trio.kill_node(3)
        lost = time.time()
        # the passive decides, loop after loop, past the time the lease ran out (ttl 20 s), to
        # stay a secondary: no promotion without a quorum
        decisions = await wait_for(
            lambda: _decisions_since(trio, 2, lost, 30.0),
            "a decision of aoc2 30 s after the loss",
            timeout=150,
        )
        assert not any("promoted" in line for line in decisions)
        assert not await acks_after(w, lost, 1)
        st = await reading(trio, 2)
        assert st is None or st.leader != "aoc2"
        await asyncio.to_thread(promote, "aoc2", True, trio.root)
        await wait_for(lambda: acks_after(w, lost), "writes after the forced promotion", 120)
    assert await trio.holders() == [2]
    assert await w.verify() == []


async def _decisions_since(trio: Trio, k: int, since: float, late: float) -> list[str] | None:
    """Node k's Patroni decisions (its log's HA-loop lines) after ``since``, once one of them
    was made ``late`` seconds after it."""
    log = trio.base(k) / "log" / "patroni" / "patroni.log"
    lines: list[str] = []
    last = 0.0
    for line in log.read_text(errors="replace").splitlines():
        try:
            at = time.mktime(time.strptime(line[:19], "%Y-%m-%d %H:%M:%S"))  # local time
        except ValueError:
            continue
        if at > since and ("I am (" in line or "promoted" in line):
            lines.append(line)
            last = at
    return lines if lines and last >= since + late else None
