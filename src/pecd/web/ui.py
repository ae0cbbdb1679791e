"""What every webmail page shares: templates, translation, the logged-in user, CSRF.

The contract the page modules (``pecd.web.pages.*``) code against:

* :func:`render` ``(request, template, context, *, status=200, headers=None)``: an HTML page
  from ``pecd/web/templates`` (Jinja2, autoescaped). The context always also has ``t``
  (translate: ``{{ t("Posta in arrivo") }}``, or ``{{ t("{n} messaggi", n=3) }}`` to format
  after translating), ``lang`` ("it" or "en"), ``csrf`` (put it in every form:
  ``<input type="hidden" name="csrf" value="{{ csrf }}">``), ``user`` (the mailbox address, or
  None) and ``request``.
* :func:`require_user` -> :class:`WebUser` (``mailbox``, ``csrf``): the logged-in user, or
  :class:`LoginRequired`, which the application answers with a 303 to ``/login?next=<path>``.
  :func:`current_user` is the same without the redirect (None when nobody is logged in).
* :func:`read_form`: a POST form (urlencoded or multipart) whose ``csrf`` field matches, or
  :class:`CsrfFailed`, answered with a 403 page. Every request that changes anything is a POST
  read with it.
* Templates extend ``base.html`` (blocks ``title``, ``head``, ``content``); no inline script
  or style anywhere (the Content-Security-Policy is ``default-src 'self'``).

Where the CSRF token comes from: a browser with a session (logged in, or half-way through the
login) uses its session's token; a browser without one (the login form, the language switch
before login) a token double-submitted in the cookie ``__Host-pecd_csrf``, which
:func:`render` sets when the browser has none. :func:`render` is synchronous: it uses the
session that :func:`require_user`, :func:`current_user` or :func:`read_form` loaded for this
request, so a page that shows something to logged-in users calls one of them first.
"""

from __future__ import annotations

import urllib.parse
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Final

from jinja2 import Environment, PackageLoader, select_autoescape
from starlette.datastructures import FormData
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import HTMLResponse, PlainTextResponse, RedirectResponse, Response

from pecd.web import i18n
from pecd.web.sessions import (
    CSRF_COOKIE,
    SESSION_COOKIE,
    SessionInfo,
    Sessions,
    new_secret,
    same_secret,
)

__all__ = [
    "LANG_COOKIE",
    "CsrfFailed",
    "LoginRequired",
    "WebUser",
    "clear_session_cookie",
    "csrf_token",
    "current_session",
    "current_user",
    "error_page",
    "human_size",
    "lang",
    "read_form",
    "redirect",
    "render",
    "require_user",
    "safe_next",
    "set_session_cookie",
    "templates",
    "translator",
]

LANG_COOKIE: Final = "pecd_lang"
LANG_MAX_AGE: Final = 365 * 86400

templates = Environment(
    loader=PackageLoader("pecd.web", "templates"),
    autoescape=select_autoescape(default=True, default_for_string=True),
    trim_blocks=True,
    lstrip_blocks=True,
)

i18n.register(
    {
        "Posta": "Mail",
        "Scrivi": "Compose",
        "Verifica": "Verify",
        "Impostazioni": "Settings",
        "Esci": "Log out",
        "Lingua": "Language",
        "Cambia": "Change",
        "Menu principale": "Main menu",
        "Vai al contenuto": "Skip to content",
        "Posta Elettronica Certificata": "Certified electronic mail (PEC)",
        "Accesso negato": "Access denied",
        "Pagina non trovata": "Page not found",
        "Metodo non consentito": "Method not allowed",
        "Errore": "Error",
        "Errore interno": "Internal error",
        "La pagina che cerchi non esiste.": "The page you are looking for does not exist.",
        "Torna alla pagina iniziale": "Back to the start page",
        "Il modulo è scaduto o non viene da questo sito: ricarica la pagina e riprova.": (
            "The form has expired or did not come from this site: reload the page and try again."
        ),
        "Non hai accesso a questa pagina.": "You have no access to this page.",
        "Qualcosa è andato storto. Riprova tra poco.": (
            "Something went wrong. Try again in a moment."
        ),
        "Questo indirizzo non accetta questo metodo.": "This address does not take this method.",
        "La richiesta non è valida.": "The request is not valid.",
        "La richiesta è troppo grande.": "The request is too large.",
    }
)


class LoginRequired(Exception):
    """Nobody is logged in; the application redirects to ``/login?next=<next_path>``."""

    def __init__(self, next_path: str = "/") -> None:
        super().__init__(next_path)
        self.next_path = next_path


class CsrfFailed(Exception):
    """A POST without the right CSRF token (or from another origin); answered 403."""


@dataclass(frozen=True, slots=True)
class WebUser:
    """The logged-in user of a request."""

    mailbox: str
    csrf: str


# --- language ---------------------------------------------------------------------------------


