"""Fixtures for webmail tests: the whole HTTPS application (``pecd.web.app.make_app``) in
process, its lifespan run, driven by httpx over ASGI as a browser would (cookies, forms, CSRF).

    from web_fixtures import ALICE, PASSWORD, Web, login, run_web, web_cfg_fixture, web_template_fixture

    def test_inbox(web_cfg: Config) -> None:
        async def scenario(web: Web) -> None:
            r = await login(web.client, ALICE, PASSWORD)
            assert r.status_code == 303
            page = await web.client.get("/mail")
            ...
        run_web(web_cfg, scenario)

* ``web_cfg`` (import ``web_cfg_fixture`` and ``web_template_fixture`` into the test module):
  a fresh installation on SQLite of this test alone (a copy of one made per test session), with
  mailboxes alice, bob and carol (password :data:`PASSWORD`) and dan (disabled), hashed with
  cheap argon2 parameters so that logins are fast.
* :func:`run_web` ``(cfg, scenario)``: builds the app, runs its lifespan, hands ``scenario`` a
  :class:`Web`: ``web.client`` (a browser from :data:`PEER`), ``web.browser(peer)`` (another
  browser, own cookies, another client address), ``web.app`` (``app.state`` has ``db``,
  ``accounts``, ``sessions``, ``guard``, ``cfg``), ``web.cfg``.
* :func:`login` ``(client, address, password, next=None)``: the real login form flow (GET
  /login, its CSRF token, POST /login); returns the POST's response (303 when logged in; for a
  mailbox with TOTP, 303 to /login/totp: then :func:`submit_totp`).
* :func:`csrf_of` ``(response)``: the CSRF token in a page's forms; :func:`post_form`
  ``(client, page, action, data)``: GET ``page``, POST ``data`` plus its token to ``action``.
"""

from __future__ import annotations

import asyncio
import html
import re
import shutil
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
from starlette.applications import Starlette

from helpers import DOMAIN, PASSWORD, install_e2e
from pecd.config import Config, load_config
from pecd.store.accounts import Accounts
from pecd.store.db import Database
from pecd.web.app import make_app
from store_fixtures import cheap_hasher

__all__ = [
    "ALICE",
    "BASE_URL",
    "BOB",
    "CAROL",
    "DAN",
    "PASSWORD",
    "PEER",
    "Web",
    "csrf_of",
    "login",
    "post_form",
    "run_web",
    "submit_totp",
    "web_cfg_fixture",
    "web_template_fixture",
]

ALICE, BOB, CAROL, DAN = (f"{u}@{DOMAIN}" for u in ("alice", "bob", "carol", "dan"))
#: https, so that the browser sends the Secure (``__Host-``) cookies back.
BASE_URL = "https://pecd.test"
PEER = "203.0.113.7"


async def _template(directory: Path) -> None:
    cfg = await install_e2e(directory, None)
    db = await Database.open(cfg.database_url)
    try:
        accounts = Accounts(db, hasher=cheap_hasher())
        for user in ("alice", "bob", "carol", "dan"):
            await accounts.set_password(f"{user}@{DOMAIN}", PASSWORD)
    finally:
        await db.close()


@pytest.fixture(scope="session", name="web_template")
def web_template_fixture(tmp_path_factory: pytest.TempPathFactory) -> Path:
    directory = tmp_path_factory.mktemp("web-template") / "inst"
    asyncio.run(_template(directory))
    return directory


@pytest.fixture(name="web_cfg")
def web_cfg_fixture(web_template: Path, tmp_path: Path) -> Config:
    directory = tmp_path / "inst"
    shutil.copytree(web_template, directory)
    return load_config(directory / "pecd.toml")


@dataclass
class Web:
    cfg: Config
    app: Starlette
    client: httpx.AsyncClient
    _clients: list[httpx.AsyncClient] = field(default_factory=list)

    def browser(self, peer: str = PEER) -> httpx.AsyncClient:
        """Another browser (its own cookies) from client address ``peer``."""
        client = _client(self.app, peer)
        self._clients.append(client)
        return client

    @property
    def db(self) -> Database:
        db: Database = self.app.state.db
        return db


def _client(app: Starlette, peer: str) -> httpx.AsyncClient:
    transport = httpx.ASGITransport(app=app, client=(peer, 50000))
    return httpx.AsyncClient(transport=transport, base_url=BASE_URL, follow_redirects=False)


def run_web(cfg: Config, scenario: Callable[[Web], Awaitable[Any]], *, peer: str = PEER) -> Any:
    """``scenario(web)`` against the whole application over ``cfg`` (see the module docstring);
    its result is returned."""

    async def go() -> Any:
        app = make_app(cfg)
        async with app.router.lifespan_context(app):
            app.state.accounts.hasher = cheap_hasher()  # no rehash to the slow default on login
            web = Web(cfg, app, _client(app, peer))
            try:
                return await scenario(web)
            finally:
                for client in [web.client, *web._clients]:
                    await client.aclose()

    return asyncio.run(go())


_CSRF = re.compile(r'name="csrf" value="([^"]+)"')


def csrf_of(response: httpx.Response) -> str:
    """The CSRF token in the page's forms."""
    found = _CSRF.search(response.text)
    assert found is not None, f"no CSRF token in {response.request.url}: {response.text[:500]}"
    return html.unescape(found.group(1))


async def post_form(
    client: httpx.AsyncClient,
    page: str,
    action: str,
    data: dict[str, str],
    files: dict[str, tuple[str, bytes, str]] | None = None,
) -> httpx.Response:
    """GET ``page``, then POST ``data`` (and ``files``) with the page's CSRF token to
    ``action``, as a browser submitting the form on that page."""
    got = await client.get(page)
    assert got.status_code == 200, (page, got.status_code, got.text[:500])
    return await client.post(action, data={**data, "csrf": csrf_of(got)}, files=files)


async def login(
    client: httpx.AsyncClient, address: str, password: str, next: str | None = None
) -> httpx.Response:
    """The login form flow; the response to the POST (303 on success). A browser already
    logged in (GET /login redirects it) posts the form with its session's token."""
    page = "/login" if next is None else "/login?" + str(httpx.QueryParams({"next": next}))
    got = await client.get(page)
    if got.status_code == 303:
        got = await client.get("/settings")
    assert got.status_code == 200, (page, got.status_code, got.text[:500])
    data = {"address": address, "password": password, "next": next or "", "csrf": csrf_of(got)}
    return await client.post("/login", data=data)


async def submit_totp(client: httpx.AsyncClient, code: str) -> httpx.Response:
    """The second login step (after :func:`login` answered 303 to /login/totp)."""
    return await post_form(client, "/login/totp", "/login/totp", {"code": code})
