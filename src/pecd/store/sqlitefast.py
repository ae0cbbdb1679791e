"""The hot path's transactions on SQLite straight through the ``sqlite3`` module.

:meth:`Database.write` runs them in its writer thread, on the writer's connection, in one
``BEGIN IMMEDIATE`` … ``COMMIT`` (:meth:`Database.write_sqlite`). The statements are the ones
SQLAlchemy would send; going around it saves its per-statement and per-transaction work, which
cost more than SQLite's own. Values are converted as SQLAlchemy converts them for these tables
(datetimes as naive UTC text with microseconds, JSON as ``json.dumps`` text where ``None`` is the
JSON ``null``), so rows read the same whichever path wrote them:

* intake: a batch of jobs (``INSERT … ON CONFLICT (key) DO NOTHING``);
* claim: the statement of :func:`pecd.store.jobs.claim_batch`;
* a stage's commit (:func:`commit`): the rows of an :class:`~pecd.store.effects.OneStatement`
  plan, and the completion of the stage's jobs; :class:`~pecd.store.pgfast.LeasesLost` (and a
  rollback) if the worker no longer holds every lease;
* the completion of a worker's store jobs.
"""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Any, Protocol

from pecd.store.pgfast import LeasesLost, dumps


class Plan(Protocol):
    """What :func:`commit` reads of a :class:`pecd.store.effects.OneStatement` (a protocol, so
    that this module, which store/jobs.py imports, does not import store/effects.py back)."""

    @property
    def jobs(self) -> Sequence[dict[str, Any]]: ...
    @property
    def expect(self) -> Sequence[tuple[str, str, str, Any, datetime]]: ...
    @property
    def presa(self) -> Sequence[tuple[str, str, datetime]]: ...
    @property
    def settle(self) -> Sequence[tuple[str, str, datetime, str]]: ...
    @property
    def events(self) -> Sequence[tuple[dict[str, Any], str | None]]: ...


_JOB_COLUMNS = (
    "id",
    "kind",
    "key",
    "state",
    "payload",
    "data",
    "attempts",
    "next_run_at",
    "locked_by",
    "locked_until",
    "last_error",
    "created_at",
    "updated_at",
    "leased_by",
)
_TIMES = ("next_run_at", "locked_until", "created_at", "updated_at")

INSERT_JOB = (
    "INSERT INTO jobs (kind, key, state, locked_by, locked_until, leased_by, payload, data,"
    " attempts, next_run_at, created_at, updated_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, 0, ?, ?, ?)"
    " ON CONFLICT (key) DO NOTHING"
)
INSERT_EXPECTATION = (
    "INSERT INTO expectations (pec_msgid, recipient, sender, tx, sent_at) VALUES (?, ?, ?, ?, ?)"
    " ON CONFLICT (pec_msgid, recipient) DO NOTHING"
)
PRESA = (
    "UPDATE expectations SET presa_at = ?"
    " WHERE pec_msgid = ? AND recipient = ? AND presa_at IS NULL"
)
SETTLE = (
    "UPDATE expectations SET closed_at = ?, outcome = ?,"
    " delivered_at = CASE WHEN ? = 'scaduto' THEN delivered_at ELSE ? END"
    " WHERE pec_msgid = ? AND recipient = ? AND closed_at IS NULL"
)
INSERT_EVENT = (
    "INSERT INTO trace_events (at, event, pec_msgid, client_msgid, sender, recipients, subject,"
    " provider, generated_ids, error, daticert, data, node)"
    " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"
)
_DONE = (
    "UPDATE jobs SET state = 'done', data = NULL, locked_by = NULL, locked_until = NULL,"
    " leased_by = NULL WHERE {column} IN ({marks}) AND state = 'running' AND locked_by = ?"
)


# The last datetime converted and its text: the rows of one commit share a few instants (the
# stage's time, a lease's end), each converted once. A tuple, replaced whole: safe to share.
_last_time: tuple[datetime | None, str | None] = (None, None)


def time_text(value: datetime | None) -> str | None:
    """A datetime as SQLAlchemy stores pecd's aware datetimes on SQLite (naive UTC text)."""
    global _last_time
    if value is None:
        return None
    last = _last_time
    if value is last[0]:
        return last[1]
    tz = value.tzinfo
    if tz is UTC:  # the common case: its ISO text with the "+00:00" cut off
        text = value.isoformat(" ", "microseconds")[:26]
    elif tz is None:
        raise ValueError(f"naive datetime {value.isoformat()}: pecd stores aware UTC datetimes")
    else:
        text = value.astimezone(UTC).replace(tzinfo=None).isoformat(" ", "microseconds")
    _last_time = (value, text)
    return text


_MISSING: Any = object()


