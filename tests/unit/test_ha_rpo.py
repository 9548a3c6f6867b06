"""The RPO tracker says whether a failover now would lose data, how long a lagging standby has
been behind (in virtual time), and reports each change of kind exactly once; Patroni's
``GET /cluster`` answer is read into the facts it needs."""

from __future__ import annotations

from typing import Any

from aecp.center.ha.model import RPOKind, RPOState
from aecp.center.ha.rpo import RPOTracker, StandbyFact, standbys_from_patroni
from aecp.common.clock import FakeClock

IN_SYNC = StandbyFact("n2", streaming=True, synchronous=True, lag_bytes=0)
CATCHING_UP = StandbyFact("n2", streaming=True, synchronous=False, lag_bytes=5_000_000)
NOT_STREAMING = StandbyFact("n2", streaming=False, synchronous=False, lag_bytes=None)


def test_each_kind_from_its_facts() -> None:
    t = RPOTracker(FakeClock())
    assert t.observe(False, [IN_SYNC]) == RPOState(kind=RPOKind.UNKNOWN)
    assert t.observe(True, []) == RPOState(kind=RPOKind.NO_STANDBY)
    assert t.observe(True, [IN_SYNC]) == RPOState(kind=RPOKind.IN_SYNC)
    assert t.observe(True, [CATCHING_UP]).kind is RPOKind.DEGRADED


def test_a_listed_standby_that_is_not_streaming_is_degraded_not_no_standby() -> None:
    assert RPOTracker(FakeClock()).observe(True, [NOT_STREAMING]).kind is RPOKind.DEGRADED


def test_a_synchronous_streaming_standby_is_in_sync_whatever_lag_patroni_sampled() -> None:
    lagging = StandbyFact("n2", streaming=True, synchronous=True, lag_bytes=16384)
    unknown = StandbyFact("n2", streaming=True, synchronous=True, lag_bytes=None)
    t = RPOTracker(FakeClock())
    assert t.observe(True, [lagging]).kind is RPOKind.IN_SYNC
    assert t.observe(True, [unknown]).kind is RPOKind.IN_SYNC


def test_a_synchronous_standby_that_stopped_streaming_is_degraded() -> None:
    stopped = StandbyFact("n2", streaming=False, synchronous=True, lag_bytes=None)
    assert RPOTracker(FakeClock()).observe(True, [stopped]).kind is RPOKind.DEGRADED


async def test_behind_grows_in_virtual_time_from_the_last_in_sync_reading() -> None:
    clock = FakeClock()
    t = RPOTracker(clock)
    t.observe(True, [IN_SYNC])
    await clock.advance(4.0)
    t.observe(True, [IN_SYNC])
    await clock.advance(3.0)
    assert t.observe(True, [CATCHING_UP]) == RPOState(kind=RPOKind.DEGRADED, behind_s=3.0)
    await clock.advance(9.0)
    state = t.observe(True, [NOT_STREAMING])
    assert state.behind_s == 12.0 and state.text == "degraded: passive 12 s behind"
    assert t.last_in_sync == clock.now - 12.0


async def test_behind_counts_through_a_spell_without_standby() -> None:
    clock = FakeClock()
    t = RPOTracker(clock)
    t.observe(True, [IN_SYNC])
    await clock.advance(5.0)
    t.observe(True, [])
    await clock.advance(5.0)
    assert t.observe(True, [CATCHING_UP]).behind_s == 10.0


async def test_never_in_sync_counts_behind_from_the_trackers_first_reading() -> None:
    clock = FakeClock()
    t = RPOTracker(clock)
    t.observe(False, [])
    await clock.advance(2.0)
    assert t.observe(True, [CATCHING_UP]).behind_s == 2.0
    await clock.advance(1.5)
    assert t.observe(True, [CATCHING_UP]).behind_s == 3.5


async def test_exactly_one_change_is_reported_per_change_of_kind() -> None:
    clock = FakeClock()
    t = RPOTracker(clock)
    readings: list[tuple[bool, list[StandbyFact]]] = [
        (True, [IN_SYNC]),
        (True, [IN_SYNC]),
        (True, [CATCHING_UP]),
        (True, [CATCHING_UP]),  # behind_s grows: the same kind, no change
        (True, [NOT_STREAMING]),  # still degraded
        (True, []),
        (False, []),
        (False, [IN_SYNC]),
        (True, [IN_SYNC]),
    ]
    changes = []
    for leader_known, standbys in readings:
        t.observe(leader_known, standbys)
        if t.change is not None:
            changes.append((t.change.before and t.change.before.kind, t.change.after.kind))
        await clock.advance(1.0)
    assert changes == [
        (None, RPOKind.IN_SYNC),
        (RPOKind.IN_SYNC, RPOKind.DEGRADED),
        (RPOKind.DEGRADED, RPOKind.NO_STANDBY),
        (RPOKind.NO_STANDBY, RPOKind.UNKNOWN),
        (RPOKind.UNKNOWN, RPOKind.IN_SYNC),
    ]


