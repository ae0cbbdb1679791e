"""SQLite's writer thread (store/db.py): its own kept connection for the hot path, the same
transactions as before; and the conversions of the hot path's rows (time text, JSON, trace
rows) give what the slower ones gave."""

from __future__ import annotations

import asyncio
import json
import sqlite3
import threading
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path
from types import MappingProxyType
from typing import Any

import pytest

from pecd.engine.vocab import JobKind, TraceEventData
from pecd.store import jobs, sqlitefast
from pecd.store.db import Database, migrate_async
from pecd.store.pgfast import dumps
from pecd.store.trace import event_row, storable

T0 = datetime(2026, 3, 1, 9, 0, tzinfo=UTC)


def run(tmp_path: Path, scenario: Any) -> Any:
    url = f"sqlite:///{tmp_path}/pecd.db"

    async def main() -> Any:
        await migrate_async(url)
        db = await Database.open(url)
        try:
            return await scenario(db)
        finally:
            await db.close()

    return asyncio.run(main())


def count_jobs(conn: sqlite3.Connection) -> int:
    return int(conn.execute("SELECT count(*) FROM jobs").fetchone()[0])


def test_the_hot_path_keeps_one_connection_in_one_thread(tmp_path: Path) -> None:
    """Every write_sqlite gets the same sqlite3 connection, set up as SQLAlchemy's are, in the
    one writer thread that also runs the sessions of write()."""

    async def scenario(db: Database) -> None:
        seen = [await db.write_sqlite(lambda conn: (id(conn), threading.get_ident())) for _ in "ab"]
        assert seen[0] == seen[1]
        session_thread = await db.write(lambda s: threading.get_ident())
        assert session_thread == seen[0][1] != threading.get_ident()

        def pragmas(conn: sqlite3.Connection) -> tuple[Any, ...]:
            return tuple(
                conn.execute(f"PRAGMA {name}").fetchone()[0]
                for name in ("journal_mode", "synchronous", "busy_timeout", "foreign_keys")
            )

        assert await db.write_sqlite(pragmas) == ("wal", 2, 60_000, 1)
        assert await db.write_sqlite(lambda conn: conn.isolation_level) is None

    run(tmp_path, scenario)


def test_a_connection_that_cannot_roll_back_is_replaced(tmp_path: Path) -> None:
    """A transaction whose ROLLBACK fails too (the connection broken under it) raises, and the
    next write opens a new connection instead of inheriting a transaction left open."""

    async def scenario(db: Database) -> None:
        row = jobs.job_row(kind=JobKind.SUBMISSION, key="k1", payload={}, now=T0)
        first = await db.write_sqlite(lambda conn: conn)  # kept: its id is not reused

        def broken(conn: sqlite3.Connection) -> None:
            sqlitefast.insert_jobs(conn, [row])
            conn.close()  # now neither the COMMIT nor the ROLLBACK can run
            raise RuntimeError("the stage broke")

        with pytest.raises(sqlite3.ProgrammingError):
            await db.write_sqlite(broken)
        assert await db.write_sqlite(lambda conn: conn) is not first
        assert await db.write_sqlite(count_jobs) == 0
        assert await db.write_sqlite(lambda conn: sqlitefast.insert_jobs(conn, [row])) == {"k1"}

    run(tmp_path, scenario)


def test_an_exception_of_any_kind_comes_back_and_rolls_back(tmp_path: Path) -> None:
    async def scenario(db: Database) -> None:
        row = jobs.job_row(kind=JobKind.SUBMISSION, key="k1", payload={}, now=T0)

        def stops(conn: sqlite3.Connection) -> None:
            sqlitefast.insert_jobs(conn, [row])
            raise StopIteration  # a future refuses to carry it as it is

        with pytest.raises(RuntimeError, match="StopIteration"):
            await db.write_sqlite(stops)
        with pytest.raises(sqlite3.IntegrityError):
            await db.write_sqlite(lambda conn: conn.execute("INSERT INTO jobs (id) VALUES (1)"))
        assert await db.write_sqlite(count_jobs) == 0

    run(tmp_path, scenario)


def test_a_write_given_up_before_it_began_is_not_run(tmp_path: Path) -> None:
    """As with an executor: a queued write whose caller was cancelled never runs; one that
    began still commits."""

    async def scenario(db: Database) -> None:
        started = threading.Event()
        release = threading.Event()

        def slow(conn: sqlite3.Connection) -> None:
            started.set()
            release.wait(10)
            sqlitefast.insert_jobs(
                conn, [jobs.job_row(kind=JobKind.SUBMISSION, key="slow", payload={}, now=T0)]
            )

        def late(conn: sqlite3.Connection) -> None:
            sqlitefast.insert_jobs(
                conn, [jobs.job_row(kind=JobKind.SUBMISSION, key="late", payload={}, now=T0)]
            )

        first = asyncio.ensure_future(db.write_sqlite(slow))
        await asyncio.to_thread(started.wait, 10)
        second = asyncio.ensure_future(db.write_sqlite(late))
        await asyncio.sleep(0)
        first.cancel()
        second.cancel()
        release.set()
        for task in (first, second):
            with pytest.raises(asyncio.CancelledError):
                await task
        keys = await db.write_sqlite(lambda conn: conn.execute("SELECT key FROM jobs").fetchall())
        assert keys == [("slow",)]

    run(tmp_path, scenario)


