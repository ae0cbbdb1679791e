"""The reception point's rules (engine/reception.py): judged by signature and provider index."""

from __future__ import annotations

from typing import Any

import pytest

from pecd.engine.context import Context
from pecd.engine.effects import (
    Build,
    Enqueue,
    History,
    KeepInfected,
    Logged,
    MailboxState,
    Record,
    Scanned,
    Settle,
    StoreLocal,
    TookCharge,
)
from pecd.engine.reception import (
    NOT_IN_DATICERT,
    NOT_MANAGED,
    OUTER_ALTERED,
    outer_disagreements,
    reception,
)
from pecd.engine.vocab import DeliveryPayload, IntakePayload, JobKind, TraceType
from pecd.pec import builders
from pecd.pec.builders import ProviderIdentity, Transmission
from pecd.pec.classify import classify
from pecd.pec.timefmt import pec_time
from pecd.pec.vocab import Errore

BOB, CAROL, DAN = "bob@pec.ours.test", "carol@pec.ours.test", "dan@pec.ours.test"
ZOE = "zoe@pec.theirs.test"
ALICE = "alice@pec.ours.test"
PEER_RECEIPTS = "posta-certificata@pec.theirs.test"
OPEN = MailboxState(False, None)


def tx_from(sender: str, rcpts: list[str], provider: ProviderIdentity, world: Any) -> Transmission:
    original = (
        f"From: {sender}\r\nTo: {', '.join(rcpts)}\r\nSubject: Prova\r\n"
        "Message-ID: <m1@mua.test>\r\n\r\ncorpo\r\n"
    ).encode()
    return Transmission.from_submission(
        original,
        mail_from=sender,
        rcpt_to=rcpts,
        identificativo=provider.new_msgid(pec_time(world.now)),
        is_certified=lambda a: True,
    )


def their_envelope(theirs: ProviderIdentity, world: Any, rcpts: list[str]) -> bytes:
    tx = tx_from(ZOE, rcpts, theirs, world)
    original = b"From: " + ZOE.encode() + b"\r\nSubject: Prova\r\n\r\ncorpo\r\n"
    return builders.transport_envelope(
        original=original, tx=tx, when=pec_time(world.now), provider=theirs
    ).raw


def receive(ctx: Context, world: Any, raw: bytes, rcpts: list[str]) -> list[Any]:
    p = IntakePayload("posta-certificata@pec.theirs.test", tuple(rcpts), peer="192.0.2.7")
    return world.play(reception(ctx, "rx-1", p, raw, world.now))


def test_a_valid_envelope_is_taken_in_charge_for_the_recipients_it_names(
    ctx: Context, world: Any, theirs: ProviderIdentity
) -> None:
    world.mailboxes = {BOB: OPEN, CAROL: OPEN, DAN: OPEN}
    raw = their_envelope(theirs, world, [BOB, CAROL])
    effects = receive(ctx, world, raw, [BOB, CAROL, DAN])
    [job] = world.of(effects, Enqueue)
    # Keyed by transmission and recipients: the same envelope twice at once makes one job.
    assert job.kind is JobKind.DELIVERY and job.key.startswith("delivery:") and job.data == raw
    assert isinstance(job.payload, DeliveryPayload)
    assert job.payload.recipients == (BOB, CAROL)
    # The presa in carico goes to the sending provider's mailReceipt, from the index.
    assert job.payload.mail_receipt == PEER_RECEIPTS
    assert job.payload.tx.mittente == ZOE
    # DAN is not in the signed daticert: for him it is an anomaly.
    [wrapped] = world.of(effects, StoreLocal)
    assert (wrapped.key, wrapped.mailbox) == ("rx-1:anomalia:" + DAN, DAN)
    assert b"X-Trasporto: errore" in wrapped.data
    events = {r.event.event: r.event for r in world.of(effects, Record)}
    assert events[TraceType.RICEZIONE].recipients == [{"address": BOB}, {"address": CAROL}]
    assert events[TraceType.ANOMALIA].error == NOT_IN_DATICERT


def test_plain_mail_is_wrapped_for_the_holders_only(ctx: Context, world: Any) -> None:
    world.mailboxes = {BOB: OPEN, CAROL: MailboxState(True, None)}
    raw = b"From: x@mail.example\r\nSubject: ciao\r\n\r\nciao\r\n"
    effects = receive(ctx, world, raw, [BOB, CAROL, DAN])
    assert [s.mailbox for s in world.of(effects, StoreLocal)] == [BOB]
    [record] = world.of(effects, Record)
    assert record.event.event == TraceType.ANOMALIA
    assert record.event.error == "messaggio privo di firma del gestore (posta ordinaria)"
    assert record.event.data["not_stored"] == [CAROL, DAN]
    assert world.of(effects, Enqueue) == []  # no receipt at all


