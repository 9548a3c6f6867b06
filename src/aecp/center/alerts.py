"""Alerts: the rules and their levels, the evaluation that opens, updates and resolves alerts
from what the center already knows, the store of alerts, and the loop that runs it all.

A pass reads a snapshot (``observe``: the clusters' sync states, the inventory's nodes, VMs and
volumes, the failed tasks, the center's own disk), turns it into findings, and hands them with
the open alerts and the rule settings to ``evaluate``, a pure function that returns decisions:
``Open`` (a cause with no open alert), ``Update`` (an open alert whose level, value or cause
changed) and ``Resolve`` (an open alert whose cause is gone or whose rule is disabled). The
decisions are applied in one transaction together with their notifications
(``center.notify.enqueue``): a notification when an alert opens (``opened``), when its level
rises (``escalated``), and when it resolves (``resolved``); and, for a finding that names a
state (``Finding.notify_change``: the HA trio's RPO), when its words change other than in their
numbers (``changed``: ``degraded`` to ``no standby``, not ``12 s behind`` to ``14 s behind``).

One open alert per cause (rule, cluster, object kind, object name): ``evaluate`` never opens a
second, and the ``open_key`` column, unique, makes the database refuse one.

Levels: info < notice < critical. A state rule has one level; a threshold rule takes the
highest level whose threshold the value reaches, and an open one falls back only when the value
is ``CLEAR_MARGIN`` points below (so a value at the edge does not open and resolve in turn). A
threshold rule whose value cannot be read (an unreachable node reports no usage) keeps its open
alert as it is and opens none.

Settings: every rule ships with defaults (``RULES``); the organization may change a rule
(enabled, level or thresholds, ``alert_rules``), and each cluster may change it again
(``alert_rule_overrides``); a field not set keeps the layer below. Disabling a rule resolves its
open alerts.

``task_failed`` is one alert per failed task (of the last ``TASK_WINDOW_S``). It resolves when a
task on the same cluster and target created after it succeeds, when someone acknowledges it,
or when the task is older than the window; a resolved one is never opened again.

The loop (``Alerting``) evaluates every ``every_s`` seconds; the outbox delivers in a task of
its own (``notify.Outbox.run``), so a receiver that is slow or dead never holds up an
evaluation. Several centers may share the database: a pass that loses a race to open an alert
(the ``open_key`` refuses its second) decides again over what is stored now. Retention: the
loop deletes resolved alerts older than ``KEEP_RESOLVED_S`` (and the outbox's sent messages
older than ``notify.KEEP_SENT_S``), ``PRUNE_BATCH`` rows at a time.
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
import shutil
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

from pydantic import BaseModel, Field
from sqlalchemy import delete, func, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session as DB
from sqlalchemy.orm import sessionmaker

from aecp.center import notify
from aecp.center.alertrules import LEVEL_ORDER as LEVEL_ORDER  # re-exported
from aecp.center.alertrules import RULES as RULES
from aecp.center.alertrules import Level as Level
from aecp.center.alertrules import RuleSpec as RuleSpec
from aecp.center.alertrules import Thresholds as Thresholds
from aecp.center.db.models import (
    Alert,
    AlertRuleOverride,
    AlertRuleSetting,
    Cluster,
    ClusterSync,
    InventoryObject,
    Task,
)
from aecp.common.clock import SYSTEM_CLOCK, Clock
from aecp.common.errors import InvalidInput, InvalidState, NotFound
from aecp.common.tasks import cancel, spawn

log = logging.getLogger(__name__)
CLEAR_MARGIN = 2.0  # percentage points below a threshold before an open alert falls back
TASK_WINDOW_S = 7 * 24 * 3600.0  # failed tasks older than this are not alerted on
KEEP_RESOLVED_S = 90 * 86400.0  # resolved alerts are deleted after this (retention)
PRUNE_BATCH = 500  # rows deleted in one transaction, per table
PRUNE_EVERY_S = 3600.0  # between two retention runs (at once again while batches are full)
DECIDE_TRIES = 3  # a pass that loses a race to another center decides again, this often
_NUMBER = re.compile(r"\d+(?:\.\d+)?")


class AlertSettings(BaseModel):
    """How the alert loop runs."""

    every_s: float = Field(10.0, gt=0, description="seconds between two evaluations")
    cluster_grace_s: float = Field(
        60.0, ge=0, description="how long a cluster fails to answer before its alert opens"
    )
    allow_private_webhooks: bool = Field(
        False,
        description="let webhooks point at loopback, link-local or metadata addresses (tests "
        "and labs with receivers on loopback); off, such a URL is refused (422)",
    )


@dataclass(frozen=True)
class Setting:
    """What one layer of settings says of a rule; ``None``: what the layer below says."""

    enabled: bool | None = None
    level: Level | None = None
    thresholds: Thresholds | None = None


@dataclass(frozen=True)
class Rule:
    """A rule in force, for one cluster (or the organization)."""

    name: str
    enabled: bool
    level: Level | None
    thresholds: Thresholds

    def level_of(self, value: float | None, current: Level | None) -> Level | None:
        """The level of a finding (``None``: it does not fire); ``current``: the level of
        its open alert, if there is one."""
        if not self.thresholds:
            return self.level
        if value is None:
            return None
        for level, at in sorted(self.thresholds, key=lambda t: -t[0].rank):
            if current is not None and level.rank <= current.rank:
                at -= CLEAR_MARGIN
            if value >= at:
                return level
        return None


class RuleBook:
    """Every rule's settings: shipped defaults, the organization's, each cluster's."""

    def __init__(
        self,
        settings: Mapping[str, Setting] | None = None,
        overrides: Mapping[tuple[str, str], Setting] | None = None,
    ) -> None:
        self.settings = dict(settings or {})
        self.overrides = dict(overrides or {})  # (cluster, rule)

    def rule(self, name: str, cluster: str = "") -> Rule:
        spec = RULES[name]
        enabled, level, thresholds = True, spec.level, spec.thresholds
        layers = [self.settings.get(name)]
        if spec.per_cluster and cluster:
            layers.append(self.overrides.get((cluster, name)))
        for s in layers:
            if s is None:
                continue
            enabled = s.enabled if s.enabled is not None else enabled
            if s.level is not None and spec.level is not None:
                level = s.level
            if s.thresholds is not None and spec.thresholds:
                thresholds = s.thresholds
        return Rule(name, enabled, level, thresholds)


