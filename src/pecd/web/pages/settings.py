"""The settings of the logged-in mailbox (``/settings``): space used against the quota, the
password, the TOTP second factor (enrol with a QR code, confirm, disable), app passwords for mail
clients and API tokens (each shown once when made, then listed with their last use and
revocable), and the other open web sessions.

Every change is a POST read with :func:`pecd.web.ui.read_form` (CSRF) and answered with a
redirect back to ``/settings`` and a notice, except where a secret is shown once: that page is
the POST's own answer, never stored nor reachable again.

A session alone is not enough for what outlives it: making an app password or an API token asks
for the mailbox password again, and for a TOTP code when the mailbox has a second factor
(someone at an unlocked browser cannot mint a lasting credential). Those passwords, the old one
of a password change and the codes are checked through the Guard, as a login (a session left
open is no oracle for guessing them), and the codes count against the mailbox's TOTP lockout
(``Security.totp_attempt``).

A changed password (``Accounts.change_password``) ends every session of the mailbox and revokes
its app passwords; this browser goes on in a new session. API tokens stay: they are listed here
with their last use. Confirming a second factor ends every other session of the mailbox.

A TOTP enrolment belongs to the session that began it: its secret is shown (and served as a QR
code from ``/settings/totp/qr.svg``: the Content-Security-Policy, ``default-src 'self'``,
forbids ``data:`` images) and confirmed only there.
"""

from __future__ import annotations

import asyncio
import io
import math
from collections.abc import Awaitable, Callable
from datetime import datetime
from typing import Any, Final

import segno
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import BaseRoute, Route

from pecd.config import Config
from pecd.guard import Guard
from pecd.mailbox.maildir import MaildirStore
from pecd.store.accounts import MIN_PASSWORD_LENGTH, AccountError, Accounts
from pecd.store.security import Security
from pecd.store.tokens import Tokens
from pecd.web import i18n, ui
from pecd.web.sessions import SESSION_COOKIE, Sessions, session_digest

__all__ = ["TOTP_LOCKED", "lock_minutes", "routes", "totp_qr_response"]

#: What a TOTP code gets while the mailbox's lockout holds (the login page says it too).
TOTP_LOCKED: Final = (
    "Troppi codici errati: la verifica in due passaggi di questa casella non accetta codici "
    "per {n} minuti. Se non sei stato tu, qualcuno conosce la tua password: cambiala."
)

