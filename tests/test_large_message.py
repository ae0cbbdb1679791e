"""Large messages through a real `pecd serve` process: memory stays bounded, SIZE is enforced.

Prints the figures it measures (run with ``-s``); docs/performance.md quotes them.
"""

from __future__ import annotations

import asyncio
import base64
import email
import email.policy
import hashlib
import os
import signal
import smtplib
import ssl
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from helpers import (
    DOMAIN,
    PASSWORD,
    RssSampler,
    children,
    install,
    proc_status_kib,
    reset_hwm,
    start,
    wait_for,
    wait_rss_steady,
)
from pecd.config import Config
from pecd.mailbox.maildir import MaildirStore
from pecd.pec.classify import Classification, classify
from pecd.pec.vocab import Kind, Ricevuta, TipoRicevuta

pytestmark = pytest.mark.slow

MiB = 1024 * 1024
ALICE, BOB = f"alice@{DOMAIN}", f"bob@{DOMAIN}"


@dataclass
class Running:
    cfg: Config
    proc: subprocess.Popen[bytes]
    log: Path

    def tls(self) -> ssl.SSLContext:
        assert self.cfg.tls.ca is not None
        return ssl.create_default_context(cafile=str(self.cfg.tls.ca))

    def smtps(self) -> smtplib.SMTP_SSL:
        assert self.cfg.listeners.smtps is not None
        return smtplib.SMTP_SSL(
            "127.0.0.1", self.cfg.listeners.smtps.port, context=self.tls(), timeout=300
        )


