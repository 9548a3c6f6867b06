"""What the HA trio looks like to its users: each member's role and replication, the leader's
epoch, who holds the management IP, and whether a failover now would lose data (RPO).

Plain values, no I/O: built by ``status.py`` from Patroni's and the agents' answers, served by
the center's ``GET /v1/ha``, shown by ``aecp center ha status`` and the console's header.
"""

from __future__ import annotations

import enum

from pydantic import BaseModel, Field


class Role(enum.StrEnum):
    """A member's configured role in the trio (its current one may differ after a failover)."""

    ACTIVE = "active"
    PASSIVE = "passive"
    WITNESS = "witness"


class Replication(enum.StrEnum):
    """How a data member stands towards the leader's WAL."""

    LEADER = "leader"  # it is the leader: it writes the WAL
    IN_SYNC = "in sync"  # a synchronous standby, streaming: a commit waits for it
    CATCHING_UP = "catching up"  # streaming but not (yet) synchronous: not eligible for promotion
    NOT_REPLICATING = "not replicating"  # down, unreachable, or not streaming


class RPOKind(enum.StrEnum):
    IN_SYNC = "in_sync"  # a failover now loses nothing
    DEGRADED = "degraded"  # a standby exists but is behind: a failover now may lose data
    NO_STANDBY = "no_standby"  # nobody to fail over to
    UNKNOWN = "unknown"  # the leader could not be asked


class RPOState(BaseModel):
    """Whether a failover now would lose data. ``behind_s``: for ``degraded``, how long since
    the standby last held every committed transaction."""

    kind: RPOKind
    behind_s: float | None = None

    @property
    def text(self) -> str:
        """``in sync`` / ``degraded: passive 12 s behind`` / ``no standby`` / ``unknown``."""
        if self.kind is RPOKind.IN_SYNC:
            return "in sync"
        if self.kind is RPOKind.DEGRADED:
            return f"degraded: passive {round(self.behind_s or 0)} s behind"
        if self.kind is RPOKind.NO_STANDBY:
            return "no standby"
        return "unknown"


class Member(BaseModel):
    name: str
    role: Role = Field(description="configured role")
    ha_ip: str
    reachable: bool = Field(description="its agent answered the one asking")
    leader: bool = False
    replication: Replication | None = Field(None, description="None for the witness")
    lag_bytes: int | None = None
    timeline: int | None = None
    holds_management_ip: bool | None = Field(None, description="None: its agent did not answer")


class HAStatus(BaseModel):
    cluster_id: str
    leader: str | None = Field(description="the member that is active now, if any")
    epoch: int | None = Field(description="the leader's timeline: one more at every promotion")
    management_ip: str
    ip_holders: list[str] = Field(description="members holding the management IP: one, or none")
    rpo: RPOState
    automatic_failover: bool = Field(description="False when a promotion could not happen now")
    failover_note: str = Field("", description="why automatic failover is off, if it is")
    members: list[Member]
    as_of: float = Field(description="wall-clock time of the reading (Unix s)")
