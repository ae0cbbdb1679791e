"""The mail log and the metrics port (runtime/observe.py, runtime/metrics.py): a PEC end to end
through a real provider, then the mail log's lines against the trace log, and the real `curl` on
the metrics port."""

from __future__ import annotations

import asyncio
import json
import re
import shutil
import smtplib
import socket
import subprocess
from collections import Counter
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import pytest
from sqlalchemy import select
from sqlalchemy.orm import Session

from helpers import DOMAIN, PASSWORD, AppThread, client_tls, install_e2e, message, wait_for
from helpers import wait_settled as settled
from pecd.engine.vocab import TraceEventData
from pecd.runtime.observe import Committed, format_line, serving
from pecd.store.db import Database, migrate_async
from pecd.store.models import TraceEvent
from pecd.store.trace import record_sync

CURL = shutil.which("curl")


@pytest.fixture
def server(tmp_path: Path, db_url_for_e2e: str | None) -> Iterator[AppThread]:
    extra = (
        f'\n[log]\nmail_log = "{tmp_path / "mail.log"}"\nmail_log_format = "json"\n'
        '\n[metrics]\nlisten = "127.0.0.1:0"\nqueue_cache_seconds = 0\n'
    )
    cfg = asyncio.run(install_e2e(tmp_path / "inst", db_url_for_e2e, extra=extra))
    srv = AppThread(cfg).start()
    try:
        yield srv
    finally:
        srv.stop()


def curl(port: int, path: str) -> tuple[int, str]:
    assert CURL is not None
    out = subprocess.run(
        [CURL, "-s", "-m", "10", "-w", "\n%{http_code}", f"http://127.0.0.1:{port}{path}"],
        capture_output=True,
        text=True,
        timeout=20,
        check=False,
    ).stdout
    body, _, code = out.rpartition("\n")
    return int(code or 0), body


def sample(text: str, name: str, **labels: str) -> float:
    """The value of one sample of the exposition ``text`` (0 when absent)."""
    want = ",".join(f'{k}="{v}"' for k, v in labels.items())
    for line in text.splitlines():
        m = re.fullmatch(r"([a-z_]+)(?:\{(.*)\})? (\S+)", line)
        if m and m[1] == name and (m[2] or "") == want:
            return float(m[3])
    return 0.0


@pytest.mark.slow  # about 6 s a database: a whole provider starts
@pytest.mark.skipif(CURL is None, reason="curl not installed")
def test_a_pec_end_to_end_moves_the_metrics_and_writes_one_mail_log_line_per_event(
    server: AppThread, tmp_path: Path
) -> None:
    assert server.app is not None and server.app.metrics is not None
    port = server.app.metrics.port
    assert curl(port, "/healthz") == (200, "ok\n")
    assert curl(port, "/readyz") == (200, "ready\n")
    code, before = curl(port, "/metrics")
    assert code == 200
    accepted0 = sample(before, "pecd_messages_accepted_total")
    delivered0 = sample(before, "pecd_deliveries_total", outcome="delivered")

    alice, bob, carol = (f"{u}@{DOMAIN}" for u in ("alice", "bob", "carol"))
    with smtplib.SMTP_SSL(
        "127.0.0.1", server.port("smtps"), context=client_tls(server.cfg)
    ) as smtp:
        smtp.login(alice, PASSWORD)
        smtp.sendmail(alice, [bob, carol], message(alice, [bob], [carol], "Metriche"))
    with (
        smtplib.SMTP_SSL("127.0.0.1", server.port("smtps"), context=client_tls(server.cfg)) as smtp,
        pytest.raises(smtplib.SMTPAuthenticationError),
    ):
        smtp.login(bob, "not the password")
    settled(server)

    def after() -> str:
        code, text = curl(port, "/metrics")
        moved = sample(text, "pecd_deliveries_total", outcome="delivered") >= delivered0 + 2
        return text if code == 200 and moved else ""

    text = wait_for(after, 20, "the delivery counter moved")
    assert sample(text, "pecd_messages_accepted_total") == accepted0 + 1
    failed = [ln for ln in text.splitlines() if ln.startswith("pecd_logins_failed_total{")]
    assert sum(float(ln.split()[-1]) for ln in failed) >= 1, failed
    assert sample(text, "pecd_receipts_total", kind="accettazione") >= 1
    # The queue depth gauges, read from the jobs table: nothing is left to do.
    assert "# TYPE pecd_queue_jobs gauge" in text
    assert 'pecd_queue_jobs{kind="delivery",state="ready"} 0.0' in text
    assert 'pecd_queue_jobs{kind="relay",state="parked"} 0.0' in text
    assert 'pecd_stage_seconds_count{kind="submission"}' in text
    assert 'pecd_job_age_seconds_count{kind="delivery"}' in text

    # The mail log: one JSON line per event of the trace log, and nothing else.
    async def trace() -> list[tuple[str, str | None]]:
        assert server.app is not None and server.app.runner is not None
        async with server.app.runner.db.read_session() as s:
            rows = await s.execute(select(TraceEvent.event, TraceEvent.pec_msgid))
            return [(e, m) for e, m in rows.all()]

    events = server.call(trace())
    log_path = tmp_path / "mail.log"

    def written() -> list[str]:
        ls = log_path.read_text("utf-8").splitlines()
        return ls if len(ls) >= len(events) else []

    lines: list[str] = wait_for(written, 10, "every event in the mail log")
    logged = [json.loads(line) for line in lines]
    assert Counter((e["event"], e["pec_msgid"]) for e in logged) == Counter(events)
    by_event: dict[str, list[dict[str, object]]] = {}
    for e in logged:
        by_event.setdefault(str(e["event"]), []).append(e)
    (acc,) = by_event["accettazione"]
    assert acc["status"] == "accepted" and acc["from"] == alice
    assert acc["client_msgid"] == "<test-Metriche@client.example>"
    assert sorted(map(str, acc["to"])) == [bob, carol]  # type: ignore[call-overload]
    pec_msgid = acc["pec_msgid"]
    delivered = by_event["avvenuta-consegna"]
    assert sorted(str(d["to"]) for d in delivered) == [str([bob]), str([carol])]
    assert all(d["status"] == "delivered" and d["pec_msgid"] == pec_msgid for d in delivered)

    # Garbage on the metrics port is answered and breaks nothing.
    for junk in (b"\x00\xff\xfegarbage\r\n\r\n", b"POST /metrics HTTP/1.1\r\n\r\n", b"A" * 20000):
        with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
            sock.sendall(junk)
            sock.shutdown(socket.SHUT_WR)
            answer = sock.recv(1000)
        assert answer.split(b" ", 2)[1] in (b"400", b"431"), answer
    assert curl(port, "/nothing")[0] == 404
    assert curl(port, "/healthz") == (200, "ok\n")


