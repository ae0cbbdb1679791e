"""The hot path's own statements (store/pgfast.py on PostgreSQL, store/sqlitefast.py on SQLite)
write exactly the rows that ``store.effects.apply`` writes, in the same order; a lost lease
commits nothing; effects that need reads are left to ``apply``."""

from __future__ import annotations

import asyncio
import functools
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from sqlalchemy import text

from pecd.engine.effects import (
    ClaimNotice,
    Effect,
    Enqueue,
    Expect,
    KeepInfected,
    Record,
    Settle,
    StoreLocal,
    TookCharge,
)
from pecd.engine.vocab import JobKind, RelayKind, RelayPayload, TraceEventData, TraceType
from pecd.pec.builders import Destinatario, Transmission
from pecd.pec.vocab import DestinatarioTipo
from pecd.store import jobs, sqlitefast
from pecd.store import webhooks as store_webhooks
from pecd.store.db import Database, migrate_async
from pecd.store.effects import Applied, Lease, apply, one_statement
from pecd.store.models import Domain, Mailbox
from pecd.store.pgfast import LeasesLost
from store_fixtures import Backend, db_fixture, pg_url_fixture, sqlite_template_fixture

__all__ = ["db_fixture", "pg_url_fixture", "sqlite_template_fixture"]

T0 = datetime(2026, 3, 1, 9, 0, tzinfo=UTC)
WORKER = "node:pipeline0"
LEASE = Lease(WORKER, T0 + timedelta(minutes=5))
TX = Transmission(
    identificativo="opec-1@pec.a",
    mittente="alice@pec.a",
    destinatari=(
        Destinatario("bob@pec.b", DestinatarioTipo.CERTIFICATO),
        Destinatario("carol@pec.b", DestinatarioTipo.CERTIFICATO),
    ),
    risposte="alice@pec.a",
    oggetto="Prova",
    msgid="<c1@client>",
)
TABLES = {
    "jobs": "kind, key, state, payload, data, attempts, next_run_at, locked_by, locked_until,"
    " last_error, created_at, updated_at, leased_by",
    "trace_events": "at, event, pec_msgid, client_msgid, sender, recipients, subject, provider,"
    " generated_ids, error, daticert, data, node",
    "expectations": "pec_msgid, recipient, sender, tx, sent_at, presa_at, delivered_at,"
    " closed_at, outcome",
}


def event(kind: str, msgid: str, **more: Any) -> TraceEventData:
    return TraceEventData(at=T0, event=kind, pec_msgid=msgid, sender="alice@pec.a", **more)


def relay(key: str, then: tuple[Effect, ...] = ()) -> Enqueue:
    payload = RelayPayload(("bob@pec.b",), "opec-1@pec.a", "alice@pec.a", RelayKind.ENVELOPE, TX)
    return Enqueue(JobKind.RELAY, key, payload, b"env", T0, run_at=T0 + timedelta(1), then=then)


def stage_effects() -> list[Effect]:
    """What a batch of stages makes: every kind of effect the one-statement commit takes."""
    return [
        Record(
            event(
                TraceType.ACCETTAZIONE,
                "opec-1@pec.a",
                client_msgid="<c1@client>",
                recipients=[{"address": "bob@pec.b", "tipo": "certificato"}],
                subject="Prova \u00e8 \x00",  # a NUL is made storable
                generated_ids=["a1@pec.a"],
                daticert={"mittente": "alice@pec.a", "destinatari": ["bob@pec.b"]},
                data={"intake": "k1"},
            )
        ),
        StoreLocal("k:accettazione", "alice@pec.a", b"receipt", "m1@pec.a", T0, unique=True),
        relay("k:relay:new", then=(Record(event(TraceType.RICEZIONE, "opec-1@pec.a")),)),
        # Its job is there already: its trace event is not written again.
        relay("k:relay:old", then=(Record(event(TraceType.RICEZIONE, "opec-old@pec.a")),)),
        Expect("opec-1@pec.a", ("bob@pec.b", "carol@pec.b"), "alice@pec.a", TX, T0),
        TookCharge("opec-0@pec.a", ("Bob@pec.b",), T0 + timedelta(minutes=1)),
        Settle("opec-0@pec.a", "carol@pec.b", T0 + timedelta(minutes=2), "avvenuta-consegna"),
        Settle("opec-0@pec.a", "dan@pec.b", T0 + timedelta(minutes=3), "scaduto"),
        Record(event(TraceType.AVVENUTA_CONSEGNA, "opec-0@pec.a", data=None)),
    ]