i18n.register(
    {
        "Spazio occupato": "Space used",
        "{used} di {quota} ({percent}%)": "{used} of {quota} ({percent}%)",
        "{used} (nessun limite)": "{used} (no limit)",
        "Cambia password": "Change password",
        "Password attuale": "Current password",
        "Nuova password": "New password",
        "Ripeti la nuova password": "Repeat the new password",
        "Almeno {n} caratteri.": "At least {n} characters.",
        "Password cambiata. Le altre sessioni sono state chiuse e le password per le app "
        "revocate.": (
            "Password changed. The other sessions have been closed and the app passwords revoked."
        ),
        TOTP_LOCKED: (
            "Too many wrong codes: two-step verification of this mailbox takes no code for {n} "
            "minutes. If it was not you, someone knows your password: change it."
        ),
        "Verifica in due passaggi attivata. Le altre sessioni sono state chiuse.": (
            "Two-step verification enabled. The other sessions have been closed."
        ),
        "Cambiando la password si revocano tutte le password per le app.": (
            "Changing the password revokes every app password."
        ),
        "I token restano validi anche dopo un cambio di password: revoca quelli che non "
        "riconosci o non usi più.": (
            "Tokens stay valid after a password change: revoke those you do not recognise or "
            "no longer use."
        ),
        "Per crearne una servono la password della casella e, se attiva, un codice della "
        "verifica in due passaggi.": (
            "To make one you need the mailbox password and, if enabled, a two-step "
            "verification code."
        ),
        "Per crearne uno servono la password della casella e, se attiva, un codice della "
        "verifica in due passaggi.": (
            "To make one you need the mailbox password and, if enabled, a two-step "
            "verification code."
        ),
        "Codice della verifica in due passaggi": "Two-step verification code",
        "La password attuale non è corretta.": "The current password is not right.",
        "Le due nuove password non coincidono.": "The two new passwords differ.",
        "La nuova password deve avere almeno {n} caratteri.": (
            "The new password must have at least {n} characters."
        ),
        "Attiva": "Enable",
        "Disattiva": "Disable",
        "Conferma": "Confirm",
        "Attiva la verifica in due passaggi": "Enable two-step verification",
        "La verifica in due passaggi è attiva.": "Two-step verification is on.",
        "La verifica in due passaggi non è attiva.": "Two-step verification is off.",
        "È obbligatoria per questa casella.": "It is mandatory for this mailbox.",
        "Al prossimo accesso servirà, oltre alla password, il codice di un'app di "
        "autenticazione (come FreeOTP, Aegis o Google Authenticator).": (
            "At the next login you will need, besides the password, the code of an "
            "authenticator app (such as FreeOTP, Aegis or Google Authenticator)."
        ),
        "Inquadra il codice QR con l'app di autenticazione (o inserisci il codice segreto), "
        "poi scrivi il codice a 6 cifre che mostra.": (
            "Scan the QR code with the authenticator app (or enter the secret), then enter "
            "the 6-digit code it shows."
        ),
        "Per disattivarla scrivi un codice dell'app.": "To turn it off, enter a code from the app.",
        "Verifica in due passaggi attivata.": "Two-step verification enabled.",
        "Verifica in due passaggi disattivata.": "Two-step verification disabled.",
        "Attivazione annullata.": "Enrolment cancelled.",
        "La verifica in due passaggi è obbligatoria: non si può disattivare.": (
            "Two-step verification is mandatory: it cannot be turned off."
        ),
        "Password per le app": "App passwords",
        "Per i programmi di posta (IMAP, POP3, SMTP): una per programma, revocabile.": (
            "For mail programs (IMAP, POP3, SMTP): one per program, revocable."
        ),
        "Nome": "Name",
        "Creata": "Created",
        "Ultimo uso": "Last used",
        "Revocata": "Revoked",
        "Revoca": "Revoke",
        "mai": "never",
        "Crea": "Create",
        "Nuova password per app «{name}»:": "New app password «{name}»:",
        "Copiala ora: non verrà più mostrata.": "Copy it now: it will not be shown again.",
        "Copialo ora: non verrà più mostrato.": "Copy it now: it will not be shown again.",
        "Password per app revocata.": "App password revoked.",
        "Token API": "API tokens",
        "Per i programmi che inviano PEC attraverso l'API REST (/api/v1).": (
            "For programs that send PEC through the REST API (/api/v1)."
        ),
        "Nuovo token API «{name}»:": "New API token «{name}»:",
        "Token revocato.": "Token revoked.",
        "Nessuna.": "None.",
        "Non riuscito: {detail}": "Failed: {detail}",
        "Nessuno.": "None.",
        "Sessioni": "Sessions",
        "Sessioni aperte su questa casella: {n}.": "Open sessions on this mailbox: {n}.",
        "Chiudi le altre sessioni": "Close the other sessions",
        "Le altre sessioni sono state chiuse.": "The other sessions have been closed.",
        "Scrivi un nome (da 1 a 255 caratteri).": "Enter a name (1 to 255 characters).",
        "Non trovato.": "Not found.",
        "Codice QR per l'app di autenticazione": "QR code for the authenticator app",
        "Codice segreto": "Secret",
        "Codice": "Code",
        "Codice errato.": "Wrong code.",
    }
)

#: The notices a redirect back to /settings may name (``?m=``): a fixed set, never free text.
NOTICES: Final = {
    "password": (
        "Password cambiata. Le altre sessioni sono state chiuse e le password per le app revocate."
    ),
    "totp-on": "Verifica in due passaggi attivata. Le altre sessioni sono state chiuse.",
    "totp-off": "Verifica in due passaggi disattivata.",
    "totp-cancel": "Attivazione annullata.",
    "app-revoked": "Password per app revocata.",
    "token-revoked": "Token revocato.",
    "sessions": "Le altre sessioni sono state chiuse.",
}

MAX_PASSWORD: Final = 1024
MAX_NAME: Final = 255
_FORM: Final = {"max_files": 0, "max_fields": 10, "max_size": 8192}


