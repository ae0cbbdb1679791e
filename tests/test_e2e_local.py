"""One provider end to end on loopback: smtplib submits, imaplib reads, openssl judges the signatures."""

from __future__ import annotations

import asyncio
import smtplib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from helpers import (
    DOMAIN,
    PASSWORD,
    client_tls,
    fetch_all,
    install_e2e,
    message,
    openssl_verify,
    wait_for,
    wait_settled,
)
from helpers import AppThread as Server
from pecd.pec.checks import (
    BCC_PRESENT,
    RECIPIENTS_MISMATCH,
    RECIPIENTS_TIMES_SIZE,
    SENDER_MISMATCH,
    TO_MISSING,
    TOO_MANY_RECIPIENTS,
)
from pecd.pec.classify import classify
from pecd.pec.vocab import Kind, Ricevuta, TipoRicevuta
from pecd.store.accounts import Accounts
from pecd.store.db import Database


@pytest.fixture
def server(tmp_path: Path, db_url_for_e2e: str | None) -> Iterator[Server]:
    cfg = asyncio.run(install_e2e(tmp_path / "inst", db_url_for_e2e))
    srv = Server(cfg).start()
    try:
        yield srv
    finally:
        srv.stop()


def by_ricevuta(msgs: list[bytes]) -> dict[str, list[Any]]:
    out: dict[str, list[Any]] = {}
    for raw in msgs:
        c = classify(raw)
        key = c.ricevuta.value if c.ricevuta else c.kind.value
        out.setdefault(key, []).append(c)
    return out


@pytest.mark.parametrize("mode", ["smtps", "submission"])
def test_alice_sends_to_bob_carol_and_a_missing_mailbox(
    server: Server, tmp_path: Path, mode: str
) -> None:
    alice, bob, carol, ghost = (f"{u}@{DOMAIN}" for u in ("alice", "bob", "carol", "ghost"))
    raw = message(alice, [bob, ghost], [carol], "Contratto firmato")
    ctx = client_tls(server.cfg)
    if mode == "smtps":
        with smtplib.SMTP_SSL("127.0.0.1", server.port("smtps"), context=ctx) as smtp:
            smtp.login(alice, PASSWORD)
            smtp.sendmail(alice, [bob, ghost, carol], raw)
    else:
        with smtplib.SMTP("127.0.0.1", server.port("submission")) as smtp:
            smtp.starttls(context=ctx)
            smtp.login(alice, PASSWORD)
            smtp.sendmail(alice, [bob, ghost, carol], raw)

    inbox = wait_for(lambda: (m := fetch_all(server, "alice")) and len(m) >= 4 and m)
    kinds = by_ricevuta(inbox)
    assert len(kinds["accettazione"]) == 1
    assert len(kinds["avvenuta-consegna"]) == 2
    assert len(kinds["errore-consegna"]) == 1
    assert len(inbox) == 4
    ca = server.cfg.tls.ca
    assert ca is not None
    for raw_msg in inbox:
        openssl_verify(raw_msg, ca, tmp_path)
    acc = kinds["accettazione"][0]
    assert acc.is_valid_pec
    d = acc.daticert
    assert d.mittente == alice
    assert [r.address for r in d.destinatari] == [bob, ghost, carol]
    assert d.oggetto == "Contratto firmato"
    assert d.msgid == "<test-Contratto-firmato@client.example>"
    ident = d.identificativo
    consegne = {c.daticert.consegna: c for c in kinds["avvenuta-consegna"]}
    assert consegne[bob].daticert.ricevuta is TipoRicevuta.COMPLETA
    assert (
        consegne[bob].postacert is not None
        and b"questo \xc3\xa8 un messaggio" in consegne[bob].postacert
    )
    assert consegne[carol].daticert.ricevuta is TipoRicevuta.SINTETICA
    assert consegne[carol].postacert is None
    err = kinds["errore-consegna"][0]
    assert err.daticert.consegna == ghost and err.daticert.errore.value == "no-dest"
    assert all(c.daticert.identificativo == ident for cs in kinds.values() for c in cs)

    for user in ("bob", "carol"):
        box = fetch_all(server, user)
        assert len(box) == 1
        env = classify(box[0])
        assert env.kind is Kind.TRANSPORT_ENVELOPE and env.is_valid_pec
        assert env.daticert is not None and env.daticert.identificativo == ident
        openssl_verify(box[0], ca, tmp_path)
    # The service mailbox holds exactly one presa in carico covering the local recipients.
    service = fetch_all(server, "ricevute")
    presa = [classify(m) for m in service]
    assert [p.ricevuta for p in presa] == [Ricevuta.PRESA_IN_CARICO]