def run_pecd(tmp_path: Path, extra_config: str) -> Iterator[Running]:
    cfg = asyncio.run(install(tmp_path / "inst", None, extra_config=extra_config))
    log = tmp_path / "pecd.log"
    proc = start(cfg, log)
    try:
        yield Running(cfg, proc, log)
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            code = proc.wait(60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
            raise
        assert code == 0, log.read_text()[-3000:]


def mime_message(subject: str, attachment: bytes, msgid: str) -> bytes:
    """A message as a mail client writes it: a text part and a base64 PDF attachment."""
    b64 = base64.encodebytes(attachment).replace(b"\n", b"\r\n")
    head = (
        f"From: Alice <{ALICE}>\r\n"
        f"To: Bob <{BOB}>\r\n"
        f"Subject: {subject}\r\n"
        f"Message-ID: {msgid}\r\n"
        "Date: Tue, 24 Nov 2026 10:00:00 +0100\r\n"
        "MIME-Version: 1.0\r\n"
        'Content-Type: multipart/mixed; boundary="=_large_boundary_="\r\n'
        "\r\n"
        "--=_large_boundary_=\r\n"
        "Content-Type: text/plain; charset=utf-8\r\n"
        "Content-Transfer-Encoding: 8bit\r\n"
        "\r\n"
        "In allegato il capitolato di gara.\r\n"
        "\r\n"
        "--=_large_boundary_=\r\n"
        'Content-Type: application/pdf; name="capitolato.pdf"\r\n'
        "Content-Transfer-Encoding: base64\r\n"
        'Content-Disposition: attachment; filename="capitolato.pdf"\r\n'
        "\r\n"
    ).encode()
    return head + b64 + b"\r\n--=_large_boundary_=--\r\n"


def b64_input_size(size: int) -> int:
    """The attachment size whose base64 lines (76 characters + CRLF per 57 bytes) and headers
    make a message of about ``size`` bytes."""
    return size * 57 // 78 - 1024


def attachment_of(raw: bytes) -> bytes:
    msg = email.message_from_bytes(raw, policy=email.policy.default)
    for part in msg.walk():
        if part.get_filename() == "capitolato.pdf":
            payload = part.get_payload(decode=True)
            assert isinstance(payload, bytes)
            return payload
    raise AssertionError("no attachment in the message")


def folder(store: MaildirStore, user: str) -> list[Classification]:
    return [classify(p.read_bytes()) for p in store.list_folder(user)]


def openssl_verifies(path: Path, ca: Path) -> None:
    r = subprocess.run(
        [
            *("openssl", "cms", "-verify", "-inform", "SMIME", "-in", str(path)),
            *("-CAfile", str(ca), "-purpose", "any", "-out", "/dev/null"),
        ],
        capture_output=True,
        text=True,
        check=False,
    )
    assert r.returncode == 0, r.stderr


def mib(kib: int) -> float:
    return kib / 1024


# --- a 25 MB message end to end -------------------------------------------------------------------

MESSAGE_SIZE = 25 * MiB
# How far above idle the peak may go, in copies of the message. Measured on the first 25 MB run
# (Linux, glibc, SQLite): the server process peaked 22.6 copies above idle, its format worker
# 9.5; after the fixes in docs/performance.md, about 10 and 7.7. What remains is mostly the job
# store: SQLite's UPDATE ... RETURNING of a job row with its message costs some 6 copies while
# a job is claimed, and the rest is a few live ones (the job's bytes, the signed envelope, the
# complete receipt, their pickles to and from the format worker). The bounds leave room for
# two workers overlapping and still fail on a return to the old figures.
SERVER_COPIES = 16
WORKER_COPIES = 12


@pytest.fixture
def pecd_default(tmp_path: Path) -> Iterator[Running]:
    yield from run_pecd(tmp_path, "\n[queue]\nbase_delay_seconds = 0.2\n")


def test_25mb_message_goes_through_with_bounded_memory(
    pecd_default: Running, tmp_path: Path
) -> None:
    srv = pecd_default
    pid = srv.proc.pid
    attachment = os.urandom(b64_input_size(MESSAGE_SIZE))
    raw = mime_message("Capitolato di gara", attachment, "<large-25mb@client.example>")
    assert abs(len(raw) - MESSAGE_SIZE) < 64 * 1024, len(raw)
    idle = wait_rss_steady(pid)  # start-up settled (format workers too): the idle figures
    idle_children = {c: proc_status_kib(c, "VmRSS") for c in children(pid)}
    store = MaildirStore(srv.cfg.maildir_root)

    t0 = time.monotonic()
    with RssSampler(pid) as rss:
        with srv.smtps() as smtp:
            smtp.login(ALICE, PASSWORD)
            smtp.sendmail(ALICE, [BOB], raw)
        t_accepted = time.monotonic() - t0

        def receipts() -> dict[Ricevuta, Classification] | None:
            got = {c.ricevuta: c for c in folder(store, ALICE) if c.ricevuta}
            done = {Ricevuta.ACCETTAZIONE, Ricevuta.AVVENUTA_CONSEGNA} <= got.keys()
            return got if done and store.list_folder(BOB) else None

        got = wait_for(receipts, 600, "accettazione, avvenuta-consegna and envelope", interval=0.2)
        t_done = time.monotonic() - t0
    hwm = rss.hwm()
    hwm_children = {c: proc_status_kib(c, "VmHWM") for c in children(pid)}
    after = wait_rss_steady(pid)  # the message done and its memory given back, if it is

    acc, consegna = got[Ricevuta.ACCETTAZIONE], got[Ricevuta.AVVENUTA_CONSEGNA]
    assert acc.is_valid_pec and consegna.is_valid_pec
    assert consegna.daticert is not None and consegna.daticert.consegna == BOB
    assert consegna.daticert.ricevuta is TipoRicevuta.COMPLETA
    assert consegna.postacert is not None
    digest = hashlib.sha256(attachment).digest()
    assert hashlib.sha256(attachment_of(consegna.postacert)).digest() == digest
    [env_path] = store.list_folder(BOB)
    env = classify(env_path.read_bytes())
    assert env.kind is Kind.TRANSPORT_ENVELOPE and env.is_valid_pec
    assert env.postacert is not None
    assert hashlib.sha256(attachment_of(env.postacert)).digest() == digest
    assert srv.cfg.tls.ca is not None
    openssl_verifies(env_path, srv.cfg.tls.ca)

    size_kib = len(raw) // 1024
    print(
        f"\n25 MB message ({len(raw) / MiB:.1f} MiB): 250 after {t_accepted:.1f} s, "
        f"receipts and envelope after {t_done:.1f} s"
        f"\n  server process: idle VmRSS {mib(idle):.0f} MiB, peak VmHWM {mib(hwm):.0f} MiB "
        f"(+{mib(hwm - idle):.0f} MiB = {(hwm - idle) / size_kib:.1f} x the message), "
        f"VmRSS {mib(after):.0f} MiB after"
        f"\n  format workers: idle VmRSS "
        f"{', '.join(f'{mib(v):.0f}' for v in idle_children.values())} MiB, peak VmHWM "
        f"{', '.join(f'{mib(v):.0f}' for v in hwm_children.values())} MiB"
        f"\n  whole tree: peak of sampled VmRSS sum {mib(rss.peak_total):.0f} MiB"
    )
    assert hwm < idle + SERVER_COPIES * size_kib, (
        f"peak RSS {mib(hwm):.0f} MiB is more than {SERVER_COPIES} copies of a "
        f"{mib(size_kib):.0f} MiB message above the idle {mib(idle):.0f} MiB"
    )
    for child, peak in hwm_children.items():
        base = idle_children.get(child, idle)
        assert peak < base + WORKER_COPIES * size_kib, (child, mib(peak))


# --- beyond max_message_size -------------------------------------------------------------------

LIMIT = 1 * MiB
OVERSIZE = 60 * MiB


@pytest.fixture
def pecd_small_limit(tmp_path: Path) -> Iterator[Running]:
    yield from run_pecd(
        tmp_path, '\n[limits]\nmax_message_size = "1M"\n[queue]\nbase_delay_seconds = 0.2\n'
    )


def test_oversize_gets_552_and_memory_stays_bounded(pecd_small_limit: Running) -> None:
    srv = pecd_small_limit
    pid = srv.proc.pid
    store = MaildirStore(srv.cfg.maildir_root)
    big = mime_message(
        "Troppo grande", os.urandom(b64_input_size(OVERSIZE)), "<too-big@client.example>"
    )
    just_over = mime_message(
        "Appena oltre", os.urandom(LIMIT * 3 // 4), "<just-over@client.example>"
    )
    assert abs(len(big) - OVERSIZE) < 64 * 1024 and LIMIT < len(just_over) < LIMIT + 64 * 1024
    small = mime_message("Piccolo", b"%PDF-1.4 small\n", "<small@client.example>")

    with srv.smtps() as smtp:
        code, text = smtp.ehlo()
        assert code == 250
        assert smtp.esmtp_features.get("size") == str(LIMIT), text
        smtp.login(ALICE, PASSWORD)

        # A client that declares the size (smtplib does when SIZE is advertised) is refused
        # at MAIL FROM, before sending anything.
        with pytest.raises(smtplib.SMTPSenderRefused) as refused:
            smtp.sendmail(ALICE, [BOB], just_over)
        assert refused.value.smtp_code == 552

        # A client that does not declare it is refused at the end of DATA; the server reads
        # and discards what lies beyond the limit.
        for raw in (just_over, big):
            before = wait_rss_steady(pid)  # the previous message's memory settled
            reset_hwm(pid)
            assert smtp.mail(ALICE)[0] == 250
            assert smtp.rcpt(BOB)[0] == 250
            code, text = smtp.data(raw)
            assert code == 552, text
            growth = proc_status_kib(pid, "VmHWM") - before
            print(
                f"\n{len(raw) / MiB:.1f} MiB over a {LIMIT // MiB} MiB limit: {code} "
                f"{text.decode()}; server VmRSS {mib(before):.0f} MiB before, "
                f"peak +{mib(growth):.1f} MiB while reading it"
            )
            # Far below the size of the message: what is read beyond the limit is dropped.
            assert growth < 2 * LIMIT // 1024 + 8 * 1024, mib(growth)

        # The session goes on: a message within the limit is accepted on the same connection.
        assert smtp.noop()[0] == 250
        smtp.sendmail(ALICE, [BOB], small)

    # Nothing of the refused ones was queued: the only receipts and envelope are the small one's.
    def settled() -> list[Classification] | None:
        got = folder(store, ALICE)
        return got if len(got) >= 2 and store.list_folder(BOB) else None

    got = wait_for(settled, 120, "receipts of the small message", interval=0.2)
    assert sorted(c.ricevuta.value for c in got if c.ricevuta) == [
        Ricevuta.ACCETTAZIONE.value,
        Ricevuta.AVVENUTA_CONSEGNA.value,
    ]
    assert all(c.daticert and c.daticert.msgid == "<small@client.example>" for c in got)
    assert [c.daticert.msgid for c in folder(store, BOB) if c.daticert] == [
        "<small@client.example>"
    ]
