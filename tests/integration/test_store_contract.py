"""One contract, two stores: every test in the first part runs against ``MemoryStore`` (virtual
time) and against ``EtcdStore`` on a real 3-member etcd cluster on 127.0.50.1-3. The second part
injects faults that only a real cluster has: dead and frozen members."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass

import pytest

from aecp.common.clock import FakeClock
from aecp.common.errors import Compacted, LeaseExpired, StoreUnavailable
from aecp.lab.etcd import EtcdCluster
from aecp.store.base import ChangeKind, Compare, Delete, Put, Store, WatchEvent
from aecp.store.etcd import EtcdStore, grpc_target
from aecp.store.memory import MemoryStore

pytestmark = pytest.mark.integration

CALL_TIMEOUT = 2.0


@dataclass
class Backend:
    """A store under test and the way time passes for it (virtual for memory, real for etcd)."""

    store: Store
    clock: FakeClock | None = None

    async def pass_time(self, seconds: float) -> None:
        if self.clock is None:
            await asyncio.sleep(seconds)
            return
        await self.clock.advance(seconds)
        assert isinstance(self.store, MemoryStore)
        self.store.expire_leases()


@pytest.fixture(params=["memory", "etcd"])
async def backend(request: pytest.FixtureRequest) -> AsyncIterator[Backend]:
    if request.param == "memory":
        clock = FakeClock()
        memory = MemoryStore(clock)
        yield Backend(memory, clock)
        await memory.close()
        return
    cluster: EtcdCluster = request.getfixturevalue("etcd3_cluster")
    await cluster.start()
    etcd = cluster.client(timeout=CALL_TIMEOUT)
    try:
        yield Backend(etcd)
    finally:
        await etcd.close()


@pytest.fixture
def store(backend: Backend) -> Store:
    return backend.store


@pytest.fixture
def prefix() -> str:
    """A key prefix of this test alone (the etcd cluster is shared by the whole module)."""
    return f"/test/{uuid.uuid4().hex[:10]}/"


async def next_events(events: AsyncIterator[WatchEvent], count: int) -> list[WatchEvent]:
    async with asyncio.timeout(5):
        return [await anext(events) for _ in range(count)]


async def eventually(check: Callable[[], Awaitable[bool]], within: float) -> bool:
    """True as soon as ``check()`` holds; polls (real time) until ``within`` seconds passed."""
    deadline = time.monotonic() + within
    while not await check():
        if time.monotonic() > deadline:
            return False
        await asyncio.sleep(0.1)
    return True


# -- keys and values --------------------------------------------------------------------------


async def test_a_put_is_read_back_with_its_create_and_mod_revisions(store: Store, prefix: str):
    first = await store.put(prefix + "k", b"one")
    second = await store.put(prefix + "k", b"two")

    kv = await store.get(prefix + "k")

    assert second > first
    assert kv is not None
    assert (kv.value, kv.create_revision, kv.mod_revision, kv.lease) == (b"two", first, second, 0)
    assert await store.get(prefix + "absent") is None


async def test_every_write_raises_the_store_revision(store: Store, prefix: str):
    before = await store.revision()
    written = await store.put(prefix + "k", b"v")

    assert written > before
    assert await store.revision() == written


async def test_list_returns_the_keys_under_the_prefix_sorted_by_key(store: Store, prefix: str):
    for name in ("b", "a/2", "c", "a/1"):
        await store.put(prefix + name, name.encode())
    await store.put(prefix.rstrip("/") + "-outside", b"x")

    listed = await store.list(prefix)

    assert [kv.key for kv in listed] == [prefix + n for n in ("a/1", "a/2", "b", "c")]
    assert [kv.value for kv in listed] == [b"a/1", b"a/2", b"b", b"c"]
    assert await store.list(prefix + "none/") == []


async def test_create_writes_only_when_the_key_is_absent(store: Store, prefix: str):
    assert await store.create(prefix + "k", b"first") is True
    kv = await store.get(prefix + "k")

    assert await store.create(prefix + "k", b"second") is False
    assert await store.get(prefix + "k") == kv


async def test_replace_wins_with_the_current_mod_revision(store: Store, prefix: str):
    rev = await store.put(prefix + "k", b"v1")

    assert await store.replace(prefix + "k", b"v2", mod_revision=rev) is True
    kv = await store.get(prefix + "k")
    assert kv is not None and kv.value == b"v2"


async def test_replace_loses_with_a_stale_mod_revision_and_changes_nothing(
    store: Store, prefix: str
):
    stale = await store.put(prefix + "k", b"v1")
    await store.put(prefix + "k", b"v2")
    kv = await store.get(prefix + "k")

    assert await store.replace(prefix + "k", b"v3", mod_revision=stale) is False
    assert await store.get(prefix + "k") == kv
    assert await store.replace(prefix + "absent", b"v", mod_revision=stale) is False
    assert await store.get(prefix + "absent") is None


async def test_delete_removes_a_key_and_reports_an_absent_one_as_false(store: Store, prefix: str):
    await store.put(prefix + "k", b"v")

    assert await store.delete(prefix + "k") is True
    assert await store.get(prefix + "k") is None
    assert await store.delete(prefix + "k") is False


async def test_delete_at_a_revision_wins_only_if_the_key_is_unchanged(store: Store, prefix: str):
    stale = await store.put(prefix + "k", b"v1")
    current = await store.put(prefix + "k", b"v2")

    assert await store.delete(prefix + "k", mod_revision=stale) is False
    assert await store.get(prefix + "k") is not None
    assert await store.delete(prefix + "k", mod_revision=current) is True
    assert await store.get(prefix + "k") is None
    assert await store.delete(prefix + "k", mod_revision=current) is False


async def test_a_deleted_key_comes_back_with_a_new_create_revision(store: Store, prefix: str):
    await store.put(prefix + "k", b"v1")
    await store.delete(prefix + "k")
    again = await store.put(prefix + "k", b"v2")

    kv = await store.get(prefix + "k")

    assert kv is not None and kv.create_revision == again


async def test_delete_prefix_deletes_only_keys_under_the_prefix_and_counts_them(
    store: Store, prefix: str
):
    for name in ("a/1", "a/2", "a/3", "b"):
        await store.put(prefix + name, b"v")

    assert await store.delete_prefix(prefix + "a/") == 3
    assert [kv.key for kv in await store.list(prefix)] == [prefix + "b"]
    assert await store.delete_prefix(prefix + "a/") == 0


# -- transactions -----------------------------------------------------------------------------


async def test_a_txn_applies_success_when_every_compare_holds(store: Store, prefix: str):
    rev = await store.put(prefix + "a", b"1")
    await store.put(prefix + "gone", b"x")

    held = await store.txn(
        [Compare.unchanged(prefix + "a", rev), Compare.absent(prefix + "b")],
        [Put(prefix + "b", b"2"), Delete(prefix + "gone")],
        [Put(prefix + "failed", b"!")],
    )

    assert held is True
    keys = {kv.key: kv for kv in await store.list(prefix)}
    assert set(keys) == {prefix + "a", prefix + "b"}
    assert keys[prefix + "b"].value == b"2"


async def test_a_txn_applies_failure_when_one_compare_fails(store: Store, prefix: str):
    await store.put(prefix + "a", b"1")

    held = await store.txn(
        [Compare.absent(prefix + "b"), Compare.absent(prefix + "a")],
        [Put(prefix + "b", b"2")],
        [Put(prefix + "failed", b"!"), Delete(prefix + "a")],
    )

    assert held is False
    assert [kv.key for kv in await store.list(prefix)] == [prefix + "failed"]


async def test_the_writes_of_one_txn_share_one_revision(store: Store, prefix: str):
    await store.txn([], [Put(prefix + "a", b"1"), Put(prefix + "b", b"2")])

    a, b = await store.list(prefix)

    assert a.mod_revision == b.mod_revision == await store.revision()


async def test_a_txn_may_delete_a_whole_prefix(store: Store, prefix: str):
    for name in ("d/1", "d/2", "keep"):
        await store.put(prefix + name, b"v")

    assert await store.txn([], [Delete(prefix + "d/", prefix=True)]) is True
    assert [kv.key for kv in await store.list(prefix)] == [prefix + "keep"]


async def test_a_txn_that_writes_one_key_twice_is_refused(store: Store, prefix: str):
    with pytest.raises(ValueError):
        await store.txn([], [Put(prefix + "k", b"1"), Put(prefix + "k", b"2")])
    assert await store.get(prefix + "k") is None


async def test_a_txn_of_more_than_128_operations_is_refused_and_changes_nothing(
    store: Store, prefix: str
):
    """etcd's default --max-txn-ops, which the memory store mirrors: 128 compares or writes
    in a branch pass, 129 do not."""
    puts = [Put(f"{prefix}{i:03d}", b"v") for i in range(129)]
    with pytest.raises(ValueError, match="too many operations"):
        await store.txn([], puts)
    with pytest.raises(ValueError, match="too many operations"):
        await store.txn([Compare.absent(p.key) for p in puts], puts[:1])
    assert await store.list(prefix) == []
    assert await store.txn([Compare.absent(p.key) for p in puts[:128]], puts[:128])
    assert len(await store.list(prefix)) == 128


async def test_every_compare_target_and_operator_follows_etcd_rules(store: Store, prefix: str):
    k, absent = prefix + "k", prefix + "absent"
    created = await store.put(k, b"v1")
    modified = await store.put(k, b"v2")
    cases = [
        (Compare(k, "value", "==", b"v2"), True),
        (Compare(k, "value", "!=", b"v2"), False),
        (Compare(k, "value", "<", b"v3"), True),
        (Compare(k, "value", ">", b"v3"), False),
        (Compare(k, "version", "==", 2), True),
        (Compare(k, "version", ">", 2), False),
        (Compare(k, "version", "<", 3), True),
        (Compare(k, "create", "==", created), True),
        (Compare(k, "create", "<", modified), True),
        (Compare(k, "create", ">", created), False),
        (Compare(k, "mod", "==", modified), True),
        (Compare(k, "mod", "!=", modified), False),
        (Compare(k, "mod", ">", created), True),
        (Compare(k, "mod", "<", modified), False),
        (Compare(absent, "value", "==", b""), False),
        (Compare(absent, "value", "!=", b"x"), False),
        (Compare(absent, "create", "==", 0), True),
        (Compare(absent, "mod", "==", 0), True),
        (Compare(absent, "version", ">", 0), False),
    ]

    results = [(cmp, await store.txn([cmp], [])) for cmp, _ in cases]

    assert results == [(cmp, expected) for cmp, expected in cases]


# -- leases -----------------------------------------------------------------------------------


async def test_a_lease_can_be_granted_refreshed_and_revoked(store: Store, prefix: str):
    lease = await store.grant_lease(5)
    await store.put(prefix + "held", b"v", lease=lease)
    kv = await store.get(prefix + "held")

    assert lease.ttl >= 5
    assert kv is not None and kv.lease == lease.id
    assert await store.refresh_lease(lease) == lease.ttl

    await store.revoke_lease(lease)
    assert await store.get(prefix + "held") is None
    await store.revoke_lease(lease)  # already gone: no error


async def test_keys_vanish_when_their_lease_expires(backend: Backend, prefix: str):
    store = backend.store
    lease = await store.grant_lease(1)
    await store.put(prefix + "held", b"v", lease=lease)
    await store.put(prefix + "kept", b"v")

    await backend.pass_time(lease.ttl + 0.5)

    async def held_is_gone() -> bool:
        return await store.get(prefix + "held") is None

    assert await eventually(held_is_gone, within=3)
    assert await store.get(prefix + "kept") is not None


async def test_refreshing_an_expired_lease_raises_lease_expired(backend: Backend):
    lease = await backend.store.grant_lease(1)

    await backend.pass_time(lease.ttl + 0.5)

    async def refresh_fails() -> bool:
        try:
            await backend.store.refresh_lease(lease)
        except LeaseExpired:
            return True
        return False

    assert await eventually(refresh_fails, within=3)


async def test_a_write_naming_a_revoked_lease_raises_lease_expired(store: Store, prefix: str):
    lease = await store.grant_lease(5)
    await store.revoke_lease(lease)

    with pytest.raises(LeaseExpired):
        await store.put(prefix + "k", b"v", lease=lease)
    with pytest.raises(LeaseExpired):
        await store.create(prefix + "k", b"v", lease=lease)
    with pytest.raises(LeaseExpired):
        await store.txn([], [Put(prefix + "k", b"v", lease)])
    with pytest.raises(LeaseExpired):
        await store.refresh_lease(lease)
    assert await store.get(prefix + "k") is None


# -- watches ----------------------------------------------------------------------------------


async def test_a_watch_sees_puts_and_deletes_under_its_prefix_in_order(store: Store, prefix: str):
    async with store.watch(prefix + "w/") as events:
        r1 = await store.put(prefix + "w/a", b"1")
        await store.put(prefix + "other", b"not watched")
        r2 = await store.put(prefix + "w/b", b"2")
        await store.delete(prefix + "w/a")
        r3 = await store.revision()

        seen = await next_events(events, 3)

    assert seen == [
        WatchEvent(ChangeKind.PUT, prefix + "w/a", b"1", r1),
        WatchEvent(ChangeKind.PUT, prefix + "w/b", b"2", r2),
        WatchEvent(ChangeKind.DELETE, prefix + "w/a", None, r3),
    ]


async def test_a_watch_from_a_start_revision_replays_the_changes_since(store: Store, prefix: str):
    await store.put(prefix + "before", b"0")
    start = await store.put(prefix + "a", b"1")
    await store.delete(prefix + "before")
    deleted_at = await store.revision()

    async with store.watch(prefix, start_revision=start) as events:
        live = await store.put(prefix + "b", b"2")
        seen = await next_events(events, 3)

    assert seen == [
        WatchEvent(ChangeKind.PUT, prefix + "a", b"1", start),
        WatchEvent(ChangeKind.DELETE, prefix + "before", None, deleted_at),
        WatchEvent(ChangeKind.PUT, prefix + "b", b"2", live),
    ]


async def test_a_watch_from_a_compacted_revision_raises_compacted_and_one_after_works(
    store: Store, prefix: str
):
    old = await store.put(prefix + "a", b"1")
    await store.put(prefix + "a", b"2")
    kept = await store.put(prefix + "a", b"3")
    await store.compact(kept)

    with pytest.raises(Compacted):
        async with store.watch(prefix, start_revision=old):
            pass  # refused on entering: a feed can answer 410 before it streams
    with pytest.raises(Compacted):
        await store.compact(kept)  # compacted already
    with pytest.raises(ValueError):
        await store.compact(await store.revision() + 100)

    async with store.watch(prefix, start_revision=kept) as events:
        assert await next_events(events, 1) == [
            WatchEvent(ChangeKind.PUT, prefix + "a", b"3", kept)
        ]


async def test_a_watch_sees_lease_expiry_as_delete_events(backend: Backend, prefix: str):
    store = backend.store
    lease = await store.grant_lease(1)
    await store.put(prefix + "held", b"v", lease=lease)

    async with store.watch(prefix) as events:
        await backend.pass_time(lease.ttl + 0.5)
        seen = await next_events(events, 1)

    assert [(e.kind, e.key) for e in seen] == [(ChangeKind.DELETE, prefix + "held")]


async def test_a_watch_survives_a_timed_out_wait_for_its_next_event(store: Store, prefix: str):
    async with store.watch(prefix) as events:
        with pytest.raises(TimeoutError):
            async with asyncio.timeout(0.2):
                await anext(events)
        rev = await store.put(prefix + "k", b"v")

        assert await next_events(events, 1) == [WatchEvent(ChangeKind.PUT, prefix + "k", b"v", rev)]


async def test_watches_can_be_opened_and_left_one_after_another(store: Store, prefix: str):
    for i in range(3):
        async with store.watch(prefix) as events:
            rev = await store.put(prefix + "k", str(i).encode())
            assert await next_events(events, 1) == [
                WatchEvent(ChangeKind.PUT, prefix + "k", str(i).encode(), rev)
            ]


async def test_a_closed_store_raises_store_unavailable(store: Store, prefix: str):
    await store.close()

    with pytest.raises(StoreUnavailable):
        await store.get(prefix + "k")
    with pytest.raises(StoreUnavailable):
        await store.put(prefix + "k", b"v")


# -- faults only a real cluster has -----------------------------------------------------------


@pytest.fixture
async def etcd(etcd3_cluster: EtcdCluster) -> AsyncIterator[tuple[EtcdCluster, EtcdStore]]:
    """The shared cluster with every member up, and a store talking to all of them. Members a
    test kills are restarted by the next test's ``cluster.start()``; frozen ones are resumed."""
    await etcd3_cluster.start()
    etcd_store = etcd3_cluster.client(timeout=CALL_TIMEOUT)
    try:
        yield etcd3_cluster, etcd_store
    finally:
        for member in etcd3_cluster.members:
            member.resume()
        await etcd_store.close()