MANY = [f"r{i}" for i in range(51)]
# The start of the Italian reason each check writes into errore-esteso (pec/checks.py).
REASON = {
    RECIPIENTS_MISMATCH: "I destinatari SMTP (RCPT TO) non coincidono con i campi To/Cc",
    BCC_PRESENT: "Il campo Bcc non è ammesso",
    TO_MISSING: "Il campo To è assente o non contiene indirizzi validi",
    SENDER_MISMATCH: "Il mittente SMTP (MAIL FROM) <alice@pec.example.test> non coincide",
    TOO_MANY_RECIPIENTS: "Numero di destinatari (51) superiore al massimo consentito (50)",
    RECIPIENTS_TIMES_SIZE: "Il prodotto destinatari × dimensione (31 ×",
}


@pytest.mark.parametrize(
    ("frm", "to", "cc", "rcpts", "extra", "code"),
    [
        ("alice", ["bob"], [], ["bob", "carol"], "", RECIPIENTS_MISMATCH),
        ("alice", ["bob"], [], ["bob"], "Bcc: carol@pec.example.test", BCC_PRESENT),
        ("alice", [], [], ["bob"], "", TO_MISSING),
        ("carol", ["bob"], [], ["bob"], "", SENDER_MISMATCH),
        ("alice", MANY, [], MANY, "", TOO_MANY_RECIPIENTS),
        ("alice", MANY[:31], [], MANY[:31], "pad:1048576", RECIPIENTS_TIMES_SIZE),
    ],
)
def test_formal_violations_yield_non_accettazione(
    server: Server, frm: str, to: list[str], cc: list[str], rcpts: list[str], extra: str, code: str
) -> None:
    """Each formal check of spec section 4 refused with its reason; nothing relayed or delivered.

    The server of these tests has the legal minimum limits (50 recipients, recipients x size
    30 MB; see ``install_e2e``). A message over ``max_message_size`` is refused by SMTP itself (552),
    as the rules allow when it is too large even for a notice (test_large_message.py)."""
    alice = f"alice@{DOMAIN}"
    pad = int(extra.removeprefix("pad:")) if extra.startswith("pad:") else 0
    raw = message(
        f"{frm}@{DOMAIN}",
        [f"{u}@{DOMAIN}" for u in to],
        [f"{u}@{DOMAIN}" for u in cc],
        f"bad {code}",
        "" if pad else extra,
        pad=pad,
    )
    if not to:
        raw = raw.replace(b"To: \r\n", b"")
    with smtplib.SMTP_SSL(
        "127.0.0.1", server.port("smtps"), context=client_tls(server.cfg)
    ) as smtp:
        smtp.login(alice, PASSWORD)
        smtp.sendmail(alice, [f"{u}@{DOMAIN}" for u in rcpts], raw)
    inbox = wait_for(lambda: fetch_all(server, "alice"))
    assert len(inbox) == 1
    c = classify(inbox[0])
    assert c.ricevuta is Ricevuta.NON_ACCETTAZIONE and c.is_valid_pec
    assert c.postacert is None
    assert c.daticert is not None and c.daticert.errore.value == "altro"
    assert REASON[code] in (c.daticert.errore_esteso or ""), (code, c.daticert.errore_esteso)
    wait_settled(server)  # every job done: a delivery would have come by now
    for user in ("bob", "carol"):
        assert fetch_all(server, user) == []


def test_smtp_refusals(server: Server) -> None:
    alice, bob = f"alice@{DOMAIN}", f"bob@{DOMAIN}"
    ctx = client_tls(server.cfg)
    # No AUTH before STARTTLS on 587.
    with smtplib.SMTP("127.0.0.1", server.port("submission")) as smtp:
        smtp.ehlo()
        assert not smtp.has_extn("auth")
        code, _ = smtp.docmd("AUTH", "PLAIN AGFsaWNlAHg=")
        assert code == 530 or code >= 500
    with smtplib.SMTP_SSL("127.0.0.1", server.port("smtps"), context=ctx) as smtp:
        with pytest.raises(smtplib.SMTPAuthenticationError):
            smtp.login(alice, "wrong password")
        with pytest.raises(smtplib.SMTPSenderRefused):
            smtp.sendmail(alice, [bob], b"Subject: x\r\n\r\nno auth\r\n")
    with smtplib.SMTP_SSL("127.0.0.1", server.port("smtps"), context=ctx) as smtp:
        smtp.login(alice, PASSWORD)
        with pytest.raises(smtplib.SMTPSenderRefused):
            smtp.sendmail(bob, [alice], message(bob, [alice], [], "forged"))


