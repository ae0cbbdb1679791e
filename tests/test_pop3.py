"""Pop3Service on loopback with real TLS: poplib, raw sockets, fetchmail and curl as clients.

Also the protocol core without sockets (transcripts), the dot-stuffing reader, and a bounded
hypothesis fuzz of command lines against the core and against the live server.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import io
import itertools
import os
import poplib
import shutil
import socket
import ssl
import subprocess
import threading
from collections.abc import Iterator, Sequence
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from helpers import (
    BackgroundService,
    FakeAccounts,
    ImapServer,
    Pki,
    every_kind,
    make_pki,
    openssl_verify,
)
from pecd.config import MailboxConfig, SecurityConfig
from pecd.guard import Guard
from pecd.mailbox import uidlist
from pecd.mailbox.maildir import MaildirStore
from pecd.pec.pki import DevPki
from pecd.pop3 import Pop3Service
from pecd.pop3.protocol import (
    MAX_BAD_LINES,
    Close,
    Login,
    LoginFailure,
    Message,
    Pop3Session,
    Retrieve,
    Send,
    StartTls,
    Update,
    uidl_of,
)
from pecd.pop3.wire import WireReader

TIMEOUT = 10

# -- the server in a background event loop ----------------------------------------------------


class Server(BackgroundService[Pop3Service]):
    def __init__(
        self,
        store: MaildirStore,
        accounts: FakeAccounts,
        pki: Pki,
        *,
        guard: Guard | None = None,
        limits: MailboxConfig | None = None,
    ) -> None:
        self.store = store
        self.accounts = accounts
        self.pki = pki
        service = Pop3Service(
            store=store,
            auth=accounts,
            tls_context=pki.server_context(),
            guard=guard,
            limits=limits or MailboxConfig(),
            host="127.0.0.1",
            port=0,
            stls_port=0,
            hostname="localhost",
        )
        super().__init__(service)
        self._users = itertools.count(1)
        self._keys = itertools.count(1)

    def __enter__(self) -> Server:
        super().__enter__()
        self.pop3s_port, self.pop3_port = self.service.bound_ports
        return self

    def new_user(self) -> tuple[str, str]:
        n = next(self._users)
        address, password = f"user{n}@example.org", f"secret {n}"  # a space on purpose
        self.accounts.passwords[address] = password
        self.store.ensure(address)
        return address, password

    def deliver(self, address: str, data: bytes) -> Path:
        return self.store.deliver(address, f"k{next(self._keys)}", data).path

    def wait_unlocked(self, address: str) -> None:
        """Until the server has seen a dropped connection and released its maildrop lock."""
        for _ in range(1000):
            if address not in self.service.locks:
                return
            threading.Event().wait(0.01)
        raise AssertionError(f"{address} still locked")

    def pop3s(self) -> poplib.POP3_SSL:
        return poplib.POP3_SSL(
            "127.0.0.1", self.pop3s_port, context=self.pki.client_context(), timeout=TIMEOUT
        )

    def pop3(self) -> poplib.POP3:
        return poplib.POP3("127.0.0.1", self.pop3_port, timeout=TIMEOUT)

    @contextlib.contextmanager
    def logged_in(self, address: str, password: str) -> Iterator[poplib.POP3_SSL]:
        client = self.pop3s()
        try:
            client.user(address)
            client.pass_(password)
            yield client
        finally:
            with contextlib.suppress(Exception):
                client.close()

    def raw_tls(self) -> RawClient:
        sock = socket.create_connection(("127.0.0.1", self.pop3s_port), timeout=TIMEOUT)
        tls = self.pki.client_context().wrap_socket(sock, server_hostname="localhost")
        client = RawClient(tls)
        assert client.line().startswith(b"+OK")
        return client

    def raw_plain(self) -> RawClient:
        sock = socket.create_connection(("127.0.0.1", self.pop3_port), timeout=TIMEOUT)
        client = RawClient(sock)
        assert client.line().startswith(b"+OK")
        return client


class RawClient:
    """Line-level access to a POP3 connection."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.file = sock.makefile("rb")

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def line(self) -> bytes:
        return self.file.readline(1 << 20)

    def cmd(self, line: bytes) -> bytes:
        self.send(line + b"\r\n")
        return self.line()

    def multi(self) -> list[bytes]:
        lines = []
        while (line := self.line()) != b".\r\n":
            assert line, "connection closed inside a multi-line response"
            lines.append(line)
        return lines

    def closed(self) -> bool:
        """True when the server closes the connection (after any lines still in flight)."""
        try:
            while self.line():
                pass
        except (ConnectionError, ssl.SSLError):
            pass
        return True

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.file.close()
        with contextlib.suppress(Exception):
            self.sock.close()


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return make_pki(tmp_path_factory.mktemp("pki"))


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory, pki: Pki) -> Iterator[Server]:
    base = tmp_path_factory.mktemp("pop3")
    guard = Guard(SecurityConfig(delay_after_failures=100, disconnect_after_failures=3))
    with Server(MaildirStore(base / "mail"), FakeAccounts(), pki, guard=guard) as srv:
        yield srv


