"""Crash test: SIGKILL pecd while clients submit, restart it, and count receipts exactly."""

from __future__ import annotations

import asyncio
import collections
import contextlib
import signal
import smtplib
import ssl
import threading
from pathlib import Path

import pytest

from helpers import DOMAIN, PASSWORD, install, start, wait_for
from pecd.mailbox.maildir import MaildirStore
from pecd.pec.classify import classify

pytestmark = pytest.mark.slow

CLIENTS = 4
# Acknowledged messages before the kill: the clients are well under way, jobs are in flight.
LOADED = 40


def test_sigkill_mid_run_loses_and_duplicates_nothing(
    tmp_path: Path, db_url_for_e2e: str | None
) -> None:
    cfg = asyncio.run(install(tmp_path / "inst", db_url_for_e2e))
    assert cfg.tls.ca is not None and cfg.listeners.smtps is not None
    log = tmp_path / "pecd.log"
    proc = start(cfg, log)
    ctx = ssl.create_default_context(cafile=str(cfg.tls.ca))
    accepted: list[str] = []
    lock = threading.Lock()
    stop = threading.Event()
    alice, bob, carol = (f"{u}@{DOMAIN}" for u in ("alice", "bob", "carol"))

    def client(n: int) -> None:
        i = 0
        while not stop.is_set():
            try:
                with smtplib.SMTP_SSL(
                    "127.0.0.1", cfg.listeners.smtps.port, context=ctx, timeout=10
                ) as smtp:  # type: ignore[union-attr]
                    smtp.login(alice, PASSWORD)
                    while not stop.is_set():
                        mid = f"<crash-{n}-{i}@client.example>"
                        i += 1
                        raw = (
                            f"From: {alice}\r\nTo: {bob}\r\nCc: {carol}\r\nSubject: crash {n}-{i}\r\n"
                            f"Message-ID: {mid}\r\n\r\nbody\r\n"
                        ).encode()
                        smtp.sendmail(alice, [bob, carol], raw)
                        with lock:
                            accepted.append(mid)  # got 250
            except (OSError, smtplib.SMTPException):
                stop.wait(0.05)  # server gone: try again until told to stop

    threads = [threading.Thread(target=client, args=(n,)) for n in range(CLIENTS)]
    for t in threads:
        t.start()
    try:
        wait_for(lambda: len(accepted) >= LOADED, 60, f"{LOADED} acknowledged", interval=0.02)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        stop.set()
        for t in threads:
            t.join(30)
    n_accepted = len(accepted)
    assert n_accepted > 5, "too few messages got through before the kill to test anything"

    proc = start(cfg, log)
    store = MaildirStore(cfg.maildir_root)

    def tally() -> tuple[
        collections.Counter[tuple[str, str]], collections.Counter[tuple[str, str]]
    ]:
        receipts: collections.Counter[tuple[str, str]] = collections.Counter()
        envelopes: collections.Counter[tuple[str, str]] = collections.Counter()
        for path in store.list_folder(alice):
            c = classify(path.read_bytes())
            assert c.daticert is not None and c.ricevuta is not None
            who = c.daticert.consegna or ""
            receipts[(c.daticert.msgid or "", f"{c.ricevuta.value}:{who}")] += 1
        for user in (bob, carol):
            for path in store.list_folder(user):
                c = classify(path.read_bytes())
                assert c.daticert is not None
                envelopes[(c.daticert.msgid or "", user)] += 1
        return receipts, envelopes

    def all_receipts() -> bool:
        receipts, _ = tally()
        return all(
            receipts[(mid, "accettazione:")] >= 1
            and receipts[(mid, f"avvenuta-consegna:{bob}")] >= 1
            and receipts[(mid, f"avvenuta-consegna:{carol}")] >= 1
            for mid in accepted
        )

    # 120 s at most; then the counts below name what is missing.
    try:
        with contextlib.suppress(AssertionError):
            wait_for(all_receipts, 120, "every receipt of the acknowledged messages", interval=0.5)
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0, log.read_text()[-3000:]
    receipts, envelopes = tally()

    missing = [mid for mid in accepted if receipts[(mid, "accettazione:")] == 0]
    assert not missing, f"{len(missing)} of {n_accepted} accepted messages lost their accettazione"
    for mid in accepted:
        assert receipts[(mid, f"avvenuta-consegna:{bob}")] == 1, mid
        assert receipts[(mid, f"avvenuta-consegna:{carol}")] == 1, mid
        assert envelopes[(mid, bob)] == 1 and envelopes[(mid, carol)] == 1, mid
    # No duplicates at all, also for messages that were committed but never acknowledged.
    assert max(receipts.values()) == 1, [k for k, v in receipts.items() if v > 1]
    assert max(envelopes.values()) == 1, [k for k, v in envelopes.items() if v > 1]
    print(
        f"crash test: {n_accepted} messages acknowledged before SIGKILL, all receipts exactly once"
    )
