"""``/v1/alerts``, ``/v1/alert-rules`` and ``/v1/notifiers``: the alerts (open and resolved),
the rules they come from with the organization's and each cluster's settings, and where they
are sent (``center.alerts``, ``center.notify``). A notifier's password is taken, never shown;
a webhook's URL is shown as ``scheme://host[:port]/…`` only (its path and query often hold a
token)."""

from __future__ import annotations

import json
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Depends, Path, Query, Request, status
from fastapi.concurrency import run_in_threadpool
from pydantic import BaseModel, ConfigDict, Field
from sqlalchemy import func, select
from sqlalchemy.orm import Session as DB

from aecp.center import alerts, notify
from aecp.center.accounts import Caller
from aecp.center.alerts import AlertSettings, Level, Rule, Setting
from aecp.center.api.deps import (
    CenterRoute,
    UnitOfWork,
    audited,
    bearer,
    center,
    needs,
    outcome,
    record_apart,
)
from aecp.center.db.models import Alert, Cluster, Notification, Notifier
from aecp.center.secrets import SecretBox
from aecp.common.apierrors import error_responses
from aecp.common.errors import AecpError, NotFound
from aecp.model.base import Name

router = APIRouter(
    prefix="/v1", tags=["alerts"], dependencies=[Depends(bearer)], route_class=CenterRoute
)
MayRead = Annotated[Caller, Depends(needs("alert.read"))]
MayWrite = Annotated[Caller, Depends(needs("alert.write"))]
MAX_ID = 2**62
MAX_OFFSET = 1_000_000
Ident = Annotated[int, Path(ge=1, le=MAX_ID)]
RuleName = Annotated[str, Path(max_length=64)]
ClusterName = Annotated[str, Path(max_length=64)]
Percent = Annotated[float, Field(gt=0, le=100)]


class ObjectRef(BaseModel):
    kind: str = Field(description="cluster, node, vm, volume, task, or center")
    name: str


class AlertPublic(BaseModel):
    id: int
    rule: str
    level: Level
    cluster: str = Field(description='"" for an alert of the center itself')
    object: ObjectRef
    state: Literal["open", "resolved"]
    opened_at: float = Field(description="when it was triggered")
    updated_at: float = Field(description="the last change of its level, value or cause")
    resolved_at: float = Field(description="0: open")
    duration_s: float = Field(description="from its trigger to its resolution, or to now")
    value: float | None = Field(description="the value measured (a percent), if the rule has one")
    cause: str
    impact: str
    action: str = Field(description="what to do")
    resolution: str = Field(description="why it was resolved")

    @classmethod
    def of(cls, a: Alert, now: float) -> AlertPublic:
        return cls.model_validate(notify.alert_document(a, now))


class SettingPublic(BaseModel):
    enabled: bool | None = Field(None, description="null: as the layer below")
    level: Level | None = Field(None, description="null: as the layer below")
    thresholds: dict[Level, float] | None = Field(None, description="null: as the layer below")

    @classmethod
    def of(cls, s: Setting) -> SettingPublic:
        return cls(enabled=s.enabled, level=s.level, thresholds=_thresholds(s.thresholds))


class ClusterSetting(SettingPublic):
    cluster: str


class RulePublic(BaseModel):
    name: str
    object_kind: str
    title: str
    per_cluster: bool = Field(description="whether a cluster may change it")
    enabled: bool
    level: Level | None = Field(description="a state rule's level (null: it has thresholds)")
    thresholds: dict[Level, float] | None = Field(
        description="a threshold rule's percent per level (null: it has one level)"
    )
    defaults: SettingPublic = Field(description="as shipped")
    overrides: list[ClusterSetting] = Field(description="the clusters' own settings")

    @classmethod
    def of(cls, rule: Rule, overrides: dict[tuple[str, str], Setting]) -> RulePublic:
        spec = alerts.RULES[rule.name]
        return cls(
            name=rule.name,
            object_kind=spec.kind,
            title=spec.title,
            per_cluster=spec.per_cluster,
            enabled=rule.enabled,
            level=rule.level,
            thresholds=_thresholds(rule.thresholds or None),
            defaults=SettingPublic.of(Setting(True, spec.level, spec.thresholds or None)),
            overrides=[
                ClusterSetting(cluster=c, **SettingPublic.of(s).model_dump())
                for (c, name), s in sorted(overrides.items())
                if name == rule.name
            ],
        )


