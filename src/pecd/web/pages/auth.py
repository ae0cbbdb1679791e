"""Logging in and out, and the language switch.

* ``GET/POST /login``: address and mailbox password (never an app password). The attempts go
  through the process's :class:`pecd.guard.Guard` keyed by the client address, as on the
  IMAP, POP3 and SMTP listeners: after a few failures each attempt waits, longer each time. A
  wrong password, an unknown or a disabled mailbox get the same page.
* ``GET/POST /login/totp``: the second factor, when the mailbox has one (or is required to and
  has none yet: then it is enrolled here, always with a new secret of this login's own, never
  one begun elsewhere). A wrong code is a failed login for the Guard, and is counted against
  the mailbox in the database (``Security.totp_attempt``): after a few wrong codes the mailbox
  takes no code for a while, from anywhere, and says so whether the code typed was right or
  wrong.
* ``POST /logout``, ``POST /lang`` (the ``pecd_lang`` cookie), ``GET /`` (-> ``/mail``).

Every login step starts a new session and deletes the one the browser brought
(``pecd.web.sessions``): password accepted and a second factor owed -> a session at stage
``password`` (5 minutes); second factor accepted (or none owed) -> a session at stage ``ok``.
"""

from __future__ import annotations

import urllib.parse
from typing import Any, Final

from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import BaseRoute, Route

from pecd.config import Config
from pecd.guard import Guard
from pecd.store.accounts import Accounts
from pecd.store.security import Security
from pecd.web import i18n, ui
from pecd.web.pages.settings import TOTP_LOCKED, lock_minutes, totp_qr_response
from pecd.web.sessions import SESSION_COOKIE, SessionInfo, Sessions

__all__ = ["routes"]

i18n.register(
    {
        "Accesso": "Log in",
        "Accedi": "Log in",
        "Accedi alla tua casella di Posta Elettronica Certificata.": (
            "Log in to your certified email (PEC) mailbox."
        ),
        "Indirizzo PEC": "PEC address",
        "Password": "Password",
        "Indirizzo o password errati.": "Wrong address or password.",
        "Scrivi indirizzo e password.": "Enter your address and password.",
        "Sei uscito.": "You are logged out.",
        "La sessione è scaduta: accedi di nuovo.": "The session has expired: log in again.",
        "Verifica in due passaggi": "Two-step verification",
        "Scrivi il codice a 6 cifre della tua app di autenticazione.": (
            "Enter the 6-digit code from your authenticator app."
        ),
        "Questa casella richiede un secondo fattore. Inquadra il codice QR con un'app di "
        "autenticazione (o inserisci il codice segreto), poi scrivi il codice a 6 cifre che "
        "mostra.": (
            "This mailbox requires a second factor. Scan the QR code with an authenticator app "
            "(or enter the secret), then enter the 6-digit code it shows."
        ),
        "Codice QR per l'app di autenticazione": "QR code for the authenticator app",
        "Codice segreto": "Secret",
        "Codice": "Code",
        "Annulla": "Cancel",
        "Codice errato.": "Wrong code.",
        "Troppi tentativi: accedi di nuovo.": "Too many attempts: log in again.",
    }
)

MAX_ADDRESS: Final = 320
MAX_PASSWORD: Final = 1024
WRONG: Final = "Indirizzo o password errati."


def _peer(request: Request) -> str:
    return request.client.host if request.client is not None else "unknown"


def _accounts(request: Request) -> Accounts:
    accounts: Accounts = request.app.state.accounts
    return accounts


def _guard(request: Request) -> Guard:
    guard: Guard = request.app.state.guard
    return guard


def _sessions(request: Request) -> Sessions:
    sessions: Sessions = request.app.state.sessions
    return sessions


def _security(request: Request) -> Security:
    return Security(request.app.state.db)


def _field(form: Any, name: str, limit: int) -> str | None:
    """A text field of at most ``limit`` characters, or None (absent, a file, too long)."""
    value = form.get(name)
    if not isinstance(value, str) or len(value) > limit:
        return None
    return value