@pytest.fixture
def user(server: Server) -> tuple[str, str]:
    return server.new_user()


def retr(client: poplib.POP3, n: int) -> bytes:
    """RETR through poplib, the lines joined back with CRLF (poplib removes the stuffing)."""
    _, lines, _ = client.retr(n)
    return b"".join(line + b"\r\n" for line in lines)


PLAIN = (
    b"From: Anna <anna@example.org>\r\n"
    b"To: holder@example.org\r\n"
    b"Subject: dots\r\n"
    b"\r\n"
    b".a line starting with a dot\r\n"
    b"..two dots\r\n"
    b".\r\n"
    b"a line\r\n"
    b"second line\r\n"
    b"third line\r\n"
)

# -- every message pecd emits, downloaded and verified ------------------------------------------


def test_every_pec_kind_byte_exact_and_verifies(
    server: Server, user: tuple[str, str], dev_pki: DevPki, tmp_path: Path
) -> None:
    address, password = user
    kinds = every_kind(dev_pki)
    stored = {name: server.deliver(address, raw).read_bytes() for name, raw in kinds.items()}
    for name, raw in kinds.items():
        assert stored[name] == raw, name  # pecd builds CRLF: stored as built
    ca = tmp_path / "ca.pem"
    ca.write_bytes(dev_pki.ca.cert_pem)
    listing = uidlist.sync(server.store.folder_path(address))
    by_name = {e.name: e for e in listing.entries}
    with server.logged_in(address, password) as client:
        count, size = client.stat()
        assert count == len(kinds)
        assert size == sum(len(raw) for raw in kinds.values())
        sizes = dict(line.split() for line in client.list()[1])
        for n in range(1, count + 1):
            wire = retr(client, n)
            name = next(e.name for e in listing.entries if e.uid == listing.entries[n - 1].uid)
            assert wire == by_name[name].path.read_bytes()
            assert int(sizes[str(n).encode()]) == len(wire)
            openssl_verify(wire, ca, tmp_path)


def test_capa_before_and_after_stls(server: Server, pki: Pki) -> None:
    client = server.pop3()
    try:
        caps = client.capa()
        assert "STLS" in caps and "USER" not in caps and "SASL" not in caps
        assert {"TOP", "UIDL", "RESP-CODES", "PIPELINING", "AUTH-RESP-CODE"} <= set(caps)
        assert caps["IMPLEMENTATION"] == ["pecd"]
        client.stls(pki.client_context())
        caps = client.capa()
        assert "STLS" not in caps and "USER" in caps and caps["SASL"] == ["PLAIN"]
    finally:
        client.close()
    tls = server.pop3s()
    try:
        caps = tls.capa()
        assert "STLS" not in caps and "USER" in caps and caps["SASL"] == ["PLAIN"]
    finally:
        tls.close()


def test_no_password_before_stls(server: Server, user: tuple[str, str]) -> None:
    address, password = user
    raw = server.raw_plain()
    try:
        for line in (
            b"USER " + address.encode(),
            b"PASS " + password.encode(),
            b"AUTH PLAIN " + base64.b64encode(f"\0{address}\0{password}".encode()),
        ):
            reply = raw.cmd(line)
            assert reply.startswith(b"-ERR") and b"STLS" in reply, reply
        assert raw.cmd(b"STAT").startswith(b"-ERR")  # still not logged in
    finally:
        raw.close()


def test_stls_login_and_retrieve(server: Server, user: tuple[str, str], pki: Pki) -> None:
    address, password = user
    path = server.deliver(address, PLAIN)
    client = server.pop3()
    try:
        client.stls(pki.client_context())
        client.user(address)
        client.pass_(password)
        assert retr(client, 1) == path.read_bytes() == PLAIN
        assert client.stls is not None
        with pytest.raises(poplib.error_proto):
            client._shortcmd("STLS")  # type: ignore[attr-defined]  # not in TRANSACTION
    finally:
        client.quit()


