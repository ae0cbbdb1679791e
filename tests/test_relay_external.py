"""Relay to ordinary mail: an esterno recipient gets the transport envelope at a real SMTP sink."""

from __future__ import annotations

import asyncio
import smtplib
import ssl
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from aiosmtpd.controller import Controller

from helpers import DOMAIN, PASSWORD, fetch_all, free_port, message, wait_for, wait_settled
from helpers import AppThread as Server
from helpers import install_e2e as _install
from pecd.pec.classify import classify
from pecd.pec.vocab import DestinatarioTipo, Kind, Ricevuta


class Sink:
    """An ordinary SMTP server on loopback that keeps what it gets (like Postfix's smtp-sink)."""

    def __init__(self) -> None:
        self.messages: list[tuple[str, list[str], bytes]] = []
        self.lock = threading.Lock()

    async def handle_DATA(self, server: object, session: object, envelope: object) -> str:
        with self.lock:
            self.messages.append(
                (envelope.mail_from, list(envelope.rcpt_tos), envelope.original_content)  # type: ignore[attr-defined]
            )
        return "250 2.0.0 OK"


@pytest.fixture
def sink() -> Iterator[tuple[Sink, int]]:
    handler = Sink()
    port = free_port()
    ctl = Controller(handler, hostname="127.0.0.1", port=port)
    ctl.start()
    try:
        yield handler, port
    finally:
        ctl.stop()


def test_external_recipient_gets_the_envelope_as_ordinary_mail(
    tmp_path: Path, sink: tuple[Sink, int]
) -> None:
    handler, port = sink
    extra = f'\n[relay]\nstarttls = "off"\n\n[routes]\n"example.org" = "127.0.0.1:{port}"\n'
    cfg = asyncio.run(_install(tmp_path / "inst", None, extra=extra))
    srv = Server(cfg).start()
    try:
        alice, bob, ext = f"alice@{DOMAIN}", f"bob@{DOMAIN}", "someone@example.org"
        raw = message(alice, [bob, ext], [], "Misto")
        ctx = ssl.create_default_context(cafile=str(cfg.tls.ca))
        with smtplib.SMTP_SSL("127.0.0.1", srv.port("smtps"), context=ctx) as smtp:
            smtp.login(alice, PASSWORD)
            smtp.sendmail(alice, [bob, ext], raw)
        wait_for(lambda: handler.messages)
        inbox = wait_for(lambda: (m := fetch_all(srv, "alice")) and len(m) >= 2 and m)
        wait_settled(srv)  # nothing more may come: no receipt is owed for the esterno recipient
        inbox = fetch_all(srv, "alice")
    finally:
        srv.stop()
    (mail_from, rcpts, data), *more = handler.messages
    assert not more and rcpts == [ext] and mail_from == alice  # reverse path unchanged
    env = classify(data)
    assert env.kind is Kind.TRANSPORT_ENVELOPE and env.is_valid_pec
    assert env.daticert is not None
    tipo = {d.address: d.tipo for d in env.daticert.destinatari}
    assert tipo == {bob: DestinatarioTipo.CERTIFICATO, ext: DestinatarioTipo.ESTERNO}
    kinds = sorted(classify(m).ricevuta.value for m in inbox)  # type: ignore[union-attr]
    assert kinds == [Ricevuta.ACCETTAZIONE.value, Ricevuta.AVVENUTA_CONSEGNA.value]


class RefusingSink(Sink):
    """An ordinary server that refuses one recipient for good."""

    async def handle_RCPT(
        self, server: object, session: object, envelope: object, address: str, options: list[str]
    ) -> str:
        if address.startswith("nobody@"):
            return "550 5.1.1 <nobody@example.org>: Recipient address rejected: User unknown"
        envelope.rcpt_tos.append(address)  # type: ignore[attr-defined]
        return "250 2.1.5 OK"


