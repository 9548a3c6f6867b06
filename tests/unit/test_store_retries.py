"""The etcd adapter retries what etcd's routine hiccups fail (issue 11 §4: ``aecp volume export``
right after the leader's node died answered ``etcdserver: leader changed``), and never turns a
write whose answer was lost into a wrong result. A fake aetcd client stands in for the
network; compares and operations are built with aetcd's own classes."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import aetcd.client
import aetcd.exceptions
import pytest

from aecp.common.errors import StoreUnavailable
from aecp.common.pki import ClusterCA
from aecp.store.base import Compare, Put
from aecp.store.etcd import EtcdStore

LEADER_CHANGED = aetcd.exceptions.ConnectionFailedError("etcdserver: leader changed")
NO_LEADER = aetcd.exceptions.ConnectionFailedError("etcdserver: no leader")
TIMED_OUT = aetcd.exceptions.ConnectionTimeoutError("Deadline Exceeded")


class FakeClient:
    """Answers from ``script``: each entry raises (an exception) or runs (a callable)."""

    def __init__(self, script: list[Any], data: dict[bytes, bytes]) -> None:
        self.transactions = aetcd.client.Transactions()
        self.script = script
        self.data = data
        self.calls = 0

    def _next(self) -> Any:
        self.calls += 1
        step = self.script.pop(0) if self.script else None
        if isinstance(step, Exception):
            raise step
        return step

    async def get(self, key: bytes) -> Any:
        step = self._next()
        if callable(step):
            step()
        value = self.data.get(key)
        return None if value is None else _KV(key, value)

    async def transaction(self, compare: Any, success: Any, failure: Any) -> Any:
        step = self._next()
        return step() if callable(step) else step


class _KV:
    def __init__(self, key: bytes, value: bytes) -> None:
        self.key, self.value = key, value
        self.create_revision = self.mod_revision = 2
        self.lease = 0


Make = Callable[[list[Any], dict[bytes, bytes]], tuple[EtcdStore, FakeClient]]


@pytest.fixture
def store(tmp_path: Path) -> Make:
    bundle = ClusterCA.create(tmp_path, "t").issue_client("admin")

    def make(script: list[Any], data: dict[bytes, bytes]) -> tuple[EtcdStore, FakeClient]:
        s = EtcdStore(["127.0.0.1:2379"], tls=bundle, timeout=2.0)
        fake = FakeClient(script, data)
        s._client, s._stamp, s._checked = fake, bundle.stamp(), float("inf")
        return s, fake

    return make


async def test_a_read_after_a_leader_change_is_retried_and_answers(store: Make) -> None:
    s, fake = store([LEADER_CHANGED, LEADER_CHANGED, None], {b"/k": b"v"})
    kv = await s.get("/k")
    assert kv is not None and kv.value == b"v"
    assert fake.calls == 3 and s.retries == 2


async def test_a_conditional_write_refused_for_want_of_a_leader_is_sent_again(store: Make) -> None:
    s, fake = store([NO_LEADER, (True, None)], {})
    assert await s.txn([Compare.absent("/k")], [Put("/k", b"v")]) is True
    assert fake.calls == 2


async def test_a_conditional_write_whose_answer_was_lost_counts_as_done_if_it_was_applied(
    store: Make,
) -> None:
    data: dict[bytes, bytes] = {}

    def applied_then_lost() -> None:
        data[b"/k"] = b"mine"
        raise TIMED_OUT

    s, _ = store([applied_then_lost, (False, None), None], data)
    assert await s.txn([Compare.absent("/k")], [Put("/k", b"mine")]) is True


async def test_a_conditional_write_that_lost_the_race_after_a_lost_answer_says_so(
    store: Make,
) -> None:
    s, _ = store([TIMED_OUT, (False, None), None], {b"/k": b"theirs"})
    assert await s.txn([Compare.absent("/k")], [Put("/k", b"mine")]) is False


async def test_a_call_that_keeps_failing_gives_up_with_store_unavailable(store: Make) -> None:
    s, fake = store([LEADER_CHANGED] * 1000, {})
    with pytest.raises(StoreUnavailable, match="leader changed"):
        await s.get("/k")
    assert 2 <= fake.calls < 1000


async def test_a_transaction_with_failure_operations_is_not_sent_twice_after_a_lost_answer(
    store: Make,
) -> None:
    s, fake = store([TIMED_OUT, (True, None)], {})
    with pytest.raises(StoreUnavailable):
        await s.txn([Compare.absent("/k")], [Put("/k", b"a")], [Put("/other", b"b")])
    assert fake.calls == 1


async def test_checking_a_lost_answer_ends_within_the_calls_deadline(store: Make) -> None:
    """The read-back after an ambiguous failure used a full deadline per key (review)."""

    def hang() -> None:
        raise TIMED_OUT

    script: list[Any] = [TIMED_OUT, (False, None)] + [hang] * 1000
    s, fake = store(script, {})
    with pytest.raises(StoreUnavailable):
        await s.txn([Compare.absent("/k")], [Put(f"/k{i}", b"v") for i in range(5)])
    assert fake.calls < 1000