def test_a_change_reads_as_one_sentence() -> None:
    t = RPOTracker(FakeClock())
    t.observe(True, [IN_SYNC])
    assert t.change is not None and t.change.text == "RPO: not known yet -> in sync"
    t.observe(True, [CATCHING_UP])
    assert t.change is not None and t.change.text == "RPO: in sync -> degraded: passive 0 s behind"
    assert t.state == RPOState(kind=RPOKind.DEGRADED, behind_s=0.0)


# --- Patroni's GET /cluster (patroni.utils.cluster_as_json, Patroni 4.1) -------------------------


def member(name: str, role: str, state: str, **extra: Any) -> dict[str, Any]:
    return {
        "name": name,
        "role": role,
        "state": state,
        "api_url": f"http://10.232.0.{name[-1]}:8008/patroni",
        "host": f"10.232.0.{name[-1]}",
        "port": 5432,
        "timeline": 3,
        **extra,
    }


def replica_fields(lag: int | str) -> dict[str, Any]:
    if lag == "unknown":
        lsn: dict[str, Any] = {"receive_lsn": "unknown", "replay_lsn": "unknown", "lsn": "unknown"}
        return {**lsn, "receive_lag": "unknown", "replay_lag": "unknown", "lag": "unknown"}
    return {
        "receive_lsn": "0/5000148",
        "receive_lag": lag,
        "replay_lsn": "0/5000148",
        "replay_lag": lag,
        "lsn": "0/5000148",
        "lag": lag,
    }


def test_a_healthy_pair_reads_as_a_leader_and_a_streaming_sync_standby() -> None:
    cluster = {
        "members": [
            member("n1", "leader", "running"),
            member("n2", "sync_standby", "streaming", **replica_fields(0)),
        ],
        "scope": "aoc-1f2e",
    }
    assert standbys_from_patroni(cluster) == (
        True,
        [StandbyFact("n2", streaming=True, synchronous=True, lag_bytes=0)],
    )


def test_a_replica_catching_up_reads_as_streaming_but_not_synchronous() -> None:
    cluster = {
        "members": [
            member("n1", "leader", "running"),
            member("n2", "replica", "streaming", **replica_fields(1_048_576)),
        ],
        "scope": "aoc",
    }
    leader_known, standbys = standbys_from_patroni(cluster)
    assert leader_known
    assert standbys == [StandbyFact("n2", streaming=True, synchronous=False, lag_bytes=1_048_576)]
    assert RPOTracker(FakeClock()).observe(leader_known, standbys).kind is RPOKind.DEGRADED


def test_a_stopped_replica_with_unknown_lag_is_listed_but_not_streaming() -> None:
    cluster = {
        "members": [
            member("n1", "leader", "running"),
            member("n2", "replica", "stopped", **replica_fields("unknown")),
        ]
    }
    assert standbys_from_patroni(cluster) == (
        True,
        [StandbyFact("n2", streaming=False, synchronous=False, lag_bytes=None)],
    )


def test_a_leader_that_is_not_running_is_not_a_known_leader() -> None:
    cluster = {
        "members": [
            member("n1", "leader", "starting"),
            member("n2", "replica", "running", **replica_fields("unknown")),
        ]
    }
    leader_known, standbys = standbys_from_patroni(cluster)
    assert not leader_known and [s.name for s in standbys] == ["n2"]


def test_a_lone_leader_has_no_standby_and_an_empty_answer_no_leader() -> None:
    lone = {"members": [member("n1", "leader", "running")], "scope": "aoc"}
    assert standbys_from_patroni(lone) == (True, [])
    assert RPOTracker(FakeClock()).observe(*standbys_from_patroni(lone)).kind is RPOKind.NO_STANDBY
    assert standbys_from_patroni({"members": []}) == (False, [])
    assert standbys_from_patroni({}) == (False, [])


def test_a_quorum_standby_counts_as_synchronous() -> None:
    cluster = {
        "members": [
            member("n1", "leader", "running"),
            member("n2", "quorum_standby", "streaming", **replica_fields(0)),
        ]
    }
    assert standbys_from_patroni(cluster)[1][0].synchronous
