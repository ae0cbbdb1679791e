"""The mailbox process: IMAP and POP3 apart from SMTP, kept alive by ``pecd serve``.

Attacks on the mailbox protocols, a stuck event loop (SIGSTOP) and a crash (SIGKILL) of the
mailbox process never stop the access point or the reception point, and a new mailbox process
serves the same ports.
"""

from __future__ import annotations

import asyncio
import contextlib
import imaplib
import os
import random
import signal
import smtplib
import socket
import ssl
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from helpers import AppThread as Server
from helpers import client_tls, message, wait_for
from pecd.clock import SystemClock
from pecd.config import Config, load_config
from pecd.devinit import config_text, init_installation
from pecd.store.accounts import Accounts
from pecd.store.db import Database, migrate_async

DOMAIN = "pec.example.test"
PASSWORD = "correct horse battery"
TIMEOUT = 10


async def _install(directory: Path) -> Config:
    await init_installation(
        directory, domain=DOMAIN, name="Example PEC S.p.A.", clock=SystemClock(), demo=False
    )
    ports = {"smtps": 0, "submission": 0, "imaps": 0, "pop3s": 0, "reception": 0}
    text = config_text(domain=DOMAIN, name="Example PEC S.p.A.", ports=ports)
    text = text.replace('imaps = "127.0.0.1:0"\n', 'imaps = "127.0.0.1:0"\nimap = "127.0.0.1:0"\n')
    text += (
        "\n[queue]\nbase_delay_seconds = 0.2\n"
        "\n[mailbox]\nheartbeat_seconds = 0.2\nheartbeat_timeout_seconds = 5\n"
        # These tests are about isolation: the fuzz's failed logins must not make the checks
        # after it wait out login delays (throttling has tests of its own).
        "\n[security]\ndelay_after_failures = 1000000\n"
    )
    (directory / "pecd.toml").write_text(text, "utf-8")
    cfg = load_config(directory / "pecd.toml")
    await migrate_async(cfg.database_url)
    db = await Database.open(cfg.database_url)
    try:
        acc = Accounts(db)
        for user in ("alice", "bob"):
            await acc.add_mailbox(f"{user}@{DOMAIN}", PASSWORD)
    finally:
        await db.close()
    return cfg


@pytest.fixture
def srv(tmp_path: Path) -> Iterator[Server]:
    cfg = asyncio.run(_install(tmp_path / "inst"))
    server = Server(cfg).start()
    try:
        yield server
    finally:
        server.stop()


def _supervisor(srv: Server):  # type: ignore[no-untyped-def]
    assert srv.app is not None and srv.app.mailboxes is not None
    return srv.app.mailboxes


def _imap_login(srv: Server) -> None:
    with imaplib.IMAP4_SSL(
        "127.0.0.1", srv.port("imaps"), ssl_context=client_tls(srv.cfg), timeout=TIMEOUT
    ) as imap:
        imap.login(f"alice@{DOMAIN}", PASSWORD)
        typ, _ = imap.select("INBOX")
        assert typ == "OK"


def _smtp_answers(srv: Server) -> float:
    """Submit one PEC over SMTPS; the time from connect to the 250 (returned, not asserted)."""
    start = time.monotonic()
    with smtplib.SMTP_SSL(
        "127.0.0.1", srv.port("smtps"), context=client_tls(srv.cfg), timeout=TIMEOUT
    ) as smtp:
        smtp.login(f"alice@{DOMAIN}", PASSWORD)
        raw = message(f"alice@{DOMAIN}", [f"bob@{DOMAIN}"], [], f"alive {time.time()}")
        smtp.sendmail(f"alice@{DOMAIN}", [f"bob@{DOMAIN}"], raw)
    return time.monotonic() - start


