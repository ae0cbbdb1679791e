"""The webmail's foundation: login (password, then TOTP), sessions, CSRF, throttling, the
language, the settings pages. The whole HTTPS application in process, driven by httpx over ASGI
as a browser (web_fixtures)."""

from __future__ import annotations

import asyncio
import re
import threading
import time
from datetime import timedelta

import httpx
import pyotp
import pytest
import uvicorn
from sqlalchemy import select, update

from helpers import free_port, wait_for
from pecd.clock import FixedClock, SystemClock
from pecd.config import Config
from pecd.guard import Guard
from pecd.mailbox.maildir import MaildirStore
from pecd.store.models import Mailbox, MailboxSecurity, WebSession
from pecd.store.security import TOTP_MAX_FAILURES, Security
from pecd.store.tokens import Tokens
from pecd.web.app import SECURITY_HEADERS, make_app
from pecd.web.pages.settings import totp_qr_response
from pecd.web.sessions import CSRF_COOKIE, SESSION_COOKIE, session_digest
from web_fixtures import (
    ALICE,
    BOB,
    CAROL,
    DAN,
    PASSWORD,
    PEER,
    Web,
    csrf_of,
    login,
    post_form,
    run_web,
    submit_totp,
    web_cfg_fixture,  # noqa: F401 (a fixture)
    web_template_fixture,  # noqa: F401 (a fixture)
)

WRONG = "Indirizzo o password errati."
LOCKED = "Troppi codici errati"


def _main(r: httpx.Response) -> str:
    """The page's own content (the layout's header has the varying CSRF token)."""
    text = r.text
    return text[text.index('<main id="main"') :]


async def _logged_in(client: httpx.AsyncClient) -> bool:
    r = await client.get("/settings")
    return r.status_code == 200


class FakeTime:
    """The Guard's clock and sleep: a wait moves the clock instead of taking time."""

    def __init__(self) -> None:
        self.now = 10_000.0
        self.slept: list[float] = []

    def clock(self) -> float:
        return self.now

    async def sleep(self, seconds: float) -> None:
        self.slept.append(seconds)
        self.now += seconds


def _fake_guard(web: Web) -> tuple[Guard, FakeTime]:
    fake = FakeTime()
    guard = Guard(web.cfg.security, clock=fake.clock, sleep=fake.sleep)
    web.app.state.guard = guard
    return guard, fake


def test_login_and_the_same_answer_for_every_refusal(web_cfg: Config) -> None:
    async def scenario(web: Web) -> None:
        c = web.client
        first = await c.get("/login")
        assert first.status_code == 200 and 'lang="it"' in first.text
        assert CSRF_COOKIE in c.cookies and SESSION_COOKIE not in c.cookies
        answers = [
            await login(c, address, password)
            for address, password in (
                (ALICE, "wrong password"),
                ("nobody@pec.example.test", PASSWORD),
                (DAN, PASSWORD),  # disabled
            )
        ]
        for r in answers:
            assert r.status_code == 200 and WRONG in r.text
            assert SESSION_COOKIE not in r.headers.get("set-cookie", "")
        # One page for all: only the address typed back differs.
        bodies = {
            _main(r).replace(address, "X")
            for r, address in zip(answers, (ALICE, "nobody@pec.example.test", DAN), strict=True)
        }
        assert len(bodies) == 1
        assert not await _logged_in(c)

        ok = await login(c, ALICE.upper(), PASSWORD)
        assert ok.status_code == 303 and ok.headers["location"] == "/mail"
        cookie = ok.headers["set-cookie"]
        assert cookie.startswith(f"{SESSION_COOKIE}=")
        for attribute in ("Secure", "HttpOnly", "Path=/", "SameSite=lax"):
            assert attribute in cookie
        assert "Domain" not in cookie and "expires" not in cookie.lower()
        page = await c.get("/settings")
        assert page.status_code == 200 and ALICE in page.text
        # Only the digest of the id is stored.
        session_id = c.cookies[SESSION_COOKIE]
        async with web.db.read_session() as s:
            ids = list(await s.scalars(select(WebSession.id_sha256)))
        assert ids == [session_digest(session_id)] and session_id not in ids
        # Logged in, /login goes on to where it was asked to.
        again = await c.get("/login", params={"next": "/settings"})
        assert again.status_code == 303 and again.headers["location"] == "/settings"

        # next: local paths only.
        for target, expected in (
            ("/settings?x=1", "/settings?x=1"),
            ("//evil.example/x", "/mail"),
            ("/\\evil.example", "/mail"),
            ("https://evil.example/", "/mail"),
            ("javascript:alert(1)", "/mail"),
        ):
            other = web.browser()
            r = await login(other, BOB, PASSWORD, next=target)
            assert r.status_code == 303 and r.headers["location"] == expected, target

    run_web(web_cfg, scenario)


