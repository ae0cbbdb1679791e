"""The relay's rules (engine/relay.py) and the 12 h / 24 h timers (engine/timers.py)."""

from __future__ import annotations

from datetime import timedelta
from typing import Any

import pytest

from pecd.engine.context import Context
from pecd.engine.effects import Build, ClaimNotice, Enqueue, Record, Send, Sent, Settle, StoreLocal
from pecd.engine.relay import errore_for, relay, retry_delay
from pecd.engine.timers import Waiting, owed, timers
from pecd.engine.vocab import JobKind, RelayKind, RelayPayload, TraceType
from pecd.pec.builders import Destinatario, Transmission
from pecd.pec.vocab import DestinatarioTipo, Errore

ALICE = "alice@pec.ours.test"
CAROL, DAN, EXT = "carol@pec.theirs.test", "dan@pec.theirs.test", "ext@pec.theirs.test"


def tx() -> Transmission:
    return Transmission(
        identificativo="opec-1@pec.ours.test",
        mittente=ALICE,
        destinatari=(
            Destinatario(CAROL, DestinatarioTipo.CERTIFICATO),
            Destinatario(DAN, DestinatarioTipo.CERTIFICATO),
            Destinatario(EXT, DestinatarioTipo.ESTERNO),
        ),
        risposte=ALICE,
        oggetto="Prova",
        msgid="<m1@mua.test>",
    )


def send(ctx: Context, world: Any, sent: Sent, **kw: Any) -> list[Any]:
    world.smtp = sent
    p = RelayPayload(
        recipients=(CAROL, DAN, EXT),
        message_id="opec-1@pec.ours.test",
        mail_from=ALICE,
        kind=RelayKind.ENVELOPE,
        tx=tx(),
        **kw,
    )
    created = kw.get("since") or world.now
    return world.play(
        relay(ctx, "in-1:relay:pec.theirs.test", p, b"env", created_at=created, now=world.now)
    )


def test_accepted_by_the_next_hop(ctx: Context, world: Any) -> None:
    effects = send(ctx, world, Sent())
    [cmd] = world.commands
    assert isinstance(cmd, Send) and cmd.domain == "pec.theirs.test" and cmd.mail_from == ALICE
    [record] = world.of(effects, Record)
    assert record.event.event == TraceType.RELAYED
    assert [r["address"] for r in record.event.recipients] == [CAROL, DAN, EXT]


def test_refused_for_good_owes_pec_recipients_an_errore_consegna(ctx: Context, world: Any) -> None:
    effects = send(ctx, world, Sent(refused={DAN: "550 5.1.1 no such user", EXT: "550 5.1.1 no"}))
    # The notice for DAN only: EXT is esterno, and the rules owe him no PEC notice.
    [build] = [c for c in world.commands if isinstance(c, Build)]
    assert [c.keywords["recipient"] for c in build.calls] == [DAN]
    assert build.calls[0].keywords["errore"] is Errore.NO_DEST
    [notice] = [e for e in world.of(effects, StoreLocal) if e.key.startswith("esito:")]
    assert notice.key == f"esito:{tx().identificativo}:{DAN}" and notice.mailbox == ALICE
    assert world.of(effects, Settle) == [
        Settle(tx().identificativo, DAN, world.now, TraceType.ERRORE_CONSEGNA)
    ]
    events = [r.event.event for r in world.of(effects, Record)]
    assert events == [
        TraceType.RELAYED,
        TraceType.RELAY_FAILED,
        TraceType.ERRORE_CONSEGNA,
        TraceType.DSN,  # EXT's failure, as ordinary mail reports it
    ]


def test_refused_for_now_is_tried_again_after_a_backoff(ctx: Context, world: Any) -> None:
    effects = send(ctx, world, Sent(retry={CAROL: "451 busy", DAN: "451 busy"}), attempt=3)
    [again] = world.of(effects, Enqueue)
    assert again.kind is JobKind.RELAY and again.key == "in-1:relay:pec.theirs.test:retry:3"
    assert again.payload.recipients == (CAROL, DAN) and again.payload.attempt == 4
    assert again.payload.since == world.now  # the first attempt's time, kept for the expiry
    assert again.run_at == world.now + timedelta(seconds=240)
    assert [r.event.event for r in world.of(effects, Record)] == [
        TraceType.RELAYED,  # EXT was accepted
        TraceType.RELAY_RETRY,
    ]


def test_past_the_expiry_nobody_is_tried_again_and_no_notice_is_sent(
    ctx: Context, world: Any
) -> None:
    since = world.now - timedelta(hours=25)
    effects = send(ctx, world, Sent(retry={CAROL: "451 busy"}), since=since)
    assert world.of(effects, Enqueue) == [] and world.of(effects, StoreLocal) == []
    failed = [r.event for r in world.of(effects, Record) if r.event.event == TraceType.RELAY_FAILED]
    assert failed[0].error.startswith("4.4.7 expired after 24 h")


def test_replies_map_to_daticert_errors_and_the_backoff_is_capped() -> None:
    assert errore_for("550 5.1.1 unknown") is Errore.NO_DEST
    assert errore_for("550 5.1.2 no domain") is Errore.NO_DOMINIO
    assert errore_for("554 5.7.1 policy") is Errore.ALTRO
    assert [retry_delay(60, 3600, n).total_seconds() for n in (1, 2, 3, 7, 20)] == [
        60,
        120,
        240,
        3600,
        3600,
    ]