# --- TOTP, shared with the login's second step (pecd.web.pages.auth) --------------------------


def lock_minutes(until: datetime, now: datetime) -> int:
    """Whole minutes left of a TOTP lock (at least 1), for :data:`TOTP_LOCKED`."""
    return max(1, math.ceil((until - now).total_seconds() / 60))


def totp_qr_response(mailbox: str, secret: str) -> Response:
    """The otpauth:// URI of ``secret`` as an SVG QR code (never cached)."""
    qr = segno.make(Security.totp_uri(mailbox, secret), error="m")
    out = io.BytesIO()
    qr.save(out, kind="svg", scale=4, border=4, light="#fff", xmldecl=True, svgclass=None)
    return Response(
        out.getvalue(),
        media_type="image/svg+xml",
        headers={"Cache-Control": "no-store"},
    )


# --- the page ---------------------------------------------------------------------------------


def _accounts(request: Request) -> Accounts:
    accounts: Accounts = request.app.state.accounts
    return accounts


def _sessions(request: Request) -> Sessions:
    sessions: Sessions = request.app.state.sessions
    return sessions


def _security(request: Request) -> Security:
    return Security(request.app.state.db)


def _owner(request: Request) -> str | None:
    """The digest of this browser's session: the owner of a TOTP enrolment begun here."""
    cookie = request.cookies.get(SESSION_COOKIE)
    return session_digest(cookie) if cookie else None


def _tokens(request: Request) -> Tokens:
    return Tokens(request.app.state.db)


async def _page(
    request: Request,
    user: ui.WebUser,
    *,
    status: int = 200,
    error: str | None = None,
    error_fields: dict[str, Any] | None = None,
    notice: str | None = None,
    **shown: Any,
) -> Response:
    cfg: Config = request.app.state.cfg
    mailbox = await _accounts(request).get(user.mailbox)
    quota = mailbox.quota_bytes if mailbox is not None else None
    used = await asyncio.to_thread(MaildirStore(cfg.maildir_root).usage, user.mailbox)
    security = _security(request)
    totp = await security.totp_status(user.mailbox)
    # An enrolment begun by another session is not shown (nor can it be confirmed here).
    totp_secret = (
        await security.totp_pending_secret(user.mailbox, owner=_owner(request))
        if totp.pending
        else None
    )
    context: dict[str, Any] = {
        "used": used,
        "used_h": ui.human_size(used),
        "quota": quota,
        "quota_h": ui.human_size(quota) if quota is not None else None,
        "percent": min(100, round(100 * used / quota)) if quota else None,
        "totp": totp,
        "totp_secret": totp_secret,
        "app_passwords": await security.app_password_list(user.mailbox),
        "tokens": await _tokens(request).list(user.mailbox),
        "sessions": await _sessions(request).count(user.mailbox),
        "min_password": MIN_PASSWORD_LENGTH,
        "error": error,
        "error_fields": error_fields or {},
        "notice": notice,
        **shown,
    }
    return ui.render(request, "settings.html", context, status=status)


async def settings(request: Request) -> Response:
    user = await ui.require_user(request)
    notice = NOTICES.get(request.query_params.get("m", ""))
    return await _page(request, user, notice=notice)


def _text(form: Any, name: str, limit: int) -> str | None:
    value = form.get(name)
    if not isinstance(value, str) or len(value) > limit:
        return None
    return value


def _back(notice: str) -> Response:
    return ui.redirect(f"/settings?m={notice}")


def _peer(request: Request) -> str:
    return request.client.host if request.client is not None else "unknown"