# ---- evaluation -------------------------------------------------------------------------------
class Key(NamedTuple):
    """The cause an alert is about."""

    rule: str
    cluster: str
    kind: str
    name: str

    def text(self) -> str:
        return "|".join(self)


@dataclass(frozen=True)
class Finding:
    """What a pass saw: the cause of ``rule`` on an object, with a value (a percentage, for a
    threshold rule; ``None`` there: it could not be read). ``notify_change``: the detail names
    a state the cause goes through while its alert stays open (the RPO: degraded, no standby,
    unknown), and each change of state notifies; a change of a number alone does not."""

    rule: str
    cluster: str
    kind: str
    name: str
    value: float | None = None
    detail: str = ""
    notify_change: bool = False

    @property
    def key(self) -> Key:
        return Key(self.rule, self.cluster, self.kind, self.name)


@dataclass(frozen=True)
class OpenAlert:
    id: int
    key: Key
    level: Level
    value: float | None
    cause: str


@dataclass(frozen=True)
class Open:
    key: Key
    level: Level
    value: float | None
    cause: str
    impact: str
    action: str

    def sentence(self) -> str:
        return f"{self.cause} ({self.level}): an alert opens"


@dataclass(frozen=True)
class Update:
    """An open alert's new level, value or cause. ``escalated``: its level rose;
    ``changed``: its cause names another state (``Finding.notify_change``). Either notifies."""

    id: int
    key: Key
    level: Level
    value: float | None
    cause: str
    escalated: bool
    changed: bool = False

    @property
    def event(self) -> str | None:
        """The notification it sends: ``escalated``, ``changed`` or none."""
        return "escalated" if self.escalated else "changed" if self.changed else None

    def sentence(self) -> str:
        why = (
            ", its level rose" if self.escalated else ", its state changed" if self.changed else ""
        )
        return f"alert {self.id}: {self.cause} ({self.level}){why}: updated"


@dataclass(frozen=True)
class Resolve:
    id: int
    key: Key
    why: str

    def sentence(self) -> str:
        return f"alert {self.id} ({self.key.rule} on {self.key.kind} {self.key.name}): " + (
            f"{self.why}: resolved"
        )


