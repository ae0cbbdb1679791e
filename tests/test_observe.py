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
from prometheus_client import REGISTRY
from sqlalchemy import select
from sqlalchemy.orm import Session

from helpers import DOMAIN, PASSWORD, AppThread, client_tls, install_e2e, message, wait_for
from helpers import wait_settled as settled
from pecd.config import load_config
from pecd.engine.vocab import TraceEventData
from pecd.runtime import diskspace
from pecd.runtime.observe import (
    Committed,
    MailLog,
    Refusal,
    RefusalLog,
    committed,
    format_line,
    render,
    serving,
    split_reply,
)
from pecd.runtime.refusals import path_of
from pecd.runtime.smtp import Reply
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


def test_rows_committed_without_a_session_are_observed_once_handed_over(tmp_path: Path) -> None:
    """PostgreSQL's one-statement commits (store/pgfast.py) bypass the sessions: their writer
    hands the rows inserted to observe.committed, and the sinks see them as a session's."""

    async def main() -> list[list[str]]:
        url = f"sqlite:///{tmp_path / 'pecd.db'}"
        await migrate_async(url)
        db = await Database.open(url)
        seen: list[list[str]] = []
        try:
            committed(db, [{"event": "before"}])  # no hook installed: nothing
            hook = Committed(db, [lambda rows: seen.append([str(r["event"]) for r in rows])])
            hook.install()
            committed(db, [{"event": "a"}, {"event": "b"}])
            committed(db, [])
            hook.remove()
            committed(db, [{"event": "after"}])
        finally:
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


# --- SMTP refusals: one mail log line each, rate-safe, counted ------------------------------------


def refusal(reply: str, command: str = "RCPT", **kw: object) -> Refusal:
    base: dict[str, object] = dict(
        at=datetime(2026, 12, 1, 3, 0, tzinfo=UTC),
        point="reception",
        command=command,
        client="192.0.2.7",
        user=None,
        sender="mario@esterno.example",
        recipients=("x@altrove.example",),
        reply=reply,
    )
    return Refusal(**{**base, **kw})  # type: ignore[arg-type]


def test_a_refusal_line_says_who_what_and_why() -> None:
    assert split_reply(Reply.RELAY_DENIED) == (
        "550",
        "5.7.1",
        "Relaying denied: not a domain of this provider",
    )
    assert split_reply("500 Line too long (see RFC5321 4.5.3.1.6)") == (
        "500",
        "",
        "Line too long (see RFC5321 4.5.3.1.6)",
    )
    f = refusal(Reply.RELAY_DENIED).fields()
    assert f == {
        "at": "2026-12-01T03:00:00+00:00",
        "event": "smtp-refused",
        "status": "refused",
        "point": "reception",
        "command": "RCPT",
        "client": "192.0.2.7",
        "user": "",
        "from": "mario@esterno.example",
        "to": ["x@altrove.example"],
        "code": "550",
        "enhanced": "5.7.1",
        "reason": "Relaying denied: not a domain of this provider",
    }
    # A client's odd address is quoted in a text line, never a line break of its own.
    line = render(refusal("553 5.1.3 Not a valid mail address", sender='a "b"\nc').fields(), "text")
    assert "\n" not in line and 'from="a \\"b\\"\\nc"' in line
    assert path_of("FROM:<alice@pec.example.test> SIZE=100", "FROM:") == "alice@pec.example.test"
    assert path_of("to: bob@x.test", "TO:") == "bob@x.test"
    assert path_of("", "TO:") == ""


def test_a_flood_of_refusals_is_a_bounded_number_of_lines(tmp_path: Path) -> None:
    now = [0.0]
    path = tmp_path / "mail.log"
    mail_log = MailLog(str(path), "json")
    limited = RefusalLog(mail_log, burst=3, interval=60, clock=lambda: now[0])
    try:
        for i in range(1000):
            limited.write(refusal(Reply.TEMP_FAILURE if i % 2 else Reply.RELAY_DENIED))
        lines = [json.loads(x) for x in path.read_text("utf-8").splitlines()]
        assert len(lines) == 3 and all(x["status"] == "refused" for x in lines)
        now[0] += 61  # the next interval: first the count of what was left out
        limited.write(refusal(Reply.SHUTTING_DOWN, command=""))
        lines = [json.loads(x) for x in path.read_text("utf-8").splitlines()]
        assert len(lines) == 5
        assert lines[3] == {
            "at": "2026-12-01T03:00:00+00:00",
            "event": "smtp-refused",
            "status": "suppressed",
            "suppressed": 997,
            "codes": "451:499,550:498",
        }
        assert (lines[4]["code"], lines[4]["enhanced"], lines[4]["command"]) == ("421", "4.3.2", "")
    finally:
        mail_log.close()
    assert len(path.read_text("utf-8").splitlines()) == 5  # nothing left out: no summary


def test_one_clients_flood_does_not_hide_anothers_refusal(tmp_path: Path) -> None:
    path = tmp_path / "mail.log"
    mail_log = MailLog(str(path), "json")
    limited = RefusalLog(mail_log, burst=10, per_client=3, interval=60, clock=lambda: 0.0)
    try:
        for _ in range(150):
            limited.write(refusal(Reply.RELAY_DENIED, client="198.51.100.9"))
        limited.write(refusal("452 4.3.1 Insufficient system storage", client="192.0.2.7"))
        lines = [json.loads(x) for x in path.read_text("utf-8").splitlines()]
        assert [x["client"] for x in lines] == ["198.51.100.9"] * 3 + ["192.0.2.7"]
        assert lines[-1]["code"] == "452"
        limited.flush()
        summary = json.loads(path.read_text("utf-8").splitlines()[-1])
        assert (summary["status"], summary["suppressed"], summary["codes"]) == (
            "suppressed",
            147,
            "550:147",
        )
    finally:
        mail_log.close()