def test_csrf_is_checked_on_every_post(web_cfg: Config) -> None:
    async def scenario(web: Web) -> None:
        c = web.client
        # Login: no token, no cookie at all, a wrong token, another site's Origin.
        assert (
            await c.post("/login", data={"address": ALICE, "password": PASSWORD})
        ).status_code == 403
        page = await c.get("/login")
        token = csrf_of(page)
        form = {"address": ALICE, "password": PASSWORD}
        for data, headers in (
            (form, {}),
            ({**form, "csrf": ""}, {}),
            ({**form, "csrf": token + "x"}, {}),
            ({**form, "csrf": token}, {"Origin": "https://evil.example"}),
            ({**form, "csrf": token}, {"Sec-Fetch-Site": "cross-site"}),
        ):
            r = await c.post("/login", data=data, headers=headers)
            assert r.status_code == 403, (data, headers)
            assert "ricarica la pagina" in r.text
            for name, value in SECURITY_HEADERS.items():
                assert r.headers[name] == value
        # Our pages send no Referer, so browsers send "Origin: null" with their forms.
        r = await c.post("/lang", data={"lang": "it", "csrf": token}, headers={"Origin": "null"})
        assert r.status_code == 303
        # A form token without the cookie it doubles (another browser's token) is refused.
        stranger = web.browser()
        r = await stranger.post("/login", data={**form, "csrf": token})
        assert r.status_code == 403
        assert (await c.post("/lang", data={"lang": "en"})).status_code == 403
        assert (await c.post("/lang", data={"lang": "en", "csrf": "nope"})).status_code == 403
        assert not await _logged_in(c)

        assert (await login(c, ALICE, PASSWORD)).status_code == 303
        # Logged in, the pre-login token no longer passes: the session's own is wanted.
        settings = await c.get("/settings")
        session_token = csrf_of(settings)
        assert session_token != token
        posts = [
            ("/logout", {}),
            ("/lang", {"lang": "en"}),
            (
                "/settings/password",
                {"old": PASSWORD, "new": "another password", "repeat": "another password"},
            ),
            ("/settings/totp/begin", {}),
            ("/settings/totp/confirm", {"code": "123456"}),
            ("/settings/totp/cancel", {}),
            ("/settings/totp/disable", {"code": "123456"}),
            ("/settings/app-passwords", {"name": "phone"}),
            ("/settings/tokens", {"name": "erp"}),
            ("/settings/sessions/end-others", {}),
        ]
        # The session's token with its last character changed (to another one: "A" if it was not).
        altered = session_token[:-1] + ("B" if session_token.endswith("A") else "A")
        for path, data in posts:
            for bad in (None, "", token, altered):
                body = dict(data) if bad is None else {**data, "csrf": bad}
                r = await c.post(path, data=body)
                assert r.status_code == 403, (path, bad, r.status_code)
        # Nothing of it happened.
        assert await _logged_in(c)
        security = Security(web.db)
        assert not (await security.totp_status(ALICE)).pending
        assert await security.app_password_list(ALICE) == []
        assert await Tokens(web.db).list(ALICE) == []
        assert (await login(web.browser(), ALICE, PASSWORD)).status_code == 303  # same password
        assert c.cookies["pecd_lang"] == "it"  # set by the null-Origin post above, never "en"
        # The same posts with the token do pass.
        r = await c.post(
            "/settings/tokens", data={"name": "erp", "password": PASSWORD, "csrf": session_token}
        )
        assert r.status_code == 200 and "pecd_" in r.text

    run_web(web_cfg, scenario)


def test_session_fixation_and_logout(web_cfg: Config) -> None:
    async def scenario(web: Web) -> None:
        c = web.client
        # An id planted before login is never the one after it, nor valid.
        planted = "planted-by-an-attacker-0123456789abcdefghij"
        c.cookies.set(SESSION_COOKIE, planted, domain="pecd.test")
        r = await login(c, ALICE, PASSWORD)
        assert r.status_code == 303
        first = c.cookies[SESSION_COOKIE]
        assert first != planted
        attacker = web.browser()
        attacker.cookies.set(SESSION_COOKIE, planted, domain="pecd.test")
        assert not await _logged_in(attacker)

        # Logging in again (a session already open) issues a new id; the old one is dead.
        r = await login(c, ALICE, PASSWORD)
        second = c.cookies[SESSION_COOKIE]
        assert r.status_code == 303 and second != first
        stale = web.browser()
        stale.cookies.set(SESSION_COOKIE, first, domain="pecd.test")
        assert not await _logged_in(stale)
        copy = web.browser()
        copy.cookies.set(SESSION_COOKIE, second, domain="pecd.test")
        assert await _logged_in(copy)

        # A mailbox disabled meanwhile loses its sessions.
        bob = web.browser()
        assert (await login(bob, BOB, PASSWORD)).status_code == 303
        await web.app.state.accounts.disable(BOB)
        assert not await _logged_in(bob)

        # Logout deletes the session: its id opens nothing anymore, anywhere.
        settings = await c.get("/settings")
        out = await c.post("/logout", data={"csrf": csrf_of(settings)})
        assert out.status_code == 303 and out.headers["location"] == "/login?m=out"
        assert SESSION_COOKIE not in c.cookies
        assert not await _logged_in(c)
        assert not await _logged_in(copy)
        async with web.db.read_session() as s:
            assert list(await s.scalars(select(WebSession.id_sha256))) == []
        # Logout without a session just goes to the login page.
        assert (await c.post("/logout")).status_code == 303

    run_web(web_cfg, scenario)