def test_no_write_after_close(tmp_path: Path) -> None:
    async def scenario() -> None:
        url = f"sqlite:///{tmp_path}/pecd.db"
        await migrate_async(url)
        db = await Database.open(url)
        await db.close()
        await db.close()  # twice is fine
        with pytest.raises(RuntimeError):
            await db.write_sqlite(count_jobs)

    asyncio.run(scenario())


@pytest.mark.parametrize(
    "value",
    [
        datetime(2026, 3, 1, 9, 0, tzinfo=UTC),
        datetime(2026, 3, 1, 9, 0, 0, 7, tzinfo=UTC),
        datetime(1, 1, 1, 0, 0, 0, 1, tzinfo=UTC),
        datetime(9999, 12, 31, 23, 59, 59, 999999, tzinfo=UTC),
        datetime(2026, 3, 1, 9, 0, tzinfo=timezone(timedelta(hours=2))),
        datetime(2026, 3, 1, 0, 30, 0, 1, tzinfo=timezone(timedelta(hours=-5, minutes=-30))),
    ],
)
def test_time_text_is_naive_utc_with_microseconds(value: datetime) -> None:
    expected = value.astimezone(UTC).replace(tzinfo=None).isoformat(" ", "microseconds")
    assert sqlitefast.time_text(value) == expected
    assert sqlitefast.time_text(value) == expected  # the remembered one too
    # An equal instant in another object, or another instant: converted afresh.
    assert sqlitefast.time_text(value - timedelta(microseconds=1)) != expected
    assert sqlitefast.time_text(value.replace()) == expected


def test_time_text_refuses_naive_datetimes() -> None:
    with pytest.raises(ValueError, match="naive"):
        sqlitefast.time_text(datetime(2026, 3, 1, 9, 0))


@pytest.mark.parametrize(
    "value", [None, [], {}, "\x00", ["a", {"b": None}], {"è": "\u2028", "n": 1.5, "t": True}]
)
def test_dumps_is_json_dumps(value: Any) -> None:
    assert dumps(value) == json.dumps(value)


def test_event_row_copies_and_cleans_every_json_field() -> None:
    """Read-only mappings and tuples become plain dicts and lists (what JSON columns take),
    with NULs and lone surrogates replaced, as storable() of a copy gave."""
    recipients = (MappingProxyType({"address": "bob\x00@pec.a", "tipo": "certificato"}),)
    event = TraceEventData(
        at=T0,
        event="accettazione",
        pec_msgid="opec-1@pec.a",
        sender="alice@pec.a\udcff",
        recipients=recipients,
        generated_ids=("g\x00", "h"),
        daticert=MappingProxyType({"oggetto": "x\x00", "k\x00": ("a", "b")}),
        data=MappingProxyType({"intake": "k1"}),
    )
    row = event_row(event)
    assert row["recipients"] == [{"address": "bob\ufffd@pec.a", "tipo": "certificato"}]
    assert type(row["recipients"][0]) is dict
    assert row["generated_ids"] == ["g\ufffd", "h"]
    assert row["daticert"] == {"oggetto": "x\ufffd", "k\ufffd": ["a", "b"]}
    assert type(row["data"]) is dict and row["data"] == {"intake": "k1"}
    assert row["sender"] == storable("alice@pec.a\udcff")
    assert row["client_msgid"] is None and row["node"] is None
    # What the row used to be: the same, field for field.
    assert row["recipients"] == [storable(dict(r)) for r in recipients]
    assert row["daticert"] == storable(dict(event.daticert or {}))
    empty = event_row(TraceEventData(at=T0, event="ricezione"))
    assert (empty["recipients"], empty["generated_ids"], empty["daticert"]) == ([], [], None)


def test_a_cancelled_close_still_closes_and_takes_no_more_work(tmp_path: Path) -> None:
    """The writer's close is final at once (a write submitted meanwhile is refused, not run on
    a connection nobody would close), and a close whose caller is cancelled still closes the
    kept connection and ends the thread, without blocking the event loop."""
    url = f"sqlite:///{tmp_path}/pecd.db"

    async def main() -> None:
        await migrate_async(url)
        db = await Database.open(url)
        writer = db._writer_thread
        assert writer is not None
        await db.write_sqlite(lambda conn: None)  # the kept connection is open
        release = threading.Event()
        slow = writer.submit(lambda: release.wait(5))  # the thread is busy
        closing = asyncio.create_task(writer.close())
        await asyncio.sleep(0)
        with pytest.raises(RuntimeError, match="closed"):
            await db.write_sqlite(lambda conn: None)
        closing.cancel()
        with pytest.raises(asyncio.CancelledError):
            await closing
        # The loop still runs while the thread finishes its queue.
        await asyncio.sleep(0.05)
        release.set()
        assert await slow is True
        await asyncio.to_thread(writer._thread.join, 5)
        assert not writer._thread.is_alive()
        assert writer._conn is None
        await db.close()  # the rest of the database; the writer is closed already

    asyncio.run(main())
