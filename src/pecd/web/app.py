"""The ASGI application pecd serves over HTTPS (``listeners.https``), in the web process.

Starlette: small, typed and well kept, with routing, requests and responses and nothing else to
carry; pages will be rendered on the server (templates), so no JavaScript build chain. uvicorn
serves it (``pecd.runtime.web_process``).

What every response gets, whatever route made it (two plain ASGI middlewares, outermost first):

* :class:`SecurityHeaders`: Content-Security-Policy (own origin only, never framed), HSTS,
  ``nosniff`` and no Referer. A response that sets its own Content-Security-Policy keeps it (the
  sandboxed frame that shows a message's sanitised HTML sets a stricter one that lets only this
  origin frame it); every other header is always the application's.
* :class:`BodyLimit`: a request body over ``limits.max_message_size`` (the mail limit) is
  answered 413: at once when its Content-Length says so, else as soon as the bytes read pass it.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import AsyncIterator

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import BaseRoute, Mount, Route
from starlette.staticfiles import StaticFiles
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from pecd.config import Config
from pecd.guard import Guard
from pecd.store.accounts import Accounts
from pecd.store.db import Database
from pecd.web.api import Problem, api_routes, request_limit
from pecd.web.pages import page_routes
from pecd.web.sessions import Sessions
from pecd.web.ui import EXCEPTION_HANDLERS

__all__ = ["SECURITY_HEADERS", "BodyLimit", "RequestTooLarge", "SecurityHeaders", "make_app"]

log = logging.getLogger(__name__)

SECURITY_HEADERS: dict[str, str] = {
    "Content-Security-Policy": (
        "default-src 'self'; frame-ancestors 'none'; base-uri 'none'; form-action 'self'"
    ),
    "Strict-Transport-Security": "max-age=31536000",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
}


class SecurityHeaders:
    """Adds :data:`SECURITY_HEADERS` to every HTTP response (replacing any the app set)."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app
        self._names = {name.lower().encode("latin-1") for name in SECURITY_HEADERS}
        self._headers = [
            (name.lower().encode("latin-1"), value.encode("latin-1"))
            for name, value in SECURITY_HEADERS.items()
        ]
        self._csp = b"content-security-policy"

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def send_with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                own = message.get("headers", [])
                own_csp = [(k, v) for k, v in own if k.lower() == self._csp]
                kept = [(k, v) for k, v in own if k.lower() not in self._names]
                ours = [(k, v) for k, v in self._headers if not (own_csp and k == self._csp)]
                message = {**message, "headers": [*kept, *own_csp[:1], *ours]}
            await send(message)

        await self.app(scope, receive, send_with_headers)


class RequestTooLarge(HTTPException):
    """Raised from ``receive`` when the body read passes the limit. An HTTPException, so that
    Starlette's exception handling answers it (413) in place of an error page."""

    def __init__(self) -> None:
        super().__init__(413, "request body too large")


class BodyLimit:
    """Answers 413 to a request whose body is over ``limit`` bytes, reading no more of it."""

    def __init__(self, app: ASGIApp, limit: int) -> None:
        self.app = app
        self.limit = limit

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        for name, value in scope.get("headers", []):
            if name == b"content-length":
                try:
                    declared = int(value)
                except ValueError:
                    await self._answer(send, 400, "invalid Content-Length")
                    return
                if declared > self.limit:
                    await self._answer(send, 413, "request body too large")
                    return
        seen = 0
        started = False

        async def counting_receive() -> Message:
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.limit:
                    raise RequestTooLarge
            return message

        async def tracking_send(message: Message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        try:
            await self.app(scope, counting_receive, tracking_send)
        except RequestTooLarge:
            if started:  # too late for a status: the response is cut short instead
                raise
            await self._answer(send, 413, "request body too large")

    async def _answer(self, send: Send, status: int, detail: str) -> None:
        # An RFC 9457 problem document, as the REST API answers (pecd.web.api.Problem): what
        # a client of /api/v1 parses; a browser shows its one line of text. Connection: close,
        # as the rest of the body is not read.
        if status == 413:
            problem = Problem(
                413, "too-large", "Request too large", f"{detail}: at most {self.limit} bytes"
            )
        else:
            problem = Problem(status, "bad-request", "Bad request", detail)
        answer = problem.response()
        headers = [(k, v) for k, v in answer.raw_headers if k != b"connection"]
        await send(
            {
                "type": "http.response.start",
                "status": status,
                "headers": [*headers, (b"connection", b"close")],
            }
        )
        await send({"type": "http.response.body", "body": answer.body})


async def healthz(request: Request) -> Response:
    return JSONResponse({"status": "ok"})


def make_app(cfg: Config) -> Starlette:
    """The whole web application under ``cfg``: the REST API (``pecd.web.api``) and the
    webmail (``pecd.web.pages``). Both read ``app.state``: ``cfg`` (this config) and ``db``
    (the database the lifespan opens); the webmail also ``accounts`` (password checks),
    ``sessions`` (``pecd.web.sessions``) and ``guard`` (login throttling, as on the mail
    listeners: one Guard per process). Static files are served from ``pecd/web/static`` at
    ``/static``; the webmail's errors (login required, CSRF, 4xx) become pages
    (``pecd.web.ui``)."""
    routes: list[BaseRoute] = [Route("/healthz", healthz, methods=["GET"])]
    routes += api_routes(cfg)
    routes += page_routes(cfg)
    routes.append(Mount("/static", app=StaticFiles(packages=[("pecd.web", "static")])))

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        app.state.cfg = cfg
        app.state.db = await Database.open(cfg.database_url)
        app.state.accounts = Accounts(app.state.db, max_hash_checks=cfg.security.max_hash_checks)
        app.state.sessions = Sessions(app.state.db)
        app.state.guard = Guard(cfg.security, protocol="web")
        try:
            yield
        finally:
            app.state.guard.flush_log()
            await app.state.db.close()

    app = Starlette(routes=routes, lifespan=lifespan, exception_handlers=dict(EXCEPTION_HANDLERS))
    # add_middleware wraps outside what was added before: SecurityHeaders is outermost, so the
    # 413 gets the headers too. A message sent through the API comes base64-encoded in JSON:
    # its request may be 4/3 of the mail limit (the API checks the message itself).
    app.add_middleware(BodyLimit, limit=request_limit(cfg.limits))
    app.add_middleware(SecurityHeaders)
    return app
