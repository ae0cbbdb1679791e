"""Engine, sessions and migrations for SQLite (embedded) and PostgreSQL (scale-out).

SQLite transactions
-------------------
The sqlite3 module's own transaction handling is switched off and pecd emits ``BEGIN`` itself.
Sessions from :meth:`Database.session` start with ``BEGIN IMMEDIATE``: the write lock is taken
up front, so a transaction that reads and then writes can never fail half-way with
"database is locked" because another connection wrote in between (WAL snapshots cannot be
upgraded). Writers queue on ``busy_timeout``. Pure readers may use :meth:`Database.read_session`
(plain deferred ``BEGIN``), which never waits for writers.

Hot-path writes
---------------
On PostgreSQL the hot path's own transactions (intake, claim, a stage's commit, the completion of
store jobs) are single statements in one round trip each (:mod:`pecd.store.pgfast`, ``db.pg``);
on SQLite they run in the writer thread straight over ``sqlite3`` (:mod:`pecd.store.sqlitefast`,
:meth:`Database.write_sqlite`). Everything else goes through the sessions here.

:meth:`Database.write` runs a whole transaction as one synchronous function. On SQLite it runs
in one thread of its own over the synchronous driver: the write lock is held only while the
statements run, not across event-loop turns (through aiosqlite every statement is a round trip
to the loop, and a busy loop stretched each transaction to about 10 ms while every other writer
waited). On PostgreSQL the same function runs through the async driver (``run_sync``).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import os
import queue
import sqlite3
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal, TypeVar

from sqlalchemy import Connection, Engine, event, text
from sqlalchemy import create_engine as create_sync_engine
from sqlalchemy.engine import make_url
from sqlalchemy.ext.asyncio import (
    AsyncEngine,
    AsyncSession,
    async_sessionmaker,
    create_async_engine,
)
from sqlalchemy.orm import Session, sessionmaker

import pecd
from pecd.store.pgfast import PgFast

_SQLITE_BEGIN = "pecd_sqlite_begin"
_MIGRATION_LOCK_ID = 0x70656364  # "pecd": serialises concurrent `migrate` runs on PostgreSQL

T = TypeVar("T")


def async_url(url: str) -> str:
    """The SQLAlchemy URL with the async driver: ``sqlite://`` -> ``sqlite+aiosqlite://``,
    ``postgresql://`` / ``postgres://`` -> ``postgresql+asyncpg://``. Explicit drivers are kept."""
    scheme, sep, rest = url.partition("://")
    if not sep:
        raise ValueError(f"not a database URL: {url!r}")
    if "+" in scheme:
        return url
    if scheme == "sqlite":
        return f"sqlite+aiosqlite://{rest}"
    if scheme in ("postgresql", "postgres"):
        return f"postgresql+asyncpg://{rest}"
    raise ValueError(f"unsupported database URL scheme {scheme!r} (use sqlite:// or postgresql://)")


def _sqlite_file(url: str) -> Path | None:
    """The database file of an SQLite URL, or None (in memory, URI filename)."""
    database = make_url(url).database
    if not database or database == ":memory:" or database.startswith("file:"):
        return None
    return Path(database)


def create_engine(url: str, **kwargs: Any) -> AsyncEngine:
    """An async engine for ``url`` with pecd's connection setup (SQLite pragmas and BEGIN modes).

    For SQLite the parent directory of the database file is created.
    """
    full = async_url(url)
    dialect = make_url(full).get_backend_name()
    if dialect == "sqlite":
        path = _sqlite_file(full)
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
    else:
        kwargs.setdefault("pool_pre_ping", True)
    engine = create_async_engine(full, **kwargs)
    if dialect == "sqlite":
        _install_sqlite_events(engine.sync_engine)
    return engine


def _sqlite_sync_writer(url: str) -> Engine:
    """The synchronous engine of :meth:`Database.write` on SQLite: one connection, used by one
    thread at a time (the writer thread; ``dispose`` may come from another)."""
    sync_url = make_url(async_url(url)).set(drivername="sqlite+pysqlite")
    engine = create_sync_engine(
        sync_url,
        pool_size=1,
        max_overflow=0,
        connect_args={"check_same_thread": False},
    )
    _install_sqlite_events(engine)

    @event.listens_for(engine, "connect")
    def _patient(dbapi_connection: Any, _record: Any) -> None:
        # Writes through the async engine (sealing, purges, accounts) hold the lock across
        # event-loop turns; the hot path waits for them as long as the async writers' pool
        # waits for its connection, rather than failing with "database is locked".
        dbapi_connection.execute(f"PRAGMA busy_timeout={WRITER_BUSY_TIMEOUT_MS}")

    return engine


