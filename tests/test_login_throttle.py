"""Login throttling, connection limits and STARTTLS injection against a running pecd, on loopback
with real TLS: smtplib and raw sockets as the clients."""

from __future__ import annotations

import asyncio
import base64
import itertools
import smtplib
import socket
import ssl
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from argon2 import PasswordHasher

from helpers import AppThread
from pecd.clock import SystemClock
from pecd.config import Config, load_config
from pecd.devinit import config_text, init_installation
from pecd.guard import Guard
from pecd.runtime.smtp import Reply
from pecd.store.accounts import Accounts
from pecd.store.db import Database, migrate_async

DOMAIN = "pec.example.test"
PASSWORD = "correct horse battery"
ALICE = f"alice@{DOMAIN}"
PER_ADDRESS = 4
DISCONNECT_AFTER = 5

SECURITY = f"""
[security]
delay_after_failures = 3
delay_base_seconds = 0.001
delay_max_seconds = 0.016
disconnect_after_failures = {DISCONNECT_AFTER}
max_connections_per_address = {PER_ADDRESS}
max_connections = 50
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def install(directory: Path) -> Config:
    """An installation with SMTPS, submission and reception listeners (no IMAP), mailbox alice."""
    await init_installation(
        directory, domain=DOMAIN, name="Example PEC S.p.A.", clock=SystemClock(), demo=False
    )
    ports = {"smtps": free_port(), "submission": free_port(), "imaps": free_port()}
    text = config_text(domain=DOMAIN, name="Example PEC S.p.A.", ports=ports)
    text = text.replace(f'imaps = "127.0.0.1:{ports["imaps"]}"', "")
    text = text.replace(
        'hostname = "localhost"', f'hostname = "localhost"\nreception = "127.0.0.1:{free_port()}"'
    )
    (directory / "pecd.toml").write_text(text + SECURITY, "utf-8")
    cfg = load_config(directory / "pecd.toml")
    await migrate_async(cfg.database_url)
    db = await Database.open(cfg.database_url)
    try:
        # Cheap argon2 parameters in the stored hash: 200 wrong guesses stay fast.
        cheap = PasswordHasher(time_cost=1, memory_cost=64, parallelism=1)
        await Accounts(db, hasher=cheap).add_mailbox(ALICE, PASSWORD)
    finally:
        await db.close()
    return cfg


class Server(AppThread):
    """pecd's App in a thread with its own event loop."""

    @property
    def guard(self) -> Guard:
        assert self.app is not None and self.app.access is not None
        return self.app.access.guard


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    cfg = asyncio.run(install(tmp_path_factory.mktemp("throttle")))
    srv = Server(cfg).start()
    try:
        yield srv
    finally:
        srv.stop()


def client_tls() -> ssl.SSLContext:
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    return ctx


def plain(password: str, user: str = ALICE) -> str:
    return "PLAIN " + base64.b64encode(f"\0{user}\0{password}".encode()).decode()


def connect(port: int, source: str = "127.0.0.1") -> socket.socket:
    return socket.create_connection(("127.0.0.1", port), timeout=10, source_address=(source, 0))


def read_reply(f: Any) -> bytes:
    """One whole SMTP reply (every line of a multiline one), b"" at EOF."""
    out = b""
    while True:
        line: bytes = f.readline()
        out += line
        if not line or line[3:4] != b"-":
            return out


