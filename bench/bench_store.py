"""The main process's database work per job, without SMTP or format processes: CPU time (user and
system) of the hot path's transactions as the workers run them (intake of a batch, claim, a
stage batch's commit, the completion of its store jobs), on SQLite or PostgreSQL.

    .venv/bin/python bench/bench_store.py                      # SQLite in a temporary directory
    .venv/bin/python bench/bench_store.py --postgres postgresql://postgres@127.0.0.1:5432/test

Each round: ``--batch`` submissions committed by the intake, claimed, committed by a stage with
two trace events, a store job and a next job each (what a submission stage makes), their store
jobs completed. A PostgreSQL run uses a fresh database of its own, dropped afterwards.
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import resource
import sys
import tempfile
import time
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from pecd.engine.effects import Effect, Enqueue, Record, StoreLocal
from pecd.engine.vocab import IntakePayload, JobKind, StorePayload, TraceEventData
from pecd.store import jobs, sqlitefast
from pecd.store.db import Database, migrate_async
from pecd.store.effects import Lease, apply, one_statement

WORKER = "bench:pipeline0"


def stage_effects(i: int, now: datetime) -> list[Effect]:
    mid = f"opec.{uuid.uuid4().hex}@pec.example"
    rcpts = [{"address": "bob@pec.example", "tipo": "certificato"}]
    accepted = TraceEventData(
        at=now,
        event="accettazione",
        pec_msgid=mid,
        client_msgid=f"<c{i}@client>",
        sender="alice@pec.example",
        recipients=rcpts,
        subject="bench",
        provider="example",
        generated_ids=[mid],
        daticert={"mittente": "alice@pec.example", "destinatari": ["bob@pec.example"]},
        data={"intake": f"k{i}"},
    )
    envelope = TraceEventData(at=now, event="busta-trasporto", pec_msgid=mid, recipients=rcpts)
    return [
        Record(accepted),
        Record(envelope),
        StoreLocal(f"store:{mid}", "alice@pec.example", b"r" * 3000, mid, now),
        Enqueue(JobKind.STORE, f"next:{mid}", StorePayload("bob@pec.example"), b"e" * 5000, now),
    ]


async def intake(db: Database, rows: list[dict[str, Any]]) -> None:
    if db.pg is not None:
        await db.pg.insert_jobs(rows)
    elif db.sqlite_writer:
        await db.write_sqlite(lambda conn: sqlitefast.insert_jobs_blind(conn, rows))
    else:
        await db.write(lambda s: jobs.insert_many_sync(s, rows))


async def commit(db: Database, effects: list[Effect], ids: list[int], lease: Lease) -> int:
    plan = one_statement(effects, lease, None, frozenset())
    assert plan is not None
    if db.pg is not None:
        created = await db.pg.commit(
            jobs=plan.jobs,
            expect=plan.expect,
            presa=plan.presa,
            settle=plan.settle,
            events=plan.events,
            done=ids,
            worker=WORKER,
        )
    elif db.sqlite_writer:
        created = await db.write_sqlite(
            functools.partial(sqlitefast.commit, plan=plan, done=ids, worker=WORKER)
        )
    else:
        return len(await db.write(lambda s: apply(s, effects, lease).stored))
    return len(plan.applied(created).stored)


async def complete(db: Database, keys: list[str]) -> None:
    if db.pg is not None:
        await db.pg.complete_leased(keys, WORKER)
    elif db.sqlite_writer:
        await db.write_sqlite(lambda conn: sqlitefast.complete_leased(conn, keys, WORKER))
    else:
        await db.write(lambda s: jobs.complete_leased(s, keys, WORKER))


async def run(url: str, rounds: int, batch: int) -> None:
    await migrate_async(url)
    db = await Database.open(url)
    now = datetime.now(UTC)
    lease = Lease(WORKER, now + timedelta(minutes=2))
    spent = dict.fromkeys(("intake", "claim", "commit", "store"), 0.0)
    start = resource.getrusage(resource.RUSAGE_SELF)
    try:
        for _ in range(rounds):
            payload = IntakePayload("alice@pec.example", ("bob@pec.example",), now).to_json()
            rows = [
                jobs.job_row(
                    kind=JobKind.SUBMISSION,
                    key=f"sub:{uuid.uuid4().hex}",
                    payload=payload,
                    data=b"m" * 4096,
                    now=now,
                )
                for _ in range(batch)
            ]
            t0 = time.process_time()
            await intake(db, rows)
            t1 = time.process_time()
            claimed = await jobs.claim_batch(
                db,
                kinds=[JobKind.SUBMISSION],
                worker=WORKER,
                now=now,
                lease=timedelta(minutes=2),
                limit=batch,
            )
            t2 = time.process_time()
            effects = [e for i, _ in enumerate(claimed) for e in stage_effects(i, now)]
            stored = await commit(db, effects, [j.id for j in claimed], lease)
            t3 = time.process_time()
            keys = [e.key for e in effects if isinstance(e, StoreLocal)]
            await complete(db, keys)
            t4 = time.process_time()
            assert len(claimed) == batch and stored == batch
            for name, dt in zip(spent, (t1 - t0, t2 - t1, t3 - t2, t4 - t3), strict=True):
                spent[name] += dt
    finally:
        await db.close()
    end = resource.getrusage(resource.RUSAGE_SELF)
    n = rounds * batch
    print(f"pecd store bench: {rounds} rounds x {batch} jobs, db={url.split(':')[0]}")
    for name, total in spent.items():
        print(f"  CPU per job, {name:6s}           : {total / n * 1000:7.3f} ms")
    user = (end.ru_utime - start.ru_utime) / n * 1000
    system = (end.ru_stime - start.ru_stime) / n * 1000
    print(f"  CPU per job, user / system     : {user:7.3f} ms / {system:.3f} ms")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--postgres", help="a PostgreSQL server URL; default: SQLite")
    ap.add_argument("--rounds", type=int, default=100)
    ap.add_argument("--batch", type=int, default=10)
    args = ap.parse_args()
    if args.postgres is None:
        with tempfile.TemporaryDirectory() as tmp:
            asyncio.run(run(f"sqlite:///{Path(tmp) / 'pecd.db'}", args.rounds, args.batch))
        return
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
    import os

    from store_fixtures import PG_ENV, fresh_postgres_database

    os.environ[PG_ENV] = args.postgres
    url, drop = fresh_postgres_database()
    try:
        asyncio.run(run(url, args.rounds, args.batch))
    finally:
        drop()


if __name__ == "__main__":
    main()
