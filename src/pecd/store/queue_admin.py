"""The operator's view of the job queue (``pecd queue``): find jobs by kind, state, destination,
error and age; make them ready now (retry, requeue), park them, delete them.

Safe while ``pecd serve`` runs: every change is one conditional statement whose ``WHERE`` repeats
the states the action applies to, so a job a worker claimed between the operator's look and the
change is left alone. A job ``running`` under a lease that has not expired is never touched; one
whose lease expired (its worker died) counts as claimable, as it does for the workers.

The payload filter (destination) runs in Python over the payload JSON, so the same code serves
SQLite and PostgreSQL. Nothing here commits: the caller runs one command in one transaction.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from enum import StrEnum
from typing import Any

from sqlalchemy import ColumnElement, and_, delete, false, func, or_, select, update
from sqlalchemy.ext.asyncio import AsyncSession

from pecd.store.jobs import DONE, PARKED, READY, RUNNING
from pecd.store.models import Job

log = logging.getLogger("pecd.queue")

LEASED = "leased"  # running, its lease not expired: a worker has it
EXPIRED = "expired"  # running, its lease expired: its worker is gone, any worker may claim it
STATES = (READY, RUNNING, LEASED, EXPIRED, PARKED, DONE)
"""What ``--state`` accepts: the table's states, and ``running`` split by its lease."""

_CHUNK = 500  # ids per statement (SQLite's bound-parameter limit is far above)

# What deleting a job of each kind loses. Every kind but webhook carries a message that was
# accepted (the SMTP 250 was given) or a receipt owed to someone: deleting it breaks "exactly one
# of each receipt", so it takes --force.
LOSSES: Mapping[str, str] = {
    "submission": "a submitted message: the sender got 250 and will get neither accettazione "
    "nor non-accettazione",
    "reception": "a message received from another provider, not yet classified: no "
    "presa in carico, no delivery",
    "delivery": "a transport envelope for local recipients: no delivery, and neither avvenuta "
    "consegna nor errore di consegna",
    "store": "a finished message (receipt or notice) for a local mailbox: it never arrives",
    "relay": "an envelope or receipt for another provider: it is never sent (of an envelope, "
    "at most the 24-hour timer's notice tells the sender)",
    "webhook": "one webhook notification",
}
NEVER_DELETED = frozenset({"submission", "reception"})
"""Kinds never deleted, even with --force: a pipeline stage issues the receipt (accettazione or
non-accettazione; presa in carico) in the transaction that completes the job, so a queued job of
these kinds is a message taken with a 250 whose receipt is still owed. Park it instead."""
SAFE_TO_DELETE = frozenset({"webhook"})
"""Kinds whose parked jobs can be deleted without --force: nothing certified is lost."""


class Action(StrEnum):
    RETRY = "retry"  # ready now, attempts kept
    REQUEUE = "requeue"  # ready now, attempts back to 0
    PARK = "park"
    DELETE = "delete"


class QueueAdminError(ValueError):
    """An operator request that cannot be done as asked."""


@dataclass(frozen=True)
class JobFilter:
    """Which jobs: every field set must match (an empty filter matches every job not done)."""

    kinds: tuple[str, ...] = ()
    states: tuple[str, ...] = ()  # of STATES; empty: all but done
    destination: str | None = None  # a recipient domain, or the host (host:port) of its route
    error: str | None = None  # a substring of last_error, any case
    older_than: timedelta | None = None  # created more than this long ago
    limit: int | None = None

    def is_empty(self) -> bool:
        return not (self.kinds or self.states or self.destination or self.error or self.older_than)


@dataclass(frozen=True)
class JobSummary:
    """What an operator sees of a job: its row without the bytes, and the payload's gist."""

    id: int
    kind: str
    key: str
    state: str
    lease: str | None  # LEASED / EXPIRED for a running job
    attempts: int
    next_run_at: datetime
    locked_by: str | None
    locked_until: datetime | None
    last_error: str | None
    created_at: datetime
    updated_at: datetime
    size: int  # bytes of the message the job carries (0: none)
    sender: str | None
    recipients: tuple[str, ...]
    destinations: tuple[str, ...]  # the recipients' domains
    message_id: str | None
    subject: str | None
    payload: dict[str, Any] = field(repr=False)

    @property
    def shown_state(self) -> str:
        return self.lease if self.lease is not None else self.state

    def loss(self) -> str:
        """What deleting this job loses, in one line."""
        what = LOSSES.get(self.kind, f"a {self.kind} job")
        parts = [f"job {self.id} ({self.kind}, key {self.key}): {what}"]
        if self.sender:
            parts.append(f"from {self.sender}")
        if self.recipients:
            parts.append("to " + ", ".join(self.recipients))
        if self.message_id:
            parts.append(f"id {self.message_id}")
        if self.size:
            parts.append(f"{self.size} bytes")
        return "; ".join(parts)

    def to_json(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "kind": self.kind,
            "key": self.key,
            "state": self.state,
            "lease": self.lease,
            "attempts": self.attempts,
            "next_run_at": self.next_run_at.isoformat(),
            "locked_by": self.locked_by,
            "locked_until": self.locked_until.isoformat() if self.locked_until else None,
            "last_error": self.last_error,
            "created_at": self.created_at.isoformat(),
            "updated_at": self.updated_at.isoformat(),
            "size": self.size,
            "sender": self.sender,
            "recipients": list(self.recipients),
            "destinations": list(self.destinations),
            "message_id": self.message_id,
            "subject": self.subject,
        }


