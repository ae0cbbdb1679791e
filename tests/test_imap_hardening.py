"""IMAP protocol hardening: raw-socket transcripts over TLS against an in-process ImapService.

Each defect a tester found has a transcript here: unterminated modified UTF-7 names, literals
before and after login (LITERAL-, APPENDLIMIT / TOOBIG), quota (OVERQUOTA, GETQUOTAROOT),
STARTTLS injection, idle timeouts, keywords, SPECIAL-USE, connection limits; plus a bounded
fuzz of command lines before and after login.
"""

from __future__ import annotations

import contextlib
import logging
import re
import socket
import ssl
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from helpers import PLAIN_CRLF, ImapServer, Pki, make_pki
from pecd.config import MailboxConfig, SecurityConfig
from pecd.guard import Guard
from pecd.imap.modutf7 import ModUtf7Error, decode, encode
from pecd.mailbox.maildir import MaildirStore

TIMEOUT = 10
MAX_MESSAGE = 10 * 1024 * 1024


# -- accounts with quotas ---------------------------------------------------------------------


@dataclass
class Record:
    quota_bytes: int | None


class QuotaAccounts:
    """Authenticator with a quota lookup (the shape of ``Accounts``)."""

    def __init__(self) -> None:
        self.passwords: dict[str, str] = {}
        self.quotas: dict[str, int | None] = {}

    async def authenticate(self, address: str, password: str) -> str | None:
        canonical = address.strip().lower()
        return canonical if self.passwords.get(canonical) == password else None

    async def get(self, address: str) -> Record | None:
        canonical = address.strip().lower()
        if canonical not in self.passwords:
            return None
        return Record(self.quotas.get(canonical))


# -- the server in a background event loop ----------------------------------------------------


class Server(ImapServer):
    """The helpers' IMAP server with quotas, limits and a guard of the test's choosing."""

    accounts: QuotaAccounts

    def __init__(
        self,
        base: Path,
        pki: Pki,
        *,
        limits: MailboxConfig | None = None,
        guard: Guard | None = None,
    ) -> None:
        super().__init__(
            MaildirStore(base / "mail"),
            QuotaAccounts(),
            pki,
            guard=guard,
            limits=limits,
            max_message_size=MAX_MESSAGE,
        )

    def new_user(self, quota: int | None = None) -> tuple[str, str]:
        address, password = super().new_user()
        self.accounts.quotas[address] = quota
        return address, password

    def raw(self) -> Raw:
        sock = socket.create_connection(("127.0.0.1", self.imaps_port), timeout=TIMEOUT)
        tls = self.pki.client_context().wrap_socket(sock, server_hostname="localhost")
        client = Raw(tls)
        assert client.line().startswith(b"* OK")
        return client

    def plain(self) -> Raw:
        sock = socket.create_connection(("127.0.0.1", self.imap_port), timeout=TIMEOUT)
        client = Raw(sock)
        assert client.line().startswith(b"* OK")
        return client

    def alive(self) -> None:
        """The server still answers a new connection."""
        client = self.raw()
        try:
            assert client.command(b"z NOOP")[-1].startswith(b"z OK")
        finally:
            client.close()