async def setup(d: Database) -> list[int]:
    """Rows already there: a job of a key the stage makes again, the timer rows it touches,
    two jobs claimed by the worker (the stages being committed); returns their ids."""
    old = Expect("opec-0@pec.a", ("bob@pec.b", "carol@pec.b", "dan@pec.b"), "x@pec.a", TX, T0)
    await d.write(lambda s: apply(s, [relay("k:relay:old"), old], LEASE))
    for key in ("sub:1", "sub:2"):
        await d.write(
            functools.partial(
                jobs.enqueue_sync, kind=JobKind.SUBMISSION, key=key, payload={}, data=b"x", now=T0
            )
        )
    claimed = await jobs.claim_batch(
        d,
        kinds=[JobKind.SUBMISSION],
        worker=WORKER,
        now=T0,
        lease=timedelta(minutes=5),
        limit=10,
    )
    return [j.id for j in claimed]


async def fast(d: Database, effects: list[Effect], done: list[int]) -> Applied:
    plan = one_statement(effects, LEASE, None, frozenset())
    assert plan is not None
    if d.pg is not None:
        created = await d.pg.commit(
            jobs=plan.jobs,
            expect=plan.expect,
            presa=plan.presa,
            settle=plan.settle,
            events=plan.events,
            done=done,
            worker=WORKER,
        )
    else:
        assert d.sqlite_writer
        created = await d.write_sqlite(
            functools.partial(sqlitefast.commit, plan=plan, done=done, worker=WORKER)
        )
    return plan.applied(created)


async def snapshot(d: Database) -> dict[str, list[tuple[Any, ...]]]:
    out = {}
    async with d.read_session() as s:
        for table, columns in TABLES.items():
            order = "pec_msgid, recipient" if table == "expectations" else "id"
            rows = await s.execute(text(f"SELECT {columns} FROM {table} ORDER BY {order}"))
            out[table] = [tuple(r) for r in rows]
    return out


async def empty(d: Database) -> None:
    async with d.session() as s, s.begin():
        for table in TABLES:
            await s.execute(text(f"DELETE FROM {table}"))


def test_the_fast_commit_writes_what_apply_writes(db: Backend) -> None:
    async def main(d: Database) -> None:
        done = await setup(d)
        effects = stage_effects()

        def slow(s: Any) -> Applied:
            applied = apply(s, effects, LEASE)
            assert jobs.complete_many_sync(s, done, worker=WORKER) == len(done)
            return applied

        by_apply = await d.write(slow)
        expected = await snapshot(d)
        await empty(d)
        done = await setup(d)
        by_fast = await fast(d, effects, done)
        assert await snapshot(d) == expected
        assert by_fast.stored == by_apply.stored == [effects[1]]
        events = [r[1] for r in expected["trace_events"]]
        assert events == [
            TraceType.ACCETTAZIONE,
            TraceType.RICEZIONE,  # the new relay job's, in its place; not the old one's
            TraceType.AVVENUTA_CONSEGNA,
        ]

    db.run(main)


