"""What only the in-memory store has: leases in virtual time and named failure injection. The
shared contract is tested against both stores in tests/integration/test_store_contract.py."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable

import pytest

from aecp.common.clock import FakeClock
from aecp.common.errors import LeaseExpired, StoreUnavailable
from aecp.store.base import ChangeKind, Compare, Lease, Put, WatchEvent
from aecp.store.memory import MemoryStore, UnreachableMemoryStore


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
async def store(clock: FakeClock) -> AsyncIterator[MemoryStore]:
    memory = MemoryStore(clock)
    yield memory
    await memory.close()


async def next_event(events: AsyncIterator[WatchEvent]) -> WatchEvent:
    async with asyncio.timeout(1):
        return await anext(events)


async def test_a_lease_lives_exactly_its_ttl_in_virtual_time(store: MemoryStore, clock: FakeClock):
    lease = await store.grant_lease(10)
    await store.put("/k", b"v", lease=lease)

    await clock.advance(9.9)
    assert await store.get("/k") is not None

    await clock.advance(0.1)
    assert await store.get("/k") is None


async def test_refreshing_a_lease_restarts_its_ttl(store: MemoryStore, clock: FakeClock):
    lease = await store.grant_lease(10)
    await store.put("/k", b"v", lease=lease)

    await clock.advance(8)
    assert await store.refresh_lease(lease) == 10
    await clock.advance(8)

    assert await store.get("/k") is not None


async def test_expire_leases_names_the_expired_leases_and_deletes_their_keys(
    store: MemoryStore, clock: FakeClock
):
    short = await store.grant_lease(5)
    long = await store.grant_lease(50)
    await store.put("/short/a", b"v", lease=short)
    await store.put("/short/b", b"v", lease=short)
    await store.put("/long", b"v", lease=long)
    before = await store.revision()

    async with store.watch("/") as events:
        await clock.advance(6)
        assert store.expire_leases() == [short.id]
        seen = [await next_event(events), await next_event(events)]

    assert [(e.kind, e.key) for e in seen] == [
        (ChangeKind.DELETE, "/short/a"),
        (ChangeKind.DELETE, "/short/b"),
    ]
    assert {e.mod_revision for e in seen} == {before + 1}
    assert [kv.key for kv in await store.list("/")] == ["/long"]


async def test_refreshing_an_expired_lease_raises_lease_expired(
    store: MemoryStore, clock: FakeClock
):
    lease = await store.grant_lease(3)

    await clock.advance(3)

    with pytest.raises(LeaseExpired):
        await store.refresh_lease(lease)


async def test_a_key_moved_to_another_lease_survives_the_first_lease(
    store: MemoryStore, clock: FakeClock
):
    first = await store.grant_lease(5)
    second = await store.grant_lease(50)
    await store.put("/k", b"v1", lease=first)
    await store.put("/k", b"v2", lease=second)

    await clock.advance(6)

    kv = await store.get("/k")
    assert kv is not None and kv.lease == second.id


async def test_an_unreachable_store_raises_store_unavailable_on_every_call():
    store = UnreachableMemoryStore(FakeClock())
    lease = Lease(1, 10)
    calls: list[Callable[[], Awaitable[object]]] = [
        lambda: store.get("/k"),
        lambda: store.list("/"),
        lambda: store.put("/k", b"v"),
        lambda: store.create("/k", b"v"),
        lambda: store.replace("/k", b"v", mod_revision=1),
        lambda: store.delete("/k"),
        lambda: store.delete_prefix("/"),
        lambda: store.txn([Compare.absent("/k")], [Put("/k", b"v")]),
        lambda: store.grant_lease(5),
        lambda: store.refresh_lease(lease),
        lambda: store.revoke_lease(lease),
        lambda: store.revision(),
    ]

    for call in calls:
        with pytest.raises(StoreUnavailable):
            await call()
    with pytest.raises(StoreUnavailable):
        async with store.watch("/"):
            pass


async def test_an_unreachable_store_serves_again_once_reachable():
    store = UnreachableMemoryStore(FakeClock())

    store.set_reachable(True)

    assert await store.create("/k", b"v") is True


async def test_cutting_the_store_off_breaks_open_watches_for_good(store: MemoryStore):
    async with store.watch("/") as events:
        store.set_reachable(False)

        with pytest.raises(StoreUnavailable):
            await next_event(events)
        store.set_reachable(True)
        await store.put("/k", b"v")
        with pytest.raises(StoreUnavailable):
            await next_event(events)


async def test_leases_keep_expiring_while_the_store_is_unreachable(
    store: MemoryStore, clock: FakeClock
):
    lease = await store.grant_lease(5)
    await store.put("/k", b"v", lease=lease)
    store.set_reachable(False)

    await clock.advance(6)
    store.set_reachable(True)

    assert await store.get("/k") is None
    with pytest.raises(LeaseExpired):
        await store.refresh_lease(lease)


async def test_closing_the_store_breaks_its_watches(store: MemoryStore):
    async with store.watch("/") as events:
        await store.close()

        with pytest.raises(StoreUnavailable):
            await next_event(events)


async def test_a_watch_ignores_changes_before_its_start_revision(store: MemoryStore):
    await store.put("/a", b"1")
    start = await store.put("/b", b"2")

    async with store.watch("/", start_revision=start) as events:
        assert await next_event(events) == WatchEvent(ChangeKind.PUT, "/b", b"2", start)


async def test_a_txn_with_nothing_to_change_keeps_the_revision(store: MemoryStore):
    before = await store.revision()

    assert await store.delete("/absent") is False
    assert await store.txn([Compare.absent("/absent")], []) is True
    assert await store.delete_prefix("/none/") == 0

    assert await store.revision() == before


async def test_a_lease_ttl_below_one_second_is_refused(store: MemoryStore):
    with pytest.raises(ValueError):
        await store.grant_lease(0)