class Raw:
    """A line-oriented IMAP client over one socket (TLS or plain)."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.buf = b""

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def _fill(self) -> bool:
        try:
            chunk = self.sock.recv(65536)
        except (ConnectionError, ssl.SSLError):
            chunk = b""
        if not chunk:
            return False
        self.buf += chunk
        return True

    def line(self) -> bytes:
        while b"\n" not in self.buf:
            if not self._fill():
                raise EOFError(self.buf)
        line, _, self.buf = self.buf.partition(b"\n")
        return line + b"\n"

    def until_tagged(self, tag: bytes) -> list[bytes]:
        lines: list[bytes] = []
        while True:
            line = self.line()
            lines.append(line)
            if line.startswith(tag + b" "):
                return lines

    def command(self, line: bytes) -> list[bytes]:
        tag = line.split(b" ", 1)[0]
        self.send(line + b"\r\n")
        return self.until_tagged(tag)

    def login(self, address: str, password: str) -> None:
        assert self.command(f'L LOGIN "{address}" "{password}"'.encode())[-1].startswith(b"L OK")

    def at_eof(self) -> bool:
        """True when the server closed the connection (after any lines still buffered)."""
        while self._fill():
            pass
        return True

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.sock.close()


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return make_pki(tmp_path_factory.mktemp("pki"))


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory, pki: Pki) -> Iterator[Server]:
    with Server(tmp_path_factory.mktemp("imap"), pki) as srv:
        yield srv


@pytest.fixture
def user(server: Server) -> tuple[str, str]:
    return server.new_user()


def vm_rss_kib() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError("no VmRSS")  # pragma: no cover


# -- modified UTF-7 ---------------------------------------------------------------------------


@settings(max_examples=300, deadline=None)
@given(st.text())
def test_modutf7_round_trips(name: str) -> None:
    encoded = encode(name)
    assert all(0x20 <= b <= 0x7E for b in encoded)
    assert decode(encoded) == name


@settings(max_examples=500, deadline=None)
@given(st.binary(max_size=64) | st.text(alphabet="&-+,AZaz09Jjo", max_size=32).map(str.encode))
def test_modutf7_decoder_terminates_and_is_canonical(data: bytes) -> None:
    try:
        name = decode(data)
    except ModUtf7Error:
        return
    assert encode(name) == data


def test_modutf7_known_values() -> None:
    assert decode(b"Entw&APw-rfe") == "Entwürfe"
    assert decode(b"&-") == "&"
    assert decode(b"~peter/mail/&U,BTFw-/&ZeVnLIqe-") == "~peter/mail/台北/日本語"
    assert encode("é&") == b"&AOk-&-"
    for bad in (b"&Jjo", b"a&b", b"&AOk-&AOk-", b"&AGE-", b"&2D3-", b"\xff", b"&Jjp-"):
        with pytest.raises(ModUtf7Error):
            decode(bad)


def test_unterminated_modutf7_name_is_refused_and_the_server_goes_on(
    server: Server, user: tuple[str, str]
) -> None:
    client = server.raw()
    try:
        assert client.command(b"a1 SELECT &Jjo")[-1].startswith(b"a1 BAD")
        assert client.command(b'a2 EXAMINE "&Jjo"')[-1].startswith(b"a2 BAD")
        server.alive()
        client.login(*user)
        for n, cmd in enumerate((b'CREATE "&Jjo"', b"SELECT &Jjo", b'EXAMINE "&Jjo"')):
            tag = b"c%d" % n
            resp = client.command(tag + b" " + cmd)[-1]
            assert resp.startswith(tag + b" BAD") or resp.startswith(tag + b" NO"), resp
        assert client.command(b'c9 LIST "" "&Jjo"')[-1].startswith(b"c9 BAD")
        assert client.command(b"d NOOP")[-1].startswith(b"d OK")
        # A non-ASCII name in canonical form still works both ways.
        assert client.command(b'e CREATE "Entw&APw-rfe"')[-1].startswith(b"e OK")
        listed = client.command(b'f LIST "" "Entw*"')
        assert any(b'"Entw&APw-rfe"' in line or b" Entw&APw-rfe" in line for line in listed)
    finally:
        client.close()
    server.alive()


# -- literals ---------------------------------------------------------------------------------


def test_literal_minus_and_appendlimit_advertised(server: Server, user: tuple[str, str]) -> None:
    client = server.raw()
    try:
        caps = client.command(b"a CAPABILITY")[0]
        assert b" LITERAL- " in caps + b" " or caps.rstrip().endswith(b"LITERAL-")
        assert b"LITERAL+" not in caps
        client.login(*user)
        caps = client.command(b"b CAPABILITY")[0]
        assert b"APPENDLIMIT=%d" % MAX_MESSAGE in caps
        assert b"APPENDLIMIT=1000000000" not in caps
        for cap in (b"QUOTA", b"QUOTA=RES-STORAGE", b"SPECIAL-USE", b"LITERAL-"):
            assert cap in caps.split(), cap
    finally:
        client.close()


def test_huge_nonsync_literal_before_login_is_refused_unread(server: Server) -> None:
    client = server.raw()
    before = vm_rss_kib()
    try:
        client.send(b"a LOGIN x {999999999+}\r\n")
        # Push a few MB after it; the server must neither buffer them nor wait for them.
        chunk = b"x" * 65536
        with contextlib.suppress(OSError):
            for _ in range(64):
                client.send(chunk)
        lines = [client.line(), client.line()]
        assert any(line.startswith(b"a BAD [TOOBIG]") for line in lines), lines
        assert any(line.startswith(b"* BYE") for line in lines), lines
        assert client.at_eof()
    finally:
        client.close()
    grown = vm_rss_kib() - before
    assert grown < 3 * 1024, f"RSS grew by {grown} KiB"
    server.alive()


def test_literals_before_login_within_and_over_the_limit(
    server: Server, user: tuple[str, str]
) -> None:
    client = server.raw()
    try:
        # A synchronising literal over 4096 bytes: BAD without the continuation, and the
        # connection goes on.
        client.send(b"a LOGIN {5000}\r\n")
        line = client.line()
        assert line.startswith(b"a BAD [TOOBIG]"), line
        assert client.command(b"b NOOP")[-1].startswith(b"b OK")
        # Small literals, synchronising and not, work.
        address, password = (s.encode() for s in user)
        client.send(b"c LOGIN {%d}\r\n" % len(address))
        assert client.line().startswith(b"+")
        client.send(address + b" {%d+}\r\n" % len(password) + password + b"\r\n")
        assert client.until_tagged(b"c")[-1].startswith(b"c OK")
    finally:
        client.close()


def test_overlong_command_line_is_refused(server: Server) -> None:
    client = server.raw()
    try:
        client.send(b"a NOOP " + b"x" * (MailboxConfig().max_line_length + 10) + b"\r\n")
        lines = []
        with contextlib.suppress(EOFError):
            while True:
                lines.append(client.line())
        assert any(line.startswith(b"a BAD") or line.startswith(b"* BAD") for line in lines)
        assert any(line.startswith(b"* BYE") for line in lines)
    finally:
        client.close()
    server.alive()


def test_append_over_the_limit_is_toobig_without_continuation(
    server: Server, user: tuple[str, str]
) -> None:
    client = server.raw()
    try:
        client.login(*user)
        client.send(b"a APPEND INBOX {100000000}\r\n")
        line = client.line()
        assert line.startswith(b"a NO [TOOBIG]"), line
        assert client.command(b"b NOOP")[-1].startswith(b"b OK")
        # Within the limit it works, with the continuation.
        client.send(b"c APPEND INBOX {%d}\r\n" % len(PLAIN_CRLF))
        assert client.line().startswith(b"+")
        client.send(PLAIN_CRLF + b"\r\n")
        assert client.until_tagged(b"c")[-1].startswith(b"c OK")
        # A non-synchronising one over the limit: refused and the connection closed, unread.
        client.send(b"d APPEND INBOX {%d+}\r\n" % (MAX_MESSAGE + 1))
        lines = [client.line(), client.line()]
        assert any(line.startswith(b"d NO [TOOBIG]") for line in lines), lines
        assert any(line.startswith(b"* BYE") for line in lines), lines
        assert client.at_eof()
    finally:
        client.close()


# -- quota ------------------------------------------------------------------------------------


def message(size: int, n: int) -> bytes:
    head = f"From: a@example.org\r\nSubject: filler {n}\r\n\r\n".encode()
    return head + b"x" * (size - len(head) - 2) + b"\r\n"


def test_quota_append_copy_and_getquotaroot(server: Server) -> None:
    address, password = server.new_user(quota=20 * 1024)
    with server.logged_in(address, password) as c:
        for n in range(2):
            typ, data = c.append("INBOX", None, None, message(8 * 1024, n))
            assert typ == "OK", data
        typ, data = c.append("INBOX", None, None, message(8 * 1024, 2))
        assert typ == "NO" and b"[OVERQUOTA]" in data[0], data

        typ, data = c.getquotaroot("INBOX")
        assert typ == "OK", data
        roots, quotas = data
        assert roots == [b'INBOX ""'], roots
        assert quotas == [b'"" (STORAGE 16 20)'], quotas
        typ, data = c.getquota('""')
        assert (typ, data) == ("OK", [b'"" (STORAGE 16 20)'])
        typ, data = c.setquota('""', "(STORAGE 100000)")
        assert typ == "NO"

        c.select("INBOX")
        typ, data = c.copy("1:2", "Archive")
        assert typ == "NO" and b"[OVERQUOTA]" in data[0], data
        typ, data = c.copy("1", "Archive")  # 8 KiB more would be 24 KiB
        assert typ == "NO" and b"[OVERQUOTA]" in data[0], data
        # MOVE adds nothing to the usage, so an over-quota holder can still file mail away.
        typ, data = c._simple_command("MOVE", "1", "Trash")  # type: ignore[attr-defined]
        assert typ == "OK", data
    # Unlimited mailbox: GETQUOTAROOT names no root.
    address, password = server.new_user(quota=None)
    with server.logged_in(address, password) as c:
        typ, data = c.getquotaroot("INBOX")
        assert typ == "OK"
        assert data[0] == [b"INBOX"], data


# -- STARTTLS ---------------------------------------------------------------------------------


def test_starttls_with_pipelined_plaintext_is_closed(server: Server, user: tuple[str, str]) -> None:
    client = server.plain()
    try:
        address, password = user
        client.send(b'a STARTTLS\r\nb LOGIN "%b" "%b"\r\n' % (address.encode(), password.encode()))
        lines = []
        with contextlib.suppress(EOFError):
            while True:
                lines.append(client.line())
        assert not any(line.startswith(b"a OK") for line in lines), lines
        assert any(line.startswith(b"* BYE") for line in lines), lines
    finally:
        client.close()
    # Without pipelining STARTTLS still works.
    client = server.plain()
    try:
        assert client.command(b"a STARTTLS")[-1].startswith(b"a OK")
        tls = server.pki.client_context().wrap_socket(client.sock, server_hostname="localhost")
        secure = Raw(tls)
        secure.login(*user)
        assert secure.command(b"b NOOP")[-1].startswith(b"b OK")
        secure.close()
    finally:
        client.close()


# -- idle timeouts ----------------------------------------------------------------------------


def test_idle_timeouts(tmp_path: Path, pki: Pki) -> None:
    limits = MailboxConfig(idle_timeout_unauthenticated=0.3, idle_timeout_authenticated=0.6)
    with Server(tmp_path, pki, limits=limits) as srv:
        user = srv.new_user()
        client = srv.raw()
        try:
            line = client.line()  # nothing sent: the server gives up
            assert line.startswith(b"* BYE"), line
            assert client.at_eof()
        finally:
            client.close()
        client = srv.raw()
        try:
            client.login(*user)
            assert client.command(b"s SELECT INBOX")[-1].startswith(b"s OK")
            client.send(b"i IDLE\r\n")
            assert client.line().startswith(b"+")
            line = client.line()  # no DONE within the authenticated timeout
            assert line.startswith(b"* BYE"), line
            assert client.at_eof()
        finally:
            client.close()


# -- keywords and special use -----------------------------------------------------------------


def test_keywords_survive_a_reconnect(server: Server, user: tuple[str, str]) -> None:
    address, password = user
    with server.logged_in(address, password) as c:
        typ, data = c.append("INBOX", "($Forwarded)", None, PLAIN_CRLF)
        assert typ == "OK", data
        typ, data = c.select("INBOX")
        perm = [r for r in c.untagged_responses.get("OK", []) if b"PERMANENTFLAGS" in r]
        assert perm and b"\\*" in perm[0], perm
        typ, data = c.store("1", "+FLAGS", "(Custom1 $Junk \\Flagged)")
        assert typ == "OK", data
    with server.logged_in(address, password) as c:
        c.select("INBOX")
        typ, data = c.fetch("1", "(FLAGS)")
        assert typ == "OK", data
        flags = set(re.search(rb"FLAGS \(([^)]*)\)", data[0]).group(1).split())  # type: ignore[union-attr]
        assert {b"$Forwarded", b"Custom1", b"$Junk", b"\\Flagged"} <= flags, flags
        typ, data = c.search(None, "KEYWORD", "Custom1")
        assert data == [b"1"], data
    keywords = (server.store.path_for(address) / "dovecot-keywords").read_text().splitlines()
    assert sorted(line.split()[1] for line in keywords) == ["$Forwarded", "$Junk", "Custom1"]
    assert sorted(int(line.split()[0]) for line in keywords) == [0, 1, 2]


def test_list_shows_special_use(server: Server, user: tuple[str, str]) -> None:
    with server.logged_in(*user) as c:
        typ, data = c.list()
        assert typ == "OK"
        by_name = {}
        for line in data:
            assert isinstance(line, bytes)
            attrs, _, name = line.partition(b") ")
            by_name[name.rsplit(b" ", 1)[-1].strip(b'"')] = attrs
        for name in ("Sent", "Drafts", "Trash", "Junk", "Archive"):
            assert b"\\" + name.encode() in by_name[name.encode()], (name, by_name)
        assert b"\\Sent" not in by_name[b"INBOX"]


# -- connection limits and failed logins ------------------------------------------------------


def test_connection_limit_and_failed_login_disconnect(tmp_path: Path, pki: Pki) -> None:
    security = SecurityConfig(
        max_connections_per_address=2, disconnect_after_failures=2, delay_after_failures=100
    )
    with Server(tmp_path, pki, guard=Guard(security)) as srv:
        address, _ = srv.new_user()
        first, second = srv.raw(), srv.raw()
        try:
            sock = socket.create_connection(("127.0.0.1", srv.imaps_port), timeout=TIMEOUT)
            third = Raw(srv.pki.client_context().wrap_socket(sock, server_hostname="localhost"))
            assert third.line().startswith(b"* BYE [UNAVAILABLE]")
            assert third.at_eof()
            third.close()
            assert first.command(b'a LOGIN "%b" "wrong"' % address.encode())[-1].startswith(b"a NO")
            lines = first.command(b'b LOGIN "%b" "wrong"' % address.encode())
            assert lines[-1].startswith(b"b NO")
            assert first.line().startswith(b"* BYE")
            assert first.at_eof()
        finally:
            first.close()
            second.close()


# -- fuzz -------------------------------------------------------------------------------------

VALID = [
    b"a NOOP",
    b"a CAPABILITY",
    b'a LOGIN "x" "y"',
    b"a LOGIN {1}",
    b"a SELECT INBOX",
    b'a EXAMINE "&Jjo"',
    b'a LIST "" "*"',
    b"a STATUS INBOX (MESSAGES UIDNEXT)",
    b"a FETCH 1:* (FLAGS BODY.PEEK[HEADER.FIELDS (SUBJECT)])",
    b"a UID SEARCH OR SEEN KEYWORD $Junk",
    b"a STORE 1 +FLAGS (\\Seen Foo)",
    b'a CREATE "F&AOk-"',
    b"a APPEND INBOX (\\Seen) {12+}\r\nSubject: x\r\n",
    b"a GETQUOTAROOT INBOX",
    b'a GETQUOTA ""',
    b"a ID NIL",
    b"a AUTHENTICATE PLAIN",
    b"a COPY 1 Trash",
    b"a UID MOVE 1:2 Junk",
    b"a ENABLE CONDSTORE",
]


@st.composite
def mutated(draw: st.DrawFn) -> bytes:
    data = bytearray(draw(st.sampled_from(VALID)))
    for _ in range(draw(st.integers(0, 4))):
        op = draw(st.integers(0, 2))
        pos = draw(st.integers(0, len(data)))
        if op == 0 and data:
            del data[min(pos, len(data) - 1)]
        elif op == 1:
            data[pos:pos] = draw(st.binary(min_size=1, max_size=8))
        else:
            data[pos:pos] = draw(
                st.sampled_from(
                    [b"{5}", b"{4097+}", b"{0+}\r\n", b"&", b'"', b"(", b"\r\n", b"~{3}"]
                )
            )
    return bytes(data)


lines_strategy = st.lists(
    mutated() | st.binary(max_size=200) | st.binary(max_size=20).map(lambda b: b"a " + b),
    min_size=1,
    max_size=6,
)


@pytest.mark.slow
@settings(
    max_examples=60,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(lines=lines_strategy, login=st.booleans())
def test_fuzzed_command_lines_never_stop_the_server(
    server: Server, fuzz_user: tuple[str, str], lines: list[bytes], login: bool
) -> None:
    client = server.raw()
    try:
        client.sock.settimeout(2)
        if login:
            client.login(*fuzz_user)
            client.command(b"s SELECT INBOX")
        with contextlib.suppress(OSError):
            for line in lines:
                client.send(line + b"\r\n")
        # Ask something that cannot be a continuation of a pending literal and see an answer,
        # or the connection closed; never a hang of the server.
        with contextlib.suppress(OSError, EOFError, TimeoutError):
            client.send(b"\r\nzz NOOP\r\n")
            while not client.line().startswith(b"zz "):
                pass
    finally:
        client.close()
    server.alive()


@pytest.fixture(scope="module")
def fuzz_user(server: Server) -> tuple[str, str]:
    address, password = server.new_user()
    with server.logged_in(address, password) as c:
        c.append("INBOX", None, None, PLAIN_CRLF)
    return address, password


def test_session_error_closes_that_session_with_one_log_line(
    server: Server,
    user: tuple[str, str],
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    from pecd.imap.state import PecdConnectionState

    async def broken(self: PecdConnectionState, cmd: object) -> object:
        raise RuntimeError("disk on fire")

    monkeypatch.setattr(PecdConnectionState, "do_noop", broken)
    caplog.set_level(logging.INFO, logger="pecd")
    client = server.raw()
    try:
        client.send(b"a NOOP\r\n")
        line = client.line()
        assert line.startswith(b"* BYE [SERVERBUG]"), line
        assert client.at_eof()
    finally:
        client.close()
    monkeypatch.undo()
    server.alive()
    records = [
        r for r in caplog.records if r.name.startswith("pecd.imap") and r.levelno >= logging.WARNING
    ]
    assert len(records) == 1, records
    assert "disk on fire" in records[0].getMessage()
    assert records[0].exc_info is None