def human_size(n: int) -> str:
    """``n`` bytes for people: "12 B", "640 KB", "1.5 MB", "100 MB", "2 GB" (1 KB = 1024 B);
    one decimal below 10 of a unit unless it is whole."""
    if n < 1024:
        return f"{n} B"
    if n < 1024 * 1024:
        return f"{n // 1024} KB"
    for unit, size in (("MB", 1024**2), ("GB", 1024**3)):
        value = n / size
        if unit == "GB" or value < 1024:
            return (
                f"{value:.0f} {unit}"
                if value >= 10 or value == int(value)
                else f"{value:.1f} {unit}"
            )
    raise AssertionError("unreachable")


def lang(request: Request) -> str:
    """The page language: the ``pecd_lang`` cookie (set by POST /lang), else the browser's
    ``Accept-Language``, else Italian."""
    chosen = request.cookies.get(LANG_COOKIE)
    if chosen in i18n.LANGS:
        return chosen
    return i18n.negotiate(request.headers.get("accept-language"))


def translator(language: str) -> Callable[..., str]:
    """``t(text, **fields)``: ``text`` in ``language``, then ``str.format(**fields)`` if any
    fields are given (so the placeholders are part of the translated string)."""

    def t(text: str, **fields: Any) -> str:
        out = i18n.translate(language, text)
        return out.format(**fields) if fields else out

    return t


# --- sessions ---------------------------------------------------------------------------------

_LOADED: Final = "pecd_session_loaded"
_SESSION: Final = "pecd_session"
_NEW_CSRF: Final = "pecd_new_csrf"


def _sessions(request: Request) -> Sessions:
    sessions: Sessions = request.app.state.sessions
    return sessions


async def current_session(request: Request) -> SessionInfo | None:
    """The live session of this request's cookie, at any stage (loaded once per request)."""
    if not getattr(request.state, _LOADED, False):
        info = await _sessions(request).get(request.cookies.get(SESSION_COOKIE))
        setattr(request.state, _SESSION, info)
        setattr(request.state, _LOADED, True)
    loaded: SessionInfo | None = getattr(request.state, _SESSION, None)
    return loaded


def forget_session(request: Request, info: SessionInfo | None = None) -> None:
    """Make this request see ``info`` (a session just started, or None after logout) from now
    on, e.g. for the page rendered in the same response."""
    setattr(request.state, _SESSION, info)
    setattr(request.state, _LOADED, True)


async def current_user(request: Request) -> WebUser | None:
    """The logged-in user (a session at stage ``ok``), or None."""
    info = await current_session(request)
    if info is None or info.stage != "ok":
        return None
    return WebUser(mailbox=info.mailbox, csrf=info.csrf)


async def require_user(request: Request) -> WebUser:
    """The logged-in user, or :class:`LoginRequired` (a 303 to the login page that comes back
    here after)."""
    user = await current_user(request)
    if user is None:
        path = request.url.path
        if request.url.query:
            path += "?" + request.url.query
        raise LoginRequired(path if request.method in ("GET", "HEAD") else "/")
    return user


def csrf_token(request: Request) -> str:
    """The CSRF token forms on this page carry (see the module docstring)."""
    info: SessionInfo | None = getattr(request.state, _SESSION, None)
    if info is not None:
        return info.csrf
    cookie = request.cookies.get(CSRF_COOKIE)
    if cookie and 20 <= len(cookie) <= 128:
        return cookie
    minted: str | None = getattr(request.state, _NEW_CSRF, None)
    if minted is None:
        minted = new_secret()
        setattr(request.state, _NEW_CSRF, minted)
    return minted


def _set_cookie(response: Response, name: str, value: str, max_age: int | None) -> None:
    response.set_cookie(
        name, value, max_age=max_age, path="/", secure=True, httponly=True, samesite="lax"
    )


def set_session_cookie(response: Response, session_id: str) -> None:
    """Give the browser the session id (``__Host-``: Secure, Path=/, no Domain; HttpOnly;
    SameSite=Lax; a browser-session cookie, the server ends the session itself)."""
    _set_cookie(response, SESSION_COOKIE, session_id, None)


def clear_session_cookie(response: Response) -> None:
    response.delete_cookie(SESSION_COOKIE, path="/", secure=True, httponly=True, samesite="lax")


def _origin_ok(request: Request) -> bool:
    """A browser names where a POST comes from; one from another site is refused even before
    the token is looked at (defence in depth: the token alone would refuse it too). Our pages
    send no Referer (``Referrer-Policy: no-referrer``), so browsers send ``Origin: null`` with
    their forms: only another origin named outright is refused."""
    if request.headers.get("sec-fetch-site", "same-origin") not in ("same-origin", "none"):
        return False
    origin = request.headers.get("origin")
    if origin is None or origin == "null":
        return True
    return origin == f"{request.url.scheme}://{request.url.netloc}"


