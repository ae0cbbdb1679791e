"""Two providers on loopback, each with its own domain, CA and key, each holding the other's
index entry: certified mail between them, and what happens when it is not valid PEC."""

from __future__ import annotations

import asyncio
import imaplib
import smtplib
import ssl
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from helpers import free_port
from pecd.clock import SystemClock
from pecd.config import Config, load_config
from pecd.devinit import config_text, init_installation
from pecd.index import entry_ldif, own_entry
from pecd.pec.classify import Classification, classify
from pecd.pec.vocab import Kind, Ricevuta, TipoRicevuta
from pecd.store.accounts import Accounts
from pecd.store.db import Database
from test_e2e_local import PASSWORD, Server, message, openssl_ok

A, B = "pec-a.test", "pec-b.test"


@dataclass
class Provider:
    domain: str
    cfg: Config
    server: Server | None = None

    def addr(self, user: str) -> str:
        return f"{user}@{self.domain}"


async def _install(directory: Path, domain: str, name: str, ports: dict[str, int]) -> None:
    """An installation of ``domain`` whose config names its peer's route and index file; the
    config is read once both exist (the index files are written from both signing certs)."""
    await init_installation(directory, domain=domain, name=name, clock=SystemClock(), demo=False)
    text = config_text(
        domain=domain, name=name, ports={"smtps": 0, "submission": 0, "imaps": 0}
    ).replace('hostname = "localhost"', 'hostname = "localhost"\nreception = "127.0.0.1:%d"')
    text = text % ports[domain]
    other = B if domain == A else A
    text += f"""
[queue]
base_delay_seconds = 0.2
max_delay_seconds = 1
format_processes = 0

[relay]
starttls = "required"
ca_bundle = "../peers-ca.pem"
timeout_seconds = 5

[index]
path = "../index-for-{domain}.ldif"

[timers]
check_seconds = 3600

[routes]
"{other}" = "127.0.0.1:{ports[other]}"
"""
    (directory / "pecd.toml").write_text(text, "utf-8")
    db = await Database.open(f"sqlite:///{directory / 'data/pecd.db'}")
    try:
        acc = Accounts(db)
        await acc.set_password(f"ricevute@{domain}", PASSWORD)
        for user in ("alice", "bob", "carol", "dan"):
            await acc.add_mailbox(f"{user}@{domain}", PASSWORD)
    finally:
        await db.close()


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


def tls(p: Provider) -> ssl.SSLContext:
    assert p.cfg.tls.ca is not None
    return ssl.create_default_context(cafile=str(p.cfg.tls.ca))


def send(p: Provider, frm: str, to: list[str], cc: list[str], subject: str) -> None:
    assert p.server is not None
    with smtplib.SMTP_SSL("127.0.0.1", p.server.port("smtps"), context=tls(p)) as smtp:
        smtp.login(frm, PASSWORD)
        smtp.sendmail(frm, [*to, *cc], message(frm, to, cc, subject))


def inbox(p: Provider, user: str) -> list[bytes]:
    assert p.server is not None
    with imaplib.IMAP4_SSL("127.0.0.1", p.server.port("imaps"), ssl_context=tls(p)) as imap:
        imap.login(p.addr(user), PASSWORD)
        imap.select("INBOX")
        _, data = imap.search(None, "ALL")
        out = []
        for num in data[0].split():
            _, msg = imap.fetch(num, "(BODY.PEEK[])")
            out.append(bytes(msg[0][1]))  # type: ignore[index]
        return out


def wait_for(pred: Callable[[], Any], timeout: float = 30.0) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = pred()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError("condition not met in time")
        time.sleep(0.2)


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
    time.sleep(1)
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
        openssl_ok(raw_of(raws, Ricevuta.AVVENUTA_CONSEGNA, rcpt), issuer.cfg.tls.ca, tmp_path)
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
        openssl_ok(env_raw, a.cfg.tls.ca, tmp_path)