Decision = Open | Update | Resolve


def evaluate(
    findings: Iterable[Finding],
    open_alerts: Iterable[OpenAlert],
    book: RuleBook,
    settled: frozenset[Key] = frozenset(),
) -> list[Decision]:
    """The decisions of one pass. ``settled``: causes of one-shot rules resolved already,
    which never open again."""
    opened = {a.key: a for a in open_alerts}
    firing: dict[Key, tuple[Finding, Level]] = {}
    unknown: set[Key] = set()
    for f in findings:
        if f.rule not in RULES:
            continue
        rule = book.rule(f.rule, f.cluster)
        if not rule.enabled:
            continue
        if rule.thresholds and f.value is None:
            unknown.add(f.key)
            continue
        current = opened[f.key].level if f.key in opened else None
        level = rule.level_of(f.value, current)
        seen = firing.get(f.key)
        if level is not None and (seen is None or level.rank > seen[1].rank):
            firing[f.key] = (f, level)
    decisions: list[Decision] = []
    for key, (f, level) in firing.items():
        decisions += _fires(f, level, opened.get(key), settled)
    for key, a in opened.items():
        if key not in firing and key not in unknown:
            decisions.append(Resolve(a.id, key, _why_resolved(key, book)))
    return decisions


def _fires(
    f: Finding, level: Level, a: OpenAlert | None, settled: frozenset[Key]
) -> list[Decision]:
    cause, impact, action = RULES[f.rule].words(f.cluster, f.name, f.value, f.detail)
    if a is None:
        return [] if f.key in settled else [Open(f.key, level, f.value, cause, impact, action)]
    if (a.level, a.value, a.cause) == (level, f.value, cause):
        return []
    changed = f.notify_change and _shape(cause) != _shape(a.cause)
    return [Update(a.id, a.key, level, f.value, cause, level.rank > a.level.rank, changed)]


def _shape(words: str) -> str:
    """``words`` with every number made ``#``: what stays when only a figure moves."""
    return _NUMBER.sub("#", words)


def _why_resolved(key: Key, book: RuleBook) -> str:
    if key.rule not in RULES:
        return "its rule no longer exists"
    if not book.rule(key.rule, key.cluster).enabled:
        return "its rule is disabled"
    return "its cause is gone"


# ---- observation: what the center's database and disk say ------------------------------------
def node_findings(cluster: str, name: str, data: Mapping[str, Any]) -> list[Finding]:
    out = []
    state = str(data.get("state", ""))
    usage, capacity = data.get("usage"), data.get("capacity")
    if state == "unreachable":
        out.append(Finding("node_unreachable", cluster, "node", name))
    elif state != "ready":
        why = f"its state is {state}" if state else "it shows no state"
        out.append(Finding("node_trouble", cluster, "node", name, detail=why))
    elif not isinstance(usage, dict):
        why = "it reports no usage although it is ready"
        out.append(Finding("node_trouble", cluster, "node", name, detail=why))
    disk = _percent(usage, "disk_used_bytes", capacity, "disk_bytes")
    # memory: what VMs hold of what the node offers (a node may offer less than its host
    # has, so the host's own use says nothing of room for VMs)
    memory = _percent(data, "reserved_memory_mib", capacity, "memory_mib")
    out.append(Finding("node_storage_use", cluster, "node", name, disk))
    out.append(Finding("node_memory_use", cluster, "node", name, memory))
    return out


def _percent(usage: Any, used: str, capacity: Any, total: str) -> float | None:
    if not isinstance(usage, dict) or not isinstance(capacity, dict):
        return None
    u, t = usage.get(used), capacity.get(total)
    if not isinstance(u, int | float) or not isinstance(t, int | float) or t <= 0:
        return None
    return round(100.0 * u / t, 1)


def vm_findings(cluster: str, name: str, data: Mapping[str, Any]) -> list[Finding]:
    state, message = data.get("state"), str(data.get("message") or "")
    if state == "unknown":
        why = message or f"node {data.get('node')} is unreachable"
        return [Finding("vm_unknown", cluster, "vm", name, detail=why)]
    if state == "error":
        return [Finding("vm_failed", cluster, "vm", name, detail=message or "no message")]
    return []


