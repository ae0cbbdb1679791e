"""The pipeline stages behind the access point: each stage is one job, one database transaction.

A stage reads its job, produces its outputs (signed messages as new jobs, trace events) and commits
them together with the job's completion (design.md, invariants 2 and 3). Output jobs are keyed by
the submission's key, so a stage that re-runs after a crash creates nothing twice.
"""

from __future__ import annotations

import asyncio
import functools
import hashlib
import logging
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import asdict, dataclass, field
from datetime import datetime, timedelta
from typing import TYPE_CHECKING, Any

from cryptography.hazmat.primitives import serialization
from sqlalchemy.orm import Session

from pecd.clock import Clock, FixedClock, SystemClock
from pecd.config import Config
from pecd.pec.builders import BuiltMessage, ProviderIdentity, Transmission
from pecd.pec.checks import Submission, SubmissionLimits, check_submission
from pecd.pec.daticert import Daticert
from pecd.pec.daticert import to_json as daticert_json
from pecd.pec.timefmt import pec_time
from pecd.pec.vocab import Errore, Ricevuta, Trasporto
from pecd.runtime.formats import DELIVERED, FULL, Answers, Delivery, FormatWorkers
from pecd.store import expectations, jobs
from pecd.store.accounts import Accounts
from pecd.store.db import Database
from pecd.store.models import Job, Mailbox
from pecd.store.trace import TraceEventData, record_sync

if TYPE_CHECKING:
    from pecd.index import IndexService
    from pecd.runtime.relay import RelayClient

log = logging.getLogger(__name__)

# Job kinds.
SUBMISSION = "submission"  # a message accepted over SMTP, waiting for formal checks
DELIVERY = "delivery"  # a transport envelope for this provider's recipients
STORE = "store"  # a finished message (receipt, notice) to put in one local mailbox
RELAY = "relay"  # an envelope or receipt for another provider (worked by the relay)

LOCAL_KINDS = (SUBMISSION, DELIVERY, STORE)
MAILBOX_TTL = 2.0  # seconds an account read is reused by deliveries


class StageError(Exception):
    """A stage that cannot finish now; the job is retried with backoff, then parked."""


def domain_of(address: str) -> str:
    return address.rpartition("@")[2].lower()


@dataclass
class Services:
    """What the stages need; built once by the app."""

    cfg: Config
    clock: Clock
    db: Database
    accounts: Accounts
    provider: ProviderIdentity
    limits: SubmissionLimits
    wake: asyncio.Event
    formats: FormatWorkers
    relay: RelayClient | None = None
    index: IndexService | None = None
    relay_wake: asyncio.Event = field(default_factory=asyncio.Event)

    _mailboxes: dict[str, tuple[float, Mailbox | None]] = field(default_factory=dict)

    async def mailbox(self, address: str) -> Mailbox | None:
        """The account of a local mailbox, read at most every MAILBOX_TTL seconds: deliveries
        look every recipient up, and a mailbox disabled or resized is seen within that time."""
        now = asyncio.get_running_loop().time()
        hit = self._mailboxes.get(address)
        if hit is not None and now - hit[0] < MAILBOX_TTL:
            return hit[1]
        found = await self.accounts.get(address)
        if len(self._mailboxes) > 10_000:
            self._mailboxes.clear()
        self._mailboxes[address] = (now, found)
        return found

    def is_local(self, address: str) -> bool:
        return domain_of(address) in self.cfg.provider.local_domains

    def is_certified(self, address: str) -> bool:
        """PEC or not: a local domain, or a domain the provider index lists (spec section 1)."""
        if self.is_local(address):
            return True
        return self.index is not None and self.index.is_certified(address)


def _logged(d: Daticert | None) -> dict[str, Any] | None:
    return daticert_json(d) if d is not None else None


def _event(
    event: str,
    tx: Transmission,
    at: datetime,
    provider: ProviderIdentity,
    generated: Sequence[BuiltMessage] = (),
    *,
    error: str | None = None,
    daticert: Daticert | None = None,
    data: dict[str, Any] | None = None,
) -> TraceEventData:
    return TraceEventData(
        at=at,
        event=event,
        pec_msgid=tx.identificativo,
        client_msgid=tx.msgid,
        sender=tx.mittente,
        recipients=[{"address": d.address, "tipo": d.tipo.value} for d in tx.destinatari],
        subject=tx.oggetto,
        provider=provider.name,
        generated_ids=[m.message_id for m in generated],
        error=error,
        daticert=_logged(daticert or (generated[0].daticert if generated else None)),
        # Which certificate signed what this event generated: a reproduced receipt says so.
        data={**(data or {}), "signer_sha1": signer_sha1(provider)} if generated else data,
    )


