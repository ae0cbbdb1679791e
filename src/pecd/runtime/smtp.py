"""What the two SMTP points (access and reception) share: reply codes, address and trace-header
helpers, the one-copy DATA reader, and the listener lifecycle."""

from __future__ import annotations

import asyncio
import contextlib
import enum
import io
import logging
import re
from collections.abc import Callable, Sequence
from datetime import datetime
from email.utils import format_datetime
from typing import Any

from aiosmtpd.smtp import MISSING, SMTP, Envelope, Session, syntax

from pecd.guard import Admission, Guard
from pecd.runtime.logutil import RateLimitedLog

log = logging.getLogger(__name__)

# A command failing the same way for every session (the account store down during an outage).
_failures = RateLimitedLog()


class Reply:
    """SMTP replies pecd gives, named once (aiosmtpd's statuscodes habit)."""

    AUTH_OK = "235 2.7.0 Authentication successful"
    AUTH_FAILED = "535 5.7.8 Authentication credentials invalid"
    AUTH_REQUIRED = "530 5.7.0 Authentication required"
    SENDER_NOT_OWNED = "553 5.7.1 Sender address does not belong to the authenticated mailbox"
    RELAY_DENIED = "550 5.7.1 Relaying denied: not a domain of this provider"
    BAD_ADDRESS = "553 5.1.3 Not a valid mail address"
    TOO_MANY_RCPTS = "452 4.5.3 Too many recipients"
    NO_RCPTS = "554 5.5.1 No valid recipients"
    TEMP_FAILURE = "451 4.3.0 Temporary failure, message not accepted; try again later"
    LOCAL_ERROR = "451 4.3.0 Local error in processing; try again later"
    TOO_MANY_CONNECTIONS = "421 4.7.0 Too many connections, try again later"
    TOO_MANY_FAILURES = "421 4.7.0 Too many failed logins, closing connection"
    PIPELINED_STARTTLS = "421 4.7.0 Commands pipelined after STARTTLS, closing connection"
    # RFC 5321 3.8 and 4.2.3: a server shutting down answers 421 and closes (RFC 3463 4.3.2:
    # system not accepting network messages).
    SHUTTING_DOWN = "421 4.3.2 Service shutting down, closing connection"
    OK = "250 2.1.0 OK"
    RCPT_OK = "250 2.1.5 OK"

    @staticmethod
    def queued(key: str) -> str:
        return f"250 2.0.0 OK: queued as {key}"


def peer_of(session: Session) -> str:
    return session.peer[0] if isinstance(session.peer, tuple) else str(session.peer)


def received_header(
    session: Session, *, by: str, protocol: str, key: str, now: datetime, rcpt: str | None = None
) -> bytes:
    """The ``Received:`` field this hop prepends (RFC 5321 4.4)."""
    for_ = f"\r\n\tfor <{rcpt}>" if rcpt else ""
    return (
        f"Received: from {session.host_name or 'unknown'} ([{peer_of(session)}])\r\n"
        f"\tby {by} (pecd) with {protocol} id {key}{for_}; {format_datetime(now)}\r\n"
    ).encode()


def bound_port(server: asyncio.Server) -> int:
    sockets: Sequence[Any] = server.sockets
    return int(sockets[0].getsockname()[1])


DRAIN_GRACE_SECONDS = 10.0  # for a command in progress (a DATA arriving) to finish at a stop


class Sessions:
    """The open sessions of a point's listeners, so that a stop can end them (see
    :meth:`IntakeSMTP.shut_down`). Without it, sessions outlive their listener (Python 3.11's
    ``Server.wait_closed`` does not wait for them) and each command after the intake has
    stopped gets a 451 until the process exits."""

    def __init__(self) -> None:
        self.open: set[IntakeSMTP] = set()
        self.closing = False

    async def shut_down(self, grace: float = DRAIN_GRACE_SECONDS) -> None:
        """421 to every session between commands, now; to the others as their command ends
        (a DATA past its final dot gets its reply first), waiting ``grace`` seconds for them;
        what is still open then is closed with 421 all the same."""
        self.closing = True
        for session in list(self.open):
            session.shut_down()
        # Not until each connection is lost: a TLS close waits for the client's close_notify.
        deadline = asyncio.get_running_loop().time() + grace
        while any(not s.told for s in self.open):
            if asyncio.get_running_loop().time() >= deadline:
                break
            await asyncio.sleep(0.05)
        for session in list(self.open):
            session.shut_down(now=True)


