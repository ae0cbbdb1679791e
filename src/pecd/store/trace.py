"""The trace log ("log dei messaggi"): one row per event, appended in the stage's transaction.

Nothing here updates or deletes events. Sealing (hash chain) and the 30-month purge build on
this table.

Text that cannot be stored is made storable at this adapter, whatever the stage put in the event:
a NUL (PostgreSQL refuses it in text and JSON: ``invalid byte sequence for encoding "UTF8":
0x00``) becomes U+FFFD, and so does a lone surrogate (no database encodes one: ``surrogates not
allowed``), bytes smuggled in by ``surrogateescape`` coming back as UTF-8 where they are UTF-8
(``pecd.pec.mime.unsurrogate``). Every string of the event is treated, the keys and values of
its JSON fields too, on every database, so that one event reads the same on SQLite and
PostgreSQL. An SMTP envelope sender with a NUL (the reception point takes any reverse path) is
logged with U+FFFD in its place; a well-formed event is stored as it was. The seals hash what is
stored.
"""

from __future__ import annotations

import re
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import String, cast, func, insert, select
from sqlalchemy.ext.asyncio import AsyncSession
from sqlalchemy.orm import Session

from pecd.engine.vocab import TraceEventData
from pecd.pec.address import normalize_address
from pecd.pec.mime import unsurrogate
from pecd.store.db import defer
from pecd.store.models import TraceEvent, table_of


def record_sync(session: Session, event: TraceEventData) -> None:
    """Append ``event`` to the trace log in a synchronous session (:meth:`Database.write`, or
    ``AsyncSession.run_sync``); does not commit."""
    # A Core INSERT: the ORM's unit of work costs more than the row itself on this hot path.
    # Nothing reads an event back in the transaction that writes it: one executemany at its end.
    defer(session, _INSERT, event_row(event))


def event_row(event: TraceEventData) -> dict[str, Any]:
    """The row of ``event`` for :func:`insert_stmt` (every string storable)."""
    if event.at.tzinfo is None:
        raise ValueError("trace events need an aware datetime")
    daticert, data = event.daticert, event.data
    # One copy of each JSON field, made storable as it is copied (storable() of a dict or list
    # is already a new one: a copy first would make two).
    return {
        "at": event.at,
        "event": event.event,
        "pec_msgid": storable(event.pec_msgid),
        "client_msgid": storable(event.client_msgid),
        "sender": storable(event.sender),
        "recipients": [_storable_mapping(r) for r in event.recipients],
        "subject": storable(event.subject),
        "provider": storable(event.provider),
        "generated_ids": [storable(g) for g in event.generated_ids],
        "error": storable(event.error),
        "daticert": _storable_mapping(daticert) if daticert is not None else None,
        "data": _storable_mapping(data) if data is not None else None,
        "node": storable(event.node),
    }


def _storable_mapping(value: Mapping[str, Any]) -> dict[str, Any]:
    """A mapping (any: a dict, a read-only view) as a storable dict."""
    return {storable(k): storable(v) for k, v in value.items()}


def insert_stmt() -> Any:
    """The INSERT of one trace event (:func:`event_row`); one statement object, so that rows
    deferred to the end of a transaction go in one executemany."""
    return _INSERT


_INSERT = insert(table_of(TraceEvent))
_UNSTORABLE = re.compile("[\x00\ud800-\udfff]")


def storable(value: Any) -> Any:
    """``value`` with every string in it (nested lists and dicts, keys too) storable: NUL and
    lone surrogates become U+FFFD (see the module's docstring). Anything else is returned as is,
    and so is a string that needs nothing (the common case costs one search)."""
    if isinstance(value, str):
        if _UNSTORABLE.search(value) is None:
            return value
        return unsurrogate(value).replace("\x00", "\ufffd")
    if isinstance(value, dict):
        return {storable(k): storable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [storable(v) for v in value]
    return value


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


@dataclass(frozen=True)
class Query:
    """What ``pecd log search`` and ``pecd log export`` select; every field is optional."""

    pec_msgid: str | None = None
    client_msgid: str | None = None
    sender: str | None = None
    recipient: str | None = None
    subject: str | None = None  # text contained in the subject, any letter case
    event: str | None = None
    since: datetime | None = None
    until: datetime | None = None

    def where(self, stmt: Any) -> Any:
        if self.pec_msgid:
            stmt = stmt.where(TraceEvent.pec_msgid == self.pec_msgid.strip("<>"))
        if self.client_msgid:
            mid = self.client_msgid.strip()
            stmt = stmt.where(
                TraceEvent.client_msgid == (mid if mid.startswith("<") else f"<{mid}>")
            )
        if self.sender:
            stmt = stmt.where(TraceEvent.sender == normalize_address(self.sender))
        if self.recipient:
            # Recipients are a JSON list of objects; their text holds the quoted address.
            needle = f'%"{normalize_address(self.recipient)}"%'
            stmt = stmt.where(cast(TraceEvent.recipients, String).like(needle))
        if self.subject:
            stmt = stmt.where(func.lower(TraceEvent.subject).contains(self.subject.lower()))
        if self.event:
            stmt = stmt.where(TraceEvent.event == self.event)
        if self.since:
            stmt = stmt.where(TraceEvent.at >= self.since)
        if self.until:
            stmt = stmt.where(TraceEvent.at < self.until)
        return stmt


async def search(session: AsyncSession, query: Query, *, limit: int = 100) -> list[TraceEvent]:
    stmt = query.where(select(TraceEvent)).order_by(TraceEvent.at, TraceEvent.id).limit(limit)
    return list((await session.scalars(stmt)).all())


async def stream(
    session: AsyncSession, query: Query, *, chunk: int = 5000
) -> AsyncIterator[list[TraceEvent]]:
    """Every matching event, in id order, a chunk at a time (keyset pagination)."""
    last = 0
    while True:
        stmt = (
            query.where(select(TraceEvent))
            .where(TraceEvent.id > last)
            .order_by(TraceEvent.id)
            .limit(chunk)
        )
        rows = list((await session.scalars(stmt)).all())
        if not rows:
            return
        yield rows
        last = rows[-1].id


async def count(session: AsyncSession, query: Query) -> int:
    return int(await session.scalar(query.where(select(func.count()).select_from(TraceEvent))) or 0)


#: The fields of an event in extracts (``--json``, JSONL and CSV exports), in this order.
FIELDS: tuple[str, ...] = (
    "id",
    "at",
    "event",
    "pec_msgid",
    "client_msgid",
    "sender",
    "recipients",
    "subject",
    "provider",
    "generated_ids",
    "error",
    "daticert",
    "data",
    "node",
    "seal_id",
)


def as_json(e: TraceEvent) -> dict[str, Any]:
    """One event as a JSON object (extracts for holders, ``--json``)."""
    out = {name: getattr(e, name) for name in FIELDS}
    out["at"] = e.at.isoformat()
    return out