# --- reading ----------------------------------------------------------------------------------


def _str(v: object) -> str | None:
    return v if isinstance(v, str) and v else None


def _strs(v: object) -> tuple[str, ...]:
    if isinstance(v, list | tuple):
        return tuple(str(x) for x in v if x)
    return ()


def _domain(address: str) -> str:
    return address.rpartition("@")[2].strip().strip(">").lower()


def _gist(p: Mapping[str, Any]) -> tuple[str | None, tuple[str, ...], str | None, str | None]:
    """sender, recipients, message id, subject of a payload of any kind (tolerant of the
    payloads of earlier versions and of malformed ones: this is for looking, not for running)."""
    tx = p.get("tx") if isinstance(p.get("tx"), dict) else {}
    assert isinstance(tx, dict)
    sender = _str(p.get("mail_from")) or _str(tx.get("mittente"))
    recipients = _strs(p.get("recipients")) or _strs(p.get("rcpt_to"))
    if not recipients and _str(p.get("mailbox")):
        recipients = (str(p["mailbox"]),)
    message_id = (
        _str(p.get("pec_msgid"))
        or _str(tx.get("identificativo"))
        or _str(p.get("message_id"))
        or _str(p.get("msgid"))
    )
    return sender, recipients, message_id, _str(tx.get("oggetto"))


def _summary(row: Any, now: datetime) -> JobSummary:
    payload = row.payload if isinstance(row.payload, dict) else {}
    sender, recipients, message_id, subject = _gist(payload)
    lease = None
    if row.state == RUNNING:
        lease = LEASED if row.locked_until is None or row.locked_until >= now else EXPIRED
    return JobSummary(
        id=row.id,
        kind=row.kind,
        key=row.key,
        state=row.state,
        lease=lease,
        attempts=row.attempts,
        next_run_at=row.next_run_at,
        locked_by=row.locked_by,
        locked_until=row.locked_until,
        last_error=row.last_error,
        created_at=row.created_at,
        updated_at=row.updated_at,
        size=int(row.size or 0),
        sender=sender,
        recipients=recipients,
        destinations=tuple(dict.fromkeys(_domain(r) for r in recipients)),
        message_id=message_id,
        subject=subject,
        payload=payload,
    )


def _columns() -> Any:
    return select(
        Job.id,
        Job.kind,
        Job.key,
        Job.state,
        Job.payload,
        Job.attempts,
        Job.next_run_at,
        Job.locked_by,
        Job.locked_until,
        Job.last_error,
        Job.created_at,
        Job.updated_at,
        func.coalesce(func.length(Job.data), 0).label("size"),
    )


def _state_clause(states: Iterable[str], now: datetime) -> ColumnElement[bool]:
    """SQL for ``--state``: the table's states, ``leased`` and ``expired`` by the lease."""
    parts: list[ColumnElement[bool]] = []
    plain = [s for s in states if s in (READY, RUNNING, PARKED, DONE)]
    if plain:
        parts.append(Job.state.in_(plain))
    if LEASED in states:
        parts.append(
            and_(Job.state == RUNNING, or_(Job.locked_until.is_(None), Job.locked_until >= now))
        )
    if EXPIRED in states:
        parts.append(and_(Job.state == RUNNING, Job.locked_until < now))
    return or_(*parts) if parts else false()


def _matches_destination(
    j: JobSummary, destination: str, routes: Mapping[str, tuple[str, int]]
) -> bool:
    want = destination.strip().lower().lstrip("@")
    for domain in j.destinations:
        if domain == want:
            return True
        route = routes.get(domain)
        if route is not None and want in (route[0].lower(), f"{route[0].lower()}:{route[1]}"):
            return True
    return False


