"""The timers' table: which notice is due in each case of spec section 2.3, on both databases."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from pecd.store import expectations
from pecd.store.db import Database
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
