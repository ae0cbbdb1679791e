"""The reception point's rules (spec 2.2, 2.3): what came in over SMTP is scanned for viruses and
judged by its signature and the provider index, never by its unsigned headers.

- anything infected: delivered to nobody and kept in the virus store; for a valid transport
  envelope, one rilevazione-virus per affected recipient to the sending provider's mailReceipt;

- a valid transport envelope from a provider in the index: a delivery job for the recipients its
  signed daticert names (one presa in carico for the transaction, to that provider's
  ``mailReceipt``); recipients it does not name get it in an anomaly envelope;
- a valid receipt of a transmission this provider sent: into the sender's mailbox, or for
  presa-in-carico and rilevazione-virus into the service mailbox, and the timers learn of it; a
  rilevazione-virus also becomes the sender's errore-consegna (virus); a receipt of a transmission
  this provider never sent is recorded and dropped;
- anything else (no signature, a signer not in the index, a broken signature, malformed PEC): an
  anomaly envelope to the recipients that hold a mailbox here, and no receipt at all.
"""

from __future__ import annotations

import functools
import hashlib
from collections.abc import Mapping, Sequence
from datetime import datetime
from email.utils import getaddresses

from pecd.engine.context import Context, ProviderEntry
from pecd.engine.effects import (
    Build,
    Classify,
    Effect,
    Enqueue,
    History,
    KeepInfected,
    Logged,
    LookUpMailboxes,
    MailboxState,
    Record,
    Scan,
    Scanned,
    Settle,
    Stage,
    StoreLocal,
    TookCharge,
)
from pecd.engine.vocab import DeliveryPayload, IntakePayload, JobKind, TraceEventData, TraceType
from pecd.pec import builders
from pecd.pec.address import domain_of, normalize_address
from pecd.pec.builders import Transmission
from pecd.pec.classify import Classification
from pecd.pec.mime import clean_header_text, decode_words, get_all, get_first
from pecd.pec.texts import errore_esteso
from pecd.pec.timefmt import pec_time
from pecd.pec.vocab import DaticertTipo, Errore, Kind, Ricevuta

# Receipts that go to the service mailbox rather than to a holder (spec section 1).
SERVICE_RECEIPTS = (Ricevuta.PRESA_IN_CARICO, Ricevuta.RILEVAZIONE_VIRUS)
NOT_IN_DATICERT = "destinatario non presente nei dati di certificazione"
NOT_MANAGED = "il dominio del mittente non è tra i domini gestiti dal gestore firmatario"
OUTER_ALTERED = "intestazioni esterne non conformi ai dati di certificazione"
ENVELOPE_SUBJECT = "POSTA CERTIFICATA: "
ON_BEHALF = "Per conto di:"


def _text(value: str | None) -> str:
    """A header's text as a person reads it: words decoded, controls gone, spaces collapsed."""
    return " ".join(clean_header_text(decode_words(value or "")).split())


def _addresses(values: Sequence[str]) -> set[str]:
    return {normalize_address(a) for _, a in getaddresses(list(values)) if a}


def outer_disagreements(raw: bytes, c: Classification) -> list[str]:
    """Where the unsigned outer headers of a transport envelope say something else than what is
    signed (the daticert and the wrapped original). Compared as a reader sees them (encoded
    words decoded, white space collapsed, addresses case-insensitively): the Subject must be
    "POSTA CERTIFICATA: " and the certified subject; the From display name "Per conto di: " and
    the certified sender; a Reply-To the addresses of the original's Reply-To (the sender when
    it had none). An outer Reply-To may be absent: replies then go to the provider's address."""
    d = c.daticert
    assert d is not None
    wrong = []
    if _text(get_first(raw, "Subject")) != _text(ENVELOPE_SUBJECT + (d.oggetto or "")):
        wrong.append("Subject")
    shown = getaddresses([get_first(raw, "From") or ""])
    name = _text(shown[0][0]) if shown else ""
    if not name.startswith(ON_BEHALF) or normalize_address(
        name[len(ON_BEHALF) :]
    ) != normalize_address(d.mittente):
        wrong.append("From")
    outer_reply = get_all(raw, "Reply-To")
    if outer_reply:
        inner_reply = get_all(c.postacert or b"", "Reply-To")
        expected = _addresses(inner_reply) if inner_reply else {normalize_address(d.risposte)}
        if _addresses(outer_reply) != expected:
            wrong.append("Reply-To")
    return wrong


