"""The delivery point's rules (engine/delivery.py): one presa in carico per transaction, and per
recipient exactly one avvenuta-consegna or errore-consegna; and the store stage."""

from __future__ import annotations

import functools
from typing import Any

import pytest

from pecd.engine.context import Context
from pecd.engine.delivery import delivery, store
from pecd.engine.effects import (
    Deliver,
    Enqueue,
    LookUpMailboxes,
    MailboxState,
    Record,
    Settle,
    StageError,
    StoreLocal,
    TakeInCharge,
    TookCharge,
)
from pecd.engine.vocab import DeliveryPayload, JobKind, Outcome, Stored, StorePayload, TraceType
from pecd.pec import builders
from pecd.pec.builders import Transmission
from pecd.pec.timefmt import pec_time

ALICE, BOB, CAROL = "alice@pec.ours.test", "bob@pec.ours.test", "carol@pec.ours.test"
OPEN = MailboxState(disabled=False, quota_bytes=1 << 20)

ORIGINAL = (
    f"From: {ALICE}\r\nTo: {BOB}, {CAROL}\r\nSubject: Prova\r\nMessage-ID: <m1@mua.test>\r\n"
    "\r\ncorpo\r\n"
).encode()


def envelope(world: Any, ctx: Context, sender: str = ALICE) -> tuple[Transmission, bytes]:
    when = pec_time(world.now)
    tx = Transmission.from_submission(
        ORIGINAL.replace(ALICE.encode(), sender.encode()),
        mail_from=sender,
        rcpt_to=[BOB, CAROL],
        identificativo=ctx.provider.new_msgid(when),
        is_certified=ctx.is_certified,
    )
    env = builders.transport_envelope(original=ORIGINAL, tx=tx, when=when, provider=world.provider)
    return tx, env.raw


def run(
    ctx: Context,
    world: Any,
    *,
    attempts: int = 1,
    mail_receipt: str | None = None,
    sender: str = ALICE,
) -> tuple[Transmission, list[Any]]:
    tx, env = envelope(world, ctx, sender)
    p = DeliveryPayload((BOB, CAROL), tx, world.now, mail_receipt)
    return tx, world.play(delivery(ctx, "in-1:delivery", p, env, attempts=attempts, now=world.now))


def esiti(effects: list[Any]) -> dict[str, tuple[str, str | None]]:
    """recipient -> (ricevuta, errore-esteso), from the trace events of the receipts."""
    return {
        r.event.data["consegna"]: (r.event.event, r.event.error)
        for r in effects
        if isinstance(r, Record) and r.event.data and "consegna" in r.event.data
    }


def test_every_recipient_delivered_gets_one_avvenuta_consegna(ctx: Context, world: Any) -> None:
    world.mailboxes = {BOB: OPEN, CAROL: OPEN}
    tx, effects = run(ctx, world)
    # One lookup of every recipient, then one round trip: verify, deliver, presa, receipts.
    lookup, take = world.commands
    assert isinstance(lookup, LookUpMailboxes) and lookup.addresses == (BOB, CAROL)
    assert isinstance(take, TakeInCharge)
    assert [(d.mailbox, d.key, d.quota_bytes) for d in take.deliveries] == [
        (BOB, f"{tx.identificativo}:{BOB}", 1 << 20),
        (CAROL, f"{tx.identificativo}:{CAROL}", 1 << 20),
    ]
    stored = {e.key: e for e in world.of(effects, StoreLocal)}
    presa = stored["in-1:delivery:presa-in-carico"]
    assert presa.mailbox == ctx.mail_receipt and presa.unique  # same provider: our service box
    for rcpt in (BOB, CAROL):
        receipt = stored[f"esito:{tx.identificativo}:{rcpt}"]
        assert receipt.mailbox == ALICE and not receipt.unique
        assert b"X-Ricevuta: avvenuta-consegna" in receipt.data
    assert esiti(effects) == {
        BOB: (TraceType.AVVENUTA_CONSEGNA, None),
        CAROL: (TraceType.AVVENUTA_CONSEGNA, None),
    }
    # The receipts carry the time after the deliveries; the presa the time the job began.
    times = {r.event.event: r.event.at for r in world.of(effects, Record)}
    assert times[TraceType.PRESA_IN_CARICO] == world.now
    assert times[TraceType.AVVENUTA_CONSEGNA] == world.receipts_at
    # Our own transmission: its presa in carico and each esito settle the timers (one
    # TookCharge for the transaction, one Settle per recipient, at the receipts' times).
    assert world.of(effects, TookCharge) == [TookCharge(tx.identificativo, (BOB, CAROL), world.now)]
    assert world.of(effects, Settle) == [
        Settle(tx.identificativo, rcpt, world.receipts_at, TraceType.AVVENUTA_CONSEGNA)
        for rcpt in (BOB, CAROL)
    ]


