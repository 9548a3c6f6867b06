"""The node lease: refreshed while the store answers; lost — and the node fenced — before the
store could expire it, when it does not."""

from __future__ import annotations

from aecp.common.clock import FakeClock
from aecp.store.base import Lease
from aecp.store.lease import LeaseKeeper
from aecp.store.memory import MemoryStore


class Recorder:
    def __init__(self) -> None:
        self.acquired: list[Lease] = []
        self.lost: list[str] = []

    async def on_acquired(self, lease: Lease) -> None:
        self.acquired.append(lease)

    async def on_lost(self, reason: str) -> None:
        self.lost.append(reason)


def keeper(store: MemoryStore, clock: FakeClock, rec: Recorder) -> LeaseKeeper:
    return LeaseKeeper(
        store,
        ttl=6,
        margin=1.0,
        on_acquired=rec.on_acquired,
        on_lost=rec.on_lost,
        clock=clock,
        node="n1",
    )


async def test_the_first_step_acquires_a_lease(store: MemoryStore, clock: FakeClock) -> None:
    rec = Recorder()
    k = keeper(store, clock, rec)
    assert (await k.step()).startswith("acquired lease")
    assert k.held() and len(rec.acquired) == 1


async def test_refreshes_keep_the_lease_held(store: MemoryStore, clock: FakeClock) -> None:
    rec = Recorder()
    k = keeper(store, clock, rec)
    await k.step()
    for _ in range(10):
        await clock.advance(k.next_delay())
        assert await k.step() == "refreshed"
    assert k.held() and rec.lost == []


async def test_an_unreachable_store_fences_before_the_lease_can_expire(
    store: MemoryStore, clock: FakeClock
) -> None:
    rec = Recorder()
    k = keeper(store, clock, rec)
    await k.step()
    granted_at = clock.monotonic()
    store.set_reachable(False)
    outcomes = []
    while not rec.lost:
        await clock.advance(k.next_delay())
        outcomes.append(await k.step())
    assert outcomes[0].startswith("refresh failed")
    assert outcomes[-1].startswith("lost the lease")
    # fenced no later than ttl - margin after the last successful contact: before expiry
    assert clock.monotonic() - granted_at <= k.ttl - k.margin + 1e-9
    assert not k.held() and len(rec.lost) == 1


async def test_a_lease_the_store_expired_is_fenced_and_a_new_one_taken(
    store: MemoryStore, clock: FakeClock
) -> None:
    rec = Recorder()
    k = keeper(store, clock, rec)
    await k.step()
    await store.revoke_lease(rec.acquired[0])
    assert "store says the lease expired" in await k.step()
    assert rec.lost
    assert (await k.step()).startswith("acquired lease")
    assert len(rec.acquired) == 2 and k.held()


async def test_no_lease_while_the_store_is_down_and_one_as_soon_as_it_is_back(
    store: MemoryStore, clock: FakeClock
) -> None:
    rec = Recorder()
    k = keeper(store, clock, rec)
    store.set_reachable(False)
    assert (await k.step()).startswith("no lease: store unreachable")
    store.set_reachable(True)
    assert (await k.step()).startswith("acquired")