def test_the_count_of_refusals_left_out_is_written_when_the_interval_ends(tmp_path: Path) -> None:
    """Even if the flood stops there (no refusal comes to end the interval)."""
    path = tmp_path / "mail.log"

    async def main() -> None:
        mail_log = MailLog(str(path), "text")
        limited = RefusalLog(mail_log, burst=1, interval=0.2)
        try:
            for _ in range(4):
                limited.write(refusal(Reply.RELAY_DENIED))
            for _ in range(100):
                if len(path.read_text("utf-8").splitlines()) >= 2:
                    break
                await asyncio.sleep(0.05)
        finally:
            mail_log.close()

    asyncio.run(main())
    lines = path.read_text("utf-8").splitlines()
    assert len(lines) == 2 and "status=suppressed suppressed=3 codes=550:3" in lines[1], lines


@pytest.fixture
def refusing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[AppThread]:
    """A provider with a reception point, a JSON mail log and 64 KB messages at most."""
    extra = (
        'max_message_size = "64K"\n'
        f'\n[log]\nmail_log = "{tmp_path / "mail.log"}"\nmail_log_format = "json"\n'
    )
    directory = tmp_path / "inst"
    asyncio.run(install_e2e(directory, None, extra=extra))
    toml = directory / "pecd.toml"
    text = toml.read_text("utf-8")
    toml.write_text(
        text.replace('hostname = "localhost"', 'hostname = "localhost"\nreception = "127.0.0.1:0"'),
        "utf-8",
    )
    srv = AppThread(load_config(toml)).start()
    try:
        yield srv
    finally:
        if srv.thread.is_alive():
            srv.stop()


def refused_total(point: str, code: str) -> float:
    return REGISTRY.get_sample_value("pecd_smtp_refused_total", {"point": point, "code": code}) or 0


@pytest.mark.slow  # a whole provider starts and stops
def test_smtp_refusals_are_in_the_mail_log_and_counted(
    refusing: AppThread, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    srv = refusing
    alice, bob = f"alice@{DOMAIN}", f"bob@{DOMAIN}"
    before = {
        (p, c): refused_total(p, c)
        for p, c in [("access", "553"), ("access", "452"), ("access", "552"), ("reception", "550")]
    }
    free = {"bytes": 1 << 40}
    monkeypatch.setattr(diskspace, "free_bytes", lambda path: free["bytes"])
    monkeypatch.setattr(diskspace, "PROBE_TTL", 0.0)
    with smtplib.SMTP_SSL("127.0.0.1", srv.port("smtps"), context=client_tls(srv.cfg)) as smtp:
        smtp.login(alice, PASSWORD)
        # Not the authenticated mailbox.
        assert smtp.mail(bob)[0] == 553
        smtp.rset()
        # Too big: refused after the final dot.
        assert smtp.mail(alice)[0] == 250
        assert smtp.rcpt(bob)[0] == 250
        assert smtp.data(message(alice, [bob], [], "Troppo grande", pad=100_000))[0] == 552
        # The data filesystem is full.
        free["bytes"] = 0
        assert smtp.mail(alice)[0] == 452
        free["bytes"] = 1 << 40
    with smtplib.SMTP("127.0.0.1", srv.port("reception"), timeout=30) as smtp:
        smtp.ehlo("mx.esterno.example")
        assert smtp.mail("mario@esterno.example")[0] == 250
        assert smtp.rcpt("x@altrove.example")[0] == 550  # not a domain of ours
        smtp.rset()
    # A session left open when the server stops gets the one 421 of the drain.
    idle = smtplib.SMTP("127.0.0.1", srv.port("reception"), timeout=30)
    idle.ehlo("mx.lento.example")
    srv.stop()
    assert idle.noop()[0] == 421  # the reply read is the 421 sent as the server stopped
    idle.close()

    lines = [json.loads(x) for x in (tmp_path / "mail.log").read_text("utf-8").splitlines()]
    assert all(x["event"] == "smtp-refused" and x["status"] == "refused" for x in lines), lines
    got = [
        (x["point"], x["command"], x["user"], x["from"], x["to"], x["code"], x["enhanced"])
        for x in lines
    ]
    assert got == [
        ("access", "MAIL", alice, bob, [], "553", "5.7.1"),
        ("access", "DATA", alice, alice, [bob], "552", "5.3.4"),
        ("access", "MAIL", alice, alice, [], "452", "4.3.1"),
        ("reception", "RCPT", "", "mario@esterno.example", ["x@altrove.example"], "550", "5.7.1"),
        ("reception", "", "", "", [], "421", "4.3.2"),
    ]
    assert all(x["client"] == "127.0.0.1" and x["reason"] for x in lines)
    assert lines[0]["reason"] == "Sender address does not belong to the authenticated mailbox"
    for (point, code), n in before.items():
        assert refused_total(point, code) == n + 1, (point, code)