def _time_value(text: str | None) -> datetime | None:
    return None if text is None else datetime.fromisoformat(text).replace(tzinfo=UTC)


def _job_params(r: dict[str, Any]) -> tuple[Any, ...]:
    created = time_text(r["created_at"])
    return (
        r["kind"],
        r["key"],
        r["state"],
        r["locked_by"],
        time_text(r["locked_until"]),
        r["leased_by"],
        dumps(r["payload"]),
        r["data"],
        time_text(r["next_run_at"]),
        created,
        created,
    )


def insert_jobs(conn: sqlite3.Connection, rows: Sequence[dict[str, Any]]) -> set[str]:
    """Insert the jobs ``rows`` (:func:`pecd.store.jobs.job_row`) unless their key exists;
    returns the keys of the jobs created (of two rows with one key, the first)."""
    created: set[str] = set()
    for r in rows:
        if conn.execute(INSERT_JOB, _job_params(r)).rowcount == 1:
            created.add(r["key"])
    return created


def insert_jobs_blind(conn: sqlite3.Connection, rows: Sequence[dict[str, Any]]) -> None:
    """:func:`insert_jobs` in one executemany, when nobody needs to know which were created."""
    conn.executemany(INSERT_JOB, [_job_params(r) for r in rows])


def claim(
    conn: sqlite3.Connection,
    *,
    kinds: Sequence[str],
    now: datetime,
    worker: str,
    until: datetime,
    node: str | None,
    limit: int,
) -> list[dict[str, Any]]:
    """The claim of :func:`pecd.store.jobs.claim_batch` (SQLite: no node heartbeats)."""
    at = time_text(now)
    sql = (
        "UPDATE jobs SET state = 'running', locked_by = ?, locked_until = ?, leased_by = ?,"
        " attempts = attempts + 1, updated_at = ?"
        " WHERE id IN (SELECT id FROM jobs"
        f" WHERE kind IN ({', '.join('?' * len(kinds))})"
        " AND ((state = 'ready' AND next_run_at <= ?) OR (state = 'running' AND locked_until < ?))"
        " ORDER BY next_run_at, id LIMIT ?)"
        f" RETURNING {', '.join(_JOB_COLUMNS)}"
    )
    params = (worker, time_text(until), node, at, *kinds, at, at, limit)
    out = []
    # The jobs of a claim share their lease's end and update time (and often the time they
    # were made): each text read once.
    times: dict[str | None, datetime | None] = {None: None}
    for values in conn.execute(sql, params).fetchall():
        row = dict(zip(_JOB_COLUMNS, values, strict=True))
        for name in _TIMES:
            text = row[name]
            found = times.get(text, _MISSING)
            if found is _MISSING:
                found = times[text] = _time_value(text)
            row[name] = found
        row["payload"] = json.loads(row["payload"])
        out.append(row)
    return out


def complete_leased(conn: sqlite3.Connection, keys: Sequence[str], worker: str) -> int:
    """:func:`pecd.store.jobs.complete_leased`."""
    if not keys:
        return 0
    sql = _DONE.format(column="key", marks=", ".join("?" * len(keys)))
    return conn.execute(sql, (*keys, worker)).rowcount


def commit(conn: sqlite3.Connection, plan: Plan, done: Sequence[int], worker: str) -> set[str]:
    """Write ``plan`` and complete the jobs ``done`` still leased to ``worker`` (else raise
    :class:`LeasesLost`: the caller's transaction rolls back); returns the keys created."""
    created = insert_jobs(conn, plan.jobs)
    if plan.expect:
        conn.executemany(
            INSERT_EXPECTATION,
            [(m, r, s, dumps(tx), time_text(at)) for m, r, s, tx, at in plan.expect],
        )
    if plan.presa:
        conn.executemany(PRESA, [(time_text(at), m, r) for m, r, at in plan.presa])
    if plan.settle:
        conn.executemany(
            SETTLE, [(time_text(at), o, o, time_text(at), m, r) for m, r, at, o in plan.settle]
        )
    events = [
        (
            time_text(e["at"]),
            e["event"],
            e["pec_msgid"],
            e["client_msgid"],
            e["sender"],
            dumps(e["recipients"]),
            e["subject"],
            e["provider"],
            dumps(e["generated_ids"]),
            e["error"],
            dumps(e["daticert"]),
            dumps(e["data"]),
            e["node"],
        )
        for e, req in plan.events
        if req is None or req in created
    ]
    if events:
        conn.executemany(INSERT_EVENT, events)
    if done:
        sql = _DONE.format(column="id", marks=", ".join("?" * len(done)))
        completed = conn.execute(sql, (*done, worker)).rowcount
        if completed != len(done):
            raise LeasesLost(f"{len(done) - completed} of {len(done)} leases lost")
    return created
