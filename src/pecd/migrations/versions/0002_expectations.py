"""What each PEC recipient at another provider still owes: the 12 h / 24 h timers' table.

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-24
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0002"
down_revision: str | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

WHEN = sa.DateTime(timezone=True)


def upgrade() -> None:
    op.create_table(
        "expectations",
        sa.Column("pec_msgid", sa.String(), nullable=False),
        sa.Column("recipient", sa.String(320), nullable=False),
        sa.Column("sender", sa.String(320), nullable=False),
        sa.Column("tx", sa.JSON(), nullable=False),
        sa.Column("sent_at", WHEN, nullable=False),
        sa.Column("presa_at", WHEN, nullable=True),
        sa.Column("delivered_at", WHEN, nullable=True),
        sa.Column("first_notice_at", WHEN, nullable=True),
        sa.Column("final_notice_at", WHEN, nullable=True),
        sa.Column("closed_at", WHEN, nullable=True),
        sa.Column("outcome", sa.String(64), nullable=True),
        sa.PrimaryKeyConstraint("pec_msgid", "recipient", name=op.f("pk_expectations")),
    )
    op.create_index("ix_expectations_closed_at_sent_at", "expectations", ["closed_at", "sent_at"])


def downgrade() -> None:
    op.drop_index("ix_expectations_closed_at_sent_at", table_name="expectations")
    op.drop_table("expectations")
