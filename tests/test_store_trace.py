"""pecd.store.trace: events recorded in the caller's transaction and read back per message."""

from __future__ import annotations

import dataclasses
from datetime import UTC, datetime, timedelta

import pytest

from pecd.store.db import Database
from pecd.store.models import TraceEvent
from pecd.store.trace import TraceEventData, count_events, events_for, record_sync
from store_fixtures import (  # noqa: F401 (fixtures)
    Backend,
    db_fixture,
    pg_url_fixture,
    sqlite_template_fixture,
)

T0 = datetime(2025, 3, 1, 12, 0, tzinfo=UTC)
MSGID = "opec210312.20250301120000.12345.678.1.42@pec.example.it"

DATICERT = {
    "tipo": "accettazione",
    "errore": "nessuno",
    "intestazione": {
        "mittente": "mario.rossi@pec.example.it",
        "destinatari": [{"tipo": "certificato", "address": "b@pec.altro.it"}],
        "oggetto": "Fattura n. 7 – è così",
    },
    "dati": {"gestore-emittente": "Example PEC S.p.A.", "data": {"zona": "+0100"}},
}


def accettazione(at: datetime = T0, **changes: object) -> TraceEventData:
    event = TraceEventData(
        at=at,
        event="accettazione",
        pec_msgid=MSGID,
        client_msgid="<abc@client.example>",
        sender="mario.rossi@pec.example.it",
        recipients=[
            {"address": "b@pec.altro.it", "tipo": "certificato"},
            {"address": "x@gmail.example", "tipo": "esterno"},
        ],
        subject="Fattura n. 7 – è così",
        provider="Example PEC S.p.A.",
        generated_ids=["<ricevuta1@pec.example.it>"],
        daticert=DATICERT,
        data={"size": 1234},
        node="node-1",
    )
    return dataclasses.replace(event, **changes)  # type: ignore[arg-type]


def test_record_and_read_back(db: Backend) -> None:
    async def main(d: Database) -> tuple[list[TraceEvent], list[int]]:
        async with d.session() as s, s.begin():
            await s.run_sync(record_sync, accettazione(T0 + timedelta(seconds=2), event="consegna"))
            await s.run_sync(record_sync, accettazione())
            await s.run_sync(
                record_sync, accettazione(T0 + timedelta(seconds=2), event="busta-trasporto")
            )
            await s.run_sync(
                record_sync, TraceEventData(at=T0, event="non-accettazione", error="virus")
            )
        async with d.read_session() as s:
            found = await events_for(s, MSGID)
            counts = [
                await count_events(s),
                await count_events(s, pec_msgid=MSGID),
                await count_events(s, event="consegna"),
                await count_events(s, event="consegna", pec_msgid="other"),
                len(await events_for(s, "other")),
            ]
        return found, counts

    found, counts = db.run(main)
    assert [e.event for e in found] == ["accettazione", "consegna", "busta-trasporto"]
    assert counts == [4, 3, 1, 0, 0]
    first = found[0]
    assert first.at == T0 and first.at.tzinfo is UTC
    assert first.recipients == [
        {"address": "b@pec.altro.it", "tipo": "certificato"},
        {"address": "x@gmail.example", "tipo": "esterno"},
    ]
    assert first.daticert == DATICERT
    assert (first.subject, first.generated_ids, first.data, first.node) == (
        "Fattura n. 7 – è così",
        ["<ricevuta1@pec.example.it>"],
        {"size": 1234},
        "node-1",
    )


def test_minimal_event_has_empty_lists(db: Backend) -> None:
    async def main(d: Database) -> TraceEvent:
        async with d.session() as s, s.begin():
            await s.run_sync(record_sync, TraceEventData(at=T0, event="errore", pec_msgid="m"))
        async with d.read_session() as s:
            return (await events_for(s, "m"))[0]

    got = db.run(main)
    assert (got.recipients, got.generated_ids, got.daticert, got.data) == ([], [], None, None)


def test_record_belongs_to_the_callers_transaction(db: Backend) -> None:
    async def main(d: Database) -> int:
        async with d.session() as s:
            await s.run_sync(record_sync, accettazione())
            assert await count_events(s) == 1  # visible inside the transaction
            await s.rollback()
        async with d.read_session() as s:
            return await count_events(s)

    assert db.run(main) == 0


def test_naive_time_is_refused(db: Backend) -> None:
    async def main(d: Database) -> None:
        async with d.session() as s:
            await s.run_sync(record_sync, accettazione(datetime(2025, 3, 1, 12, 0)))

    with pytest.raises(ValueError, match="aware"):
        db.run(main)