@pytest.mark.parametrize(
    ("state", "outcome", "esteso"),
    [
        (None, None, "5.1.1 - Gestore Nostro - indirizzo non valido"),
        (MailboxState(True, None), None, "5.2.1 - Gestore Nostro - casella disabilitata"),
        (OPEN, Outcome(Stored.FULL), "5.2.2 - Gestore Nostro - casella piena"),
    ],
    ids=["no-such-mailbox", "disabled", "full"],
)
def test_refusals_become_errore_consegna(
    ctx: Context, world: Any, state: MailboxState | None, outcome: Outcome | None, esteso: str
) -> None:
    world.mailboxes = {BOB: OPEN} | ({CAROL: state} if state else {})
    if outcome:
        world.outcomes[CAROL] = outcome
    _tx, effects = run(ctx, world)
    take = world.commands[1]
    assert [d.mailbox for d in take.deliveries] == ([BOB, CAROL] if outcome else [BOB])
    assert esiti(effects) == {
        BOB: (TraceType.AVVENUTA_CONSEGNA, None),
        CAROL: (TraceType.ERRORE_CONSEGNA, esteso),
    }
    # An errore-consegna settles its recipient's timers as an avvenuta-consegna does.
    assert {(e.recipient, e.outcome) for e in world.of(effects, Settle)} == {
        (BOB, TraceType.AVVENUTA_CONSEGNA),
        (CAROL, TraceType.ERRORE_CONSEGNA),
    }


def test_a_failed_delivery_retries_the_job_then_answers_on_the_last_try(
    ctx: Context, world: Any
) -> None:
    world.mailboxes = {BOB: OPEN, CAROL: OPEN}
    world.outcomes[CAROL] = Outcome(Stored.FAILED, "OSError: disk full")
    # Nothing is committed for a try that fails (no presa in carico, no esito): the timers of
    # both recipients stay open, so a delivery held back long enough gets its preavviso.
    with pytest.raises(StageError, match=r"delivery to carol@pec\.ours\.test failed: OSError"):
        run(ctx, world, attempts=1)
    world.commands.clear()
    _tx, effects = run(ctx, world, attempts=ctx.rules.max_attempts)
    assert esiti(effects)[CAROL] == (
        TraceType.ERRORE_CONSEGNA,
        "5.3.0 - Gestore Nostro - errore di sistema",
    )
    assert esiti(effects)[BOB] == (TraceType.AVVENUTA_CONSEGNA, None)


def test_an_envelope_that_does_not_verify_is_never_delivered(ctx: Context, world: Any) -> None:
    world.mailboxes = {BOB: OPEN, CAROL: OPEN}
    tx, env = envelope(world, ctx)
    broken = env.replace(b"corpo", b"CORPO")
    p = DeliveryPayload((BOB, CAROL), tx, world.now)
    with pytest.raises(StageError, match="does not verify"):
        world.play(delivery(ctx, "k", p, broken, attempts=1, now=world.now))


def test_relayed_mail_answers_the_sending_provider_and_its_holder(ctx: Context, world: Any) -> None:
    """An envelope from another provider: the presa in carico goes to that provider's
    mailReceipt, the receipts to its holder, both over the relay."""
    world.mailboxes = {BOB: OPEN, CAROL: OPEN}
    peer = "posta-certificata@pec.theirs.test"
    zoe = "zoe@pec.theirs.test"
    tx, effects = run(ctx, world, mail_receipt=peer, sender=zoe)
    relayed = {e.key: e for e in world.of(effects, Enqueue)}
    assert relayed["in-1:delivery:presa-in-carico"].payload.recipients == (peer,)
    assert relayed[f"esito:{tx.identificativo}:{BOB}"].payload.recipients == (zoe,)
    assert all(e.kind is JobKind.RELAY for e in relayed.values())
    assert world.of(effects, StoreLocal) == []
    # Its timers are the sending provider's, settled there by these receipts: none here.
    assert world.of(effects, TookCharge) == [] and world.of(effects, Settle) == []


def test_store_puts_a_message_in_an_existing_mailbox(ctx: Context, world: Any) -> None:
    world.mailboxes = {BOB: OPEN}
    assert world.play(store("k", StorePayload(BOB, "m@x"), b"data")) == []
    [deliver] = [c for c in world.commands if isinstance(c, Deliver)]
    # Never refused for quota: a receipt lost would be the holder's proof lost.
    assert [(d.mailbox, d.key, d.quota_bytes) for d in deliver.items] == [(BOB, "k", None)]


def test_store_fails_for_a_missing_mailbox_or_a_failed_write(ctx: Context, world: Any) -> None:
    with pytest.raises(StageError, match="does not exist"):
        world.play(store("k", StorePayload(BOB), b"data"))
    world.mailboxes = {BOB: OPEN}
    world.outcomes[BOB] = Outcome(Stored.FAILED, "OSError: EIO")
    with pytest.raises(StageError, match="EIO"):
        world.play(store("k", StorePayload(BOB), b"data"))


def test_receipts_owed_is_the_rule_the_worker_runs(ctx: Context, world: Any) -> None:
    """The TakeInCharge command carries the engine's own rule (a partial of receipts_owed) to
    where the deliveries happen; it pickles, so it crosses to a format worker process."""
    import pickle

    world.mailboxes = {BOB: OPEN, CAROL: OPEN}
    run(ctx, world)
    take = world.commands[1]
    assert isinstance(take.answer, functools.partial)
    assert pickle.loads(pickle.dumps(take)).answer.func is take.answer.func
