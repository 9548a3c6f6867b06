"""inventory: indexes for the lists across clusters (filter by state or node, sort by name,
cluster or node, then page)"""

from __future__ import annotations

from alembic import op

revision = "0008"
down_revision = "0007"


def upgrade() -> None:
    op.drop_index("ix_inventory_kind_name", "inventory")
    op.create_index("ix_inventory_kind_name_cluster", "inventory", ["kind", "name", "cluster"])
    op.create_index(
        "ix_inventory_kind_state_name", "inventory", ["kind", "state", "name", "cluster"]
    )
    op.create_index(
        "ix_inventory_kind_node_cluster", "inventory", ["kind", "node", "cluster", "name"]
    )


def downgrade() -> None:
    op.drop_index("ix_inventory_kind_node_cluster", "inventory")
    op.drop_index("ix_inventory_kind_state_name", "inventory")
    op.drop_index("ix_inventory_kind_name_cluster", "inventory")
    op.create_index("ix_inventory_kind_name", "inventory", ["kind", "name"])
