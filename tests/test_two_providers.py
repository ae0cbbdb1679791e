"""Two providers on loopback, each with its own domain, CA and key, each holding the other's
index entry: certified mail between them, and what happens when it is not valid PEC."""

from __future__ import annotations

import asyncio
import base64
import imaplib
import json
import smtplib
import socket
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from helpers import (
    PASSWORD,
    Provider,
    RunningClamd,
    clamd_fixture,
    free_port,
    install_provider,
    message,
    openssl_verify,
    provider_inbox,
    provider_send,
    provider_tls,
    wait_for,
    wait_settled,
)
from helpers import AppThread as Server
from pecd.antivirus.testsigs import EICAR
from pecd.cli import main as cli_main
from pecd.clock import FixedClock
from pecd.config import Config, load_config
from pecd.index import entry_ldif, own_entry
from pecd.pec import builders
from pecd.pec.builders import Transmission
from pecd.pec.classify import Classification, classify
from pecd.pec.pki import create_dev_pki
from pecd.pec.smime import KeySigner
from pecd.pec.timefmt import pec_time
from pecd.pec.vocab import Kind, Ricevuta, TipoRicevuta
from pecd.runtime.identity import provider_identity
from pecd.store.db import Database

__all__ = ["clamd_fixture"]  # the session clamd, as the fixture `clamd`

A, B = "pec-a.test", "pec-b.test"


async def _install(directory: Path, domain: str, name: str, ports: dict[str, int]) -> None:
    other = B if domain == A else A
    await install_provider(
        directory, domain, name, ports, other, f'path = "../index-for-{domain}.ldif"'
    )


@pytest.fixture
def pair(tmp_path: Path) -> tuple[Provider, Provider]:
    ports = {A: free_port(), B: free_port()}
    for domain, name in ((A, "Provider A S.p.A."), (B, "Provider B S.p.A.")):
        asyncio.run(_install(tmp_path / domain, domain, name, ports))
    cas = b"".join((tmp_path / d / "pki/ca.pem").read_bytes() for d in (A, B))
    (tmp_path / "peers-ca.pem").write_bytes(cas)
    # Each holds the other's entry, as `pecd index export` writes it (its own is always added).
    for me, other in ((A, B), (B, A)):
        other_cfg = load_config_without_index(tmp_path / other)
        (tmp_path / f"index-for-{me}.ldif").write_text(entry_ldif(own_entry(other_cfg)), "utf-8")
    return (
        Provider(A, load_config(tmp_path / A / "pecd.toml")),
        Provider(B, load_config(tmp_path / B / "pecd.toml")),
    )


def load_config_without_index(directory: Path) -> Config:
    text = (directory / "pecd.toml").read_text("utf-8")
    tmp = directory / "pecd-noindex.toml"
    tmp.write_text(text.replace("[index]\npath", "[index]\n# path"), "utf-8")
    return load_config(tmp)


@pytest.fixture
def running(pair: tuple[Provider, Provider]) -> Iterator[tuple[Provider, Provider]]:
    a, b = pair
    a.server, b.server = Server(a.cfg).start(), Server(b.cfg).start()
    try:
        yield a, b
    finally:
        for p in (a, b):
            if p.server is not None:
                p.server.stop()


tls = provider_tls
inbox = provider_inbox


def send(p: Provider, frm: str, to: list[str], cc: list[str], subject: str) -> None:
    provider_send(p, frm, to, cc, subject)


def kinds(msgs: list[bytes]) -> list[Classification]:
    return [classify(m) for m in msgs]


def raw_of(msgs: list[bytes], ricevuta: Ricevuta, consegna: str | None) -> bytes:
    for m in msgs:
        c = classify(m)
        if c.ricevuta is ricevuta and c.daticert is not None and c.daticert.consegna == consegna:
            return m
    raise AssertionError(f"no {ricevuta.value} for {consegna}")


