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
import json
import re
from collections.abc import Generator, Mapping, Sequence
from datetime import datetime
from email.utils import getaddresses
from typing import Any

from pecd.engine.context import Context, ProviderEntry
from pecd.engine.effects import (
    Build,
    Classify,
    Command,
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
from pecd.pec.daticert import Daticert
from pecd.pec.daticert import to_json as daticert_json
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


def _same(outer: str, certified: str) -> bool:
    """Whether the outer text says what is certified. A byte of the outer header that is not
    UTF-8 (raw 8-bit Latin-1, as some providers write) reads as U+FFFD: it stands for any one
    character there, so a genuine envelope is not taken for an altered one."""
    if "\ufffd" not in outer:
        return outer == certified
    pattern = ".".join(re.escape(part) for part in outer.split("\ufffd"))
    return re.fullmatch(pattern, certified, re.DOTALL) is not None


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
    # A field given twice: a reader may see either; neither is certified then.
    wrong = [
        f"{name} x{n}"
        for name in ("Subject", "From", "Reply-To", "Sender")
        if (n := len(get_all(raw, name))) > 1
    ]
    if not _same(_text(get_first(raw, "Subject")), _text(ENVELOPE_SUBJECT + (d.oggetto or ""))):
        wrong.append("Subject")
    shown = getaddresses([get_first(raw, "From") or ""])
    name = _text(shown[0][0]) if shown else ""
    if not name.startswith(ON_BEHALF) or normalize_address(
        name[len(ON_BEHALF) :]
    ) != normalize_address(d.mittente):
        wrong.append("From")
    sender_field = get_first(raw, "Sender")
    if sender_field is not None and _addresses([sender_field]) != _addresses(
        [get_first(raw, "From") or ""]
    ):
        wrong.append("Sender")
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
    signer = ctx.trusted_provider(c.signer_der) if c.signature.valid else None
    d = c.daticert
    # Decisions rest on the verified daticert, never on the unsigned outer headers: classify()
    # reports any disagreement between the two as an error, so is_valid_pec covers both.
    peer = signer if c.is_valid_pec and d is not None else None
    envelope = (
        peer is not None
        and d is not None
        and d.tipo is DaticertTipo.POSTA_CERTIFICATA
        and c.kind is Kind.TRANSPORT_ENVELOPE
    )
    refusal = None  # why a signed envelope is not PEC here after all
    if envelope:
        assert d is not None and peer is not None
        if domain_of(d.mittente) not in peer.domains:
            # A provider signs only for the domains it manages (its managedDomains).
            refusal = NOT_MANAGED
        elif altered := outer_disagreements(raw, c):
            # Valid signature, edited outer headers: what a reader would see is not certified.
            refusal = f"{OUTER_ALTERED}: {', '.join(altered)}"
    # The antivirus, on whatever came in (spec 2.2: "antivirus on the content").
    scanned: Scanned = yield Scan(raw)
    if scanned.infected or scanned.unscannable is not None:
        genuine = peer if envelope and refusal is None else None
        return (yield from infected(ctx, key, p, c, raw, rcpts, now, scanned, genuine))
    if envelope and refusal is not None:
        return (yield from anomaly(ctx, key, p, c, raw, rcpts, now, refusal))
    if envelope:
        assert d is not None and peer is not None
        listed = {normalize_address(x.address) for x in d.destinatari}
        # Only recipients the signed daticert names: an envelope replayed to someone else is
        # not PEC for them.
        ours = [r for r in rcpts if r in listed]
        strangers = [r for r in rcpts if r not in listed]
        if ours:
            # An identificativo already taken in charge or answered here for a recipient is a
            # duplicate (a peer's retry, or a replay after the holder deleted it): delivered,
            # taken in charge and answered once only. The trace log keeps 30 months.
            seen = yield from handled(d.identificativo)
            fresh = [r for r in ours if r not in seen]
            effects = (
                take_in_charge(ctx, key, c, raw, fresh, peer.mail_receipt, now) if fresh else []
            )
            if len(fresh) < len(ours):
                effects.append(duplicate(key, c, [r for r in ours if r in seen], p.peer, now))
            if strangers:
                effects += yield from anomaly(ctx, key, p, c, raw, strangers, now, NOT_IN_DATICERT)
            return effects
    elif peer is not None and c.kind is Kind.RECEIPT and c.ricevuta is not None:
        return (yield from receipt_back(ctx, key, c, raw, rcpts, now, peer))
    return (yield from anomaly(ctx, key, p, c, raw, rcpts, now, anomaly_reason(ctx, c)))


def handled(pec_msgid: str) -> Generator[Command, Any, set[str]]:
    """The recipients of ``pec_msgid`` taken in charge, answered or warned of a virus here
    before (our own envelopes, delivered locally, have no ricezione event but an esito)."""
    earlier: tuple[Logged, ...] = yield History(
        pec_msgid,
        (
            TraceType.RICEZIONE,
            TraceType.AVVENUTA_CONSEGNA,
            TraceType.ERRORE_CONSEGNA,
            TraceType.RILEVAZIONE_VIRUS,
        ),
    )
    seen = {r for e in earlier if e.event == TraceType.RICEZIONE for r in e.recipients}
    seen |= {normalize_address(str(e.data["consegna"])) for e in earlier if e.data.get("consegna")}
    return seen


def infected(
    ctx: Context,
    key: str,
    p: IntakePayload,
    c: Classification,
    raw: bytes,
    rcpts: Sequence[str],
    now: datetime,
    scanned: Scanned,
    peer: ProviderEntry | None,
) -> Stage:
    """An infected message (or one the antivirus could not check whole) is delivered to nobody
    and kept in the virus store (spec 2.3, Virus). When it is a genuine envelope (``peer``: its
    signer, the managedDomains and outer-header checks passed) whose *signed* content carries
    the virus, each affected recipient is warned of once: one rilevazione-virus to the sending
    provider's mailReceipt, whose sender then hears it as a virus errore-consegna. A virus only
    in unsigned bytes (added on the way) warns nobody: the sending provider did not send it.
    Anything else (ordinary mail, a receipt, a message that is not valid PEC) is dropped: the
    rules allow dropping ordinary mail with a virus, and an anomaly envelope would deliver it."""
    d = c.daticert
    found = (
        scanned.signature or "virus"
        if scanned.infected
        else f"non verificabile: {scanned.unscannable}"
    )
    effects: list[Effect] = []
    if peer is not None and scanned.infected and d is not None:
        signed: Scanned = yield Scan(c.postacert or b"")
        if signed.infected:
            listed = {normalize_address(x.address) for x in d.destinatari}
            seen = yield from handled(d.identificativo)
            affected = [r for r in rcpts if r in listed and r not in seen]
            effects += yield from warn(ctx, d, c, affected, peer, now, signed.signature or found)
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


def warn(
    ctx: Context,
    d: Daticert,
    c: Classification,
    affected: Sequence[str],
    peer: ProviderEntry,
    now: datetime,
    found: str,
) -> Stage:
    """One rilevazione-virus per affected recipient, to the sending provider's mailReceipt;
    keyed by transmission and recipient, so never twice."""
    if not affected:
        return []
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
                mail_receipt=peer.mail_receipt,
            )
            for r in affected
        )
    )
    effects: list[Effect] = []
    for r, notice in zip(affected, built, strict=True):
        effects += ctx.emit(
            key=f"rilevazione:{d.identificativo}:{r}",
            mailbox=peer.mail_receipt,
            msg=notice,
            event=ctx.event(
                TraceType.RILEVAZIONE_VIRUS,
                tx,
                now,
                [notice],
                error=f"virus: {found}",
                data={"consegna": r, "virus": found, "to": peer.mail_receipt},
            ),
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
    presa in carico covers every recipient of it (spec 2.3), to the sending provider. The job
    is keyed by transmission and recipients: the same envelope arriving twice at once (two
    connections, a retry during a slow commit) makes one job, and only its maker logs it."""
    assert c.daticert is not None
    # To and Cc (which receipt kind each recipient earns) from the signed original.
    tx = Transmission.from_daticert(c.daticert, envelope=c.postacert or b"")
    who = hashlib.sha256("\n".join(sorted(rcpts)).encode()).hexdigest()[:24]
    return [
        Enqueue(
            JobKind.DELIVERY,
            f"delivery:{tx.identificativo}:{who}",
            DeliveryPayload(tuple(rcpts), tx, now, mail_receipt),
            raw,
            now,
            then=(
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
            ),
        ),
    ]


def receipt_id(c: Classification) -> str:
    """What names a receipt: a digest of its signed daticert (every field, the time included),
    not its unsigned Message-ID, which anyone on the way can change."""
    assert c.daticert is not None and c.ricevuta is not None
    signed = json.dumps([c.ricevuta.value, daticert_json(c.daticert)], sort_keys=True)
    return hashlib.sha256(signed.encode()).hexdigest()


def receipt_back(
    ctx: Context,
    key: str,
    c: Classification,
    raw: bytes,
    rcpts: Sequence[str],
    now: datetime,
    peer: ProviderEntry,
) -> Stage:
    """A valid receipt signed by a provider of the index (``peer``)."""
    d, ricevuta = c.daticert, c.ricevuta
    assert d is not None and ricevuta is not None
    ident = d.identificativo
    earlier: tuple[Logged, ...] = yield History(
        ident, (TraceType.POSTA_CERTIFICATA, TraceType.RICEVUTA_RICEVUTA)
    )
    sent = [e for e in earlier if e.event == TraceType.POSTA_CERTIFICATA]
    sender = sent[0].sender if sent else None
    # The recipients it speaks for must be recipients of our transmission, at a domain of the
    # provider that signed it: no provider settles our timers or tells our sender of a virus
    # for somebody else's recipient.
    concerned = [d.consegna] if d.consegna else list(d.ricezione)
    recipients = {normalize_address(r) for e in sent for r in e.recipients}
    pertinent = bool(concerned) and all(
        normalize_address(r) in recipients and domain_of(r) in peer.domains for r in concerned
    )
    ours = sender is not None and pertinent
    rid = receipt_id(c)
    # A receipt sent to us twice is stored once, even after its holder deleted it: the trace
    # log remembers every receipt by its signed content.
    if any(
        e.event == TraceType.RICEVUTA_RICEVUTA and e.data.get("receipt") == rid for e in earlier
    ):
        return [duplicate(key, c, list(rcpts), None, now, message_id=rid)]
    # Where this receipt may go: the service mailbox for the provider-to-provider receipts, else
    # only the sender of our transmission (never whoever the unsigned RCPT names).
    allowed = ctx.mail_receipt if ricevuta in SERVICE_RECEIPTS else sender
    targets = [r for r in rcpts if r == allowed] if ours else []
    effects: list[Effect] = [StoreLocal(f"ricevuta:{rid}:{r}", r, raw, None, now) for r in targets]
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
            # The recipient's one esito, whichever path it takes.
            key=f"esito:{ident}:{normalize_address(d.consegna)}",
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
    mid = clean_header_text(get_first(raw, "Message-ID") or "")[:300]
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
                    "receipt": rid,
                    "message_id": mid,
                    # A receipt of a transmission this provider never sent (or about somebody
                    # who was not its recipient) is kept only here.
                    "dropped": not ours,
                    "pertinent": pertinent,
                },
            )
        )
    )
    return effects
