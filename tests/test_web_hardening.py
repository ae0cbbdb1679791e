"""The HTTPS listener faces the Internet: the whole web application (``make_app``) served by
:class:`pecd.runtime.web_protocol.WebServer` over real TLS on loopback, with the deadlines
shortened to a second or so, against clients that misbehave: too many connections from one
address, a slowloris head, a handshake that never comes, plaintext or random bytes on the TLS
port, an oversized head, a broken request line, a trickling upload, a response nobody reads.
After each, an honest client is still served."""

from __future__ import annotations

import asyncio
import contextlib
import http.client
import json
import logging
import select
import shutil
import socket
import ssl
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from helpers import client_tls, wait_for
from pecd.config import Config, load_config
from pecd.mailbox.maildir import MaildirStore
from pecd.runtime.tls import server_tls_context
from pecd.runtime.web_protocol import WebLimits, WebListener, WebServer
from pecd.store.db import Database
from pecd.store.tokens import Tokens
from pecd.web.api import request_limit
from pecd.web.app import make_app
from web_fixtures import ALICE, web_template_fixture  # noqa: F401 (a fixture)

LIMITS = WebLimits(
    tls_handshake_seconds=1.0,
    tls_shutdown_seconds=1.0,
    head_seconds=2.5,
    max_head_bytes=16 * 1024,
    body_grace_seconds=0.5,
    body_min_rate=4000.0,
    send_stall_seconds=1.0,
    keep_alive_seconds=2,
)
PER_ADDRESS = 3
TOTAL = 5
MAX_MESSAGE = 64 * 1024
BIG_MESSAGE = 8 * 1024 * 1024  # a download larger than every socket buffer on the way
TIMEOUT = 10.0