def test_certified_mail_between_two_providers(
    running: tuple[Provider, Provider], tmp_path: Path
) -> None:
    a, b = running
    alice, carol, bob, dan = a.addr("alice"), a.addr("carol"), b.addr("bob"), b.addr("dan")
    send(a, alice, [bob, carol], [dan], "Tra gestori")

    got = wait_for(lambda: (m := inbox(a, "alice")) and len(m) >= 4 and m)
    assert a.server is not None and b.server is not None
    wait_settled(a.server, b.server)  # whatever else would come is there
    raws = inbox(a, "alice")
    got = kinds(raws)
    by = {(c.ricevuta, c.daticert.consegna if c.daticert else None): c for c in got}
    assert len(got) == 4, [(c.ricevuta, c.daticert and c.daticert.consegna) for c in got]
    assert (Ricevuta.ACCETTAZIONE, None) in by
    for rcpt, kind in (
        (bob, TipoRicevuta.COMPLETA),
        (dan, TipoRicevuta.SINTETICA),
        (carol, TipoRicevuta.COMPLETA),
    ):
        c = by[(Ricevuta.AVVENUTA_CONSEGNA, rcpt)]
        assert c.is_valid_pec and c.daticert is not None and c.daticert.ricevuta is kind
        # Each receipt is signed by the provider of the recipient it speaks for.
        issuer = b if rcpt in (bob, dan) else a
        assert c.daticert.gestore_emittente == issuer.cfg.provider.name
        assert issuer.cfg.tls.ca is not None
        openssl_verify(raw_of(raws, Ricevuta.AVVENUTA_CONSEGNA, rcpt), issuer.cfg.tls.ca, tmp_path)
    ident = by[(Ricevuta.ACCETTAZIONE, None)].daticert.identificativo  # type: ignore[union-attr]

    # A's service mailbox: B's presa in carico, one for the transaction, listing both of B's
    # recipients (and A's own, for carol).
    service = kinds(wait_for(lambda: (m := inbox(a, "ricevute")) and len(m) >= 2 and m))
    prese = [c for c in service if c.ricevuta is Ricevuta.PRESA_IN_CARICO]
    from_b = [
        c for c in prese if c.daticert and c.daticert.gestore_emittente == b.cfg.provider.name
    ]
    assert len(from_b) == 1 and sorted(from_b[0].daticert.ricezione) == [bob, dan]  # type: ignore[union-attr]
    assert from_b[0].daticert.identificativo == ident  # type: ignore[union-attr]

    for user in ("bob", "dan"):
        (env_raw,) = inbox(b, user)
        env = classify(env_raw)
        assert env.kind is Kind.TRANSPORT_ENVELOPE and env.is_valid_pec
        assert env.daticert is not None and env.daticert.identificativo == ident
        assert a.cfg.tls.ca is not None
        openssl_verify(env_raw, a.cfg.tls.ca, tmp_path)


def deliver_raw(p: Provider, mail_from: str, rcpts: list[str], raw: bytes) -> None:
    """Hand ``raw`` to ``p``'s reception point as another server would (STARTTLS offered)."""
    assert p.server is not None
    with smtplib.SMTP("127.0.0.1", p.server.port("reception")) as smtp:
        smtp.starttls(context=tls(p))
        smtp.sendmail(mail_from, rcpts, raw)


def trace_events(p: Provider, event: str) -> list[Any]:
    from pecd.store.trace import events_of_type

    assert p.server is not None and p.server.app is not None and p.server.app.runner is not None
    db = p.server.app.runner.db

    async def go() -> list[Any]:
        async with db.read_session() as s:
            return await events_of_type(s, event)

    return p.server.call(go())  # type: ignore[no-any-return]