def test_the_grpc_target_names_every_endpoint_so_a_dead_member_is_skipped():
    assert grpc_target(["127.0.50.1:2379", "127.0.50.2:2379", "127.0.50.3:2380"]) == (
        "ipv4:127.0.50.1:2379,127.0.50.2:2379,127.0.50.3",
        2380,
    )
    assert grpc_target(["localhost:2379"]) == ("localhost", 2379)
    with pytest.raises(ValueError):
        grpc_target(["etcd-a:2379", "etcd-b:2379"])


async def put_eventually(store: Store, key: str, value: bytes) -> int:
    """Write, retrying on ``StoreUnavailable`` for a while: when the member that died led the
    cluster, writes fail until the others elect a new leader (1-2 s with the lab's tuning)."""
    deadline = time.monotonic() + 10
    while True:
        try:
            return await store.put(key, value)
        except StoreUnavailable:
            if time.monotonic() > deadline:
                raise
        await asyncio.sleep(0.1)


async def test_killing_the_member_the_client_talks_to_keeps_writes_working(
    etcd: tuple[EtcdCluster, EtcdStore], prefix: str
):
    cluster, store = etcd
    await store.put(prefix + "before", b"v")  # pick_first: the client is on the first endpoint
    cluster.members[0].kill()

    await put_eventually(store, prefix + "after", b"v")
    for i in range(20):
        await store.put(prefix + f"more/{i}", b"v")
    assert len(await store.list(prefix + "more/")) == 20


