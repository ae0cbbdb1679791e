"""The 12 h / 24 h timers for recipients at this provider (spec 2.3; "full processing even when
sender and recipient are on the same domain"): the access point starts them, the delivery point
settles them, and a delivery held back (a full disk: every try fails and commits nothing) gets its
preavviso at the first timer, to the sender, once; a delivered recipient gets none.

The stages are driven as everywhere in tests/unit/engine; their timer effects go into a small
in-memory table that follows the SQL side's documented rules (store/expectations.py: a row per
transmission and recipient, a presa in carico marks the rows it covers, an esito or the final
notice closes a row, a notice is sent only by the claim that marks its column), so the whole life
of a local recipient's timers is played without a database."""

from __future__ import annotations

from dataclasses import dataclass, replace
from datetime import datetime, timedelta
from typing import Any

import pytest

from pecd.engine.context import Context
from pecd.engine.delivery import delivery
from pecd.engine.effects import (
    ClaimNotice,
    Effect,
    Enqueue,
    Expect,
    MailboxState,
    Record,
    Settle,
    StageError,
    StoreLocal,
    TookCharge,
)
from pecd.engine.submission import submission
from pecd.engine.timers import Waiting, timers
from pecd.engine.vocab import DeliveryPayload, IntakePayload, Outcome, Stored, TraceType
from pecd.pec.classify import classify
from pecd.pec.vocab import Ricevuta

ALICE, BOB, CAROL = "alice@pec.ours.test", "bob@pec.ours.test", "carol@pec.ours.test"
H = timedelta(hours=1)


def original(to: list[str]) -> bytes:
    return (
        f"From: {ALICE}\r\nTo: {', '.join(to)}\r\nSubject: Disco pieno\r\n"
        "Message-ID: <local-1@mua.test>\r\n\r\ncorpo\r\n"
    ).encode()


@dataclass
class Row:
    waiting: Waiting
    first_sent: bool = False
    final_sent: bool = False


class Table:
    """The timers' table as store/expectations.py keeps it, in memory."""

    def __init__(self) -> None:
        self.rows: dict[tuple[str, str], Row] = {}
        self.sent: list[StoreLocal] = []  # notices whose claim won, as stored

    def apply(self, effects: list[Effect]) -> None:
        for e in effects:
            if isinstance(e, Enqueue):
                self.apply(list(e.then))
            elif isinstance(e, Expect):
                for r in e.recipients:
                    self.rows.setdefault(
                        (e.pec_msgid, r),
                        Row(Waiting(e.pec_msgid, r, e.sender, e.tx, e.sent_at, None, None)),
                    )
            elif isinstance(e, TookCharge):
                for r in e.recipients:
                    row = self.rows.get((e.pec_msgid, r))
                    if row is not None and row.waiting.presa_at is None:
                        row.waiting = replace(row.waiting, presa_at=e.at)
            elif isinstance(e, Settle):
                row = self.rows.get((e.pec_msgid, e.recipient))
                if row is not None and not row.waiting.closed:
                    row.waiting = replace(row.waiting, closed=True)
            elif isinstance(e, ClaimNotice):
                row = self.rows.get((e.pec_msgid, e.recipient))
                if row is None or row.waiting.closed:
                    continue
                if e.final:
                    if row.final_sent:
                        continue
                    row.final_sent = True
                    row.waiting = replace(row.waiting, closed=True)
                else:
                    if row.first_sent:
                        continue
                    row.first_sent = True
                    row.waiting = replace(row.waiting, first_notice_at=e.at)
                self.sent += [x for x in e.then if isinstance(x, StoreLocal)]

    def open(self) -> list[Waiting]:
        return [r.waiting for r in self.rows.values() if not r.waiting.closed]


def submit(ctx: Context, world: Any, table: Table, to: list[str]) -> DeliveryPayload:
    p = IntakePayload(ALICE, tuple(to), user=ALICE)
    effects = world.play(submission(ctx, "in-1", p, original(to), world.now))
    table.apply(effects)
    [job] = [e for e in world.of(effects, Enqueue) if isinstance(e.payload, DeliveryPayload)]
    world.envelope = job.data
    payload: DeliveryPayload = job.payload
    return payload


def deliver(
    ctx: Context, world: Any, table: Table, p: DeliveryPayload, at: datetime, attempts: int = 1
) -> list[Effect]:
    world.receipts_at = at
    effects = world.play(
        delivery(ctx, "in-1:delivery", p, world.envelope, attempts=attempts, now=at)
    )
    table.apply(effects)
    return effects


def tick(ctx: Context, world: Any, table: Table, at: datetime) -> list[StoreLocal]:
    """One run of the timers at ``at``; the notices it sent."""
    before = len(table.sent)
    table.apply(world.play(timers(ctx, table.open(), at)))
    return table.sent[before:]


