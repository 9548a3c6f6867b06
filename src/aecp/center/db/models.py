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

    __table_args__ = (Index("ix_inventory_kind_name", "kind", "name"),)


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
