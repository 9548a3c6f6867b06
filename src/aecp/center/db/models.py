"""The center's tables. Never created from these classes: only by the migrations, which a
test checks against them."""

from __future__ import annotations

from sqlalchemy import Boolean, Float, ForeignKey, Index, Integer, String, Text
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column


class Base(DeclarativeBase):
    pass


class Role(Base):
    """A named set of action strings (``center.roles``)."""

    __tablename__ = "roles"

    name: Mapped[str] = mapped_column(String(64), primary_key=True)
    actions: Mapped[str] = mapped_column(Text)  # space-separated
    preset: Mapped[bool] = mapped_column(Boolean, default=False)
    created_at: Mapped[float] = mapped_column(Float)


class User(Base):
    __tablename__ = "users"

    name: Mapped[str] = mapped_column(String(64), primary_key=True)
    role: Mapped[str] = mapped_column(ForeignKey("roles.name"))
    password_hash: Mapped[str] = mapped_column(String(256))
    disabled: Mapped[bool] = mapped_column(Boolean, default=False)
    failed_logins: Mapped[int] = mapped_column(Integer, default=0)
    locked_until: Mapped[float] = mapped_column(Float, default=0.0)
    created_at: Mapped[float] = mapped_column(Float)


class Session(Base):
    """A login: only the token's SHA-256 is kept."""

    __tablename__ = "sessions"

    token_sha256: Mapped[str] = mapped_column(String(64), primary_key=True)
    user: Mapped[str] = mapped_column(ForeignKey("users.name", ondelete="CASCADE"), index=True)
    created_at: Mapped[float] = mapped_column(Float)
    expires_at: Mapped[float] = mapped_column(Float)


class AuditRecord(Base):
    """Append-only: who did what to which object, from where, with what result."""

    __tablename__ = "audit"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    at: Mapped[float] = mapped_column(Float, index=True)
    user: Mapped[str] = mapped_column(String(64), index=True)
    address: Mapped[str] = mapped_column(String(64))
    action: Mapped[str] = mapped_column(String(64), index=True)
    target: Mapped[str] = mapped_column(String(256))
    params: Mapped[str] = mapped_column(Text)  # JSON, secrets redacted
    result: Mapped[str] = mapped_column(String(256))
    task_id: Mapped[str] = mapped_column(String(64), default="")


class Datacenter(Base):
    """A data center of the organization: clusters belong to one."""

    __tablename__ = "datacenters"

    name: Mapped[str] = mapped_column(String(64), primary_key=True)
    created_at: Mapped[float] = mapped_column(Float)


class Cluster(Base):
    """A registered ACOS cluster: where its API is, its id (checked at registration), and the
    token the center uses there, encrypted with the center's key (``center.secrets``)."""

    __tablename__ = "clusters"

    name: Mapped[str] = mapped_column(String(64), primary_key=True)
    datacenter: Mapped[str] = mapped_column(ForeignKey("datacenters.name"), index=True)
    endpoint: Mapped[str] = mapped_column(String(256), unique=True)
    cluster_id: Mapped[str] = mapped_column(String(64), unique=True)
    token_encrypted: Mapped[str] = mapped_column(Text)
    created_at: Mapped[float] = mapped_column(Float)


class InventoryObject(Base):
    """The center's copy of one object of a cluster (``kind``: vm, node, volume, template,
    operation), as the cluster's API shows it."""

    __tablename__ = "inventory"

    cluster: Mapped[str] = mapped_column(
        ForeignKey("clusters.name", ondelete="CASCADE"), primary_key=True
    )
    kind: Mapped[str] = mapped_column(String(16), primary_key=True)
    name: Mapped[str] = mapped_column(String(128), primary_key=True)
    data: Mapped[str] = mapped_column(Text)  # JSON
    synced_at: Mapped[float] = mapped_column(Float)
    # copied out of ``data`` so lists filter and sort in SQL
    state: Mapped[str] = mapped_column(String(32), default="")
    node: Mapped[str] = mapped_column(String(64), default="")

    __table_args__ = (  # what /v1/vms filters and sorts on (migration 0008)
        Index("ix_inventory_kind_name_cluster", "kind", "name", "cluster"),
        Index("ix_inventory_kind_state_name", "kind", "state", "name", "cluster"),
        Index("ix_inventory_kind_node_cluster", "kind", "node", "cluster", "name"),
    )


class ClusterSync(Base):
    """How current the center's copy of a cluster is: the change-feed position it follows
    from, the last good sync, and the state (``ok``, ``unreachable``)."""

    __tablename__ = "cluster_sync"

    cluster: Mapped[str] = mapped_column(
        ForeignKey("clusters.name", ondelete="CASCADE"), primary_key=True
    )
    position: Mapped[str] = mapped_column(String(64), default="")
    last_sync_at: Mapped[float] = mapped_column(Float, default=0.0)
    state: Mapped[str] = mapped_column(String(16), default="new")
    error: Mapped[str] = mapped_column(Text, default="")


class Task(Base):
    """A mutation carried out through the center: one request to one cluster, sent with the
    task's id as its ``Idempotency-Key`` (so a resent request is never carried out twice),
    then the cluster operation it started followed to its end (``center.tasks``)."""

    __tablename__ = "tasks"

    seq: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)  # order
    id: Mapped[str] = mapped_column(String(64), unique=True)
    kind: Mapped[str] = mapped_column(String(64), index=True)
    cluster: Mapped[str] = mapped_column(String(64), index=True)  # kept after a removal
    target: Mapped[str] = mapped_column(String(256))
    user: Mapped[str] = mapped_column(String(64), index=True)
    method: Mapped[str] = mapped_column(String(8))
    path: Mapped[str] = mapped_column(String(512))
    body: Mapped[str] = mapped_column(Text)  # JSON, or "" for none
    state: Mapped[str] = mapped_column(String(16), index=True)
    progress: Mapped[int] = mapped_column(Integer, default=0)
    steps: Mapped[str] = mapped_column(Text, default="[]")  # JSON [{at, sentence}]
    error: Mapped[str] = mapped_column(Text, default="")
    cluster_operation: Mapped[str] = mapped_column(String(64), default="")
    sent: Mapped[bool] = mapped_column(Boolean, default=False)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    first_sent_at: Mapped[float] = mapped_column(Float, default=0.0)
    created_at: Mapped[float] = mapped_column(Float, index=True)
    started_at: Mapped[float] = mapped_column(Float, default=0.0)
    finished_at: Mapped[float] = mapped_column(Float, default=0.0)