def test_what_is_not_valid_pec_becomes_an_anomaly(running: tuple[Provider, Provider]) -> None:
    a, b = running
    alice, bob = a.addr("alice"), b.addr("bob")
    assert b.server is not None
    with smtplib.SMTP("127.0.0.1", b.server.port("reception")) as smtp:
        smtp.ehlo()
        assert smtp.has_extn("starttls") and not smtp.has_extn("auth")
        code, _ = smtp.docmd("MAIL FROM:<x@example.org>")
        assert code == 250
        code, reply = smtp.docmd("RCPT TO:<someone@example.org>")
        assert code == 550, reply  # no open relay

    # 1. Ordinary mail from an ordinary server, unsigned.
    plain = message("mario@example.org", [bob], [], "Posta ordinaria")
    # 2. An envelope signed by a provider the index does not know.
    stranger = create_dev_pki(domain="pec-x.test", name="Stranger", now=datetime.now(UTC))
    forged_by = builders.ProviderIdentity(
        name="Stranger",
        domain="pec-x.test",
        service_address="posta-certificata@pec-x.test",
        signer=KeySigner.from_pem(stranger.signing.key_pem, stranger.signing.cert_pem),
        digest="sha256",
    )
    original = message("mario@pec-x.test", [bob], [], "Falsa")
    when = pec_time(datetime.now(UTC))
    tx = Transmission.from_submission(
        original,
        mail_from="mario@pec-x.test",
        rcpt_to=[bob],
        identificativo=forged_by.new_msgid(when),
        is_certified=lambda _a: True,
    )
    forged = builders.transport_envelope(original, tx, forged_by, when).raw
    # 3. A's real envelope, altered after signing.
    a_id = provider_identity(a.cfg)
    tx_a = Transmission.from_submission(
        message(alice, [bob], [], "Alterata"),
        mail_from=alice,
        rcpt_to=[bob],
        identificativo=a_id.new_msgid(when),
        is_certified=lambda _a: True,
    )
    good = builders.transport_envelope(message(alice, [bob], [], "Alterata"), tx_a, a_id, when).raw
    tampered = good.replace(b"Buongiorno", b"Buonasera")
    assert tampered != good
    for mail_from, raw in (
        ("mario@example.org", plain),
        ("mario@pec-x.test", forged),
        (alice, tampered),
    ):
        deliver_raw(b, mail_from, [bob], raw)

    got = wait_for(lambda: (m := inbox(b, "bob")) and len(m) >= 3 and m)
    assert a.server is not None
    wait_settled(a.server, b.server)  # whatever else would come is there
    got = inbox(b, "bob")
    assert len(got) == 3
    for raw in got:
        c = classify(raw)
        assert c.kind is Kind.ANOMALY_ENVELOPE and c.signature.valid and c.daticert is None
        assert b.cfg.provider.service_address.encode() in raw
    reasons = sorted(e.error for e in trace_events(b, "anomalia"))
    assert len(reasons) == 3
    assert any("privo di firma" in r for r in reasons)
    assert any("non presente nell'indice" in r for r in reasons)
    assert any("firma non valida" in r for r in reasons)
    # No receipt of any kind for an anomaly: nothing reached A.
    assert inbox(a, "alice") == [] and inbox(a, "ricevute") == []
    assert trace_events(b, Ricevuta.PRESA_IN_CARICO.value) == []


def test_a_receipt_for_an_unknown_transaction_is_recorded_and_dropped(
    running: tuple[Provider, Provider],
) -> None:
    a, b = running
    alice, bob = a.addr("alice"), b.addr("bob")
    # B signs a delivery receipt for a transmission A never sent and hands it to A.
    b_id = provider_identity(b.cfg)
    when = pec_time(datetime.now(UTC))
    original = message(alice, [bob], [], "Mai spedito")
    tx = Transmission.from_submission(
        original,
        mail_from=alice,
        rcpt_to=[bob],
        identificativo=provider_identity(a.cfg).new_msgid(when),
        is_certified=lambda _a: True,
    )
    receipt = builders.avvenuta_consegna(tx, b_id, when, recipient=bob, postacert=None)
    deliver_raw(a, b.cfg.provider.service_address, [alice], receipt.raw)
    wait_for(lambda: trace_events(a, "ricevuta-sconosciuta"))
    assert a.server is not None and b.server is not None
    wait_settled(a.server, b.server)  # a delivery to alice, were there one, is done
    assert inbox(a, "alice") == []
    (ev,) = trace_events(a, "ricevuta-sconosciuta")
    assert ev.pec_msgid == tx.identificativo and ev.data["dropped"] is True


