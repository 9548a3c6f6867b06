"""the inventory: the center's copy of every cluster's objects, and how current it is"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"


def upgrade() -> None:
    op.create_table(
        "inventory",
        sa.Column(
            "cluster",
            sa.String(64),
            sa.ForeignKey("clusters.name", ondelete="CASCADE"),
            primary_key=True,
        ),
        sa.Column("kind", sa.String(16), primary_key=True),
        sa.Column("name", sa.String(128), primary_key=True),
        sa.Column("data", sa.Text(), nullable=False),
        sa.Column("synced_at", sa.Float(), nullable=False),
    )
    op.create_table(
        "cluster_sync",
        sa.Column(
            "cluster",
            sa.String(64),
            sa.ForeignKey("clusters.name", ondelete="CASCADE"),
            primary_key=True,
        ),
        sa.Column("position", sa.String(64), nullable=False),
        sa.Column("last_sync_at", sa.Float(), nullable=False),
        sa.Column("state", sa.String(16), nullable=False),
        sa.Column("error", sa.Text(), nullable=False),
    )


def downgrade() -> None:
    op.drop_table("cluster_sync")
    op.drop_table("inventory")
