"""Drop ``delivery_records``: nothing ever wrote or read it (Maildir delivery is idempotent by
the file name it derives from the delivery key, so no table is needed).

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-01
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0004"
down_revision: str | None = "0003"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

# As 0001 created it.
WHEN = sa.DateTime(timezone=True)


def upgrade() -> None:
    op.drop_table("delivery_records")


def downgrade() -> None:
    op.create_table(
        "delivery_records",
        sa.Column("key", sa.String(), nullable=False),
        sa.Column("mailbox", sa.String(320), nullable=False),
        sa.Column("folder", sa.String(255), nullable=False),
        sa.Column("filename", sa.String(255), nullable=False),
        sa.Column("created_at", WHEN, nullable=False),
        sa.PrimaryKeyConstraint("key", name=op.f("pk_delivery_records")),
    )
