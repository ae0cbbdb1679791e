"""pymap's IMAP connection with bounded reads, idle timeouts and a safe STARTTLS.

pymap's ``IMAPConnection`` reads a whole non-synchronising literal of any announced size into
memory (``LOGIN x {999999999+}`` before login), has no idle timeout, executes commands a client
pipelined in plaintext after ``STARTTLS`` inside the TLS session (CVE-2011-0411 class), and lets
any unexpected exception escape with a traceback. ``PecdConnection`` replaces its reading
methods and its command loop:

* every command line is at most ``max_line`` bytes (the stream reader's limit); a longer one gets
  ``BAD`` and the connection is closed;
* a literal is checked against the limit before a byte of it is read: before login
  ``max_literal_unauthenticated`` (RFC 7888 ``LITERAL-``, 4096), after login the largest message
  (``APPENDLIMIT``, RFC 7889). A synchronising literal over the limit gets a tagged ``NO
  [TOOBIG]`` (APPEND after login) or ``BAD [TOOBIG]`` without the continuation, and the
  connection goes on; a non-synchronising one gets the same answer and the connection is closed,
  its bytes unread;
* every read waits at most the idle timeout (before login, after login); an expired one gets
  ``* BYE`` and the connection is closed. IDLE waits for ``DONE`` with the same timeout, so a
  client must re-issue IDLE within it (RFC 2177);
* after ``STARTTLS`` the server stops reading, and if the client had sent anything after the
  command the connection is closed instead of starting TLS;
* an unexpected error closes this connection with ``* BYE [SERVERBUG]`` and one log line (the
  traceback at debug level).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from ssl import SSLError
from typing import Any, TypeVar

from pymap.context import current_command, socket_info, subsystem
from pymap.exceptions import ResponseError
from pymap.imap import IMAPConnection
from pymap.imap.state import ConnectionState
from pymap.parsing import Params
from pymap.parsing.command import Command
from pymap.parsing.command.nonauth import AuthenticateCommand, LoginCommand, StartTLSCommand
from pymap.parsing.command.select import IdleCommand
from pymap.parsing.response import (
    CommandResponse,
    Response,
    ResponseBad,
    ResponseBye,
    ResponseCode,
    ResponseContinuation,
    ResponseNo,
    ResponseOk,
)
from pysasl.exception import AuthenticationError

from pecd.runtime.listen import buffered_bytes

__all__ = ["ConnectionLimits", "PecdConnection", "RejectedCommand"]

_log = logging.getLogger(__name__)
_T = TypeVar("_T")

# A literal announced at the end of a line: {n}, {n+} or the binary ~{n}.
_LITERAL = re.compile(rb"~?\{(\d{1,20})(\+?)\}\r?\n\Z")
# A tag as RFC 3501 allows it (astring characters but "+"); anything else is answered as "*".
_TAG = re.compile(rb"[^\x00-\x20\x7f-\xff(){%*\"\\+\]]+")
_CHUNK = 1 << 20


@dataclass(frozen=True)
class ConnectionLimits:
    """What one IMAP connection may cost (see ``MailboxConfig`` and ``LimitsConfig``)."""

    max_line: int = 64 * 1024
    max_literal_unauthenticated: int = 4096
    max_message: int = 100 * 1024 * 1024
    idle_unauthenticated: float = 60.0
    idle_authenticated: float = 1800.0
    # Failed logins on one connection before it is closed (0: never).
    disconnect_after_failures: int = 0


class RejectedCommand(Command):
    """A command refused while it was being read (a literal or line over its limit)."""

    command = b"[REJECTED]"

    def __init__(self, tag: bytes, response: CommandResponse, close: bool) -> None:
        super().__init__(tag)
        self.response = response
        self.close = close

    @classmethod
    def parse(cls, buf: memoryview, params: Params) -> tuple[Command, memoryview]:
        # Made by the connection while reading, never parsed from the wire: no command name
        # maps to it in the parser's table.
        raise TypeError("RejectedCommand is never parsed")


class _Rejected(Exception):
    def __init__(self, response: CommandResponse, close: bool) -> None:
        super().__init__()
        self.response = response
        self.close = close


class _TimedOut(Exception):
    pass


class PecdConnection(IMAPConnection):
    """One IMAP connection with pecd's limits (see the module docstring)."""

    def __init__(self, *args: Any, limits: ConnectionLimits, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.limits = limits
        # pymap's own literal check would answer an oversized APPEND with BAD; ours runs first.
        self.params = Params(max_append_len=limits.max_message)
        self._state: ConnectionState | None = None
        self._tag = b"*"
        self._command_name = b""
        self._first_line = True
        self._literal_bytes = 0
        self._line_bytes = 0
        self._failed_logins = 0

    # -- reading ------------------------------------------------------------------------------

    @property
    def authenticated(self) -> bool:
        state = self._state
        return state is not None and getattr(state, "_session", None) is not None

    def _timeout(self) -> float:
        if self.authenticated:
            return self.limits.idle_authenticated
        return self.limits.idle_unauthenticated

    async def _timed(self, make: Callable[[], Awaitable[_T]]) -> _T:
        try:
            async with asyncio.timeout(self._timeout()):
                return await make()
        except TimeoutError:
            raise _TimedOut() from None

    def _reject(self, text: bytes, code: bytes | None, *, no: bool, close: bool) -> _Rejected:
        rcode = ResponseCode.of(code) if code else None
        response: CommandResponse = (
            ResponseNo(self._tag, text, rcode) if no else ResponseBad(self._tag, text, rcode)
        )
        if close:
            response.add_untagged(ResponseBye(b"Closing the connection."))
        return _Rejected(response, close)

    async def _read_line(self) -> bytes:
        try:
            line = await self._timed(lambda: self.reader.readuntil(b"\n"))
        except asyncio.IncompleteReadError:
            raise EOFError() from None
        except asyncio.LimitOverrunError:
            raise self._reject(b"Command line too long.", None, no=False, close=True) from None
        self._line_bytes += len(line)
        if self._line_bytes > self.limits.max_line:
            raise self._reject(b"Command too long.", None, no=False, close=True)
        if self._first_line:
            self._first_line = False
            parts = line.rstrip(b"\r\n").split(b" ", 3)
            match = _TAG.fullmatch(parts[0])
            self._tag = parts[0] if match is not None and len(parts[0]) <= 64 else b"*"
            name = parts[1].upper() if len(parts) > 1 else b""
            if name == b"UID" and len(parts) > 2:
                name = b"UID " + parts[2].upper()
            self._command_name = name
        return line

    def _check_literal(self, length: int, nonsync: bool) -> None:
        """Raise _Rejected for a literal over this state's limit (nothing of it is read yet)."""
        if not self.authenticated:
            limit = self.limits.max_literal_unauthenticated
            if self._literal_bytes + length > limit:
                raise self._reject(
                    b"Literal too large before login.", b"TOOBIG", no=False, close=nonsync
                )
            return
        limit = self.limits.max_message
        if self._literal_bytes + length > limit:
            append = self._command_name == b"APPEND"
            text = b"Message too large." if append else b"Literal too large."
            raise self._reject(text, b"TOOBIG", no=append, close=nonsync)

    async def _read_exact(self, length: int) -> bytes:
        self._literal_bytes += length
        data = bytearray()
        while len(data) < length:
            want = min(length - len(data), _CHUNK)
            chunk = await self._timed(lambda: self.reader.read(want))  # noqa: B023
            if not chunk:
                raise EOFError()
            data += chunk
        return bytes(data)

    async def readline(self) -> memoryview:
        buf = bytearray(await self._read_line())
        while True:
            match = _LITERAL.search(buf)
            if match is None:
                self._print("%s -->| %s", bytes(buf))
                return memoryview(buf)
            length = int(match.group(1))
            nonsync = match.group(2) == b"+"
            self._check_literal(length, nonsync)
            if not nonsync:
                # pymap's parser asks for the continuation; read_continuation reads it.
                self._print("%s -->| %s", bytes(buf))
                return memoryview(buf)
            buf += await self._read_exact(length)
            buf += await self._read_line()

    async def read_continuation(self, literal_length: int) -> memoryview:
        # The literal's size was checked by readline when its line was read.
        extra_literal = await self._read_exact(literal_length)
        extra_line = await self.readline()
        return memoryview(extra_literal + bytes(extra_line))

    async def read_command(self, state: ConnectionState) -> Command:
        self._tag = b"*"
        self._command_name = b""
        self._first_line = True
        self._literal_bytes = 0
        self._line_bytes = 0
        try:
            return await super().read_command(state)
        except _Rejected as rejected:
            return RejectedCommand(self._tag, rejected.response, rejected.close)

    async def idle(self, state: ConnectionState, cmd: IdleCommand) -> CommandResponse:
        # pymap's IDLE, except that a cancelled connection also ends its updates task (pymap
        # leaves it pending, "Task was destroyed but it is pending" when the loop closes).
        response = await self._exec(state.do_command(cmd))
        if not isinstance(response, ResponseOk):
            return response
        await self.write_response(ResponseContinuation(b"Idling."))
        done = subsystem.get().new_event()
        updates_task = asyncio.create_task(self.handle_updates(state, done, cmd))
        try:
            ok = await self.read_idle_done(cmd)
        finally:
            done.set()
            if not updates_task.done():
                try:
                    await asyncio.wait_for(asyncio.shield(updates_task), 5)
                except (Exception, asyncio.CancelledError):
                    updates_task.cancel()
        if updates_task.done() and not updates_task.cancelled():
            updates_exc = updates_task.exception()
            if updates_exc is not None:
                raise updates_exc
        if not ok:
            return ResponseBad(cmd.tag, b'Expected "DONE".')
        return response

    # -- STARTTLS -----------------------------------------------------------------------------

    def _pipelined_after_starttls(self) -> bool:
        """Stop reading plaintext; True when the client already sent more after STARTTLS."""
        transport = self.writer.transport
        transport.pause_reading()  # type: ignore[attr-defined]
        return buffered_bytes(self.reader) > 0

    async def start_tls(self) -> None:
        await self.writer.start_tls(self.config.ssl_context)
        self._print("%s <->| %s", "<TLS handshake>")

    # -- the command loop ---------------------------------------------------------------------

    async def _write_bye(self, text: bytes, code: bytes | None = None) -> None:
        rcode = ResponseCode.of(code) if code else None
        with contextlib.suppress(OSError):
            await self.write_response(ResponseBye(text, rcode))

    def _peer(self) -> str:
        try:
            return str(socket_info.get().peername_str or "?")
        except (LookupError, AttributeError, OSError):  # pragma: no cover - no socket info
            return "?"

    async def run(self, state: ConnectionState) -> None:
        self._state = state
        self._print("%s +++| %s", str(socket_info.get()))
        try:
            await self._serve(state)
        except _TimedOut:
            await self._write_bye(b"Autologout; idle for too long.")
        except (ConnectionError, EOFError, SSLError):
            pass
        except asyncio.CancelledError:
            await self._write_bye(b"Server shutting down.", b"UNAVAILABLE")
            raise
        except Exception as exc:
            _log.warning(
                "IMAP session from %s failed: %s: %s", self._peer(), type(exc).__name__, exc
            )
            _log.debug("IMAP session failure", exc_info=True)
            await self._write_bye(b"Unhandled server error.", b"SERVERBUG")
        finally:
            self._print("%s ---| %s", b"<disconnected>")

    async def _serve(self, state: ConnectionState) -> None:
        try:
            greeting = await self._exec(state.do_greeting())
        except ResponseError as exc:
            resp = exc.get_response(b"*")
            resp.condition = ResponseBye.condition
            await self.write_response(resp)
            return
        await self.write_response(greeting)
        bad_commands = 0
        while True:
            cmd = await self.read_command(state)
            if isinstance(cmd, RejectedCommand):
                await self.write_response(cmd.response)
                if cmd.close:
                    return
                continue
            prev_cmd = current_command.set(cmd)
            try:
                response = await self._execute(state, cmd)
            finally:
                await state.do_cleanup()
                current_command.reset(prev_cmd)
            if isinstance(cmd, LoginCommand | AuthenticateCommand) and not isinstance(
                response, ResponseOk
            ):
                self._failed_logins += 1
                limit = self.limits.disconnect_after_failures
                if limit and self._failed_logins >= limit:
                    await self.write_response(response)
                    await self._write_bye(b"Too many failed logins.")
                    return
            if isinstance(cmd, StartTLSCommand) and isinstance(response, ResponseOk):
                if self._pipelined_after_starttls():
                    await self._write_bye(b"Commands pipelined after STARTTLS.")
                    return
                await self.write_response(response)
                try:
                    await self.start_tls()
                except SSLError as exc:
                    _log.info("IMAP STARTTLS from %s failed: %s", self._peer(), exc.reason)
                    return
                continue
            await self.write_response(response)
            if response.is_bad:
                bad_commands += 1
                if self.bad_command_limit and bad_commands >= self.bad_command_limit:
                    await self._write_bye(b"Too many errors, disconnecting.")
                    return
            else:
                bad_commands = 0
            if response.is_terminal:
                return

    async def _execute(self, state: ConnectionState, cmd: Command) -> Response:
        try:
            if isinstance(cmd, AuthenticateCommand):
                creds = await self.authenticate(state, cmd.mech_name)
                return await self._exec(state.do_authenticate(cmd, creds))
            if isinstance(cmd, IdleCommand):
                return await self.idle(state, cmd)
            return await self._exec(state.do_command(cmd))
        except ResponseError as exc:
            return exc.get_response(cmd.tag)
        except AuthenticationError as exc:
            msg = bytes(str(exc), "utf-8", "surrogateescape")
            return ResponseBad(cmd.tag, msg)
        except TimeoutError:
            return ResponseNo(cmd.tag, b"Operation timed out.", ResponseCode.of(b"TIMEOUT"))
        except _Rejected as rejected:
            # A continuation line (AUTHENTICATE, IDLE) over its limit.
            return rejected.response
