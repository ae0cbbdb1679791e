"""The virus store (store/virus.py, `pecd virus`), on both databases: an infected message is kept
once per key, byte for byte; listed without its bytes, read with them; and it goes with the trace
log's retention purge, never before the trace events of its time."""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import select, update

from pecd.cli import main
from pecd.cli.virus import INDEX
from pecd.clock import SystemClock
from pecd.devinit import init_installation
from pecd.engine.vocab import TraceEventData
from pecd.pec.smime import KeySigner
from pecd.store import seals, virus
from pecd.store.db import Database
from pecd.store.models import InfectedMessage
from pecd.store.trace import record_sync
from store_fixtures import Backend, db_fixture, pg_url_fixture, sqlite_template_fixture

__all__ = ["db_fixture", "pg_url_fixture", "sqlite_template_fixture"]

T0 = datetime(2024, 1, 15, 9, 0, tzinfo=UTC)
# CRLF and bare LF and CR, NULs, 8-bit bytes that are not UTF-8, every byte value, no final EOL.
ODD = (
    b"Received: from x\r\nSubject: =?x?q?\xe8?= \xff\xfe\r\n\r\nbody\x00\x00 after NUL\r\n"
    b"bare LF\nbare CR\r\x80\x81\r\n" + bytes(range(256)) * 4 + b"\r\n.\r\n\x00"
)


def after(months: int, minutes: int = 0) -> datetime:
    return seals.months_before(T0, -months) + timedelta(minutes=minutes)


def keep(
    d: Database,
    key: str,
    at: datetime,
    data: bytes = ODD,
    *,
    point: str = "access",
    msgid: str | None = "opec-1@pec.test",
    recipients: Sequence[str] = ("bob@pec.test", "carol@pec.other"),
) -> Any:
    return d.write(
        lambda s: virus.keep_sync(
            s,
            key=key,
            at=at,
            point=point,
            signature="Eicar-Signature",
            pec_msgid=msgid,
            sender="alice@pec.test",
            recipients=recipients,
            data=data,
        )
    )


async def event_at(d: Database, at: datetime) -> None:
    e = TraceEventData(at=at, event="rilevazione-virus", pec_msgid=f"{at.isoformat()}@pec.test")
    async with d.session() as s, s.begin():
        await s.run_sync(lambda sync: record_sync(sync, e))


async def kept_times(d: Database) -> list[datetime]:
    async with d.read_session() as s:
        return [k.at for k in await virus.list_kept(s, limit=None)]


# --- the store ------------------------------------------------------------------------------------


def test_kept_once_per_key_byte_exact(db: Backend) -> None:
    big = os.urandom(3 * 1024 * 1024) + b"\x00\r\n"

    async def main_(d: Database) -> tuple[list[bool], list[InfectedMessage | None]]:
        first = await keep(d, "k1:virus", T0, ODD)
        # The stage runs again (crash before its job completed): kept once, the first bytes.
        again = await keep(d, "k1:virus", T0 + timedelta(minutes=1), b"other", point="reception")
        other = await keep(d, "k2:virus", T0, big, point="reception", msgid=None, recipients=())
        async with d.read_session() as s:
            ids = [k.id for k in await virus.list_kept(s)]
            # (On PostgreSQL the refused row used up an id of the sequence.)
            got = [await virus.get_kept(s, i) for i in (*ids, max(ids) + 1)]
        return [first, again, other], got

    flags, (one, two, none) = db.run(main_)
    assert flags == [True, False, True]
    assert none is None
    assert one is not None and two is not None
    assert one.data == ODD and type(one.data) is bytes
    assert (one.size, one.sha256) == (len(ODD), hashlib.sha256(ODD).hexdigest())
    assert (one.key, one.at, one.point, one.signature) == (
        "k1:virus",
        T0,
        "access",
        "Eicar-Signature",
    )
    assert (one.pec_msgid, one.sender) == ("opec-1@pec.test", "alice@pec.test")
    assert one.recipients == ["bob@pec.test", "carol@pec.other"]
    assert two.data == big and two.sha256 == hashlib.sha256(big).hexdigest()
    assert (two.point, two.pec_msgid, two.recipients) == ("reception", None, [])


def test_only_the_two_points(db: Backend) -> None:
    async def main_(d: Database) -> None:
        await keep(d, "k", T0, point="delivery")

    with pytest.raises(ValueError, match="point 'delivery'"):
        db.run(main_)


