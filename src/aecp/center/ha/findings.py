"""The HA trio's alerts: the rules (added to ``alertrules.RULES`` on import) and the findings
the active center's alert loop draws from the last HA status it read (``gate.Leadership``).

- ``aoc_unprotected`` (critical), one per trio: a failover now could lose data or has nobody
  to fail over to (the RPO is not ``in sync``). Its one alert notifies each change of the RPO
  (``degraded``, ``no standby``, ``unknown``: ``Finding.notify_change``), not the seconds
  behind moving.
- ``aoc_failover_off`` (notice), one per trio: a promotion could not happen now (the witness or
  the passive is lost, or an operator paused it); the status says why.
- ``aoc_member_unreachable`` (notice), one per member: its agent does not answer.

Each opens once and resolves when its condition clears (the alert loop's keys). While no status
can be read, the open ones are kept as they are (``HA_RULE_NAMES`` to ``Alerting.external_rules``).
"""

from __future__ import annotations

from collections.abc import Callable

from aecp.center.alertrules import RULES, Level, RuleSpec
from aecp.center.alerts import Finding
from aecp.center.ha.model import HAStatus, RPOKind

KIND = "center"  # the object the alerts name: the trio (by its cluster id) or one member

HA_RULES = {
    s.name: s
    for s in (
        RuleSpec(
            "aoc_unprotected",
            KIND,
            "the operation center is not protected by its standby",
            "AOC is unprotected: {detail}",
            "if the active center's node fails now, committed changes may be lost or no "
            "center takes over",
            "bring the passive back and let it catch up (aecp center ha status shows its lag)",
            level=Level.CRITICAL,
            per_cluster=False,
        ),
        RuleSpec(
            "aoc_failover_off",
            KIND,
            "the operation center cannot fail over by itself",
            "automatic failover disabled: {detail}",
            "if the active center's node fails now, no center takes over without an operator",
            "bring back the member the status names (aecp center ha status)",
            level=Level.NOTICE,
            per_cluster=False,
        ),
        RuleSpec(
            "aoc_member_unreachable",
            KIND,
            "a member of the operation center's trio does not answer",
            "AOC member {name} does not answer: {detail}",
            "the trio runs with one member less: one more loss stops automatic failover or "
            "the center",
            "check the member's power, its HA network link and its HA agent",
            level=Level.NOTICE,
            per_cluster=False,
        ),
    )
}
HA_RULE_NAMES = frozenset(HA_RULES)
RULES.update(HA_RULES)


def ha_findings(status: HAStatus) -> list[Finding]:
    """The findings of one HA status."""
    out: list[Finding] = []
    trio = status.cluster_id
    if status.rpo.kind is not RPOKind.IN_SYNC:
        out.append(
            Finding("aoc_unprotected", "", KIND, trio, detail=status.rpo.text, notify_change=True)
        )
    if not status.automatic_failover:
        why = status.failover_note or "the status gives no reason"
        out.append(Finding("aoc_failover_off", "", KIND, trio, detail=why))
    for m in status.members:
        if not m.reachable:
            why = f"the {m.role} at {m.ha_ip} is unreachable"
            out.append(Finding("aoc_member_unreachable", "", KIND, m.name, detail=why))
    return out


def source(read: Callable[[], HAStatus | None]) -> Callable[[], list[Finding] | None]:
    """``Alerting.external`` over ``read`` (the last status, ``None`` when unknown)."""

    def findings() -> list[Finding] | None:
        status = read()
        return None if status is None else ha_findings(status)

    return findings