def reception(ctx: Context, key: str, p: IntakePayload, raw: bytes, now: datetime) -> Stage:
    """Stage of a RECEPTION job ``key``: what came in at ``now``."""
    rcpts = list(p.rcpt_to)
    c: Classification = yield Classify(raw)
    sender = ctx.trusted_provider(c.signer_der) if c.signature.valid else None
    # The antivirus, on whatever came in (spec 2.2: "antivirus on the content").
    scanned: Scanned = yield Scan(raw)
    if scanned.infected:
        return (yield from infected(ctx, key, p, c, raw, rcpts, now, scanned, sender))
    # Decisions rest on the verified daticert, never on the unsigned outer headers: classify()
    # reports any disagreement between the two as an error, so is_valid_pec covers both.
    if sender is not None and c.is_valid_pec and c.daticert is not None:
        tipo = c.daticert.tipo
        if (
            tipo is DaticertTipo.POSTA_CERTIFICATA
            and c.kind is Kind.TRANSPORT_ENVELOPE
            and domain_of(c.daticert.mittente) not in sender.domains
        ):
            # A provider signs only for the domains it manages (its managedDomains).
            return (yield from anomaly(ctx, key, p, c, raw, rcpts, now, NOT_MANAGED))
        if (
            tipo is DaticertTipo.POSTA_CERTIFICATA
            and c.kind is Kind.TRANSPORT_ENVELOPE
            and (altered := outer_disagreements(raw, c))
        ):
            # Valid signature, edited outer headers: what a reader would see is not certified.
            reason = f"{OUTER_ALTERED}: {', '.join(altered)}"
            return (yield from anomaly(ctx, key, p, c, raw, rcpts, now, reason))
        if tipo is DaticertTipo.POSTA_CERTIFICATA and c.kind is Kind.TRANSPORT_ENVELOPE:
            listed = {d.address for d in c.daticert.destinatari}
            # Only recipients the signed daticert names: an envelope replayed to someone else is
            # not PEC for them.
            ours = [r for r in rcpts if r in listed]
            strangers = [r for r in rcpts if r not in listed]
            if ours:
                # An identificativo already taken in charge for a recipient is a duplicate (a
                # peer's retry, or a replay after the holder deleted it): delivered, taken in
                # charge and answered once only. The trace log keeps ricezione for 30 months.
                earlier: tuple[Logged, ...] = yield History(
                    c.daticert.identificativo,
                    (TraceType.RICEZIONE, TraceType.AVVENUTA_CONSEGNA, TraceType.ERRORE_CONSEGNA),
                )
                # Taken in charge here before, or answered here before (our own envelopes,
                # delivered locally, have no ricezione event but an esito per recipient).
                seen = {r for e in earlier if e.event == TraceType.RICEZIONE for r in e.recipients}
                seen |= {str(e.data["consegna"]) for e in earlier if e.data.get("consegna")}
                fresh = [r for r in ours if r not in seen]
                effects = (
                    take_in_charge(ctx, key, c, raw, fresh, sender.mail_receipt, now)
                    if fresh
                    else []
                )
                if len(fresh) < len(ours):
                    effects.append(duplicate(key, c, [r for r in ours if r in seen], p.peer, now))
                if strangers:
                    effects += yield from anomaly(
                        ctx, key, p, c, raw, strangers, now, NOT_IN_DATICERT
                    )
                return effects
        elif c.kind is Kind.RECEIPT and c.ricevuta is not None:
            return (yield from receipt_back(ctx, key, c, raw, rcpts, now))
    return (yield from anomaly(ctx, key, p, c, raw, rcpts, now, anomaly_reason(ctx, c)))


