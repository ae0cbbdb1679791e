"""The SQL side of the engine's effects: each effect of a stage becomes rows in the stage's one
transaction (jobs, trace events, timer rows), and the webhook job of an event that makes one."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime

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
from pecd.store import expectations, jobs, virus, webhooks
from pecd.store.trace import record_sync


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


def apply(
    s: Session, effects: Sequence[Effect], lease: Lease, into: Applied | None = None
) -> Applied:
    """Write ``effects`` into ``s`` (not committed)."""
    done = into if into is not None else Applied()
    created = done.stored
    for e in effects:
        if isinstance(e, Record):
            record_sync(s, e.event)
            # The event's webhook job, if any, in the same transaction as the event.
            if webhooks.enqueue_sync(s, e.event):
                done.webhooks += 1
        elif isinstance(e, StoreLocal):
            if jobs.enqueue_sync(
                s,
                kind=JobKind.STORE,
                key=e.key,
                payload=StorePayload(e.mailbox, e.message_id).to_json(),
                data=e.data,
                now=e.at,
                lease_to=lease.worker,
                lease_until=lease.until,
            ):
                created.append(e)
        elif isinstance(e, Enqueue):
            if (
                jobs.enqueue_sync(
                    s,
                    kind=e.kind,
                    key=e.key,
                    payload=e.payload.to_json(),
                    data=e.data,
                    now=e.at,
                    run_at=e.run_at,
                )
                and e.then
            ):
                apply(s, e.then, lease, done)
        elif isinstance(e, Expect):
            expectations.expect_sync(
                s,
                pec_msgid=e.pec_msgid,
                recipients=list(e.recipients),
                sender=e.sender,
                tx=e.tx.to_json(),
                sent_at=e.sent_at,
            )
        elif isinstance(e, TookCharge):
            expectations.took_charge_sync(s, e.pec_msgid, list(e.recipients), e.at)
        elif isinstance(e, Settle):
            expectations.close_sync(s, e.pec_msgid, e.recipient, e.at, e.outcome)
        elif isinstance(e, KeepInfected):
            virus.keep_sync(
                s,
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
            # Only the node whose claim marks the row sends the notice.
            if expectations.noticed_sync(s, e.pec_msgid, e.recipient, e.at, final=e.final):
                done.claimed += 1
                apply(s, e.then, lease, done)
        else:  # pragma: no cover - a new effect without its SQL
            raise TypeError(f"unknown effect {e!r}")
    return done
