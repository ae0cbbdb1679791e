"""The web process: the ASGI application over HTTPS, in a process of its own kept alive by
``pecd serve``, like the mailbox process; and the application's own guarantees (security
headers on every response, request bodies no larger than the mail limit)."""

from __future__ import annotations

import asyncio
import os
import signal
import smtplib
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response
from starlette.routing import Route

from helpers import DOMAIN, PASSWORD, client_tls, install_e2e, wait_for
from helpers import AppThread as Server
from pecd.config import Config, load_config
from pecd.web.api import request_limit
from pecd.web.app import SECURITY_HEADERS, BodyLimit, SecurityHeaders

LIMIT = 256 * 1024
TIMEOUT = 10


async def _install(directory: Path) -> Config:
    await install_e2e(directory, None, extra=f"max_message_size = {LIMIT}\n")
    path = directory / "pecd.toml"
    text = path.read_text("utf-8")
    text = text.replace('imaps = "127.0.0.1:0"\n', 'imaps = "127.0.0.1:0"\nhttps = "127.0.0.1:0"\n')
    text += "\n[mailbox]\nheartbeat_seconds = 0.2\nheartbeat_timeout_seconds = 5\n"
    path.write_text(text, "utf-8")
    return load_config(path)


@pytest.fixture
def srv(tmp_path: Path) -> Iterator[Server]:
    cfg = asyncio.run(_install(tmp_path / "inst"))
    server = Server(cfg).start()
    try:
        yield server
    finally:
        server.stop()


def _web_port(srv: Server) -> int:
    assert srv.app is not None and srv.app.web is not None
    return srv.app.web.port("https")


async def _token(srv: Server, mailbox: str) -> str:
    from pecd.store.db import Database
    from pecd.store.tokens import Tokens

    db = await Database.open(srv.cfg.database_url)
    try:
        _id, token = await Tokens(db).create(mailbox, "test")
    finally:
        await db.close()
    return token


def _client(srv: Server) -> httpx.Client:
    return httpx.Client(
        base_url=f"https://127.0.0.1:{_web_port(srv)}", verify=client_tls(srv.cfg), timeout=TIMEOUT
    )


def _assert_security_headers(r: httpx.Response) -> None:
    for name, value in SECURITY_HEADERS.items():
        assert r.headers.get(name) == value, name


def _healthy(srv: Server) -> bool:
    try:
        with _client(srv) as c:
            return c.get("/healthz").status_code == 200
    except httpx.HTTPError:
        return False


def _smtps_answers(srv: Server) -> None:
    with smtplib.SMTP_SSL(
        "127.0.0.1", srv.port("smtps"), context=client_tls(srv.cfg), timeout=TIMEOUT
    ) as smtp:
        smtp.login(f"alice@{DOMAIN}", PASSWORD)
        assert smtp.noop()[0] == 250


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


@pytest.mark.slow
def test_the_web_process_serves_https_and_is_replaced_when_it_dies(srv: Server) -> None:
    assert srv.app is not None and srv.app.web is not None
    sup = srv.app.web
    first = sup.pid
    assert first is not None and first != os.getpid()
    port = _web_port(srv)
    assert f"  Web (HTTPS):   https://localhost:{port}/" in srv.app.client_settings()

    with _client(srv) as c:
        r = c.get("/healthz")
        assert r.status_code == 200
        assert r.json() == {"status": "ok"}
        _assert_security_headers(r)
        missing = c.get("/no/such/page")
        assert missing.status_code == 404
        _assert_security_headers(missing)
        # Over the request limit (the mail limit, base64 in JSON): 413 from the Content-Length
        # alone, headers included.
        big = c.post("/healthz", content=b"x" * (request_limit(srv.cfg.limits) + 1))
        assert big.status_code == 413
        _assert_security_headers(big)
        assert c.post("/healthz", content=b"x" * 10).status_code == 405
        # The REST API over the same HTTPS, its database opened by the app's lifespan.
        doc = c.get("/api/v1/openapi.json")
        assert doc.status_code == 200 and "/api/v1/messages" in doc.json()["paths"]
        refused = c.post("/api/v1/messages", json={"to": ["bob@pec.example.test"]})
        assert refused.status_code == 401
        assert refused.headers["content-type"].startswith("application/problem+json")
        # A real send over HTTPS: the web process has its own database connection.
        token = srv.call(_token(srv, "alice@pec.example.test"))
        sent = c.post(
            "/api/v1/messages",
            headers={"Authorization": f"Bearer {token}"},
            json={"to": ["bob@pec.example.test"], "subject": "Via HTTPS", "body": "ciao"},
        )
        assert sent.status_code == 202, sent.text
        status = c.get(sent.json()["status_url"], headers={"Authorization": f"Bearer {token}"})
        assert status.status_code == 200

    started = time.monotonic()
    os.kill(first, signal.SIGKILL)
    _smtps_answers(srv)  # SMTP never depended on it
    wait_for(
        lambda: sup.pid not in (None, first) and _healthy(srv),
        timeout=srv.cfg.mailbox.heartbeat_timeout_seconds,
    )
    print(f"web process replaced and serving in {time.monotonic() - started:.2f} s")
    assert _web_port(srv) == port and sup.restarts == 1
    _smtps_answers(srv)

    second = sup.pid
    assert second is not None
    srv.stop()
    assert not _alive(second)


@pytest.mark.slow
def test_without_listeners_https_there_is_no_web_process(tmp_path: Path) -> None:
    cfg = asyncio.run(install_e2e(tmp_path / "inst", None))
    assert cfg.listeners.https is None
    server = Server(cfg).start()
    try:
        assert server.app is not None and server.app.web is None
        assert not any("Web (HTTPS)" in line for line in server.app.client_settings())
    finally:
        server.stop()


# -- the middlewares, in process ------------------------------------------------------------------


async def _echo(request: Request) -> Response:
    return PlainTextResponse(str(len(await request.body())))


def _asgi_client(limit: int) -> httpx.AsyncClient:
    app = SecurityHeaders(BodyLimit(Starlette(routes=[Route("/", _echo, methods=["POST"])]), limit))
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t")


def test_a_streamed_body_over_the_limit_is_413_and_one_within_it_is_read() -> None:
    async def chunks(n: int, size: int = 1000):  # type: ignore[no-untyped-def]
        for _ in range(n):
            yield b"y" * size

    async def go() -> None:
        async with _asgi_client(5000) as c:
            ok = await c.post("/", content=chunks(5))
            assert ok.status_code == 200 and ok.text == "5000"
            _assert_security_headers(ok)
            over = await c.post("/", content=chunks(6))  # chunked: no Content-Length
            assert over.status_code == 413
            _assert_security_headers(over)
            declared = await c.post("/", content=b"z" * 5001)
            assert declared.status_code == 413

    asyncio.run(go())
