"""The trace log ("log dei messaggi"): one row per event, appended in the stage's transaction.

Nothing here updates or deletes events. Sealing (hash chain) and the 30-month purge build on
this table.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import func, insert, select
from sqlalchemy.ext.asyncio import AsyncSession

from pecd.store.models import TraceEvent


@dataclass(frozen=True, slots=True)
class TraceEventData:
    """One event to record; mirrors :class:`~pecd.store.models.TraceEvent` (without ``id``).

    ``recipients``: ``[{"address": ..., "tipo": "certificato"|"esterno"}, ...]``;
    ``daticert``: every daticert field as JSON; ``data``: anything else worth keeping.
    """

    at: datetime
    event: str
    pec_msgid: str | None = None
    client_msgid: str | None = None
    sender: str | None = None
    recipients: Sequence[Mapping[str, Any]] = ()
    subject: str | None = None
    provider: str | None = None
    generated_ids: Sequence[str] = ()
    error: str | None = None
    daticert: Mapping[str, Any] | None = None
    data: Mapping[str, Any] | None = None
    node: str | None = None


async def record(session: AsyncSession, event: TraceEventData) -> None:
    """Append ``event`` to the trace log (does not commit)."""
    if event.at.tzinfo is None:
        raise ValueError("trace events need an aware datetime")
    # A Core INSERT: the ORM's unit of work costs more than the row itself on this hot path.
    await session.execute(
        _INSERT,
        {
            "at": event.at,
            "event": event.event,
            "pec_msgid": event.pec_msgid,
            "client_msgid": event.client_msgid,
            "sender": event.sender,
            "recipients": [dict(r) for r in event.recipients],
            "subject": event.subject,
            "provider": event.provider,
            "generated_ids": list(event.generated_ids),
            "error": event.error,
            "daticert": dict(event.daticert) if event.daticert is not None else None,
            "data": dict(event.data) if event.data is not None else None,
            "node": event.node,
        },
    )


_INSERT = insert(TraceEvent.__table__)


async def events_for(session: AsyncSession, pec_msgid: str) -> list[TraceEvent]:
    """Every event of one transmission, in time order (then insertion order)."""
    stmt = (
        select(TraceEvent)
        .where(TraceEvent.pec_msgid == pec_msgid)
        .order_by(TraceEvent.at, TraceEvent.id)
    )
    return list((await session.scalars(stmt)).all())


async def count_events(
    session: AsyncSession, *, event: str | None = None, pec_msgid: str | None = None
) -> int:
    """How many events match (all of them without filters)."""
    stmt = select(func.count()).select_from(TraceEvent)
    if event is not None:
        stmt = stmt.where(TraceEvent.event == event)
    if pec_msgid is not None:
        stmt = stmt.where(TraceEvent.pec_msgid == pec_msgid)
    return int((await session.scalar(stmt)) or 0)


async def events_of_type(session: AsyncSession, event: str, limit: int = 1000) -> list[TraceEvent]:
    """The events of one type, oldest first."""
    stmt = (
        select(TraceEvent)
        .where(TraceEvent.event == event)
        .order_by(TraceEvent.at, TraceEvent.id)
        .limit(limit)
    )
    return list((await session.scalars(stmt)).all())