async def change_password(request: Request) -> Response:
    user = await ui.require_user(request)
    form = await ui.read_form(request, **_FORM)
    old = _text(form, "old", MAX_PASSWORD) or ""
    new = _text(form, "new", MAX_PASSWORD) or ""
    repeat = _text(form, "repeat", MAX_PASSWORD) or ""
    if new != repeat:
        return await _page(request, user, status=400, error="Le due nuove password non coincidono.")
    if len(new) < MIN_PASSWORD_LENGTH:
        return await _page(
            request,
            user,
            status=400,
            error="La nuova password deve avere almeno {n} caratteri.",
            error_fields={"n": MIN_PASSWORD_LENGTH},
        )
    guard: Guard = request.app.state.guard
    peer = _peer(request)
    await guard.before_login(peer, user.mailbox)
    try:
        changed = await _accounts(request).change_password(user.mailbox, old, new)
    except AccountError:
        guard.release(peer, user.mailbox)
        return await _page(
            request,
            user,
            status=400,
            error="La nuova password deve avere almeno {n} caratteri.",
            error_fields={"n": MIN_PASSWORD_LENGTH},
        )
    if not changed:
        guard.failed("web", peer, user.mailbox)
        return await _page(request, user, status=400, error="La password attuale non è corretta.")
    guard.succeeded(peer, user.mailbox)
    # change_password ended every session of the mailbox, this one too (and revoked the app
    # passwords); this browser goes on in a new one.
    session_id, info = await _sessions(request).start(user.mailbox, "ok", peer=peer)
    ui.forget_session(request, info)
    response = _back("password")
    ui.set_session_cookie(response, session_id)
    return response


async def totp_begin(request: Request) -> Response:
    user = await ui.require_user(request)
    await ui.read_form(request, **_FORM)
    security = _security(request)
    if not (await security.totp_status(user.mailbox)).enabled:
        await security.totp_begin(user.mailbox, owner=_owner(request))
    return ui.redirect("/settings#totp")


async def totp_qr(request: Request) -> Response:
    user = await ui.require_user(request)
    secret = await _security(request).totp_pending_secret(user.mailbox, owner=_owner(request))
    if secret is None:
        return ui.error_page(request, 404)
    return totp_qr_response(user.mailbox, secret)


async def totp_confirm(request: Request) -> Response:
    user = await ui.require_user(request)
    form = await ui.read_form(request, **_FORM)
    code = _text(form, "code", 32) or ""
    if await _security(request).totp_confirm(user.mailbox, code, owner=_owner(request)):
        # Sessions opened with the password alone end: from now on a login needs the code.
        await _sessions(request).end_all(user.mailbox, keep=request.cookies.get(SESSION_COOKIE))
        return _back("totp-on")
    return await _page(request, user, status=400, error="Codice errato.")


async def totp_cancel(request: Request) -> Response:
    """Drop an enrolment not yet confirmed (an enabled TOTP needs a code: :func:`totp_disable`)."""
    user = await ui.require_user(request)
    await ui.read_form(request, **_FORM)
    security = _security(request)
    if (await security.totp_status(user.mailbox)).pending:
        await security.totp_disable(user.mailbox)
    return _back("totp-cancel")


async def totp_disable(request: Request) -> Response:
    user = await ui.require_user(request)
    form = await ui.read_form(request, **_FORM)
    code = _text(form, "code", 32) or ""
    security = _security(request)
    status = await security.totp_status(user.mailbox)
    if status.required:
        return await _page(
            request,
            user,
            status=400,
            error="La verifica in due passaggi è obbligatoria: non si può disattivare.",
        )
    guard: Guard = request.app.state.guard
    peer = _peer(request)
    await guard.before_login(peer, user.mailbox)
    problem = await _totp_problem(request, security, user.mailbox, code)
    if problem is not None:
        guard.failed("web", peer, user.mailbox)
        return await _page(request, user, status=400, error=problem[0], error_fields=problem[1])
    guard.succeeded(peer, user.mailbox)
    await security.totp_disable(user.mailbox)
    return _back("totp-off")


async def _totp_problem(
    request: Request, security: Security, mailbox: str, code: str
) -> tuple[str, dict[str, Any]] | None:
    """None if ``code`` is a right TOTP code of the mailbox (counted against its lockout), else
    the error to show: the same for a right and a wrong code while the mailbox is locked."""
    attempt = await security.totp_attempt(mailbox, code)
    if attempt.ok:
        return None
    if attempt.locked_until is not None:
        return TOTP_LOCKED, {"n": lock_minutes(attempt.locked_until, security.clock.now())}
    return "Codice errato.", {}


