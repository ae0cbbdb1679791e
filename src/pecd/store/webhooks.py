"""Webhooks: per mailbox, the URL its transmission events are POSTed to and the secret that signs
them (table ``webhooks``); and the events themselves, made into jobs.

An event becomes a WEBHOOK job in the transaction that records its trace event
(:func:`enqueue_sync`, called by ``store.effects.apply`` for every ``Record``): it is never lost
(the job commits with the event or not at all) and never sent before the event is durable (the
job cannot be claimed before that commit). The worker pool sends it (``pecd.web.webhooks``), and
a failure is retried with backoff, then parked, like any job (``pecd queue list``).

Events, for the mailbox that sent the transmission (the trace event's ``sender``):

* ``accepted`` / ``not-accepted``: its accettazione / non-accettazione (``recipient`` is null,
  ``recipients`` lists every recipient);
* ``delivered`` / ``failed``: an avvenuta-consegna / errore-consegna for one recipient, made
  here (local recipients, relay refusals, the 24 h timer, a virus found by the recipient's
  provider) or sent back by the recipient's provider (a receipt pertinent to our transmission).
  A delivered or failed event is sent only when the trace log has that mailbox's accettazione of
  the transmission: nobody else's receipt reaches a holder's webhook.
"""

from __future__ import annotations

import hashlib
import time
import weakref
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import Engine, delete, select
from sqlalchemy.orm import Session

from pecd.engine.vocab import JobKind, TraceEventData, TraceType
from pecd.pec.address import normalize_address
from pecd.store import jobs
from pecd.store.accounts import AccountError
from pecd.store.db import Database
from pecd.store.models import Mailbox, TraceEvent, Webhook
from pecd.store.trace import storable

__all__ = [
    "ACCEPTED",
    "DELIVERED",
    "EVENT_TYPES",
    "FAILED",
    "NOT_ACCEPTED",
    "WebhookInfo",
    "delete_webhook",
    "enqueue_sync",
    "event_id",
    "get_webhook",
    "job_for",
    "set_webhook",
]

ACCEPTED = "accepted"
NOT_ACCEPTED = "not-accepted"
DELIVERED = "delivered"
FAILED = "failed"
EVENT_TYPES = (ACCEPTED, NOT_ACCEPTED, DELIVERED, FAILED)

_ESITO = {
    TraceType.AVVENUTA_CONSEGNA.value: DELIVERED,
    TraceType.ERRORE_CONSEGNA.value: FAILED,
}


@dataclass(frozen=True, slots=True)
class WebhookInfo:
    mailbox: str
    url: str
    secret: str
    created_at: datetime


async def get_webhook(db: Database, mailbox: str) -> WebhookInfo | None:
    """The webhook of ``mailbox``, or None."""
    async with db.read_session() as s:
        row = await s.get(Webhook, normalize_address(mailbox))
        if row is None:
            return None
        return WebhookInfo(row.mailbox, row.url, row.secret, row.created_at)


async def set_webhook(db: Database, mailbox: str, url: str, secret: str, now: datetime) -> None:
    """Set (or replace) the webhook of an existing mailbox. The URL is checked by the caller
    (``pecd.web.webhooks.check_url``); AccountError if there is no such mailbox."""
    address = normalize_address(mailbox)
    if not 0 < len(url) <= 2048:
        raise AccountError("a webhook URL has 1 to 2048 characters")
    if not 16 <= len(secret) <= 128:
        raise AccountError("a webhook secret has 16 to 128 characters")
    async with db.session() as s, s.begin():
        if await s.get(Mailbox, address) is None:
            raise AccountError(f"mailbox {address} does not exist")
        row = await s.get(Webhook, address)
        if row is None:
            s.add(Webhook(mailbox=address, url=url, secret=secret, created_at=now))
        else:
            row.url, row.secret, row.created_at = url, secret, now
    _changed()


async def delete_webhook(db: Database, mailbox: str) -> bool:
    """Remove the webhook of ``mailbox``; False if it had none. Events already queued for it are
    dropped when their turn comes (nothing is sent without a webhook)."""
    async with db.session() as s, s.begin():
        result = await s.execute(
            delete(Webhook)
            .where(Webhook.mailbox == normalize_address(mailbox))
            .returning(Webhook.mailbox)
        )
        found = result.first() is not None
    _changed()
    return found


def event_id(pec_msgid: str, kind: str, recipient: str | None) -> str:
    """The id of an event (the same event twice has the same id: the receiver deduplicates by
    it, and the job key it makes is unique)."""
    digest = hashlib.sha256(f"{pec_msgid}\0{kind}\0{recipient or ''}".encode("utf-8", "replace"))
    return "evt_" + digest.hexdigest()[:32]


def _classify(event: TraceEventData) -> tuple[str, str | None] | None:
    """The webhook event type of a trace event, and the recipient it is about (None: every
    recipient); None when it is not one."""
    data: Mapping[str, Any] = event.data or {}
    if event.event == TraceType.ACCETTAZIONE.value:
        return ACCEPTED, None
    if event.event == TraceType.NON_ACCETTAZIONE.value:
        return NOT_ACCEPTED, None
    if event.event in _ESITO:
        consegna = data.get("consegna")
        return (_ESITO[event.event], str(consegna)) if consegna else None
    if (
        event.event == TraceType.RICEVUTA_RICEVUTA.value
        and data.get("pertinent")
        and not data.get("dropped")
        and data.get("ricevuta") in _ESITO
        and data.get("consegna")
    ):
        return _ESITO[str(data["ricevuta"])], str(data["consegna"])
    return None


#: Seconds a process reuses its list of the mailboxes that have a webhook (see _has_webhook).
WEBHOOKS_TTL = 1.0


