"""The access point's rules (engine/submission.py): formal checks, then non-accettazione, or
accettazione + transport envelope routed to local delivery, the relay and the timers."""

from __future__ import annotations

from typing import Any

from pecd.engine.context import Context
from pecd.engine.effects import (
    Build,
    Enqueue,
    Expect,
    KeepInfected,
    Record,
    Scan,
    Scanned,
    StoreLocal,
)
from pecd.engine.submission import submission
from pecd.engine.vocab import DeliveryPayload, IntakePayload, JobKind, RelayKind, TraceType
from pecd.pec.builders import BuiltMessage
from pecd.pec.classify import classify
from pecd.pec.vocab import DestinatarioTipo, Errore, Ricevuta


def original(sender: str, to: list[str], cc: list[str] | None = None) -> bytes:
    lines = [
        f"From: {sender}",
        f"To: {', '.join(to)}",
        *([f"Cc: {', '.join(cc)}"] if cc else []),
        "Subject: Prova",
        "Message-ID: <client-1@mua.test>",
        "Date: Mon, 16 Feb 2026 10:00:00 +0100",
        "",
        "corpo",
        "",
    ]
    return "\r\n".join(lines).encode()


def test_accepted_goes_to_every_kind_of_recipient(ctx: Context, world: Any) -> None:
    alice, bob = "alice@pec.ours.test", "bob@pec.ours.test"
    carol, dan = "carol@pec.theirs.test", "dan@pec.theirs.test"
    ext = "ext@mail.example"
    raw = original(alice, [bob, carol], [dan, ext])
    p = IntakePayload(alice, (bob, carol, dan, ext), user=alice)
    effects = world.play(submission(ctx, "in-1", p, raw, world.now))

    # Scanned, then one round trip builds both the accettazione and the envelope.
    scan, build = world.commands
    assert isinstance(scan, Scan) and scan.data == raw
    assert isinstance(build, Build) and len(build.calls) == 2

    [acc] = world.of(effects, StoreLocal)
    assert (acc.key, acc.mailbox, acc.unique) == ("in-1:accettazione", alice, True)
    assert b"X-Ricevuta: accettazione" in acc.data
    events = [r.event.event for r in world.of(effects, Record)]
    assert events == [TraceType.ACCETTAZIONE, TraceType.POSTA_CERTIFICATA]
    assert all(r.event.at == world.now for r in world.of(effects, Record))

    delivery, relay_ext, relay_theirs = world.of(effects, Enqueue)
    assert delivery.kind is JobKind.DELIVERY and delivery.key == "in-1:delivery"
    assert isinstance(delivery.payload, DeliveryPayload)
    assert delivery.payload.recipients == (bob,) and delivery.payload.mail_receipt is None
    assert b"X-Trasporto: posta-certificata" in delivery.data
    # One relay job per destination domain, from the sender's reverse path (spec 2.3).
    assert (relay_ext.key, relay_ext.payload.recipients) == ("in-1:relay:mail.example", (ext,))
    assert (relay_theirs.key, relay_theirs.payload.recipients) == (
        "in-1:relay:pec.theirs.test",
        (carol, dan),
    )
    assert relay_theirs.payload.mail_from == alice
    assert relay_theirs.payload.kind is RelayKind.ENVELOPE
    assert relay_theirs.data == delivery.data
    # The timers watch every PEC recipient, ours included, in one effect; not ordinary mail.
    [expect] = world.of(effects, Expect)
    assert expect.recipients == (bob, carol, dan) and expect.sender == alice
    assert (expect.pec_msgid, expect.sent_at) == (delivery.payload.tx.identificativo, world.now)
    tipi = {d.address: d.tipo for d in expect.tx.destinatari}
    assert tipi[ext] is DestinatarioTipo.ESTERNO and tipi[carol] is DestinatarioTipo.CERTIFICATO


def test_only_local_recipients_need_no_relay_but_get_the_timers(ctx: Context, world: Any) -> None:
    """Same-provider mail gets the full processing (RFC 6109 3.4), the 12 h / 24 h timers too."""
    alice, bob = "alice@pec.ours.test", "bob@pec.ours.test"
    effects = world.play(
        submission(
            ctx, "in-2", IntakePayload(alice, (bob,), user=alice), original(alice, [bob]), world.now
        )
    )
    assert [r.event.event for r in world.of(effects, Record)] == [
        TraceType.ACCETTAZIONE,
        TraceType.POSTA_CERTIFICATA,
    ], effects
    assert [e.kind for e in world.of(effects, Enqueue)] == [JobKind.DELIVERY]
    [expect] = world.of(effects, Expect)
    assert (expect.recipients, expect.sender, expect.sent_at) == ((bob,), alice, world.now)