def test_idle_and_absolute_expiry(web_cfg: Config) -> None:
    async def scenario(web: Web) -> None:
        sessions = web.app.state.sessions
        clock = FixedClock(SystemClock().now())
        sessions.clock = clock
        c = web.client
        assert (await login(c, ALICE, PASSWORD)).status_code == 303
        digest = session_digest(c.cookies[SESSION_COOKIE])

        async def last_seen() -> object:
            async with web.db.read_session() as s:
                row = await s.get(WebSession, digest)
                return None if row is None else row.last_seen_at

        start = await last_seen()
        clock.advance(timedelta(seconds=30))
        assert await _logged_in(c)
        assert await last_seen() == start  # written at most once a minute
        # Sliding: 29 minutes apart, again and again, well past 30 minutes in all.
        for _ in range(3):
            clock.advance(timedelta(minutes=29))
            assert await _logged_in(c)
        assert await last_seen() == clock.now()
        clock.advance(timedelta(minutes=30))
        r = await c.get("/settings")
        assert r.status_code == 303 and r.headers["location"] == "/login?next=%2Fsettings"
        assert await last_seen() is None  # the expired row is gone

        # The absolute lifetime ends an active session too.
        assert (await login(c, ALICE, PASSWORD)).status_code == 303
        digest = session_digest(c.cookies[SESSION_COOKIE])
        for _ in range(12 * 60 // 25):
            clock.advance(timedelta(minutes=25))
            assert await _logged_in(c)
        clock.advance(timedelta(minutes=25))
        assert not await _logged_in(c)

        # Expired rows of sessions nobody comes back to are purged when others log in.
        async with web.db.session() as s, s.begin():
            await s.execute(update(WebSession).values(expires_at=clock.now()))
        assert (await login(web.browser(), BOB, PASSWORD)).status_code == 303
        async with web.db.read_session() as s:
            rows = list(await s.scalars(select(WebSession.mailbox)))
        assert rows == [BOB]

    run_web(web_cfg, scenario)


def _codes_now(secret: str) -> set[str]:
    totp = pyotp.TOTP(secret)
    now = time.time()
    return {totp.at(now + d) for d in (-60, -30, 0, 30, 60)}


def test_totp_enrol_in_settings_then_log_in_with_a_code(web_cfg: Config) -> None:
    async def scenario(web: Web) -> None:
        guard, fake = _fake_guard(web)
        c = web.client
        assert (await login(c, ALICE, PASSWORD)).status_code == 303
        assert (await c.get("/settings/totp/qr.svg")).status_code == 404  # nothing pending
        r = await post_form(c, "/settings", "/settings/totp/begin", {})
        assert r.status_code == 303
        page = await c.get("/settings")
        found = re.search(r'id="totp-secret">([A-Z2-7]+)<', page.text)
        assert found is not None
        secret = found.group(1)
        qr = await c.get("/settings/totp/qr.svg")
        assert qr.status_code == 200 and qr.headers["content-type"].startswith("image/svg+xml")
        assert qr.content.lstrip().startswith(b"<?xml") and b"<svg" in qr.content
        assert b"<script" not in qr.content
        totp = pyotp.TOTP(secret)
        wrong = next(f"{n:06d}" for n in range(1000000) if f"{n:06d}" not in _codes_now(secret))
        r = await post_form(c, "/settings", "/settings/totp/confirm", {"code": wrong})
        assert r.status_code == 400 and "Codice errato." in r.text
        r = await post_form(c, "/settings", "/settings/totp/confirm", {"code": totp.now()})
        assert r.status_code == 303 and r.headers["location"] == "/settings?m=totp-on"
        assert "La verifica in due passaggi è attiva." in (await c.get("/settings")).text
        assert (await Security(web.db).totp_status(ALICE)).enabled
        out = await post_form(c, "/settings", "/logout", {})
        assert out.status_code == 303

        # Password, then the code: two steps, a new session id at each.
        r = await login(c, ALICE, PASSWORD, next="/settings")
        assert r.status_code == 303 and r.headers["location"] == "/login/totp?next=%2Fsettings"
        pending = c.cookies[SESSION_COOKIE]
        assert not await _logged_in(c)  # half-way is not logged in
        step = await c.get("/login/totp", params={"next": "/settings"})
        assert step.status_code == 200 and 'name="code"' in step.text and "secret" not in step.text
        r = await submit_totp(c, wrong)
        assert r.status_code == 200 and "Codice errato." in r.text
        assert guard.failures(account=ALICE) == 1
        code = totp.at(time.time() + 30)  # the next step: the confirmation used this one
        r = await post_form(
            c, "/login/totp?next=/settings", "/login/totp", {"code": code, "next": "/settings"}
        )
        assert r.status_code == 303 and r.headers["location"] == "/settings"
        assert c.cookies[SESSION_COOKIE] != pending
        assert await _logged_in(c)
        assert guard.failures(account=ALICE) == 0
        held = web.browser()
        held.cookies.set(SESSION_COOKIE, pending, domain="pecd.test")
        gone = await held.get("/login/totp")
        assert gone.status_code == 303 and gone.headers["location"] == "/login?m=expired"

        # A code is good once.
        await post_form(c, "/settings", "/logout", {})
        assert (await login(c, ALICE, PASSWORD)).headers["location"] == "/login/totp"
        r = await submit_totp(c, code)
        assert r.status_code == 200 and "Codice errato." in r.text
        assert not await _logged_in(c)

        # Wrong codes are failed logins: delays as for any login; the fifth wrong code in a row
        # locks the mailbox's second factor, and the login is over.
        for _ in range(TOTP_MAX_FAILURES - 2):
            r = await submit_totp(c, wrong)
            assert "Codice errato." in r.text
        r = await submit_totp(c, wrong)
        assert LOCKED in r.text and "15 minuti" in r.text
        assert SESSION_COOKIE not in c.cookies
        assert guard.failures(account=ALICE) == guard.disconnect_after
        # This address logged in to alice before (the Guard lets it skip the account's delay,
        # as on IMAP); from anywhere else the failed codes make the next login wait.
        assert fake.slept == []
        elsewhere = web.browser("198.51.100.9")
        assert (await login(elsewhere, ALICE, PASSWORD)).headers["location"] == "/login/totp"
        assert fake.slept and fake.slept[-1] > 0

        # Mail clients no longer take the password alone (the accounts' rule).
        accounts = web.app.state.accounts
        assert await accounts.authenticate(ALICE, PASSWORD) is None

    run_web(web_cfg, scenario)


def test_totp_required_enrols_at_login_and_cannot_be_disabled(web_cfg: Config) -> None:
    async def scenario(web: Web) -> None:
        await Security(web.db).set_totp_required(CAROL, True)
        c = web.client
        r = await login(c, CAROL, PASSWORD)
        assert r.status_code == 303 and r.headers["location"] == "/login/totp"
        page = await c.get("/login/totp")
        found = re.search(r'class="secret">([A-Z2-7]+)<', page.text)
        assert found is not None and 'src="/login/totp/qr.svg"' in page.text
        again = await c.get("/login/totp")
        assert found.group(1) in again.text  # the same secret until confirmed
        qr = await c.get("/login/totp/qr.svg")
        assert qr.status_code == 200 and b"<svg" in qr.content
        assert (await web.browser().get("/login/totp/qr.svg")).status_code == 404
        r = await submit_totp(c, pyotp.TOTP(found.group(1)).now())
        assert r.status_code == 303 and r.headers["location"] == "/mail"
        settings = await c.get("/settings")
        assert "È obbligatoria per questa casella." in settings.text
        assert "/settings/totp/disable" not in settings.text
        r = await post_form(c, "/settings", "/settings/totp/disable", {"code": "123456"})
        assert r.status_code == 400 and "non si può disattivare" in r.text
        assert (await Security(web.db).totp_status(CAROL)).enabled

    run_web(web_cfg, scenario)


def test_throttling_as_on_the_mail_listeners(web_cfg: Config) -> None:
    async def scenario(web: Web) -> None:
        guard, fake = _fake_guard(web)
        sec = web.cfg.security
        c = web.client
        attempts = sec.delay_after_failures + 3
        for _ in range(attempts):
            r = await login(c, ALICE, "not the password")
            assert WRONG in r.text
        expected = [guard.delay_for(n) for n in range(attempts)]
        assert list(guard.owed) == expected
        assert expected[: sec.delay_after_failures + 1] == [0.0] * sec.delay_after_failures + [
            sec.delay_base_seconds
        ]
        assert sum(fake.slept) >= sum(expected) - 1e-9
        assert guard.failures(peer="203.0.113.7") == attempts
        # Even the right password waits its turn now; then the failures are forgiven.
        before = len(fake.slept)
        assert (await login(c, ALICE, PASSWORD)).status_code == 303
        assert len(fake.slept) > before
        assert guard.failures(peer="203.0.113.7") == 0
        # Another client address guessing at the same account waits too (the account's delay).
        for _ in range(attempts):
            await login(web.browser("198.51.100.1"), BOB, "nope")
        before = len(fake.slept)
        await login(web.browser("198.51.100.2"), BOB, "nope")
        assert len(fake.slept) > before

    run_web(web_cfg, scenario)


def test_pages_headers_language_and_login_redirect(web_cfg: Config) -> None:
    async def scenario(web: Web) -> None:
        c = web.client
        r = await c.get("/settings")
        assert r.status_code == 303 and r.headers["location"] == "/login?next=%2Fsettings"
        r = await c.get("/settings/totp/qr.svg")
        assert r.status_code == 303
        r = await c.post("/settings/tokens", data={"name": "x"})
        assert r.status_code == 303 and r.headers["location"] == "/login"
        assert (await c.get("/")).headers["location"] == "/mail"
        for path in ("/login", "/static/app.css", "/no/such/page", "/settings", "/"):
            r = await c.get(path)
            for name, value in SECURITY_HEADERS.items():
                assert r.headers[name] == value, (path, name)
        css = await c.get("/static/app.css")
        assert css.status_code == 200 and css.headers["content-type"].startswith("text/css")
        missing = await c.get("/no/such/page")
        assert missing.status_code == 404 and "Pagina non trovata" in missing.text
        assert '<link rel="stylesheet" href="/static/app.css">' in missing.text
        wrong_method = await c.get("/logout")
        assert wrong_method.status_code == 405 and "Metodo non consentito" in wrong_method.text

        # Italian by default; the browser's language next; the switch above both.
        page = await c.get("/login")
        assert 'lang="it"' in page.text and "Accedi" in page.text
        assert 'name="viewport"' in page.text
        assert "<script" not in page.text and "style=" not in page.text
        english = await c.get("/login", headers={"Accept-Language": "en-GB,en;q=0.9,it;q=0.5"})
        assert 'lang="en"' in english.text and ">Log in<" in english.text
        prefers_it = await c.get("/login", headers={"Accept-Language": "it-IT,en;q=0.8"})
        assert 'lang="it"' in prefers_it.text
        r = await post_form(c, "/login", "/lang", {"lang": "en", "next": "/login?next=/settings"})
        assert r.status_code == 303 and r.headers["location"] == "/login?next=/settings"
        assert c.cookies["pecd_lang"] == "en"
        page = await c.get("/login", headers={"Accept-Language": "it"})
        assert 'lang="en"' in page.text and "Wrong address" not in page.text
        r = await login(c, ALICE, "nope")
        assert "Wrong address or password." in r.text
        assert "Page not found" in (await c.get("/nowhere")).text
        r = await post_form(c, "/login", "/lang", {"lang": "xx", "next": "//evil.example"})
        assert r.headers["location"] == "/" and c.cookies["pecd_lang"] == "en"
        assert (await login(c, ALICE, PASSWORD)).status_code == 303
        settings = await c.get("/settings")
        for label in (
            "Settings",
            "Change password",
            "Two-step verification",
            "App passwords",
            "API tokens",
            "Log out",
        ):
            assert label in settings.text, label
        assert "<script" not in settings.text and "style=" not in settings.text
        r = await post_form(c, "/settings", "/lang", {"lang": "it", "next": "/settings"})
        assert r.headers["location"] == "/settings"
        assert "Cambia password" in (await c.get("/settings")).text

    run_web(web_cfg, scenario)


def test_settings_password_quota_app_passwords_and_tokens(web_cfg: Config) -> None:
    async def scenario(web: Web) -> None:
        async with web.db.session() as s, s.begin():
            await s.execute(
                update(Mailbox).where(Mailbox.address == ALICE).values(quota_bytes=1024 * 1024)
            )
        MaildirStore(web.cfg.maildir_root).deliver(
            ALICE, "k1", b"Subject: x\r\n\r\n" + b"y" * 300_000
        )
        c, other = web.client, web.browser()
        assert (await login(c, ALICE, PASSWORD)).status_code == 303
        assert (await login(other, ALICE, PASSWORD)).status_code == 303
        page = await c.get("/settings")
        assert "di 1 MB (29%)" in page.text and "<meter" in page.text
        assert "Sessioni aperte su questa casella: 2." in page.text

        # Password change: checks, then every other session ends.
        new = "a much better password"
        for data, message in (
            ({"old": PASSWORD, "new": new, "repeat": new + "x"}, "non coincidono"),
            ({"old": PASSWORD, "new": "short", "repeat": "short"}, "almeno 8 caratteri"),
            (
                {"old": "not it at all", "new": new, "repeat": new},
                "La password attuale non è corretta.",
            ),
        ):
            r = await post_form(c, "/settings", "/settings/password", data)
            assert r.status_code == 400 and message in r.text, message
        before = c.cookies[SESSION_COOKIE]
        r = await post_form(
            c, "/settings", "/settings/password", {"old": PASSWORD, "new": new, "repeat": new}
        )
        assert r.status_code == 303 and r.headers["location"] == "/settings?m=password"
        assert c.cookies[SESSION_COOKIE] != before
        assert "Password cambiata." in (await c.get(r.headers["location"])).text
        assert not await _logged_in(other)
        assert WRONG in (await login(web.browser(), ALICE, PASSWORD)).text
        assert (await login(web.browser(), ALICE, new)).status_code == 303

        # App passwords: shown once, listed, revoked; never a web password.
        r = await post_form(
            c, "/settings", "/settings/app-passwords", {"name": "Thunderbird", "password": new}
        )
        found = re.search(r'id="app-password-value">([0-9a-z-]+)<', r.text)
        assert r.status_code == 200 and found is not None
        app_password = found.group(1)
        listing = await c.get("/settings")
        assert "Thunderbird" in listing.text and app_password not in listing.text
        assert WRONG in (await login(web.browser(), ALICE, app_password)).text
        accounts = web.app.state.accounts
        assert await accounts.authenticate(ALICE, app_password) == ALICE
        [info] = await Security(web.db).app_password_list(ALICE)
        bob = web.browser()
        await login(bob, BOB, PASSWORD)
        r = await post_form(bob, "/settings", f"/settings/app-passwords/{info.id}/revoke", {})
        assert r.status_code == 404
        r = await post_form(c, "/settings", f"/settings/app-passwords/{info.id}/revoke", {})
        assert r.status_code == 303 and r.headers["location"] == "/settings?m=app-revoked"
        assert await accounts.authenticate(ALICE, app_password) is None
        assert "Revocata" in (await c.get("/settings")).text
        r = await post_form(
            c, "/settings", "/settings/app-passwords", {"name": "   ", "password": new}
        )
        assert r.status_code == 400

        # API tokens: the same life.
        r = await post_form(
            c, "/settings", "/settings/tokens", {"name": "gestionale", "password": new}
        )
        found = re.search(r'id="token-value">(pecd_[A-Za-z0-9_-]+)<', r.text)
        assert r.status_code == 200 and found is not None
        token = found.group(1)
        tokens = Tokens(web.db)
        assert await tokens.authenticate(token) == ALICE
        assert token not in (await c.get("/settings")).text
        [tinfo] = await tokens.list(ALICE)
        assert (
            await post_form(bob, "/settings", f"/settings/tokens/{tinfo.id}/revoke", {})
        ).status_code == 404
        assert await tokens.authenticate(token) == ALICE
        r = await post_form(c, "/settings", f"/settings/tokens/{tinfo.id}/revoke", {})
        assert r.status_code == 303 and await tokens.authenticate(token) is None

        # Closing the other sessions keeps this one.
        extra = web.browser()
        await login(extra, ALICE, new)
        r = await post_form(c, "/settings", "/settings/sessions/end-others", {})
        assert r.status_code == 303
        assert await _logged_in(c) and not await _logged_in(extra)
        assert await _logged_in(bob)

    run_web(web_cfg, scenario)


def test_translations_agree_and_accept_language_is_bounded() -> None:
    import pecd.web.app  # noqa: F401 (every page module registers its strings at import)
    from pecd.web import i18n

    assert i18n.conflicts == []
    assert i18n.translate("en", "Impostazioni") == "Settings"
    assert i18n.translate("it", "Impostazioni") == "Impostazioni"
    assert i18n.translate("en", "una frase senza traduzione") == "una frase senza traduzione"
    assert i18n.negotiate(None) == "it"
    assert i18n.negotiate("de-DE, fr;q=0.9") == "it"
    assert i18n.negotiate("de, en;q=0.5, it;q=0.4") == "en"
    assert i18n.negotiate("en;q=0, it;q=0.1") == "it"
    assert i18n.negotiate("en;q=abc") == "it"
    assert i18n.negotiate("de," * 100_000 + "en") == "it"  # only the first entries are read


@pytest.mark.slow
def test_a_real_browser_on_a_phone(web_cfg: Config) -> None:
    """Chromium, phone-sized, over real TLS: the cookies (``__Host-``, Secure), the CSRF round
    trip as a browser makes it (``Origin: null`` under our no-referrer policy), the layout
    without horizontal scrolling, and not one Content-Security-Policy violation."""
    from selenium import webdriver
    from selenium.common.exceptions import WebDriverException
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions
    from selenium.webdriver.support.wait import WebDriverWait

    app = make_app(web_cfg)
    port = free_port()
    server = uvicorn.Server(
        uvicorn.Config(
            app,
            host="127.0.0.1",
            port=port,
            log_level="warning",
            ssl_certfile=str(web_cfg.tls.cert),
            ssl_keyfile=str(web_cfg.tls.key),
        )
    )
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    options = webdriver.ChromeOptions()
    options.binary_location = "/usr/bin/chromium"
    for arg in (
        "--headless=new",
        "--no-sandbox",
        "--disable-dev-shm-usage",
        "--ignore-certificate-errors",
        "--window-size=390,844",
    ):
        options.add_argument(arg)
    options.add_experimental_option("prefs", {"intl.accept_languages": "it-IT,it"})
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = None
    try:
        wait_for(lambda: server.started, timeout=10)
        driver = webdriver.Chrome(service=Service("/usr/bin/chromedriver"), options=options)
        base = f"https://localhost:{port}"

        def press(selector: str) -> None:
            """Click a submit button and wait for the page it leads to."""
            page = driver.find_element(By.TAG_NAME, "html")
            driver.find_element(By.CSS_SELECTOR, selector).click()
            # While the old page goes, chromedriver may answer a look at its element with
            # "Node with given id does not belong to the document" rather than "stale":
            # the wait polls again.
            WebDriverWait(driver, 10, ignored_exceptions=(WebDriverException,)).until(
                expected_conditions.staleness_of(page)
            )

        driver.get(f"{base}/settings")
        assert driver.current_url == f"{base}/login?next=%2Fsettings"
        assert driver.find_element(By.TAG_NAME, "h1").text == "Accesso"
        driver.find_element(By.ID, "address").send_keys(ALICE)
        driver.find_element(By.ID, "password").send_keys(PASSWORD)
        press("form[action='/login'] button")
        assert driver.current_url == f"{base}/settings"
        assert driver.find_element(By.TAG_NAME, "h1").text.startswith("Impostazioni")
        names = {c["name"]: c for c in driver.get_cookies()}
        assert names[SESSION_COOKIE]["secure"] and names[SESSION_COOKIE]["httpOnly"]
        width = driver.execute_script(
            "return [document.documentElement.scrollWidth, window.innerWidth]"
        )
        assert width[0] <= width[1], width

        driver.find_element(By.ID, "app-name").send_keys("Telefono")
        driver.find_element(By.ID, "app-auth-password").send_keys(PASSWORD)
        press("form[action='/settings/app-passwords'] button")
        secret = driver.find_element(By.ID, "app-password-value").text
        assert re.fullmatch(r"[0-9a-z]{5}(-[0-9a-z]{5}){3}", secret)
        press("form[action='/settings/totp/begin'] button")
        qr_size = driver.execute_script("return document.querySelector('img.qr').naturalWidth")
        assert qr_size > 0  # the QR code loaded (from its own URL: data: is forbidden)

        press("form.lang button[value='en']")
        assert driver.find_element(By.TAG_NAME, "h1").text.startswith("Settings")
        press("form.logout button")
        assert driver.current_url == f"{base}/login?m=out"
        assert "You are logged out." in driver.page_source
        driver.get(f"{base}/settings")
        assert "/login" in driver.current_url

        problems = [
            entry["message"]
            for entry in driver.get_log("browser")
            if "Content Security Policy" in entry["message"] or entry["level"] == "SEVERE"
        ]
        assert problems == []
    finally:
        if driver is not None:
            driver.quit()
        server.should_exit = True
        thread.join(timeout=10)


# --- the security review of issue 13: the second factor, lasting credentials, sessions --------


def _wrong_codes(secret: str) -> list[str]:
    right = _codes_now(secret)
    return [f"{n:06d}" for n in range(100000, 100100) if f"{n:06d}" not in right]


async def _enrolled(web: Web, address: str = ALICE) -> pyotp.TOTP:
    """TOTP enabled for ``address``; the code of the current step is used by the enrolment."""
    sec = Security(web.db)
    secret = await sec.totp_begin(address)
    assert await sec.totp_confirm(address, pyotp.TOTP(secret).now())
    return pyotp.TOTP(secret)


async def _totp_count(web: Web, address: str = ALICE) -> int:
    async with web.db.read_session() as s:
        row = await s.get(MailboxSecurity, address)
    assert row is not None
    return row.totp_failures


async def _code_step(web: Web, peer: str) -> httpx.AsyncClient:
    """A browser from ``peer`` past the password, at the second step."""
    b = web.browser(peer)
    r = await login(b, ALICE, PASSWORD)
    assert r.headers["location"] == "/login/totp"
    return b


def _same_page(r: httpx.Response) -> str:
    return re.sub(r'name="csrf" value="[^"]+"', "", _main(r))


def test_totp_lockout_counts_every_address_and_parallel_codes(web_cfg: Config) -> None:
    """The review's probes: TOTP guesses from an address the holder used (a shared NAT), spread
    over many IPv6 /64s, or sent in parallel, all count against one lockout kept in the
    database; a locked mailbox answers a right code as a wrong one."""

    async def scenario(web: Web) -> None:
        guard, _fake = _fake_guard(web)
        totp = await _enrolled(web)
        wrong = _wrong_codes(totp.secret)
        # Spread over /64s: one wrong code each, the fifth locks.
        for i in range(TOTP_MAX_FAILURES):
            r = await submit_totp(await _code_step(web, f"2001:db8:{i}::1"), wrong[i])
            assert r.status_code == 200
            if i < TOTP_MAX_FAILURES - 1:
                assert "Codice errato." in r.text and LOCKED not in r.text
        assert LOCKED in r.text, re.findall(r"alert[^>]*>([^<]*)", r.text)
        assert '__Host-pecd_session=""' in r.headers["set-cookie"]
        assert await _totp_count(web) == TOTP_MAX_FAILURES
        # From the address the holder logged in from (no "known address" exemption), with the
        # right code: the same page as a wrong code gets, nothing counted, nobody let in.
        nat = "100.64.0.1"
        guard.succeeded(nat, ALICE)
        holder = await _code_step(web, nat)
        right = await submit_totp(holder, totp.at(time.time() + 30))
        guesser = await _code_step(web, "2001:db8:99::1")
        guess = await submit_totp(guesser, wrong[10])
        assert right.status_code == guess.status_code == 200
        assert LOCKED in right.text and _same_page(right) == _same_page(guess)
        assert not await _logged_in(holder) and not await _logged_in(guesser)
        assert await _totp_count(web) == TOTP_MAX_FAILURES
        # Twenty codes at once from one password-stage session: five are looked at.
        async with web.db.session() as s, s.begin():
            await s.execute(update(MailboxSecurity).values(totp_failures=0, totp_locked_until=None))
        burst = await _code_step(web, nat)
        token = csrf_of(await burst.get("/login/totp"))
        answers = await asyncio.gather(
            *(burst.post("/login/totp", data={"code": c, "csrf": token}) for c in wrong[20:40])
        )
        assert await _totp_count(web) == TOTP_MAX_FAILURES
        assert sum("Codice errato." in a.text for a in answers) <= TOTP_MAX_FAILURES - 1
        assert not any(a.headers.get("location") == "/mail" for a in answers)
        # The lock over, the right code goes in and clears the count.
        async with web.db.session() as s, s.begin():
            await s.execute(update(MailboxSecurity).values(totp_locked_until=SystemClock().now()))
        holder = await _code_step(web, nat)
        r = await submit_totp(holder, totp.at(time.time() + 30))
        assert r.status_code == 303 and r.headers["location"] == "/mail"
        assert await _totp_count(web) == 0

        # Disabling the second factor in the settings counts against the same lockout.
        for i in range(TOTP_MAX_FAILURES):
            r = await post_form(holder, "/settings", "/settings/totp/disable", {"code": wrong[i]})
            assert r.status_code == 400
        assert LOCKED in r.text
        r = await post_form(
            holder, "/settings", "/settings/totp/disable", {"code": totp.at(time.time() + 60)}
        )
        assert r.status_code == 400 and LOCKED in r.text
        assert (await Security(web.db).totp_status(ALICE)).enabled

    run_web(web_cfg, scenario)


def test_parallel_password_guesses_are_held_as_they_arrive(web_cfg: Config) -> None:
    """Twenty wrong passwords posted at once from one address: the attempts in flight count,
    so only the first few go without a delay (before, all twenty did)."""

    async def scenario(web: Web) -> None:
        guard, _fake = _fake_guard(web)
        c = web.client
        token = csrf_of(await c.get("/login"))
        form = {"address": BOB, "csrf": token, "next": ""}
        answers = await asyncio.gather(
            *(c.post("/login", data={**form, "password": f"wrong {i}"}) for i in range(20))
        )
        assert all(WRONG in a.text for a in answers)
        owed = list(guard.owed)
        assert owed.count(0.0) == web.cfg.security.delay_after_failures
        assert guard.failures(account=BOB) == 20 and guard.failures(peer=PEER) == 20

    run_web(web_cfg, scenario)


def test_lasting_credentials_need_the_password_and_the_code(web_cfg: Config) -> None:
    async def scenario(web: Web) -> None:
        guard, _fake = _fake_guard(web)
        c, other = web.client, web.browser("198.51.100.4")
        assert (await login(c, ALICE, PASSWORD)).status_code == 303
        assert (await login(other, ALICE, PASSWORD)).status_code == 303
        security, tokens = Security(web.db), Tokens(web.db)
        for path in ("/settings/app-passwords", "/settings/tokens"):
            for data in ({}, {"password": "not the password"}):
                r = await post_form(c, "/settings", path, {"name": "x", **data})
                assert r.status_code == 400 and "La password attuale non è corretta." in r.text
        assert await security.app_password_list(ALICE) == [] and await tokens.list(ALICE) == []
        assert guard.failures(account=ALICE) == 4  # checked as logins are
        page = await c.get("/settings")
        assert (
            'name="password"' in page.text
            and "one-time-code" not in page.text.split('id="app-passwords"')[1]
        )
        r = await post_form(
            c, "/settings", "/settings/app-passwords", {"name": "phone", "password": PASSWORD}
        )
        assert r.status_code == 200 and 'id="app-password-value"' in r.text

        # A second factor confirmed in the settings ends every other session.
        await post_form(c, "/settings", "/settings/totp/begin", {})
        found = re.search(r'id="totp-secret">([A-Z2-7]+)<', (await c.get("/settings")).text)
        assert found is not None
        totp = pyotp.TOTP(found.group(1))
        r = await post_form(c, "/settings", "/settings/totp/confirm", {"code": totp.now()})
        assert r.headers["location"] == "/settings?m=totp-on"
        assert await _logged_in(c) and not await _logged_in(other)
        # Now the code is asked too.
        for path in ("/settings/app-passwords", "/settings/tokens"):
            r = await post_form(c, "/settings", path, {"name": "y", "password": PASSWORD})
            assert r.status_code == 400 and "Codice errato." in r.text
        assert len(await security.app_password_list(ALICE)) == 1 and await tokens.list(ALICE) == []
        r = await post_form(
            c,
            "/settings",
            "/settings/tokens",
            {"name": "erp", "password": PASSWORD, "code": totp.at(time.time() + 30)},
        )
        assert r.status_code == 200 and 'id="token-value"' in r.text
        page = await c.get("/settings")
        assert "I token restano validi anche dopo un cambio di password" in page.text
        assert "Cambiando la password si revocano tutte le password per le app." in page.text

    run_web(web_cfg, scenario)


def test_a_new_password_ends_sessions_and_revokes_app_passwords(web_cfg: Config) -> None:
    async def scenario(web: Web) -> None:
        c, other = web.client, web.browser("198.51.100.5")
        assert (await login(c, ALICE, PASSWORD)).status_code == 303
        assert (await login(other, ALICE, PASSWORD)).status_code == 303
        security, accounts = Security(web.db), web.app.state.accounts
        _id, app = await security.app_password_create(ALICE, "Thunderbird")
        # The operator's reset: every session ends, the app passwords with them.
        await accounts.set_password(ALICE, "set by the operator")
        assert not await _logged_in(c) and not await _logged_in(other)
        assert await accounts.authenticate(ALICE, app) is None
        # The holder's change: this browser goes on, the rest ends; API tokens stay.
        assert (await login(c, ALICE, "set by the operator")).status_code == 303
        assert (await login(other, ALICE, "set by the operator")).status_code == 303
        _id, app = await security.app_password_create(ALICE, "phone")
        _id, token = await Tokens(web.db).create(ALICE, "erp")
        new = "chosen by the holder"
        r = await post_form(
            c,
            "/settings",
            "/settings/password",
            {"old": "set by the operator", "new": new, "repeat": new},
        )
        assert r.status_code == 303
        page = await c.get(r.headers["location"])
        assert "le password per le app revocate" in page.text
        assert await _logged_in(c) and not await _logged_in(other)
        assert await accounts.authenticate(ALICE, app) is None
        assert await Tokens(web.db).authenticate(token) == ALICE
        assert "erp" in (await c.get("/settings")).text

    run_web(web_cfg, scenario)


def test_login_never_enrols_with_a_secret_begun_elsewhere(web_cfg: Config) -> None:
    """The holder begins enrolling in the settings; whoever logs in with the password while the
    second factor is required gets a secret of their own, never the holder's."""

    async def scenario(web: Web) -> None:
        holder = web.client
        assert (await login(holder, ALICE, PASSWORD)).status_code == 303
        await post_form(holder, "/settings", "/settings/totp/begin", {})
        found = re.search(r'id="totp-secret">([A-Z2-7]+)<', (await holder.get("/settings")).text)
        assert found is not None
        begun = found.group(1)
        held_qr = (await holder.get("/settings/totp/qr.svg")).content
        await Security(web.db).set_totp_required(ALICE, True)

        intruder = await _code_step(web, "198.51.100.6")
        page = await intruder.get("/login/totp")
        shown = re.search(r'class="secret">([A-Z2-7]+)<', page.text)
        assert shown is not None and shown.group(1) != begun and begun not in page.text
        qr = await intruder.get("/login/totp/qr.svg")
        assert qr.status_code == 200 and qr.content != held_qr
        assert qr.content == totp_qr_response(ALICE, shown.group(1)).body
        # Nor does the holder's page show (or confirm) the intruder's secret.
        settings = await holder.get("/settings")
        assert shown.group(1) not in settings.text and 'id="totp-secret"' not in settings.text
        assert (await holder.get("/settings/totp/qr.svg")).status_code == 404
        code = pyotp.TOTP(shown.group(1)).now()
        r = await post_form(holder, "/settings", "/settings/totp/confirm", {"code": code})
        assert r.status_code == 400
        assert not (await Security(web.db).totp_status(ALICE)).enabled

    run_web(web_cfg, scenario)