def test_peer_down_then_back_and_local_mail_never_waits(pair: tuple[Provider, Provider]) -> None:
    a, b = pair
    alice, carol, bob = a.addr("alice"), a.addr("carol"), b.addr("bob")
    a.server = Server(a.cfg).start()
    try:
        send(a, alice, [bob], [], "Gestore spento")
        send(a, alice, [carol], [], "Locale")
        # Local mail is done while B is down: accettazione x2 + carol's delivery receipt.
        got = kinds(wait_for(lambda: (m := inbox(a, "alice")) and len(m) >= 3 and m))
        assert sorted(c.ricevuta.value for c in got if c.ricevuta) == [
            "accettazione",
            "accettazione",
            "avvenuta-consegna",
        ]
        # A few relay attempts fail meanwhile (each one is in the trace log).
        wait_for(lambda: len(trace_events(a, "relay-rinviato")) >= 2, what="two relay retries")
        assert trace_events(a, "relay") == []
        b.server = Server(b.cfg).start()
        got = kinds(wait_for(lambda: (m := inbox(a, "alice")) and len(m) >= 4 and m, timeout=60))
        done = [c for c in got if c.ricevuta is Ricevuta.AVVENUTA_CONSEGNA]
        assert {c.daticert.consegna for c in done if c.daticert} == {bob, carol}
        assert len(inbox(b, "bob")) == 1
    finally:
        for p in (a, b):
            if p.server is not None:
                p.server.stop()


def test_timers_send_each_notice_once(pair: tuple[Provider, Provider], tmp_path: Path) -> None:
    a, b = pair  # B never starts: nothing ever comes back
    alice, bob = a.addr("alice"), b.addr("bob")
    clock = FixedClock(datetime.now(UTC))
    a.server = srv = Server(a.cfg, clock=clock).start()
    try:
        send(a, alice, [bob], [], "Nessuna risposta")
        wait_for(lambda: inbox(a, "alice"))  # the accettazione
        assert srv.app is not None and srv.app.timers is not None
        timers = srv.app.timers

        def notices() -> list[Classification]:
            return [
                c
                for c in kinds(inbox(a, "alice"))
                if c.ricevuta is Ricevuta.PREAVVISO_ERRORE_CONSEGNA
            ]

        assert srv.call(timers.run_once()) == 0
        clock.advance(timedelta(hours=11, minutes=59))
        assert srv.call(timers.run_once()) == 0
        clock.advance(timedelta(minutes=2))
        assert srv.call(timers.run_once()) == 1
        assert srv.call(timers.run_once()) == 0  # once only
        first = wait_for(notices)
        clock.advance(timedelta(hours=12))
        assert srv.call(timers.run_once()) == 1
        assert srv.call(timers.run_once()) == 0
        clock.advance(timedelta(hours=30))
        assert srv.call(timers.run_once()) == 0  # tracking has stopped
        both = wait_for(lambda: (n := notices()) and len(n) >= 2 and n)
        wait_settled(srv, except_kinds=("relay",))  # B stays down: its relay keeps retrying
        both = notices()
    finally:
        srv.stop()
    assert len(first) == 1 and len(both) == 2
    preavvisi = [
        m
        for m in inbox_raw_after_stop(a)
        if classify(m).ricevuta is Ricevuta.PREAVVISO_ERRORE_CONSEGNA
    ]
    assert reproduce_and_compare(a, preavvisi, tmp_path) == {"preavviso-errore-consegna"}
    texts = sorted(c.daticert.errore_esteso or "" for c in both if c.daticert)
    assert texts[0].startswith("4.4.1") and texts[1].startswith("5.4.1")
    assert all(c.daticert and c.daticert.consegna == bob for c in both)


