"""The trio's status from what its parts answer: Patroni's ``GET /cluster`` (members, roles,
timelines, lag) and each agent's ``GET /local`` (whether it holds the management IP). Pure:
``compose`` takes the answers (``None`` for one that did not come) and returns ``HAStatus``.

A member counts as reachable when its agent answered the one asking. Automatic failover is
possible only when every member is reachable and a standby is in sync: with the witness or the
passive gone, etcd has no vote to spare, and a standby that is behind is never promoted.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from aecp.center.ha.model import HAStatus, Member, Replication, Role, RPOState
from aecp.center.ha.topology import HANode, Topology


def compose(
    topology: Topology,
    patroni_cluster: Mapping[str, Any] | None,
    locals_: Mapping[str, Mapping[str, Any] | None],
    rpo: RPOState,
    now: float,
) -> HAStatus:
    """The status; ``locals_`` maps a node name to its agent's ``/local`` answer or ``None``."""
    by_name = _patroni_members(patroni_cluster)
    members = [_member(n, by_name.get(n.name), locals_.get(n.name)) for n in topology.nodes]
    leader = next((m.name for m in members if m.leader), None)
    epoch = next((m.timeline for m in members if m.leader), None)
    holders = [m.name for m in members if m.holds_management_ip]
    note = _failover_note(members, leader, _paused(patroni_cluster, by_name))
    return HAStatus(
        cluster_id=topology.cluster_id,
        leader=leader,
        epoch=epoch,
        management_ip=topology.management_address,
        ip_holders=holders,
        rpo=rpo,
        automatic_failover=not note,
        failover_note=note,
        members=members,
        as_of=now,
    )


def _patroni_members(cluster: Mapping[str, Any] | None) -> dict[str, Mapping[str, Any]]:
    if not cluster:
        return {}
    return {str(m.get("name")): m for m in cluster.get("members", []) if isinstance(m, Mapping)}


def _member(
    node: HANode, patroni: Mapping[str, Any] | None, local: Mapping[str, Any] | None
) -> Member:
    holds = bool(local.get("holds_management_ip")) if local is not None else None
    base = Member(
        name=node.name,
        role=node.role,
        ha_ip=node.ha_ip,
        reachable=local is not None,
        holds_management_ip=holds,
    )
    if node.role is Role.WITNESS:
        return base
    if patroni is None:
        return base.model_copy(update={"replication": Replication.NOT_REPLICATING})
    role, state = str(patroni.get("role", "")), str(patroni.get("state", ""))
    lag = patroni.get("lag")
    timeline = patroni.get("timeline")
    return base.model_copy(
        update={
            "leader": role == "leader" and state == "running",
            "replication": replication_of(role, state),
            "lag_bytes": lag if isinstance(lag, int) else None,
            "timeline": timeline if isinstance(timeline, int) else None,
        }
    )


def replication_of(role: str, state: str) -> Replication:
    """Patroni's (role, state) of a member as the trio's replication state."""
    if role == "leader":
        return Replication.LEADER if state == "running" else Replication.NOT_REPLICATING
    if state != "streaming":
        return Replication.NOT_REPLICATING
    return Replication.IN_SYNC if role == "sync_standby" else Replication.CATCHING_UP


def _paused(cluster: Mapping[str, Any] | None, by_name: Mapping[str, Mapping[str, Any]]) -> str:
    """Why Patroni would not fail over by itself whatever the members' health: maintenance
    mode (``pause``), or a standby tagged ``nofailover``; "" if neither."""
    if cluster and cluster.get("pause"):
        return "Patroni is paused (maintenance mode): it promotes nobody"
    tagged = sorted(n for n, m in by_name.items() if (m.get("tags") or {}).get("nofailover"))
    if tagged:
        return f"{', '.join(tagged)} tagged nofailover: Patroni will not promote it"
    return ""


def _failover_note(members: list[Member], leader: str | None, paused: str = "") -> str:
    if leader is None:
        return "no active: nothing to fail over from"
    if paused:
        return paused
    gone = [m for m in members if not m.reachable and m.name != leader]
    if gone:
        names = ", ".join(f"the {m.role} {m.name}" for m in gone)
        return f"{names} unreachable: etcd has no vote to spare, a further loss stops the trio"
    if not any(m.replication is Replication.IN_SYNC for m in members):
        return "no standby in sync: a promotion could lose data, so none is made"
    return ""