def assert_nothing_answered_inside_tls(raw: RawClient, pki: Pki) -> None:
    """After STLS on ``raw``: the TLS handshake fails, or the connection inside TLS is closed
    without a byte (the server never answers inside TLS what was sent before it)."""
    with pytest.raises((ssl.SSLError, ConnectionError, OSError)):
        tls = pki.client_context().wrap_socket(raw.sock, server_hostname="localhost")
        tls.sendall(b"NOOP\r\n")
        answer = tls.recv(100)
        assert answer == b"", answer
        raise ConnectionError("closed")


def test_stls_injection_closes(server: Server, user: tuple[str, str], pki: Pki) -> None:
    """CVE-2011-0411: commands pipelined in plaintext after STLS must not run inside TLS."""
    address, _ = user
    raw = server.raw_plain()
    try:
        raw.send(b"STLS\r\nUSER " + address.encode() + b"\r\n")
        assert raw.line().startswith(b"+OK")
        # Whatever happens next, the USER line must never be answered inside TLS.
        assert_nothing_answered_inside_tls(raw, pki)
    finally:
        raw.close()


def test_stls_injection_in_a_second_write_closes(server: Server, pki: Pki) -> None:
    """The same, with the injected line in its own packet right behind STLS."""
    raw = server.raw_plain()
    try:
        raw.send(b"STLS\r\n")
        raw.send(b"CAPA\r\n")
        assert raw.line().startswith(b"+OK")
        # Either the CAPA was refused as plaintext (closed), or it reached the TLS layer and
        # broke the handshake; never a CAPA listing inside TLS.
        assert_nothing_answered_inside_tls(raw, pki)
    finally:
        raw.close()


def test_uidl_stable_and_equal_to_uidlist(server: Server, user: tuple[str, str]) -> None:
    address, password = user
    server.deliver(address, PLAIN)
    server.deliver(address, PLAIN.replace(b"dots", b"second"))
    with server.logged_in(address, password) as client:
        first = client.uidl()[1]
    listing = uidlist.sync(server.store.folder_path(address))
    expected = [
        f"{n} {uidl_of(e.uid, listing.uid_validity)}".encode()
        for n, e in enumerate(listing.entries, start=1)
    ]
    assert first == expected
    # Another session, and a new message: the old UIDLs stay.
    server.deliver(address, PLAIN.replace(b"dots", b"third"))
    with server.logged_in(address, password) as client:
        second = client.uidl()[1]
        assert second[:2] == first
        assert len(second) == 3 and second[2] not in first
        one = client.uidl(2)
        assert one.split()[1:] == first[1].split()
    # Deleting the first message renumbers, never re-identifies.
    with server.logged_in(address, password) as client:
        client.dele(1)
        client.quit()
    with server.logged_in(address, password) as client:
        third = client.uidl()[1]
        assert [line.split()[1] for line in third] == [line.split()[1] for line in second[1:]]


def test_uidl_is_the_imap_uid(server: Server, user: tuple[str, str]) -> None:
    """POP3 and IMAP over one Maildir: the UIDL carries the IMAP UID and UIDVALIDITY."""
    address, password = user
    for i in range(3):
        server.deliver(address, PLAIN.replace(b"dots", f"i{i}".encode()))
    imap = ImapServer(server.store, server.accounts, server.pki)
    with imap, imap.logged_in(address, password) as client:
        typ, data = client.select("INBOX")
        assert typ == "OK"
        typ, data = client.response("UIDVALIDITY")
        assert data[0] is not None
        validity = int(data[0])
        typ, data = client.uid("SEARCH", "ALL")
        assert typ == "OK" and data[0] is not None
        uids = [int(u) for u in data[0].split()]
        # IMAP marks the second one seen: the file moves to cur/ with flags.
        typ, _ = client.uid("STORE", str(uids[1]), "+FLAGS", "(\\Seen)")
        assert typ == "OK"
    with server.logged_in(address, password) as client:
        listed = [line.split()[1].decode() for line in client.uidl()[1]]
        assert listed == [uidl_of(uid, validity) for uid in uids]
        assert b"Subject: i1" in retr(client, 2)