def test_a_signer_outside_the_index_is_an_anomaly(
    ctx: Context, world: Any, ours: ProviderIdentity, theirs: ProviderIdentity
) -> None:
    world.mailboxes = {BOB: OPEN}
    # Signed by us, as if we were a peer: valid signature, but not a provider of the index.
    raw = their_envelope(ours, world, [BOB])
    effects = receive(ctx, world, raw, [BOB])
    [record] = world.of(effects, Record)
    assert record.event.error == "firma di un soggetto non presente nell'indice dei gestori PEC"
    # A broken signature says so.
    broken = their_envelope(theirs, world, [BOB]).replace(b"corpo", b"CORPO")
    [record] = world.of(receive(ctx, world, broken, [BOB]), Record)
    assert record.event.error.startswith("firma non valida")


def receipt(theirs: ProviderIdentity, world: Any, kind: str) -> tuple[Transmission, bytes]:
    """A receipt from their provider about a transmission of ours (ALICE -> ZOE)."""
    tx = tx_from(ALICE, [ZOE], world.provider, world)
    when = pec_time(world.now)
    if kind == "avvenuta":
        built = builders.avvenuta_consegna(
            tx=tx, when=when, recipient=ZOE, postacert=b"x", provider=theirs
        )
    elif kind == "presa":
        built = builders.presa_in_carico(
            tx=tx, when=when, ricezione=[ZOE], mail_receipt=PEER_RECEIPTS, provider=theirs
        )
    else:
        built = builders.rilevazione_virus(
            tx=tx,
            when=when,
            recipient=ZOE,
            errore_esteso="Eicar-Test-Signature",
            mail_receipt=PEER_RECEIPTS,
            provider=theirs,
        )
    return tx, built.raw


def test_a_receipt_of_ours_goes_to_the_sender_and_settles_the_timer(
    ctx: Context, world: Any, theirs: ProviderIdentity
) -> None:
    tx, raw = receipt(theirs, world, "avvenuta")
    world.sent[tx.identificativo] = ALICE
    world.sent_to[tx.identificativo] = (ZOE,)
    effects = receive(ctx, world, raw, [ALICE, BOB])
    assert isinstance(world.commands[2], History)
    # Only to the sender of the transmission, never to whoever else the RCPT names.
    assert [s.mailbox for s in world.of(effects, StoreLocal)] == [ALICE]
    assert world.of(effects, Settle) == [
        Settle(tx.identificativo, ZOE, world.now, "avvenuta-consegna")
    ]
    [record] = world.of(effects, Record)
    assert record.event.event == TraceType.RICEVUTA_RICEVUTA


def test_a_presa_in_carico_goes_to_the_service_mailbox(
    ctx: Context, world: Any, theirs: ProviderIdentity
) -> None:
    tx, raw = receipt(theirs, world, "presa")
    world.sent[tx.identificativo] = ALICE
    world.sent_to[tx.identificativo] = (ZOE,)
    effects = receive(ctx, world, raw, [ctx.mail_receipt, ALICE])
    assert [s.mailbox for s in world.of(effects, StoreLocal)] == [ctx.mail_receipt]
    assert world.of(effects, TookCharge) == [TookCharge(tx.identificativo, (ZOE,), world.now)]


def test_a_receipt_of_a_transmission_we_never_sent_is_dropped(
    ctx: Context, world: Any, theirs: ProviderIdentity
) -> None:
    _tx, raw = receipt(theirs, world, "avvenuta")
    effects = receive(ctx, world, raw, [ALICE])
    assert world.of(effects, StoreLocal) == [] and world.of(effects, Settle) == []
    [record] = world.of(effects, Record)
    assert record.event.event == TraceType.RICEVUTA_SCONOSCIUTA
    assert record.event.data["dropped"] is True


def test_a_rilevazione_virus_becomes_the_senders_errore_consegna(
    ctx: Context, world: Any, theirs: ProviderIdentity
) -> None:
    tx, raw = receipt(theirs, world, "virus")
    world.sent[tx.identificativo] = ALICE
    world.sent_to[tx.identificativo] = (ZOE,)
    effects = receive(ctx, world, raw, [ctx.mail_receipt])
    [build] = [c for c in world.commands if isinstance(c, Build)]
    assert build.calls[0].keywords["errore"] is Errore.VIRUS
    stored = {s.key: s for s in world.of(effects, StoreLocal)}
    notice = stored[f"esito:{tx.identificativo}:{ZOE}"]
    assert notice.mailbox == ALICE and b"X-Ricevuta: errore-consegna" in notice.data
    assert Settle(tx.identificativo, ZOE, world.now, "virus") in effects