def _reception_answers(srv: Server) -> float:
    """An ordinary (not PEC) message to the reception point: it must be taken (250)."""
    start = time.monotonic()
    with smtplib.SMTP("127.0.0.1", srv.port("reception"), timeout=TIMEOUT) as smtp:
        smtp.ehlo("peer.example")
        raw = message("someone@elsewhere.example", [f"bob@{DOMAIN}"], [], "ordinary mail")
        smtp.sendmail("someone@elsewhere.example", [f"bob@{DOMAIN}"], raw)
    return time.monotonic() - start


def _rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError("no VmRSS")


def test_imap_is_served_by_a_process_of_its_own(srv: Server) -> None:
    sup = _supervisor(srv)
    assert sup.pid is not None and sup.pid != os.getpid()
    _imap_login(srv)


def test_a_stuck_mailbox_process_is_replaced_and_smtp_keeps_answering(srv: Server) -> None:
    sup = _supervisor(srv)
    first = sup.pid
    assert first is not None
    os.kill(first, signal.SIGSTOP)  # its event loop stops turning, as in an endless loop
    try:
        # The access point and the reception point answer while the mailbox process is stuck.
        _smtp_answers(srv)
        _reception_answers(srv)
        wait_for(lambda: sup.pid != first and sup.restarts >= 1, timeout=30)
    finally:
        if sup.pid == first:
            os.kill(first, signal.SIGCONT)
    # The new process serves the same port; a client that connects now logs in.
    wait_for(lambda: _try(lambda: _imap_login(srv)), timeout=30)


def test_a_killed_mailbox_process_is_restarted_on_the_same_ports(srv: Server) -> None:
    sup = _supervisor(srv)
    ports = dict(sup.ports)
    first = sup.pid
    assert first is not None
    os.kill(first, signal.SIGKILL)
    wait_for(lambda: sup.pid != first and sup.restarts >= 1, timeout=30)
    assert sup.ports == ports
    wait_for(lambda: _try(lambda: _imap_login(srv)), timeout=30)


def test_the_mailbox_process_stops_with_the_server(tmp_path: Path) -> None:
    cfg = asyncio.run(_install(tmp_path / "inst"))
    server = Server(cfg).start()
    pid = _supervisor(server).pid
    assert pid is not None
    server.stop()
    assert not Path(f"/proc/{pid}").exists() or _zombie(pid)


def _zombie(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().split()[2] == "Z"
    except FileNotFoundError:
        return True


def _try(fn) -> bool:  # type: ignore[no-untyped-def]
    try:
        fn()
    except (OSError, imaplib.IMAP4.error, ssl.SSLError):
        return False
    return True


def _tls_client(port: int, cfg: Config) -> ssl.SSLSocket:
    raw = socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT)
    return client_tls(cfg).wrap_socket(raw, server_hostname="localhost")


def _plain_client(port: int) -> socket.socket:
    return socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT)


def _attack(
    sock: socket.socket | ssl.SSLSocket,
    payloads: list[bytes],
    stop: threading.Event,
    started: list[bool],
) -> None:
    """Send the hostile commands, then keep streaming literal bytes until told to stop."""
    try:
        sock.recv(4096)  # greeting (or the answer to a NOOP sent after a login)
        for p in payloads:
            sock.sendall(p)
        started.append(True)
        junk = b"x" * 65536
        while not stop.is_set():
            sock.sendall(junk)
    except OSError:
        pass  # the server closed the connection: what it should do
    finally:
        sock.close()