async def _reauthenticated(
    request: Request, user: ui.WebUser, form: Any
) -> tuple[str, dict[str, Any]] | None:
    """Check the mailbox password (and the TOTP code when the mailbox has a second factor)
    typed again in ``form`` before a lasting credential is made, through the Guard as a login;
    None when right, else the error to show."""
    password = _text(form, "password", MAX_PASSWORD) or ""
    code = _text(form, "code", 32) or ""
    guard: Guard = request.app.state.guard
    peer = _peer(request)
    await guard.before_login(peer, user.mailbox)
    if not password or (
        await _accounts(request).authenticate_web(user.mailbox, password, first=guard.clean(peer))
        is None
    ):
        guard.failed("web", peer, user.mailbox)
        return "La password attuale non è corretta.", {}
    security = _security(request)
    if (await security.totp_status(user.mailbox)).enabled:
        problem = await _totp_problem(request, security, user.mailbox, code)
        if problem is not None:
            guard.failed("web", peer, user.mailbox)
            return problem
    guard.succeeded(peer, user.mailbox)
    return None


def _name(form: Any) -> str | None:
    name = (_text(form, "name", MAX_NAME) or "").strip()
    return name or None


async def _create_secret(
    request: Request,
    make: Callable[[str, str], Awaitable[tuple[int, str]]],
    shown: str,
    named: str,
) -> Response:
    """The create form of an app password or an API token: a name, the password (and the code)
    again, then ``make(mailbox, name)``; the secret is shown once, as ``shown``."""
    user = await ui.require_user(request)
    form = await ui.read_form(request, **_FORM)
    name = _name(form)
    if name is None:
        return await _page(
            request, user, status=400, error="Scrivi un nome (da 1 a 255 caratteri)."
        )
    problem = await _reauthenticated(request, user, form)
    if problem is not None:
        return await _page(request, user, status=400, error=problem[0], error_fields=problem[1])
    try:
        _id, secret = await make(user.mailbox, name)
    except AccountError as e:
        return await _page(
            request, user, status=400, error="Non riuscito: {detail}", error_fields={"detail": e}
        )
    fresh: dict[str, Any] = {shown: secret, named: name}
    return await _page(request, user, **fresh)


async def app_password_create(request: Request) -> Response:
    return await _create_secret(
        request, _security(request).app_password_create, "new_app_password", "new_app_name"
    )


async def app_password_revoke(request: Request) -> Response:
    user = await ui.require_user(request)
    await ui.read_form(request, **_FORM)
    try:
        await _security(request).app_password_revoke(user.mailbox, request.path_params["id"])
    except AccountError:
        return ui.error_page(request, 404)
    return _back("app-revoked")


async def token_create(request: Request) -> Response:
    return await _create_secret(request, _tokens(request).create, "new_token", "new_token_name")


async def token_revoke(request: Request) -> Response:
    user = await ui.require_user(request)
    await ui.read_form(request, **_FORM)
    token_id: int = request.path_params["id"]
    tokens = _tokens(request)
    # Tokens.revoke takes any id: only one of this mailbox's own is revoked here.
    if token_id not in {t.id for t in await tokens.list(user.mailbox)}:
        return ui.error_page(request, 404)
    await tokens.revoke(token_id)
    return _back("token-revoked")


async def end_other_sessions(request: Request) -> Response:
    user = await ui.require_user(request)
    await ui.read_form(request, **_FORM)
    await _sessions(request).end_all(user.mailbox, keep=request.cookies.get(SESSION_COOKIE))
    return _back("sessions")


def routes(cfg: Config) -> list[BaseRoute]:
    return [
        Route("/settings", settings, methods=["GET"]),
        Route("/settings/password", change_password, methods=["POST"]),
        Route("/settings/totp/begin", totp_begin, methods=["POST"]),
        Route("/settings/totp/qr.svg", totp_qr, methods=["GET"]),
        Route("/settings/totp/confirm", totp_confirm, methods=["POST"]),
        Route("/settings/totp/cancel", totp_cancel, methods=["POST"]),
        Route("/settings/totp/disable", totp_disable, methods=["POST"]),
        Route("/settings/app-passwords", app_password_create, methods=["POST"]),
        Route("/settings/app-passwords/{id:int}/revoke", app_password_revoke, methods=["POST"]),
        Route("/settings/tokens", token_create, methods=["POST"]),
        Route("/settings/tokens/{id:int}/revoke", token_revoke, methods=["POST"]),
        Route("/settings/sessions/end-others", end_other_sessions, methods=["POST"]),
    ]