def test_dele_quit_rset_and_drop(server: Server, user: tuple[str, str]) -> None:
    address, password = user
    for i in range(3):
        server.deliver(address, PLAIN.replace(b"dots", f"m{i}".encode()))
    # RSET restores.
    with server.logged_in(address, password) as client:
        client.dele(1)
        assert client.stat()[0] == 2
        with pytest.raises(poplib.error_proto, match="deleted"):
            client.retr(1)
        with pytest.raises(poplib.error_proto):
            client.list(1)
        client.rset()
        assert client.stat()[0] == 3
        client.quit()
    assert uidlist.sync(server.store.folder_path(address)).entries.__len__() == 3
    # A dropped connection removes nothing.
    client = server.pop3s()
    client.user(address)
    client.pass_(password)
    client.dele(1)
    client.dele(2)
    client.sock.shutdown(socket.SHUT_RDWR)  # no QUIT
    client.close()
    server.wait_unlocked(address)
    with server.logged_in(address, password) as client:  # the lock is free again
        assert client.stat()[0] == 3
        # DELE then QUIT removes.
        client.dele(2)
        assert client.quit().startswith(b"+OK")
    with server.logged_in(address, password) as client:
        assert client.stat()[0] == 2
        bodies = [retr(client, n) for n in (1, 2)]
    assert [b"Subject: m0" in bodies[0], b"Subject: m2" in bodies[1]] == [True, True]


def test_top(server: Server, user: tuple[str, str]) -> None:
    address, password = user
    server.deliver(address, PLAIN)
    header, body = PLAIN.split(b"\r\n\r\n", 1)
    with server.logged_in(address, password) as client:
        for n in (0, 1, 3, 100):
            _, lines, _ = client.top(1, n)
            got = b"".join(line + b"\r\n" for line in lines)
            want_body = b"".join(body.splitlines(keepends=True)[:n])
            assert got == header + b"\r\n\r\n" + want_body, n
        with pytest.raises(poplib.error_proto):
            client._shortcmd("TOP 1")  # type: ignore[attr-defined]
        with pytest.raises(poplib.error_proto):
            client.top(9, 1)


def test_wrong_password_and_disconnect(server: Server, user: tuple[str, str]) -> None:
    address, password = user
    client = server.pop3s()
    try:
        client.user(address)
        with pytest.raises(poplib.error_proto, match=r"\[AUTH\]"):
            client.pass_("wrong")
        with pytest.raises(poplib.error_proto, match="USER first"):
            client.pass_(password)
        client.user("nobody@example.org")
        with pytest.raises(poplib.error_proto, match=r"\[AUTH\]"):
            client.pass_(password)
        client.user(address)
        with pytest.raises(poplib.error_proto, match="too many"):
            client.pass_("wrong again")  # the guard's third failure closes
        with pytest.raises((poplib.error_proto, OSError, EOFError)):
            client.noop()
    finally:
        with contextlib.suppress(Exception):
            client.close()
    # The account store down: [SYS/TEMP], the connection stays.
    client = server.pop3s()
    try:
        client.user(address)
        with pytest.raises(poplib.error_proto, match=r"\[SYS/TEMP\]"):
            client.pass_("db-down")
        client.user(address)
        client.pass_(password)
        assert client.noop().startswith(b"+OK")
    finally:
        client.quit()


def test_auth_plain(server: Server, user: tuple[str, str]) -> None:
    address, password = user
    server.deliver(address, PLAIN)
    token = base64.b64encode(f"\0{address}\0{password}".encode())
    raw = server.raw_tls()
    try:
        assert raw.cmd(b"AUTH PLAIN " + token).startswith(b"+OK")
        assert raw.cmd(b"STAT") == f"+OK 1 {len(PLAIN)}\r\n".encode()
        assert raw.cmd(b"QUIT").startswith(b"+OK")
    finally:
        raw.close()
    raw = server.raw_tls()
    try:
        assert raw.cmd(b"AUTH PLAIN") == b"+ \r\n"
        assert raw.cmd(b"*").startswith(b"-ERR")
        assert raw.cmd(b"AUTH PLAIN") == b"+ \r\n"
        bad = base64.b64encode(f"\0{address}\0nope".encode())
        assert raw.cmd(bad).startswith(b"-ERR [AUTH]")
        assert raw.cmd(b"AUTH PLAIN") == b"+ \r\n"
        assert raw.cmd(b"not base64!").startswith(b"-ERR")
        other = base64.b64encode(f"someone@else\0{address}\0{password}".encode())
        assert raw.cmd(b"AUTH PLAIN " + other).startswith(b"-ERR")
        assert raw.cmd(b"AUTH CRAM-MD5").startswith(b"-ERR")
        assert raw.cmd(b"AUTH") == b"+OK SASL mechanisms follow\r\n"
        assert raw.multi() == [b"PLAIN\r\n"]
        assert raw.cmd(b"AUTH PLAIN") == b"+ \r\n"
        assert raw.cmd(token).startswith(b"+OK")
        assert raw.cmd(b"LIST").startswith(b"+OK")
        assert raw.multi() == [f"1 {len(PLAIN)}\r\n".encode()]
    finally:
        raw.close()


