"""The TOTP lockout: a per-mailbox count of wrong codes and the time the lock ends, in the
database so that every web process of every node counts into the same one; and who began a
pending TOTP enrolment (the digest of a web session), so that only that session sees its secret.

Revision ID: 0008
Revises: 0007
Create Date: 2026-12-01
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0008"
down_revision: str | None = "0007"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

WHEN = sa.DateTime(timezone=True)


def upgrade() -> None:
    # The existing rows start with no failure (server_default fills the new NOT NULL column).
    op.add_column(
        "mailbox_security",
        sa.Column("totp_failures", sa.Integer(), nullable=False, server_default="0"),
    )
    op.add_column("mailbox_security", sa.Column("totp_locked_until", WHEN, nullable=True))
    op.add_column("mailbox_security", sa.Column("totp_pending_owner", sa.String(64), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("mailbox_security") as batch:
        batch.drop_column("totp_pending_owner")
        batch.drop_column("totp_locked_until")
        batch.drop_column("totp_failures")
