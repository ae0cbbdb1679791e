"""The main process's database work per job, without SMTP or format processes: CPU time (user and
system) of the hot path's transactions as the workers run them (intake of a batch, claim, a
stage batch's commit, the completion of its store jobs), on SQLite or PostgreSQL.

    .venv/bin/python bench/bench_store.py                      # SQLite in a temporary directory
    .venv/bin/python bench/bench_store.py --postgres postgresql://postgres@127.0.0.1:5432/test
    .venv/bin/python bench/bench_store.py --parts               # per part, min of 7 repeats

Each round: ``--batch`` submissions committed by the intake, claimed, committed by a stage with
two trace events, a store job and a next job each (what a submission stage makes), their store
jobs completed. A PostgreSQL run uses a fresh database of its own, dropped afterwards.

``--parts`` times the main process's parts of a job one by one instead, each the best of seven
repeats, in microseconds of CPU per job (or per call): the plan of a stage's effects
(:func:`~pecd.store.effects.one_statement`), its rows on SQLite (rolled back: the statements,
without the commit's fsync), a round trip to the SQLite writer thread, and the real
:class:`~pecd.runtime.workers.WorkerPool` claiming batches and committing them for a fake stage
that makes those effects. To compare two trees in one run, point ``PYTHONPATH`` at the other
tree's ``src`` (this file uses nothing that either lacks).
"""

from __future__ import annotations

import argparse
import asyncio
import resource
import sqlite3
import sys
import tempfile
import time
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from pecd.engine.effects import Effect, Enqueue, Record, StoreLocal
from pecd.engine.vocab import IntakePayload, JobKind, StorePayload, TraceEventData
from pecd.store import jobs, sqlitefast
from pecd.store.db import Database, migrate_async
from pecd.store.effects import Lease, apply, commit_plan, one_statement

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


def submissions(batch: int, now: datetime) -> list[dict[str, Any]]:
    """``batch`` rows of SUBMISSION jobs of 4 KB, as the access point makes them."""
    payload = IntakePayload("alice@pec.example", ("bob@pec.example",), now).to_json()
    return [
        jobs.job_row(
            kind=JobKind.SUBMISSION,
            key=f"sub:{uuid.uuid4().hex}",
            payload=payload,
            data=b"m" * 4096,
            now=now,
        )
        for _ in range(batch)
    ]


async def commit(db: Database, effects: list[Effect], ids: list[int], lease: Lease) -> int:
    plan = one_statement(effects, lease, None, frozenset())
    assert plan is not None
    if db.pg is not None or db.sqlite_writer:
        return len(plan.applied(await commit_plan(db, plan, ids, WORKER)).stored)
    return len(await db.write(lambda s: apply(s, effects, lease).stored))


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
            rows = submissions(batch, now)
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


def best(fn: Any, n: int, repeat: int = 7) -> float:
    """The least CPU time of ``n`` calls of ``fn`` over ``repeat`` tries, per call."""
    times = []
    for _ in range(repeat):
        t0 = time.process_time()
        for _ in range(n):
            fn()
        times.append((time.process_time() - t0) / n)
    return min(times)


async def best_async(fn: Any, n: int, repeat: int = 7) -> float:
    times = []
    for _ in range(repeat):
        t0 = time.process_time()
        for _ in range(n):
            await fn()
        times.append((time.process_time() - t0) / n)
    return min(times)


class FakeRunner:
    """A job runner whose stage makes :func:`stage_effects` and stores nothing."""

    def __init__(self, db: Database, batch: int) -> None:
        from pecd.runtime.stages import Outbox

        self.db = db
        self.outbox_type = Outbox
        self.cfg = SimpleNamespace(
            queue=SimpleNamespace(
                lease_seconds=120,
                batch=batch,
                max_attempts=5,
                poll_seconds=1,
                drain_seconds=5,
                base_delay_seconds=1,
                max_delay_seconds=60,
            )
        )
        self.clock = SimpleNamespace(now=lambda: datetime.now(UTC))
        self.wake = asyncio.Event()
        self.relay_wake = asyncio.Event()
        self.webhook_wake = asyncio.Event()

    async def prepare(self, job: Any) -> list[Effect]:
        return stage_effects(job.id, job.created_at)

    def outbox(self, worker: str) -> Any:
        return self.outbox_type(worker, datetime.now(UTC) + timedelta(minutes=2))

    async def flush(self, outbox: Any) -> None:
        return None


async def parts(url: str, batch: int) -> None:
    from pecd.runtime.workers import WorkerPool

    await migrate_async(url)
    db = await Database.open(url)
    now = datetime.now(UTC)
    lease = Lease(WORKER, now + timedelta(minutes=2))
    effects = [e for i in range(batch) for e in stage_effects(i, now)]
    us: dict[str, float] = {}
    try:
        plan = one_statement(effects, lease, None, frozenset())
        us["plan of a stage's effects, per job"] = (
            best(lambda: one_statement(effects, lease, None, frozenset()), 200) / batch
        )
        if db.sqlite_writer:
            conn = sqlite3.connect(url.removeprefix("sqlite:///"), isolation_level=None)

            def rows() -> None:
                conn.execute("BEGIN IMMEDIATE")
                sqlitefast.commit(conn, plan, [], WORKER)
                conn.execute("ROLLBACK")

            us["its rows on SQLite (rolled back), per job"] = best(rows, 200) / batch
            conn.close()
            us["a round trip to the writer thread, per call"] = await best_async(
                lambda: db.write_sqlite(lambda conn: None), 300
            )
        pool = WorkerPool(FakeRunner(db, batch), [JobKind.SUBMISSION], count=1, name="bench")
        claims, runs = [], []
        for _ in range(7):
            spent = [0.0, 0.0]
            for _ in range(30):
                rows_in = submissions(batch, now)
                await intake(db, rows_in)
                t0 = time.process_time()
                claimed = await jobs.claim_batch(
                    db,
                    kinds=[JobKind.SUBMISSION],
                    worker=WORKER,
                    now=datetime.now(UTC),
                    lease=timedelta(minutes=2),
                    limit=batch,
                )
                t1 = time.process_time()
                await pool._run_batch(WORKER, claimed)
                spent[0] += t1 - t0
                spent[1] += time.process_time() - t1
                assert len(claimed) == batch
            claims.append(spent[0] / 30 / batch)
            runs.append(spent[1] / 30 / batch)
        us["claim (jobs.claim_batch), per job"] = min(claims)
        us["WorkerPool: prepare + commit, per job"] = min(runs)
    finally:
        await db.close()
    print(f"pecd store bench, parts: batches of {batch}, db={url.split(':')[0]}, CPU")
    for name, value in us.items():
        print(f"  {name:46s}: {value * 1e6:8.1f} us")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--postgres", help="a PostgreSQL server URL; default: SQLite")
    ap.add_argument("--rounds", type=int, default=100)
    ap.add_argument("--batch", type=int, default=10)
    ap.add_argument("--parts", action="store_true", help="time the parts of a job one by one")
    args = ap.parse_args()

    def bench(url: str) -> None:
        asyncio.run(parts(url, args.batch) if args.parts else run(url, args.rounds, args.batch))

    if args.postgres is None:
        with tempfile.TemporaryDirectory() as tmp:
            bench(f"sqlite:///{Path(tmp) / 'pecd.db'}")
        return
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
    import os

    from store_fixtures import PG_ENV, fresh_postgres_database

    os.environ[PG_ENV] = args.postgres
    url, drop = fresh_postgres_database()
    try:
        bench(url)
    finally:
        drop()


if __name__ == "__main__":
    main()
