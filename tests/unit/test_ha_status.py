"""``status.compose`` turns Patroni's ``GET /cluster`` (4.1.5 shapes) and the agents' ``GET /local``
answers into the trio's status: who leads and at which epoch, each member's replication, who
holds the management IP, and whether automatic failover is possible now (and why not)."""

from __future__ import annotations

import json
from typing import Any

import pytest

from aecp.center.ha.model import HAStatus, Replication, Role, RPOKind, RPOState
from aecp.center.ha.status import compose, replication_of
from aecp.center.ha.topology import Topology, parse

NOW = 1_750_000_000.0
IN_SYNC = RPOState(kind=RPOKind.IN_SYNC)
IPS = {"aoc1": "10.232.0.1", "aoc2": "10.232.0.2", "aoc3": "10.232.0.3"}


def trio() -> Topology:
    return parse(
        {
            "cluster_id": "aoc-prod",
            "ha_cidr": "10.232.0.0/24",
            "management_ip": "10.233.0.200/24",
            "nodes": [
                {"name": "aoc1", "role": "active", "ha_ip": IPS["aoc1"], "data_dir": "/srv/pg"},
                {"name": "aoc2", "role": "passive", "ha_ip": IPS["aoc2"], "data_dir": "/srv/pg"},
                {"name": "aoc3", "role": "witness", "ha_ip": IPS["aoc3"]},
            ],
        }
    )


# --- Patroni 4.1.5's GET /cluster members (patroni.utils.cluster_as_json) -----------------------


def _base(name: str, role: str, state: str) -> dict[str, Any]:
    ip = IPS[name]
    return {
        "name": name,
        "role": role,
        "state": state,
        "api_url": f"http://{ip}:8008/patroni",
        "host": ip,
        "port": 5432,
    }


def leader(name: str, timeline: int = 1, state: str = "running") -> dict[str, Any]:
    """The leader: no lag or LSN fields (Patroni leaves them out for the leader)."""
    return {**_base(name, "leader", state), "timeline": timeline}


def standby(
    name: str, role: str = "sync_standby", state: str = "streaming", lag: int = 0, timeline: int = 1
) -> dict[str, Any]:
    """A replica with its WAL positions (``lsn`` is the replay position)."""
    return {
        **_base(name, role, state),
        "timeline": timeline,
        "receive_lag": 0,
        "receive_lsn": "0/3000060",
        "replay_lag": lag,
        "replay_lsn": "0/3000000",
        "lag": lag,
        "lsn": "0/3000000",
    }


def stopped(name: str) -> dict[str, Any]:
    """A replica whose PostgreSQL is down: no timeline, every position and lag ``unknown``."""
    member = _base(name, "replica", "stopped")
    for location in ("receive_", "replay_", ""):
        member[f"{location}lsn"] = member[f"{location}lag"] = "unknown"
    return member


def cluster(*members: dict[str, Any]) -> dict[str, Any]:
    return {"members": sorted(members, key=lambda m: str(m["name"])), "scope": "aoc-prod"}


def local(name: str, holds: bool = False) -> dict[str, Any]:
    """An agent's ``GET /local`` answer."""
    role = {"aoc1": "active", "aoc2": "passive", "aoc3": "witness"}[name]
    return {"name": name, "role": role, "holds_management_ip": holds, "decisions": []}


def all_local(holder: str | None = "aoc1") -> dict[str, dict[str, Any] | None]:
    return {n: local(n, holds=n == holder) for n in IPS}


def healthy() -> dict[str, Any]:
    return cluster(leader("aoc1", timeline=3), standby("aoc2", timeline=3))


def compose_(
    patroni: dict[str, Any] | None,
    locals_: dict[str, dict[str, Any] | None],
    rpo: RPOState = IN_SYNC,
) -> HAStatus:
    return compose(trio(), patroni, locals_, rpo, NOW)


# --- a healthy trio -----------------------------------------------------------------------------


def test_a_healthy_trio() -> None:
    st = compose_(healthy(), all_local("aoc1"))
    assert (st.cluster_id, st.leader, st.epoch) == ("aoc-prod", "aoc1", 3)
    assert st.management_ip == "10.233.0.200" and st.ip_holders == ["aoc1"]
    assert st.automatic_failover is True and st.failover_note == ""
    assert st.rpo == IN_SYNC and st.as_of == NOW
    active, passive, witness = st.members
    assert (active.leader, active.replication, active.lag_bytes, active.timeline) == (
        True,
        Replication.LEADER,
        None,
        3,
    )
    assert (passive.leader, passive.replication, passive.lag_bytes) == (
        False,
        Replication.IN_SYNC,
        0,
    )
    assert witness.role is Role.WITNESS and witness.replication is None and not witness.leader
    assert all(m.reachable for m in st.members)
    assert [m.holds_management_ip for m in st.members] == [True, False, False]


