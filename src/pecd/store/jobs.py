"""The durable job queue.

A job is a row in ``jobs``: ``ready`` until ``next_run_at``, then claimed (``running``, leased to
one worker until ``locked_until``), then ``done`` or, after a failure, ``ready`` again with an
exponential backoff, and ``parked`` after ``max_attempts`` (visible in ``pecd queue`` until an
operator requeues it). A worker that dies leaves its job ``running``; when the lease expires another
worker claims it again. On PostgreSQL a job also records the node that leased it (``leased_by``),
and is free as soon as that node's heartbeat stops (see :mod:`pecd.store.nodes`).

Time is always passed in (``now``); nothing here reads the clock. Except :func:`claim`, which
owns its transaction, the functions take a session and do not commit: the caller commits a whole
pipeline stage (outputs, next jobs, trace events, ``complete``) in one transaction.

The message bytes (``data``) stay with the job while it can still run, and are set to NULL when it
is done, so the table does not grow with delivered mail.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping, Sequence
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import Interval, and_, bindparam, delete, exists, func, or_, select, update
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.ext.asyncio import AsyncSession
from sqlalchemy.orm import Session, configure_mappers
from sqlalchemy.orm.instrumentation import manager_of_class

from pecd.store import sqlitefast
from pecd.store.db import Database
from pecd.store.models import Job, Node, table_of
from pecd.store.nodes import current

_JOBS = table_of(Job)  # Core statements on the hot path (see claim_batch)
_NODES = table_of(Node)

READY = "ready"
RUNNING = "running"
DONE = "done"
PARKED = "parked"


class JobError(ValueError):
    """A job operation that cannot be done (no such job, or not in a suitable state)."""


def enqueue_sync(
    session: Session,
    *,
    kind: str,
    key: str,
    payload: dict[str, Any],
    data: bytes | None = None,
    now: datetime,
    run_at: datetime | None = None,
    lease_to: str | None = None,
    lease_until: datetime | None = None,
) -> bool:
    """Add a job unless one with the same idempotency ``key`` exists (in any state).

    With ``lease_to`` the job is born ``running``, leased to that worker until ``lease_until``:
    the worker that made it runs it at once, and if that worker dies the lease expires and any
    worker claims it as usual. Returns True if a job was created, False if ``key`` was already
    there. Does not commit.
    """
    node = current(session) if lease_to is not None else None
    row = job_row(
        kind=kind,
        key=key,
        payload=payload,
        data=data,
        now=now,
        run_at=run_at,
        lease_to=lease_to,
        lease_until=lease_until,
        node=node.id if node is not None else None,
    )
    return bool(insert_many_sync(session, [row]))


def job_row(
    *,
    kind: str,
    key: str,
    payload: dict[str, Any],
    data: bytes | None = None,
    now: datetime,
    run_at: datetime | None = None,
    lease_to: str | None = None,
    lease_until: datetime | None = None,
    node: str | None = None,
) -> dict[str, Any]:
    """The row :func:`insert_many_sync` inserts for a job (see :func:`enqueue_sync`); ``node``:
    the node id a job born leased records (``leased_by``)."""
    if (lease_to is None) != (lease_until is None):
        raise ValueError("lease_to and lease_until go together")
    return {
        "kind": kind,
        "key": key,
        "state": READY if lease_to is None else RUNNING,
        "locked_by": lease_to,
        "locked_until": lease_until,
        "leased_by": node if lease_to is not None else None,
        "payload": payload,
        "data": data,
        "attempts": 0,
        "next_run_at": run_at if run_at is not None else now,
        "created_at": now,
        "updated_at": now,
    }


def insert_many_sync(session: Session, rows: Sequence[dict[str, Any]]) -> set[str]:
    """Insert the jobs ``rows`` (from :func:`job_row`) in one statement, each unless a job with
    its key exists already (then it is left as it is); returns the keys of the jobs created.
    Of two rows with the same key only the first is inserted. Does not commit."""
    if not rows:
        return set()
    stmt = _insert_stmt(session.get_bind().dialect.name)
    if len(rows) == 1:
        return set(session.execute(stmt, rows[0]).scalars())
    seen: set[str] = set()
    unique = []
    for row in rows:
        if row["key"] not in seen:
            seen.add(row["key"])
            unique.append(row)
    # One INSERT … VALUES (…), (…) … RETURNING key (SQLAlchemy's "insertmanyvalues").
    return set(session.execute(stmt, unique).scalars())


@functools.cache
def _insert_stmt(dialect: str) -> Any:
    """``INSERT … ON CONFLICT (key) DO NOTHING RETURNING key``, built once per dialect: the
    values travel as parameters, so the compiled statement is reused for every job."""
    insert = postgresql.insert if dialect == "postgresql" else sqlite.insert
    # Core, not ORM-enabled: the ORM's bulk-insert path is costly here.
    return insert(_JOBS).on_conflict_do_nothing(index_elements=["key"]).returning(_JOBS.c.key)


async def claim(
    db: Database, *, kinds: Sequence[str], worker: str, now: datetime, lease: timedelta
) -> Job | None:
    """Take one due job of one of ``kinds`` (or a running one whose lease has expired), lease it
    to ``worker`` until ``now + lease``, count the attempt, commit, and return it (None: no work).
    """
    found = await claim_batch(db, kinds=kinds, worker=worker, now=now, lease=lease, limit=1)
    return found[0] if found else None


async def claim_batch(
    db: Database,
    *,
    kinds: Sequence[str],
    worker: str,
    now: datetime,
    lease: timedelta,
    limit: int,
) -> list[Job]:
    """:func:`claim` for up to ``limit`` jobs at once, oldest first, in one transaction.

    One statement: ``UPDATE jobs … WHERE id IN (SELECT id … LIMIT n) RETURNING``. On PostgreSQL
    the inner select is ``FOR UPDATE SKIP LOCKED``; on SQLite the session begins ``IMMEDIATE``,
    so the statement runs under the database write lock. Either way no job goes to two workers.

    On PostgreSQL a running job whose lease has not expired is free too when the node that
    leased it (``leased_by``) has not beaten within the node timeout (the database's clock): its
    process is dead. The jobs claimed here carry this process's node id, if it runs as one.
    """
    if not kinds or limit < 1:
        return []
    node = current(db)
    params: dict[str, Any] = {
        "kinds": list(kinds),
        "now": now,
        "worker": worker,
        "until": now + lease,
        "limit": limit,
        "node": node.id if node is not None else None,
    }
    if db.dialect == "postgresql":
        params["node_timeout"] = node.timeout if node is not None else DEFAULT_NODE_TIMEOUT
    if db.pg is not None:  # one round trip
        rows = await db.pg.claim(
            kinds=params["kinds"],
            now=now,
            worker=worker,
            until=params["until"],
            node=params["node"],
            limit=limit,
            node_timeout=params["node_timeout"],
        )
        return sorted(map(_claimed, rows), key=lambda j: (j.next_run_at, j.id))
    if db.sqlite_writer:  # straight over sqlite3, in the writer thread
        rows = await db.write_sqlite(
            functools.partial(
                sqlitefast.claim,
                kinds=params["kinds"],
                now=now,
                worker=worker,
                until=params["until"],
                node=params["node"],
                limit=limit,
            )
        )
        return sorted(map(_claimed, rows), key=lambda j: (j.next_run_at, j.id))
    stmt = _claim_stmt(db.dialect)

    def claim(session: Session) -> list[Job]:
        # Core rows made into (transient) Job objects: the ORM's bulk-update machinery costs
        # more than the statement on this hot path.
        return [_claimed(row._mapping) for row in session.execute(stmt, params)]

    claimed = await db.write(claim)
    return sorted(claimed, key=lambda j: (j.next_run_at, j.id))


@functools.cache
def _new_job() -> Callable[[], Job]:
    configure_mappers()  # what Job() would do first; new_instance() does not
    new: Callable[[], Job] = manager_of_class(Job).new_instance
    return new


def _claimed(row: Mapping[Any, Any]) -> Job:
    """A claimed job's row as a transient ``Job``, its attributes set without the ORM's
    attribute events (a tenth of the cost of ``Job(**row)``): a copy to read, never added to a
    session (retries and releases read the row again)."""
    job = _new_job()()
    job.__dict__.update(row)
    return job


#: A node silent this long is dead, for a claim by a process that is not a node itself.
DEFAULT_NODE_TIMEOUT = timedelta(seconds=15)


@functools.cache
def _claim_stmt(dialect: str) -> Any:
    """The claim statement, built once per dialect with bound parameters (``kinds``, ``now``,
    ``worker``, ``until``, ``limit``, ``node``; on PostgreSQL ``node_timeout``) so that
    SQLAlchemy reuses its compiled form."""
    t = _JOBS.c
    now = bindparam("now", type_=t.next_run_at.type)
    free = t.locked_until < now
    if dialect == "postgresql":
        n = _NODES.c
        alive = exists().where(
            n.id == t.leased_by,
            n.heartbeat_at >= func.now() - bindparam("node_timeout", type_=Interval()),
        )
        free = or_(free, and_(t.leased_by.is_not(None), ~alive))
    pick = (
        select(t.id)
        .where(
            t.kind.in_(bindparam("kinds", expanding=True)),
            or_(
                and_(t.state == READY, t.next_run_at <= now),
                and_(t.state == RUNNING, free),
            ),
        )
        .order_by(t.next_run_at, t.id)
        .limit(bindparam("limit"))
    )
    if dialect == "postgresql":
        pick = pick.with_for_update(skip_locked=True)
    return (
        update(_JOBS)
        .where(t.id.in_(pick))
        .values(
            state=RUNNING,
            locked_by=bindparam("worker"),
            locked_until=bindparam("until", type_=t.locked_until.type),
            leased_by=bindparam("node", type_=t.leased_by.type),
            attempts=t.attempts + 1,
            updated_at=now,
        )
        .returning(*t)
    )


async def get_job(session: AsyncSession, job_id: int) -> Job | None:
    return await session.get(Job, job_id, populate_existing=True)


async def _job(session: AsyncSession, job_id: int) -> Job:
    job = await session.get(Job, job_id, populate_existing=True, with_for_update=True)
    if job is None:
        raise JobError(f"job {job_id} does not exist")
    return job


async def complete(session: AsyncSession, job_id: int, *, now: datetime | None = None) -> None:
    """Mark the job done and free its bytes (``data`` = NULL). Does not commit.

    ``now`` (optional) sets ``updated_at``; without it ``updated_at`` stays the claim time.
    """
    if not await session.run_sync(complete_many_sync, [job_id], now=now):
        raise JobError(f"job {job_id} does not exist")


def _done(now: datetime | None) -> dict[str, Any]:
    """Column values of a finished job: its bytes are freed, its lease dropped."""
    values: dict[str, Any] = {
        "state": DONE,
        "data": None,
        "locked_by": None,
        "locked_until": None,
        "leased_by": None,
    }
    if now is not None:
        values["updated_at"] = now
    return values


def complete_many_sync(
    session: Session,
    job_ids: Sequence[int],
    *,
    now: datetime | None = None,
    worker: str | None = None,
) -> int:
    """:func:`complete` for several jobs in one statement; returns how many it completed. With
    ``worker``, only jobs still running under that worker's lease count: one whose lease ran
    out meanwhile belongs to another worker now. Does not commit."""
    if not job_ids:
        return 0
    return _update_jobs(session, _JOBS.c.id.in_(list(job_ids)), worker, _done(now))


def _update_jobs(session: Session, which: Any, worker: str | None, values: dict[str, Any]) -> int:
    """Set ``values`` on the jobs ``which`` selects (with ``worker``: only those still running
    under its lease); returns how many."""
    t = _JOBS.c
    stmt = update(_JOBS).where(which)
    if worker is not None:
        stmt = stmt.where(t.state == RUNNING, t.locked_by == worker)
    return len(session.execute(stmt.values(**values).returning(t.id)).all())


def complete_leased(
    session: Session, keys: Sequence[str], worker: str, *, now: datetime | None = None
) -> int:
    """Complete the jobs among ``keys`` that are still running under ``worker``'s lease (one a
    worker made for itself with ``enqueue_sync(lease_to=...)``); returns how many. Does not commit."""
    if not keys:
        return 0
    return _update_jobs(session, _JOBS.c.key.in_(list(keys)), worker, _done(now))


def release_leased(
    session: Session,
    keys: Sequence[str],
    worker: str,
    *,
    error: str,
    now: datetime,
    run_at: datetime,
) -> int:
    """Give back the jobs among ``keys`` still running under ``worker``'s lease, uncounted,
    due at ``run_at`` with ``error`` shown (a store that met a full disk right after its commit:
    tried again soon rather than when the lease ends); returns how many. Does not commit."""
    if not keys:
        return 0
    t = _JOBS.c
    values = {
        "state": READY,
        "locked_by": None,
        "locked_until": None,
        "leased_by": None,
        "next_run_at": run_at,
        "last_error": error,
        "updated_at": now,
    }
    return _update_jobs(session, t.key.in_(list(keys)), worker, values)


def extend_leases(session: Session, job_ids: Sequence[int], worker: str, until: datetime) -> int:
    """Extend to ``until`` the leases ``worker`` still holds among ``job_ids`` (a stage that runs
    longer than a lease keeps its jobs); returns how many. Does not commit."""
    if not job_ids:
        return 0
    return _update_jobs(session, _JOBS.c.id.in_(list(job_ids)), worker, {"locked_until": until})


def backoff(attempts: int, base_delay: timedelta, max_delay: timedelta) -> timedelta:
    """The deterministic delay after the ``attempts``-th failure: base * 2^(attempts-1), capped."""
    exponent = max(attempts - 1, 0)
    if exponent >= 63:  # even 1 µs * 2**63 is beyond any timedelta: it is the cap anyway
        return max_delay
    try:
        delay = base_delay * (1 << exponent)
    except OverflowError:
        return max_delay
    return min(delay, max_delay)


async def retry_or_park(
    session: AsyncSession,
    job_id: int,
    *,
    error: str,
    now: datetime,
    max_attempts: int,
    base_delay: timedelta,
    max_delay: timedelta,
    worker: str | None = None,
    counted: bool = True,
) -> str:
    """Record a failed attempt: back to ``ready`` after :func:`backoff`, or ``parked`` once
    ``attempts >= max_attempts``. Returns the new state. With ``worker``, a job that is no
    longer running under that worker's lease is left as it is (its state is returned).
    ``counted`` False: the job could not be worked at all (a dependency is down): the claim's
    attempt is given back, and it waits (backoff capped at ``max_delay``) without ever being
    parked. Does not commit."""
    job = await _job(session, job_id)
    if worker is not None and (job.state != RUNNING or job.locked_by != worker):
        return job.state
    job.last_error = error
    job.locked_by = None
    job.locked_until = None
    job.leased_by = None
    job.updated_at = now
    if not counted:
        job.attempts = max(job.attempts - 1, 0)
        job.state = READY
        job.next_run_at = now + backoff(job.attempts + 1, base_delay, max_delay)
    elif job.attempts >= max_attempts:
        job.state = PARKED
    else:
        job.state = READY
        job.next_run_at = now + backoff(job.attempts, base_delay, max_delay)
    return job.state


async def release(session: AsyncSession, job_id: int, *, now: datetime | None = None) -> None:
    """Give a running job back (e.g. on shutdown) without counting the attempt. Does not commit.
    A job that is not running is left alone."""
    job = await _job(session, job_id)
    if job.state != RUNNING:
        return
    job.state = READY
    job.attempts = max(job.attempts - 1, 0)
    job.locked_by = None
    job.locked_until = None
    job.leased_by = None
    if now is not None:
        job.updated_at = now


async def release_all_running(session: AsyncSession) -> int:
    """Make every running job ready now (a single-node SQLite install at start-up: whatever is
    running was left by a killed process). Returns how many. Does not commit.

    Unlike :func:`release`, the attempt still counts: a message that kills the process must
    still end up parked rather than crash pecd forever.
    """
    stmt = (
        update(Job)
        .where(Job.state == RUNNING)
        .values(
            state=READY,
            locked_by=None,
            locked_until=None,
            leased_by=None,
        )
        .returning(Job.id)
        .execution_options(synchronize_session=False)
    )
    return len((await session.execute(stmt)).all())


async def requeue(session: AsyncSession, job_id: int, now: datetime) -> None:
    """Operator: make a parked (or waiting) job due now with a fresh attempt count.
    ``last_error`` is kept until the job succeeds. Does not commit."""
    job = await _job(session, job_id)
    if job.state not in (PARKED, READY):
        raise JobError(f"job {job_id} is {job.state}: only parked or ready jobs can be requeued")
    job.state = READY
    job.attempts = 0
    job.next_run_at = now
    job.updated_at = now


async def list_jobs(
    session: AsyncSession,
    *,
    states: Sequence[str] | None = None,
    kinds: Sequence[str] | None = None,
    limit: int = 100,
) -> list[Job]:
    """Jobs in id order, optionally filtered by state and kind."""
    stmt = select(Job).order_by(Job.id).limit(limit)
    if states is not None:
        stmt = stmt.where(Job.state.in_(list(states)))
    if kinds is not None:
        stmt = stmt.where(Job.kind.in_(list(kinds)))
    return list((await session.scalars(stmt)).all())


async def purge_done(session: AsyncSession, *, older_than: datetime) -> int:
    """Delete finished jobs last touched before ``older_than`` (their bytes are gone already;
    the trace log keeps what happened). Returns how many. Does not commit."""
    result = await session.execute(
        delete(Job)
        .where(Job.state == DONE, Job.updated_at < older_than)
        .returning(Job.id)
        .execution_options(synchronize_session=False)
    )
    return len(result.all())