async def read_form(
    request: Request,
    *,
    max_files: int = 100,
    max_fields: int = 200,
    max_size: int = 1024 * 1024,
) -> FormData:
    """The POSTed form, its ``csrf`` field checked; else :class:`CsrfFailed`.

    ``max_files``, ``max_fields``: the most file and other fields taken; ``max_size``: the
    largest part (a file may be larger up to the request limit the application enforces; pass
    the mail limit for attachments). Over these: a 400."""
    if request.method != "POST":
        raise CsrfFailed
    if not _origin_ok(request):
        raise CsrfFailed
    form = await request.form(max_files=max_files, max_fields=max_fields, max_part_size=max_size)
    given = form.get("csrf")
    info = await current_session(request)
    expected = info.csrf if info is not None else request.cookies.get(CSRF_COOKIE)
    if not isinstance(given, str) or not same_secret(given, expected):
        await form.close()
        raise CsrfFailed
    return form


# --- pages ------------------------------------------------------------------------------------


def render(
    request: Request,
    template: str,
    context: Mapping[str, Any] | None = None,
    *,
    status: int = 200,
    headers: Mapping[str, str] | None = None,
) -> HTMLResponse:
    """``template`` rendered with ``context`` and the shared names (module docstring)."""
    language = lang(request)
    info: SessionInfo | None = getattr(request.state, _SESSION, None)
    token = csrf_token(request)
    full: dict[str, Any] = {
        "request": request,
        "t": translator(language),
        "lang": language,
        "csrf": token,
        "user": info.mailbox if info is not None and info.stage == "ok" else None,
        **(context or {}),
    }
    html = templates.get_template(template).render(full)
    response = HTMLResponse(html, status_code=status, headers=dict(headers or {}))
    response.headers.setdefault("Cache-Control", "no-store")
    if getattr(request.state, _NEW_CSRF, None) == token:
        _set_cookie(response, CSRF_COOKIE, token, None)
    return response


def redirect(url: str, status: int = 303) -> RedirectResponse:
    return RedirectResponse(url, status_code=status)


def safe_next(value: object, default: str = "/mail") -> str:
    """``value`` if it is a path on this site ("/..." but not "//..." nor "/\\..."), else
    ``default``: a ``next`` parameter never sends the browser elsewhere."""
    if not isinstance(value, str) or not value.startswith("/") or len(value) > 2048:
        return default
    if value.startswith(("//", "/\\")) or any(c in value for c in "\r\n\t\\"):
        return default
    parts = urllib.parse.urlsplit(value)
    if parts.scheme or parts.netloc:
        return default
    return value


_TITLES: Final = {
    400: ("Errore", "La richiesta non è valida."),
    403: ("Accesso negato", "Non hai accesso a questa pagina."),
    404: ("Pagina non trovata", "La pagina che cerchi non esiste."),
    405: ("Metodo non consentito", "Questo indirizzo non accetta questo metodo."),
    413: ("Errore", "La richiesta è troppo grande."),
    500: ("Errore interno", "Qualcosa è andato storto. Riprova tra poco."),
}


def error_page(request: Request, status: int, message: str | None = None) -> HTMLResponse:
    """An error page in the layout; ``message`` (Italian, translated here) replaces the
    default text of the status."""
    title, text = _TITLES.get(status, ("Errore", "La richiesta non è valida."))
    return render(
        request,
        "error.html",
        {"status": status, "title": title, "message": message or text},
        status=status,
    )


# --- the application's exception handlers (installed by pecd.web.app) --------------------------


def _is_page(request: Request) -> bool:
    path = request.url.path
    return not (path.startswith("/api/") or path == "/api" or path == "/healthz")


async def login_required_handler(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, LoginRequired)
    target = "/login"
    if exc.next_path not in ("/", "/mail"):
        target += "?" + urllib.parse.urlencode({"next": safe_next(exc.next_path)})
    response = redirect(target)
    if request.cookies.get(SESSION_COOKIE) and getattr(request.state, _SESSION, None) is None:
        clear_session_cookie(response)  # an ended session's id is no use to keep
    return response


async def csrf_failed_handler(request: Request, exc: Exception) -> Response:
    return error_page(
        request,
        403,
        "Il modulo è scaduto o non viene da questo sito: ricarica la pagina e riprova.",
    )


async def http_error_handler(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, HTTPException)
    if not _is_page(request) or exc.status_code < 400:
        headers = dict(exc.headers or {})
        if exc.status_code in (204, 304):
            return Response(status_code=exc.status_code, headers=headers)
        return PlainTextResponse(exc.detail, status_code=exc.status_code, headers=headers)
    try:
        await current_session(request)
    except Exception:  # the error page must not fail on the store; it shows logged out
        forget_session(request)
    response = error_page(request, exc.status_code)
    for name, value in (exc.headers or {}).items():
        response.headers[name] = value
    return response


async def server_error_handler(request: Request, exc: Exception) -> Response:
    if not _is_page(request):
        return PlainTextResponse("Internal Server Error", status_code=500)
    forget_session(request)  # whatever failed, the page does not touch the store again
    return error_page(request, 500)


EXCEPTION_HANDLERS: Final[Mapping[Any, Callable[[Request, Exception], Any]]] = {
    LoginRequired: login_required_handler,
    CsrfFailed: csrf_failed_handler,
    HTTPException: http_error_handler,
    500: server_error_handler,
}