def _login_page(
    request: Request,
    *,
    next_path: str,
    address: str = "",
    error: str | None = None,
    error_fields: dict[str, Any] | None = None,
    notice: str | None = None,
) -> Response:
    return ui.render(
        request,
        "login.html",
        {
            "next": next_path,
            "address": address,
            "error": error,
            "error_fields": error_fields or {},
            "notice": notice,
        },
    )


async def _logged_in(
    request: Request, mailbox: str, next_path: str, *, end_others: bool = False
) -> Response:
    """The last login step: a new session at stage ``ok``, replacing the one brought.
    ``end_others``: every other session of the mailbox ends (a second factor was just set
    up: sessions opened with the password alone go)."""
    sessions = _sessions(request)
    session_id, info = await sessions.start(
        mailbox, "ok", peer=_peer(request), replacing=request.cookies.get(SESSION_COOKIE)
    )
    if end_others:
        await sessions.end_all(mailbox, keep=session_id)
    ui.forget_session(request, info)
    response = ui.redirect(next_path)
    ui.set_session_cookie(response, session_id)
    return response


async def login_form(request: Request) -> Response:
    next_path = ui.safe_next(request.query_params.get("next"))
    if await ui.current_user(request) is not None:
        return ui.redirect(next_path)
    notice = {"out": "Sei uscito.", "expired": "La sessione è scaduta: accedi di nuovo."}.get(
        request.query_params.get("m", "")
    )
    return _login_page(request, next_path=next_path, notice=notice)


async def login(request: Request) -> Response:
    form = await ui.read_form(request, max_files=0, max_fields=10, max_size=4096)
    next_path = ui.safe_next(form.get("next"))
    address = (_field(form, "address", MAX_ADDRESS) or "").strip()
    password = _field(form, "password", MAX_PASSWORD)
    if not address or not password:
        return _login_page(
            request, next_path=next_path, address=address, error="Scrivi indirizzo e password."
        )
    guard, peer = _guard(request), _peer(request)
    await guard.before_login(peer, address)
    # The mailbox password only: an app password is for mail clients, never the web.
    mailbox = await _accounts(request).authenticate_web(address, password, first=guard.clean(peer))
    if mailbox is None:
        guard.failed("web", peer, address)
        return _login_page(request, next_path=next_path, address=address, error=WRONG)
    status = await _security(request).totp_status(mailbox)
    if status.enabled or status.required:
        # Half-way: the Guard hears of a success only once the second factor is right; this
        # attempt stops counting as one in flight.
        guard.release(peer, address)
        session_id, info = await _sessions(request).start(
            mailbox, "password", peer=peer, replacing=request.cookies.get(SESSION_COOKIE)
        )
        ui.forget_session(request, info)
        target = "/login/totp"
        if next_path != "/mail":
            target += "?" + urllib.parse.urlencode({"next": next_path})
        response = ui.redirect(target)
        ui.set_session_cookie(response, session_id)
        return response
    guard.succeeded(peer, mailbox)
    return await _logged_in(request, mailbox, next_path)


async def _pending_login(request: Request) -> SessionInfo | Response:
    """The session half-way through the login, or where to go instead."""
    info = await ui.current_session(request)
    if info is not None and info.stage == "password":
        return info
    if info is not None:  # already logged in
        return ui.redirect(ui.safe_next(request.query_params.get("next")))
    return ui.redirect("/login?m=expired")


async def _totp_page(
    request: Request,
    info: SessionInfo,
    next_path: str,
    error: str | None = None,
    error_fields: dict[str, Any] | None = None,
) -> Response:
    security = _security(request)
    status = await security.totp_status(info.mailbox)
    secret: str | None = None
    if not status.enabled:
        # Required and not yet set up: enrol now, with a secret of this login's own (the same
        # one until it is confirmed). One begun elsewhere (in the settings, by another login)
        # is never shown here: it is replaced.
        secret = await security.totp_pending_secret(info.mailbox, owner=info.digest)
        if secret is None:
            secret = await security.totp_begin(info.mailbox, owner=info.digest)
    return ui.render(
        request,
        "login_totp.html",
        {
            "next": next_path,
            "enrol": not status.enabled,
            "secret": secret,
            "error": error,
            "error_fields": error_fields or {},
        },
    )