WRITER_BUSY_TIMEOUT_MS = 60_000


def _set_up_sqlite(dbapi_connection: Any) -> None:
    """pecd's settings of every SQLite connection (``sqlite3`` or aiosqlite's adapter)."""
    # Autocommit at the sqlite3 level: transactions are begun by pecd (_on_begin below, the
    # writer thread's BEGIN IMMEDIATE).
    dbapi_connection.isolation_level = None
    cursor = dbapi_connection.cursor()
    try:
        cursor.execute("PRAGMA journal_mode=WAL")
        cursor.execute("PRAGMA synchronous=FULL")  # no 250 before durable
        cursor.execute("PRAGMA busy_timeout=10000")
        cursor.execute("PRAGMA foreign_keys=ON")
    finally:
        cursor.close()


def _install_sqlite_events(engine: Engine) -> None:
    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_connection: Any, _record: Any) -> None:
        _set_up_sqlite(dbapi_connection)

    @event.listens_for(engine, "begin")
    def _on_begin(conn: Connection) -> None:
        mode = conn.get_execution_options().get(_SQLITE_BEGIN, "IMMEDIATE")
        conn.exec_driver_sql(f"BEGIN {mode}")


_DEFERRED = "pecd.deferred"


def defer(session: Session, stmt: Any, params: dict[str, Any]) -> None:
    """Execute the INSERT ``stmt`` with ``params`` now or, inside :meth:`Database.write`, with
    the other rows deferred to it in one executemany just before the commit (for rows nothing
    in the transaction reads back, such as trace events)."""
    deferred: dict[Any, list[dict[str, Any]]] | None = session.info.get(_DEFERRED)
    if deferred is None:
        session.execute(stmt, params)
    else:
        deferred.setdefault(stmt, []).append(params)


def _with_deferred(session: Session, fn: Callable[[Session], T]) -> T:
    deferred: dict[Any, list[dict[str, Any]]] = {}
    session.info[_DEFERRED] = deferred
    try:
        result = fn(session)
        for stmt, rows in deferred.items():
            session.execute(stmt, rows)
        return result
    finally:
        session.info.pop(_DEFERRED, None)


_Work = tuple[Callable[[], Any], "asyncio.Future[Any]", asyncio.AbstractEventLoop]


def _settle(future: asyncio.Future[Any], result: Any, error: BaseException | None) -> None:
    """On the caller's loop: the answer of one write (unless the caller stopped waiting)."""
    if future.cancelled():
        return
    if error is None:
        future.set_result(result)
    elif isinstance(error, StopIteration):  # a future refuses it: it would end a coroutine
        future.set_exception(RuntimeError(f"a write raised {error!r}"))
    else:
        future.set_exception(error)