def _thresholds(t: alerts.Thresholds | None) -> dict[Level, float] | None:
    return dict(t) if t is not None else None


class RuleUpdate(BaseModel):
    """The fields given change; a field given as null goes back to the default."""

    model_config = ConfigDict(extra="forbid")
    enabled: bool | None = None
    level: Level | None = Field(None, description="a state rule's level")
    thresholds: dict[Level, Percent] | None = Field(
        None, description='a threshold rule\'s percent per level, e.g. {"notice": 80}'
    )

    def setting(self) -> Setting:
        return Setting(self.enabled, self.level, _pairs(self.thresholds))


def _pairs(t: dict[Level, float] | None) -> alerts.Thresholds | None:
    return tuple(t.items()) if t is not None else None


class NotifierCreate(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: Name
    kind: Literal["webhook", "smtp"]
    min_level: Level = Field(Level.INFO, description="the lowest level it is sent")
    url: str = Field(
        "",
        max_length=2048,
        description="webhook: the http(s) URL POSTed to (kept encrypted; shown as "
        "scheme://host[:port]/… only). Not a loopback or link-local address unless the center "
        "allows private webhooks",
    )
    host: str = Field("", max_length=253, description="smtp: the server")
    port: int = Field(25, ge=1, le=65535, description="smtp: the server's port")
    sender: str = Field("", max_length=254, description="smtp: the From address")
    recipients: list[Annotated[str, Field(max_length=254)]] = Field(
        default_factory=list, max_length=20, description="smtp: the To addresses"
    )
    starttls: bool = Field(False, description="smtp: STARTTLS before anything else")
    user: str = Field("", max_length=256, description="smtp: log in as this user (needs starttls)")
    password: str = Field(
        "", max_length=1024, description="smtp: its password (kept encrypted, never shown)"
    )

    def spec(self) -> notify.NotifierSpec:
        return notify.NotifierSpec(
            name=self.name,
            kind=self.kind,
            min_level=self.min_level.value,
            url=self.url,
            host=self.host,
            port=self.port,
            sender=self.sender,
            recipients=tuple(self.recipients),
            starttls=self.starttls,
            user=self.user,
            password=self.password,
        )


class NotifierPublic(BaseModel):
    id: int
    name: str
    kind: str
    min_level: Level
    url: str = Field("", description="webhook: scheme://host[:port]/… (the rest is secret)")
    host: str = ""
    port: int | None = None
    sender: str = ""
    recipients: list[str] = []
    starttls: bool = False
    user: str = ""
    password_set: bool = Field(False, description="whether it has a password (never shown)")
    created_at: float
    pending: int = Field(0, description="messages waiting to be sent")
    failed: int = Field(0, description="messages given up after every retry")
    last_error: str = Field("", description="why the last failed attempt failed")

    @classmethod
    def of(cls, n: Notifier, counts: dict[str, int], last_error: str) -> NotifierPublic:
        config: dict[str, Any] = json.loads(n.config)  # never the secret: it is apart
        if "url" in config:  # an older center's whole URL, not sealed yet, shown cut too
            config["url"] = notify.shown_url(str(config["url"]))
        return cls(
            id=n.id,
            name=n.name,
            kind=n.kind,
            min_level=Level(n.min_level),
            created_at=n.created_at,
            password_set=bool(n.secret_encrypted),
            pending=counts.get("pending", 0),
            failed=counts.get("failed", 0),
            last_error=last_error,
            **config,
        )


class TestResult(BaseModel):
    delivered: bool
    error: str = Field("", description="why the receiver did not take it, in short")


def box(request: Request) -> SecretBox:
    b: SecretBox = request.app.state.registry.box
    return b


def alert_settings(request: Request) -> AlertSettings:
    found: AlertSettings | None = getattr(request.app.state, "alert_settings", None)
    return found if found is not None else AlertSettings()


# ---- alerts -----------------------------------------------------------------------------------
@router.get("/alerts", operation_id="list_alerts", responses=error_responses(401, 403, 422))
def list_alerts(
    request: Request,
    db: UnitOfWork,
    who: MayRead,
    state: Literal["open", "resolved"] | None = None,
    cluster: Annotated[str | None, Query(max_length=64)] = None,
    level: Level | None = None,
    limit: Annotated[int, Query(ge=1, le=1000)] = 100,
    offset: Annotated[int, Query(ge=0, le=MAX_OFFSET)] = 0,
) -> list[AlertPublic]:
    """Newest first (by trigger time)."""
    now = center(request).clock.wall()
    found = alerts.alerts(db, state, cluster, level.value if level else None, limit, offset)
    return [AlertPublic.of(a, now) for a in found]


@router.get("/alerts/{id}", operation_id="get_alert", responses=error_responses(401, 403, 404, 422))
def get_alert(id: Ident, request: Request, db: UnitOfWork, who: MayRead) -> AlertPublic:
    return AlertPublic.of(alerts.alert(db, id), center(request).clock.wall())


@router.post(
    "/alerts/{id}/acknowledge",
    operation_id="acknowledge_alert",
    responses=error_responses(401, 403, 404, 409, 422),
)
def acknowledge_alert(id: Ident, request: Request, db: UnitOfWork, who: MayWrite) -> AlertPublic:
    """Resolve an open alert of a failed task: it is handled (other alerts resolve by
    themselves when their cause is gone: 409)."""
    now = center(request).clock.wall()
    a: Alert = audited(
        request,
        who.user,
        "alert.acknowledge",
        str(id),
        {},
        lambda: alerts.acknowledge(db, id, who.user, now),
    )
    return AlertPublic.of(a, now)


# ---- rules ------------------------------------------------------------------------------------
@router.get("/alert-rules", operation_id="list_alert_rules", responses=error_responses(401, 403))
def list_alert_rules(db: UnitOfWork, who: MayRead) -> list[RulePublic]:
    """Every rule as the organization set it, with each cluster's own settings."""
    book, over = alerts.book(db), alerts.overrides(db)
    return [RulePublic.of(book.rule(name), over) for name in alerts.RULES]


@router.patch(
    "/alert-rules/{name}",
    operation_id="update_alert_rule",
    responses=error_responses(401, 403, 404, 422),
)
def update_alert_rule(
    name: RuleName, body: RuleUpdate, request: Request, db: UnitOfWork, who: MayWrite
) -> RulePublic:
    """Enable or disable a rule, or set its level or thresholds, for every cluster that does
    not set its own."""
    changes = body.model_dump(exclude_unset=True)
    if "thresholds" in changes:
        changes["thresholds"] = _pairs(body.thresholds)
    now = center(request).clock.wall()
    audited(
        request,
        who.user,
        "alert.rule.update",
        name,
        body.model_dump(exclude_unset=True, mode="json"),
        lambda: alerts.set_rule(db, alerts.spec(name).name, changes, now),
    )
    db.flush()
    return RulePublic.of(alerts.book(db).rule(name), alerts.overrides(db))


def _cluster(db: DB, name: str) -> None:
    if db.get(Cluster, name) is None:
        raise NotFound(f"cluster {name} does not exist", cluster=name)


@router.get(
    "/clusters/{cluster}/alert-rules",
    operation_id="list_cluster_alert_rules",
    responses=error_responses(401, 403, 404, 422),
)
def list_cluster_alert_rules(
    cluster: ClusterName, db: UnitOfWork, who: MayRead
) -> list[RulePublic]:
    """Every rule as it applies to ``cluster``."""
    _cluster(db, cluster)
    book, over = alerts.book(db), alerts.overrides(db, cluster)
    return [
        RulePublic.of(book.rule(name, cluster), over)
        for name, spec in alerts.RULES.items()
        if spec.per_cluster
    ]


@router.put(
    "/clusters/{cluster}/alert-rules/{name}",
    operation_id="set_cluster_alert_rule",
    responses=error_responses(401, 403, 404, 422),
)
def set_cluster_alert_rule(
    cluster: ClusterName,
    name: RuleName,
    body: RuleUpdate,
    request: Request,
    db: UnitOfWork,
    who: MayWrite,
) -> RulePublic:
    """Set this cluster's own setting of a rule (replacing any it had); a field left null
    keeps the organization's."""
    now = center(request).clock.wall()
    audited(
        request,
        who.user,
        "alert.rule.override",
        f"{cluster}/{name}",
        body.model_dump(mode="json"),
        lambda: alerts.set_override(db, cluster, name, body.setting(), now),
    )
    db.flush()
    return RulePublic.of(alerts.book(db).rule(name, cluster), alerts.overrides(db, cluster))


@router.delete(
    "/clusters/{cluster}/alert-rules/{name}",
    operation_id="delete_cluster_alert_rule",
    status_code=status.HTTP_204_NO_CONTENT,
    responses=error_responses(401, 403, 404, 422),
)
def delete_cluster_alert_rule(
    cluster: ClusterName, name: RuleName, request: Request, db: UnitOfWork, who: MayWrite
) -> None:
    """Drop this cluster's own setting of a rule: the organization's applies again."""
    audited(
        request,
        who.user,
        "alert.rule.override.delete",
        f"{cluster}/{name}",
        {},
        lambda: alerts.delete_override(db, cluster, name),
    )


# ---- notifiers --------------------------------------------------------------------------------
def _public(db: DB, n: Notifier) -> NotifierPublic:
    counts = dict(
        db.execute(
            select(Notification.state, func.count())
            .where(Notification.notifier == n.id)
            .group_by(Notification.state)
        ).all()
    )
    last = db.scalars(
        select(Notification.last_error)
        .where(Notification.notifier == n.id, Notification.last_error != "")
        .order_by(Notification.id.desc())
        .limit(1)
    ).first()
    return NotifierPublic.of(n, counts, last or "")


@router.get("/notifiers", operation_id="list_notifiers", responses=error_responses(401, 403))
def list_notifiers(db: UnitOfWork, who: MayRead) -> list[NotifierPublic]:
    return [_public(db, n) for n in notify.notifiers(db)]


@router.post(
    "/notifiers",
    operation_id="create_notifier",
    status_code=status.HTTP_201_CREATED,
    responses=error_responses(401, 403, 409, 422),
)
def create_notifier(
    body: NotifierCreate, request: Request, db: UnitOfWork, who: MayWrite
) -> NotifierPublic:
    """A webhook (``url``: alerts are POSTed to it as JSON) or an SMTP server (``host``,
    ``port``, ``sender``, ``recipients``, optionally ``starttls``, ``user`` and
    ``password``). Nothing is stored unless every field holds (422 naming the one that
    does not)."""
    now = center(request).clock.wall()
    n: Notifier = audited(
        request,
        who.user,
        "notifier.create",
        body.name,
        body.model_dump(mode="json"),  # the password is redacted by the audit
        lambda: notify.add_notifier(
            db, box(request), body.spec(), now, alert_settings(request).allow_private_webhooks
        ),
    )
    return _public(db, n)


@router.delete(
    "/notifiers/{id}",
    operation_id="delete_notifier",
    status_code=status.HTTP_204_NO_CONTENT,
    responses=error_responses(401, 403, 404, 422),
)
def delete_notifier(id: Ident, request: Request, db: UnitOfWork, who: MayWrite) -> None:
    """The notifier, and its messages not sent yet."""
    audited(
        request, who.user, "notifier.delete", str(id), {}, lambda: notify.delete_notifier(db, id)
    )


@router.post(
    "/notifiers/{id}/test",
    operation_id="test_notifier",
    responses=error_responses(401, 403, 404, 422),
)
async def test_notifier(id: Ident, request: Request, who: MayWrite) -> TestResult:
    """Send a test message now, once: whether the receiver took it, and why not (in short:
    the class of error, never the receiver's own words)."""
    c = center(request)
    shared: notify.Outbox | None = getattr(request.app.state, "outbox", None)
    outbox = shared or notify.Outbox(
        c.sessions,
        box(request),
        c.clock,
        allow_private=alert_settings(request).allow_private_webhooks,
    )
    try:
        error = await outbox.test(id)
    except AecpError as exc:
        why = outcome(exc)
        await run_in_threadpool(record_apart, request, who.user, "notifier.test", str(id), {}, why)
        raise
    finally:
        if shared is None:
            await outbox.aclose()
    result = f"undelivered: {error}" if error else "ok"
    await run_in_threadpool(record_apart, request, who.user, "notifier.test", str(id), {}, result)
    return TestResult(delivered=not error, error=error)