def test_an_infected_envelope_from_a_peer_warns_the_peer(
    ctx: Context, world: Any, theirs: ProviderIdentity
) -> None:
    world.mailboxes = {BOB: OPEN, CAROL: OPEN}
    world.scanned = Scanned(True, "Pecd.Test.Signature")
    raw = their_envelope(theirs, world, [BOB, CAROL])
    effects = receive(ctx, world, raw, [BOB, CAROL])
    # The envelope is stored nowhere and makes no delivery job.
    assert not any(isinstance(e, StoreLocal) for e in effects)
    assert not any(isinstance(e, Enqueue) and e.kind is JobKind.DELIVERY for e in effects)
    # One rilevazione-virus per affected recipient, to the sending provider's mailReceipt.
    warnings = [e for e in effects if isinstance(e, Enqueue) and e.kind is JobKind.RELAY]
    ident = warnings[0].payload.pec_msgid
    assert [w.key for w in warnings] == [
        f"rilevazione:{ident}:{BOB}",
        f"rilevazione:{ident}:{CAROL}",
    ]
    assert all(w.payload.recipients == (PEER_RECEIPTS,) for w in warnings)
    assert all(b"X-Ricevuta: rilevazione-virus" in w.data for w in warnings)
    events = [r.event.event for r in world.of(effects, Record)]
    assert events == [TraceType.RILEVAZIONE_VIRUS, TraceType.RILEVAZIONE_VIRUS, TraceType.VIRUS]
    [kept] = world.of(effects, KeepInfected)
    assert (kept.point, kept.signature, kept.data) == ("reception", "Pecd.Test.Signature", raw)


def test_infected_ordinary_mail_is_dropped_and_kept(ctx: Context, world: Any) -> None:
    world.mailboxes = {BOB: OPEN}
    world.scanned = Scanned(True, "Eicar-Test-Signature")
    raw = b"From: x@mail.example\r\nSubject: ciao\r\n\r\nX5O!P%@AP\r\n"
    effects = receive(ctx, world, raw, [BOB])
    assert not any(isinstance(e, StoreLocal | Enqueue) for e in effects)
    [record] = world.of(effects, Record)
    assert (
        record.event.event == TraceType.VIRUS
        and record.event.error == "virus: Eicar-Test-Signature"
    )
    assert len(world.of(effects, KeepInfected)) == 1


def test_a_sender_outside_the_signers_managed_domains_is_an_anomaly(
    ctx: Context, world: Any, theirs: ProviderIdentity, index: Any
) -> None:
    """The envelope verifies and its signer is in the index, but the sender's domain is not one
    of that provider's managedDomains."""
    world.mailboxes = {BOB: OPEN}
    [entry] = index.signers.values()
    index.signers = {
        der: type(entry)(entry.mail_receipt, ("pec.other.test",)) for der in index.signers
    }
    raw = their_envelope(theirs, world, [BOB])
    effects = receive(ctx, world, raw, [BOB])
    assert not any(isinstance(e, Enqueue) for e in effects)
    [wrapped] = world.of(effects, StoreLocal)
    assert wrapped.mailbox == BOB and b"X-Trasporto: errore" in wrapped.data
    [record] = world.of(effects, Record)
    assert record.event.event == TraceType.ANOMALIA and record.event.error == NOT_MANAGED


def test_an_envelope_received_again_is_a_duplicate(
    ctx: Context, world: Any, theirs: ProviderIdentity
) -> None:
    """A replay (or a peer's retry) of an envelope already taken in charge for a recipient, even
    after the holder deleted it: no delivery, no presa in carico, no receipt; one event."""
    world.mailboxes = {BOB: OPEN, CAROL: OPEN}
    raw = their_envelope(theirs, world, [BOB, CAROL])
    first = receive(ctx, world, raw, [BOB, CAROL])
    [ricezione] = [r.event for r in world.of(first, Record) if r.event.event == TraceType.RICEZIONE]
    ident = ricezione.pec_msgid
    world.log.append((ident, Logged(TraceType.RICEZIONE, ZOE, (BOB,), {})))
    again = receive(ctx, world, raw, [BOB, CAROL])
    # CAROL had not had it: she gets it; BOB's copy is the duplicate.
    [job] = world.of(again, Enqueue)
    assert job.payload.recipients == (CAROL,)
    dup = [r.event for r in world.of(again, Record) if r.event.event == TraceType.DUPLICATE]
    assert [d.recipients for d in dup] == [[{"address": BOB}]]
    world.log.append((ident, Logged(TraceType.RICEZIONE, ZOE, (CAROL,), {})))
    third = receive(ctx, world, raw, [BOB, CAROL])
    assert world.of(third, Enqueue) == [] and world.of(third, StoreLocal) == []
    [record] = world.of(third, Record)
    assert record.event.event == TraceType.DUPLICATE