async def close_servers(
    servers: Sequence[asyncio.Server], sessions: Sessions | None = None
) -> None:
    for srv in servers:
        srv.close()
    if sessions is not None:
        await sessions.shut_down()
    for srv in servers:
        # Python 3.12+ also waits here for every open connection (aiosmtpd ends its sessions
        # when the server closes); bounded, and what is left is aborted (3.13).
        abort = getattr(srv, "abort_clients", None)
        with contextlib.suppress(Exception):
            async with asyncio.timeout(5):
                await srv.wait_closed()
                abort = None
        if abort is not None:
            abort()


# The common form of a MAIL FROM / RCPT TO argument: "<dot-atom@dot-atom>", then nothing or
# whitespace and ESMTP parameters. RFC 5322 atext, ASCII only; anything else (quoted local parts,
# domain literals, source routes, comments, UTF-8) goes to aiosmtpd's full parser.
_ATOM = r"[A-Za-z0-9!#$%&'*+\-/=?^_`{|}~]+"
_DOT_ATOM = rf"{_ATOM}(?:\.{_ATOM})*"
_SIMPLE_PATH = re.compile(rf"<({_DOT_ATOM}@{_DOT_ATOM})>(?:[ \t]+([^ \t(].*)?)?", re.ASCII)


def simple_path(arg: str) -> tuple[str, str] | None:
    """(address, parameters) of an SMTP path argument in its common form, or None for the
    full parser. Same answer as aiosmtpd's ``_getaddr`` (tests/unit/test_smtp_paths.py checks it),
    for a fifth of the cost: its parser builds a token tree for each MAIL and RCPT."""
    found = _SIMPLE_PATH.fullmatch(arg)
    if found is None:
        return None
    return found[1], found[2] or ""


class IntakeEnvelope(Envelope):
    """aiosmtpd's envelope plus what the handler's ``data_prefix`` decided at DATA."""

    def __init__(self) -> None:
        super().__init__()
        self.intake_key: str | None = None
        self.received_at: datetime | None = None


class _DataState(enum.Enum):
    NOMINAL = enum.auto()
    TOO_LONG = enum.auto()
    TOO_MUCH = enum.auto()


