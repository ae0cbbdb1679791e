"""The hot path's transactions on PostgreSQL in one round trip each.

Through SQLAlchemy a transaction costs a round trip for ``BEGIN``, one per statement and one for
``COMMIT`` (and a ping when a pooled connection is checked out). Here each hot-path transaction
is a single statement, sent over asyncpg outside any explicit transaction: PostgreSQL runs it as
a transaction of its own, atomic and committed (with ``synchronous_commit``) when the answer
comes back. The statement's text is fixed (rows travel as arrays through ``unnest``), so asyncpg
prepares it once per connection.

* intake: a batch of jobs, ``INSERT … SELECT FROM unnest(…) ON CONFLICT (key) DO NOTHING``;
* claim: the same ``UPDATE … WHERE id IN (SELECT … FOR UPDATE SKIP LOCKED) RETURNING`` as
  :func:`pecd.store.jobs.claim_batch`;
* a stage's commit (:func:`commit_batch`): the new jobs, the timer rows, the trace events (an
  event that counts only if a job is created carries that job's key and is inserted only if the
  job is) and the completion of the stage's jobs, as data-modifying ``WITH`` queries of one
  statement. If the worker no longer holds every lease, the statement fails on purpose (a cast
  that cannot succeed), so nothing of it commits, and :class:`LeasesLost` is raised;
* the completion of a worker's store jobs.

Values are converted here as SQLAlchemy would convert them (JSON as ``json.dumps`` text, where
Python ``None`` is the JSON ``null``; aware datetimes), so rows read the same whichever path
wrote them. A fault of the connection is raised as SQLAlchemy's ``OperationalError`` (connection
invalidated) and a server error wrapped in a ``DBAPIError`` with the driver's error as ``orig``
(its SQLSTATE is what ``runtime.diskspace`` looks at).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from datetime import datetime, timedelta
from typing import Any

import asyncpg  # type: ignore[import-untyped]
from sqlalchemy import exc as sa_exc
from sqlalchemy.engine import make_url

_LEASES_LOST = "pecd: leases lost"
_JOB_COLUMNS = (
    "id, kind, key, state, payload, data, attempts, next_run_at, locked_by, locked_until,"
    " last_error, created_at, updated_at, leased_by"
)

INSERT_JOBS = """
INSERT INTO jobs (kind, key, state, locked_by, locked_until, leased_by, payload, data, attempts,
                  next_run_at, created_at, updated_at)
SELECT u.kind, u.key, u.state, u.locked_by, u.locked_until, u.leased_by, u.payload::json, u.data,
       0, u.next_run_at, u.created_at, u.created_at
FROM unnest($1::text[], $2::text[], $3::text[], $4::text[], $5::timestamptz[], $6::text[],
            $7::text[], $8::bytea[], $9::timestamptz[], $10::timestamptz[])
     WITH ORDINALITY AS u(kind, key, state, locked_by, locked_until, leased_by, payload, data,
                          next_run_at, created_at, n)
ORDER BY u.n
ON CONFLICT (key) DO NOTHING
RETURNING key
"""

CLAIM = f"""
UPDATE jobs SET state = 'running', locked_by = $3, locked_until = $4, leased_by = $5,
                attempts = jobs.attempts + 1, updated_at = $2
WHERE jobs.id IN (
    SELECT j.id FROM jobs AS j
    WHERE j.kind = ANY($1::text[])
      AND ((j.state = 'ready' AND j.next_run_at <= $2)
           OR (j.state = 'running'
               AND (j.locked_until < $2
                    OR (j.leased_by IS NOT NULL
                        AND NOT EXISTS (SELECT 1 FROM nodes
                                        WHERE nodes.id = j.leased_by
                                          AND nodes.heartbeat_at >= now() - $7::interval)))))
    ORDER BY j.next_run_at, j.id
    LIMIT $6
    FOR UPDATE SKIP LOCKED)
RETURNING {_JOB_COLUMNS}
"""

COMPLETE_LEASED = """
UPDATE jobs SET state = 'done', data = NULL, locked_by = NULL, locked_until = NULL,
                leased_by = NULL
WHERE key = ANY($1::text[]) AND state = 'running' AND locked_by = $2
RETURNING id
"""

# $1-$10: jobs (as INSERT_JOBS); $11-$15: expectations; $16-$20: timer rows marked (presa in
# carico and/or outcome, one row per expectation: see _marks); $21-$34: trace events;
# $35: the stage's job ids; $36: the worker.
COMMIT = f"""
WITH j AS ({INSERT_JOBS}),
e AS (
    INSERT INTO expectations (pec_msgid, recipient, sender, tx, sent_at)
    SELECT u.m, u.r, u.s, u.tx::json, u.at
    FROM unnest($11::text[], $12::text[], $13::text[], $14::text[], $15::timestamptz[])
         AS u(m, r, s, tx, at)
    ON CONFLICT (pec_msgid, recipient) DO NOTHING
    RETURNING 1),