def test_events_rolled_back_are_never_observed(tmp_path: Path) -> None:
    async def main() -> list[list[str]]:
        url = f"sqlite:///{tmp_path / 'pecd.db'}"
        await migrate_async(url)
        db = await Database.open(url)
        seen: list[list[str]] = []
        hook = Committed(db, [lambda rows: seen.append([str(r["event"]) for r in rows])])
        hook.install()
        try:

            def event(name: str) -> TraceEventData:
                return TraceEventData(at=datetime.now(UTC), event=name, pec_msgid="x@y")

            def fails(s: Session) -> None:
                record_sync(s, event("rolled-back"))
                raise RuntimeError("boom")

            with pytest.raises(RuntimeError):
                await db.write(fails)

            def commits(s: Session) -> None:
                record_sync(s, event("a"))
                record_sync(s, event("b"))

            await db.write(commits)
            await asyncio.sleep(0.05)  # the rows come back to the loop from the writer thread
        finally:
            hook.remove()
            await db.close()
        return seen

    assert asyncio.run(main()) == [["a", "b"]]


def test_text_lines_are_key_value_and_quote_what_needs_it() -> None:
    row = {
        "at": datetime(2026, 12, 1, 1, 0, tzinfo=UTC),
        "event": "errore-consegna",
        "pec_msgid": "opec.1@pec.example.test",
        "client_msgid": None,
        "sender": "alice@pec.example.test",
        "recipients": [{"address": "bob@x.test"}, {"address": "carol@x.test"}],
        "data": {"consegna": "bob@x.test"},
        "error": '5.1.1 no "such" user\nnext',
    }
    line = format_line(row, "text")
    assert line == (
        "at=2026-12-01T01:00:00+00:00 event=errore-consegna status=not-delivered"
        " pec_msgid=opec.1@pec.example.test from=alice@pec.example.test to=bob@x.test"
        ' error="5.1.1 no \\"such\\" user\\nnext"'
    )
    assert "\n" not in line
    assert json.loads(format_line(row, "json"))["to"] == ["bob@x.test"]


def test_not_ready_once_the_listeners_are_closed() -> None:
    class Access:
        servers: dict[str, asyncio.Server]

    async def main() -> list[bool]:
        access = Access()
        access.servers = {"smtps": await asyncio.start_server(lambda r, w: None, "127.0.0.1", 0)}
        seen = [serving(access, None)]
        access.servers["smtps"].close()
        await access.servers["smtps"].wait_closed()
        return [*seen, serving(access, None)]

    assert asyncio.run(main()) == [True, False]