async def totp_form(request: Request) -> Response:
    found = await _pending_login(request)
    if isinstance(found, Response):
        return found
    return await _totp_page(request, found, ui.safe_next(request.query_params.get("next")))


async def totp_qr(request: Request) -> Response:
    """The QR code of the secret being enrolled at login (see :func:`_totp_page`)."""
    found = await _pending_login(request)
    if isinstance(found, Response):
        return ui.error_page(request, 404)
    secret = await _security(request).totp_pending_secret(found.mailbox, owner=found.digest)
    if secret is None:
        return ui.error_page(request, 404)
    return totp_qr_response(found.mailbox, secret)


async def totp(request: Request) -> Response:
    found = await _pending_login(request)
    if isinstance(found, Response):
        return found
    form = await ui.read_form(request, max_files=0, max_fields=10, max_size=4096)
    next_path = ui.safe_next(form.get("next"))
    code = _field(form, "code", 32) or ""
    guard, peer, security = _guard(request), _peer(request), _security(request)
    await guard.before_login(peer, found.mailbox)
    status = await security.totp_status(found.mailbox)
    locked_until = None
    if status.enabled:
        attempt = await security.totp_attempt(found.mailbox, code)
        ok, locked_until = attempt.ok, attempt.locked_until
    else:
        ok = await security.totp_confirm(found.mailbox, code, owner=found.digest)
    if ok:
        guard.succeeded(peer, found.mailbox)
        # A second factor set up just now: the sessions opened without one end.
        return await _logged_in(request, found.mailbox, next_path, end_others=not status.enabled)
    guard.failed("web", peer, found.mailbox)
    if locked_until is not None:
        # Locked: the same answer whatever the code was (it was not even looked at, unless
        # this wrong one made the lock). This login is over; the holder waits.
        await _sessions(request).end(request.cookies.get(SESSION_COOKIE))
        ui.forget_session(request)
        response = _login_page(
            request,
            next_path=next_path,
            error=TOTP_LOCKED,
            error_fields={"n": lock_minutes(locked_until, security.clock.now())},
        )
        ui.clear_session_cookie(response)
        return response
    if guard.failures(account=found.mailbox) >= guard.disconnect_after:
        # As a mail listener closes the connection: this login is over, start again.
        await _sessions(request).end(request.cookies.get(SESSION_COOKIE))
        ui.forget_session(request)
        response = _login_page(
            request, next_path=next_path, error="Troppi tentativi: accedi di nuovo."
        )
        ui.clear_session_cookie(response)
        return response
    return await _totp_page(request, found, next_path, error="Codice errato.")


async def logout(request: Request) -> Response:
    if await ui.current_session(request) is None:
        response = ui.redirect("/login")
        ui.clear_session_cookie(response)
        return response
    await ui.read_form(request, max_files=0, max_fields=10, max_size=4096)
    await _sessions(request).end(request.cookies.get(SESSION_COOKIE))
    ui.forget_session(request)
    response = ui.redirect("/login?m=out")
    ui.clear_session_cookie(response)
    return response


async def set_lang(request: Request) -> Response:
    form = await ui.read_form(request, max_files=0, max_fields=10, max_size=4096)
    chosen = form.get("lang")
    response = ui.redirect(ui.safe_next(form.get("next"), "/"))
    if chosen in i18n.LANGS and isinstance(chosen, str):
        response.set_cookie(
            ui.LANG_COOKIE,
            chosen,
            max_age=ui.LANG_MAX_AGE,
            path="/",
            secure=True,
            httponly=True,
            samesite="lax",
        )
    return response


async def home(request: Request) -> Response:
    return ui.redirect("/mail")


def routes(cfg: Config) -> list[BaseRoute]:
    return [
        Route("/", home, methods=["GET"]),
        Route("/login", login_form, methods=["GET"]),
        Route("/login", login, methods=["POST"]),
        Route("/login/totp", totp_form, methods=["GET"]),
        Route("/login/totp", totp, methods=["POST"]),
        Route("/login/totp/qr.svg", totp_qr, methods=["GET"]),
        Route("/logout", logout, methods=["POST"]),
        Route("/lang", set_lang, methods=["POST"]),
    ]