def test_a_receipt_received_again_is_stored_once(
    ctx: Context, world: Any, theirs: ProviderIdentity
) -> None:
    tx, raw = receipt(theirs, world, "avvenuta")
    world.sent[tx.identificativo] = ALICE
    world.sent_to[tx.identificativo] = (ZOE,)
    first = receive(ctx, world, raw, [ALICE])
    [logged] = [r.event for r in world.of(first, Record)]
    assert logged.event == TraceType.RICEVUTA_RICEVUTA and logged.data["receipt"]
    world.log.append(
        (tx.identificativo, Logged(TraceType.RICEVUTA_RICEVUTA, None, (ALICE,), logged.data))
    )
    again = receive(ctx, world, raw, [ALICE])
    assert world.of(again, StoreLocal) == [] and world.of(again, Settle) == []
    [record] = world.of(again, Record)
    assert record.event.event == TraceType.DUPLICATE


@pytest.mark.parametrize(
    ("header", "edited", "which"),
    [
        (b"Subject: ", b"Subject: POSTA CERTIFICATA: Fattura da pagare subito", "Subject"),
        (
            b"From: ",
            b'From: "Per conto di: boss@pec.theirs.test" <posta-certificata@pec.theirs.test>',
            "From",
        ),
        (b"Reply-To: ", b"Reply-To: attacker@mail.example", "Reply-To"),
    ],
)
def test_edited_outer_headers_of_a_genuine_envelope_make_an_anomaly(
    ctx: Context, world: Any, theirs: ProviderIdentity, header: bytes, edited: bytes, which: str
) -> None:
    """The signature covers the inner parts only: a valid envelope whose outer Subject, From or
    Reply-To says something else than the certified data is not delivered as PEC."""
    world.mailboxes = {BOB: OPEN}
    raw = their_envelope(theirs, world, [BOB])
    start = raw.index(b"\n" + header) + 1
    end = raw.index(b"\r\n", start)
    while raw[end + 2 : end + 3] in (b" ", b"\t"):  # folded continuation lines
        end = raw.index(b"\r\n", end + 2)
    tampered = raw[:start] + edited + raw[end:]
    assert classify(tampered).is_valid_pec  # still a valid signature
    effects = receive(ctx, world, tampered, [BOB])
    assert not any(isinstance(e, Enqueue) for e in effects)
    [record] = world.of(effects, Record)
    assert record.event.event == TraceType.ANOMALIA
    assert record.event.error == f"{OUTER_ALTERED}: {which}"


def test_outer_headers_of_real_envelopes_agree(corpus_dir: Any) -> None:
    """What real providers send passes the comparison (valid envelopes of the corpus)."""
    checked = 0
    for path in sorted(corpus_dir.glob("posta-certificata__*.eml")):
        c = classify(path.read_bytes())
        if c.is_valid_pec and c.daticert is not None:
            assert outer_disagreements(path.read_bytes(), c) == [], path.name
            checked += 1
    assert checked >= 3


def test_a_virus_only_in_unsigned_bytes_warns_nobody(
    ctx: Context, world: Any, theirs: ProviderIdentity
) -> None:
    """A genuine envelope with a virus added on the way (an unsigned header): kept, delivered
    to nobody, and no rilevazione-virus: the sending provider did not send that virus."""
    world.mailboxes = {BOB: OPEN}
    raw = their_envelope(theirs, world, [BOB])
    marker = b"X5O-UNSIGNED-VIRUS"
    tampered = raw.replace(b"\r\nSubject:", b"\r\nX-Junk: " + marker + b"\r\nSubject:", 1)
    world.virus = marker
    effects = receive(ctx, world, tampered, [BOB])
    assert not any(isinstance(e, Enqueue | StoreLocal) for e in effects)
    assert [r.event.event for r in world.of(effects, Record)] == [TraceType.VIRUS]
    assert len(world.of(effects, KeepInfected)) == 1