def test_list_without_bytes_and_get(db: Backend) -> None:
    async def main_(d: Database) -> tuple[list[virus.Kept], ...]:
        for i in (3, 0, 2, 1):  # kept out of time order
            await keep(d, f"k{i}", T0 + timedelta(hours=i), ODD[: 100 + i])
        async with d.read_session() as s:
            return (
                await virus.list_kept(s),
                await virus.list_kept(
                    s, since=T0 + timedelta(hours=1), until=T0 + timedelta(hours=3)
                ),
                await virus.list_kept(s, limit=2),
            )

    every, window, first_two = db.run(main_)
    assert [k.key for k in every] == ["k0", "k1", "k2", "k3"]
    assert [k.key for k in window] == ["k1", "k2"]  # since included, until excluded
    assert [k.key for k in first_two] == ["k0", "k1"]
    k1 = every[1]
    assert not hasattr(k1, "data")
    assert (k1.size, k1.sha256) == (101, hashlib.sha256(ODD[:101]).hexdigest())
    assert virus.as_json(k1) == {
        "id": 4,
        "key": "k1",
        "at": (T0 + timedelta(hours=1)).isoformat(),
        "point": "access",
        "signature": "Eicar-Signature",
        "pec_msgid": "opec-1@pec.test",
        "sender": "alice@pec.test",
        "recipients": ["bob@pec.test", "carol@pec.other"],
        "size": 101,
        "sha256": hashlib.sha256(ODD[:101]).hexdigest(),
    }


def test_purge_goes_with_the_log_and_not_before_its_events(db: Backend, signer: KeySigner) -> None:
    """One event a month, sealed an hour later; a straggler of month 1 committed late, so the
    month-2 seal holds it. Purged at month 32, the log drops the seals of months 0 and 1 (cutoff
    month 2) but keeps the straggler: a virus row after it stays, though older than the cutoff."""

    async def main_(d: Database) -> list[Any]:
        for month in range(6):
            await event_at(d, after(month))
            await keep(d, f"v{month}", after(month, 1))
            if month == 1:
                await keep(d, "v1-early", after(1, 10))
                await keep(d, "v1-late", after(1, 45))
            if month == 2:
                await event_at(d, after(1, 30))  # the straggler
            await seals.seal_pending(d, signer, now=after(month, 60), node="n")
        out: list[Any] = [await kept_times(d)]
        out.append(await seals.purge(d, signer, now=after(32), retention_months=30))
        out.append(await kept_times(d))
        out.append(await seals.purge(d, signer, now=after(32), retention_months=30))
        out.append(await kept_times(d))
        out.append(await seals.purge(d, signer, now=after(33), retention_months=30))
        out.append(await kept_times(d))
        report = await seals.verify(d, now=after(33), unsealed_grace=timedelta(minutes=5))
        out.append(report.ok)
        return out

    before, removed, first, again, same, removed2, second, ok = db.run(main_)
    assert len(before) == 8
    assert removed == (2, 2)  # the month-0 and month-1 events; the straggler stays
    # v0 and v1-early are older than every event left; v1 (month 1 + 1 min) too.
    assert first == [after(1, 45), *(after(m, 1) for m in range(2, 6))]
    assert again == (0, 0) and same == first
    assert removed2 == (1, 2)  # the month-2 seal: its event and the straggler
    assert second == [after(m, 1) for m in range(3, 6)]
    assert ok


def test_purge_with_nothing_sealed_to_remove(db: Backend, signer: KeySigner) -> None:
    """No seal old enough (an empty log here): rows past the cutoff go all the same."""

    async def main_(d: Database) -> list[Any]:
        await keep(d, "old", after(0))
        await keep(d, "young", after(2))
        with pytest.raises(ValueError, match="30 months"):
            await seals.purge(d, signer, now=after(31), retention_months=24)
        kept = await kept_times(d)
        removed = await seals.purge(d, signer, now=after(31), retention_months=30)
        return [kept, removed, await kept_times(d)]

    kept, removed, left = db.run(main_)
    assert kept == [after(0), after(2)]
    assert removed == (0, 0) and left == [after(2)]


# --- pecd virus -----------------------------------------------------------------------------------


