"""Seals of the trace log: an untouched log verifies; any change, insertion or deletion of an
event or a seal, made directly in the database, is found and named (SQLite and PostgreSQL)."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Coroutine
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from sqlalchemy import delete, text, update

from helpers import EVENTS_T0, add_events
from pecd.pec.smime import KeySigner
from pecd.store import seals
from pecd.store.db import Database
from pecd.store.models import TraceEvent, TraceSeal
from pecd.store.trace import TraceEventData, record_sync
from store_fixtures import Backend, db_fixture, pg_url_fixture, sqlite_template_fixture

__all__ = ["db_fixture", "pg_url_fixture", "sqlite_template_fixture"]

T0 = EVENTS_T0  # add_events dates its events from here
GRACE = timedelta(minutes=5)


async def sealed_log(d: Database, signer: KeySigner) -> None:
    await add_events(d, 30)
    assert (
        await seals.seal_pending(d, signer, now=T0 + timedelta(minutes=1), node="n1")
    ) is not None
    await add_events(d, 20, start=30)
    await seals.seal_pending(d, signer, now=T0 + timedelta(minutes=2), node="n1")
    await add_events(d, 10, start=50)
    await seals.seal_pending(d, signer, now=T0 + timedelta(minutes=3), node="n1")
    assert await seals.seal_pending(d, signer, now=T0 + timedelta(minutes=4), node="n1") is None


def check(d: Database) -> Coroutine[Any, Any, seals.Report]:
    return seals.verify(d, now=T0 + timedelta(minutes=10), unsealed_grace=GRACE)


def test_untouched_log_verifies(db: Backend, signer: KeySigner) -> None:
    async def main(d: Database) -> seals.Report:
        await sealed_log(d, signer)
        return await check(d)

    report = db.run(main)
    assert report.ok, [str(f) for f in report.findings]
    assert (report.seals, report.events) == (3, 60)


Tamper = Callable[[Any], Coroutine[Any, Any, None]]


async def _change_event(s: Any) -> None:
    await s.execute(update(TraceEvent).where(TraceEvent.id == 7).values(subject="altro"))


async def _delete_event(s: Any) -> None:
    await s.execute(delete(TraceEvent).where(TraceEvent.id == 33))


async def _insert_sealed_event(s: Any) -> None:
    await s.run_sync(
        record_sync, TraceEventData(at=T0, event="accettazione", pec_msgid="forged@pec.test")
    )
    await s.execute(
        update(TraceEvent).where(TraceEvent.pec_msgid == "forged@pec.test").values(seal_id=2)
    )


async def _insert_unsealed_event(s: Any) -> None:
    await s.run_sync(
        record_sync, TraceEventData(at=T0, event="accettazione", pec_msgid="late@pec.test")
    )


async def _change_seal(s: Any) -> None:
    await s.execute(update(TraceSeal).where(TraceSeal.id == 2).values(node="elsewhere"))


async def _delete_seal(s: Any) -> None:
    await s.execute(delete(TraceSeal).where(TraceSeal.id == 2))


async def _delete_last_seal(s: Any) -> None:
    await s.execute(delete(TraceSeal).where(TraceSeal.id == 3))


async def _move_event_between_seals(s: Any) -> None:
    await s.execute(update(TraceEvent).where(TraceEvent.id == 40).values(seal_id=1))


@pytest.mark.parametrize(
    ("tamper", "expected"),
    [
        (_change_event, {("changed", 7, None)}),
        (_delete_event, {("deleted", 33, None)}),
        (_insert_sealed_event, {("inserted", 61, None)}),
        (_insert_unsealed_event, {("unsealed", 61, None)}),
        (_change_seal, {("seal-changed", None, 2), ("seal-forged", None, 2)}),
        (_move_event_between_seals, {("inserted", 40, None), ("deleted", 40, None)}),
    ],
    ids=lambda v: getattr(v, "__name__", ""),
)
def test_tampering_is_found_and_named(
    db: Backend,
    signer: KeySigner,
    tamper: Tamper,
    expected: set[tuple[str, int | None, int | None]],
) -> None:
    async def main(d: Database) -> seals.Report:
        await sealed_log(d, signer)
        async with d.session() as s, s.begin():
            await tamper(s)
        return await check(d)

    report = db.run(main)
    found = {
        (f.what, f.event_id, None if f.event_id is not None else f.seal_id) for f in report.findings
    }
    assert found == expected, [str(f) for f in report.findings]


@pytest.mark.parametrize("tamper", [_delete_seal, _delete_last_seal])
def test_a_removed_seal_is_found(db: Backend, signer: KeySigner, tamper: Tamper) -> None:
    async def main(d: Database) -> seals.Report:
        await sealed_log(d, signer)
        async with d.session() as s, s.begin():
            await tamper(s)
        return await check(d)

    report = db.run(main)
    assert not report.ok
    whats = {f.what for f in report.findings}
    # Its events are left marked with a seal that does not exist.
    assert "inserted" in whats, [str(f) for f in report.findings]


def test_a_forged_signature_is_found(db: Backend, signer: KeySigner) -> None:
    async def main(d: Database) -> seals.Report:
        await sealed_log(d, signer)
        async with d.session() as s, s.begin():
            await s.execute(
                update(TraceSeal).where(TraceSeal.id == 1).values(signature=b"\x00" * 256)
            )
        return await check(d)

    report = db.run(main)
    assert [(f.what, f.seal_id) for f in report.findings] == [("seal-forged", 1)]


def test_concurrent_sealers_cover_every_event_once(db: Backend, signer: KeySigner) -> None:
    """Two sealers and two writers at once (two pecd nodes): every event sealed exactly once."""

    async def main(d: Database) -> tuple[seals.Report, int]:
        other = await Database.open(db.url)

        async def writer(base: Database, start: int) -> None:
            for k in range(10):
                await add_events(base, 5, start=start + 5 * k)
                await asyncio.sleep(0)  # a turn for the others: the interleaving under test

        async def sealer(base: Database, node: str) -> None:
            for k in range(12):
                await seals.seal_pending(base, signer, now=T0 + timedelta(seconds=k), node=node)
                await asyncio.sleep(0.01)  # spreads the 12 seals over the writers' run: under test

        try:
            await asyncio.gather(
                writer(d, 0), writer(other, 1000), sealer(d, "n1"), sealer(other, "n2")
            )
            await seals.seal_pending(d, signer, now=T0 + timedelta(minutes=1), node="n1")
        finally:
            await other.close()
        async with d.read_session() as s:
            unsealed = (
                await s.execute(text("SELECT count(*) FROM trace_events WHERE seal_id IS NULL"))
            ).scalar()
        return await check(d), int(unsealed or 0)

    report, unsealed = db.run(main)
    assert report.ok, [str(f) for f in report.findings]
    assert report.events == 100 and unsealed == 0


def test_pecd_log_verify_command(tmp_path: Any, capsys: pytest.CaptureFixture[str]) -> None:
    from pecd.cli import main
    from pecd.clock import SystemClock
    from pecd.config import load_config
    from pecd.devinit import init_installation

    result = asyncio.run(
        init_installation(
            tmp_path / "inst", domain="pec.test", name="Test PEC", clock=SystemClock()
        )
    )
    cfg = load_config(result.config)

    async def prepare() -> None:
        d = await Database.open(cfg.database_url)
        try:
            await add_events(d, 12)
        finally:
            await d.close()

    asyncio.run(prepare())
    c = ["-c", str(result.config)]
    assert main(["log", "seal", *c]) == 0
    assert "sealed 12 events" in capsys.readouterr().out
    assert main(["log", "verify", *c]) == 0
    assert "12 events in 1 seals checked; the log holds" in capsys.readouterr().out

    async def tamper() -> None:
        d = await Database.open(cfg.database_url)
        try:
            async with d.session() as s, s.begin():
                await s.execute(update(TraceEvent).where(TraceEvent.id == 5).values(error="x"))
        finally:
            await d.close()

    asyncio.run(tamper())
    assert main(["log", "verify", *c]) == 1
    out = capsys.readouterr().out
    assert "event 5: changed" in out and "does NOT hold: 1 findings" in out


def test_purge_keeps_the_chain_verifiable(db: Backend, signer: KeySigner) -> None:
    async def main(d: Database) -> list[Any]:
        for month in range(6):
            await add_events(d, 5, start=month * 5)
            await seals.seal_pending(d, signer, now=seals.months_before(T0, -month), node="n")
        now = seals.months_before(T0, -32)  # seals of months 0 and 1 are 30+ months old
        with pytest.raises(ValueError, match="30 months"):
            await seals.purge(d, signer, now=now, retention_months=24)
        removed = await seals.purge(d, signer, now=now, retention_months=30)
        again = await seals.purge(d, signer, now=now, retention_months=30)
        clean = await seals.verify(d, now=now, unsealed_grace=GRACE)
        async with d.session() as s, s.begin():
            await s.execute(delete(TraceSeal).where(TraceSeal.id == 3))  # the oldest one kept
        cut = await seals.verify(d, now=now, unsealed_grace=GRACE)
        return [removed, again, clean, cut]

    removed, again, clean, cut = db.run(main)
    assert removed == (2, 10) and again == (0, 0)
    assert clean.ok and (clean.seals, clean.events) == (4, 20), [str(f) for f in clean.findings]
    assert {f.what for f in cut.findings} >= {"seal-chain", "inserted"}


def test_a_forged_purge_record_is_found(db: Backend, signer: KeySigner) -> None:
    async def main(d: Database) -> seals.Report:
        await sealed_log(d, signer)
        await seals.purge(d, signer, now=seals.months_before(T0, -31), retention_months=30)
        async with d.session() as s, s.begin():
            await s.execute(text("UPDATE trace_horizon SET events_purged = 1"))
        return await seals.verify(d, now=T0, unsealed_grace=GRACE)

    report = db.run(main)
    assert [f.what for f in report.findings] == ["horizon-forged"]


def test_months_before() -> None:
    assert seals.months_before(datetime(2026, 3, 31, tzinfo=UTC), 30) == datetime(
        2023, 9, 30, tzinfo=UTC
    )
    assert seals.months_before(datetime(2026, 8, 29, tzinfo=UTC), 30) == datetime(
        2024, 2, 29, tzinfo=UTC
    )


SEALING_NODE = r"""
import asyncio, sys
from datetime import UTC, datetime, timedelta
sys.path.insert(0, sys.argv[3])
from helpers import add_events
from pecd.pec.pki import create_dev_pki
from pecd.pec.smime import KeySigner
from pecd.store import seals
from pecd.store.db import Database