def test_formal_errors_get_a_non_accettazione_and_nothing_else(ctx: Context, world: Any) -> None:
    alice, bob = "alice@pec.ours.test", "bob@pec.ours.test"
    # The envelope sender is not the From: of the message (spec 2.1, formal checks).
    raw = original("mallory@pec.ours.test", [bob])
    effects = world.play(
        submission(ctx, "in-3", IntakePayload(alice, (bob,), user=alice), raw, world.now)
    )
    [notice] = world.of(effects, StoreLocal)
    assert notice.key == "in-3:non-accettazione" and notice.mailbox == alice and notice.unique
    assert f"X-Ricevuta: {Ricevuta.NON_ACCETTAZIONE}".encode() in notice.data
    [record] = world.of(effects, Record)
    assert record.event.event == TraceType.NON_ACCETTAZIONE and record.event.error
    assert record.event.data is not None and record.event.data["violations"]
    assert world.of(effects, Enqueue) == [] and world.of(effects, Expect) == []


def test_a_message_for_another_provider_is_relayed_from_our_service_address(
    ctx: Context, world: Any
) -> None:
    msg = BuiltMessage(b"raw", "id-1@pec.ours.test", None, ())
    relayed = ctx.send(key="k", mailbox="zoe@pec.theirs.test", msg=msg, at=world.now)
    assert isinstance(relayed, Enqueue) and relayed.kind is JobKind.RELAY
    assert relayed.payload.kind is RelayKind.RECEIPT and relayed.payload.recipients == (
        "zoe@pec.theirs.test",
    )
    assert relayed.payload.mail_from == ctx.provider.service_address
    local = ctx.send(key="k", mailbox="bob@pec.ours.test", msg=msg, at=world.now)
    assert isinstance(local, StoreLocal) and local.mailbox == "bob@pec.ours.test"


def test_an_infected_submission_gets_the_virus_non_accettazione_and_goes_nowhere(
    ctx: Context, world: Any
) -> None:
    alice, bob, carol = "alice@pec.ours.test", "bob@pec.ours.test", "carol@pec.theirs.test"
    raw = original(alice, [bob, carol])
    world.scanned = Scanned(True, "Eicar-Test-Signature")
    p = IntakePayload(alice, (bob, carol), user=alice)
    effects = world.play(submission(ctx, "in-5", p, raw, world.now))
    [notice] = world.of(effects, StoreLocal)
    assert (notice.key, notice.mailbox) == ("in-5:non-accettazione", alice)
    assert b"X-VerificaSicurezza: errore" in notice.data
    c = classify(notice.data)
    assert c.is_valid_pec and c.daticert is not None and c.daticert.errore is Errore.VIRUS
    [record] = world.of(effects, Record)
    assert record.event.event == TraceType.NON_ACCETTAZIONE
    assert record.event.error == "virus: Eicar-Test-Signature"
    # Neither delivered nor relayed nor watched by the timers; kept byte-exact.
    assert world.of(effects, Enqueue) == [] and world.of(effects, Expect) == []
    [kept] = world.of(effects, KeepInfected)
    assert (kept.point, kept.signature, kept.data) == ("access", "Eicar-Test-Signature", raw)
    assert kept.recipients == (bob, carol)


def test_formal_errors_come_before_the_antivirus(ctx: Context, world: Any) -> None:
    bob = "bob@pec.ours.test"
    world.scanned = Scanned(True, "Eicar-Test-Signature")
    raw = original("mallory@pec.ours.test", [bob])
    p = IntakePayload("alice@pec.ours.test", (bob,), user="alice@pec.ours.test")
    effects = world.play(submission(ctx, "in-6", p, raw, world.now))
    assert not any(isinstance(c, Scan) for c in world.commands)
    assert world.of(effects, KeepInfected) == []


def test_a_submission_the_antivirus_cannot_check_whole_is_not_accepted(
    ctx: Context, world: Any
) -> None:
    alice, bob = "alice@pec.ours.test", "bob@pec.ours.test"
    world.scanned = Scanned(False, "Heuristics.Limits.Exceeded.MaxRecursion", "too deep")
    p = IntakePayload(alice, (bob,), user=alice)
    effects = world.play(submission(ctx, "in-7", p, original(alice, [bob]), world.now))
    [notice] = world.of(effects, StoreLocal)
    assert notice.key == "in-7:non-accettazione"
    [record] = world.of(effects, Record)
    assert record.event.error == "unscannable"
    assert world.of(effects, Enqueue) == [] and world.of(effects, KeepInfected) == []