class _WriterThread:
    """SQLite's writer: one thread that runs the write transactions one after the other.

    The hot path's own transactions (:meth:`Database.write_sqlite`) run on a ``sqlite3``
    connection that the thread opens once and keeps: a checkout from SQLAlchemy's pool and its
    reset at checkin around every transaction cost more than a small transaction does. The
    others (:meth:`Database.write`) run in sessions of the synchronous engine in the same
    thread, so that this process never has two of its writers waiting on each other for
    SQLite's lock. Work comes through a queue and is answered on the caller's event loop: a
    thread of its own rather than an executor, whose chained futures cost as much again as the
    hand-over itself.
    """

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        database = engine.url.database
        if not database:
            raise ValueError("the SQLite writer needs a database file")
        self._path = os.path.abspath(database)  # as SQLAlchemy's pysqlite dialect opens it
        self._conn: sqlite3.Connection | None = None
        self._queue: queue.SimpleQueue[_Work | None] = queue.SimpleQueue()
        self._closed = False
        # A daemon: a process that exits without closing its database is not kept alive by it
        # (anything not committed then was never answered as committed).
        self._thread = threading.Thread(target=self._serve, name="pecd-db-writer", daemon=True)
        self._thread.start()

    def submit(self, job: Callable[[], T]) -> asyncio.Future[T]:
        """Run ``job()`` in the thread; the future has its result (or exception)."""
        if self._closed:
            raise RuntimeError("the database is closed")
        loop = asyncio.get_running_loop()
        future: asyncio.Future[T] = loop.create_future()
        self._queue.put((job, future, loop))
        return future

    def _serve(self) -> None:
        while (work := self._queue.get()) is not None:
            job, future, loop = work
            if future.cancelled():  # its caller gave up before it began (as an executor does)
                continue
            result: Any = None
            error: BaseException | None = None
            try:
                result = job()
            except BaseException as exc:
                error = exc
            with contextlib.suppress(RuntimeError):  # that loop is closed: nobody waits
                loop.call_soon_threadsafe(_settle, future, result, error)
            del work, job, future, result, error

    def transaction(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        """In the thread: ``fn(conn)`` inside ``BEGIN IMMEDIATE`` … ``COMMIT`` on the kept
        connection; rolled back if anything raises."""
        conn = self._conn
        if conn is None:
            conn = self._conn = self._connect()
        conn.execute("BEGIN IMMEDIATE")
        try:
            result = fn(conn)
            conn.execute("COMMIT")
        except BaseException:
            # Also when the COMMIT itself failed (a full disk): the connection must not stay
            # inside the transaction for the next writer. One that cannot get out of it is
            # closed, and the next transaction opens another (what the pool did on checkin).
            try:
                if conn.in_transaction:
                    conn.execute("ROLLBACK")
            except BaseException:
                self._drop()
                raise
            raise
        return result

    def _connect(self) -> sqlite3.Connection:
        conn = sqlite3.connect(self._path, isolation_level=None, check_same_thread=False)
        try:
            _set_up_sqlite(conn)
            conn.execute(f"PRAGMA busy_timeout={WRITER_BUSY_TIMEOUT_MS}")
        except BaseException:
            conn.close()
            raise
        return conn

    def _drop(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            with contextlib.suppress(sqlite3.Error):
                conn.close()

    def _shut(self) -> None:
        self._drop()
        self.engine.dispose()

    async def close(self) -> None:
        """Finish the work queued so far, close the connections, end the thread. Closed at
        once for new work (a write submitted meanwhile would reopen a connection nobody
        closes); a close whose caller is cancelled still closes, in the thread."""
        if self._closed:
            return
        self._closed = True
        loop = asyncio.get_running_loop()
        shut: asyncio.Future[None] = loop.create_future()
        self._queue.put((self._shut, shut, loop))
        self._queue.put(None)
        # Shielded: the thread skips work whose future was cancelled, and this must run. The
        # loop is not blocked meanwhile (a queued write may wait on a lock the loop must free).
        await asyncio.shield(shut)
        self._thread.join()  # nothing is left for it but the end of the queue


class Database:
    """An open database: the async engine(s) and their session factories.

    On SQLite, writes go through one thread (:class:`_WriterThread`: its own ``sqlite3``
    connection for the hot path, a pool of one for the sessions of :meth:`write`) and one
    async connection (a pool of one): SQLite has a single writer anyway, and queueing writers
    there is far cheaper than letting many connections collide on the database lock, where
    SQLite's busy handler sleeps for up to 100 ms between tries. Readers get a separate engine
    with ordinary pooling (WAL readers never wait for the writer). Never open a write session
    while holding another one in the same task: the second would wait for the first forever (it
    times out after ``pool_timeout``).
    """

    def __init__(
        self, engine: AsyncEngine, reader: AsyncEngine | None = None, writer: Engine | None = None
    ) -> None:
        self.engine = engine
        self._reader = reader
        self._sessions = async_sessionmaker(engine, expire_on_commit=False)
        readers = (reader or engine).execution_options(**{_SQLITE_BEGIN: "DEFERRED"})
        self._read_sessions = async_sessionmaker(readers, expire_on_commit=False)
        self._writer = writer
        self._writer_sessions = (
            sessionmaker(writer, expire_on_commit=False) if writer is not None else None
        )
        self._writer_thread = _WriterThread(writer) if writer is not None else None
        # PostgreSQL: the hot path's transactions in one round trip each (pecd.store.pgfast).
        self.pg: PgFast | None = None
        if engine.dialect.name == "postgresql":
            self.pg = PgFast(engine.url.render_as_string(hide_password=False))

    @classmethod
    async def open(cls, url: str, **engine_kwargs: Any) -> Database:
        """Create the engine for ``url`` and check that the database answers."""
        reader = writer = None
        if make_url(async_url(url)).get_backend_name() == "sqlite" and not engine_kwargs:
            engine = create_engine(url, pool_size=1, max_overflow=0, pool_timeout=60)
            reader = create_engine(url)
            if _sqlite_file(async_url(url)) is not None:
                writer = _sqlite_sync_writer(url)
        else:
            engine = create_engine(url, **engine_kwargs)
        try:
            async with engine.connect() as conn:
                await conn.execute(text("SELECT 1"))
        except BaseException:
            await engine.dispose()
            if reader is not None:
                await reader.dispose()
            if writer is not None:
                writer.dispose()
            raise
        return cls(engine, reader, writer)

    @property
    def dialect(self) -> Literal["sqlite", "postgresql"]:
        name = self.engine.dialect.name
        if name not in ("sqlite", "postgresql"):
            raise RuntimeError(f"unsupported database dialect {name!r}")
        return name  # type: ignore[return-value]

    def session(self) -> AsyncSession:
        """A new session (``expire_on_commit=False``). On SQLite its transactions take the write
        lock at BEGIN; use it for anything that writes."""
        return self._sessions()

    def read_session(self) -> AsyncSession:
        """A new session for reading only (on SQLite a deferred BEGIN: never waits for writers).
        On PostgreSQL this is the same as :meth:`session`."""
        return self._read_sessions()

    async def write(self, fn: Callable[[Session], T]) -> T:
        """Run ``fn(session)`` in one write transaction and commit it; returns what ``fn`` returns.
        If ``fn`` raises, the transaction rolls back and the exception propagates.

        ``fn`` is synchronous and does only database work (it may run in another thread): on
        SQLite it runs in the writer thread, holding the write lock only for its statements; on
        PostgreSQL through ``AsyncSession.run_sync``. Objects it returns are detached, loaded.
        """
        if self._writer_thread is None or self._writer_sessions is None:
            async with self.session() as s, s.begin():
                return await s.run_sync(_with_deferred, fn)
        sessions = self._writer_sessions

        def run() -> T:
            with sessions() as s, s.begin():
                return _with_deferred(s, fn)

        return await self._writer_thread.submit(run)

    @property
    def sqlite_writer(self) -> bool:
        """Whether :meth:`write_sqlite` is there (SQLite in a file: the writer thread)."""
        return self._writer_thread is not None

    async def write_sqlite(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        """:meth:`write` for the hot path's own statements (:mod:`pecd.store.sqlitefast`):
        ``fn`` gets the writer's ``sqlite3`` connection inside ``BEGIN IMMEDIATE``; its
        transaction commits if ``fn`` returns, rolls back if it raises."""
        thread = self._writer_thread
        if thread is None:
            raise RuntimeError("write_sqlite needs SQLite in a file")
        return await thread.submit(functools.partial(thread.transaction, fn))

    async def close(self) -> None:
        if self.pg is not None:
            await self.pg.close()
        await self.engine.dispose()
        if self._reader is not None:
            await self._reader.dispose()
        if self._writer_thread is not None:
            await self._writer_thread.close()


# --- migrations ------------------------------------------------------------------------------


def migrations_dir() -> Path:
    """pecd's Alembic migrations, shipped inside the package (so a wheel install migrates too)."""
    path = Path(pecd.__file__).resolve().parent / "migrations"
    if not (path / "env.py").is_file():
        raise RuntimeError(f"Alembic migrations not found at {path} (expected env.py there)")
    return path


def alembic_config(url: str | None = None) -> Any:
    """An Alembic ``Config`` for pecd's migrations, built in code (no alembic.ini needed)."""
    from alembic.config import Config

    cfg = Config()
    cfg.set_main_option("script_location", str(migrations_dir()))
    if url is not None:
        cfg.attributes["url"] = url
    return cfg


async def migrate_async(url: str, revision: str = "head") -> None:
    """Upgrade the database at ``url`` to ``revision`` (default: the newest). Idempotent."""
    from alembic import command

    cfg = alembic_config(url)
    engine = create_engine(url)
    try:
        async with engine.begin() as conn:
            if conn.dialect.name == "postgresql":
                await conn.execute(
                    text("SELECT pg_advisory_xact_lock(:id)"), {"id": _MIGRATION_LOCK_ID}
                )

            def upgrade(sync_conn: Connection) -> None:
                cfg.attributes["connection"] = sync_conn
                command.upgrade(cfg, revision)

            await conn.run_sync(upgrade)
    finally:
        await engine.dispose()


def migrate(url: str, revision: str = "head") -> None:
    """Synchronous :func:`migrate_async` (for the command line; not from a running event loop)."""
    asyncio.run(migrate_async(url, revision))
