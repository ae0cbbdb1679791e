"""What PEC recipients at other providers still owe (presa in carico, delivery): the timers' table.

Every function takes a session and does not commit; times are passed in. The writes have a
``_sync`` form for :meth:`~pecd.store.db.Database.write` and an async one (same arguments).
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import and_, or_, select, update
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.ext.asyncio import AsyncSession
from sqlalchemy.orm import Session

from pecd.pec.address import normalize_address
from pecd.store.models import Expectation, table_of


def expect_sync(
    session: Session,
    *,
    pec_msgid: str,
    recipients: Sequence[str],
    sender: str,
    tx: dict[str, Any],
    sent_at: datetime,
) -> None:
    """Start waiting for each recipient's receipts (a re-run adds nothing twice)."""
    if not recipients:
        return
    insert = postgresql.insert if session.get_bind().dialect.name == "postgresql" else sqlite.insert
    rows = [
        {"pec_msgid": pec_msgid, "recipient": r, "sender": sender, "tx": tx, "sent_at": sent_at}
        for r in recipients
    ]
    session.execute(
        insert(table_of(Expectation)).on_conflict_do_nothing(
            index_elements=["pec_msgid", "recipient"]
        ),
        rows,
    )


def took_charge_sync(
    session: Session, pec_msgid: str, recipients: Sequence[str], at: datetime
) -> int:
    """A presa in carico covering ``recipients`` came back. Returns how many rows it touched."""
    result = session.execute(
        update(Expectation)
        .where(
            Expectation.pec_msgid == pec_msgid,
            Expectation.recipient.in_([normalize_address(r) for r in recipients]),
            Expectation.presa_at.is_(None),
        )
        .values(presa_at=at)
        .returning(Expectation.recipient)
        .execution_options(synchronize_session=False)
    )
    return len(result.all())


def close_sync(
    session: Session, pec_msgid: str, recipient: str, at: datetime, outcome: str
) -> bool:
    """The recipient's transaction ended (delivered, error notice, final timeout)."""
    values: dict[str, Any] = {"closed_at": at, "outcome": outcome}
    if outcome != "scaduto":
        values["delivered_at"] = at
    result = session.execute(
        update(Expectation)
        .where(
            Expectation.pec_msgid == pec_msgid,
            Expectation.recipient == normalize_address(recipient),
            Expectation.closed_at.is_(None),
        )
        .values(**values)
        .returning(Expectation.recipient)
        .execution_options(synchronize_session=False)
    )
    return result.first() is not None


async def due(
    session: AsyncSession, now: datetime, first: timedelta, final: timedelta, limit: int = 500
) -> list[Expectation]:
    """Open rows owing a notice now: the first one (no presa in carico, no delivery after
    ``first``) or the final one (no delivery after ``final``)."""
    stmt = (
        select(Expectation)
        .where(
            Expectation.closed_at.is_(None),
            Expectation.sent_at <= now - first,
            or_(
                and_(Expectation.first_notice_at.is_(None), Expectation.presa_at.is_(None)),
                Expectation.sent_at <= now - final,
            ),
        )
        .order_by(Expectation.sent_at)
        .limit(limit)
    )
    return list((await session.scalars(stmt)).all())


def noticed_sync(
    session: Session, pec_msgid: str, recipient: str, at: datetime, *, final: bool
) -> bool:
    """Record that a notice went out; False if another node did it first."""
    column = Expectation.final_notice_at if final else Expectation.first_notice_at
    values: dict[str, Any] = {column.key: at}
    if final:
        values.update(closed_at=at, outcome="scaduto")
    result = session.execute(
        update(Expectation)
        .where(
            Expectation.pec_msgid == pec_msgid,
            Expectation.recipient == recipient,
            column.is_(None),
            Expectation.closed_at.is_(None),
        )
        .values(**values)
        .returning(Expectation.recipient)
        .execution_options(synchronize_session=False)
    )
    return result.first() is not None