@functools.lru_cache(maxsize=8)
def _sha1_of(der: bytes) -> str:
    return hashlib.sha1(der).hexdigest()


def signer_sha1(provider: ProviderIdentity) -> str:
    return _sha1_of(provider.signer.certificate.public_bytes(serialization.Encoding.DER))


@dataclass
class Outbox:
    """Finished messages for local mailboxes that a stage commits as store jobs leased to its
    own worker, then puts in their mailboxes right after the commit: the commit makes them
    durable, and no other worker has to claim them one by one. If the worker dies in between,
    the lease expires and any worker stores them as ordinary store jobs."""

    worker: str
    lease_until: datetime
    # key, mailbox, bytes, and whether the key is new for good (see flush)
    items: list[tuple[str, str, bytes, bool]] = field(default_factory=list)
    relayed: bool = False  # the commit queues work for the relay: wake its workers

    @classmethod
    def for_worker(cls, svc: Services, worker: str) -> Outbox:
        lease = timedelta(seconds=svc.cfg.queue.lease_seconds)
        return cls(worker=worker, lease_until=svc.clock.now() + lease)


def _store_job(
    s: Session,
    svc: Services,
    *,
    key: str,
    mailbox: str,
    msg: BuiltMessage,
    now: datetime,
    outbox: Outbox,
    unique: bool = False,
) -> bool:
    """Queue ``msg`` for one mailbox: local mailboxes get a store job (in ``outbox``), others
    go to the relay. ``unique``: ``key`` derives from one SMTP transaction's own intake key, so
    no other job, now or after finished jobs are purged, will ever carry it."""
    if svc.is_local(mailbox):
        created = jobs.enqueue_sync(
            s,
            kind=STORE,
            key=key,
            payload={"mailbox": mailbox, "message_id": msg.message_id},
            data=msg.raw,
            now=now,
            lease_to=outbox.worker,
            lease_until=outbox.lease_until,
        )
        if created:
            outbox.items.append((key, mailbox, msg.raw, unique))
        return created
    outbox.relayed = True
    return jobs.enqueue_sync(
        s,
        kind=RELAY,
        key=key,
        payload={
            "recipients": [mailbox],
            "message_id": msg.message_id,
            "mail_from": svc.cfg.provider.service_address,
            "kind": "receipt",
            "pec_msgid": msg.daticert.identificativo if msg.daticert else None,
        },
        data=msg.raw,
        now=now,
    )


def emit(
    s: Session,
    svc: Services,
    outbox: Outbox,
    *,
    key: str,
    mailbox: str,
    msg: BuiltMessage,
    event: TraceEventData,
    unique: bool = False,
) -> None:
    """Send one generated message (keyed, so at most once) and log it, at the event's time.
    ``unique``: see :func:`_store_job`."""
    _store_job(
        s, svc, key=key, mailbox=mailbox, msg=msg, now=event.at, outbox=outbox, unique=unique
    )
    record_sync(s, event)


async def flush(svc: Services, outbox: Outbox) -> None:
    """Store the outbox's committed messages now and complete their jobs in one transaction."""
    if not outbox.items:
        return

    try:
        # Each store job was created by the transaction just committed and is still leased to
        # us, so nobody delivered it yet; if its key is also unique for good (no later job can
        # carry it again), there is no earlier copy to search the folder for (fresh): the
        # service mailbox, which gets every presa in carico and is never read, is not read on
        # each delivery. Not when the lease is near its end: another worker may have begun.
        lease_left = (outbox.lease_until - svc.clock.now()).total_seconds()
        may_be_fresh = lease_left > svc.cfg.queue.lease_seconds / 2
        groups: dict[bool, list[tuple[str, str, bytes, bool]]] = {}
        for item in outbox.items:
            groups.setdefault(may_be_fresh and item[3], []).append(item)
        keys = []
        for fresh, items in groups.items():
            # Receipts are never refused for quota: losing one would lose the holder's proof.
            outcomes = await svc.formats.deliver_many(
                [(mailbox, key, data, None) for key, mailbox, data, _ in items], fresh=fresh
            )
            # One that could not be stored keeps its job: it runs again when its lease ends.
            keys += [i[0] for i, o in zip(items, outcomes, strict=True) if o == DELIVERED]
        await svc.db.write(lambda s: jobs.complete_leased(s, keys, outbox.worker))
    except Exception:
        # Committed already: the store jobs run again when their lease expires.
        log.warning("storing %d messages failed; retried later", len(outbox.items), exc_info=True)


