"""Whether a failover now would lose data (the RPO), tracked over time from Patroni's answers.

``standbys_from_patroni`` reads Patroni's ``GET /cluster`` (``patroni.utils.cluster_as_json``)
into plain facts; ``RPOTracker.observe`` turns each reading into an ``RPOState``:

- the leader could not be asked, or no member is a running leader: ``unknown``;
- no standby listed at all: ``no standby``;
- a standby that is streaming *and* synchronous: ``in sync``. Its reported lag is not looked
  at: a synchronous standby acknowledged every commit, and Patroni's lag compares two LSNs
  sampled at different times (each member's every ``loop_wait``), so it is rarely 0 under load;
- otherwise (a standby that is listed but catching up, not streaming or not synchronous):
  ``degraded``, ``behind_s`` seconds since the last ``in sync`` reading. When this tracker never
  saw ``in sync``, ``behind_s`` counts from its first reading: a lower bound, "at least that
  long, as far as this tracker knows".

Every ``observe`` also leaves ``change``: ``(before, after)`` when the *kind* differs from the
previous reading's (the first reading's ``before`` is ``None``), else ``None``, so a caller fires
an alert exactly once per kind change. Time comes from a ``Clock`` (virtual in tests).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from aecp.center.ha.model import RPOKind, RPOState
from aecp.common.clock import Clock

SYNC_ROLES = ("sync_standby", "quorum_standby")
"""Patroni's roles for a standby that commits wait for (``synchronous_mode`` on / quorum)."""


@dataclass(frozen=True)
class StandbyFact:
    """One non-leader member as Patroni reports it; ``lag_bytes`` is ``None`` when unknown."""

    name: str
    streaming: bool
    synchronous: bool
    lag_bytes: int | None


@dataclass(frozen=True)
class RPOChange:
    """The RPO's kind changed from ``before`` (``None``: the first reading) to ``after``."""

    before: RPOState | None
    after: RPOState

    @property
    def text(self) -> str:
        """``RPO: in sync -> degraded: passive 3 s behind``."""
        was = self.before.text if self.before is not None else "not known yet"
        return f"RPO: {was} -> {self.after.text}"


def standbys_from_patroni(cluster_json: Mapping[str, Any]) -> tuple[bool, list[StandbyFact]]:
    """``(leader_known, standbys)`` from Patroni's ``GET /cluster`` answer. ``leader_known``: a
    member has role ``leader`` and state ``running``; standbys: every member but the leader,
    ``streaming`` when its state is ``streaming`` (Patroni shows a replica's replication state
    there), ``synchronous`` when its role is ``sync_standby`` or ``quorum_standby``."""
    members = [m for m in cluster_json.get("members") or [] if isinstance(m, Mapping)]
    leader_known = any(m.get("role") == "leader" and m.get("state") == "running" for m in members)
    standbys = [
        StandbyFact(
            name=str(m.get("name", "")),
            streaming=m.get("state") == "streaming",
            synchronous=m.get("role") in SYNC_ROLES,
            lag_bytes=_lag(m.get("lag")),
        )
        for m in members
        if m.get("role") != "leader"
    ]
    return leader_known, standbys


def _lag(value: Any) -> int | None:
    """Patroni's ``lag``: bytes as an int, or ``"unknown"``."""
    if isinstance(value, bool) or not isinstance(value, int):
        return None
    return max(value, 0)


class RPOTracker:
    """The RPO over successive readings (module docstring). ``state``: the last reading's."""

    def __init__(self, clock: Clock) -> None:
        self._clock = clock
        self._first_seen: float | None = None
        self._last_in_sync: float | None = None
        self.state: RPOState | None = None
        self.change: RPOChange | None = None

    @property
    def last_in_sync(self) -> float | None:
        """Monotonic time of the last ``in sync`` reading, if any."""
        return self._last_in_sync

    def observe(self, leader_known: bool, standbys: Sequence[StandbyFact]) -> RPOState:
        """The RPO now; also sets ``change`` (``None`` unless the kind changed)."""
        now = self._clock.monotonic()
        if self._first_seen is None:
            self._first_seen = now
        state = self._classify(now, leader_known, standbys)
        before = self.state
        self.change = None if before and before.kind is state.kind else RPOChange(before, state)
        self.state = state
        return state

    def _classify(
        self, now: float, leader_known: bool, standbys: Sequence[StandbyFact]
    ) -> RPOState:
        if not leader_known:
            return RPOState(kind=RPOKind.UNKNOWN)
        if not standbys:
            return RPOState(kind=RPOKind.NO_STANDBY)
        if any(s.streaming and s.synchronous for s in standbys):
            self._last_in_sync = now
            return RPOState(kind=RPOKind.IN_SYNC)
        since = self._last_in_sync if self._last_in_sync is not None else self._first_seen
        return RPOState(kind=RPOKind.DEGRADED, behind_s=now - (now if since is None else since))