@pytest.mark.slow
def test_wrong_passwords_are_slowed_down_then_disconnected(server: Server) -> None:
    guard = server.guard
    peer = "127.0.0.1"
    port = server.port("smtps")
    attempts = 0
    connections = 0
    replies: list[int] = []
    while attempts < 200:
        connections += 1
        with smtplib.SMTP_SSL("127.0.0.1", port, context=client_tls(), timeout=30) as smtp:
            smtp.ehlo()
            for _ in range(DISCONNECT_AFTER):
                code, _msg = smtp.docmd("AUTH", plain(f"wrong-{attempts}"))
                attempts += 1
                replies.append(code)
                if code == 421:
                    break
            # The connection is closed by the server after the 421.
            with pytest.raises(smtplib.SMTPServerDisconnected):
                smtp.noop()
                smtp.noop()
    # Every connection: four 535, then 421 on the fifth failure.
    assert connections == 40
    per_conn = [535] * (DISCONNECT_AFTER - 1) + [421]
    assert replies == per_conn * connections
    assert guard.failures(peer) == 200
    assert guard.failures(account=ALICE) == 200
    # The delay owed grows with the failures (by count: 0, 0, 0, 1 ms, 2, 4, 8, 16, 16, …) and
    # the attempts did wait.
    owed = list(guard.owed)[-200:]
    assert owed == [guard.delay_for(n) for n in range(200)]
    assert owed[:3] == [0.0, 0.0, 0.0]
    assert owed[3:8] == [0.001, 0.002, 0.004, 0.008, 0.016]
    assert all(a <= b for a, b in itertools.pairwise(owed))
    assert len(guard.waits) >= 150
    # The right password from another address is not held back by the address's record,
    # and a success forgets the failures.
    with smtplib.SMTP_SSL(
        "127.0.0.1", port, context=client_tls(), timeout=30, source_address=("127.0.0.2", 0)
    ) as smtp:
        smtp.ehlo()
        code, _ = smtp.docmd("AUTH", plain(PASSWORD))
        assert code == 235
    assert guard.failures(peer) == 200  # 127.0.0.1 was not the one that logged in
    assert guard.failures(account=ALICE) == 0


@pytest.mark.parametrize("listener", ["submission", "reception", "smtps"])
def test_connection_limit_per_address(server: Server, listener: str) -> None:
    port = server.port(listener)
    source = {"submission": "127.0.0.3", "reception": "127.0.0.4", "smtps": "127.0.0.5"}[listener]
    wrap = (lambda s: client_tls().wrap_socket(s)) if listener == "smtps" else (lambda s: s)
    open_: list[socket.socket] = []
    try:
        for _ in range(PER_ADDRESS):
            s = wrap(connect(port, source))
            open_.append(s)
            assert read_reply(s.makefile("rb")).startswith(b"220 ")
        extra = wrap(connect(port, source))
        f = extra.makefile("rb")
        assert read_reply(f) == Reply.TOO_MANY_CONNECTIONS.encode() + b"\r\n"
        assert f.readline() == b""  # and closed
        extra.close()
        # Another address is still let in.
        other = wrap(connect(port, "127.0.0.6"))
        assert read_reply(other.makefile("rb")).startswith(b"220 ")
        other.close()
        # Once one closes, the address gets in again (the server sees the close soon after).
        open_.pop().close()
        for _ in range(200):
            again = wrap(connect(port, source))
            reply = read_reply(again.makefile("rb"))
            again.close()
            if reply.startswith(b"220 "):
                break
            threading.Event().wait(0.01)
        else:
            pytest.fail("the address was not let in again after a connection closed")
    finally:
        for s in open_:
            s.close()


@pytest.mark.parametrize("listener", ["submission", "reception"])
def test_starttls_command_injection_is_refused(server: Server, listener: str) -> None:
    """CVE-2011-0411: a command sent in plain text after STARTTLS, in the same packet, must not
    run inside the TLS session."""
    s = connect(server.port(listener), "127.0.0.7")
    f = s.makefile("rb")
    assert read_reply(f).startswith(b"220 ")
    s.sendall(b"EHLO attacker.test\r\n")
    assert b"STARTTLS" in read_reply(f)
    s.sendall(b"STARTTLS\r\nMAIL FROM:<" + ALICE.encode() + b">\r\n")
    assert read_reply(f) == Reply.PIPELINED_STARTTLS.encode() + b"\r\n"
    assert f.readline() == b""  # closed: no TLS session in which the MAIL could run
    s.close()


@pytest.mark.parametrize("listener", ["submission", "reception"])
def test_starttls_without_injection_still_works(server: Server, listener: str) -> None:
    with smtplib.SMTP("127.0.0.1", server.port(listener), timeout=30) as smtp:
        smtp.ehlo()
        smtp.starttls(context=client_tls())
        smtp.ehlo()
        code, _ = smtp.mail(ALICE)
        if listener == "submission":
            assert code == 530  # not logged in
        else:
            assert code == 250