class _Known:
    """This process's list of the mailboxes with a webhook, per database: read whole (one small
    query) at most every :data:`WEBHOOKS_TTL` seconds instead of a query per trace event. A
    webhook set or removed here is seen at once (:func:`_changed`), one set by another process
    (the web's, another node) within the TTL."""

    def __init__(self) -> None:
        self.generation = 0
        self.by_engine: weakref.WeakKeyDictionary[Engine, tuple[float, int, frozenset[str]]] = (
            weakref.WeakKeyDictionary()
        )

    def cached(self, engine: Engine) -> frozenset[str] | None:
        """The list if it is fresh, else None (read it and :meth:`keep` it)."""
        hit = self.by_engine.get(engine)
        if (
            hit is not None
            and hit[1] == self.generation
            and time.monotonic() - hit[0] < WEBHOOKS_TTL
        ):
            return hit[2]
        return None

    def keep(self, engine: Engine, generation: int, found: frozenset[str]) -> None:
        self.by_engine[engine] = (time.monotonic(), generation, found)

    def get(self, session: Session) -> frozenset[str]:
        engine = session.get_bind().engine
        found = self.cached(engine)
        if found is None:
            generation = self.generation
            found = frozenset(session.execute(select(Webhook.mailbox)).scalars())
            self.keep(engine, generation, found)
        return found


_KNOWN = _Known()
#: The query that lists the mailboxes with a webhook (for a caller with a connection of its own).
MAILBOXES_SQL = "SELECT mailbox FROM webhooks"


def known_mailboxes(engine: Engine) -> tuple[frozenset[str] | None, int]:
    """The mailboxes with a webhook if this process's list is fresh (else None), and the
    generation to pass to :func:`remember_mailboxes` with what :data:`MAILBOXES_SQL` read."""
    return _KNOWN.cached(engine), _KNOWN.generation


def remember_mailboxes(engine: Engine, generation: int, found: frozenset[str]) -> None:
    _KNOWN.keep(engine, generation, found)


def _changed() -> None:
    _KNOWN.generation += 1


def _has_webhook(session: Session, mailbox: str) -> bool:
    return mailbox in _KNOWN.get(session)


def enqueue_sync(session: Session, event: TraceEventData) -> bool:
    """Queue the webhook event ``event`` makes, if it makes one and its mailbox has a webhook;
    True if a job was queued. In the caller's transaction (not committed)."""
    row = job_for(session, event)
    return row is not None and bool(jobs.insert_many_sync(session, [row]))


def target(event: TraceEventData) -> tuple[str, str | None, str] | None:
    """The webhook event ``event`` would make if its mailbox had a webhook: (type, recipient,
    mailbox); None when it makes none."""
    if event.pec_msgid is None or event.sender is None:
        return None
    found = _classify(event)
    if found is None:
        return None
    kind, recipient = found
    return kind, recipient, normalize_address(event.sender)


def needs_history(kind: str) -> bool:
    """Whether the job of a webhook event of type ``kind`` reads the trace log (the
    transmission's accettazione): delivered and failed events."""
    return kind not in (ACCEPTED, NOT_ACCEPTED)


def job_for(session: Session, event: TraceEventData) -> dict[str, Any] | None:
    """The webhook job (a :func:`pecd.store.jobs.job_row`) that ``event`` makes, or None: not a
    webhook event, or its mailbox has no webhook. Reads in the caller's transaction."""
    found = target(event)
    if found is None:
        return None
    kind, recipient, mailbox = found
    if not _has_webhook(session, mailbox):
        return None
    if not needs_history(kind):
        return accepted_job(event, kind, mailbox)
    assert event.pec_msgid is not None
    # Only about a transmission this mailbox sent through us.
    accepted = session.execute(
        select(TraceEvent.sender, TraceEvent.client_msgid, TraceEvent.data)
        .where(
            TraceEvent.pec_msgid == event.pec_msgid,
            TraceEvent.event == TraceType.ACCETTAZIONE.value,
        )
        .order_by(TraceEvent.id)
        .limit(1)
    ).first()
    if accepted is None or normalize_address(accepted.sender or "") != mailbox:
        return None
    return _job(
        event,
        kind,
        mailbox,
        transmission=(accepted.data or {}).get("intake"),
        client_msgid=accepted.client_msgid,
        recipients=[str(recipient)],
        recipient=normalize_address(str(recipient)),
    )


def accepted_job(event: TraceEventData, kind: str, mailbox: str) -> dict[str, Any]:
    """The job of an accepted or not-accepted event (``target``'s type and mailbox), for a
    mailbox that has a webhook: all it needs is in the event."""
    data: Mapping[str, Any] = event.data or {}
    return _job(
        event,
        kind,
        mailbox,
        transmission=data.get("intake"),
        client_msgid=event.client_msgid,
        recipients=[str(r.get("address", "")) for r in event.recipients],
        recipient=None,
    )


def _job(
    event: TraceEventData,
    kind: str,
    mailbox: str,
    *,
    transmission: object,
    client_msgid: str | None,
    recipients: list[str],
    recipient: str | None,
) -> dict[str, Any]:
    assert event.pec_msgid is not None
    eid = event_id(event.pec_msgid, kind, recipient)
    body = {
        "id": eid,
        "type": kind,
        "mailbox": mailbox,
        "transmission": None if transmission is None else str(transmission),
        "pec_msgid": event.pec_msgid,
        "client_msgid": client_msgid,
        "recipient": recipient,
        "recipients": recipients,
        "at": event.at.isoformat(),
        "error": event.error,
    }
    return jobs.job_row(
        kind=JobKind.WEBHOOK,
        key=f"webhook:{eid}",
        payload=storable({"mailbox": mailbox, "recipients": recipients, "event": body}),
        now=event.at,
    )