def volume_findings(cluster: str, name: str, data: Mapping[str, Any]) -> list[Finding]:
    """Recovering if any extent is being copied (``volume_recovering``), else degraded if its
    health says so (``volume_degraded``): one of the two at a time."""
    extents = [e for e in data.get("extents") or [] if isinstance(e, dict)]
    copying = sum(1 for e in extents if e.get("recovery"))
    if copying or data.get("health") == "recovering":
        why = f": {copying} extents being copied" if copying else ""
        return [Finding("volume_recovering", cluster, "volume", name, detail=why)]
    if data.get("health") == "degraded":
        short = sum(1 for e in extents if e.get("healthy") is False)
        why = f": {short} extents short of replicas" if short else ""
        return [Finding("volume_degraded", cluster, "volume", name, detail=why)]
    return []


OBJECT_FINDINGS: dict[str, Callable[[str, str, Mapping[str, Any]], list[Finding]]] = {
    "node": node_findings,
    "vm": vm_findings,
    "volume": volume_findings,
}


def observe(db: DB, now: float, center_disk: float | None, grace_s: float) -> list[Finding]:
    """Every finding of one pass, from the database (and the center's disk use, read apart)."""
    out: list[Finding] = []
    for sync in db.scalars(select(ClusterSync)):
        if sync.state == "unreachable" and now - sync.last_sync_at >= grace_s:
            why = sync.error or "no answer"
            out.append(
                Finding("cluster_unreachable", sync.cluster, "cluster", sync.cluster, None, why)
            )
    rows = db.execute(
        select(
            InventoryObject.cluster,
            InventoryObject.kind,
            InventoryObject.name,
            InventoryObject.data,
        ).where(InventoryObject.kind.in_(tuple(OBJECT_FINDINGS)))
    )
    for cluster, kind, name, raw in rows:
        try:
            data = json.loads(raw)
        except ValueError:
            continue
        if isinstance(data, dict):
            out += OBJECT_FINDINGS[kind](cluster, name, data)
    out += task_findings(db, now)
    out.append(Finding("aoc_disk_use", "", "center", "data", center_disk))
    return out


def task_findings(db: DB, now: float) -> list[Finding]:
    """One per task failed in the last ``TASK_WINDOW_S``, unless a task on the same cluster
    and target, created after it, has succeeded."""
    failed = db.execute(
        select(Task.id, Task.cluster, Task.kind, Task.target, Task.error, Task.created_at).where(
            Task.state == "failed", Task.finished_at >= now - TASK_WINDOW_S
        )
    ).all()
    if not failed:
        return []
    later = db.execute(
        select(Task.cluster, Task.target, func.max(Task.created_at))
        .where(Task.state == "succeeded", Task.target.in_(sorted({t.target for t in failed})))
        .group_by(Task.cluster, Task.target)
    ).all()
    succeeded = {(c, t): at for c, t, at in later}
    return [
        Finding("task_failed", t.cluster, "task", t.id, detail=f"{t.kind} {t.target}: {t.error}")
        for t in failed
        if succeeded.get((t.cluster, t.target), float("-inf")) <= t.created_at
    ]


def disk_percent(path: Path, usage: Callable[[Path], Any] = shutil.disk_usage) -> float | None:
    """How full the disk holding ``path`` is, as ``df`` counts it (``None``: unreadable)."""
    try:
        u = usage(path)
    except OSError as exc:
        log.warning("alerts: the disk use of %s cannot be read: %s", path, exc)
        return None
    seen = u.used + u.free
    return round(100.0 * u.used / seen, 1) if seen else None


# ---- the store --------------------------------------------------------------------------------
def book(db: DB) -> RuleBook:
    settings = {r.name: _setting(r) for r in db.scalars(select(AlertRuleSetting))}
    overrides = {(r.cluster, r.rule): _setting(r) for r in db.scalars(select(AlertRuleOverride))}
    return RuleBook(settings, overrides)


def _setting(row: AlertRuleSetting | AlertRuleOverride) -> Setting:
    level = Level(row.level) if row.level in LEVEL_ORDER else None
    thresholds = None
    if row.thresholds:
        pairs = json.loads(row.thresholds).items()
        thresholds = tuple(sorted(((Level(k), float(v)) for k, v in pairs), key=_by_rank))
    return Setting(row.enabled, level, thresholds)