async def main(url, start):
    pki = create_dev_pki(domain="pec.test", name="Node", now=datetime.now(UTC))
    signer = KeySigner.from_pem(pki.signing.key_pem, pki.signing.cert_pem)
    db = await Database.open(url)
    try:
        for k in range(20):
            await add_events(db, 10, start=start + 10 * k)
            await seals.seal_pending(db, signer, now=datetime.now(UTC), node=f"node{start}")
    finally:
        await db.close()

asyncio.run(main(sys.argv[1], int(sys.argv[2])))
"""


@pytest.mark.skipif(
    not __import__("os").environ.get("PECD_TEST_POSTGRES_URL"), reason="needs PostgreSQL"
)
def test_two_processes_write_and_seal_one_postgresql(pg_url: str) -> None:
    """Two pecd processes on one PostgreSQL, each writing events and sealing at the same time:
    the chain verifies and every event is covered exactly once."""
    import subprocess
    import sys
    from pathlib import Path

    from store_fixtures import empty_tables

    asyncio.run(empty_tables(pg_url))
    here = str(Path(__file__).resolve().parent)
    procs = [
        subprocess.Popen([sys.executable, "-c", SEALING_NODE, pg_url, str(start), here])
        for start in (0, 100_000)
    ]
    assert [p.wait(120) for p in procs] == [0, 0]

    async def check() -> tuple[seals.Report, int]:
        d = await Database.open(pg_url)
        try:
            async with d.read_session() as s:
                unsealed = (
                    await s.execute(text("SELECT count(*) FROM trace_events WHERE seal_id IS NULL"))
                ).scalar()
            return await seals.verify(d, now=datetime.now(UTC), unsealed_grace=GRACE), int(
                unsealed or 0
            )
        finally:
            await d.close()

    report, unsealed = asyncio.run(check())
    assert report.ok, [str(f) for f in report.findings]
    assert report.events == 400 and unsealed == 0 and report.seals >= 2