@pytest.mark.slow
def test_attacks_on_imap_leave_smtp_answering_and_memory_bounded(srv: Server) -> None:
    sup = _supervisor(srv)
    assert sup.pid is not None
    before = _rss_kib(sup.pid)
    stop = threading.Event()
    attacks = [
        (_tls_client(srv.port("imaps"), srv.cfg), [b"a1 SELECT &Jjo\r\n"]),
        (_tls_client(srv.port("imaps"), srv.cfg), [b'a1 EXAMINE "&Jjo"\r\n']),
        (_tls_client(srv.port("imaps"), srv.cfg), [b"a1 LOGIN x {999999999+}\r\n"]),
        (_plain_client(srv.port("imap")), [b"a1 LOGIN x {999999999+}\r\n"]),
        (_plain_client(srv.port("imap")), [b"a1 SELECT &Jjo\r\n"]),
    ]
    started: list[bool] = []
    threads = [
        threading.Thread(target=_attack, args=(s, p, stop, started), daemon=True)
        for s, p in attacks
    ]
    # A logged-in client announcing an APPEND one byte over the limit (100 MiB by default): it is
    # refused before a byte of it is read, and what follows is read as (too long) command lines.
    over = b"a2 APPEND INBOX {104857601+}\r\n"
    big = _tls_client(srv.port("imaps"), srv.cfg)
    big.recv(4096)
    big.sendall(f'a1 LOGIN alice@{DOMAIN} "{PASSWORD}"\r\n'.encode())
    assert b"a1 OK" in _read_until(big, b"a1 ")
    big.sendall(b"a0 NOOP\r\n")  # _attack reads one answer first, as for a greeting
    threads.append(threading.Thread(target=_attack, args=(big, [over], stop, started), daemon=True))
    # The same over the STARTTLS port: TLS first, then the login and the oversized APPEND.
    plain = _plain_client(srv.port("imap"))
    plain.recv(4096)
    plain.sendall(b"s1 STARTTLS\r\n")
    assert b"s1 OK" in _read_until(plain, b"s1 ")
    upgraded = client_tls(srv.cfg).wrap_socket(plain, server_hostname="localhost")
    upgraded.sendall(f'a1 LOGIN alice@{DOMAIN} "{PASSWORD}"\r\n'.encode())
    assert b"a1 OK" in _read_until(upgraded, b"a1 ")
    upgraded.sendall(b"a0 NOOP\r\n")  # _attack reads one answer first, as for a greeting
    threads.append(
        threading.Thread(
            target=_attack,
            args=(upgraded, [over], stop, started),
            daemon=True,
        )
    )
    for t in threads:
        t.start()
    try:
        wait_for(lambda: len(started) == len(threads), TIMEOUT, "every attack under way")
        smtp_s = _smtp_answers(srv)
        reception_s = _reception_answers(srv)
        print(f"SMTPS submission {smtp_s:.3f} s, reception {reception_s:.3f} s under attack")
        # IMAP itself keeps serving others.
        _imap_login(srv)
    finally:
        stop.set()
        for t in threads:
            t.join(TIMEOUT)
    # Nothing had to be killed: the mailbox process refused every attack itself.
    assert sup.restarts == 0
    assert sup.pid is not None
    grown = _rss_kib(sup.pid) - before
    print(f"mailbox process grew by {grown} KiB")
    assert grown < 64 * 1024, f"the mailbox process grew by {grown} KiB under attack"


def _read_until(sock: socket.socket | ssl.SSLSocket, marker: bytes) -> bytes:
    data = b""
    while marker not in data:
        chunk = sock.recv(4096)
        if not chunk:
            break
        data += chunk
    return data