# --- stages -----------------------------------------------------------------------------------
#
# A stage is split in two: ``prepare`` does the work that needs no transaction (parsing, checks,
# signing, Maildir deliveries, which are idempotent) and returns a ``Writer``; the writer puts the
# stage's outputs (next jobs, trace events) into a session. The worker runs the writers of a whole
# batch of claimed jobs in one transaction together with their completion, so the cost of a
# commit is shared by the batch (design.md invariant 2 holds per job: a job's outputs and its
# completion still commit together). Writers are synchronous and do database work only: the batch
# runs as one :meth:`Database.write` (on SQLite in the writer thread, the lock held for its
# statements alone).

Writer = Callable[[Session, "Outbox"], None]


def _nothing(s: Session, outbox: Outbox) -> None:
    return None


# --- stage: submission (access point) --------------------------------------------------------


async def stage_submission(svc: Services, job: Job) -> Writer:
    """Formal checks, then non-accettazione, or accettazione + transport envelope + its routing."""
    p = job.payload
    raw = job.data or b""
    when = pec_time(svc.clock.now())  # the acceptance instant: one value for everything below
    ident = svc.provider.new_msgid(when)
    tx = Transmission.from_submission(
        raw,
        mail_from=p["mail_from"],
        rcpt_to=p["rcpt_to"],
        identificativo=ident,
        is_certified=svc.is_certified,
    )
    violations = check_submission(
        Submission(raw, p["mail_from"], tuple(p["rcpt_to"]), p.get("user")), svc.limits
    )
    now = when.instant
    if violations:
        notice = await svc.formats.build(
            "non_accettazione", tx=tx, when=when, violations=violations
        )

        def refuse(s: Session, outbox: Outbox) -> None:
            emit(
                s,
                svc,
                outbox,
                key=f"{job.key}:non-accettazione",
                unique=True,  # from this transaction's own intake key
                mailbox=tx.mittente,
                msg=notice,
                event=_event(
                    Ricevuta.NON_ACCETTAZIONE.value,
                    tx,
                    now,
                    svc.provider,
                    [notice],
                    error="; ".join(v.code for v in violations),
                    data={"violations": [asdict(v) for v in violations], "intake": job.key},
                ),
            )

        return refuse

    acc, env = await svc.formats.build_many(
        ("accettazione", {"tx": tx, "when": when}),
        ("transport_envelope", {"original": raw, "tx": tx, "when": when}),
    )
    local = [r for r in tx.addresses if svc.is_local(r)]
    remote: dict[str, list[str]] = {}
    for r in tx.addresses:
        if not svc.is_local(r):
            remote.setdefault(domain_of(r), []).append(r)

    def accept(s: Session, outbox: Outbox) -> None:
        emit(
            s,
            svc,
            outbox,
            key=f"{job.key}:accettazione",
            unique=True,  # from this transaction's own intake key
            mailbox=tx.mittente,
            msg=acc,
            event=_event(
                Ricevuta.ACCETTAZIONE.value, tx, now, svc.provider, [acc], data={"intake": job.key}
            ),
        )
        record_sync(s, _event(Trasporto.POSTA_CERTIFICATA.value, tx, now, svc.provider, [env]))
        if local:
            jobs.enqueue_sync(
                s,
                kind=DELIVERY,
                key=f"{job.key}:delivery",
                payload={"recipients": local, "tx": tx.to_json(), "sent_at": now.isoformat()},
                data=env.raw,
                now=now,
            )
        # The 12 h / 24 h timers run for PEC recipients at other providers (spec 9).
        expectations.expect_sync(
            s,
            pec_msgid=tx.identificativo,
            recipients=[r for rs in remote.values() for r in rs if svc.is_certified(r)],
            sender=tx.mittente,
            tx=tx.to_json(),
            sent_at=now,
        )
        for dom, rcpts in sorted(remote.items()):
            outbox.relayed = True
            jobs.enqueue_sync(
                s,
                kind=RELAY,
                key=f"{job.key}:relay:{dom}",
                payload={
                    "recipients": rcpts,
                    "message_id": tx.identificativo,
                    "mail_from": tx.mittente,  # the reverse path stays the sender's (spec 2.3)
                    "kind": "envelope",
                    "tx": tx.to_json(),
                    "sent_at": now.isoformat(),
                },
                data=env.raw,
                now=now,
            )

    return accept


# --- stage: delivery (reception + delivery point for local recipients) -----------------------