def test_second_session_in_use(server: Server, user: tuple[str, str]) -> None:
    address, password = user
    server.deliver(address, PLAIN)
    with server.logged_in(address, password) as first:
        second = server.pop3s()
        try:
            second.user(address)
            with pytest.raises(poplib.error_proto, match=r"\[IN-USE\]"):
                second.pass_(password)
        finally:
            second.close()
        assert first.stat()[0] == 1
        first.quit()
    with server.logged_in(address, password) as third:
        assert third.stat()[0] == 1


def test_line_limits(server: Server, user: tuple[str, str]) -> None:
    address, password = user
    raw = server.raw_tls()
    try:
        assert raw.cmd(b"NOOP " + b"x" * 300).startswith(b"-ERR line too long")
        assert raw.cmd(b"CAPA").startswith(b"+OK")
        raw.multi()
        # A line far over the reader's limit is dropped as it arrives, then answered.
        assert raw.cmd(b"USER " + b"y" * 200_000).startswith(b"-ERR line too long")
        assert raw.cmd(f"USER {address}".encode()).startswith(b"+OK")
        assert raw.cmd(f"PASS {password}".encode()).startswith(b"+OK")
        replies = [raw.cmd(b"BOGUS") for _ in range(MAX_BAD_LINES - 3)]
        assert all(r.startswith(b"-ERR") for r in replies)
        assert b"too many bad commands" in raw.cmd(b"BOGUS")
        assert raw.closed()
    finally:
        raw.close()
    with server.logged_in(address, password) as client:  # the lock was released
        assert client.noop().startswith(b"+OK")


def test_pipelining(server: Server, user: tuple[str, str]) -> None:
    address, password = user
    server.deliver(address, PLAIN)
    raw = server.raw_tls()
    try:
        raw.send(f"USER {address}\r\nPASS {password}\r\nSTAT\r\nRETR 1\r\nQUIT\r\n".encode())
        assert raw.line().startswith(b"+OK")
        assert raw.line().startswith(b"+OK")
        assert raw.line() == f"+OK 1 {len(PLAIN)}\r\n".encode()
        assert raw.line() == f"+OK {len(PLAIN)} octets\r\n".encode()
        body = b"".join(raw.multi())
        assert body == PLAIN.replace(b"\r\n.", b"\r\n..")
        assert raw.line().startswith(b"+OK")
        assert raw.closed()
    finally:
        raw.close()


def test_large_message_streams(server: Server, user: tuple[str, str]) -> None:
    address, password = user
    lines = [b"From: big@example.org", b"Subject: big", b""]
    lines += [(b"." if i % 7 == 0 else b"") + b"%07d " % i + b"z" * 90 for i in range(60_000)]
    data = b"\r\n".join(lines) + b"\r\n"
    path = server.deliver(address, data)
    with server.logged_in(address, password) as client:
        resp = client.list(1)
        assert isinstance(resp, bytes) and resp.split()[2] == str(len(data)).encode()
        assert retr(client, 1) == path.read_bytes() == data


def test_message_moved_by_imap(server: Server, user: tuple[str, str]) -> None:
    """A message renamed to cur/ with flags after the listing is still served and deleted."""
    address, password = user
    path = server.deliver(address, PLAIN)
    with server.logged_in(address, password) as client:
        moved = path.parent.parent / "cur" / (path.name + ":2,S")
        path.rename(moved)
        assert retr(client, 1) == PLAIN
        client.dele(1)
        client.quit()
    assert not moved.exists()