class IntakeSMTP(SMTP):
    """aiosmtpd's SMTP with a DATA reader that holds one copy of the message, never more.

    aiosmtpd 1.4 keeps every line of DATA as its own bytearray and joins them at the end, so a
    message costs about three times its size while it arrives (an object per ~80-byte line,
    then the joined copy), and its handler then copies it once more to put a Received: field in
    front. Here the handler's ``data_prefix`` (that field) is written first and each line goes
    straight into one buffer, whose ``getvalue()`` hands its bytes over without a copy: the
    handler gets exactly the bytes it stores. Beyond ``data_size_limit`` (advertised in EHLO as
    SIZE) nothing more is kept, and the reply after the final dot is 552, as in aiosmtpd. The
    rest (line limit, dot-unstuffing, replies) follows aiosmtpd's ``smtp_DATA``.
    Only for ``decode_data=False``.

    With a ``guard``, each connection is admitted by it under the name ``listener`` (refused
    with 421 before the greeting when the client address or the listener has too many) and
    ``login_failures`` counts the failed AUTHs of the connection for the handler. STARTTLS
    followed by more bytes in the same read (CVE-2011-0411: commands injected in plain text to
    run inside TLS) closes the connection; aiosmtpd also drops such bytes, this does not rely on it.
    """

    def __init__(
        self,
        handler: Any,
        *,
        guard: Guard | None = None,
        listener: str = "smtp",
        sessions: Sessions | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(handler, **kwargs)
        self.guard = guard
        self.listener = listener
        self.admission: Admission | None = None
        self.refused = False
        self.login_failures = 0
        self.sessions = sessions
        self.in_command = False  # a command is being carried out (DATA: until its reply)
        self.shutting_down = False
        self.told = False  # the 421 of a stop has been sent
        self._smtp_methods = {
            name: self._guarded(method) for name, method in self._smtp_methods.items()
        }

    def _guarded(self, method: Any) -> Any:
        """``method`` (an ``smtp_*`` command), refused with 421 once the server is stopping,
        and followed by the 421 if the stop came while it ran."""

        async def command(arg: str) -> None:
            if self.shutting_down:
                await self._tell()
                return
            self.in_command = True
            try:
                await method(arg)
            finally:
                self.in_command = False
            if self.shutting_down and self.transport is not None:
                await self._tell()

        # What HELP reads from a command (aiosmtpd's @syntax).
        for attr in ("__smtp_syntax__", "__smtp_syntax_extended__", "__smtp_syntax_when__"):
            if hasattr(method, attr):
                setattr(command, attr, getattr(method, attr))
        return command

    def shut_down(self, *, now: bool = False) -> None:
        """The server is stopping: 421 and close, at once if no command is in progress (or
        ``now``), else when it ends."""
        self.shutting_down = True
        if self.told or self.transport is None or (self.in_command and not now):
            return
        self.told = True
        self._writer.write(Reply.SHUTTING_DOWN.encode("ascii") + b"\r\n")
        self.transport.close()  # what was written is sent first

    async def _tell(self) -> None:
        if not self.told:
            self.told = True
            await self.close_with(Reply.SHUTTING_DOWN)

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # Called again after a STARTTLS handshake: only the first call is a new connection.
        first = self._original_transport is None and self.admission is None
        if self.guard is not None and first and not self.refused:
            peer = transport.get_extra_info("peername")
            host = peer[0] if isinstance(peer, tuple) else str(peer)
            self.admission = self.guard.admit(self.listener, host)
            self.refused = self.admission is None
        if self.sessions is not None and first:
            self.sessions.open.add(self)
            self.shutting_down = self.sessions.closing
        super().connection_made(transport)

    def connection_lost(self, error: Exception | None) -> None:
        if self.admission is not None:
            self.admission.release()
        if self.sessions is not None:
            self.sessions.open.discard(self)
        super().connection_lost(error)

    async def close_with(self, reply: str) -> None:
        """Send ``reply`` and close the connection; nothing the client sent after is read."""
        await self.push(reply)
        self._reader._buffer.clear()  # type: ignore[attr-defined]
        if self.transport is not None:
            self.transport.close()

    async def handle_exception(self, error: Exception) -> str:
        """A command that failed (its store down, most often): a temporary reply, where
        aiosmtpd answers a permanent ``500`` with the error's text and logs its traceback for
        every session; here one line now and then, the traceback once (RateLimitedLog)."""
        handler = getattr(self.event_handler, "handle_exception", None)
        if handler is not None:
            status: str = await handler(error)
            return status
        _failures.failure(log, "an SMTP command failed; answering 451", error)
        return Reply.LOCAL_ERROR

    async def _handle_client(self) -> None:
        if self.refused:
            await self.close_with(Reply.TOO_MANY_CONNECTIONS)
            return
        if self.shutting_down:
            await self._tell()
            return
        await super()._handle_client()

    @syntax("STARTTLS", when="tls_context")
    async def smtp_STARTTLS(self, arg: str) -> None:
        if not arg and self.tls_context and not self._tls_protocol and self._reader._buffer:  # type: ignore[attr-defined]
            log.warning(
                "%r pipelined commands after STARTTLS: closing", self.session and self.session.peer
            )
            await self.close_with(Reply.PIPELINED_STARTTLS)
            return
        await super().smtp_STARTTLS(arg)

    def _after_data(self) -> None:
        """aiosmtpd's state after DATA (a fresh envelope), through its private and untyped
        ``_set_post_data_state``: the one typed door to it (pyproject bounds aiosmtpd for it)."""
        reset: Callable[[], None] = self._set_post_data_state
        reset()

    def _getaddr(self, arg: str) -> tuple[str | None, str | None]:
        simple = simple_path(arg)
        if simple is None:
            try:
                return super()._getaddr(arg)
            except Exception:
                # The stdlib's parser fails on some malformed paths ("<" raises IndexError,
                # "0@[" AttributeError): a syntax error, not a 451 with a traceback.
                return None, None
        address, rest = simple
        if self.local_part_limit and len(address.rpartition("@")[0]) > self.local_part_limit:
            return None, None
        return address, rest

    def _create_envelope(self) -> Envelope:
        return IntakeEnvelope()

    @syntax("DATA")
    async def smtp_DATA(self, arg: str) -> None:
        if await self.check_helo_needed():
            return
        if await self.check_auth_needed("DATA"):
            return
        assert self.envelope is not None and self.session is not None
        assert not self._decode_data, "IntakeSMTP hands the handler bytes only"
        if not self.envelope.rcpt_tos:
            await self.push("503 Error: need RCPT command")
            return
        if arg:
            await self.push("501 Syntax: DATA")
            return
        buf = io.BytesIO()
        prefix = getattr(self.event_handler, "data_prefix", None)
        if prefix is not None:
            buf.write(await prefix(self, self.session, self.envelope))
        await self.push("354 End data with <CR><LF>.<CR><LF>")
        limit = self.data_size_limit
        num_bytes = 0
        fragments: list[bytes] = []
        state = _DataState.NOMINAL
        while self.transport is not None:  # pragma: nobranch
            try:
                line = await self._reader.readuntil(b"\r\n")
            except asyncio.CancelledError:
                log.info("connection lost during DATA")
                self._writer.close()
                raise
            except asyncio.LimitOverrunError as e:
                # A line longer than the stream limit: drain it, answer 500 after the dot.
                if state is _DataState.NOMINAL:
                    state = _DataState.TOO_LONG
                    buf = io.BytesIO()
                line = await self._reader.read(e.consumed)
            if not fragments and line == b".\r\n":
                break
            num_bytes += len(line)
            if state is _DataState.NOMINAL and limit and num_bytes > limit:
                # Keep reading to the final dot (RFC 5321 4.2.5), keeping nothing.
                state = _DataState.TOO_MUCH
                buf = io.BytesIO()
            fragments.append(line)
            if not line.endswith(b"\r\n"):
                continue
            whole = fragments[0] if len(fragments) == 1 else b"".join(fragments)
            fragments.clear()
            if state is not _DataState.NOMINAL:
                continue
            if len(whole) > self.line_length_limit:
                state = _DataState.TOO_LONG
                buf = io.BytesIO()
                continue
            # RFC 5321 4.5.2: a leading dot was doubled by the client.
            buf.write(memoryview(whole)[1:] if whole.startswith(b".") else whole)

        if state is not _DataState.NOMINAL:
            if state is _DataState.TOO_LONG:
                await self.push("500 Line too long (see RFC5321 4.5.3.1.6)")
            else:
                await self.push("552 5.3.4 Message size exceeds fixed maximum message size")
            self._after_data()
            return
        assert not fragments  # a partial last line only if the connection closed
        content = buf.getvalue()  # buf's own bytes, no copy
        del buf
        self.envelope.content = self.envelope.original_content = content
        del content
        status = await self._call_handler_hook("DATA")
        self._after_data()
        await self.push("250 OK" if status is MISSING else status)
