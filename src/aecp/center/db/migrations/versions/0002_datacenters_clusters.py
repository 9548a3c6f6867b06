"""data centers and registered clusters"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"


def upgrade() -> None:
    op.create_table(
        "datacenters",
        sa.Column("name", sa.String(64), primary_key=True),
        sa.Column("created_at", sa.Float(), nullable=False),
    )
    op.create_table(
        "clusters",
        sa.Column("name", sa.String(64), primary_key=True),
        sa.Column("datacenter", sa.String(64), sa.ForeignKey("datacenters.name"), nullable=False),
        sa.Column("endpoint", sa.String(256), nullable=False, unique=True),
        sa.Column("cluster_id", sa.String(64), nullable=False, unique=True),
        sa.Column("token_encrypted", sa.Text(), nullable=False),
        sa.Column("created_at", sa.Float(), nullable=False),
    )
    op.create_index("ix_clusters_datacenter", "clusters", ["datacenter"])


def downgrade() -> None:
    op.drop_table("clusters")
    op.drop_table("datacenters")
