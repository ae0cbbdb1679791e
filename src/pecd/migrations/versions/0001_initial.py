"""The initial schema: domains, mailboxes, jobs, trace events, delivery records.

Revision ID: 0001
Revises:
Create Date: 2025-11-24
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0001"
down_revision: str | None = None
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

# 64-bit ids on PostgreSQL; on SQLite only "INTEGER PRIMARY KEY" is the autoincrementing rowid.
BIG_ID = sa.BigInteger().with_variant(sa.Integer(), "sqlite")
WHEN = sa.DateTime(timezone=True)


def upgrade() -> None:
    op.create_table(
        "domains",
        sa.Column("name", sa.String(255), nullable=False),
        sa.Column("created_at", WHEN, nullable=False),
        sa.PrimaryKeyConstraint("name", name=op.f("pk_domains")),
    )
    op.create_table(
        "mailboxes",
        sa.Column("address", sa.String(320), nullable=False),
        sa.Column("domain", sa.String(255), nullable=False),
        sa.Column("password_hash", sa.String(255), nullable=False),
        sa.Column("quota_bytes", sa.BigInteger(), nullable=True),
        sa.Column("disabled", sa.Boolean(), nullable=False),
        sa.Column("created_at", WHEN, nullable=False),
        sa.ForeignKeyConstraint(
            ["domain"], ["domains.name"], name=op.f("fk_mailboxes_domain_domains")
        ),
        sa.PrimaryKeyConstraint("address", name=op.f("pk_mailboxes")),
    )
    op.create_index(op.f("ix_mailboxes_domain"), "mailboxes", ["domain"])

    op.create_table(
        "jobs",
        sa.Column("id", BIG_ID, autoincrement=True, nullable=False),
        sa.Column("kind", sa.String(64), nullable=False),
        sa.Column("key", sa.String(), nullable=False),
        sa.Column("state", sa.String(16), nullable=False),
        sa.Column("payload", sa.JSON(), nullable=False),
        sa.Column("data", sa.LargeBinary(), nullable=True),
        sa.Column("attempts", sa.Integer(), nullable=False),
        sa.Column("next_run_at", WHEN, nullable=False),
        sa.Column("locked_by", sa.String(255), nullable=True),
        sa.Column("locked_until", WHEN, nullable=True),
        sa.Column("last_error", sa.Text(), nullable=True),
        sa.Column("created_at", WHEN, nullable=False),
        sa.Column("updated_at", WHEN, nullable=False),
        sa.CheckConstraint(
            "state IN ('ready', 'running', 'done', 'parked')", name=op.f("ck_jobs_state")
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_jobs")),
        sa.UniqueConstraint("key", name=op.f("uq_jobs_key")),
    )
    op.create_index("ix_jobs_state_next_run_at", "jobs", ["state", "next_run_at"])

    op.create_table(
        "trace_events",
        sa.Column("id", BIG_ID, autoincrement=True, nullable=False),
        sa.Column("at", WHEN, nullable=False),
        sa.Column("event", sa.String(64), nullable=False),
        sa.Column("pec_msgid", sa.String(), nullable=True),
        sa.Column("client_msgid", sa.String(), nullable=True),
        sa.Column("sender", sa.String(320), nullable=True),
        sa.Column("recipients", sa.JSON(), nullable=False),
        sa.Column("subject", sa.Text(), nullable=True),
        sa.Column("provider", sa.String(), nullable=True),
        sa.Column("generated_ids", sa.JSON(), nullable=False),
        sa.Column("error", sa.Text(), nullable=True),
        sa.Column("daticert", sa.JSON(), nullable=True),
        sa.Column("data", sa.JSON(), nullable=True),
        sa.Column("node", sa.String(255), nullable=True),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_trace_events")),
    )
    for column in ("at", "pec_msgid", "client_msgid", "sender"):
        op.create_index(op.f(f"ix_trace_events_{column}"), "trace_events", [column])

    op.create_table(
        "delivery_records",
        sa.Column("key", sa.String(), nullable=False),
        sa.Column("mailbox", sa.String(320), nullable=False),
        sa.Column("folder", sa.String(255), nullable=False),
        sa.Column("filename", sa.String(255), nullable=False),
        sa.Column("created_at", WHEN, nullable=False),
        sa.PrimaryKeyConstraint("key", name=op.f("pk_delivery_records")),
    )


def downgrade() -> None:
    op.drop_table("delivery_records")
    for column in ("sender", "client_msgid", "pec_msgid", "at"):
        op.drop_index(op.f(f"ix_trace_events_{column}"), table_name="trace_events")
    op.drop_table("trace_events")
    op.drop_index("ix_jobs_state_next_run_at", table_name="jobs")
    op.drop_table("jobs")
    op.drop_index(op.f("ix_mailboxes_domain"), table_name="mailboxes")
    op.drop_table("mailboxes")
    op.drop_table("domains")