def test_dropped_during_retr_and_store_errors(server: Server, user: tuple[str, str]) -> None:
    address, password = user
    lines = [b"Subject: big", b""] + [b"%07d " % i + b"q" * 90 for i in range(40_000)]
    server.deliver(address, b"\r\n".join(lines) + b"\r\n")
    raw = server.raw_tls()
    raw.send(f"USER {address}\r\nPASS {password}\r\nDELE 1\r\nRETR 1\r\n".encode())
    raw.send(b"RSET\r\nRETR 1\r\n")
    while not raw.line().startswith(b"+OK 4"):  # the RETR after RSET: "+OK <size> octets"
        pass
    raw.line()
    raw.sock.shutdown(socket.SHUT_RDWR)  # mid-message
    raw.close()
    server.wait_unlocked(address)
    # A listing that fails (the disk, the uidlist lock) answers [SYS/TEMP] and unlocks.
    real = server.service.maildrop

    def broken(address: str) -> tuple[Path, list[Message]]:
        raise OSError("disk on fire")

    server.service.maildrop = broken  # type: ignore[method-assign]
    try:
        client = server.pop3s()
        client.user(address)
        with pytest.raises(poplib.error_proto, match=r"\[SYS/TEMP\]"):
            client.pass_(password)
        client.close()
    finally:
        server.service.maildrop = real  # type: ignore[method-assign]
    with server.logged_in(address, password) as client:
        assert client.stat()[0] == 1


def test_prebound_sockets(tmp_path: Path, pki: Pki) -> None:
    socks = []
    for _ in range(2):
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.bind(("127.0.0.1", 0))
        sock.listen(16)
        socks.append(sock)
    accounts = FakeAccounts()
    accounts.passwords["a@example.org"] = "pw"
    store = MaildirStore(tmp_path / "mail")
    store.deliver("a@example.org", "k", PLAIN)
    service = Pop3Service(
        store=store,
        auth=accounts,
        tls_context=pki.server_context(),
        guard=None,
        limits=MailboxConfig(),
        port=None,
        sock=socks[0],
        stls_sock=socks[1],
    )

    async def run() -> list[int]:
        async with contextlib.AsyncExitStack() as stack:
            await service.start(stack)
            ports = service.bound_ports

            def client() -> bytes:
                pop = poplib.POP3("127.0.0.1", ports[1], timeout=TIMEOUT)
                pop.stls(pki.client_context())
                pop.user("a@example.org")
                pop.pass_("pw")
                data = retr(pop, 1)
                pop.quit()
                return data

            assert await asyncio.to_thread(client) == PLAIN
            return ports

    expected = [s.getsockname()[1] for s in socks]
    assert asyncio.run(run()) == expected


def test_guard_limits_connections(tmp_path: Path, pki: Pki) -> None:
    guard = Guard(SecurityConfig(max_connections_per_address=1))
    with Server(MaildirStore(tmp_path / "mail"), FakeAccounts(), pki, guard=guard) as srv:
        first = srv.raw_tls()
        try:
            sock = socket.create_connection(("127.0.0.1", srv.pop3s_port), timeout=TIMEOUT)
            tls = pki.client_context().wrap_socket(sock, server_hostname="localhost")
            with tls, tls.makefile("rb") as f:
                assert f.readline() == b"-ERR [SYS/TEMP] too many connections\r\n"
                assert f.readline() == b""
            assert first.cmd(b"NOOP").startswith(b"-ERR")  # not logged in, but answering
        finally:
            first.close()


def test_idle_timeout_closes(tmp_path: Path, pki: Pki) -> None:
    limits = MailboxConfig(idle_timeout_unauthenticated=0.2)
    with Server(MaildirStore(tmp_path / "mail"), FakeAccounts(), pki, limits=limits) as srv:
        raw = srv.raw_plain()
        try:
            assert raw.line().startswith(b"-ERR")
            assert raw.closed()
        finally:
            raw.close()


def test_shutdown_closes_sessions(tmp_path: Path, pki: Pki) -> None:
    srv = Server(MaildirStore(tmp_path / "mail"), FakeAccounts(), pki)
    with srv:
        raw = srv.raw_tls()
    try:
        assert raw.closed()
    finally:
        raw.close()


# -- third-party clients ----------------------------------------------------------------------


