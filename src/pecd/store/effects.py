"""The SQL side of the engine's effects: each effect of a stage becomes rows in the stage's one
transaction (jobs, trace events, timer rows), and the webhook job of an event that makes one.

Effects are applied in waves, so that a whole batch of stages costs a few statements rather than
a few per effect: the jobs of a wave go in one ``INSERT … ON CONFLICT DO NOTHING RETURNING key``,
the timer rows in one executemany per statement, the trace events in one executemany at the end
of the transaction (:func:`pecd.store.db.defer`). The ``then`` of an :class:`Enqueue` (effects
that count only if its job was created) is the next wave. The result is what applying the effects
one by one, in order, would give: the trace events keep that order too.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from sqlalchemy import bindparam, update
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.orm import Session

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
from pecd.engine.vocab import JobKind, StorePayload
from pecd.pec.address import normalize_address
from pecd.store import expectations, jobs, sqlitefast, virus, webhooks
from pecd.store.db import Database, defer
from pecd.store.models import Expectation, table_of
from pecd.store.nodes import current
from pecd.store.trace import event_row, insert_stmt


@dataclass(frozen=True)
class Lease:
    """Store jobs made by a stage are born leased to the worker that committed them: it stores
    them right after the commit (no other worker has to claim them); if it dies, the lease ends
    and any worker does."""

    worker: str
    until: datetime


@dataclass
class Applied:
    """What applying effects made: the messages for local mailboxes whose store job it created
    (to store once the transaction commits), and how many timer notices it claimed."""

    stored: list[StoreLocal] = field(default_factory=list)
    claimed: int = 0
    webhooks: int = 0  # webhook jobs queued for the events recorded (pecd.store.webhooks)


# A trace event's place: its row, or the place of the events an Enqueue's ``then`` records
# once the next wave knows whether its job was created.
_Slot = dict[str, Any] | list["_Slot"]


class _Wave:
    """One wave: the jobs it inserts (and what follows from each being created), the timer
    statements in their order, the trace events in their places."""

    def __init__(self) -> None:
        self.jobs: list[dict[str, Any]] = []
        self.created: list[Callable[[], None] | None] = []
        self.timers: list[tuple[Any, dict[str, Any]]] = []


class _Applier:
    def __init__(self, s: Session, lease: Lease, done: Applied) -> None:
        self.s = s
        self.lease = lease
        self.done = done
        self.dialect = s.get_bind().dialect.name
        node = current(s)
        self.node = node.id if node is not None else None
        self.events: list[_Slot] = []
        self.wave = _Wave()  # the wave that the ``then`` of this one's created jobs go to

    def run(self, effects: Sequence[Effect]) -> None:
        wave = _Wave()
        self.add(wave, effects, self.events)
        while wave.jobs or wave.timers:
            self.flush_timers(wave)
            nxt = _Wave()
            keys = jobs.insert_many_sync(self.s, wave.jobs) if wave.jobs else set()
            self.wave = nxt
            for row, then in zip(wave.jobs, wave.created, strict=True):
                if row["key"] in keys:
                    keys.discard(row["key"])  # a second row with the same key was not created
                    if then is not None:
                        then()
            wave = nxt
        for row in _flatten(self.events):
            defer(self.s, insert_stmt(), row)

    def flush_timers(self, wave: _Wave) -> None:
        """The timer statements queued so far, in order (runs of one statement: one
        executemany)."""
        i = 0
        timers = wave.timers
        while i < len(timers):
            stmt = timers[i][0]
            j = i
            while j < len(timers) and timers[j][0] is stmt:
                j += 1
            self.s.execute(stmt, [p for _, p in timers[i:j]])
            i = j
        timers.clear()

    def add(self, wave: _Wave, effects: Sequence[Effect], events: list[_Slot]) -> None:
        done = self.done
        for e in effects:
            if isinstance(e, Record):
                events.append(event_row(e.event))
                # The event's webhook job, if any, in the same transaction as the event.
                hook = webhooks.job_for(self.s, e.event)
                if hook is not None:
                    wave.jobs.append(hook)
                    wave.created.append(self._counted)
            elif isinstance(e, StoreLocal):
                wave.jobs.append(
                    jobs.job_row(
                        kind=JobKind.STORE,
                        key=e.key,
                        payload=StorePayload(e.mailbox, e.message_id).to_json(),
                        data=e.data,
                        now=e.at,
                        lease_to=self.lease.worker,
                        lease_until=self.lease.until,
                        node=self.node,
                    )
                )
                wave.created.append(functools.partial(done.stored.append, e))
            elif isinstance(e, Enqueue):
                wave.jobs.append(
                    jobs.job_row(
                        kind=e.kind,
                        key=e.key,
                        payload=e.payload.to_json(),
                        data=e.data,
                        now=e.at,
                        run_at=e.run_at,
                    )
                )
                if e.then:
                    place: list[_Slot] = []
                    events.append(place)
                    wave.created.append(functools.partial(self._then, e.then, place))
                else:
                    wave.created.append(None)
            elif isinstance(e, Expect):
                if e.recipients:
                    tx = e.tx.to_json()
                    stmt = _expect_stmt(self.dialect)
                    wave.timers += [
                        (
                            stmt,
                            {
                                "pec_msgid": e.pec_msgid,
                                "recipient": r,
                                "sender": e.sender,
                                "tx": tx,
                                "sent_at": e.sent_at,
                            },
                        )
                        for r in e.recipients
                    ]
            elif isinstance(e, TookCharge):
                stmt = _took_charge_stmt()
                wave.timers += [
                    (stmt, {"m": e.pec_msgid, "r": normalize_address(r), "at": e.at})
                    for r in dict.fromkeys(e.recipients)
                ]
            elif isinstance(e, Settle):
                stmt = _settle_stmt(e.outcome != "scaduto")
                params = {
                    "m": e.pec_msgid,
                    "r": normalize_address(e.recipient),
                    "at": e.at,
                    "o": e.outcome,
                }
                wave.timers.append((stmt, params))
            elif isinstance(e, KeepInfected):
                virus.keep_sync(
                    self.s,
                    key=e.key,
                    at=e.at,
                    point=e.point,
                    signature=e.signature,
                    pec_msgid=e.pec_msgid,
                    sender=e.sender,
                    recipients=list(e.recipients),
                    data=e.data,
                )
            elif isinstance(e, ClaimNotice):
                # Only the node whose claim marks the row sends the notice: read at once, after
                # the timer statements before it.
                self.flush_timers(wave)
                if expectations.noticed_sync(self.s, e.pec_msgid, e.recipient, e.at, final=e.final):
                    done.claimed += 1
                    self.add(wave, e.then, events)
            else:  # pragma: no cover - a new effect without its SQL
                raise TypeError(f"unknown effect {e!r}")

    def _counted(self) -> None:
        self.done.webhooks += 1

    def _then(self, then: Sequence[Effect], place: list[_Slot]) -> None:
        self.add(self.wave, then, place)


def _flatten(slots: list[_Slot]) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    for slot in slots:
        if isinstance(slot, list):
            out += _flatten(slot)
        else:
            out.append(slot)
    return out


@functools.cache
def _expect_stmt(dialect: str) -> Any:
    insert = postgresql.insert if dialect == "postgresql" else sqlite.insert
    return insert(table_of(Expectation)).on_conflict_do_nothing(
        index_elements=["pec_msgid", "recipient"]
    )


_E = table_of(Expectation).c


@functools.cache
def _took_charge_stmt() -> Any:
    return (
        update(table_of(Expectation))
        .where(
            _E.pec_msgid == bindparam("m"), _E.recipient == bindparam("r"), _E.presa_at.is_(None)
        )
        .values(presa_at=bindparam("at", type_=_E.presa_at.type))
    )


@functools.cache
def _settle_stmt(delivered: bool) -> Any:
    at = bindparam("at", type_=_E.closed_at.type)
    values: dict[str, Any] = {"closed_at": at, "outcome": bindparam("o")}
    if delivered:
        values["delivered_at"] = at
    return (
        update(table_of(Expectation))
        .where(
            _E.pec_msgid == bindparam("m"), _E.recipient == bindparam("r"), _E.closed_at.is_(None)
        )
        .values(**values)
    )


def apply(
    s: Session, effects: Sequence[Effect], lease: Lease, into: Applied | None = None
) -> Applied:
    """Write ``effects`` into ``s`` (not committed)."""
    done = into if into is not None else Applied()
    _Applier(s, lease, done).run(effects)
    return done


@dataclass
class OneStatement:
    """A batch's effects as the arrays of :meth:`pecd.store.pgfast.PgFast.commit` (PostgreSQL:
    the whole commit in one statement), built by :func:`one_statement`."""

    jobs: list[dict[str, Any]] = field(default_factory=list)
    expect: list[tuple[str, str, str, Any, datetime]] = field(default_factory=list)
    presa: list[tuple[str, str, datetime]] = field(default_factory=list)
    settle: list[tuple[str, str, datetime, str]] = field(default_factory=list)
    events: list[tuple[dict[str, Any], str | None]] = field(default_factory=list)
    stores: dict[str, StoreLocal] = field(default_factory=dict)
    hooks: set[str] = field(default_factory=set)

    def applied(self, created: set[str]) -> Applied:
        """What :func:`apply` would have returned, given the keys of the jobs created."""
        return Applied(
            stored=[e for key, e in self.stores.items() if key in created],
            webhooks=len(self.hooks & created),
        )


def one_statement(
    effects: Sequence[Effect], lease: Lease, node: str | None, webhook_mailboxes: frozenset[str]
) -> OneStatement | None:
    """``effects`` as one statement's rows, or None when they need more than one (a timer
    notice claimed, an infected message kept, an effect that waits on another beyond a trace
    event, the same job twice, a delivery event for a mailbox with a webhook, timer rows made
    and changed in the same batch): :func:`apply` writes those."""
    plan = OneStatement()
    keys: set[str] = set()
    made: set[tuple[str, str]] = set()
    touched: set[tuple[str, str]] = set()
    settled: set[tuple[str, str]] = set()

    def job(row: dict[str, Any]) -> bool:
        if row["key"] in keys:
            return False
        keys.add(row["key"])
        plan.jobs.append(row)
        return True

    def record(event: Any, req: str | None) -> bool:
        plan.events.append((event_row(event), req))
        if not webhook_mailboxes:  # no mailbox has a webhook (the usual case): none to queue
            return True
        found = webhooks.target(event)
        if found is None or found[2] not in webhook_mailboxes:
            return True
        kind, _recipient, mailbox = found
        if req is not None or webhooks.needs_history(kind):
            return False
        hook = webhooks.accepted_job(event, kind, mailbox)
        plan.hooks.add(hook["key"])
        return job(hook)

    for e in effects:
        if isinstance(e, Record):
            if not record(e.event, None):
                return None
        elif isinstance(e, StoreLocal):
            row = jobs.job_row(
                kind=JobKind.STORE,
                key=e.key,
                payload=StorePayload(e.mailbox, e.message_id).to_json(),
                data=e.data,
                now=e.at,
                lease_to=lease.worker,
                lease_until=lease.until,
                node=node,
            )
            if not job(row):
                return None
            plan.stores[e.key] = e
        elif isinstance(e, Enqueue):
            row = jobs.job_row(
                kind=e.kind,
                key=e.key,
                payload=e.payload.to_json(),
                data=e.data,
                now=e.at,
                run_at=e.run_at,
            )
            if not job(row):
                return None
            for then in e.then:
                if not isinstance(then, Record) or not record(then.event, e.key):
                    return None
        elif isinstance(e, Expect):
            tx = e.tx.to_json()
            for r in e.recipients:
                plan.expect.append((e.pec_msgid, r, e.sender, tx, e.sent_at))
                made.add((e.pec_msgid, r))
        elif isinstance(e, TookCharge):
            for r in dict.fromkeys(e.recipients):
                pair = (e.pec_msgid, normalize_address(r))
                plan.presa.append((*pair, e.at))
                touched.add(pair)
        elif isinstance(e, Settle):
            pair = (e.pec_msgid, normalize_address(e.recipient))
            if pair in settled:  # twice in one batch: applied one by one, in order
                return None
            plan.settle.append((*pair, e.at, e.outcome))
            settled.add(pair)
            touched.add(pair)
        else:
            return None
    # A presa in carico and an outcome of one recipient in the same batch (every local
    # delivery of our own transmission) are fine: the fast paths write both (pgfast merges them
    # into one update of the row, SQLite runs the two statements in turn).
    if made & touched or len({(m, r) for m, r, _ in plan.presa}) != len(plan.presa):
        return None
    return plan


async def commit_plan(
    db: Database, plan: OneStatement, done: Sequence[int], worker: str
) -> set[str]:
    """``plan`` written and the jobs ``done`` completed (still leased to ``worker``, else
    :class:`~pecd.store.pgfast.LeasesLost` and nothing is written), in one transaction: one
    statement on PostgreSQL, the writer thread's ``sqlite3`` connection on SQLite. Returns the
    keys of the jobs created."""
    if db.pg is not None:
        return await db.pg.commit(
            jobs=plan.jobs,
            expect=plan.expect,
            presa=plan.presa,
            settle=plan.settle,
            events=plan.events,
            done=done,
            worker=worker,
        )
    return await db.write_sqlite(
        functools.partial(sqlitefast.commit, plan=plan, done=done, worker=worker)
    )