def infected(
    ctx: Context,
    key: str,
    p: IntakePayload,
    c: Classification,
    raw: bytes,
    rcpts: Sequence[str],
    now: datetime,
    scanned: Scanned,
    sender: ProviderEntry | None,
) -> Stage:
    """An infected message is delivered to nobody and kept in the virus store (spec 2.3, Virus).
    A valid transport envelope from a provider of the index: one rilevazione-virus per affected
    recipient (those its signed daticert names) to that provider's mailReceipt, whose sender
    then hears it as a virus errore-consegna. Anything else (ordinary mail, a receipt, an
    envelope that is not valid PEC) is dropped: the rules allow dropping ordinary mail with a
    virus, and wrapping it in an anomaly envelope would deliver the virus."""
    found = scanned.signature or "virus"
    d = c.daticert
    effects: list[Effect] = []
    envelope = (
        sender is not None
        and c.is_valid_pec
        and d is not None
        and d.tipo is DaticertTipo.POSTA_CERTIFICATA
        and c.kind is Kind.TRANSPORT_ENVELOPE
    )
    if envelope:
        assert d is not None and sender is not None
        listed = {x.address for x in d.destinatari}
        affected = [r for r in rcpts if r in listed]
        tx = Transmission.from_daticert(d, envelope=c.postacert or b"")
        when = pec_time(now)
        esteso = errore_esteso("5.7.1", ctx.provider.name, f"virus rilevato: {found}")
        built = yield Build(
            tuple(
                functools.partial(
                    builders.rilevazione_virus,
                    tx=tx,
                    when=when,
                    recipient=r,
                    errore_esteso=esteso,
                    mail_receipt=sender.mail_receipt,
                )
                for r in affected
            )
        )
        for r, notice in zip(affected, built, strict=True):
            effects += ctx.emit(
                key=f"{key}:rilevazione-virus:{r}",
                unique=True,  # from this transaction's own intake key
                mailbox=sender.mail_receipt,
                msg=notice,
                event=ctx.event(
                    TraceType.RILEVAZIONE_VIRUS,
                    tx,
                    now,
                    [notice],
                    error=f"virus: {found}",
                    data={"consegna": r, "virus": found, "to": sender.mail_receipt},
                ),
            )
    effects.append(
        Record(
            TraceEventData(
                at=now,
                event=TraceType.VIRUS,
                pec_msgid=d.identificativo if d else None,
                client_msgid=d.msgid if d else None,
                sender=d.mittente if d else p.mail_from,
                recipients=[{"address": r} for r in rcpts],
                subject=d.oggetto if d else None,
                provider=d.gestore_emittente if d else None,
                error=f"virus: {found}",
                data={"job": key, "peer": p.peer, "kind": c.kind.value, "virus": found},
            )
        )
    )
    effects.append(
        KeepInfected(
            key,
            now,
            "reception",
            found,
            d.identificativo if d else None,
            d.mittente if d else p.mail_from,
            tuple(rcpts),
            raw,
        )
    )
    return effects


def duplicate(
    key: str,
    c: Classification,
    rcpts: Sequence[str],
    peer: str | None,
    now: datetime,
    *,
    message_id: str | None = None,
) -> Effect:
    """The one trace event of something received again."""
    d = c.daticert
    return Record(
        TraceEventData(
            at=now,
            event=TraceType.DUPLICATE,
            pec_msgid=d.identificativo if d else None,
            client_msgid=d.msgid if d else None,
            sender=d.mittente if d else None,
            recipients=[{"address": r} for r in rcpts],
            provider=d.gestore_emittente if d else None,
            data={
                "job": key,
                "peer": peer,
                "kind": c.kind.value,
                "ricevuta": c.ricevuta.value if c.ricevuta else None,
                "message_id": message_id,
            },
        )
    )


def anomaly_reason(ctx: Context, c: Classification) -> str:
    """Why a message is not valid PEC here, in the words the anomaly envelope carries."""
    if not c.signature.present:
        return "messaggio privo di firma del gestore (posta ordinaria)"
    if not c.signature.valid:
        return f"firma non valida: {c.signature.error or 'verifica fallita'}"
    if ctx.trusted_provider(c.signer_der) is None:
        return "firma di un soggetto non presente nell'indice dei gestori PEC"
    if c.errors:
        return "messaggio PEC non conforme: " + "; ".join(c.errors)
    return "messaggio PEC non conforme"


def anomaly(
    ctx: Context,
    key: str,
    p: IntakePayload,
    c: Classification,
    raw: bytes,
    rcpts: Sequence[str],
    now: datetime,
    reason: str,
) -> Stage:
    """An anomaly envelope for those of ``rcpts`` that are open mailboxes here: mail for anyone
    else is not stored (and no directory is made for an address nobody holds)."""
    mailboxes: Mapping[str, MailboxState | None] = yield LookUpMailboxes(tuple(rcpts))
    holders = [r for r in rcpts if (mb := mailboxes.get(r)) is not None and not mb.disabled]
    [wrapped] = yield Build(
        (
            functools.partial(
                builders.anomaly_envelope,
                received=raw,
                when=pec_time(now),
                rcpt_to=holders or ["-"],
                error=reason,
            ),
        )
    )
    effects: list[Effect] = [
        StoreLocal(f"{key}:anomalia:{r}", r, wrapped.raw, wrapped.message_id, now) for r in holders
    ]
    effects.append(
        Record(
            TraceEventData(
                at=now,
                event=TraceType.ANOMALIA,
                pec_msgid=c.daticert.identificativo if c.daticert else None,
                sender=p.mail_from,
                recipients=[{"address": r} for r in holders],
                generated_ids=[wrapped.message_id],
                error=reason,
                data={
                    "job": key,
                    "peer": p.peer,
                    "kind": c.kind.value,
                    "not_stored": [r for r in rcpts if r not in holders],
                },
            )
        )
    )
    return effects


