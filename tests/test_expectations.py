"""The timers' table: which notice is due in each case of spec section 2.3, on both databases."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest
from sqlalchemy.orm import Session

from pecd.engine.effects import Expect, Settle, TookCharge
from pecd.pec.builders import Destinatario, Transmission
from pecd.pec.vocab import DestinatarioTipo
from pecd.store import expectations
from pecd.store.db import Database
from pecd.store.effects import Lease, apply
from pecd.store.models import Expectation
from store_fixtures import Backend, db_fixture, pg_url_fixture, sqlite_template_fixture

__all__ = ["db_fixture", "pg_url_fixture", "sqlite_template_fixture"]

T0 = datetime(2026, 3, 1, 9, 0, tzinfo=UTC)
FIRST, FINAL = timedelta(hours=12), timedelta(hours=24)
H = timedelta(hours=1)


async def setup(d: Database) -> None:
    async with d.session() as s, s.begin():
        await s.run_sync(
            expectations.expect_sync,
            pec_msgid="id@pec.a",
            recipients=["nothing@b", "presa@b", "late@b", "ontime@b"],
            sender="alice@pec.a",
            tx={"x": 1},
            sent_at=T0,
        )
        # A re-run of the same stage adds nothing.
        await s.run_sync(
            expectations.expect_sync,
            pec_msgid="id@pec.a",
            recipients=["nothing@b"],
            sender="alice@pec.a",
            tx={},
            sent_at=T0,
        )


async def due_at(d: Database, at: datetime) -> list[tuple[str, bool]]:
    """(recipient, final?) for every notice due at ``at``, marking them sent."""
    out = []
    async with d.session() as s, s.begin():
        for row in await expectations.due(s, at, FIRST, FINAL):
            final = row.sent_at <= at - FINAL
            if not final and await s.run_sync(
                expectations.noticed_sync, row.pec_msgid, row.recipient, at, final=False
            ):
                out.append((row.recipient, False))
            if final and await s.run_sync(
                expectations.noticed_sync, row.pec_msgid, row.recipient, at, final=True
            ):
                out.append((row.recipient, True))
    return sorted(out)


def test_the_cases_of_the_rules(db: Backend) -> None:
    async def main(d: Database) -> list[list[tuple[str, bool]]]:
        await setup(d)
        async with d.session() as s, s.begin():
            # presa@b: presa in carico within 12 h, never delivered.
            await s.run_sync(expectations.took_charge_sync, "id@pec.a", ["PRESA@b"], T0 + 2 * H)
            # ontime@b: delivered within 12 h.
            await s.run_sync(
                expectations.close_sync, "id@pec.a", "ontime@b", T0 + 3 * H, "avvenuta-consegna"
            )
        steps = [await due_at(d, T0 + 11 * H), await due_at(d, T0 + 12 * H)]
        async with d.session() as s, s.begin():
            # late@b: delivered between 12 h and 24 h, without presa in carico.
            await s.run_sync(
                expectations.close_sync, "id@pec.a", "late@b", T0 + 15 * H, "avvenuta-consegna"
            )
        steps += [await due_at(d, T0 + 18 * H), await due_at(d, T0 + 24 * H)]
        steps.append(await due_at(d, T0 + 48 * H))  # tracking has stopped
        return steps

    assert db.run(main) == [
        [],
        [("late@b", False), ("nothing@b", False)],
        [],
        [("nothing@b", True), ("presa@b", True)],
        [],
    ]


@pytest.mark.parametrize("outcome", ["avvenuta-consegna", "errore-consegna"])
def test_a_closed_recipient_owes_nothing(db: Backend, outcome: str) -> None:
    async def main(d: Database) -> list[tuple[str, bool]]:
        await setup(d)
        async with d.session() as s, s.begin():
            for r in ("nothing@b", "presa@b", "late@b", "ontime@b"):
                assert await s.run_sync(expectations.close_sync, "id@pec.a", r, T0 + H, outcome)
            assert not await s.run_sync(
                expectations.close_sync, "id@pec.a", "late@b", T0 + H, outcome
            )
        return await due_at(d, T0 + 30 * H)

    assert db.run(main) == []


# --- the engine's timer effects for a recipient of ours, through the store ------------------------


LOCAL_TX = Transmission(
    identificativo="opec-local@pec.a",
    mittente="alice@pec.a",
    destinatari=(
        Destinatario("bob@pec.a", DestinatarioTipo.CERTIFICATO),
        Destinatario("carol@pec.a", DestinatarioTipo.CERTIFICATO),
    ),
    risposte="alice@pec.a",
    oggetto="Stesso dominio",
    msgid="<m@mua>",
)


def test_local_recipients_settled_by_the_delivery_point_owe_nothing(db: Backend) -> None:
    """What the access point and the delivery point yield for a same-provider message (one
    Expect; one TookCharge and a Settle per recipient, in the delivery's one transaction), as the
    store applies them in a batch: the delivered recipient owes nothing at 12 h nor 24 h, the one
    held back (its delivery not committed yet) owes both notices, each once."""
    ident = LOCAL_TX.identificativo
    lease = Lease("test", T0)

    async def main(d: Database) -> list[list[tuple[str, bool]]]:
        def submit(s: Session) -> object:
            expect = Expect(ident, ("bob@pec.a", "carol@pec.a"), "alice@pec.a", LOCAL_TX, T0)
            return apply(s, [expect], lease)

        def delivered(s: Session) -> object:
            return apply(
                s,
                [
                    TookCharge(ident, ("bob@pec.a",), T0 + H),
                    Settle(ident, "bob@pec.a", T0 + H, "avvenuta-consegna"),
                ],
                lease,
            )

        await d.write(submit)
        await d.write(delivered)
        await d.write(delivered)  # a re-run of the stage changes nothing
        steps = [await due_at(d, T0 + 12 * H), await due_at(d, T0 + 13 * H)]
        steps += [await due_at(d, T0 + 24 * H), await due_at(d, T0 + 48 * H)]
        async with d.session() as s:
            row = await s.get(Expectation, (ident, "bob@pec.a"))
            assert row is not None and row.closed_at is not None and row.presa_at is not None
            assert row.outcome == "avvenuta-consegna"
        return steps

    assert db.run(main) == [[("carol@pec.a", False)], [], [("carol@pec.a", True)], []]
