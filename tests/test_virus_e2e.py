"""The antivirus end to end with a real clamd (issue 12): an infected submission gets one virus
non-accettazione and goes nowhere; while clamd is down nothing is accepted unscanned, and the
message goes through once it is back; what was found is in `pecd virus list`."""

from __future__ import annotations

import asyncio
import base64
import json
import smtplib
import subprocess
from pathlib import Path
from typing import Any

import pytest

from helpers import (
    DOMAIN,
    PASSWORD,
    AppThread,
    RunningClamd,
    clamd_fixture,
    client_tls,
    fetch_all,
    install_e2e,
    message,
    openssl_verify,
    pending_jobs,
    wait_for,
    wait_settled,
)
from pecd.antivirus.clamd import clamd_binary, write_clamd
from pecd.antivirus.testsigs import EICAR
from pecd.cli import main
from pecd.pec.classify import classify
from pecd.pec.vocab import Errore, Ricevuta

__all__ = ["clamd_fixture"]  # the session clamd, as the fixture `clamd`

ALICE, BOB = f"alice@{DOMAIN}", f"bob@{DOMAIN}"
LIMIT = "8M"  # the session clamd is set up for messages up to 8 MiB


def antivirus(socket: Path) -> str:
    """Lines for install_e2e's ``extra``: they land in its [limits] section, then ours."""
    return f'max_message_size = "{LIMIT}"\n\n[antivirus]\nenabled = true\nsocket = "{socket}"\n'


def infected(subject: str) -> bytes:
    """A message with the EICAR test file as a base64 attachment (clamd decodes it)."""
    attachment = base64.encodebytes(EICAR).decode()
    body = (
        'Content-Type: multipart/mixed; boundary="b1"\r\nMIME-Version: 1.0\r\n\r\n'
        "--b1\r\nContent-Type: text/plain\r\n\r\nin allegato\r\n"
        '--b1\r\nContent-Type: application/octet-stream\r\nContent-Disposition: attachment; filename="x.com"\r\n'
        f"Content-Transfer-Encoding: base64\r\n\r\n{attachment}\r\n--b1--\r\n"
    )
    head = message(ALICE, [BOB], [], subject).split(b"\r\n\r\n", 1)[0]
    head = b"\r\n".join(
        line for line in head.split(b"\r\n") if not line.lower().startswith((b"content-", b"mime-"))
    )
    return head + b"\r\n" + body.encode()


def submit(srv: AppThread, raw: bytes) -> None:
    with smtplib.SMTP_SSL("127.0.0.1", srv.port("smtps"), context=client_tls(srv.cfg)) as smtp:
        smtp.login(ALICE, PASSWORD)
        smtp.sendmail(ALICE, [BOB], raw)


def test_an_infected_submission_gets_one_virus_non_accettazione(
    tmp_path: Path,
    db_url_for_e2e: str | None,
    clamd: RunningClamd,
    capsys: pytest.CaptureFixture[str],
) -> None:
    cfg = asyncio.run(install_e2e(tmp_path / "inst", db_url_for_e2e, extra=antivirus(clamd.socket)))
    srv = AppThread(cfg).start()
    try:
        submit(srv, infected("Fattura"))
        submit(srv, message(ALICE, [BOB], [], "Pulito"))
        wait_settled(srv)
        inbox = [classify(m) for m in fetch_all(srv, "alice")]
        refused = [c for c in inbox if c.ricevuta is Ricevuta.NON_ACCETTAZIONE]
        assert len(refused) == 1
        d = refused[0].daticert
        assert d is not None and d.errore is Errore.VIRUS and d.oggetto == "Fattura"
        assert refused[0].virus  # X-VerificaSicurezza: errore
        # The clean one went through as usual.
        assert sorted(c.ricevuta.value for c in inbox if c.ricevuta) == [
            "accettazione",
            "avvenuta-consegna",
            "non-accettazione",
        ]
        # Nothing of the infected one delivered: bob has only the clean envelope.
        [envelope] = [classify(m) for m in fetch_all(srv, "bob")]
        assert envelope.daticert is not None and envelope.daticert.oggetto == "Pulito"
        ca = cfg.tls.ca
        assert ca is not None
        for raw in fetch_all(srv, "alice"):
            openssl_verify(raw, ca, tmp_path)
    finally:
        srv.stop()
    # Kept in the virus store, byte-exact, and listed.
    assert main(["virus", "list", "--json", "-c", str(tmp_path / "inst/pecd.toml")]) == 0
    [kept] = json.loads(capsys.readouterr().out)
    assert kept["point"] == "access" and kept["signature"].startswith("Eicar-Test-Signature")
    assert kept["sender"] == ALICE


@pytest.mark.slow
def warnings_of(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if "waits: ScannerUnavailable" in r.getMessage()]


def test_while_clamd_is_down_nothing_goes_through_unscanned(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], caplog: pytest.LogCaptureFixture
) -> None:
    """Submissions wait (their jobs are retried) while the scanner cannot answer, and go
    through once it is back; none is accepted or delivered unscanned."""
    program = clamd_binary()
    assert program is not None, "clamd is not installed: run scripts/setup"
    files = write_clamd(tmp_path / "clamd", max_scan_size=8 * 1024 * 1024)
    cfg = asyncio.run(
        install_e2e(
            tmp_path / "inst",
            None,
            extra=antivirus(files.socket),
            queue="max_attempts = 2\nmax_delay_seconds = 0.3",
        )
    )
    srv = AppThread(cfg).start()
    clamd = None
    try:
        submit(srv, message(ALICE, [BOB], [], "Attende"))
        # The submission stays queued, retried again and again (far more than max_attempts: a
        # wait is no attempt, so it is never parked), with nothing sent or delivered, and the
        # reason shows in `pecd queue list`.
        wait_for(lambda: "submission" in pending_jobs(srv), 10, "the submission waiting")
        conf = str(tmp_path / "inst/pecd.toml")

        def waiting_row() -> dict[str, Any] | None:
            capsys.readouterr()
            assert main(["queue", "list", "--json", "-c", conf]) == 0
            rows = json.loads(capsys.readouterr().out)
            return next((r for r in rows if "ScannerUnavailable" in (r["last_error"] or "")), None)

        wait_for(waiting_row, 10, "the wait shown in pecd queue list")
        retries = len(warnings_of(caplog))
        wait_for(lambda: len(warnings_of(caplog)) >= retries + 4, 20, "more tries")
        row = waiting_row()
        assert row is not None and row["state"] != "parked" and row["attempts"] <= 1
        assert fetch_all(srv, "alice") == [] and fetch_all(srv, "bob") == []
        clamd = subprocess.Popen(
            [program, "-c", str(files.config)],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        inbox = wait_for(lambda: len(m := fetch_all(srv, "alice")) >= 2 and m, 60, "receipts")
        kinds = sorted(c.ricevuta.value for c in map(classify, inbox) if c.ricevuta)
        assert kinds == ["accettazione", "avvenuta-consegna"]
        assert len(fetch_all(srv, "bob")) == 1
    finally:
        srv.stop()
        if clamd is not None:
            clamd.terminate()
            clamd.wait(10)