def test_members_follow_the_topology_with_their_configured_roles_and_ha_ips() -> None:
    st = compose_(healthy(), all_local())
    assert [(m.name, m.role, m.ha_ip) for m in st.members] == [
        ("aoc1", Role.ACTIVE, "10.232.0.1"),
        ("aoc2", Role.PASSIVE, "10.232.0.2"),
        ("aoc3", Role.WITNESS, "10.232.0.3"),
    ]


def test_the_rpo_given_is_the_rpo_reported() -> None:
    degraded = RPOState(kind=RPOKind.DEGRADED, behind_s=12.0)
    assert compose_(healthy(), all_local(), degraded).rpo == degraded


def test_the_status_survives_its_json() -> None:
    """What the agent serves (``model_dump(mode="json")``) is what the center reads back."""
    st = compose_(healthy(), all_local())
    assert HAStatus.model_validate(json.loads(json.dumps(st.model_dump(mode="json")))) == st


# --- after a failover ---------------------------------------------------------------------------


def test_after_a_failover_the_old_passive_leads_at_the_next_epoch() -> None:
    """The old active came back, rewound, and streams again but is not yet synchronous."""
    patroni = cluster(
        leader("aoc2", timeline=4), standby("aoc1", role="replica", lag=123_456, timeline=4)
    )
    st = compose_(patroni, all_local("aoc2"), RPOState(kind=RPOKind.DEGRADED, behind_s=3.0))
    assert (st.leader, st.epoch, st.ip_holders) == ("aoc2", 4, ["aoc2"])
    old_active = st.members[0]
    assert old_active.role is Role.ACTIVE  # configured role: unchanged by the failover
    assert (old_active.leader, old_active.replication, old_active.lag_bytes) == (
        False,
        Replication.CATCHING_UP,
        123_456,
    )
    assert st.automatic_failover is False
    assert st.failover_note == "no standby in sync: a promotion could lose data, so none is made"


def test_once_the_old_active_is_synchronous_again_failover_is_back_on() -> None:
    patroni = cluster(leader("aoc2", timeline=4), standby("aoc1", timeline=4))
    st = compose_(patroni, all_local("aoc2"))
    assert st.members[0].replication is Replication.IN_SYNC
    assert st.automatic_failover is True and st.failover_note == ""


# --- unreachable members ------------------------------------------------------------------------


def test_the_witness_unreachable_turns_automatic_failover_off() -> None:
    locals_ = all_local("aoc1")
    locals_["aoc3"] = None
    st = compose_(healthy(), locals_)
    assert st.automatic_failover is False
    assert st.failover_note == (
        "the witness aoc3 unreachable: etcd has no vote to spare, a further loss stops the trio"
    )
    witness = st.members[2]
    assert witness.reachable is False and witness.holds_management_ip is None
    assert st.leader == "aoc1" and st.ip_holders == ["aoc1"]  # service is unchanged


def test_the_passive_unreachable_and_gone_from_patroni() -> None:
    """The passive's host is down: its agent does not answer and its Patroni member key
    expired, so ``/cluster`` lists the leader alone."""
    locals_ = all_local("aoc1")
    locals_["aoc2"] = None
    st = compose_(cluster(leader("aoc1", timeline=3)), locals_, RPOState(kind=RPOKind.NO_STANDBY))
    passive = st.members[1]
    assert (passive.reachable, passive.replication, passive.lag_bytes, passive.timeline) == (
        False,
        Replication.NOT_REPLICATING,
        None,
        None,
    )
    assert passive.holds_management_ip is None
    assert st.automatic_failover is False
    assert st.failover_note.startswith("the passive aoc2 unreachable: etcd has no vote to spare")


def test_the_passive_unreachable_while_patroni_still_lists_it_in_sync() -> None:
    """Just cut off: Patroni's member key has not expired yet, but the agent is already gone;
    the unreachable agent alone turns automatic failover off."""
    locals_ = all_local("aoc1")
    locals_["aoc2"] = None
    st = compose_(healthy(), locals_)
    assert st.members[1].replication is Replication.IN_SYNC and not st.members[1].reachable
    assert st.automatic_failover is False and "the passive aoc2 unreachable" in st.failover_note