def test_rilevazione_virus_becomes_a_virus_errore_consegna(
    pair: tuple[Provider, Provider], tmp_path: Path
) -> None:
    a, b = pair  # B stays down: the envelope is waiting in A's relay queue
    alice, bob = a.addr("alice"), b.addr("bob")
    a.server = Server(a.cfg).start()
    try:
        send(a, alice, [bob], [], "Allegato infetto")
        (acc_raw,) = wait_for(lambda: inbox(a, "alice"))
        acc = classify(acc_raw)
        assert acc.daticert is not None
        # B's reception point found a virus in the envelope and tells A's service mailbox.
        tx = Transmission.from_daticert(acc.daticert)
        notice = builders.rilevazione_virus(
            tx,
            provider_identity(b.cfg),
            pec_time(datetime.now(UTC)),
            recipient=bob,
            errore_esteso="Eicar-Test-Signature",
            mail_receipt=a.cfg.provider.mail_receipt,
        )
        deliver_raw(a, b.cfg.provider.service_address, [a.cfg.provider.mail_receipt], notice.raw)
        got = wait_for(lambda: (m := inbox(a, "alice")) and len(m) >= 2 and m)
        service = wait_for(lambda: inbox(a, "ricevute"))
    finally:
        a.server.stop()
    err = [classify(m) for m in got if classify(m).ricevuta is Ricevuta.ERRORE_CONSEGNA]
    assert len(err) == 1 and err[0].virus and err[0].is_valid_pec
    d = err[0].daticert
    assert d is not None and d.errore.value == "virus" and d.consegna == bob
    assert d.gestore_emittente == a.cfg.provider.name  # the sender's provider tells the sender
    assert d.identificativo == acc.daticert.identificativo
    assert any(classify(m).ricevuta is Ricevuta.RILEVAZIONE_VIRUS for m in service)
    virus_raw = [m for m in got if classify(m).virus]
    assert reproduce_and_compare(a, virus_raw, tmp_path) == {"errore-consegna+virus"}


def infected_message(frm: str, to: str, subject: str) -> bytes:
    """A message carrying the EICAR test file as a base64 attachment."""
    attachment = base64.encodebytes(EICAR).decode()
    return (
        f"From: {frm}\r\nTo: {to}\r\nSubject: {subject}\r\n"
        f"Message-ID: <virus-{subject.replace(' ', '-')}@client.example>\r\n"
        'MIME-Version: 1.0\r\nContent-Type: multipart/mixed; boundary="b1"\r\n\r\n'
        "--b1\r\nContent-Type: text/plain\r\n\r\nin allegato\r\n"
        "--b1\r\nContent-Type: application/octet-stream\r\n"
        'Content-Disposition: attachment; filename="x.com"\r\n'
        f"Content-Transfer-Encoding: base64\r\n\r\n{attachment}\r\n--b1--\r\n"
    ).encode()


def test_an_infected_envelope_is_stopped_at_the_reception_point(
    pair: tuple[Provider, Provider], clamd: RunningClamd, capsys: pytest.CaptureFixture[str]
) -> None:
    """A scans nothing (antivirus off), B scans with a real clamd: B delivers nothing, sends one
    rilevazione-virus to A's mailReceipt and keeps the envelope; A's sender gets exactly one
    virus errore-consegna."""
    a, b = pair
    path = b.cfg.source
    assert path is not None
    text = path.read_text("utf-8")
    text += (
        '\n[limits]\nmax_message_size = "8M"\n\n'
        f'[antivirus]\nenabled = true\nsocket = "{clamd.socket}"\n'
    )
    path.write_text(text, "utf-8")
    b.cfg = load_config(path)
    alice, bob = a.addr("alice"), b.addr("bob")
    a.server, b.server = Server(a.cfg).start(), Server(b.cfg).start()
    try:
        with smtplib.SMTP_SSL("127.0.0.1", a.server.port("smtps"), context=tls(a)) as smtp:
            smtp.login(alice, PASSWORD)
            smtp.sendmail(alice, [bob], infected_message(alice, bob, "Fattura infetta"))
        got = wait_for(lambda: (m := inbox(a, "alice")) and len(m) >= 2 and m)
        wait_settled(a.server, b.server)
        got = inbox(a, "alice")
        service = inbox(a, "ricevute")
        assert inbox(b, "bob") == []
    finally:
        for p in (a, b):
            if p.server is not None:
                p.server.stop()
    kinds_got = [classify(m) for m in got]
    assert sorted(c.ricevuta.value for c in kinds_got if c.ricevuta) == [
        "accettazione",
        "errore-consegna",
    ]
    [err] = [c for c in kinds_got if c.ricevuta is Ricevuta.ERRORE_CONSEGNA]
    assert err.virus and err.is_valid_pec
    assert err.daticert is not None and err.daticert.errore.value == "virus"
    assert err.daticert.consegna == bob
    [rilevazione] = [c for c in map(classify, service) if c.ricevuta is Ricevuta.RILEVAZIONE_VIRUS]
    assert rilevazione.is_valid_pec and rilevazione.daticert is not None
    assert rilevazione.daticert.gestore_emittente == b.cfg.provider.name
    # B keeps what it found, byte-exact, for the log's retention.
    assert cli_main(["virus", "list", "--json", "-c", str(path)]) == 0
    [kept] = json.loads(capsys.readouterr().out)
    assert kept["point"] == "reception" and kept["signature"].startswith("Eicar-Test-Signature")