def preavviso(notice: StoreLocal) -> tuple[str, str | None, str]:
    c = classify(notice.data)
    assert c.ricevuta is Ricevuta.PREAVVISO_ERRORE_CONSEGNA and c.daticert is not None
    return notice.mailbox, c.daticert.consegna, (c.daticert.errore_esteso or "")[:5]


@pytest.fixture
def boxes(world: Any) -> None:
    world.mailboxes = {BOB: MailboxState(False, None), CAROL: MailboxState(False, None)}


@pytest.mark.usefixtures("boxes")
def test_a_local_delivery_held_back_gets_the_first_preavviso_once_then_its_one_esito(
    ctx: Context, world: Any
) -> None:
    table = Table()
    t0 = world.now
    p = submit(ctx, world, table, [BOB])
    assert [w.recipient for w in table.open()] == [BOB]

    # The mailbox filesystem is full: every try fails and commits nothing (no presa, no esito).
    world.outcomes[BOB] = Outcome(Stored.FAILED, "ENOSPC: No space left on device")
    for hours in (1, 6, 11):
        with pytest.raises(StageError, match="ENOSPC"):
            deliver(ctx, world, table, p, t0 + hours * H)
    assert tick(ctx, world, table, t0 + 11 * H) == []

    # 12 h without presa in carico or delivery: the first notice, to the sender, about bob.
    [first] = tick(ctx, world, table, t0 + 12 * H + timedelta(minutes=1))
    assert preavviso(first) == (ALICE, BOB, "4.4.1")
    assert first.key == f"timer:{p.tx.identificativo}:{BOB}:12h"
    assert tick(ctx, world, table, t0 + 13 * H) == []  # once only

    # Space returns: one avvenuta-consegna, which settles bob's timers.
    del world.outcomes[BOB]
    effects = deliver(ctx, world, table, p, t0 + 15 * H)
    esiti = [r.event.event for r in world.of(effects, Record) if "consegna" in r.event.data]
    assert esiti == [TraceType.AVVENUTA_CONSEGNA]
    assert table.open() == []
    # No final notice for a delivered recipient, whenever the timers run.
    assert tick(ctx, world, table, t0 + 24 * H) == []
    assert tick(ctx, world, table, t0 + 48 * H) == []


@pytest.mark.usefixtures("boxes")
def test_a_local_delivery_in_time_owes_no_notice(ctx: Context, world: Any) -> None:
    table = Table()
    t0 = world.now
    p = submit(ctx, world, table, [BOB, CAROL])
    effects = deliver(ctx, world, table, p, t0 + timedelta(seconds=2))
    assert {s.recipient for s in world.of(effects, Settle)} == {BOB, CAROL}
    assert [w.recipient for w in table.open()] == []
    assert [tick(ctx, world, table, t0 + h * H) for h in (12, 13, 24, 25)] == [[], [], [], []]


@pytest.mark.usefixtures("boxes")
def test_a_local_delivery_stuck_a_whole_day_gets_both_notices_each_once(
    ctx: Context, world: Any
) -> None:
    """Held back past 24 h (no presa in carico either: it comes with the delivery), the sender
    hears both notices, each once; tracking then stops, so a late delivery adds no notice."""
    table = Table()
    t0 = world.now
    p = submit(ctx, world, table, [BOB])
    got = [preavviso(n) for h in (12, 18, 24, 30) for n in tick(ctx, world, table, t0 + h * H)]
    assert got == [(ALICE, BOB, "4.4.1"), (ALICE, BOB, "5.4.1")]
    effects = deliver(ctx, world, table, p, t0 + 31 * H)
    assert [s.recipient for s in world.of(effects, Settle)] == [BOB]  # a no-op on a closed row
    assert tick(ctx, world, table, t0 + 40 * H) == []


@pytest.mark.usefixtures("boxes")
def test_a_permanent_failure_settles_with_the_errore_consegna(ctx: Context, world: Any) -> None:
    """A fault that is not the machine's, met on the last try, is answered errore-consegna:
    that too is the recipient's one esito and closes its timers."""
    table = Table()
    p = submit(ctx, world, table, [BOB])
    world.outcomes[BOB] = Outcome(Stored.FAILED, "PermissionError: denied")
    effects = deliver(ctx, world, table, p, world.now + H, attempts=ctx.rules.max_attempts)
    assert [(s.recipient, s.outcome) for s in world.of(effects, Settle)] == [
        (BOB, TraceType.ERRORE_CONSEGNA)
    ]
    assert table.open() == []
    assert tick(ctx, world, table, world.now + 12 * H) == []