def test_a_delivery_that_keeps_failing_ends_in_errore_consegna(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A recipient whose mailbox cannot be written gets an errore-consegna after the last
    attempt; the other recipient is delivered once; nothing is left parked."""
    from pecd.mailbox.maildir import MaildirStore

    cfg = asyncio.run(install_e2e(tmp_path / "inst", None, queue="max_attempts = 3"))
    assert cfg.queue.max_attempts == 3
    # Deliveries run in the format processes, out of a monkeypatch's reach: break the disk
    # instead. carol's INBOX/tmp is a file, so every write into her INBOX fails.
    inbox_dir = MaildirStore(cfg.maildir_root).ensure(f"carol@{DOMAIN}")
    (inbox_dir / "tmp").rmdir()
    (inbox_dir / "tmp").write_bytes(b"")
    srv = Server(cfg).start()
    try:
        alice, bob, carol = (f"{u}@{DOMAIN}" for u in ("alice", "bob", "carol"))
        with smtplib.SMTP_SSL("127.0.0.1", srv.port("smtps"), context=client_tls(cfg)) as smtp:
            smtp.login(alice, PASSWORD)
            smtp.sendmail(alice, [bob, carol], message(alice, [bob, carol], [], "Disco pieno"))
        inbox = wait_for(lambda: (m := fetch_all(srv, "alice")) and len(m) >= 3 and m)
        wait_settled(srv)  # every job done: nothing more may come
        inbox = fetch_all(srv, "alice")
        assert srv.app is not None and srv.app.runner is not None
        svc = srv.app.runner

        async def parked() -> int:
            from pecd.store import jobs

            async with svc.db.read_session() as s:
                return len(await jobs.list_jobs(s, states=["parked"]))

        assert srv.call(parked()) == 0
    finally:
        srv.stop()
    got = {(c.ricevuta.value, c.daticert.consegna) for c in map(classify, inbox)}  # type: ignore[union-attr]
    assert got == {
        ("accettazione", None),
        ("avvenuta-consegna", bob),
        ("errore-consegna", carol),
    }


def test_disabled_and_full_mailboxes_get_errore_consegna(tmp_path: Path) -> None:
    """A disabled mailbox (dan) and one over its quota (erin) each give the sender one
    errore-consegna with errore "altro" and the reason in errore-esteso; nothing is stored for
    them; the other recipient is delivered as usual."""
    cfg = asyncio.run(install_e2e(tmp_path / "inst", None))
    alice, bob, dan, erin = (f"{u}@{DOMAIN}" for u in ("alice", "bob", "dan", "erin"))

    async def add_erin() -> None:
        db = await Database.open(cfg.database_url)
        try:
            await Accounts(db).add_mailbox(erin, PASSWORD, quota_bytes=1024)
        finally:
            await db.close()

    asyncio.run(add_erin())
    srv = Server(cfg).start()
    try:
        with smtplib.SMTP_SSL("127.0.0.1", srv.port("smtps"), context=client_tls(cfg)) as smtp:
            smtp.login(alice, PASSWORD)
            smtp.sendmail(alice, [bob, dan, erin], message(alice, [bob, dan, erin], [], "Piena"))
        inbox = wait_for(lambda: (m := fetch_all(srv, "alice")) and len(m) >= 4 and m)
        wait_settled(srv)  # every job done: nothing more may come
        inbox = fetch_all(srv, "alice")
        assert len(fetch_all(srv, "bob")) == 1
        assert fetch_all(srv, "erin") == []
    finally:
        srv.stop()
    answers = {}
    for raw in inbox:
        c = classify(raw)
        assert c.is_valid_pec and c.daticert is not None and c.ricevuta is not None
        if c.ricevuta is not Ricevuta.ACCETTAZIONE:
            d = c.daticert
            answers[d.consegna] = (
                c.ricevuta.value,
                d.errore.value if d.errore else None,
                d.errore_esteso,
            )
    assert answers[bob] == ("avvenuta-consegna", "nessuno", None)
    assert answers[dan][:2] == ("errore-consegna", "altro")
    assert "casella disabilitata" in (answers[dan][2] or "")
    assert answers[erin][:2] == ("errore-consegna", "altro")
    assert "casella piena" in (answers[erin][2] or "")
    assert len(inbox) == 4