marked AS (
    UPDATE expectations AS x
    SET presa_at = COALESCE(x.presa_at, u.p),
        closed_at = CASE WHEN u.o IS NULL OR x.closed_at IS NOT NULL THEN x.closed_at
                         ELSE u.at END,
        outcome = CASE WHEN u.o IS NULL OR x.closed_at IS NOT NULL THEN x.outcome ELSE u.o END,
        delivered_at = CASE WHEN u.o IS NULL OR x.closed_at IS NOT NULL OR u.o = 'scaduto'
                            THEN x.delivered_at ELSE u.at END
    FROM unnest($16::text[], $17::text[], $18::timestamptz[], $19::timestamptz[], $20::text[])
         AS u(m, r, p, at, o)
    WHERE x.pec_msgid = u.m AND x.recipient = u.r
      AND ((u.p IS NOT NULL AND x.presa_at IS NULL) OR (u.o IS NOT NULL AND x.closed_at IS NULL))
    RETURNING 1),
t AS (
    INSERT INTO trace_events (at, event, pec_msgid, client_msgid, sender, recipients, subject,
                              provider, generated_ids, error, daticert, data, node)
    SELECT u.at, u.event, u.pec_msgid, u.client_msgid, u.sender, u.recipients::json, u.subject,
           u.provider, u.generated_ids::json, u.error, u.daticert::json, u.data::json, u.node
    FROM unnest($21::timestamptz[], $22::text[], $23::text[], $24::text[], $25::text[],
                $26::text[], $27::text[], $28::text[], $29::text[], $30::text[], $31::text[],
                $32::text[], $33::text[], $34::text[])
         WITH ORDINALITY AS u(at, event, pec_msgid, client_msgid, sender, recipients, subject,
                              provider, generated_ids, error, daticert, data, node, req, n)
    WHERE u.req IS NULL OR u.req IN (SELECT key FROM j)
    ORDER BY u.n
    RETURNING 1),
c AS (
    UPDATE jobs SET state = 'done', data = NULL, locked_by = NULL, locked_until = NULL,
                    leased_by = NULL
    WHERE id = ANY($35::bigint[]) AND state = 'running' AND locked_by = $36
    RETURNING id)
SELECT array(SELECT key FROM j) AS created,
       CASE WHEN (SELECT count(*) FROM c) = cardinality($35::bigint[]) THEN 0
            ELSE CAST('{_LEASES_LOST} ' || (SELECT count(*) FROM c) AS int) END AS lease_check
"""


class LeasesLost(Exception):
    """A stage's commit found a job no longer leased to its worker: nothing of it committed."""


# json.dumps with its default settings is this encoder's encode: called straight, without
# the checks of the keyword arguments on every value.
_encode = json.JSONEncoder().encode


def dumps(value: Any) -> str:
    """A JSON column's text, as SQLAlchemy's JSON type writes it (``None`` is JSON null)."""
    return "null" if value is None else _encode(value)


def _translate(exc: BaseException, sql: str) -> BaseException:
    if isinstance(exc, asyncpg.PostgresError) and _LEASES_LOST in str(exc):
        return LeasesLost(str(exc))
    connection_lost = isinstance(
        exc,
        OSError
        | asyncpg.InterfaceError
        | asyncpg.exceptions.ConnectionDoesNotExistError
        | asyncpg.exceptions.PostgresConnectionError,
    )
    if connection_lost:
        return sa_exc.OperationalError(sql[:200], None, exc, connection_invalidated=True)
    if isinstance(exc, asyncpg.PostgresError):
        return sa_exc.DBAPIError(sql[:200], None, exc)
    return exc