async def find(
    session: AsyncSession,
    flt: JobFilter,
    *,
    now: datetime,
    routes: Mapping[str, tuple[str, int]] | None = None,
) -> list[JobSummary]:
    """The jobs ``flt`` selects, oldest id first. ``routes``: the config's static routes
    (domain -> (host, port)), so that ``destination`` may name a route's host."""
    for s in flt.states:
        if s not in STATES:
            raise QueueAdminError(f"unknown state {s!r} (one of {', '.join(STATES)})")
    stmt = _columns().order_by(Job.id)
    stmt = stmt.where(_state_clause(flt.states or (READY, RUNNING, PARKED), now))
    if flt.kinds:
        stmt = stmt.where(Job.kind.in_(list(flt.kinds)))
    if flt.error:
        stmt = stmt.where(Job.last_error.icontains(flt.error, autoescape=True))
    if flt.older_than is not None:
        stmt = stmt.where(Job.created_at < now - flt.older_than)
    if flt.destination is None:
        if flt.limit is not None:
            stmt = stmt.limit(flt.limit)
        return [_summary(r, now) for r in await session.execute(stmt)]
    # The destination is in the payload: filtered here.
    out = [
        j
        for j in (_summary(r, now) for r in await session.execute(stmt))
        if _matches_destination(j, flt.destination, routes or {})
    ]
    return out if flt.limit is None else out[: flt.limit]


async def get(session: AsyncSession, job_id: int, *, now: datetime) -> JobSummary | None:
    row = (await session.execute(_columns().where(Job.id == job_id))).first()
    return None if row is None else _summary(row, now)


# --- changing ---------------------------------------------------------------------------------


def applies_to(action: Action, *, force: bool = False) -> tuple[str, ...]:
    """The states (of :data:`STATES`) ``action`` changes; ``leased`` is never among them."""
    if action is Action.PARK:
        return (READY, EXPIRED)
    if action is Action.DELETE:
        return (PARKED, READY, EXPIRED) if force else (PARKED,)
    return (READY, PARKED, EXPIRED)  # retry, requeue


def eligible(j: JobSummary, action: Action, *, force: bool = False) -> bool:
    return j.shown_state in applies_to(action, force=force)


def refused_deletions(jobs: Iterable[JobSummary], *, force: bool) -> list[JobSummary]:
    """Among ``jobs`` (about to be deleted), those that may not be: a submission or reception
    (never), any kind but webhook without ``force``."""
    return [
        j for j in jobs if j.kind in NEVER_DELETED or (not force and j.kind not in SAFE_TO_DELETE)
    ]


def _values(action: Action, now: datetime) -> dict[str, Any]:
    values: dict[str, Any] = {"locked_by": None, "locked_until": None, "updated_at": now}
    if action is Action.PARK:
        values["state"] = PARKED
    else:
        values |= {"state": READY, "next_run_at": now}
        if action is Action.REQUEUE:
            values["attempts"] = 0
    return values


async def change(
    session: AsyncSession,
    action: Action,
    jobs: Sequence[JobSummary],
    *,
    now: datetime,
    force: bool = False,
) -> list[int]:
    """Apply ``action`` to ``jobs``, each only if it is still in a state the action applies to
    (one conditional statement per batch of ids: a worker's claim in between wins). Deleting
    refuses (QueueAdminError, nothing done) jobs whose loss needs ``force``; every deleted job is
    logged at WARNING with its key. Returns the ids changed. Does not commit."""
    targets = [j for j in jobs if eligible(j, action, force=force)]
    if action is Action.DELETE:
        refused = refused_deletions(targets, force=force)
        if refused:
            raise QueueAdminError(
                f"{len(refused)} job(s) carry a certified message or an owed receipt: "
                "not deleted (--force allows it, but never for a submission or reception)"
            )
    by_id = {j.id: j for j in targets}
    ids = list(by_id)
    cond = _state_clause(applies_to(action, force=force), now)
    changed: list[int] = []
    for i in range(0, len(ids), _CHUNK):
        chunk = ids[i : i + _CHUNK]
        if action is Action.DELETE:
            stmt: Any = delete(Job)
        else:
            stmt = update(Job).values(**_values(action, now))
        stmt = (
            stmt.where(Job.id.in_(chunk), cond)
            .returning(Job.id)
            .execution_options(synchronize_session=False)
        )
        changed.extend((await session.execute(stmt)).scalars())
    changed.sort()
    if action is Action.DELETE:
        for job_id in changed:
            j = by_id[job_id]
            log.warning("queue: deleted (it was %s) %s", j.shown_state, j.loss())
    return changed
