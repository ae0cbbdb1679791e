"""The virus store: infected messages kept byte-exact, for the trace log's retention.

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-01
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0005"
down_revision: str | None = "0004"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

BIG_ID = sa.BigInteger().with_variant(sa.Integer(), "sqlite")
WHEN = sa.DateTime(timezone=True)


def upgrade() -> None:
    op.create_table(
        "virus_store",
        sa.Column("id", BIG_ID, autoincrement=True, nullable=False),
        sa.Column("key", sa.String(), nullable=False),
        sa.Column("at", WHEN, nullable=False),
        sa.Column("point", sa.String(16), nullable=False),
        sa.Column("signature", sa.Text(), nullable=False),
        sa.Column("pec_msgid", sa.String(), nullable=True),
        sa.Column("sender", sa.String(320), nullable=True),
        sa.Column("recipients", sa.JSON(), nullable=False),
        sa.Column("size", sa.BigInteger(), nullable=False),
        sa.Column("sha256", sa.String(64), nullable=False),
        sa.Column("data", sa.LargeBinary(), nullable=False),
        sa.CheckConstraint("point IN ('access', 'reception')", name=op.f("ck_virus_store_point")),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_virus_store")),
        sa.UniqueConstraint("key", name=op.f("uq_virus_store_key")),
    )
    op.create_index(op.f("ix_virus_store_at"), "virus_store", ["at"])
    op.create_index(op.f("ix_virus_store_pec_msgid"), "virus_store", ["pec_msgid"])


def downgrade() -> None:
    op.drop_index(op.f("ix_virus_store_pec_msgid"), table_name="virus_store")
    op.drop_index(op.f("ix_virus_store_at"), table_name="virus_store")
    op.drop_table("virus_store")