def test_an_ordinary_recipient_refused_for_good_gets_the_sender_a_status_notification(
    tmp_path: Path,
) -> None:
    """No PEC notice is owed for an esterno recipient, but the sender must not be left in the
    dark: an RFC 3464 delivery status notification reaches her mailbox."""
    handler, port = RefusingSink(), free_port()
    ctl = Controller(handler, hostname="127.0.0.1", port=port)
    ctl.start()
    extra = f'\n[relay]\nstarttls = "off"\n\n[routes]\n"example.org" = "127.0.0.1:{port}"\n'
    cfg = asyncio.run(_install(tmp_path / "inst", None, extra=extra))
    srv = Server(cfg).start()
    try:
        alice, nobody, ok = f"alice@{DOMAIN}", "nobody@example.org", "someone@example.org"
        ctx = ssl.create_default_context(cafile=str(cfg.tls.ca))
        with smtplib.SMTP_SSL("127.0.0.1", srv.port("smtps"), context=ctx) as smtp:
            smtp.login(alice, PASSWORD)
            smtp.sendmail(alice, [nobody, ok], message(alice, [nobody, ok], [], "Ordinaria"))
        wait_for(lambda: len(fetch_all(srv, "alice")) >= 2)
        wait_settled(srv)
        inbox = fetch_all(srv, "alice")
    finally:
        srv.stop()
        ctl.stop()
    assert [rcpts for _, rcpts, _ in handler.messages] == [[ok]]
    receipts = [m for m in inbox if classify(m).ricevuta is not None]
    assert [classify(m).ricevuta for m in receipts] == [Ricevuta.ACCETTAZIONE]
    [dsn] = [m for m in inbox if classify(m).ricevuta is None]
    assert b"report-type=delivery-status" in dsn and b"Auto-Submitted: auto-replied" in dsn
    assert b"Final-Recipient: rfc822; nobody@example.org" in dsn
    assert b"Status: 5.1.1" in dsn and b"someone@example.org\r\nAction" not in dsn


def test_stop_cuts_a_relay_stuck_on_a_silent_server(tmp_path: Path) -> None:
    """SIGTERM drains for queue.drain_seconds, then cancels the relay still waiting on a peer
    that never answers; its job stays in the queue for the next start."""
    import socket

    from pecd.store import jobs
    from pecd.store.db import Database

    black_hole = socket.socket()
    black_hole.bind(("127.0.0.1", 0))
    black_hole.listen(4)
    port = black_hole.getsockname()[1]
    extra = f'\n[relay]\nstarttls = "off"\ntimeout_seconds = 120\n\n[routes]\n"slow.example" = "127.0.0.1:{port}"\n'
    cfg = asyncio.run(_install(tmp_path / "inst", None, extra=extra, queue="drain_seconds = 1"))
    assert cfg.queue.drain_seconds == 1
    srv = Server(cfg).start()
    hole: socket.socket | None = None
    try:
        alice = f"alice@{DOMAIN}"
        ctx = ssl.create_default_context(cafile=str(cfg.tls.ca))
        with smtplib.SMTP_SSL("127.0.0.1", srv.port("smtps"), context=ctx) as smtp:
            smtp.login(alice, PASSWORD)
            smtp.sendmail(
                alice, ["x@slow.example"], message(alice, ["x@slow.example"], [], "Lento")
            )
        wait_for(lambda: fetch_all(srv, "alice"))  # accepted
        black_hole.settimeout(30)
        hole, _ = black_hole.accept()  # the relay is now talking to the hole, which never answers
    finally:
        srv.stop()
        black_hole.close()
        if hole is not None:
            hole.close()
    assert not srv.thread.is_alive()

    async def relay_jobs() -> list[str]:
        db = await Database.open(cfg.database_url)
        try:
            async with db.read_session() as s:
                return [j.state for j in await jobs.list_jobs(s, kinds=["relay"])]
        finally:
            await db.close()

    assert asyncio.run(relay_jobs()) == ["running"]  # released at the next start


class SlowSink(Sink):
    async def handle_DATA(self, server: object, session: object, envelope: object) -> str:
        await asyncio.sleep(0.3)  # stays: the slow destination under test
        return await super().handle_DATA(server, session, envelope)


def test_a_busy_destination_makes_relays_wait_not_bounce(tmp_path: Path) -> None:
    """With one connection allowed per destination, sends beyond it wait for the connection
    to free instead of failing at once into the retry backoff."""
    from pecd.runtime import relay

    handler = SlowSink()
    port = free_port()
    ctl = Controller(handler, hostname="127.0.0.1", port=port)
    ctl.start()
    try:
        extra = (
            f'\n[relay]\nstarttls = "off"\nmax_per_destination = 1\n\n'
            f'[routes]\n"example.org" = "127.0.0.1:{port}"\n'
        )
        cfg = asyncio.run(_install(tmp_path / "inst", None, extra=extra))

        async def three() -> list[object]:
            client = relay.RelayClient(cfg, "pecd.test")
            return await asyncio.gather(
                *(
                    client.transmit(
                        "example.org", f"a{i}@{DOMAIN}", ["x@example.org"], b"S: x\r\n\r\nx\r\n"
                    )
                    for i in range(3)
                ),
                return_exceptions=True,
            )

        results = asyncio.run(three())
    finally:
        ctl.stop()
    assert results == [{}, {}, {}]
    assert len(handler.messages) == 3