class _Records(logging.Handler):
    """What the server logs while the module runs."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)

    def errors(self) -> list[str]:
        return [r.getMessage() for r in self.records if r.levelno >= logging.ERROR]

    def went_away(self) -> int:
        return sum("the client went away" in r.getMessage() for r in self.records)


@dataclass
class Served:
    cfg: Config
    port: int
    token: str
    big_uid: int
    server: WebServer
    log: _Records

    @property
    def listener(self) -> WebListener:
        assert self.server.listener is not None
        return self.server.listener

    def tls(self) -> ssl.SSLContext:
        return client_tls(self.cfg)

    def https(self, source: str = "127.0.0.1") -> http.client.HTTPSConnection:
        conn = http.client.HTTPSConnection(
            "127.0.0.1",
            self.port,
            context=self.tls(),
            timeout=TIMEOUT,
            source_address=(source, 0),
        )
        conn.connect()
        return conn

    def raw(self, source: str = "127.0.0.1") -> socket.socket:
        """A TCP connection to the listener, nothing sent."""
        sock = socket.create_connection(
            ("127.0.0.1", self.port), timeout=TIMEOUT, source_address=(source, 0)
        )
        return sock

    def tls_socket(self, source: str = "127.0.0.1") -> ssl.SSLSocket:
        """A TLS connection to the listener, handshake done, nothing sent."""
        return self.tls().wrap_socket(self.raw(source), server_hostname="127.0.0.1")

    def healthy(self, source: str = "127.0.0.1") -> None:
        """An honest client is served."""
        conn = self.https(source)
        try:
            assert _get(conn, "/healthz") == (200, b'{"status":"ok"}')
        finally:
            conn.close()


def _get(conn: http.client.HTTPSConnection, path: str) -> tuple[int, bytes]:
    conn.request("GET", path)
    r = conn.getresponse()
    return r.status, r.read()


def _closed(sock: socket.socket, timeout: float = TIMEOUT) -> bytes:
    """Everything the server sends until it closes the connection (an abort counts as a close);
    fails if it is still open after ``timeout``."""
    sock.settimeout(timeout)
    got = b""
    while True:
        try:
            data = sock.recv(65536)
        except (ConnectionResetError, ssl.SSLEOFError, ssl.SSLZeroReturnError):
            return got
        except TimeoutError:
            raise AssertionError("the server did not close the connection") from None
        if not data:
            return got
        got += data


def _is_closed(sock: socket.socket) -> bool:
    """Whether the server closed the connection, without waiting (a TLS 1.3 session ticket
    makes the socket readable too: that is not a close). The server must have sent nothing."""
    pending = isinstance(sock, ssl.SSLSocket) and sock.pending()
    if not pending and not select.select([sock], [], [], 0)[0]:
        return False
    sock.settimeout(0)
    try:
        data = sock.recv(65536)
    except (ssl.SSLWantReadError, BlockingIOError):
        return False
    except (ConnectionResetError, BrokenPipeError, ssl.SSLEOFError, ssl.SSLZeroReturnError):
        return True
    finally:
        sock.settimeout(TIMEOUT)
    assert not data, f"the server answered: {data[:200]!r}"
    return True


async def _prepare(cfg: Config) -> tuple[str, int]:
    """A token for alice and a big message in her inbox (its UID)."""
    db = await Database.open(cfg.database_url)
    try:
        _id, token = await Tokens(db).create(ALICE, "hardening")
    finally:
        await db.close()
    head = b"From: bob@pec.example.test\r\nTo: alice@pec.example.test\r\nSubject: big\r\n\r\n"
    body = (b"x" * 998 + b"\r\n") * (BIG_MESSAGE // 1000)
    await asyncio.to_thread(MaildirStore(cfg.maildir_root).deliver, ALICE, "big-one", head + body)
    return token, 0


@pytest.fixture(scope="module")
def served(web_template: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    directory = tmp_path_factory.mktemp("web-hardening") / "inst"
    shutil.copytree(web_template, directory)
    loaded = load_config(directory / "pecd.toml")
    cfg = loaded.model_copy(
        update={
            "security": loaded.security.model_copy(
                update={"max_connections_per_address": PER_ADDRESS, "max_connections": TOTAL}
            ),
            "limits": loaded.limits.model_copy(update={"max_message_size": MAX_MESSAGE}),
        }
    )
    token, _ = asyncio.run(_prepare(cfg))
    server = WebServer(make_app(cfg), server_tls_context(cfg), security=cfg.security, limits=LIMITS)
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(64)
    sock.setblocking(False)
    port = int(sock.getsockname()[1])
    thread = threading.Thread(
        target=lambda: asyncio.run(server.serve(sockets=[sock])), name="web", daemon=True
    )
    records = _Records()
    logging.getLogger().addHandler(records)
    ours = logging.getLogger("pecd.runtime.web_protocol")
    level = ours.level
    ours.setLevel(logging.DEBUG)
    thread.start()
    try:
        wait_for(lambda: server.started, timeout=TIMEOUT, what="the web server serving")
        s = Served(cfg, port, token, 0, server, records)
        conn = s.https()
        conn.request(
            "GET", "/api/v1/folders/INBOX/messages", headers={"Authorization": f"Bearer {token}"}
        )
        page = json.loads(conn.getresponse().read())
        conn.close()
        s.big_uid = int(page["messages"][0]["uid"])
        yield s
    finally:
        server.should_exit = True
        thread.join(timeout=TIMEOUT)
        sock.close()
        logging.getLogger().removeHandler(records)
        ours.setLevel(level)


@pytest.fixture(autouse=True)
def _no_error_logged(served: Served) -> Iterator[None]:
    """Nothing a client does makes the server log an error (a traceback in the log at a
    client's will): what it does wrong is at most a warning."""
    before = len(served.log.errors())
    yield
    assert served.log.errors()[before:] == []


def _no_connections(s: Served) -> None:
    """Wait until every connection of the earlier steps is gone (released to the Guard)."""
    wait_for(
        lambda: s.listener.guard.connections("https") == 0,
        timeout=TIMEOUT,
        what="earlier connections released",
        interval=0.02,
    )


# --- connection admission ------------------------------------------------------------------------


def test_connections_over_the_limits_are_closed_and_the_first_ones_still_work(
    served: Served,
) -> None:
    s = served
    _no_connections(s)
    # One Guard in the process: the application's (login throttling) admits connections too.
    assert s.listener.guard is s.server.application.state.guard
    refused_before = s.listener.refused

    first = [s.https("127.0.0.1") for _ in range(PER_ADDRESS)]
    for conn in first:  # each served, so each admitted before the next one connects
        assert _get(conn, "/healthz")[0] == 200
    extra = s.https("127.0.0.1")
    with pytest.raises((OSError, http.client.HTTPException)):
        _get(extra, "/healthz")
    extra.close()
    assert s.listener.refused == refused_before + 1
    for conn in first:  # the first ones, kept alive, still work
        assert _get(conn, "/healthz")[0] == 200

    # Another address has its own count, up to the listener's total.
    others = [s.https("127.0.0.2") for _ in range(TOTAL - PER_ADDRESS)]
    for conn in others:
        assert _get(conn, "/healthz")[0] == 200
    third = s.https("127.0.0.3")
    with pytest.raises((OSError, http.client.HTTPException)):
        _get(third, "/healthz")
    third.close()
    assert s.listener.refused == refused_before + 2

    # A connection closed gives its place back.
    first.pop().close()
    wait_for(lambda: s.listener.guard.connections("https", "127.0.0.1") < PER_ADDRESS)
    again = s.https("127.0.0.1")
    assert _get(again, "/healthz")[0] == 200
    for conn in [again, *first, *others]:
        conn.close()
    _no_connections(s)


@pytest.mark.slow
def test_an_idle_keep_alive_connection_is_closed(served: Served) -> None:
    s = served
    cut_before = s.listener.cut["head"]
    conn = s.https()
    assert _get(conn, "/healthz")[0] == 200
    assert conn.sock is not None
    _closed(conn.sock)
    # By uvicorn's keep-alive timer, gracefully, not by the next head's deadline.
    assert s.listener.cut["head"] == cut_before
    conn.close()


# --- slow clients --------------------------------------------------------------------------------


@pytest.mark.slow
def test_a_slowloris_head_is_cut_off_while_others_are_served(served: Served) -> None:
    s = served
    cut_before = s.listener.cut["head"]
    started = time.monotonic()  # before the connection: the server's clock starts after it
    slow = s.tls_socket()
    slow.sendall(b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n")
    served_meanwhile = 0
    # A header byte every 0.1 s: never idle, never done.
    while not _is_closed(slow):
        assert time.monotonic() - started < LIMITS.head_seconds + 3, "slowloris not cut"
        with contextlib.suppress(OSError):
            slow.sendall(b"X")
        s.healthy()
        served_meanwhile += 1
        time.sleep(0.1)
    elapsed = time.monotonic() - started
    slow.close()
    assert elapsed >= LIMITS.head_seconds, elapsed
    assert served_meanwhile >= 3
    assert s.listener.cut["head"] == cut_before + 1
    print(f"slowloris cut after {elapsed:.2f} s; {served_meanwhile} requests served meanwhile")

    # Silence after the handshake is cut by the same deadline (uvicorn has none before the
    # first request).
    started = time.monotonic()
    silent = s.tls_socket()
    assert _closed(silent) == b""
    assert LIMITS.head_seconds <= time.monotonic() - started < LIMITS.head_seconds + 2
    silent.close()
    assert s.listener.cut["head"] == cut_before + 2
    s.healthy()


@pytest.mark.slow
def test_a_client_that_never_handshakes_is_dropped(served: Served) -> None:
    s = served
    started = time.monotonic()
    quiet = s.raw()
    half = s.raw()
    # Half a ClientHello, then nothing.
    half.sendall(bytes.fromhex("160301020001"))
    _closed(quiet)
    _closed(half)
    elapsed = time.monotonic() - started
    assert LIMITS.tls_handshake_seconds <= elapsed < LIMITS.tls_handshake_seconds + 2
    quiet.close()
    half.close()
    s.healthy()


@pytest.mark.slow
def test_a_trickling_upload_is_cut_and_an_honest_slow_one_is_read(served: Served) -> None:
    s = served
    auth = f"Authorization: Bearer {s.token}\r\n"
    size = 12_000
    head = (
        f"POST /api/v1/messages HTTP/1.1\r\nHost: 127.0.0.1\r\n{auth}"
        f"Content-Type: application/json\r\nContent-Length: {size}\r\n\r\n"
    ).encode()
    body = b'{"pad": "' + b"a" * (size - 11) + b'"}'
    assert len(body) == size

    cut_before, went_before = s.listener.cut["body"], s.log.went_away()
    slow = s.tls_socket()
    slow.sendall(head)
    started = time.monotonic()
    sent = 0
    while not _is_closed(slow):  # 200 bytes every 0.1 s: 2 kB/s, under the minimum
        assert time.monotonic() - started < 5, "trickling upload not cut"
        with contextlib.suppress(OSError):
            slow.sendall(body[sent : sent + 200])
            sent += 200
        time.sleep(0.1)
    slow.close()
    assert s.listener.cut["body"] == cut_before + 1
    # The API was reading the body: it saw the client go (at debug level, not as an error).
    wait_for(lambda: s.log.went_away() == went_before + 1, timeout=TIMEOUT)
    print(f"trickling upload cut after {time.monotonic() - started:.2f} s, {sent} bytes")

    # 1.5 kB every 0.2 s (7.5 kB/s, above the minimum rate) for longer than the grace: read.
    honest = s.tls_socket()
    honest.sendall(head)
    started = time.monotonic()
    for at in range(0, size, 1500):
        honest.sendall(body[at : at + 1500])
        time.sleep(0.2)
    assert time.monotonic() - started > 2 * LIMITS.body_grace_seconds
    answer = honest.recv(65536)
    # The body was read in full: the API judged it (not a valid submission) and kept the
    # connection open.
    assert answer.startswith(b"HTTP/1.1 422 "), answer[:200]
    assert b"application/problem+json" in answer
    honest.close()
    assert s.listener.cut["body"] == cut_before + 1
    s.healthy()


@pytest.mark.slow
def test_a_response_nobody_reads_is_cut(served: Served) -> None:
    s = served
    cut_before = s.listener.cut["send"]
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.settimeout(TIMEOUT)
    sock.connect(("127.0.0.1", s.port))
    reader = s.tls().wrap_socket(sock, server_hostname="127.0.0.1")
    reader.sendall(
        f"GET /api/v1/folders/INBOX/messages/{s.big_uid} HTTP/1.1\r\nHost: 127.0.0.1\r\n"
        f"Authorization: Bearer {s.token}\r\n\r\n".encode()
    )
    started = time.monotonic()
    wait_for(
        lambda: s.listener.cut["send"] > cut_before,
        timeout=LIMITS.send_stall_seconds + 5,
        what="the stalled download cut",
        interval=0.05,
    )
    print(f"unread download cut after {time.monotonic() - started:.2f} s")
    got = _closed(reader)
    assert len(got) < BIG_MESSAGE  # it never had the whole message
    reader.close()
    s.healthy()


# --- hostile bytes -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "payload",
    [
        b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n",  # plaintext HTTP on the TLS port
        bytes(range(256)) * 16,  # noise
    ],
    ids=["plaintext", "noise"],
)
def test_bytes_that_are_not_tls_are_dropped(served: Served, payload: bytes) -> None:
    s = served
    sock = s.raw()
    started = time.monotonic()
    with contextlib.suppress(OSError):
        sock.sendall(payload)
    got = b""
    with contextlib.suppress(OSError):
        got = _closed(sock)
    # At once: the handshake failed, no deadline was needed. An alert at most, never HTTP.
    assert time.monotonic() - started < LIMITS.tls_handshake_seconds
    assert b"HTTP" not in got
    sock.close()
    s.healthy()


def _exchange(s: Served, request: bytes) -> bytes:
    sock = s.tls_socket()
    try:
        sock.sendall(request)
        return _closed(sock)
    finally:
        sock.close()


def test_an_oversized_head_is_refused_and_a_large_one_is_read(served: Served) -> None:
    s = served
    big = b"a" * (LIMITS.max_head_bytes + 1024)
    answer = _exchange(
        s, b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Big: " + big + b"\r\n\r\n"
    )
    assert answer.startswith(b"HTTP/1.1 400 "), answer[:200]
    # Within the limit (a browser's cookies, say) it is read.
    conn = s.https()
    conn.request("GET", "/healthz", headers={"X-Large": "b" * (LIMITS.max_head_bytes - 2048)})
    assert conn.getresponse().status == 200
    conn.close()
    s.healthy()


@pytest.mark.parametrize(
    "request_bytes",
    [
        b"NOT AN HTTP REQUEST\r\n\r\n",
        b"GET /healthz HTTP/1.1\r\n\r\n",
        b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: -1\r\n\r\n",
        b"POST /healthz HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\n",
        b"POST /healthz HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: gzip\r\n\r\n",
        b"POST /healthz HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\nZZ\r\n",
        b"GET /\x00 HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n",
        b"GET /healthz HTTP/1.1\r\nHost : 127.0.0.1\r\n\r\n",
    ],
    ids=[
        "no-request-line",
        "no-host",
        "negative-length",
        "two-lengths",
        "gzip-coding",
        "bad-chunk",
        "nul",
        "field-name",
    ],
)
def test_an_invalid_request_is_answered_400_and_closed(
    served: Served, request_bytes: bytes
) -> None:
    s = served
    answer = _exchange(s, request_bytes)
    assert answer.startswith(b"HTTP/1.1 400 ") or answer.startswith(b"HTTP/1.1 505 "), answer
    s.healthy()


def test_a_broken_body_after_the_response_began_drops_the_connection(served: Served) -> None:
    """A GET may carry a body; this one's is broken after the download began: no 400 can
    follow a response under way, so the connection is dropped (uvicorn alone would raise
    inside the event loop's callback, an error in the log)."""
    s = served
    sock = s.tls_socket()
    sock.sendall(
        f"GET /api/v1/folders/INBOX/messages/{s.big_uid} HTTP/1.1\r\nHost: 127.0.0.1\r\n"
        f"Authorization: Bearer {s.token}\r\nTransfer-Encoding: chunked\r\n\r\n".encode()
    )
    assert sock.recv(65536).startswith(b"HTTP/1.1 200 ")  # the download began
    sock.sendall(b"ZZ\r\n")
    got = _closed(sock)
    assert len(got) < BIG_MESSAGE
    sock.close()
    s.healthy()


# --- the body limit under /api/ -------------------------------------------------------------------


def test_a_body_over_the_limit_is_a_problem_document_under_the_api(served: Served) -> None:
    s = served
    limit = request_limit(s.cfg.limits)
    conn = s.https()
    conn.putrequest("POST", "/api/v1/messages")
    conn.putheader("Content-Type", "application/json")
    conn.putheader("Content-Length", str(limit + 1))
    conn.endheaders()
    r = conn.getresponse()
    assert r.status == 413
    assert r.getheader("Content-Type") == "application/problem+json"
    problem = json.loads(r.read())
    assert set(problem) == {"type", "title", "status", "detail"}
    assert problem["status"] == 413 and problem["title"] == "Request too large"
    assert problem["type"].endswith("/too-large") and str(limit) in problem["detail"]
    assert r.getheader("Connection") == "close"
    conn.close()

    # Streamed, no Content-Length: cut as the bytes read pass the limit, still a problem.
    conn = s.https()
    conn.putrequest("POST", "/api/v1/messages")
    conn.putheader("Authorization", f"Bearer {s.token}")
    conn.putheader("Content-Type", "application/json")
    conn.putheader("Transfer-Encoding", "chunked")
    conn.endheaders()
    chunk = b"z" * 65536
    with contextlib.suppress(OSError):  # the server may answer and close before the end
        for _ in range(limit // len(chunk) + 2):
            conn.send(b"%x\r\n%s\r\n" % (len(chunk), chunk))
        conn.send(b"0\r\n\r\n")
    r = conn.getresponse()
    assert r.status == 413
    assert r.getheader("Content-Type") == "application/problem+json"
    assert json.loads(r.read())["status"] == 413
    conn.close()
    s.healthy()
