"""The HTTPS listener's connections: uvicorn's HTTP/1.1 (h11) protocol with the limits every
pecd listener has, and the uvicorn server that serves it on the sockets bound before.

The listener faces the Internet, so nothing a client sends (or does not send) may hold more
than a bounded share of the process:

* **Connections.** Each connection is admitted by the process's :class:`pecd.guard.Guard` under
  the listener name ``"https"``, as on the mail listeners: at most
  ``security.max_connections_per_address`` from one client address (IPv6: per /64) and
  ``security.max_connections`` in all. A refused connection is dropped at once, before a byte
  of HTTP is read; the admission is released when the connection is lost. The Guard is the
  one the application's lifespan made for login throttling (``app.state.guard``), so that the
  web process has one Guard, as the mailbox process has.
* **The TLS handshake** must be over within :attr:`WebLimits.tls_handshake_seconds` (asyncio's
  default is a minute), and a peer that never answers our close_notify holds the socket at
  most :attr:`WebLimits.tls_shutdown_seconds`. Guard admission comes after the handshake
  (the application protocol sees no connection before it), as on the mail listeners.
* **The request head** (request line and header fields) must be complete within
  :attr:`WebLimits.head_seconds` from the moment the connection is ready for it: from the
  handshake for the first request, from the end of the previous response for the next one.
  uvicorn has no such deadline: its keep-alive timer runs only between requests and every
  byte received cancels it, so a client sending one header byte a second ("slowloris") would
  hold the connection for ever. A connection on which nothing is sent at all is cut by the
  same deadline (uvicorn arms no timer before the first request either).
* **The head's size** is bounded by h11's ``max_incomplete_event_size``
  (:attr:`WebLimits.max_head_bytes`): past it, uvicorn answers 400 and closes.
* **The request body** must arrive at :attr:`WebLimits.body_min_rate` bytes per second on
  average after a grace of :attr:`WebLimits.body_grace_seconds`: by time ``t`` after the head,
  at least ``(t - grace) * rate`` bytes. Time during which the application has not read what
  came (uvicorn stops reading past 64 KiB, flow control) or has not yet asked for the body
  (``Expect: 100-continue``) is not the client's: the clock starts again. The body's size is
  the application's limit (:class:`pecd.web.app.BodyLimit`).
* **A response the client does not read**: a connection whose writing stays paused (the
  client reads nothing while the response waits in full buffers) for
  :attr:`WebLimits.send_stall_seconds` is cut.
* **Idle keep-alive connections** are closed after :attr:`WebLimits.keep_alive_seconds`
  (uvicorn's ``timeout_keep_alive``, set explicitly).

A connection cut for a deadline is aborted (no TLS close_notify exchange with a client that
is not keeping up) and its application, if it was waiting for the body, sees the client
disconnect. One line at debug level says why; refusals are logged at most once a minute.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import ssl
import sys
import time
from collections.abc import Generator
from dataclasses import dataclass
from typing import Any, Literal

import h11
import uvicorn
from starlette.applications import Starlette
from starlette.types import ASGIApp, Message, Receive, Scope, Send
from uvicorn.config import STARTUP_FAILURE
from uvicorn.protocols.http.h11_impl import H11Protocol
from uvicorn.server import ServerState

from pecd.config import SecurityConfig
from pecd.guard import Admission, Guard

__all__ = ["LISTENER", "WebConnection", "WebLimits", "WebListener", "WebServer"]

log = logging.getLogger(__name__)

#: The Guard's name for the HTTPS listener (its connection counts are its own).
LISTENER = "https"


@dataclass(frozen=True, slots=True)
class WebLimits:
    """The HTTPS listener's deadlines and sizes (see the module docstring). The defaults are
    what the web process uses; tests shorten the times."""

    #: A client on a slow mobile link completes a handshake in a few round trips: seconds.
    tls_handshake_seconds: float = 15.0
    tls_shutdown_seconds: float = 10.0
    #: Apache's mod_reqtimeout allows 20 s for the head by default; nginx 60 s.
    head_seconds: float = 20.0
    #: The largest request head: request line and header fields (h11's own default, 16 KiB,
    #: made explicit): the webmail sends one session cookie and a CSRF cookie.
    max_head_bytes: int = 16 * 1024
    #: Slow but honest uploads (a few KiB/s on a bad mobile link) pass; a trickle does not.
    body_grace_seconds: float = 20.0
    body_min_rate: float = 1024.0
    send_stall_seconds: float = 60.0
    #: Short: an idle browser connection still counts against the client address's limit.
    keep_alive_seconds: int = 5

    def __post_init__(self) -> None:
        for name in (
            "tls_handshake_seconds",
            "tls_shutdown_seconds",
            "head_seconds",
            "body_grace_seconds",
            "body_min_rate",
            "send_stall_seconds",
        ):
            if not getattr(self, name) > 0:
                raise ValueError(f"WebLimits.{name} must be positive")
        if self.max_head_bytes < 1024 or self.keep_alive_seconds < 1:
            raise ValueError("WebLimits: max_head_bytes >= 1024 and keep_alive_seconds >= 1")
        # The next request's head deadline runs from the end of the previous response: an idle
        # keep-alive connection must be closed (gracefully) by the keep-alive timer first.
        if self.head_seconds <= self.keep_alive_seconds:
            raise ValueError("WebLimits: head_seconds must be longer than keep_alive_seconds")


class WebListener:
    """What the connections of one HTTPS listener share: the Guard, the limits, the counts of
    what was cut (for the log and for tests)."""

    LOG_EVERY = 60.0  # seconds between two lines about refused connections

    def __init__(self, guard: Guard, limits: WebLimits, name: str = LISTENER) -> None:
        self.guard = guard
        self.limits = limits
        self.name = name
        self.refused = 0
        self.cut: dict[str, int] = {"head": 0, "body": 0, "send": 0}
        self._refused_logged = 0
        self._last_log = float("-inf")

    def note_refused(self, peer: str) -> None:
        self.refused += 1
        now = time.monotonic()
        if now - self._last_log >= self.LOG_EVERY:
            log.warning(
                "%s: too many connections (latest from %s): %d refused since the last line",
                self.name,
                peer,
                self.refused - self._refused_logged,
            )
            self._last_log = now
            self._refused_logged = self.refused

    def note_cut(self, why: Literal["head", "body", "send"], peer: str) -> None:
        self.cut[why] += 1
        log.debug("%s: connection from %s cut: too slow (%s)", self.name, peer, why)


class _BoundedHead(h11.Connection):
    """h11's server connection with the request head bounded whole. h11 checks
    ``max_incomplete_event_size`` only while a head is incomplete: a head that arrives in one
    read (up to 256 KiB of TLS plaintext) would pass whatever its size. A parsed request whose
    head is over the limit is a protocol error here, which uvicorn answers 400 and closes."""

    def __init__(self, max_head: int) -> None:
        super().__init__(h11.SERVER, max_incomplete_event_size=max_head)
        self.max_head = max_head

    def next_event(self) -> h11.Event | type[h11.NEED_DATA] | type[h11.PAUSED]:
        event = super().next_event()
        if isinstance(event, h11.Request):
            size = len(event.method) + len(event.target) + len(b"  HTTP/1.1\r\n\r\n")
            size += sum(len(name) + len(value) + 4 for name, value in event.headers.raw_items())
            if size > self.max_head:
                raise h11.RemoteProtocolError("request head too large", error_status_hint=431)
        return event


def _peer_host(transport: asyncio.BaseTransport) -> str:
    peer = transport.get_extra_info("peername")
    if isinstance(peer, tuple) and peer:
        return str(peer[0])
    return str(peer)


class WebConnection(H11Protocol):
    """One HTTPS connection: uvicorn's h11 protocol, admitted by the Guard and held to the
    deadlines of :class:`WebLimits` (see the module docstring).

    One timer watches what the client owes: the head while h11 waits for a request
    (``their_state`` IDLE), the body while it is being sent (SEND_BODY); none while the
    application works or after a ``Connection: close`` request. The phase follows h11's state
    after every batch of bytes and after every response."""

    def __init__(
        self,
        config: uvicorn.Config,
        server_state: ServerState,
        app_state: dict[str, Any],
        _loop: asyncio.AbstractEventLoop | None = None,
        *,
        listener: WebListener,
    ) -> None:
        super().__init__(config, server_state, app_state, _loop)
        self.conn = _BoundedHead(listener.limits.max_head_bytes)
        self.listener = listener
        self.limits = listener.limits
        self.peer = ""
        self.admission: Admission | None = None
        self.refused = False
        self._phase: Literal["", "head", "body"] = ""
        self._timer: asyncio.TimerHandle | None = None
        self._send_timer: asyncio.TimerHandle | None = None
        self._received = 0  # bytes received on this connection (after TLS)
        self._since = 0.0  # when the body clock last (re)started
        self._mark = 0  # what had been received then

    # --- the connection ----------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.peer = _peer_host(transport)
        self.admission = self.listener.guard.admit(self.listener.name, self.peer)
        if self.admission is None:
            # Nothing of uvicorn's is set up: connection_lost knows not to tear it down.
            self.refused = True
            self.listener.note_refused(self.peer)
            transport.abort()
            return
        super().connection_made(transport)
        self._watch()

    def connection_lost(self, exc: Exception | None) -> None:
        self._unwatch()
        self._unwatch_send()
        if self.admission is not None:
            self.admission.release()
        if self.refused:
            return
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        if self.refused or self.transport.is_closing():
            # Done with this connection (an error answered, a deadline passed): what the TLS
            # layer still hands over while it shuts down is not parsed.
            return
        self._received += len(data)
        super().data_received(data)

    def handle_events(self) -> None:
        super().handle_events()
        self._watch()

    def send_400_response(self, msg: str) -> None:
        """uvicorn's answer to bytes that are not HTTP, made safe when a request is in flight
        (a broken chunk in a body the application reads, say): the application's own response
        could not follow a 400 (h11 would raise in it), so its request is over, as if the
        client had gone; and once the application's response has begun, no 400 can be sent at
        all: the connection is dropped."""
        cycle = self.cycle
        in_flight = cycle is not None and not cycle.response_complete
        if in_flight and cycle.response_started:
            self.transport.abort()
        else:
            super().send_400_response(msg)
        if in_flight:
            cycle.disconnected = True
            cycle.message_event.set()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        self._watch()

    def pause_writing(self) -> None:
        if self.refused:
            return
        super().pause_writing()
        if self._send_timer is None and not self.transport.is_closing():
            self._send_timer = self.loop.call_later(
                self.limits.send_stall_seconds, self._send_stalled
            )

    def resume_writing(self) -> None:
        if self.refused:
            return
        super().resume_writing()
        self._unwatch_send()

    # --- the deadlines -----------------------------------------------------------------------

    def _watch(self) -> None:
        """Start the deadline of what the client now owes, if it changed."""
        if self.transport.is_closing():
            self._unwatch()
            return
        state = self.conn.their_state
        phase: Literal["", "head", "body"] = (
            "head" if state is h11.IDLE else "body" if state is h11.SEND_BODY else ""
        )
        if phase == self._phase:
            return  # the same phase: its clock runs on
        self._unwatch()
        self._phase = phase
        if phase == "head":
            self._timer = self.loop.call_later(self.limits.head_seconds, self._head_expired)
        elif phase == "body":
            self._restart_body_clock()

    def _unwatch(self) -> None:
        self._phase = ""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _unwatch_send(self) -> None:
        if self._send_timer is not None:
            self._send_timer.cancel()
            self._send_timer = None

    def _restart_body_clock(self) -> None:
        self._since, self._mark = self.loop.time(), self._received
        self._timer = self.loop.call_later(self.limits.body_grace_seconds, self._body_check)

    def _head_expired(self) -> None:
        self._timer = None
        if self._phase == "head" and self.conn.their_state is h11.IDLE:
            self._cut("head")

    def _body_check(self) -> None:
        self._timer = None
        if self._phase != "body" or self.conn.their_state is not h11.SEND_BODY:
            return
        cycle = self.cycle
        if self.flow.read_paused or (cycle is not None and cycle.waiting_for_100_continue):
            # The application has not taken what came, or not asked for the body yet: the
            # client is waiting for us.
            self._restart_body_clock()
            return
        limits, sent = self.limits, self._received - self._mark
        due = self._since + limits.body_grace_seconds + sent / limits.body_min_rate
        if self.loop.time() < due:
            self._timer = self.loop.call_at(due, self._body_check)
            return
        self._cut("body")

    def _send_stalled(self) -> None:
        self._send_timer = None
        if self.flow.write_paused:
            self._cut("send")

    def _cut(self, why: Literal["head", "body", "send"]) -> None:
        if self.transport.is_closing():
            return
        self.listener.note_cut(why, self.peer)
        self._unwatch()
        self._unwatch_send()
        self.transport.abort()


class _QuietDisconnects:
    """The application as the server runs it: when a request fails after its client went away
    (it disconnected mid-upload, or a deadline cut it), that is no fault of the server's: one
    line at debug level (with the traceback) in place of uvicorn's "Exception in ASGI
    application" error, which any client could otherwise write into the log at will."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        gone = False

        async def watched(_receive: Receive = receive) -> Message:
            nonlocal gone
            message = await _receive()
            if message["type"] == "http.disconnect":
                gone = True
            return message

        try:
            await self.app(scope, watched, send)
        except Exception:
            if not gone:
                raise
            log.debug("%s %s: the client went away", scope["method"], scope["path"], exc_info=True)