def take_in_charge(
    ctx: Context,
    key: str,
    c: Classification,
    raw: bytes,
    rcpts: Sequence[str],
    mail_receipt: str,
    now: datetime,
) -> list[Effect]:
    """A valid envelope for ``rcpts``: one delivery job for the whole SMTP transaction, so one
    presa in carico covers every recipient of it (spec 2.3), to the sending provider."""
    assert c.daticert is not None
    # To and Cc (which receipt kind each recipient earns) from the signed original.
    tx = Transmission.from_daticert(c.daticert, envelope=c.postacert or b"")
    return [
        Enqueue(
            JobKind.DELIVERY,
            f"{key}:delivery",
            DeliveryPayload(tuple(rcpts), tx, now, mail_receipt),
            raw,
            now,
        ),
        Record(
            TraceEventData(
                at=now,
                event=TraceType.RICEZIONE,
                pec_msgid=tx.identificativo,
                client_msgid=tx.msgid,
                sender=tx.mittente,
                recipients=[{"address": r} for r in rcpts],
                subject=tx.oggetto,
                provider=c.daticert.gestore_emittente,
                data={"job": key, "mail_receipt": mail_receipt},
            )
        ),
    ]


def receipt_back(
    ctx: Context, key: str, c: Classification, raw: bytes, rcpts: Sequence[str], now: datetime
) -> Stage:
    """A valid receipt signed by a provider of the index."""
    d, ricevuta = c.daticert, c.ricevuta
    assert d is not None and ricevuta is not None
    ident = d.identificativo
    earlier: tuple[Logged, ...] = yield History(
        ident, (TraceType.POSTA_CERTIFICATA, TraceType.RICEVUTA_RICEVUTA)
    )
    sent = [e for e in earlier if e.event == TraceType.POSTA_CERTIFICATA]
    sender = sent[0].sender if sent else None
    ours = sender is not None
    # A receipt sent to us twice is stored once, even after its holder deleted it: its
    # Message-ID names it, and the trace log remembers it.
    mid = (get_first(raw, "Message-ID") or "").strip() or hashlib.sha256(raw).hexdigest()
    if any(
        e.event == TraceType.RICEVUTA_RICEVUTA and e.data.get("message_id") == mid for e in earlier
    ):
        return [duplicate(key, c, list(rcpts), None, now, message_id=mid)]
    # Where this receipt may go: the service mailbox for the provider-to-provider receipts, else
    # only the sender of our transmission (never whoever the unsigned RCPT names).
    allowed = ctx.mail_receipt if ricevuta in SERVICE_RECEIPTS else sender
    targets = [r for r in rcpts if r == allowed] if ours else []
    effects: list[Effect] = [StoreLocal(f"ricevuta:{mid}:{r}", r, raw, None, now) for r in targets]
    if ours:
        # What the receipt settles for the timers.
        if ricevuta is Ricevuta.PRESA_IN_CARICO:
            effects.append(TookCharge(ident, tuple(d.ricezione), now))
        elif ricevuta in (Ricevuta.AVVENUTA_CONSEGNA, Ricevuta.ERRORE_CONSEGNA) and d.consegna:
            effects.append(Settle(ident, d.consegna, now, ricevuta.value))
    if ours and sender and ricevuta is Ricevuta.RILEVAZIONE_VIRUS and d.consegna:
        # The recipient's provider found a virus: the sender hears it from us, as an
        # errore-consegna of the virus kind built from the rilevazione (spec 2.3, Virus).
        tx = Transmission.from_daticert(d)
        [notice] = yield Build(
            (
                functools.partial(
                    builders.errore_consegna,
                    tx=tx,
                    when=pec_time(now),
                    recipient=d.consegna,
                    errore=Errore.VIRUS,
                    errore_esteso=d.errore_esteso
                    or errore_esteso(
                        "5.7.1", ctx.provider.name, "virus rilevato dal gestore del destinatario"
                    ),
                ),
            )
        )
        effects.append(Settle(ident, d.consegna, now, "virus"))
        effects += ctx.emit(
            key=f"virus:{ident}:{d.consegna}",
            mailbox=sender,
            msg=notice,
            event=ctx.event(
                TraceType.ERRORE_CONSEGNA,
                tx,
                now,
                [notice],
                error="virus",
                data={"consegna": d.consegna, "rilevazione": key},
            ),
        )
    effects.append(
        Record(
            TraceEventData(
                at=now,
                event=TraceType.RICEVUTA_RICEVUTA if ours else TraceType.RICEVUTA_SCONOSCIUTA,
                pec_msgid=ident,
                client_msgid=d.msgid,
                sender=d.mittente,
                recipients=[{"address": r} for r in rcpts],
                provider=d.gestore_emittente,
                daticert=None,
                data={
                    "job": key,
                    "ricevuta": ricevuta.value,
                    "consegna": d.consegna,
                    "ricezione": list(d.ricezione),
                    "message_id": mid,
                    # A receipt of a transmission this provider never sent is kept only here.
                    "dropped": not ours,
                },
            )
        )
    )
    return effects
