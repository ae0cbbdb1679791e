"""Logging in and out, and the language switch.

* ``GET/POST /login``: address and mailbox password (never an app password). The attempts go
  through the process's :class:`pecd.guard.Guard` keyed by the client address, as on the
  IMAP, POP3 and SMTP listeners: after a few failures each attempt waits, longer each time. A
  wrong password, an unknown or a disabled mailbox get the same page.
* ``GET/POST /login/totp``: the second factor, when the mailbox has one (or is required to and
  has none yet: then it is enrolled here). A wrong code is a failed login for the Guard.
* ``POST /logout``, ``POST /lang`` (the ``pecd_lang`` cookie), ``GET /`` (-> ``/mail``).

Every login step starts a new session and deletes the one the browser brought
(``pecd.web.sessions``): password accepted and a second factor owed -> a session at stage
``password`` (5 minutes); second factor accepted (or none owed) -> a session at stage ``ok``.
"""

from __future__ import annotations

from typing import Any, Final

from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import BaseRoute, Route

from pecd.config import Config
from pecd.guard import Guard
from pecd.store.accounts import Accounts
from pecd.web import i18n, ui
from pecd.web.sessions import SESSION_COOKIE, Sessions

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
    notice: str | None = None,
) -> Response:
    return ui.render(
        request,
        "login.html",
        {"next": next_path, "address": address, "error": error, "notice": notice},
    )


async def _authenticate_web(request: Request, address: str, password: str) -> str | None:
    accounts = _accounts(request)
    first = _guard(request).clean(_peer(request))
    # The mailbox password only: an app password is for mail clients, never the web.
    check = getattr(accounts, "authenticate_web", None) or accounts.authenticate
    mailbox: str | None = await check(address, password, first=first)
    return mailbox


async def _logged_in(request: Request, mailbox: str, next_path: str) -> Response:
    """The last login step: a new session at stage ``ok``, replacing the one brought."""
    session_id, info = await _sessions(request).start(
        mailbox, "ok", peer=_peer(request), replacing=request.cookies.get(SESSION_COOKIE)
    )
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
    mailbox = await _authenticate_web(request, address, password)
    if mailbox is None:
        guard.failed("web", peer, address)
        return _login_page(request, next_path=next_path, address=address, error=WRONG)
    guard.succeeded(peer, mailbox)
    return await _logged_in(request, mailbox, next_path)


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
        Route("/logout", logout, methods=["POST"]),
        Route("/lang", set_lang, methods=["POST"]),
    ]