def _by_rank(t: tuple[Level, float]) -> int:
    return t[0].rank


def open_alerts(db: DB) -> list[OpenAlert]:
    return [
        OpenAlert(
            a.id,
            Key(a.rule, a.cluster, a.object_kind, a.object_name),
            Level(a.level),
            a.value,
            a.cause,
        )
        for a in db.scalars(select(Alert).where(Alert.state == "open"))
    ]


def settled_keys(db: DB, findings: Iterable[Finding]) -> frozenset[Key]:
    """The causes among ``findings`` of one-shot rules that were alerted and resolved."""
    wanted = {f.key for f in findings if f.rule in RULES and RULES[f.rule].one_shot}
    if not wanted:
        return frozenset()
    rows = db.execute(
        select(Alert.rule, Alert.cluster, Alert.object_kind, Alert.object_name).where(
            Alert.state == "resolved",
            Alert.rule.in_(sorted({k.rule for k in wanted})),
            Alert.object_name.in_(sorted({k.name for k in wanted})),
        )
    )
    return frozenset(Key(*r) for r in rows) & wanted


def apply(db: DB, decisions: Iterable[Decision], now: float) -> None:
    """Carry out ``decisions`` and write their notifications, in unit of work ``db``. An
    alert that is no longer open (acknowledged meanwhile) is left as it is."""
    for d in decisions:
        if isinstance(d, Open):
            a = Alert(
                rule=d.key.rule,
                level=d.level.value,
                cluster=d.key.cluster,
                object_kind=d.key.kind,
                object_name=d.key.name,
                state="open",
                open_key=d.key.text(),
                opened_at=now,
                updated_at=now,
                resolved_at=0.0,
                value=d.value,
                cause=d.cause,
                impact=d.impact,
                action=d.action,
                resolution="",
            )
            db.add(a)
            db.flush()  # its id, for the notifications
            notify.enqueue(db, a, "opened", now)
            continue
        found = db.get(Alert, d.id)
        if found is None or found.state != "open":
            continue
        if isinstance(d, Update):
            found.level, found.value, found.cause = d.level.value, d.value, d.cause
            found.updated_at = now
            if d.event is not None:
                notify.enqueue(db, found, d.event, now)
        else:
            resolve(db, found, d.why, now)


def prune(db: DB, before: float, limit: int) -> int:
    """Delete up to ``limit`` alerts resolved before ``before``, oldest first; returns how
    many. (A failed task's alert is past its window long before: it cannot open again.)"""
    ids = list(
        db.scalars(
            select(Alert.id)
            .where(Alert.state == "resolved", Alert.resolved_at < before)
            .order_by(Alert.id)
            .limit(limit)
        )
    )
    if ids:
        db.execute(delete(Alert).where(Alert.id.in_(ids)))
    return len(ids)


def resolve(db: DB, a: Alert, why: str, now: float) -> None:
    a.state, a.open_key, a.resolved_at, a.updated_at, a.resolution = "resolved", None, now, now, why
    notify.enqueue(db, a, "resolved", now)


def alerts(
    db: DB,
    state: str | None = None,
    cluster: str | None = None,
    level: str | None = None,
    limit: int = 100,
    offset: int = 0,
) -> list[Alert]:
    """Newest first."""
    q = select(Alert).order_by(Alert.opened_at.desc(), Alert.id.desc())
    if state is not None:
        q = q.where(Alert.state == state)
    if cluster is not None:
        q = q.where(Alert.cluster == cluster)
    if level is not None:
        q = q.where(Alert.level == level)
    return list(db.scalars(q.limit(limit).offset(offset)))


def alert(db: DB, ident: int) -> Alert:
    found = db.get(Alert, ident)
    if found is None:
        raise NotFound(f"alert {ident} does not exist", alert=ident)
    return found


def acknowledge(db: DB, ident: int, user: str, now: float) -> Alert:
    """Resolve an open alert of a one-shot rule (a failed task): it is handled."""
    a = alert(db, ident)
    if a.state != "open":
        raise InvalidState(f"alert {ident} is resolved already", alert=ident)
    if a.rule not in RULES or not RULES[a.rule].one_shot:
        raise InvalidState(
            f"alert {ident} ({a.rule}) resolves by itself when its cause is gone", alert=ident
        )
    resolve(db, a, f"acknowledged by {user}", now)
    return a


