"""tasks: mutations carried out through the center; who owns the VMs made through it;
the inventory's state and node as columns (lists filter and sort in SQL)"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"


def upgrade() -> None:
    with op.batch_alter_table("inventory") as inv:
        inv.add_column(sa.Column("state", sa.String(32), nullable=False, server_default=""))
        inv.add_column(sa.Column("node", sa.String(64), nullable=False, server_default=""))
    op.create_index("ix_inventory_kind_name", "inventory", ["kind", "name"])
    op.create_table(
        "tasks",
        sa.Column("seq", sa.Integer(), primary_key=True, autoincrement=True),
        sa.Column("id", sa.String(64), nullable=False, unique=True),
        sa.Column("kind", sa.String(64), nullable=False, index=True),
        sa.Column("cluster", sa.String(64), nullable=False, index=True),
        sa.Column("target", sa.String(256), nullable=False),
        sa.Column("user", sa.String(64), nullable=False, index=True),
        sa.Column("method", sa.String(8), nullable=False),
        sa.Column("path", sa.String(512), nullable=False),
        sa.Column("body", sa.Text(), nullable=False),
        sa.Column("state", sa.String(16), nullable=False, index=True),
        sa.Column("progress", sa.Integer(), nullable=False),
        sa.Column("steps", sa.Text(), nullable=False),
        sa.Column("error", sa.Text(), nullable=False),
        sa.Column("cluster_operation", sa.String(64), nullable=False),
        sa.Column("sent", sa.Boolean(), nullable=False),
        sa.Column("attempts", sa.Integer(), nullable=False),
        sa.Column("created_at", sa.Float(), nullable=False, index=True),
        sa.Column("started_at", sa.Float(), nullable=False),
        sa.Column("finished_at", sa.Float(), nullable=False),
    )
    op.create_table(
        "vm_owners",
        sa.Column(
            "cluster",
            sa.String(64),
            sa.ForeignKey("clusters.name", ondelete="CASCADE"),
            primary_key=True,
        ),
        sa.Column("vm", sa.String(128), primary_key=True),
        sa.Column("user", sa.String(64), nullable=False, index=True),
    )


def downgrade() -> None:
    op.drop_table("vm_owners")
    op.drop_table("tasks")
    op.drop_index("ix_inventory_kind_name", "inventory")
    with op.batch_alter_table("inventory") as inv:
        inv.drop_column("node")
        inv.drop_column("state")
