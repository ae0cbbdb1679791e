"""The delivery point's rules (spec 2.3): verify the envelope as a reception point would, take it
in charge, store it per recipient, and owe the sender exactly one avvenuta-consegna or
errore-consegna per recipient. And the store stage: a finished message into one local mailbox."""

from __future__ import annotations

import functools
from collections.abc import Mapping, Sequence
from datetime import datetime

from pecd.engine.context import Context
from pecd.engine.effects import (
    Answered,
    BuildCall,
    Deliver,
    Delivery,
    Effect,
    LookUpMailboxes,
    MailboxState,
    Settle,
    Stage,
    StageError,
    TakeInCharge,
    TakenInCharge,
    TookCharge,
)
from pecd.engine.vocab import DeliveryPayload, Outcome, Stored, StorePayload, TraceType
from pecd.pec import builders
from pecd.pec.builders import Transmission
from pecd.pec.classify import Classification
from pecd.pec.texts import errore_esteso
from pecd.pec.timefmt import PecTime, pec_time
from pecd.pec.vocab import Errore


def refusals(
    provider_name: str, recipients: Sequence[str], mailboxes: Mapping[str, MailboxState | None]
) -> dict[str, tuple[Errore, str]]:
    """The recipients refused before any delivery, with their (errore, errore-esteso)."""
    refused: dict[str, tuple[Errore, str]] = {}
    for rcpt in recipients:
        mb = mailboxes.get(rcpt)
        if mb is None:
            refused[rcpt] = (
                Errore.NO_DEST,
                errore_esteso("5.1.1", provider_name, "indirizzo non valido"),
            )
        elif mb.disabled:
            refused[rcpt] = (
                Errore.ALTRO,
                errore_esteso("5.2.1", provider_name, "casella disabilitata"),
            )
    return refused


def receipts_owed(
    provider_name: str,
    tx: Transmission,
    recipients: Sequence[str],
    refused: Mapping[str, tuple[Errore, str]],
    tried: Sequence[str],
    last_try: bool,
    classification: Classification,
    outcomes: Sequence[Outcome],
    when: PecTime,
) -> Answered:
    """What the sender is owed once the deliveries to ``tried`` (in order) came out as
    ``outcomes``: one receipt per recipient, or nothing yet when a delivery failed and the job
    will try again. On ``last_try`` a failed delivery is answered errore-consegna instead, so
    that every recipient gets exactly one answer even when the job would be parked."""
    owed = dict(refused)
    failed: dict[str, str] = {}
    for rcpt, outcome in zip(tried, outcomes, strict=True):
        if outcome.stored is Stored.FULL:
            owed[rcpt] = (Errore.ALTRO, errore_esteso("5.2.2", provider_name, "casella piena"))
        elif outcome.stored is not Stored.DELIVERED:
            if last_try:
                owed[rcpt] = (
                    Errore.ALTRO,
                    errore_esteso("5.3.0", provider_name, "errore di sistema"),
                )
            else:
                failed[rcpt] = outcome.error or outcome.stored.value
    if failed:
        return Answered(failed=failed)
    receipts: list[tuple[str, str, BuildCall, str | None]] = []
    for rcpt in recipients:
        if rcpt in owed:
            errore, esteso = owed[rcpt]
            call = functools.partial(
                builders.errore_consegna,
                tx=tx,
                when=when,
                recipient=rcpt,
                errore=errore,
                errore_esteso=esteso,
            )
            receipts.append((rcpt, TraceType.ERRORE_CONSEGNA, call, esteso))
        else:
            call = functools.partial(
                builders.avvenuta_consegna,
                tx=tx,
                when=when,
                recipient=rcpt,
                postacert=classification.postacert,
            )
            receipts.append((rcpt, TraceType.AVVENUTA_CONSEGNA, call, None))
    return Answered(receipts=tuple(receipts))


def delivery(
    ctx: Context,
    key: str,
    p: DeliveryPayload,
    envelope: bytes,
    *,
    attempts: int,
    now: datetime,
) -> Stage:
    """Stage of a DELIVERY job ``key`` on its ``attempts``-th try. A crash before the commit
    re-runs it: the deliveries are idempotent (keyed by PEC msgid and recipient) and nothing else
    was sent, so each receipt exists exactly once."""
    tx = p.tx
    recipients = list(p.recipients)
    name = ctx.provider.name
    mailboxes: Mapping[str, MailboxState | None] = yield LookUpMailboxes(tuple(recipients))
    refused = refusals(name, recipients, mailboxes)
    deliveries = tuple(
        Delivery(rcpt, f"{tx.identificativo}:{rcpt}", envelope, mb.quota_bytes)
        for rcpt in recipients
        if rcpt not in refused and (mb := mailboxes.get(rcpt)) is not None
    )
    taken = pec_time(now)
    # Our own service mailbox for same-provider mail; the sending provider's for relayed mail.
    mail_receipt = p.mail_receipt or ctx.mail_receipt
    done: TakenInCharge = yield TakeInCharge(
        envelope,
        deliveries,
        # One presa in carico per transaction, covering every recipient here (spec 2.3).
        functools.partial(
            builders.presa_in_carico,
            tx=tx,
            when=taken,
            ricezione=recipients,
            mail_receipt=mail_receipt,
        ),
        functools.partial(
            receipts_owed,
            name,
            tx,
            recipients,
            refused,
            [d.mailbox for d in deliveries],
            attempts >= ctx.rules.max_attempts,
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
    assert done.answered is not None
    # Our own transmission (the access point queued it; a peer's names its mailReceipt): its
    # presa in carico and its esiti settle the 12 h / 24 h timers here, as the receipts coming
    # back from another provider do at the reception point (engine/reception.py).
    own = p.mail_receipt is None
    effects: list[Effect] = (
        [TookCharge(tx.identificativo, tuple(recipients), taken.instant)] if own else []
    )
    effects += ctx.emit(
        key=f"{key}:presa-in-carico",
        unique=True,  # from this transaction's own intake key
        mailbox=mail_receipt,
        msg=done.presa,
        event=ctx.event(
            TraceType.PRESA_IN_CARICO, tx, taken.instant, [done.presa], data={"to": mail_receipt}
        ),
    )
    for rcpt, event, receipt, error in done.receipts:
        effects += ctx.emit(
            # Keyed by transmission and recipient, not by job: an envelope that reaches us twice
            # (a peer's retry) is delivered once and answered once.
            key=f"esito:{tx.identificativo}:{rcpt}",
            mailbox=tx.mittente,
            msg=receipt,
            event=ctx.event(
                event,
                tx,
                done.answered.instant,
                [receipt],
                error=error,
                data={"consegna": rcpt},
            ),
        )
        if own:
            effects.append(Settle(tx.identificativo, rcpt, done.answered.instant, event))
    return effects


def store(key: str, p: StorePayload, data: bytes) -> Stage:
    """Stage of a STORE job: a finished message into one existing mailbox, never refused for
    quota (a receipt lost would be the holder's legal proof lost)."""
    mailboxes: Mapping[str, MailboxState | None] = yield LookUpMailboxes((p.mailbox,))
    if mailboxes.get(p.mailbox) is None:
        raise StageError(f"mailbox {p.mailbox} does not exist")
    [outcome] = yield Deliver((Delivery(p.mailbox, key, data, None),))
    if outcome.stored is not Stored.DELIVERED:
        raise StageError(f"storing in {p.mailbox} failed: {outcome.error or outcome.stored}")
    return []