# ---- rule settings ----------------------------------------------------------------------------
def spec(name: str) -> RuleSpec:
    found = RULES.get(name)
    if found is None:
        raise NotFound(f"alert rule {name} does not exist", rule=name)
    return found


def check_setting(name: str, s: Setting) -> Setting:
    """``s`` if it fits rule ``name`` (``InvalidInput`` naming the field at fault)."""
    rs = spec(name)
    if s.level is not None and not rs.level:
        raise InvalidInput("level", f"rule {name} takes its level from its thresholds")
    if s.thresholds is not None:
        if not rs.thresholds:
            raise InvalidInput("thresholds", f"rule {name} has no thresholds: set its level")
        values = [at for _, at in sorted(s.thresholds, key=_by_rank)]
        if not values or any(not 0 < v <= 100 for v in values):
            raise InvalidInput("thresholds", "give one or more levels, each a percent in (0, 100]")
        if values != sorted(set(values)):
            raise InvalidInput("thresholds", "a higher level needs a higher threshold")
    return Setting(
        s.enabled, s.level, tuple(sorted(s.thresholds, key=_by_rank)) if s.thresholds else None
    )


def set_rule(db: DB, name: str, changes: Mapping[str, Any], now: float) -> None:
    """Change the organization's setting of rule ``name``: the fields in ``changes`` (a value
    of ``None``: back to the default)."""
    row = db.get(AlertRuleSetting, name)
    old = _setting(row) if row is not None else Setting()
    merged = Setting(
        changes.get("enabled", old.enabled),
        changes.get("level", old.level),
        changes.get("thresholds", old.thresholds),
    )
    checked = check_setting(name, merged)
    if row is None:
        row = AlertRuleSetting(name=name)
        db.add(row)
    _store(row, checked, now)


def set_override(db: DB, cluster: str, name: str, s: Setting, now: float) -> None:
    """Set (replace) cluster ``cluster``'s setting of rule ``name``."""
    if db.get(Cluster, cluster) is None:
        raise NotFound(f"cluster {cluster} does not exist", cluster=cluster)
    checked = check_setting(name, s)
    if not RULES[name].per_cluster:
        raise InvalidInput("name", f"rule {name} watches the center itself: no cluster sets it")
    row = db.get(AlertRuleOverride, (cluster, name))
    if row is None:
        row = AlertRuleOverride(cluster=cluster, rule=name)
        db.add(row)
    _store(row, checked, now)


def delete_override(db: DB, cluster: str, name: str) -> None:
    spec(name)
    row = db.get(AlertRuleOverride, (cluster, name))
    if row is None:
        raise NotFound(f"cluster {cluster} has no setting of rule {name}", cluster=cluster)
    db.delete(row)


def _store(row: AlertRuleSetting | AlertRuleOverride, s: Setting, now: float) -> None:
    row.enabled = s.enabled
    row.level = s.level.value if s.level is not None else None
    row.thresholds = (
        json.dumps({lv.value: at for lv, at in s.thresholds}) if s.thresholds is not None else None
    )
    row.updated_at = now


def overrides(db: DB, cluster: str | None = None) -> dict[tuple[str, str], Setting]:
    q = select(AlertRuleOverride)
    if cluster is not None:
        q = q.where(AlertRuleOverride.cluster == cluster)
    return {(r.cluster, r.rule): _setting(r) for r in db.scalars(q)}


