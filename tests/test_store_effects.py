"""The engine's effects written by the store (store/effects.py), on both databases: keyed jobs,
store jobs leased to the committing worker, trace events, timer rows, claimed notices."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from pecd.engine.effects import ClaimNotice, Enqueue, Expect, Record, Settle, StoreLocal, TookCharge
from pecd.engine.vocab import (
    JobKind,
    RelayKind,
    RelayPayload,
    StorePayload,
    TraceEventData,
    TraceType,
)
from pecd.pec.builders import Destinatario, Transmission
from pecd.pec.vocab import DestinatarioTipo
from pecd.store import jobs
from pecd.store.db import Database
from pecd.store.effects import Applied, Lease, apply
from pecd.store.models import Expectation, TraceEvent
from store_fixtures import Backend, db_fixture, pg_url_fixture, sqlite_template_fixture

__all__ = ["db_fixture", "pg_url_fixture", "sqlite_template_fixture"]

T0 = datetime(2026, 3, 1, 9, 0, tzinfo=UTC)
LEASE = Lease("node:pipeline0", T0 + timedelta(minutes=5))
TX = Transmission(
    identificativo="opec-1@pec.a",
    mittente="alice@pec.a",
    destinatari=(Destinatario("bob@pec.b", DestinatarioTipo.CERTIFICATO),),
    risposte="alice@pec.a",
    oggetto="Prova",
    msgid=None,
)


def relay_job(key: str) -> Enqueue:
    payload = RelayPayload(("bob@pec.b",), "opec-1@pec.a", "alice@pec.a", RelayKind.ENVELOPE, TX)
    return Enqueue(JobKind.RELAY, key, payload, b"env", T0, run_at=T0 + timedelta(minutes=1))


def test_each_effect_becomes_its_rows_once(db: Backend) -> None:
    stored = StoreLocal("k:accettazione", "alice@pec.a", b"receipt", "m1@pec.a", T0, unique=True)
    event = TraceEventData(at=T0, event=TraceType.ACCETTAZIONE, pec_msgid="opec-1@pec.a")
    effects = [
        stored,
        relay_job("k:relay:pec.b"),
        Record(event),
        Expect("opec-1@pec.a", ("bob@pec.b",), "alice@pec.a", TX, T0),
    ]

    async def main(d: Database) -> tuple[Applied, Applied, list[tuple[str, str, str | None]]]:
        first = await d.write(lambda s: apply(s, effects, LEASE))
        # A stage that runs again (a crash before its job completed) makes no job twice.
        again = await d.write(lambda s: apply(s, effects[:2], LEASE))
        async with d.read_session() as s:
            found = await jobs.list_jobs(s, limit=10)
            rows = [(j.kind, j.state, j.locked_by) for j in sorted(found, key=lambda j: j.key)]
            [store_job] = [j for j in found if j.kind == JobKind.STORE]
            assert StorePayload.from_json(store_job.payload) == StorePayload(
                "alice@pec.a", "m1@pec.a"
            )
            [relay] = [j for j in found if j.kind == JobKind.RELAY]
            assert RelayPayload.from_json(relay.payload).tx == TX
            assert relay.next_run_at == T0 + timedelta(minutes=1)
            assert (await s.get(Expectation, ("opec-1@pec.a", "bob@pec.b"))) is not None
            assert len((await s.execute(TraceEvent.__table__.select())).all()) == 1
        return first, again, rows

    first, again, rows = db.run(main)
    assert first.stored == [stored] and again.stored == []
    # The store job is born running, leased to the worker that stores it after the commit.
    assert rows == [("store", "running", LEASE.worker), ("relay", "ready", None)]


def test_a_notice_is_claimed_by_one_node_only(db: Backend) -> None:
    notice = StoreLocal("timer:opec-1@pec.a:bob@pec.b:12h", "alice@pec.a", b"n", None, T0)
    claim = ClaimNotice(
        "opec-1@pec.a",
        "bob@pec.b",
        T0 + timedelta(hours=12),
        False,
        (notice, Record(TraceEventData(at=T0, event=TraceType.PREAVVISO_ERRORE_CONSEGNA))),
    )

    async def main(d: Database) -> tuple[Applied, Applied, int, Expectation | None]:
        await d.write(
            lambda s: apply(
                s, [Expect("opec-1@pec.a", ("bob@pec.b",), "alice@pec.a", TX, T0)], LEASE
            )
        )
        one = await d.write(lambda s: apply(s, [claim], LEASE))
        two = await d.write(lambda s: apply(s, [claim], LEASE))
        await d.write(
            lambda s: apply(
                s,
                [
                    TookCharge("opec-1@pec.a", ("bob@pec.b",), T0 + timedelta(hours=13)),
                    Settle(
                        "opec-1@pec.a", "bob@pec.b", T0 + timedelta(hours=14), "avvenuta-consegna"
                    ),
                ],
                LEASE,
            )
        )
        async with d.read_session() as s:
            events = len((await s.execute(TraceEvent.__table__.select())).all())
            row = await s.get(Expectation, ("opec-1@pec.a", "bob@pec.b"))
        return one, two, events, row

    one, two, events, row = db.run(main)
    assert (one.claimed, one.stored) == (1, [notice])
    assert (two.claimed, two.stored) == (0, [])  # the second claim takes no effect
    assert events == 1
    assert row is not None and row.presa_at is not None and row.outcome == "avvenuta-consegna"


def test_what_follows_a_job_takes_effect_only_for_the_stage_that_made_it(db: Backend) -> None:
    """Two stages racing for one job key (the same envelope on two connections): one job, and
    only the winner's trace event."""
    event = TraceEventData(at=T0, event=TraceType.RICEZIONE, pec_msgid="opec-1@pec.a")
    job = relay_job("delivery:opec-1@pec.a:x")
    racing = Enqueue(job.kind, job.key, job.payload, job.data, job.at, then=(Record(event),))

    async def main(d: Database) -> tuple[int, int]:
        await d.write(lambda s: apply(s, [racing], LEASE))
        await d.write(lambda s: apply(s, [racing], LEASE))
        async with d.read_session() as s:
            found = await jobs.list_jobs(s, limit=10)
            events = len((await s.execute(TraceEvent.__table__.select())).all())
        return len(found), events

    assert db.run(main) == (1, 1)