def test_fetchmail_downloads(
    server: Server, user: tuple[str, str], pki: Pki, tmp_path: Path
) -> None:
    fetchmail = shutil.which("fetchmail")
    assert fetchmail is not None, "fetchmail is installed by scripts/setup"
    address, password = user
    messages = [PLAIN, PLAIN.replace(b"dots", b"again")]
    for m in messages:
        server.deliver(address, m)
    home = tmp_path / "home"
    home.mkdir()
    out = tmp_path / "out"
    out.mkdir()
    rc = home / ".fetchmailrc"
    rc.write_text(
        f"set no bouncemail\n"
        f"poll localhost via 127.0.0.1 with proto POP3 port {server.pop3s_port} uidl\n"
        f'  user "{address}" there with password "{password}"\n'
        f'  options ssl sslcertck sslcertfile "{pki.ca_file}" sslcommonname localhost\n'
        f"  fetchall keep\n"
        f'  mda "cat > {out}/msg-$$"\n'
    )
    rc.chmod(0o600)
    env = {**os.environ, "HOME": str(home), "FETCHMAILHOME": str(home)}
    r = subprocess.run(
        [fetchmail, "-f", str(rc), "--nodetach", "--invisible", "-v"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert r.returncode == 0, r.stdout + r.stderr
    got = sorted(p.read_bytes().replace(b"\n", b"\r\n") for p in out.iterdir())
    assert len(got) == 2, r.stdout + r.stderr
    # fetchmail delivers with LF endings; it may add nothing else with "invisible" set.
    assert got == sorted(messages), r.stdout
    with server.logged_in(address, password) as client:  # "keep": still there
        assert client.stat()[0] == 2


def test_curl_retrieves(server: Server, user: tuple[str, str], pki: Pki) -> None:
    curl = shutil.which("curl")
    assert curl is not None
    address, password = user
    path = server.deliver(address, PLAIN)
    r = subprocess.run(
        [
            curl,
            "--silent",
            "--show-error",
            "--cacert",
            str(pki.ca_file),
            "--user",
            f"{address}:{password}",
            f"pop3s://127.0.0.1:{server.pop3s_port}/1",
        ],
        capture_output=True,
        timeout=60,
        check=False,
    )
    assert r.returncode == 0, r.stderr
    assert r.stdout == path.read_bytes()


# -- the core without sockets -----------------------------------------------------------------


def sent(effects: Sequence[object]) -> bytes:
    return b"".join(e.data for e in effects if isinstance(e, Send))


def test_core_transcript() -> None:
    s = Pop3Session(hostname="h", tls=False, stls=True, disconnect_after=2)
    assert s.greeting() == b"+OK h POP3 server ready\r\n"
    assert sent(s.receive(b"USER a\r\n")).startswith(b"-ERR TLS is required")
    effects = s.receive(b"STLS\r\n")
    assert effects == [Send(b"+OK begin TLS negotiation\r\n"), StartTls()]
    s.tls_started()
    assert sent(s.receive(b"STLS\r\n")).startswith(b"-ERR")
    assert sent(s.receive(b"user a\r\n")) == b"+OK send your password\r\n"
    assert s.receive(b"PASS p w\r\n") == [Login("a", "p w")]
    assert s.receive(b"NOOP\r\n") == []  # the login is in progress
    failed = s.login_failed(LoginFailure.BAD_CREDENTIALS)
    assert sent(failed) == b"-ERR [AUTH] authentication failed\r\n"
    s.receive(b"USER a")
    s.receive(b"PASS q")
    msgs = [
        Message(1, uidl_of(1, 7), 10, "one", Path("/x/one")),
        Message(2, uidl_of(2, 7), 20, "two", Path("/x/two")),
    ]
    assert sent(s.login_succeeded("a@b", msgs)).startswith(b"+OK maildrop locked")
    assert sent(s.receive(b"STAT")) == b"+OK 2 30\r\n"
    assert sent(s.receive(b"UIDL 2")) == b"+OK 2 0000000200000007\r\n"
    assert s.receive(b"RETR 2") == [Retrieve(msgs[1], None)]
    assert s.receive(b"TOP 1 0") == [Retrieve(msgs[0], 0)]
    assert sent(s.receive(b"DELE 1")) == b"+OK message 1 deleted\r\n"
    assert sent(s.receive(b"LIST")) == b"+OK 1 messages (20 octets)\r\n2 20\r\n.\r\n"
    assert sent(s.receive(b"DELE 1")).startswith(b"-ERR message is deleted")
    assert sent(s.receive(b"RETR 3")).startswith(b"-ERR no such message")
    assert s.receive(b"QUIT") == [Update((msgs[0],))]
    done = s.update_done(0)
    assert isinstance(done[-1], Close)


def test_core_failed_logins_close() -> None:
    s = Pop3Session(hostname="h", tls=True, stls=False, disconnect_after=2)
    for expect_close in (False, True):
        s.receive(b"USER a")
        s.receive(b"PASS b")
        effects = s.login_failed(LoginFailure.BAD_CREDENTIALS)
        assert isinstance(effects[-1], Close) is expect_close
    assert s.receive(b"NOOP") == []


@pytest.mark.parametrize("chunk", [1, 2, 3, 5, 64 * 1024])
@pytest.mark.parametrize(
    "data",
    [
        PLAIN,
        b".",
        b"",
        b"no newline at the end",
        b"a\r\n.\r\n..\r\n.x",
        b"H: v\r\n\r\n" + b"." * 10 + b"\r\n.\r\n",
        b"H: v\n\n.lf\n",
    ],
)
def test_wire_reader_stuffing(chunk: int, data: bytes) -> None:
    out = bytearray()
    reader = WireReader(io.BytesIO(data), None, chunk=chunk)
    while piece := reader.next_chunk():
        out += piece
    out += b".\r\n"
    text = bytes(out)
    # Undo as a client does: lines, drop one leading dot, stop at the lone dot.
    lines = text.split(b"\n")
    assert lines[-1] == b"" and lines[-2] in (b".\r", b".")
    body = lines[:-2]
    assert all(not line.startswith(b".") or line.startswith(b"..") for line in body)
    restored = b"\n".join(line[1:] if line.startswith(b".") else line for line in body)
    expected = data if data.endswith(b"\n") or not data else data + b"\r\n"
    assert restored + (b"\n" if body else b"") == expected


@pytest.mark.parametrize("chunk", [1, 3, 64 * 1024])
def test_wire_reader_top(chunk: int) -> None:
    header, body = PLAIN.split(b"\r\n\r\n", 1)
    for n in (0, 1, 2, 50):
        reader = WireReader(io.BytesIO(PLAIN), n, chunk=chunk)
        out = bytearray()
        while piece := reader.next_chunk():
            out += piece
        want = header + b"\r\n\r\n" + b"".join(body.splitlines(keepends=True)[:n])
        assert bytes(out) == want.replace(b"\r\n.", b"\r\n.."), (n, chunk)


# -- fuzz -------------------------------------------------------------------------------------

KEYWORDS = [
    "USER",
    "PASS",
    "AUTH",
    "APOP",
    "STLS",
    "CAPA",
    "STAT",
    "LIST",
    "UIDL",
    "RETR",
    "TOP",
    "DELE",
    "RSET",
    "NOOP",
    "QUIT",
    "LAST",
    "",
]
ARG = st.one_of(
    st.integers(-3, 2**70).map(str),
    st.text(alphabet=st.characters(codec="utf-8"), max_size=60),
    st.sampled_from(["PLAIN", "*", "=", "1 1", "0", "01", "1 -1", " ", "\t"]),
)
LINE = st.one_of(
    st.builds(
        lambda k, a: f"{k} {a}".encode("utf-8", "surrogatepass"), st.sampled_from(KEYWORDS), ARG
    ),
    st.binary(max_size=300).map(lambda b: b.replace(b"\n", b"")),
)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(LINE, max_size=20), st.booleans())
def test_fuzz_core(lines: list[bytes], logged_in: bool) -> None:
    s = Pop3Session(hostname="h", tls=True, stls=False)
    if logged_in:
        s.login_succeeded("a@b", [Message(1, uidl_of(1, 1), 5, "n", Path("/n"))])
    for line in lines:
        for effect in s.receive(line + b"\r\n"):
            if isinstance(effect, Send):
                assert effect.data[:1] in (b"+", b"-") and effect.data.endswith(b"\r\n")
            elif isinstance(effect, Login):
                s.login_failed(LoginFailure.BAD_CREDENTIALS)
            elif isinstance(effect, Update):
                s.update_done(0)


@settings(
    max_examples=40,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
@given(lines=st.lists(LINE, min_size=1, max_size=8))
def test_fuzz_live(server: Server, fuzz_user: tuple[str, str], lines: list[bytes]) -> None:
    address, password = fuzz_user
    raw = server.raw_tls()
    try:
        assert raw.cmd(f"USER {address}".encode()).startswith(b"+OK")
        assert raw.cmd(f"PASS {password}".encode()).startswith(b"+OK")
        raw.send(b"".join(line + b"\r\n" for line in lines) + b"QUIT\r\n")
        raw.sock.settimeout(TIMEOUT)
        data = b""
        while chunk := raw.sock.recv(65536):
            data += chunk
        assert data.endswith(b"\r\n")
        assert data.startswith((b"+", b"-"))
    finally:
        raw.close()
    # The server still answers.
    with server.logged_in(address, password) as client:
        assert client.noop().startswith(b"+OK")


@pytest.fixture(scope="module")
def fuzz_user(server: Server) -> tuple[str, str]:
    address, password = server.new_user()
    for i in range(3):
        server.deliver(address, PLAIN.replace(b"dots", f"f{i}".encode()))
    return address, password
