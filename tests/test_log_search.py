"""`pecd log search` and `pecd log export`: a holder's extract of the trace log."""

from __future__ import annotations

import asyncio
import csv
import json
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from pecd.cli import main
from pecd.clock import SystemClock
from pecd.config import load_config
from pecd.devinit import init_installation
from pecd.store.db import Database
from pecd.store.trace import TraceEventData, record_sync

T0 = datetime(2026, 6, 1, 12, 0, tzinfo=UTC)


@pytest.fixture
def config(tmp_path: Path) -> str:
    result = asyncio.run(
        init_installation(
            tmp_path / "inst", domain="pec.test", name="Test PEC", clock=SystemClock()
        )
    )
    cfg = load_config(result.config)

    async def fill() -> None:
        db = await Database.open(cfg.database_url)
        try:
            events = [
                TraceEventData(
                    at=T0 + timedelta(minutes=i),
                    event="accettazione" if i % 2 else "avvenuta-consegna",
                    pec_msgid=f"m{i // 2}@pec.test",
                    client_msgid=f"<c{i // 2}@client>",
                    sender="alice@pec.test" if i < 20 else "bob@pec.test",
                    recipients=[{"address": f"r{i % 3}@pec.test", "tipo": "certificato"}],
                    subject=f"Fattura n. {i}" if i % 5 == 0 else f"Oggetto {i}",
                )
                for i in range(40)
            ]
            async with db.session() as s, s.begin():
                await s.run_sync(lambda sync: [record_sync(sync, e) for e in events])
        finally:
            await db.close()

    asyncio.run(fill())
    return str(result.config)


def search(config: str, capsys: pytest.CaptureFixture[str], *args: str) -> list[dict[str, object]]:
    assert main(["log", "search", "-c", config, "--json", *args]) == 0
    rows: list[dict[str, object]] = json.loads(capsys.readouterr().out)
    return rows


def test_search_by_every_key(config: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert [r["event"] for r in search(config, capsys, "--msgid", "m3@pec.test")] == [
        "avvenuta-consegna",
        "accettazione",
    ]
    assert len(search(config, capsys, "--client-msgid", "c3@client")) == 2
    assert len(search(config, capsys, "--sender", "BOB@pec.test")) == 20
    assert len(search(config, capsys, "--recipient", "r1@pec.test")) == 13
    assert [r["subject"] for r in search(config, capsys, "--subject", "fattura")] == [
        f"Fattura n. {i}" for i in range(0, 40, 5)
    ]
    assert (
        len(search(config, capsys, "--event", "accettazione", "--sender", "alice@pec.test")) == 10
    )
    since, until = (
        (T0 + timedelta(minutes=10)).isoformat(),
        (T0 + timedelta(minutes=15)).isoformat(),
    )
    assert [r["id"] for r in search(config, capsys, "--since", since, "--until", until)] == [
        11,
        12,
        13,
        14,
        15,
    ]
    assert main(["log", "search", "-c", config, "--sender", "alice@pec.test"]) == 0
    assert "Trace log" in capsys.readouterr().out  # the table


def test_export_jsonl_and_csv(
    config: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "extract.jsonl"
    assert main(["log", "export", "-c", config, "--sender", "alice@pec.test", "-o", str(out)]) == 0
    lines = [json.loads(x) for x in out.read_text("utf-8").splitlines()]
    assert len(lines) == 20 and {x["sender"] for x in lines} == {"alice@pec.test"}
    assert lines[0]["recipients"] == [{"address": "r0@pec.test", "tipo": "certificato"}]
    out_csv = tmp_path / "extract.csv"
    assert (
        main(
            [
                "log",
                "export",
                "-c",
                config,
                "--format",
                "csv",
                "--event",
                "accettazione",
                "-o",
                str(out_csv),
            ]
        )
        == 0
    )
    with out_csv.open(encoding="utf-8", newline="") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 20 and rows[0]["event"] == "accettazione"
    assert json.loads(rows[0]["recipients"])[0]["address"] == "r1@pec.test"