class WebServer(uvicorn.Server):
    """uvicorn's server for the HTTPS listener: serves ``app`` over TLS on sockets bound before
    (by the supervisor), each connection a :class:`WebConnection`. The signals stay with the
    caller (uvicorn would take them over); set ``should_exit`` to stop.

    ``app`` is the application of :func:`pecd.web.app.make_app`: once its lifespan has run, its
    ``state.guard`` admits the connections too (one Guard per process); an application without
    one gets a Guard of ``security``."""

    def __init__(
        self,
        app: Starlette,
        tls: ssl.SSLContext,
        *,
        security: SecurityConfig,
        limits: WebLimits | None = None,
        access_log: bool = False,
        graceful_seconds: int = 5,
    ) -> None:
        self.limits = limits if limits is not None else WebLimits()
        self.security = security
        self.application = app
        self.listener: WebListener | None = None

        def keep(_config: uvicorn.Config, _default: Any) -> ssl.SSLContext:
            return tls

        super().__init__(
            uvicorn.Config(
                _QuietDisconnects(app),
                http=WebConnection,
                ws="none",
                lifespan="on",  # the app opens its database there
                ssl_context_factory=keep,
                log_config=None,  # the caller's logging
                access_log=access_log,
                server_header=False,
                proxy_headers=False,
                timeout_keep_alive=self.limits.keep_alive_seconds,
                timeout_graceful_shutdown=graceful_seconds,
                h11_max_incomplete_event_size=self.limits.max_head_bytes,
            )
        )

    @contextlib.contextmanager
    def capture_signals(self) -> Generator[None, None, None]:
        yield

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        """uvicorn's startup for sockets bound before, with the TLS deadlines (uvicorn passes
        none to ``create_server``) and the connections built with their listener."""
        if not sockets:
            raise ValueError("WebServer serves sockets bound before: pass sockets=[...]")
        await self.lifespan.startup()
        if self.lifespan.should_exit:
            sys.exit(STARTUP_FAILURE)
        guard = getattr(self.application.state, "guard", None)
        if not isinstance(guard, Guard):
            guard = Guard(self.security)
        listener = self.listener = WebListener(guard, self.limits)
        config, state, app_state = self.config, self.server_state, self.lifespan.state

        def connection() -> WebConnection:
            return WebConnection(config, state, app_state, listener=listener)

        loop = asyncio.get_running_loop()
        self.servers = []
        for sock in sockets:
            self.servers.append(
                await loop.create_server(
                    connection,
                    sock=sock,
                    ssl=config.ssl,
                    backlog=config.backlog,
                    ssl_handshake_timeout=self.limits.tls_handshake_seconds,
                    ssl_shutdown_timeout=self.limits.tls_shutdown_seconds,
                )
            )
        self.started = True