async def stage_delivery(svc: Services, job: Job) -> Writer:
    """Verify the envelope as a reception point would, take it in charge, store it per recipient,
    and send the sender one avvenuta-consegna or errore-consegna per recipient.

    A crash before the commit re-runs the stage: the Maildir deliveries are idempotent (keyed by
    PEC msgid and recipient) and nothing else was emitted, so each receipt exists exactly once."""
    p = job.payload
    env = job.data or b""
    tx = Transmission.from_json(p["tx"])
    recipients: list[str] = list(p["recipients"])
    name = svc.provider.name
    # Who cannot receive it, from the accounts; the others get it in their INBOX.
    refused: dict[str, tuple[Errore, str]] = {}
    deliveries: list[Delivery] = []
    for rcpt in recipients:
        mb = await svc.mailbox(rcpt)
        if mb is None:
            refused[rcpt] = (Errore.NO_DEST, f"5.1.1 - {name} - indirizzo non valido")
        elif mb.disabled:
            refused[rcpt] = (Errore.ALTRO, f"5.2.1 - {name} - casella disabilitata")
        else:
            deliveries.append((rcpt, f"{tx.identificativo}:{rcpt}", env, mb.quota_bytes))
    # Same-provider mail gets full processing (RFC 6109 3.4): one presa in carico per
    # transaction, covering every recipient here, to our own service mailbox.
    taken = pec_time(svc.clock.now())
    # Our own service mailbox for same-provider mail; the sending provider's for relayed mail.
    mail_receipt = p.get("mail_receipt") or svc.cfg.provider.mail_receipt
    # On its last attempt a delivery that keeps failing for a recipient (a disk error, say)
    # becomes that recipient's errore-consegna: every recipient gets exactly one answer, even
    # when the job would otherwise be parked.
    last_try = job.attempts >= svc.cfg.queue.max_attempts
    # Verified as a reception point would, stored, taken in charge and answered: one round trip.
    done = await svc.formats.take_in_charge(
        env,
        deliveries,
        {"tx": tx, "when": taken, "ricezione": recipients, "mail_receipt": mail_receipt},
        Answers(
            tx=tx,
            recipients=recipients,
            refused=refused,
            last_try=last_try,
            # The receipts' time is read after the deliveries, in the worker: the system clock
            # goes there as it is, an injected one as a fixed copy of its time now.
            clock=svc.clock if isinstance(svc.clock, SystemClock) else FixedClock(svc.clock.now()),
        ),
    )
    c = done.classification
    if not c.is_valid_pec or done.presa is None:
        # Our own envelope failing our own verification is a bug or corruption: never deliver it.
        raise StageError(f"envelope {tx.identificativo} does not verify: {'; '.join(c.errors)}")
    if done.failed:
        raise StageError(
            "; ".join(f"delivery to {rcpt} failed: {error}" for rcpt, error in done.failed.items())
        )
    for (rcpt, _key, _data, _quota), outcome in zip(deliveries, done.outcomes, strict=True):
        if outcome not in (DELIVERED, FULL):
            log.error("delivery to %s failed on the last attempt: %s", rcpt, outcome)
    presa, receipts, when = done.presa, done.receipts, done.answered
    assert when is not None

    def write(s: Session, outbox: Outbox) -> None:
        emit(
            s,
            svc,
            outbox,
            key=f"{job.key}:presa-in-carico",
            unique=True,  # from this transaction's own intake key
            mailbox=mail_receipt,
            msg=presa,
            event=_event(
                Ricevuta.PRESA_IN_CARICO.value,
                tx,
                taken.instant,
                svc.provider,
                [presa],
                data={"to": mail_receipt},
            ),
        )
        for rcpt, event, receipt, error in receipts:
            emit(
                s,
                svc,
                outbox,
                # Keyed by transmission and recipient, not by job: an envelope that reaches us
                # twice (a peer's retry) is delivered once and answered once.
                key=f"esito:{tx.identificativo}:{rcpt}",
                mailbox=tx.mittente,
                msg=receipt,
                event=_event(
                    event,
                    tx,
                    when.instant,
                    svc.provider,
                    [receipt],
                    error=error,
                    data={"consegna": rcpt},
                ),
            )

    return write


# --- stage: store (a finished message into one local mailbox) --------------------------------


async def stage_store(svc: Services, job: Job) -> Writer:
    mailbox = job.payload["mailbox"]
    mb = await svc.mailbox(mailbox)
    if mb is None:
        raise StageError(f"mailbox {mailbox} does not exist")
    # Receipts are never refused for quota: losing one would lose the holder's legal proof.
    [outcome] = await svc.formats.deliver_many([(mailbox, job.key, job.data or b"", None)])
    if outcome != DELIVERED:
        raise StageError(f"storing in {mailbox} failed: {outcome}")
    return _nothing


Stage = Callable[[Services, Job], Awaitable[Writer]]

STAGES: dict[str, Stage] = {
    SUBMISSION: stage_submission,
    DELIVERY: stage_delivery,
    STORE: stage_store,
}