def test_a_slow_peer_does_not_hold_up_another(running: tuple[Provider, Provider]) -> None:
    a, b = running
    alice, bob = a.addr("alice"), b.addr("bob")
    # A server that accepts connections and never says a word.
    black_hole = socket.socket()
    black_hole.bind(("127.0.0.1", 0))
    black_hole.listen(16)
    port = black_hole.getsockname()[1]
    try:
        assert a.server is not None and a.server.app is not None
        assert a.server.app.runner is not None and a.server.app.runner.relay is not None
        router = a.server.app.runner.relay.router
        router.routes["slow.example"] = type(router.routes[B])("127.0.0.1", port)
        send(a, alice, ["nobody@slow.example"], [], "Verso un server lento")
        send(a, alice, [bob], [], "Verso B")
        wait_for(
            lambda: any(
                classify(m).ricevuta is Ricevuta.AVVENUTA_CONSEGNA for m in inbox(a, "alice")
            ),
            timeout=30,
        )
        # B's receipt came back while the relay was still waiting for the silent server (it
        # gives up on a connection after relay.timeout_seconds, 30 s here): no attempt to
        # slow.example has ended yet, successfully or not.
        ended = [
            e
            for kind in ("relay", "relay-rinviato", "relay-fallito")
            for e in trace_events(a, kind)
            if any(r["address"].endswith("@slow.example") for r in e.recipients)
        ]
        assert ended == []
    finally:
        black_hole.close()


def reproduce_and_compare(p: Provider, raws: list[bytes], tmp: Path) -> set[str]:
    """Rebuild each receipt in ``raws`` from ``p``'s trace log alone; their daticert must be
    identical. Returns the kinds reproduced."""
    from pecd.cli import main
    from pecd.pec.daticert import to_json
    from pecd.store.trace import Query, search

    async def event_ids() -> list[int]:
        db = await Database.open(p.cfg.database_url)
        try:
            ids = []
            async with db.read_session() as s:
                for raw in raws:
                    d = classify(raw).daticert
                    assert d is not None
                    found = await search(s, Query(pec_msgid=d.identificativo), limit=1000)
                    ids.append(next(e.id for e in found if e.daticert == to_json(d)))
            return ids
        finally:
            await db.close()

    assert p.cfg.source is not None and p.cfg.tls.ca is not None
    kinds = set()
    for raw, eid in zip(raws, asyncio.run(event_ids()), strict=True):
        c = classify(raw)
        out = tmp / f"reproduced-{eid}.eml"
        assert (
            main(
                [
                    "receipt",
                    "reproduce",
                    c.daticert.identificativo,
                    "--event-id",
                    str(eid),  # type: ignore[union-attr]
                    "-c",
                    str(p.cfg.source),
                    "-o",
                    str(out),
                ]
            )
            == 0
        )
        again = classify(out.read_bytes())
        assert again.is_valid_pec and again.daticert == c.daticert and again.virus == c.virus
        openssl_verify(out.read_bytes(), p.cfg.tls.ca, tmp)
        kinds.add(c.ricevuta.value + ("+virus" if c.virus else ""))  # type: ignore[union-attr]
    return kinds


