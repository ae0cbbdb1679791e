"""The trace-log events a receipt is reproduced from (:mod:`pecd.engine.reproduce` decides)."""

from __future__ import annotations

from pecd.engine.reproduce import LoggedEvent
from pecd.store.db import Database
from pecd.store.trace import Query, search

__all__ = ["MAX_EVENTS", "logged_events"]

MAX_EVENTS = 10_000
"""At most this many events of one transmission are read."""


async def logged_events(db: Database, pec_msgid: str) -> list[LoggedEvent]:
    """Every event logged for the transmission ``pec_msgid`` (its receipts among them)."""
    async with db.read_session() as s:
        found = await search(s, Query(pec_msgid=pec_msgid), limit=MAX_EVENTS)
    return [LoggedEvent(id=e.id, event=e.event, daticert=e.daticert, data=e.data) for e in found]