@pytest.fixture
def config(db: Backend, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    """An installation whose database is the test's; three messages kept, one of them ODD."""
    monkeypatch.setenv("COLUMNS", "250")  # the table unwrapped
    inst = tmp_path / "inst"
    asyncio.run(
        init_installation(inst, domain="pec.test", name="Test PEC", clock=SystemClock(), demo=False)
    )
    path = inst / "pecd.toml"
    text = path.read_text("utf-8")
    path.write_text(
        text.replace('data_dir = "data"', f'data_dir = "data"\ndatabase_url = "{db.url}"', 1),
        "utf-8",
    )

    async def fill(d: Database) -> None:
        await keep(d, "a:virus", T0, ODD)
        await keep(d, "b:virus", T0 + timedelta(hours=1), b"x" * 10, point="reception")
        await keep(d, "c:virus", T0 + timedelta(hours=2), b"\r\n", msgid=None, recipients=())

    db.run(fill)
    return str(path)


def run(config: str, *args: str) -> int:
    return main(["virus", args[0], "-c", config, *args[1:]])


def test_cli_list(config: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert run(config, "list", "--json") == 0
    rows = json.loads(capsys.readouterr().out)
    assert [(r["id"], r["point"], r["size"]) for r in rows] == [
        (1, "access", len(ODD)),
        (2, "reception", 10),
        (3, "access", 2),
    ]
    assert rows[0]["sha256"] == hashlib.sha256(ODD).hexdigest() and "data" not in rows[0]
    since, until = (T0 + timedelta(minutes=30)).isoformat(), (T0 + timedelta(hours=2)).isoformat()
    assert run(config, "list", "--json", "--since", since, "--until", until) == 0
    assert [r["id"] for r in json.loads(capsys.readouterr().out)] == [2]
    assert run(config, "list") == 0
    out = capsys.readouterr().out
    assert "Virus store" in out and "pec msgid" in out and "recipients" in out
    assert "Eicar-Signature" in out and "bob@pec.test, carol@pec.other" in out
    assert T0.isoformat() in out and str(len(ODD)) in out


def test_cli_show(config: str, capsysbinary: pytest.CaptureFixture[bytes]) -> None:
    assert run(config, "show", "1") == 0
    out = capsysbinary.readouterr().out.decode()
    assert f"sha256:     {hashlib.sha256(ODD).hexdigest()}" in out
    assert "signature:  Eicar-Signature" in out and "intact:     yes" in out
    assert run(config, "show", "1", "--raw") == 0
    assert capsysbinary.readouterr().out == ODD  # byte for byte
    assert run(config, "show", "1", "--json") == 0
    assert json.loads(capsysbinary.readouterr().out)["intact"] is True
    assert run(config, "show", "9") == 1
    assert b"no infected message 9" in capsysbinary.readouterr().err


def test_cli_export_one_and_all(config: str, tmp_path: Path) -> None:
    one = tmp_path / "one.eml"
    assert run(config, "export", "1", "-o", str(one)) == 0
    assert one.read_bytes() == ODD
    assert run(config, "export", "9", "-o", str(one)) == 1
    assert run(config, "export", "-o", str(one)) == 1  # neither ID nor --all
    assert run(config, "export", "1", "--all", "-o", str(one)) == 1

    out = tmp_path / "all"
    assert run(config, "export", "--all", "-o", str(out)) == 0
    index = [json.loads(x) for x in (out / INDEX).read_text("utf-8").splitlines()]
    assert [r["file"] for r in index] == ["1.eml", "2.eml", "3.eml"]
    assert sorted(p.name for p in out.iterdir()) == ["1.eml", "2.eml", "3.eml", "index.jsonl"]
    for r in index:
        data = (out / r["file"]).read_bytes()
        assert r["intact"] and len(data) == r["size"]
        assert hashlib.sha256(data).hexdigest() == r["sha256"]
    assert (out / "1.eml").read_bytes() == ODD
    since = (T0 + timedelta(minutes=1)).isoformat()
    assert run(config, "export", "--all", "--since", since, "-o", str(tmp_path / "later")) == 0
    assert sorted(p.name for p in (tmp_path / "later").iterdir()) == [
        "2.eml",
        "3.eml",
        "index.jsonl",
    ]


def test_cli_names_altered_bytes(
    db: Backend, config: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    async def alter(d: Database) -> None:
        async with d.session() as s, s.begin():
            await s.execute(
                update(InfectedMessage).where(InfectedMessage.id == 2).values(data=b"y" * 10)
            )

    db.run(alter)
    assert run(config, "show", "2") == 1
    assert "intact:     NO" in capsys.readouterr().out
    assert run(config, "export", "--all", "-o", str(tmp_path / "all")) == 1
    assert "1 of them do not match" in capsys.readouterr().err


def test_cli_log_purge_takes_the_virus_store_along(db: Backend, config: str) -> None:
    now = SystemClock().now()

    async def fill(d: Database) -> None:
        await keep(d, "old:virus", seals.months_before(now, 31))
        await keep(d, "recent:virus", seals.months_before(now, 29))

    async def left(d: Database) -> list[str]:
        async with d.read_session() as s:
            return list((await s.scalars(select(InfectedMessage.key))).all())

    db.run(fill)
    assert main(["log", "purge", "-c", config]) == 0
    # The 31-month-old one is past 30 months, and no event is older than it (the fixture's
    # three, from T0, go too if the clock says T0 is 30 months ago).
    young = [k for k in ("a:virus", "b:virus", "c:virus") if seals.months_before(now, 30) <= T0]
    assert sorted(db.run(left)) == sorted([*young, "recent:virus"])


def test_hostile_text_is_kept_as_the_trace_log_keeps_it(db: Backend) -> None:
    """An envelope sender with a NUL or a lone surrogate (from hostile SMTP bytes) must not
    make the database refuse the row: the job would never end."""

    async def main(d: Database) -> list[Any]:
        await d.write(
            lambda s: virus.keep_sync(
                s,
                key="k-nul",
                at=T0,
                point="reception",
                signature="Eicar\x00",
                pec_msgid=None,
                sender="a\x00b@x.example",
                recipients=["bob@pec.test", "\udc80@x"],
                data=b"raw\x00bytes",
            )
        )
        async with d.read_session() as s:
            return await virus.list_kept(s)

    [kept] = db.run(main)
    assert kept.sender == "a\ufffdb@x.example" and "\x00" not in kept.signature