def charge_and_settle() -> list[Effect]:
    """A delivery batch taking charge of and settling the same recipients (engine/delivery.py
    emits both for a local delivery of our own transmission), in either order, and one of each
    alone."""
    later = T0 + timedelta(minutes=4)
    return [
        TookCharge("opec-0@pec.a", ("Bob@pec.b", "carol@pec.b"), T0 + timedelta(minutes=1)),
        Settle("opec-0@pec.a", "bob@pec.b", T0 + timedelta(minutes=2), "avvenuta-consegna"),
        Settle("opec-0@pec.a", "dan@pec.b", T0 + timedelta(minutes=3), "avvenuta-consegna"),
        TookCharge("opec-0@pec.a", ("dan@pec.b",), T0 + timedelta(minutes=3)),
        Settle("opec-0@pec.a", "erin@pec.b", later, "avvenuta-consegna"),
        TookCharge("opec-0@pec.a", ("erin@pec.b",), later),
        TookCharge("opec-0@pec.a", ("fay@pec.b",), later),
        Settle("opec-0@pec.a", "fay@pec.b", later, "scaduto"),
    ]


def instant(value: Any) -> datetime | None:
    """A timestamp column as read raw: SQLite gives SQLAlchemy's naive UTC text."""
    if isinstance(value, str):
        return datetime.fromisoformat(value).replace(tzinfo=UTC)
    assert value is None or isinstance(value, datetime)
    return value


@pytest.mark.parametrize("reverse", [False, True], ids=["in-order", "reversed"])
def test_presa_and_outcome_of_one_recipient_in_one_batch(db: Backend, reverse: bool) -> None:
    """Both the presa in carico and the outcome are written, as apply() writes them: on
    PostgreSQL two updates of one row in one statement would keep only one of them. Some rows
    are already marked: erin's presa and fay's outcome stay as they were."""
    before = [
        Expect("opec-0@pec.a", ("erin@pec.b", "fay@pec.b"), "x@pec.a", TX, T0),
        TookCharge("opec-0@pec.a", ("erin@pec.b",), T0),
        Settle("opec-0@pec.a", "fay@pec.b", T0, "avvenuta-consegna"),
    ]
    effects = charge_and_settle()
    if reverse:
        effects.reverse()

    async def main(d: Database) -> None:
        assert one_statement(effects, LEASE, None, frozenset()) is not None

        def slow(s: Any) -> None:
            apply(s, effects, LEASE)
            assert jobs.complete_many_sync(s, done, worker=WORKER) == len(done)

        done = await setup(d)
        await d.write(lambda s: apply(s, before, LEASE))
        await d.write(slow)
        expected = await snapshot(d)
        marked = {r[1]: (*map(instant, r[5:8]), r[8]) for r in expected["expectations"]}
        # (presa_at, delivered_at, closed_at, outcome) as apply() leaves them
        ok = "avvenuta-consegna"
        assert marked["bob@pec.b"] == (
            T0 + timedelta(minutes=1),
            *[T0 + timedelta(minutes=2)] * 2,
            ok,
        )
        assert marked["dan@pec.b"] == (T0 + timedelta(minutes=3),) * 3 + (ok,)
        assert marked["erin@pec.b"] == (T0, *[T0 + timedelta(minutes=4)] * 2, ok)
        assert marked["fay@pec.b"] == (T0 + timedelta(minutes=4), T0, T0, ok)
        await empty(d)
        done = await setup(d)
        await d.write(lambda s: apply(s, before, LEASE))
        await fast(d, effects, done)
        assert await snapshot(d) == expected

    db.run(main)


def test_a_lost_lease_commits_nothing(db: Backend) -> None:
    async def main(d: Database) -> None:
        done = await setup(d)
        before = await snapshot(d)
        # Another worker's job among them: the whole commit fails.
        stolen = await d.write(
            functools.partial(
                jobs.enqueue_sync,
                kind=JobKind.SUBMISSION,
                key="sub:other",
                payload={},
                now=T0,
                lease_to="node:other",
                lease_until=T0 + timedelta(minutes=5),
            )
        )
        assert stolen
        async with d.read_session() as s:
            other = (await s.execute(text("SELECT id FROM jobs WHERE key = 'sub:other'"))).one()
        after_enqueue = await snapshot(d)
        with pytest.raises(LeasesLost):
            await fast(d, stage_effects(), [*done, other[0]])
        assert await snapshot(d) == after_enqueue
        assert len(after_enqueue["jobs"]) == len(before["jobs"]) + 1

    db.run(main)