def inbox_raw_after_stop(p: Provider) -> list[bytes]:
    """alice's messages read from the Maildir (the server has stopped)."""
    from pecd.mailbox.maildir import MaildirStore

    return [f.read_bytes() for f in MaildirStore(p.cfg.maildir_root).list_folder(p.addr("alice"))]


def test_replayed_or_redirected_envelopes_give_no_second_receipt(
    running: tuple[Provider, Provider],
) -> None:
    a, b = running
    alice, bob, carol = a.addr("alice"), b.addr("bob"), b.addr("carol")
    send(a, alice, [bob], [], "Una volta sola")
    wait_for(lambda: (m := inbox(a, "alice")) and len(m) >= 2 and m)
    (env,) = inbox(b, "bob")
    # The same envelope again (a peer's retry, or a replay), and once more to carol, whom its
    # signed daticert does not name.
    deliver_raw(b, alice, [bob], env)
    deliver_raw(b, alice, [carol], env)
    deliver_raw(b, alice, ["nobody@" + B], message("x@example.org", ["nobody@" + B], [], "Spam"))
    wait_for(lambda: inbox(b, "carol"))
    assert a.server is not None and b.server is not None
    wait_settled(a.server, b.server)  # a second receipt or delivery, were there one, is there
    assert len(inbox(b, "bob")) == 1
    (to_carol,) = inbox(b, "carol")
    assert classify(to_carol).kind is Kind.ANOMALY_ENVELOPE
    got = kinds(inbox(a, "alice"))
    assert sorted(c.ricevuta.value for c in got if c.ricevuta) == [
        "accettazione",
        "avvenuta-consegna",
    ]
    assert b.server is not None and b.server.app is not None
    assert not (b.cfg.maildir_root / B / "nobody").exists()  # no mailbox made for a stranger


def delete_all(p: Provider, user: str) -> None:
    """The holder deletes everything in INBOX (IMAP \\Deleted + EXPUNGE)."""
    assert p.server is not None
    with imaplib.IMAP4_SSL("127.0.0.1", p.server.port("imaps"), ssl_context=tls(p)) as imap:
        imap.login(p.addr(user), PASSWORD)
        imap.select("INBOX")
        imap.store("1:*", "+FLAGS", "(\\Deleted)")
        imap.expunge()


def test_a_replay_after_the_holder_deleted_it_is_a_duplicate(
    running: tuple[Provider, Provider],
) -> None:
    """An envelope replayed after bob deleted it is not delivered again, taken in charge again
    or answered again; a receipt replayed after alice deleted it is not stored again. Each
    replay is one 'duplicato' event in the trace log."""
    a, b = running
    alice, bob = a.addr("alice"), b.addr("bob")
    send(a, alice, [bob], [], "Replay")
    got = wait_for(lambda: (m := inbox(a, "alice")) and len(m) >= 2 and m)
    (env,) = inbox(b, "bob")
    avvenuta = raw_of(got, Ricevuta.AVVENUTA_CONSEGNA, bob)
    assert a.server is not None and b.server is not None
    wait_settled(a.server, b.server)
    presa_before = len(trace_events(b, "presa-in-carico"))
    esiti_before = len(trace_events(b, "avvenuta-consegna"))
    delete_all(b, "bob")
    delete_all(a, "alice")
    deliver_raw(b, alice, [bob], env)
    deliver_raw(a, b.cfg.provider.service_address, [alice], avvenuta)
    wait_for(lambda: trace_events(b, "duplicato") and trace_events(a, "duplicato"))
    wait_settled(a.server, b.server)
    assert inbox(b, "bob") == [] and inbox(a, "alice") == []
    assert len(trace_events(b, "presa-in-carico")) == presa_before
    assert len(trace_events(b, "avvenuta-consegna")) == esiti_before
    assert len(trace_events(b, "duplicato")) == 1 and len(trace_events(a, "duplicato")) == 1