def test_a_recipient_already_warned_of_is_not_warned_again(
    ctx: Context, world: Any, theirs: ProviderIdentity
) -> None:
    world.mailboxes = {BOB: OPEN}
    world.scanned = Scanned(True, "Pecd.Test.Signature")
    raw = their_envelope(theirs, world, [BOB])
    first = receive(ctx, world, raw, [BOB])
    [warning] = [e for e in first if isinstance(e, Enqueue)]
    ident = warning.payload.pec_msgid
    world.log.append((ident, Logged(TraceType.RILEVAZIONE_VIRUS, None, (), {"consegna": BOB})))
    again = receive(ctx, world, raw, [BOB])
    assert not any(isinstance(e, Enqueue) for e in again)
    assert len(world.of(again, KeepInfected)) == 1  # still kept: it came in


def test_daticert_recipients_match_whatever_their_letter_case(
    ctx: Context, world: Any, theirs: ProviderIdentity
) -> None:
    world.mailboxes = {BOB: OPEN}
    raw = their_envelope(theirs, world, ["Bob@PEC.ours.test"])
    effects = receive(ctx, world, raw, [BOB])
    [job] = world.of(effects, Enqueue)
    assert job.kind is JobKind.DELIVERY and job.payload.recipients == (BOB,)


def test_a_repeated_outer_subject_is_an_anomaly(
    ctx: Context, world: Any, theirs: ProviderIdentity
) -> None:
    world.mailboxes = {BOB: OPEN}
    raw = their_envelope(theirs, world, [BOB])
    tampered = raw.replace(b"\r\nSubject:", b"\r\nSubject: Urgente: paga\r\nSubject:", 1)
    assert classify(tampered).is_valid_pec
    [record] = world.of(receive(ctx, world, tampered, [BOB]), Record)
    assert record.event.error == f"{OUTER_ALTERED}: Subject x2, Subject"


def test_a_receipt_about_somebody_else_settles_nothing(
    ctx: Context, world: Any, theirs: ProviderIdentity
) -> None:
    """A provider of the index signs an avvenuta-consegna for a recipient our transmission
    never had: dropped, no timer settled, nothing stored."""
    tx, raw = receipt(theirs, world, "avvenuta")
    world.sent[tx.identificativo] = ALICE
    world.sent_to[tx.identificativo] = ("someone-else@pec.theirs.test",)
    effects = receive(ctx, world, raw, [ALICE])
    assert world.of(effects, StoreLocal) == [] and world.of(effects, Settle) == []
    [record] = world.of(effects, Record)
    assert record.event.data["dropped"] is True and record.event.data["pertinent"] is False


def test_a_receipt_is_a_duplicate_by_its_signed_content_not_its_message_id(
    ctx: Context, world: Any, theirs: ProviderIdentity
) -> None:
    tx, raw = receipt(theirs, world, "avvenuta")
    world.sent[tx.identificativo] = ALICE
    world.sent_to[tx.identificativo] = (ZOE,)
    [logged] = [r.event for r in world.of(receive(ctx, world, raw, [ALICE]), Record)]
    world.log.append(
        (tx.identificativo, Logged(TraceType.RICEVUTA_RICEVUTA, None, (ALICE,), logged.data))
    )
    renamed = raw.replace(b"\r\nMessage-ID: <", b"\r\nMessage-ID: <other-", 1)
    assert renamed != raw and classify(renamed).is_valid_pec
    again = receive(ctx, world, renamed, [ALICE])
    assert world.of(again, StoreLocal) == []
    [record] = world.of(again, Record)
    assert record.event.event == TraceType.DUPLICATE


def test_a_raw_8bit_outer_subject_still_agrees(
    ctx: Context, world: Any, theirs: ProviderIdentity
) -> None:
    """Some providers write the outer Subject as raw Latin-1: its undecodable bytes stand for
    any character, so the genuine envelope is not taken for an altered one."""
    world.mailboxes = {BOB: OPEN}
    tx = tx_from(ZOE, [BOB], theirs, world)
    tx = type(tx)(**{**tx.__dict__, "oggetto": "Caffè pagato"})
    original = b"From: " + ZOE.encode() + b"\r\nSubject: x\r\n\r\ncorpo\r\n"
    raw = builders.transport_envelope(
        original=original, tx=tx, when=pec_time(world.now), provider=theirs
    ).raw
    start = raw.index(b"\r\nSubject: ") + 2
    end = raw.index(b"\r\n", start)
    while raw[end + 2 : end + 3] in (b" ", b"\t"):
        end = raw.index(b"\r\n", end + 2)
    latin = raw[:start] + "Subject: POSTA CERTIFICATA: Caffè pagato".encode("latin-1") + raw[end:]
    c = classify(latin)
    assert c.is_valid_pec
    assert outer_disagreements(latin, c) == []
    other = latin.replace(b"pagato", b"dovuto")
    assert outer_disagreements(other, classify(other)) == ["Subject"]