def waiting(world: Any, hours: float, *, presa: bool = False, first: bool = False) -> Waiting:
    sent = world.now - timedelta(hours=hours)
    return Waiting(
        "opec-1@pec.ours.test",
        CAROL,
        ALICE,
        tx(),
        sent,
        sent + timedelta(hours=1) if presa else None,
        sent + timedelta(hours=12) if first else None,
    )


@pytest.mark.parametrize(
    ("hours", "presa", "first", "expected"),
    [
        (11, False, False, []),  # nothing due yet
        (12, False, False, [False]),  # no presa, no delivery at 12 h: the first notice
        (13, True, False, []),  # a presa in carico within 12 h: no first notice
        (24, True, False, [True]),  # ...and at 24 h only the final one
        (24, False, False, [False, True]),  # nothing at all, server down at 12 h: both
        (24, False, True, [True]),  # the first went out already
    ],
)
def test_which_notices_are_owed(
    world: Any, hours: float, presa: bool, first: bool, expected: list[bool]
) -> None:
    w = waiting(world, hours, presa=presa, first=first)
    assert owed(w, world.now, timedelta(hours=12), timedelta(hours=24)) == expected


def test_the_timers_build_every_notice_in_one_round_trip(ctx: Context, world: Any) -> None:
    rows = [waiting(world, 24), waiting(world, 12.5, presa=True), waiting(world, 13)]
    effects = world.play(timers(ctx, rows, world.now))
    [build] = world.commands
    assert [c.keywords["final"] for c in build.calls] == [False, True, False]
    claims = world.of(effects, ClaimNotice)
    assert [(c.final, c.then[0].key) for c in claims] == [
        (False, f"timer:opec-1@pec.ours.test:{CAROL}:12h"),
        (True, f"timer:opec-1@pec.ours.test:{CAROL}:24h"),
        (False, f"timer:opec-1@pec.ours.test:{CAROL}:12h"),
    ]
    # Each notice goes to the sender and is logged, but only by the claim that marks its row.
    assert all(c.then[0].mailbox == ALICE for c in claims)
    assert all(c.then[1].event.event == TraceType.PREAVVISO_ERRORE_CONSEGNA for c in claims)


def test_one_notice_that_cannot_be_built_holds_back_no_other(ctx: Context, world: Any) -> None:
    bad = tx().__class__(**{**tx().__dict__, "identificativo": "opec-bad@pec.ours.test"})
    rows = [
        waiting(world, 13),
        Waiting(
            "opec-bad@pec.ours.test", DAN, ALICE, bad, world.now - timedelta(hours=13), None, None
        ),
    ]
    world.fail_builds = lambda b: any(
        c.keywords["tx"].identificativo == "opec-bad@pec.ours.test" for c in b.calls
    )
    effects = world.play(timers(ctx, rows, world.now))
    assert len(world.commands) == 3  # together, then each alone
    assert [c.recipient for c in world.of(effects, ClaimNotice)] == [CAROL]


def test_ordinary_mail_recipients_that_fail_get_the_sender_a_status_notification(
    ctx: Context, world: Any
) -> None:
    """EXT is esterno: no PEC notice for him, but the sender gets an RFC 3464 DSN (not signed);
    DAN is certified: an errore-consegna, no DSN."""
    effects = send(
        ctx, world, Sent(refused={EXT: "550 5.1.1 <ext>: no such user", DAN: "550 5.1.1 no"})
    )
    stored = {e.key: e for e in world.of(effects, StoreLocal)}
    dsn = stored["dsn:in-1:relay:pec.theirs.test"]
    assert dsn.mailbox == ALICE
    assert b"multipart/report; report-type=delivery-status" in dsn.data
    assert b"Final-Recipient: rfc822; ext@pec.theirs.test" in dsn.data
    assert (
        b"Status: 5.1.1" in dsn.data
        and b"dan@" not in dsn.data.split(b"text/rfc822-headers")[0].split(b"delivery-status")[-1]
    )
    assert f"esito:{tx().identificativo}:{DAN}" in stored
    events = [r.event for r in world.of(effects, Record) if r.event.event == TraceType.DSN]
    assert [e.data["esterni"] for e in events] == [[EXT]]


def test_an_expired_ordinary_recipient_gets_a_4_4_7_notification(ctx: Context, world: Any) -> None:
    since = world.now - timedelta(hours=25)
    effects = send(ctx, world, Sent(retry={EXT: "451 4.3.0 try later"}), since=since)
    [dsn] = [e for e in world.of(effects, StoreLocal) if e.key.startswith("dsn:")]
    assert b"Status: 4.4.7" in dsn.data and b"451 4.3.0 try later" in dsn.data


def test_no_status_notification_for_pec_recipients_or_receipts(ctx: Context, world: Any) -> None:
    effects = send(ctx, world, Sent(refused={CAROL: "550 5.1.1 no"}))
    assert not any(e.key.startswith("dsn:") for e in world.of(effects, StoreLocal))