# ---- the loop ---------------------------------------------------------------------------------
@dataclass
class Alerting:
    """The center's alert loop: every ``settings.every_s`` seconds, one evaluation (and, when
    due, a batch of retention); beside it, the outbox's own delivery loop, woken when an
    evaluation writes messages. Neither waits for the other, and neither ever stops: a pass
    that fails is logged and the next one runs. The database is read and written in threads,
    never on the event loop."""

    sessions: sessionmaker[DB]
    data_dir: Path
    outbox: notify.Outbox
    clock: Clock = SYSTEM_CLOCK
    settings: AlertSettings = field(default_factory=AlertSettings)
    disk_usage: Callable[[Path], Any] = shutil.disk_usage
    # findings the database does not hold (the HA trio's, ``center.ha.findings``); ``None``
    # from it: not known now, and the open alerts of ``external_rules`` are kept as they are
    external: Callable[[], list[Finding] | None] | None = None
    external_rules: frozenset[str] = frozenset()
    passes: int = field(default=0, init=False)  # evaluations run so far
    _tasks: list[asyncio.Task[None]] = field(default_factory=list, init=False, repr=False)
    _passed: asyncio.Condition = field(default_factory=asyncio.Condition, init=False, repr=False)
    _prune_at: float = field(default=0.0, init=False, repr=False)

    def start(self) -> None:
        if any(not t.done() for t in self._tasks):
            return
        self._tasks = [
            spawn(self._run(), name="alerts"),
            spawn(self.outbox.run(), name="alert-delivery"),
        ]

    async def close(self) -> None:
        await cancel(*self._tasks)
        self._tasks = []
        await self.outbox.aclose()

    async def _run(self) -> None:
        while True:
            await self.evaluate_pass()
            await self.clock.sleep(self.settings.every_s)

    async def until_passes(self, count: int) -> None:
        """Return once ``count`` evaluations have run."""
        async with self._passed:
            await self._passed.wait_for(lambda: self.passes >= count)

    async def evaluate_pass(self) -> list[str]:
        """One evaluation, then retention if due; the sentences of the decisions taken. Never
        raises: a failure is logged."""
        sentences: list[str] = []
        try:
            sentences = await self.evaluate()
        except Exception:
            log.exception("alerts: this evaluation failed; the next runs as usual")
        try:
            await self.prune()
        except Exception:
            log.exception("alerts: this retention run failed; the next runs as usual")
        async with self._passed:
            self.passes += 1
            self._passed.notify_all()
        return sentences

    async def pass_once(self) -> list[str]:
        """One evaluation, then one delivery pass awaited to its end (the loop runs the two
        apart; this is for the tests and tools)."""
        sentences = await self.evaluate_pass()
        try:
            await self.outbox.deliver_due()
        except Exception:
            log.exception("alerts: this delivery pass failed; the next runs as usual")
        return sentences

    async def evaluate(self) -> list[str]:
        disk = await asyncio.to_thread(disk_percent, self.data_dir, self.disk_usage)
        now = self.clock.wall()
        for attempt in range(1, DECIDE_TRIES + 1):
            decisions = await asyncio.to_thread(self._decide, now, disk)
            if not decisions:
                break
            try:
                await asyncio.to_thread(self._apply, decisions, now)
                break
            except IntegrityError:
                if attempt == DECIDE_TRIES:
                    raise
                log.info("alerts: another center changed the alerts meanwhile: deciding again")
        if decisions:
            self.outbox.wake()
        sentences = [d.sentence() for d in decisions]
        for s in sentences:
            log.info("alerts: %s", s)
        return sentences

    def _decide(self, now: float, disk: float | None) -> list[Decision]:
        extra = self.external() if self.external is not None else []
        held = self.external_rules if extra is None else frozenset()
        with self.sessions() as db:
            findings = observe(db, now, disk, self.settings.cluster_grace_s) + (extra or [])
            decisions = evaluate(findings, open_alerts(db), book(db), settled_keys(db, findings))
        return [d for d in decisions if not (isinstance(d, Resolve) and d.key.rule in held)]

    def _apply(self, decisions: list[Decision], now: float) -> None:
        with self.sessions.begin() as db:
            apply(db, decisions, now)

    async def prune(self) -> None:
        """Retention, every ``PRUNE_EVERY_S`` (at the next pass again while a batch is full)."""
        now = self.clock.wall()
        if now < self._prune_at:
            return
        full = await asyncio.to_thread(self._prune, now)
        self._prune_at = now if full else now + PRUNE_EVERY_S

    def _prune(self, now: float) -> bool:
        with self.sessions.begin() as db:
            messages = notify.prune(db, now - notify.KEEP_SENT_S, PRUNE_BATCH)
        with self.sessions.begin() as db:
            resolved = prune(db, now - KEEP_RESOLVED_S, PRUNE_BATCH)
        if messages or resolved:
            log.info(
                "alerts: retention deleted %d old messages and %d old resolved alerts",
                messages,
                resolved,
            )
        return PRUNE_BATCH in (messages, resolved)