def test_the_passive_stopped_with_its_agent_up() -> None:
    patroni = cluster(leader("aoc1", timeline=3), stopped("aoc2"))
    st = compose_(patroni, all_local("aoc1"), RPOState(kind=RPOKind.DEGRADED, behind_s=1.0))
    passive = st.members[1]
    assert passive.reachable and passive.replication is Replication.NOT_REPLICATING
    assert passive.lag_bytes is None and passive.timeline is None
    assert st.automatic_failover is False and st.failover_note.startswith("no standby in sync")


def test_passive_and_witness_both_unreachable_are_both_named() -> None:
    locals_ = all_local("aoc1")
    locals_["aoc2"] = locals_["aoc3"] = None
    st = compose_(cluster(leader("aoc1")), locals_)
    assert st.failover_note.startswith("the passive aoc2, the witness aoc3 unreachable")
    assert st.automatic_failover is False


def test_a_missing_local_answer_counts_as_unreachable() -> None:
    locals_ = all_local("aoc1")
    del locals_["aoc3"]
    st = compose_(healthy(), locals_)
    assert st.members[2].reachable is False and st.automatic_failover is False


def test_the_leaders_own_agent_not_answering_leaves_failover_on() -> None:
    """Seen from the witness: the active's agent is down but its Patroni leads and the
    passive is in sync; a failover from the active is exactly what could still happen."""
    locals_ = all_local(None)
    locals_["aoc1"] = None
    st = compose_(healthy(), locals_)
    assert st.leader == "aoc1" and st.members[0].reachable is False
    assert st.automatic_failover is True and st.ip_holders == []


# --- no leader ----------------------------------------------------------------------------------


def test_no_leader_in_patronis_answer() -> None:
    """Between the old lease's expiry and the promotion: two replicas, no leader."""
    patroni = cluster(
        standby("aoc1", role="replica", state="running", lag=0),
        standby("aoc2", role="replica", state="running", lag=0),
    )
    st = compose_(patroni, all_local(None), RPOState(kind=RPOKind.UNKNOWN))
    assert (st.leader, st.epoch, st.ip_holders) == (None, None, [])
    assert st.automatic_failover is False
    assert st.failover_note == "no active: nothing to fail over from"
    assert [m.replication for m in st.members[:2]] == [Replication.NOT_REPLICATING] * 2


def test_no_answer_from_patroni_at_all() -> None:
    st = compose_(None, all_local(None), RPOState(kind=RPOKind.UNKNOWN))
    assert st.leader is None and st.epoch is None
    assert [m.replication for m in st.members] == [
        Replication.NOT_REPLICATING,
        Replication.NOT_REPLICATING,
        None,
    ]
    assert st.failover_note == "no active: nothing to fail over from"


def test_an_empty_cluster_answer_is_no_leader() -> None:
    for patroni in ({}, {"members": []}):
        assert compose_(patroni, all_local(None)).leader is None


@pytest.mark.parametrize("state", ["stopped", "starting", "crashed", "stopping", ""])
def test_a_leader_whose_postgres_is_not_running_is_not_the_leader(state: str) -> None:
    patroni = cluster(leader("aoc1", timeline=3, state=state), standby("aoc2", timeline=3))
    st = compose_(patroni, all_local(None))
    assert st.leader is None and st.epoch is None
    assert st.members[0].replication is Replication.NOT_REPLICATING
    assert st.failover_note == "no active: nothing to fail over from"


# --- the management IP --------------------------------------------------------------------------


def test_nobody_holds_the_management_ip() -> None:
    st = compose_(healthy(), all_local(None))
    assert st.ip_holders == [] and [m.holds_management_ip for m in st.members] == [False] * 3


def test_two_holders_are_both_reported() -> None:
    """Never meant to happen; if it does the status must show it, not hide one."""
    locals_ = all_local("aoc1")
    locals_["aoc2"] = local("aoc2", holds=True)
    assert compose_(healthy(), locals_).ip_holders == ["aoc1", "aoc2"]


def test_an_unreachable_node_holds_nothing_that_we_know_of() -> None:
    locals_ = all_local("aoc1")
    locals_["aoc1"] = None
    st = compose_(healthy(), locals_)
    assert st.members[0].holds_management_ip is None and st.ip_holders == []


# --- what Patroni may send ----------------------------------------------------------------------


def test_an_unknown_lag_is_no_lag_figure() -> None:
    member = standby("aoc2", role="replica")
    member["lag"] = "unknown"
    st = compose_(cluster(leader("aoc1"), member), all_local())
    assert st.members[1].lag_bytes is None and st.members[1].replication is Replication.CATCHING_UP


