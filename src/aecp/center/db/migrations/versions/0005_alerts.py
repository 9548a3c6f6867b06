"""alerts: the alerts, their rules' settings (organization-wide and per cluster), the
notifiers and the outbox of notifications"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0005"
down_revision = "0004"


def upgrade() -> None:
    op.create_table(
        "alerts",
        sa.Column("id", sa.Integer(), primary_key=True, autoincrement=True),
        sa.Column("rule", sa.String(64), nullable=False, index=True),
        sa.Column("level", sa.String(16), nullable=False),
        sa.Column("cluster", sa.String(64), nullable=False, index=True),
        sa.Column("object_kind", sa.String(16), nullable=False),
        sa.Column("object_name", sa.String(256), nullable=False),
        sa.Column("state", sa.String(16), nullable=False, index=True),
        sa.Column("open_key", sa.String(512), nullable=True, unique=True),
        sa.Column("opened_at", sa.Float(), nullable=False, index=True),
        sa.Column("updated_at", sa.Float(), nullable=False),
        sa.Column("resolved_at", sa.Float(), nullable=False),
        sa.Column("value", sa.Float(), nullable=True),
        sa.Column("cause", sa.Text(), nullable=False),
        sa.Column("impact", sa.Text(), nullable=False),
        sa.Column("action", sa.Text(), nullable=False),
        sa.Column("resolution", sa.Text(), nullable=False),
    )
    op.create_table(
        "alert_rules",
        sa.Column("name", sa.String(64), primary_key=True),
        sa.Column("enabled", sa.Boolean(), nullable=True),
        sa.Column("level", sa.String(16), nullable=True),
        sa.Column("thresholds", sa.Text(), nullable=True),
        sa.Column("updated_at", sa.Float(), nullable=False),
    )
    op.create_table(
        "alert_rule_overrides",
        sa.Column(
            "cluster",
            sa.String(64),
            sa.ForeignKey("clusters.name", ondelete="CASCADE"),
            primary_key=True,
        ),
        sa.Column("rule", sa.String(64), primary_key=True),
        sa.Column("enabled", sa.Boolean(), nullable=True),
        sa.Column("level", sa.String(16), nullable=True),
        sa.Column("thresholds", sa.Text(), nullable=True),
        sa.Column("updated_at", sa.Float(), nullable=False),
    )
    op.create_table(
        "notifiers",
        sa.Column("id", sa.Integer(), primary_key=True, autoincrement=True),
        sa.Column("name", sa.String(64), nullable=False, unique=True),
        sa.Column("kind", sa.String(16), nullable=False),
        sa.Column("min_level", sa.String(16), nullable=False),
        sa.Column("config", sa.Text(), nullable=False),
        sa.Column("secret_encrypted", sa.Text(), nullable=False),
        sa.Column("created_at", sa.Float(), nullable=False),
    )
    op.create_table(
        "notifications",
        sa.Column("id", sa.Integer(), primary_key=True, autoincrement=True),
        sa.Column(
            "notifier",
            sa.Integer(),
            sa.ForeignKey("notifiers.id", ondelete="CASCADE"),
            nullable=False,
            index=True,
        ),
        sa.Column("alert", sa.Integer(), nullable=False, index=True),
        sa.Column("event", sa.String(16), nullable=False),
        sa.Column("payload", sa.Text(), nullable=False),
        sa.Column("state", sa.String(16), nullable=False, index=True),
        sa.Column("attempts", sa.Integer(), nullable=False),
        sa.Column("next_at", sa.Float(), nullable=False),
        sa.Column("last_error", sa.Text(), nullable=False),
        sa.Column("created_at", sa.Float(), nullable=False),
        sa.Column("sent_at", sa.Float(), nullable=False),
    )


def downgrade() -> None:
    op.drop_table("notifications")
    op.drop_table("notifiers")
    op.drop_table("alert_rule_overrides")
    op.drop_table("alert_rules")
    op.drop_table("alerts")
