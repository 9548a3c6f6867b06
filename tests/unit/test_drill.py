"""The failover drill's pure parts (``aecp.lab.drill``): the RTO and lost writes from a writer's
record, the timeline assembled from the writer, the IP sampler, the agents' decisions and the
Patroni logs, and the report as people and scripts see it (``aecp drill center-failover``)."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from aecp.center.ha.model import HAStatus, RPOKind, RPOState
from aecp.lab import drill
from aecp.lab.drill import (
    DrillReport,
    Event,
    ack_bounds,
    decision_events,
    etcd_leader_of,
    holder_events,
    ip_moved_at,
    iso,
    lost_writes,
    merge,
    patroni_events,
    rto_of,
    since,
    whole,
    writer_events,
)
from aecp.lab.hawriter import Ack

T0 = 1_800_000_000.0  # the kill


def acks(*ats: float) -> list[Ack]:
    return [Ack(i, f"w-{i}", T0 + at) for i, at in enumerate(ats, start=1)]


def local(at: float) -> str:
    """``at`` as a Patroni log stamp (local time, milliseconds)."""
    whole_s = int(at)
    stamp = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(whole_s))
    return f"{stamp},{round((at - whole_s) * 1000):03d}"


def line(dt: float, message: str, level: str = "INFO") -> str:
    return f"{local(T0 + dt)} {level}: {message}"


# --- RTO and lost writes -----------------------------------------------------------------------


def test_rto_is_last_ack_before_to_first_ack_after() -> None:
    record = acks(-1.0, -0.2, 20.6, 20.7)
    before, after = ack_bounds(record, T0)
    assert before is not None and before.name == "w-2"
    assert after is not None and after.name == "w-3"
    assert rto_of(record, T0) == pytest.approx(20.8)


def test_an_ack_at_the_fault_instant_counts_as_before() -> None:
    assert ack_bounds(acks(0.0, 5.0), T0)[0] == acks(0.0)[0]


def test_no_rto_without_an_ack_on_each_side() -> None:
    assert rto_of(acks(-1.0, -0.5), T0) is None
    assert rto_of(acks(3.0), T0) is None
    assert rto_of([], T0) is None


def test_a_lost_write_counts_once_whether_its_row_or_audit_record_is_missing() -> None:
    missing = ["w-3", "w-9", "audit:w-3", "audit:w-12"]
    assert lost_writes(missing) == ["w-3", "w-9", "w-12"]
    assert lost_writes([]) == []


# --- timeline ------------------------------------------------------------------------------------


def test_merge_orders_by_time_and_keeps_stream_order_at_the_same_instant() -> None:
    a = [Event(T0 + 2, "drill", "a2"), Event(T0, "drill", "a0")]
    b = [Event(T0, "writer", "b0"), Event(T0 + 1, "writer", "b1")]
    assert [e.sentence for e in merge(a, b)] == ["a0", "b0", "b1", "a2"]
    assert [e.sentence for e in merge(b, a)] == ["b0", "a0", "b1", "a2"]


def test_writer_events_name_the_last_and_first_acks_and_the_failures_between() -> None:
    record = acks(-2.0, -0.1, 20.4, 21.0)
    failures = [(T0 - 5, "w-0: 503"), (T0 + 0.3, "w-3: ConnectError"), (T0 + 3, "w-4: x")]
    events = writer_events(record, failures, T0)
    assert [(round(e.at - T0, 1), e.source) for e in events] == [
        (-0.1, "writer"),
        (0.3, "writer"),
        (20.4, "writer"),
    ]
    assert "last write acknowledged before the kill (w-2)" in events[0].sentence
    assert "ConnectError" in events[1].sentence
    assert "(w-3), after 2 failed attempts" in events[2].sentence


def test_writer_events_without_a_recovery_say_only_what_happened() -> None:
    events = writer_events(acks(-1.0), [(T0 + 1, "w-2: ReadTimeout")], T0)
    assert len(events) == 2
    assert all("first write acknowledged" not in e.sentence for e in events)


def test_holder_events_are_the_first_sample_and_every_change() -> None:
    samples = [
        (T0 - 1, ["aoc1"]),
        (T0 - 0.95, ["aoc1"]),
        (T0 + 2.8, []),
        (T0 + 2.85, []),
        (T0 + 20.1, ["aoc2"]),
        (T0 + 20.15, ["aoc2"]),
    ]
    events = holder_events(samples)
    assert [e.sentence for e in events] == [
        "the management IP is on aoc1",
        "the management IP is on no node",
        "the management IP is on aoc2",
    ]
    assert [e.source for e in events] == ["sampler"] * 3
    assert ip_moved_at(samples, "aoc2", T0) == T0 + 20.1
    assert ip_moved_at(samples, "aoc3", T0) is None


def test_two_holders_are_named_and_order_does_not_make_a_change() -> None:
    events = holder_events([(T0, ["aoc2", "aoc1"]), (T0 + 0.05, ["aoc1", "aoc2"])])
    assert [e.sentence for e in events] == ["the management IP is on 2 nodes at once: aoc1, aoc2"]


def test_decision_events_keep_the_movers_sentences_after_the_kill() -> None:
    decisions = [
        "2027-01-15T08:00:00.000+00:00 took the management IP: the leader key is mine",
        "garbage without a time",
        "2027-01-15T08:00:20.250+00:00 took the management IP: the leader key is mine (lease "
        "19.0 s left) and PostgreSQL here is the primary",
    ]
    kill = 1_800_000_000.0 + 0  # 2027-01-15T08:00:00Z
    events = decision_events("aoc2", decisions, kill)
    assert len(events) == 1
    assert events[0].at == pytest.approx(kill + 20.25)
    assert events[0].source == "agent aoc2"
    assert events[0].sentence.startswith("took the management IP: the leader key is mine (lease")


PATRONI_LOG = [
    line(-3.0, "no action. I am (aoc2), a secondary, and following a leader (aoc1)"),
    line(-2.0, "Lock owner: aoc1; I am aoc2"),
    line(0.6, "Lock owner: aoc1; I am aoc2"),
    line(0.6, "no action. I am (aoc2), a secondary, and following a leader (aoc1)"),
    line(1.6, "Lock owner: aoc1; I am aoc2"),
    line(1.6, "no action. I am (aoc2), a secondary, and following a leader (aoc1)"),
    line(18.6, "Lock owner: aoc1; I am aoc2"),
    line(18.6, "no action. I am (aoc2), a secondary, and following a leader (aoc1)"),
    line(19.8, "Got response from aoc3 http://10.232.0.3:8008/patroni: {...}"),
    line(19.9, "promoted self to leader by acquiring session lock"),
    "  pg_controldata: a continuation line without a stamp (promoted)",
    line(19.9, "Lock owner: aoc2; I am aoc2"),
    line(20.0, "updated leader lock during promote"),
    line(21.0, "no action. I am (aoc2), the leader with the lock"),
    line(22.0, "Lock owner: aoc2; I am aoc2"),
    line(22.0, "no action. I am (aoc2), the leader with the lock"),
    line(25.0, "Assigning synchronous standby status to ['aoc1']"),
    line(26.0, "Failed to get list of machines from https://10.232.0.1:2379", "WARNING"),
]


def test_patroni_events_keep_the_decisions_and_where_the_loop_changes() -> None:
    events = patroni_events("aoc2", PATRONI_LOG, T0)
    got = [(round(e.at - T0, 1), e.sentence) for e in events]
    following = "no action. I am (aoc2), a secondary, and following a leader (aoc1)"
    assert got == [
        (0.6, "Lock owner: aoc1; I am aoc2"),  # the state at the kill
        (0.6, following),
        (18.6, following),  # the last loop still following the dead active
        (19.9, "promoted self to leader by acquiring session lock"),
        (19.9, "Lock owner: aoc2; I am aoc2"),
        (20.0, "updated leader lock during promote"),
        (21.0, "no action. I am (aoc2), the leader with the lock"),
        (25.0, "Assigning synchronous standby status to ['aoc1']"),
    ]
    assert {e.source for e in events} == {"patroni aoc2"}


def test_patroni_events_before_the_kill_are_left_out() -> None:
    assert patroni_events("aoc2", PATRONI_LOG, T0 + 100) == []
    assert patroni_events("aoc2", ["no stamp at all"], T0) == []


def test_etcd_leader_is_named_from_the_gateways_answers() -> None:
    status = {"header": {"member_id": "17"}, "leader": "9"}
    members = {"members": [{"ID": "17", "name": "aoc3"}, {"ID": "9", "name": "aoc1"}]}
    assert etcd_leader_of(status, members) == "aoc1"
    assert etcd_leader_of({"leader": "5"}, members) is None
    assert etcd_leader_of({}, {}) is None


# --- whole or not --------------------------------------------------------------------------------


def status(**kw: Any) -> HAStatus:
    base: dict[str, Any] = {
        "cluster_id": "aoc-x",
        "leader": "aoc1",
        "epoch": 3,
        "management_ip": "10.233.0.200/24",
        "ip_holders": ["aoc1"],
        "rpo": RPOState(kind=RPOKind.IN_SYNC),
        "automatic_failover": True,
        "members": [],
        "as_of": T0,
    }
    return HAStatus(**(base | kw))


def test_whole_says_why_a_trio_is_not() -> None:
    assert whole(status()) == ""
    assert "no active" in whole(status(leader=None))
    assert "no standby" in whole(status(rpo=RPOState(kind=RPOKind.NO_STANDBY)))
    assert "not on aoc1" in whole(status(ip_holders=[]))
    off = status(automatic_failover=False, failover_note="the witness is unreachable")
    assert "the witness is unreachable" in whole(off)


# --- the report ----------------------------------------------------------------------------------


def report(**kw: Any) -> DrillReport:
    base: dict[str, Any] = {
        "old_active": "aoc1",
        "new_active": "aoc2",
        "epoch_before": 3,
        "epoch_after": 4,
        "killed_at": T0,
        "rto_s": 20.83,
        "ip_moved_s": 20.12,
        "acknowledged": 61,
        "ambiguous": 38,
        "lost": 0,
        "timeline": [
            Event(T0 - 0.02, "writer", "last write acknowledged before the kill (w-50)"),
            Event(T0, "drill", "killed aoc1, the active"),
            Event(T0 + 20.12, "sampler", "the management IP is on aoc2"),
        ],
    }
    return DrillReport(**(base | kw))


def test_the_report_passes_only_with_a_recovery_no_loss_and_one_holder() -> None:
    assert report().passed
    assert not report(rto_s=None).passed
    assert not report(lost=1, missing=["w-3"]).passed
    assert not report(ip_on_two=2).passed


def test_the_report_for_scripts_is_raw_and_json() -> None:
    data = json.loads(json.dumps(report().to_dict()))
    assert data["rto_s"] == 20.83 and data["lost"] == 0 and data["passed"] is True
    assert data["timeline"][1] == {
        "at": T0,
        "source": "drill",
        "sentence": "killed aoc1, the active",
    }


def test_the_report_for_people_rounds_and_uses_iso_times() -> None:
    summary = report().summary()
    assert summary["RTO (client)"] == "20.8 s"
    assert summary["management IP moved"] == "20.1 s"
    assert summary["epoch"] == "3 -> 4"
    assert summary["etcd leader before"] == "unknown"
    assert summary["killed"] == "aoc1 at 2027-01-15T08:00:00.000Z"
    assert summary["result"] == "PASS"
    failed = report(rto_s=None, new_active=None, epoch_after=None, restored=False).summary()
    assert failed["RTO (client)"] == "no write acknowledged after the kill"
    assert failed["new active"] == "none seen" and failed["epoch"] == "3 -> -"
    assert failed["old active back as passive"] == "NO" and failed["result"] == "FAIL"
    rows = report().rows()
    assert rows[0] == {
        "time": "2027-01-15T07:59:59.980Z",
        "since_kill": "0.0 s",
        "source": "writer",
        "what": "last write acknowledged before the kill (w-50)",
    }
    assert rows[2]["since_kill"] == "+20.1 s"


def test_since_and_iso() -> None:
    assert since(-0.6) == "-0.6 s" and since(0.01) == "0.0 s" and since(20.44) == "+20.4 s"
    assert iso(T0 + 0.1234) == "2027-01-15T08:00:00.123Z"


# --- the command ---------------------------------------------------------------------------------


@pytest.fixture
def fake_drill(monkeypatch: pytest.MonkeyPatch) -> dict[str, Any]:
    seen: dict[str, Any] = {"report": report()}

    def opened(root: Path) -> str:
        seen["root"] = root
        return "trio"

    async def run(trio: str, **kw: Any) -> DrillReport:
        seen["kw"] = kw
        result: DrillReport = seen["report"]
        return result

    monkeypatch.setattr("aecp.lab.centerha.Trio.open", opened)
    monkeypatch.setattr(drill, "run_drill", run)
    return seen


def test_the_command_prints_figures_and_the_timeline(
    fake_drill: dict[str, Any], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from aecp.cli import output
    from aecp.cli.main import app

    # the console's width is fixed when it is made: wide, so no sentence wraps in the table
    monkeypatch.setattr(output.console, "width", 200)

    result = CliRunner().invoke(
        app,
        ["drill", "center-failover", "--lab-dir", str(tmp_path), "--writes-before", "7"],
        env={"COLUMNS": "200"},
    )
    assert result.exit_code == 0, result.output
    assert fake_drill["root"] == tmp_path
    assert fake_drill["kw"]["writes_before"] == 7 and fake_drill["kw"]["restore"] is True
    assert "20.8 s" in result.output and "PASS" in result.output
    assert "the management IP is on aoc2" in result.output and "+20.1 s" in result.output


def test_the_command_in_json_and_its_exit_code_on_a_failed_drill(
    fake_drill: dict[str, Any], tmp_path: Path
) -> None:
    from aecp.cli.main import app

    fake_drill["report"] = report(lost=1, missing=["w-9", "audit:w-9"])
    args = ["drill", "center-failover", "--lab-dir", str(tmp_path), "--no-restore", "-o", "json"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 1
    assert fake_drill["kw"]["restore"] is False
    data = json.loads(result.stdout)
    assert data["lost"] == 1 and data["passed"] is False and data["missing"] == ["w-9", "audit:w-9"]