def test_effects_that_read_are_left_to_apply() -> None:
    claim = ClaimNotice("opec-1@pec.a", "bob@pec.b", T0, final=False, then=())
    infected = KeepInfected("v", T0, "access", "Eicar", None, None, (), b"x")
    nested = relay("k:r", then=(relay("k:r2"),))
    delivered = Record(
        event(
            TraceType.AVVENUTA_CONSEGNA,
            "opec-1@pec.a",
            data={"consegna": "bob@pec.b"},
        )
    )
    twice = [relay("k:same"), relay("k:same")]
    made_and_closed = [
        Expect("opec-1@pec.a", ("bob@pec.b",), "alice@pec.a", TX, T0),
        Settle("opec-1@pec.a", "bob@pec.b", T0, "avvenuta-consegna"),
    ]
    for effects in ([claim], [infected], [nested], twice, made_and_closed):
        assert one_statement(effects, LEASE, None, frozenset()) is None
    # A delivery event reads the trace log only for a mailbox with a webhook.
    assert one_statement([delivered], LEASE, None, frozenset()) is not None
    assert one_statement([delivered], LEASE, None, frozenset({"alice@pec.a"})) is None
    accepted = Record(event(TraceType.ACCETTAZIONE, "opec-1@pec.a", data={"intake": "k"}))
    plan = one_statement([accepted], LEASE, None, frozenset({"alice@pec.a"}))
    assert plan is not None and len(plan.hooks) == 1 and len(plan.jobs) == 1


def test_a_webhook_set_in_this_process_is_seen_at_once(db: Backend) -> None:
    async def main(d: Database) -> None:
        async with d.session() as s, s.begin():
            s.add(Domain(name="pec.a", created_at=T0))
            await s.flush()
            s.add(Mailbox(address="alice@pec.a", domain="pec.a", password_hash="x", created_at=T0))
        seen = await d.write(lambda s: store_webhooks.job_for(s, accepted_event()))
        assert seen is None
        await store_webhooks.set_webhook(d, "alice@pec.a", "https://h.example/x", "s" * 32, T0)
        # The list read a moment ago (no webhook) is not used once one is set here.
        job = await d.write(lambda s: store_webhooks.job_for(s, accepted_event()))
        assert job is not None and job["kind"] == JobKind.WEBHOOK
        assert await store_webhooks.delete_webhook(d, "alice@pec.a")
        assert await d.write(lambda s: store_webhooks.job_for(s, accepted_event())) is None

    db.run(main)


def accepted_event() -> TraceEventData:
    return event(TraceType.ACCETTAZIONE, "opec-9@pec.a", data={"intake": "k9"})


def test_a_failed_sqlite_write_leaves_nothing_and_the_writer_usable(tmp_path: Any) -> None:
    url = f"sqlite:///{tmp_path}/pecd.db"

    async def main() -> None:
        await migrate_async(url)
        d = await Database.open(url)
        try:
            row = jobs.job_row(kind=JobKind.SUBMISSION, key="k1", payload={"a": None}, now=T0)

            def half(conn: Any) -> None:
                sqlitefast.insert_jobs(conn, [row])
                raise RuntimeError("the stage broke")

            with pytest.raises(RuntimeError):
                await d.write_sqlite(half)
            assert await d.write_sqlite(lambda conn: sqlitefast.insert_jobs(conn, [row])) == {"k1"}
            # Read back through SQLAlchemy as written by it.
            [job] = await jobs.claim_batch(
                d,
                kinds=[JobKind.SUBMISSION],
                worker=WORKER,
                now=T0,
                lease=timedelta(minutes=1),
                limit=5,
            )
            async with d.read_session() as s:
                again = await jobs.get_job(s, job.id)
            assert again is not None
            assert (job.key, job.payload, job.created_at) == ("k1", {"a": None}, T0)
            assert (again.payload, again.created_at, again.locked_by) == ({"a": None}, T0, WORKER)
        finally:
            await d.close()

    asyncio.run(main())