_IMAP_SEEDS = [
    b"a1 CAPABILITY",
    b"a1 NOOP",
    b'a1 LOGIN "alice@pec.example.test" "correct horse battery"',
    b"a1 AUTHENTICATE PLAIN",
    b"a1 SELECT INBOX",
    b'a1 EXAMINE "&Jjo"',
    b'a1 LIST "" *',
    b"a1 STATUS INBOX (MESSAGES UIDNEXT)",
    b"a1 FETCH 1:* (FLAGS BODYSTRUCTURE BODY.PEEK[1.MIME])",
    b"a1 UID SEARCH ALL",
    b"a1 APPEND INBOX {5}\r\nhello",
    b"a1 APPEND INBOX {10+}\r\n0123456789",
    b"a1 STORE 1 +FLAGS (\\Seen $Forwarded)",
    b"a1 GETQUOTAROOT INBOX",
    b"a1 IDLE\r\nDONE",
    b"a1 STARTTLS",
    b"a1 LOGOUT",
]
_POP3_SEEDS = [
    b"CAPA",
    b"USER alice@pec.example.test",
    b"PASS correct horse battery",
    b"AUTH PLAIN",
    b"STAT",
    b"LIST",
    b"UIDL 1",
    b"RETR 1",
    b"TOP 1 0",
    b"DELE 1",
    b"RSET",
    b"NOOP",
    b"STLS",
    b"QUIT",
]
_NASTY = [
    b"\x00",
    b"\xff",
    b"{4294967296}",
    b"{99999999999999999999+}",
    b"&",
    b"&-",
    b"(",
    b")",
    b'"',
    b"\\",
    b"*",
    b"%",
    b"\r",
    b"\n",
    b" ",
    b"~{3}",
    b"1:4294967295",
    b"BODY[1.2.3.4.5.6]",
]


def _mutate(rng: random.Random, seeds: list[bytes]) -> bytes:
    line = bytearray(rng.choice(seeds))
    for _ in range(rng.randint(0, 4)):
        op = rng.randrange(4)
        pos = rng.randint(0, len(line))
        if op == 0:
            line[pos:pos] = rng.choice(_NASTY)
        elif op == 1 and line:
            del line[pos : pos + rng.randint(1, 8)]
        elif op == 2:
            line[pos:pos] = bytes(rng.randrange(256) for _ in range(rng.randint(1, 16)))
        else:
            line[pos:pos] = line[: rng.randint(0, len(line))]
    return bytes(line) + b"\r\n"


def _fuzz_session(
    port: int, cfg: Config, seeds: list[bytes], rng: random.Random, tls: bool
) -> None:
    sock: socket.socket | ssl.SSLSocket = _tls_client(port, cfg) if tls else _plain_client(port)
    sock.settimeout(2)
    try:
        sock.recv(4096)
        for _ in range(rng.randint(1, 12)):
            sock.sendall(_mutate(rng, seeds))
            # A timeout: the server waits for a literal or a continuation; the next line feeds it.
            with contextlib.suppress(TimeoutError):
                sock.recv(65536)
    except (OSError, ssl.SSLError):
        pass  # closed by the server: allowed
    finally:
        sock.close()


@pytest.mark.slow
def test_fuzzed_imap_and_pop3_lines_never_kill_or_stall_the_mailbox_process(srv: Server) -> None:
    """Random and mutated command lines, before and after login, on every mailbox listener,
    for a bounded number of sessions: the process is never restarted and keeps answering."""
    sup = _supervisor(srv)
    pid = sup.pid
    rng = random.Random(20261130)
    targets = [
        (srv.port("imaps"), _IMAP_SEEDS, True),
        (srv.port("imap"), _IMAP_SEEDS, False),
        (srv.port("pop3s"), _POP3_SEEDS, True),
    ]
    deadline = time.monotonic() + 20
    sessions = 0
    while time.monotonic() < deadline and sessions < 400:
        port, seeds, tls = rng.choice(targets)
        _fuzz_session(port, srv.cfg, seeds, rng, tls)
        sessions += 1
    print(f"{sessions} fuzzed sessions")
    assert sessions >= 20  # the fuzz really ran (a server that hangs would time every one out)
    assert sup.restarts == 0 and sup.pid == pid
    _imap_login(srv)
    import poplib

    pop = poplib.POP3_SSL(
        "127.0.0.1", srv.port("pop3s"), context=client_tls(srv.cfg), timeout=TIMEOUT
    )
    try:
        pop.user(f"alice@{DOMAIN}")
        pop.pass_(PASSWORD)
        pop.stat()
    finally:
        pop.quit()
    _smtp_answers(srv)
