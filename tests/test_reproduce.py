"""Receipts rebuilt from the trace log alone: deleted from the mailboxes, reproduced with
`pecd receipt reproduce`, they carry the very daticert of the originals, signed anew."""

from __future__ import annotations

import asyncio
import smtplib
import subprocess
from pathlib import Path

from helpers import DOMAIN, PASSWORD, client_tls, message, wait_for
from helpers import AppThread as Server
from helpers import install_e2e as _install
from helpers import openssl_verify as openssl_ok
from pecd.cli import main
from pecd.mailbox.maildir import MaildirStore
from pecd.pec.classify import classify
from pecd.pec.mime import get_first
from pecd.pec.vocab import H_RIPRODUZIONE


def test_every_receipt_kind_is_reproduced_from_the_log(tmp_path: Path) -> None:
    cfg = asyncio.run(_install(tmp_path / "inst", None))
    srv = Server(cfg).start()
    alice, bob, carol, ghost = (f"{u}@{DOMAIN}" for u in ("alice", "bob", "carol", "ghost"))
    store = MaildirStore(cfg.maildir_root)
    try:
        with smtplib.SMTP_SSL("127.0.0.1", srv.port("smtps"), context=client_tls(cfg)) as smtp:
            smtp.login(alice, PASSWORD)
            smtp.sendmail(
                alice, [bob, ghost, carol], message(alice, [bob, ghost], [carol], "Da riprodurre")
            )
            smtp.sendmail(
                alice, [bob], message(alice, [bob], [], "Rifiutato", "Bcc: carol@pec.example.test")
            )
        wait_for(lambda: len(store.list_folder(alice)) >= 5)
        wait_for(lambda: store.list_folder(cfg.provider.mail_receipt))
    finally:
        srv.stop()
    originals = [
        *store.list_folder(alice),
        *store.list_folder(cfg.provider.mail_receipt),
    ]
    kinds = set()
    assert cfg.source is not None and cfg.tls.ca is not None
    for path in originals:
        raw = path.read_bytes()
        c = classify(raw)
        assert c.daticert is not None and c.ricevuta is not None
        path.unlink()  # lost
        out = tmp_path / f"{c.ricevuta.value}-{c.daticert.consegna}.eml"
        args = ["receipt", "reproduce", c.daticert.identificativo, "--type", c.ricevuta.value]
        if c.daticert.consegna:
            args += ["--recipient", c.daticert.consegna]
        assert main([*args, "-c", str(cfg.source), "-o", str(out)]) == 0
        again = out.read_bytes()
        r = classify(again)
        assert r.is_valid_pec and r.ricevuta is c.ricevuta
        assert r.daticert == c.daticert  # identical, event time included
        assert get_first(again, H_RIPRODUZIONE) is not None
        openssl_ok(again, cfg.tls.ca, tmp_path)
        kinds.add(c.ricevuta.value)
    assert kinds == {
        "accettazione",
        "non-accettazione",
        "avvenuta-consegna",
        "errore-consegna",
        "presa-in-carico",
    }


def test_reproduce_refuses_what_the_log_does_not_hold(tmp_path: Path) -> None:
    cfg = asyncio.run(_install(tmp_path / "inst", None))
    assert cfg.source is not None
    r = subprocess.run(
        [
            ".venv/bin/pecd",
            "receipt",
            "reproduce",
            "nothing@pec.example.test",
            "-c",
            str(cfg.source),
        ],
        capture_output=True,
        text=True,
        cwd=Path(__file__).resolve().parents[1],
        check=False,
    )
    assert r.returncode == 1
    assert (
        r.stderr.strip() == "pecd: nothing@pec.example.test: no matching receipt in the trace log"
    )