class PgFast:
    """A small asyncpg pool of its own (no ping per checkout) for the one-statement
    transactions above; created on first use, closed with the :class:`Database`."""

    def __init__(self, url: str, max_size: int = 8) -> None:
        sa_url = make_url(url)
        self._dsn = sa_url.set(drivername="postgresql").render_as_string(hide_password=False)
        self._max_size = max_size
        self._pool: asyncpg.Pool | None = None

    async def _get_pool(self) -> asyncpg.Pool:
        if self._pool is None:
            pool = await asyncpg.create_pool(
                self._dsn, min_size=0, max_size=self._max_size, max_inactive_connection_lifetime=60
            )
            if self._pool is None:
                self._pool = pool
            else:  # two first uses at once: keep one pool
                await pool.close()
        return self._pool

    async def fetch(self, sql: str, *args: Any) -> list[Any]:
        try:
            pool = await self._get_pool()
            async with pool.acquire() as conn:
                return list(await conn.fetch(sql, *args))
        except Exception as exc:
            raise _translate(exc, sql) from exc

    async def fetchrow(self, sql: str, *args: Any) -> Any:
        rows = await self.fetch(sql, *args)
        return rows[0] if rows else None

    async def close(self) -> None:
        if self._pool is not None:
            pool, self._pool = self._pool, None
            await pool.close()

    # --- the statements ----------------------------------------------------------------------

    async def insert_jobs(self, rows: Sequence[dict[str, Any]]) -> set[str]:
        """:func:`pecd.store.jobs.insert_many_sync` in one round trip."""
        if not rows:
            return set()
        return {r[0] for r in await self.fetch(INSERT_JOBS, *job_columns(rows))}

    async def claim(
        self,
        *,
        kinds: Sequence[str],
        now: datetime,
        worker: str,
        until: datetime,
        node: str | None,
        limit: int,
        node_timeout: timedelta,
    ) -> list[dict[str, Any]]:
        rows = await self.fetch(CLAIM, list(kinds), now, worker, until, node, limit, node_timeout)
        out = []
        for r in rows:
            row = dict(r)
            payload = row["payload"]
            row["payload"] = json.loads(payload) if isinstance(payload, str) else payload
            out.append(row)
        return out

    async def complete_leased(self, keys: Sequence[str], worker: str) -> int:
        if not keys:
            return 0
        return len(await self.fetch(COMPLETE_LEASED, list(keys), worker))

    async def commit(
        self,
        *,
        jobs: Sequence[dict[str, Any]],
        expect: Sequence[tuple[str, str, str, Any, datetime]],
        presa: Sequence[tuple[str, str, datetime]],
        settle: Sequence[tuple[str, str, datetime, str]],
        events: Sequence[tuple[dict[str, Any], str | None]],
        done: Sequence[int],
        worker: str,
    ) -> set[str]:
        """The commit of a batch of stages (see the module's docstring); returns the keys of
        the jobs created. ``events``: each trace event's row and the key of the job it depends
        on (None: none)."""
        args: list[Any] = job_columns(jobs) if jobs else [[]] * 10
        args += _columns(expect, 5, json_at=(3,))
        args += _marks(presa, settle)
        ev: list[list[Any]] = [[] for _ in range(14)]
        for row, req in events:
            ev[0].append(row["at"])
            ev[1].append(row["event"])
            ev[2].append(row["pec_msgid"])
            ev[3].append(row["client_msgid"])
            ev[4].append(row["sender"])
            ev[5].append(dumps(row["recipients"]))
            ev[6].append(row["subject"])
            ev[7].append(row["provider"])
            ev[8].append(dumps(row["generated_ids"]))
            ev[9].append(row["error"])
            ev[10].append(dumps(row["daticert"]))
            ev[11].append(dumps(row["data"]))
            ev[12].append(row["node"])
            ev[13].append(req)
        args += ev
        args += [list(done), worker]
        found = await self.fetchrow(COMMIT, *args)
        return set(found["created"])


def _marks(
    presa: Sequence[tuple[str, str, datetime]], settle: Sequence[tuple[str, str, datetime, str]]
) -> list[Any]:
    """The presa in carico and the outcomes as one row per expectation (message, recipient,
    presa's instant or None, outcome's instant or None, outcome or None): PostgreSQL applies
    only one of two updates of the same row in one statement, and a stage's commit often has
    both for one recipient (a local delivery of our own transmission takes charge and
    settles). Each has its own condition, as :func:`pecd.store.effects.apply`'s two
    statements: the presa only if none was recorded, the outcome only while not closed; they
    write different columns, so their order does not matter. ``presa`` and ``settle`` each
    name an expectation at most once (:func:`pecd.store.effects.one_statement`)."""
    rows: dict[tuple[str, str], list[Any]] = {}
    for m, r, at in presa:
        rows[m, r] = [m, r, at, None, None]
    for m, r, at, o in settle:
        row = rows.setdefault((m, r), [m, r, None, None, None])
        row[3], row[4] = at, o
    cols: list[list[Any]] = [[] for _ in range(5)]
    for row in rows.values():
        for i, v in enumerate(row):
            cols[i].append(v)
    return list(cols)


def _columns(
    rows: Sequence[tuple[Any, ...]], width: int, json_at: tuple[int, ...] = ()
) -> list[Any]:
    cols: list[list[Any]] = [[] for _ in range(width)]
    for row in rows:
        for i, v in enumerate(row):
            cols[i].append(dumps(v) if i in json_at else v)
    return list(cols)


def job_columns(rows: Sequence[dict[str, Any]]) -> list[Any]:
    """The ten arrays of :data:`INSERT_JOBS` for ``rows`` (:func:`pecd.store.jobs.job_row`)."""
    cols: list[list[Any]] = [[] for _ in range(10)]
    for r in rows:
        cols[0].append(r["kind"])
        cols[1].append(r["key"])
        cols[2].append(r["state"])
        cols[3].append(r["locked_by"])
        cols[4].append(r["locked_until"])
        cols[5].append(r["leased_by"])
        cols[6].append(dumps(r["payload"]))
        cols[7].append(r["data"])
        cols[8].append(r["next_run_at"])
        cols[9].append(r["created_at"])
    return list(cols)