def test_a_missing_timeline_is_none() -> None:
    member = leader("aoc1")
    del member["timeline"]
    st = compose_(cluster(member, standby("aoc2")), all_local())
    assert st.leader == "aoc1" and st.epoch is None


def test_members_outside_the_topology_and_malformed_entries_are_ignored() -> None:
    patroni = healthy()
    patroni["members"] += [leader("aoc1", timeline=9) | {"name": "stale"}, "aoc2", None]
    st = compose_(patroni, all_local())
    assert [m.name for m in st.members] == ["aoc1", "aoc2", "aoc3"] and st.epoch == 3


def test_a_witness_listed_by_patroni_is_still_a_witness() -> None:
    """The witness runs no Patroni; a member of that name in ``/cluster`` changes nothing."""
    patroni = healthy()
    patroni["members"].append({**_base("aoc3", "replica", "streaming"), "lag": 0})
    witness = compose_(patroni, all_local()).members[2]
    assert witness.replication is None and witness.lag_bytes is None


# --- replication_of -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("role", "state", "expected"),
    [
        ("leader", "running", Replication.LEADER),
        ("leader", "stopped", Replication.NOT_REPLICATING),
        ("leader", "starting", Replication.NOT_REPLICATING),
        ("sync_standby", "streaming", Replication.IN_SYNC),
        ("sync_standby", "running", Replication.NOT_REPLICATING),
        ("sync_standby", "stopped", Replication.NOT_REPLICATING),
        ("replica", "streaming", Replication.CATCHING_UP),
        ("replica", "in archive recovery", Replication.NOT_REPLICATING),
        ("replica", "running", Replication.NOT_REPLICATING),
        ("replica", "stopped", Replication.NOT_REPLICATING),
        ("replica", "creating replica", Replication.NOT_REPLICATING),
        ("", "", Replication.NOT_REPLICATING),
    ],
)
def test_replication_of(role: str, state: str, expected: Replication) -> None:
    assert replication_of(role, state) is expected


# --- the real shape, from Patroni's own code ----------------------------------------------------


def test_compose_reads_what_patronis_cluster_as_json_writes() -> None:
    """Patroni's own serializer (no process, no DCS): a leader on timeline 5 and the synchronous
    standby named in ``/sync``, 648 bytes behind on replay."""
    from patroni.dcs import Cluster, ClusterConfig, Leader, Member, Status, SyncState
    from patroni.utils import cluster_as_json

    def member(name: str, **data: Any) -> Member:
        value = {
            "conn_url": f"postgres://{IPS[name]}:5432/postgres",
            "api_url": f"http://{IPS[name]}:8008/patroni",
            "state": "running",
            "timeline": 5,
            **data,
        }
        return Member.from_node(1, name, None, json.dumps(value))

    primary = member("aoc1", role="primary", xlog_location=50_331_648)
    replica = member(
        "aoc2",
        role="replica",
        replication_state="streaming",
        xlog_location=50_331_000,
        receive_lsn=50_331_648,
        replay_lsn=50_331_000,
    )
    state = Cluster(
        True,
        ClusterConfig.from_node(1, json.dumps({"synchronous_mode": True, "ttl": 20})),
        Leader(1, 20, primary),
        Status(50_331_648, None, None),
        [replica, primary],
        None,
        SyncState.from_node(1, json.dumps({"leader": "aoc1", "sync_standby": "aoc2"})),
        None,
        None,
    )
    patroni = json.loads(json.dumps(cluster_as_json(state)))
    st = compose_(patroni, all_local("aoc1"))
    assert (st.leader, st.epoch, st.automatic_failover) == ("aoc1", 5, True)
    assert st.members[1].replication is Replication.IN_SYNC and st.members[1].lag_bytes == 648


def test_a_paused_patroni_or_a_nofailover_tag_turns_automatic_failover_off() -> None:
    topology = trio()
    healthy: dict[str, Any] = {"members": [leader("aoc1", timeline=2), standby("aoc2")]}
    locals_ = {n.name: {"holds_management_ip": n.name == "aoc1"} for n in topology.nodes}
    rpo = IN_SYNC
    assert compose(topology, healthy, locals_, rpo, 0.0).automatic_failover
    paused = compose(topology, {**healthy, "pause": True}, locals_, rpo, 0.0)
    assert not paused.automatic_failover and "paused" in paused.failover_note
    members: list[dict[str, Any]] = [dict(m) for m in healthy["members"]]
    members[1]["tags"] = {"nofailover": True}
    tagged = compose(topology, {"members": members}, locals_, rpo, 0.0)
    assert not tagged.automatic_failover and "aoc2" in tagged.failover_note
