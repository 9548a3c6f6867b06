"""notifications: the claim of the center sending a message (two centers on one database never
both send it), and an index over each notifier's queue"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0007"
down_revision = "0006"


def upgrade() -> None:
    with op.batch_alter_table("notifications") as notifications:
        notifications.add_column(
            sa.Column("claimed_by", sa.String(64), nullable=False, server_default="")
        )
        notifications.add_column(
            sa.Column("claimed_until", sa.Float(), nullable=False, server_default="0")
        )
        notifications.create_index("ix_notifications_queue", ["notifier", "state", "id"])


def downgrade() -> None:
    with op.batch_alter_table("notifications") as notifications:
        notifications.drop_index("ix_notifications_queue")
        notifications.drop_column("claimed_until")
        notifications.drop_column("claimed_by")
