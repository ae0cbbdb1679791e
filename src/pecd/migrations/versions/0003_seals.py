"""Seals of the trace log: each event gets the seal that covers it; seals chain and are signed.

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-24
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0003"
down_revision: str | None = "0002"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

BIG_ID = sa.BigInteger().with_variant(sa.Integer(), "sqlite")
WHEN = sa.DateTime(timezone=True)


def upgrade() -> None:
    op.create_table(
        "trace_seals",
        sa.Column("id", BIG_ID, autoincrement=True, nullable=False),
        sa.Column("created_at", WHEN, nullable=False),
        sa.Column("node", sa.String(255), nullable=True),
        sa.Column("first_event", sa.BigInteger(), nullable=True),
        sa.Column("last_event", sa.BigInteger(), nullable=True),
        sa.Column("count", sa.Integer(), nullable=False),
        sa.Column("digests", sa.LargeBinary(), nullable=False),
        sa.Column("prev_hash", sa.String(64), nullable=False),
        sa.Column("seal_hash", sa.String(64), nullable=False),
        sa.Column("signer_sha1", sa.String(40), nullable=False),
        sa.Column("signature", sa.LargeBinary(), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_trace_seals")),
    )
    op.create_table(
        "trace_signers",
        sa.Column("sha1", sa.String(40), nullable=False),
        sa.Column("certificate", sa.LargeBinary(), nullable=False),
        sa.Column("created_at", WHEN, nullable=False),
        sa.PrimaryKeyConstraint("sha1", name=op.f("pk_trace_signers")),
    )
    op.create_table(
        "trace_horizon",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("last_seal", sa.BigInteger(), nullable=False),
        sa.Column("last_seal_hash", sa.String(64), nullable=False),
        sa.Column("purged_at", WHEN, nullable=False),
        sa.Column("events_purged", sa.BigInteger(), nullable=False),
        sa.Column("signer_sha1", sa.String(40), nullable=False),
        sa.Column("signature", sa.LargeBinary(), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_trace_horizon")),
    )
    with op.batch_alter_table("trace_events") as batch:
        batch.add_column(sa.Column("seal_id", sa.BigInteger(), nullable=True))
    op.create_index("ix_trace_events_seal_id", "trace_events", ["seal_id"])


def downgrade() -> None:
    op.drop_index("ix_trace_events_seal_id", table_name="trace_events")
    with op.batch_alter_table("trace_events") as batch:
        batch.drop_column("seal_id")
    op.drop_table("trace_horizon")
    op.drop_table("trace_signers")
    op.drop_table("trace_seals")