async def test_a_restarted_member_rejoins_with_its_data_and_the_writes_it_missed(
    etcd: tuple[EtcdCluster, EtcdStore], prefix: str
):
    cluster, store = etcd
    victim = cluster.members[2]
    await store.put(prefix + "old", b"1")
    victim.kill()
    await put_eventually(store, prefix + "missed", b"2")

    await cluster.start()
    alone = cluster.client([victim.client_address], timeout=CALL_TIMEOUT)
    try:
        assert [kv.key for kv in await alone.list(prefix)] == [prefix + "missed", prefix + "old"]
    finally:
        await alone.close()
    assert victim.initial_cluster_state() == "existing"


async def test_with_every_member_killed_a_call_raises_store_unavailable_at_once(
    etcd: tuple[EtcdCluster, EtcdStore], prefix: str
):
    cluster, store = etcd
    await store.put(prefix + "k", b"v")
    cluster.kill()

    started = time.monotonic()
    with pytest.raises(StoreUnavailable):
        await store.get(prefix + "k")

    assert time.monotonic() - started < CALL_TIMEOUT + 1


async def test_with_every_member_frozen_a_call_raises_store_unavailable_at_the_deadline(
    etcd: tuple[EtcdCluster, EtcdStore], prefix: str
):
    cluster, store = etcd
    await store.put(prefix + "k", b"v")
    for member in cluster.members:
        member.pause()

    started = time.monotonic()
    with pytest.raises(StoreUnavailable):
        await store.put(prefix + "k", b"w")
    with pytest.raises(StoreUnavailable):
        async with store.watch(prefix):
            pass

    assert time.monotonic() - started < 2 * (CALL_TIMEOUT + 1)


async def test_a_watch_breaks_with_store_unavailable_when_its_member_dies_and_can_resume(
    etcd: tuple[EtcdCluster, EtcdStore], prefix: str
):
    cluster, store = etcd
    async with store.watch(prefix) as events:
        last = await store.put(prefix + "k", b"v")
        await next_events(events, 1)
        cluster.members[0].kill()

        with pytest.raises(StoreUnavailable):
            await next_events(events, 1)

    async with store.watch(prefix, start_revision=last + 1) as events:
        missed = await put_eventually(store, prefix + "k", b"w")
        assert await next_events(events, 1) == [
            WatchEvent(ChangeKind.PUT, prefix + "k", b"w", missed)
        ]


async def test_a_watch_breaks_with_store_unavailable_when_its_member_freezes(
    etcd: tuple[EtcdCluster, EtcdStore], prefix: str
):
    cluster, store = etcd
    async with store.watch(prefix) as events:
        cluster.members[0].pause()  # pick_first: the watch stream is on the first endpoint

        started = time.monotonic()
        with pytest.raises(StoreUnavailable):
            async with asyncio.timeout(30):
                await anext(events)

    assert time.monotonic() - started < 20  # gRPC keepalive: 10 s idle + 5 s ping timeout