class VMOwner(Base):
    """Who made a VM through the center: a role without ``vm.all`` sees and acts on its own
    VMs only."""

    __tablename__ = "vm_owners"

    cluster: Mapped[str] = mapped_column(
        ForeignKey("clusters.name", ondelete="CASCADE"), primary_key=True
    )
    vm: Mapped[str] = mapped_column(String(128), primary_key=True)
    user: Mapped[str] = mapped_column(String(64), index=True)


class Alert(Base):
    """One alert (``center.alerts``): opened once for a cause (rule, cluster, object), kept
    current while the cause lasts, resolved when it is gone. ``open_key`` names the cause
    while the alert is open and is NULL once resolved: one open alert per cause, enforced."""

    __tablename__ = "alerts"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    rule: Mapped[str] = mapped_column(String(64), index=True)
    level: Mapped[str] = mapped_column(String(16))
    cluster: Mapped[str] = mapped_column(String(64), index=True)  # "": the center itself
    object_kind: Mapped[str] = mapped_column(String(16))
    object_name: Mapped[str] = mapped_column(String(256))
    state: Mapped[str] = mapped_column(String(16), index=True)  # open, resolved
    open_key: Mapped[str | None] = mapped_column(String(512), unique=True)
    opened_at: Mapped[float] = mapped_column(Float, index=True)
    updated_at: Mapped[float] = mapped_column(Float)
    resolved_at: Mapped[float] = mapped_column(Float, default=0.0)
    value: Mapped[float | None] = mapped_column(Float)
    cause: Mapped[str] = mapped_column(Text)
    impact: Mapped[str] = mapped_column(Text)
    action: Mapped[str] = mapped_column(Text)
    resolution: Mapped[str] = mapped_column(Text, default="")  # why it was resolved


class AlertRuleSetting(Base):
    """An alert rule as the organization set it, over its shipped defaults: a field left NULL
    keeps the default."""

    __tablename__ = "alert_rules"

    name: Mapped[str] = mapped_column(String(64), primary_key=True)
    enabled: Mapped[bool | None] = mapped_column(Boolean)
    level: Mapped[str | None] = mapped_column(String(16))
    thresholds: Mapped[str | None] = mapped_column(Text)  # JSON {level: percent}
    updated_at: Mapped[float] = mapped_column(Float)


class AlertRuleOverride(Base):
    """An alert rule as set for one cluster, over the organization's setting: a field left
    NULL keeps that."""

    __tablename__ = "alert_rule_overrides"

    cluster: Mapped[str] = mapped_column(
        ForeignKey("clusters.name", ondelete="CASCADE"), primary_key=True
    )
    rule: Mapped[str] = mapped_column(String(64), primary_key=True)
    enabled: Mapped[bool | None] = mapped_column(Boolean)
    level: Mapped[str | None] = mapped_column(String(16))
    thresholds: Mapped[str | None] = mapped_column(Text)  # JSON {level: percent}
    updated_at: Mapped[float] = mapped_column(Float)


class Notifier(Base):
    """Where alerts are sent (``center.notify``): a webhook or an SMTP server. ``config`` holds
    no secret (a webhook's URL there is only ``scheme://host[:port]/…``); the SMTP password or
    the webhook's whole URL is sealed with the center's key (``center.secrets``)."""

    __tablename__ = "notifiers"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    name: Mapped[str] = mapped_column(String(64), unique=True)
    kind: Mapped[str] = mapped_column(String(16))  # webhook, smtp
    min_level: Mapped[str] = mapped_column(String(16))
    config: Mapped[str] = mapped_column(Text)  # JSON
    secret_encrypted: Mapped[str] = mapped_column(Text, default="")
    created_at: Mapped[float] = mapped_column(Float)


class Notification(Base):
    """The outbox: one message to one notifier, written in the transaction that changed the
    alert, so a notification survives a restart; retried with backoff until sent or given up.
    A center claims the message it sends (``claimed_by`` until ``claimed_until``), so two
    centers on one database never both send it."""

    __tablename__ = "notifications"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    notifier: Mapped[int] = mapped_column(
        ForeignKey("notifiers.id", ondelete="CASCADE"), index=True
    )
    alert: Mapped[int] = mapped_column(Integer, index=True)
    event: Mapped[str] = mapped_column(String(16))  # opened, escalated, changed, resolved
    payload: Mapped[str] = mapped_column(Text)  # JSON
    state: Mapped[str] = mapped_column(String(16), index=True)  # pending, sent, failed
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    next_at: Mapped[float] = mapped_column(Float)
    last_error: Mapped[str] = mapped_column(Text, default="")
    created_at: Mapped[float] = mapped_column(Float)
    sent_at: Mapped[float] = mapped_column(Float, default=0.0)
    claimed_by: Mapped[str] = mapped_column(String(64), default="")
    claimed_until: Mapped[float] = mapped_column(Float, default=0.0)

    # a notifier's queue, in order
    __table_args__ = (Index("ix_notifications_queue", "notifier", "state", "id"),)
