"""POP3 for mailbox holders on asyncio streams: POP3S (implicit TLS, 995) and POP3 with STLS (110).

The protocol decisions are in ``pecd.pop3.protocol``; this module reads lines, runs the effects
the protocol asks for (logins, listings, streaming a message, deleting at QUIT, STLS) and keeps
the limits every Internet-facing listener needs:

* a line longer than the protocol allows is answered ``-ERR`` without being buffered whole
  (the reader holds at most about twice ``_READ_LIMIT`` bytes); repeated bad lines close;
* idle timeouts before and after login (``MailboxConfig.idle_timeout_*``), and the TLS
  handshake bounded by the unauthenticated one;
* a message is streamed from its file a chunk at a time with flow control (``drain``);
* after STLS, bytes the client sent before the handshake (pipelined in plaintext) close the
  connection instead of being read as commands inside TLS (CVE-2011-0411);
* one session per mailbox holds the maildrop (RFC 1939 ``[IN-USE]``); the lock is a set in this
  process, where every POP3 session runs;
* an error in a session ends that session with one log line.

Only INBOX is served. UIDs come from ``dovecot-uidlist`` (``pecd.mailbox.uidlist``), so UIDLs are
stable across sessions and equal to the ones Dovecot gives over the same Maildir.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import ssl
from collections import deque
from contextlib import AsyncExitStack
from functools import partial
from pathlib import Path
from typing import BinaryIO

from pecd.config import MailboxConfig
from pecd.guard import Admission, Guard
from pecd.imap.backend import Authenticator
from pecd.mailbox import uidlist
from pecd.mailbox.maildir import MaildirStore
from pecd.pec.address import normalize_address
from pecd.pop3.protocol import (
    MAX_SASL_LINE,
    Close,
    Effect,
    Login,
    LoginFailure,
    Message,
    Pop3Session,
    Retrieve,
    Send,
    StartTls,
    Update,
    err,
    ok,
    uidl_of,
)
from pecd.pop3.wire import WireReader
from pecd.runtime.listen import bound_ports, buffered_bytes, listen, stop_serving

__all__ = ["Pop3Service"]

_log = logging.getLogger(__name__)

# The StreamReader's limit: a line longer than this is discarded as it arrives.
_READ_LIMIT = MAX_SASL_LINE + 2
_STOP_WAIT = 5.0


class _SessionEnd(Exception):
    """The session is over (the protocol closed it, or the transport did); ``level`` is how
    loudly the one log line says so."""

    def __init__(self, reason: str, level: int = logging.DEBUG) -> None:
        super().__init__(reason)
        self.level = level


def _peer_of(writer: asyncio.StreamWriter) -> str:
    peer = writer.get_extra_info("peername")
    if isinstance(peer, tuple) and peer:
        return str(peer[0])
    return str(peer or "unknown")


def _locate(folder: Path, name: str) -> Path | None:
    """The current file of the message whose base name is ``name`` (it may have moved from
    new/ to cur/ or been renamed with new flags since it was listed)."""
    for sub in ("new", "cur"):
        try:
            with os.scandir(folder / sub) as entries:
                for entry in entries:
                    if entry.name.split(":", 1)[0] == name:
                        return Path(entry.path)
        except FileNotFoundError:
            continue
    return None


def _open_message(folder: Path, message: Message) -> BinaryIO | None:
    try:
        return open(message.path, "rb")
    except FileNotFoundError:
        path = _locate(folder, message.name)
        if path is None:
            return None
        try:
            return open(path, "rb")
        except FileNotFoundError:
            return None


def _remove(folder: Path, messages: tuple[Message, ...]) -> int:
    """Remove the messages' files; the number that could not be removed."""
    failures = 0
    for message in messages:
        try:
            message.path.unlink()
            continue
        except FileNotFoundError:
            pass
        except OSError:
            failures += 1
            continue
        path = _locate(folder, message.name)
        if path is None:
            continue  # already gone (expunged over IMAP meanwhile)
        try:
            path.unlink(missing_ok=True)
        except OSError:
            failures += 1
    return failures


class _Connection:
    """One client connection: feeds lines to a Pop3Session and runs the effects it returns."""

    def __init__(
        self,
        service: Pop3Service,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        *,
        listener: str,
        implicit_tls: bool,
    ) -> None:
        self.service = service
        self.reader = reader
        self.writer = writer
        self.listener = listener
        self.peer = _peer_of(writer)
        guard = service.guard
        self.session = Pop3Session(
            hostname=service.hostname,
            tls=implicit_tls,
            stls=not implicit_tls,
            disconnect_after=guard.disconnect_after if guard is not None else 5,
        )
        self.locked: str | None = None  # the address whose maildrop this session holds
        self.folder: Path | None = None

    # -- the loop -------------------------------------------------------------------------

    async def run(self) -> None:
        await self._send(self.session.greeting())
        while True:
            try:
                async with asyncio.timeout(self._idle_timeout()):
                    line, too_long = await self._read_line()
            except TimeoutError:
                effects = self.session.timed_out()
            else:
                effects = self.session.receive(line, too_long=too_long)
            await self._run(effects)

    def _idle_timeout(self) -> float:
        limits = self.service.limits
        if self.session.authenticated:
            return limits.idle_timeout_authenticated
        return limits.idle_timeout_unauthenticated

    async def _read_line(self) -> tuple[bytes, bool]:
        """The next line, or (b"", True) for a line too long (discarded up to its end)."""
        too_long = False
        while True:
            try:
                line = await self.reader.readuntil(b"\n")
            except asyncio.LimitOverrunError as exc:
                # Drop what is buffered of the long line and keep looking for its end.
                too_long = True
                await self.reader.readexactly(exc.consumed)
                continue
            except asyncio.IncompleteReadError as exc:
                raise _SessionEnd("connection closed by the client") from exc
            return (b"", True) if too_long else (line, False)

    async def _run(self, effects: list[Effect]) -> None:
        queue: deque[Effect] = deque(effects)
        while queue:
            effect = queue.popleft()
            if isinstance(effect, Send):
                await self._send(effect.data)
            elif isinstance(effect, Close):
                level = logging.DEBUG if effect.reason == "quit" else logging.INFO
                raise _SessionEnd(effect.reason, level)
            elif isinstance(effect, StartTls):
                await self._start_tls()
            elif isinstance(effect, Login):
                queue.extend(await self._login(effect))
            elif isinstance(effect, Retrieve):
                await self._retrieve(effect)
            elif isinstance(effect, Update):
                assert self.folder is not None
                failures = await asyncio.to_thread(_remove, self.folder, effect.deleted)
                if effect.deleted:
                    _log.info(
                        "POP3 %s removed %d messages (%d failed)",
                        self.locked,
                        len(effect.deleted) - failures,
                        failures,
                    )
                queue.extend(self.session.update_done(failures))

    async def _send(self, data: bytes) -> None:
        self.writer.write(data)
        await self._drain()

    async def _drain(self) -> None:
        """Wait until the client has taken what was written; a client that reads nothing for
        the idle timeout (while it holds the maildrop lock, perhaps) is dropped."""
        try:
            async with asyncio.timeout(self._idle_timeout()):
                await self.writer.drain()
        except TimeoutError:
            raise _SessionEnd("client stopped reading", logging.INFO) from None

    # -- effects --------------------------------------------------------------------------

    async def _start_tls(self) -> None:
        await self._drain()
        # No await between this check and start_tls pausing the transport: whatever the client
        # sent after STLS in plaintext is in the buffer now, or will reach the TLS layer.
        if buffered_bytes(self.reader):
            raise _SessionEnd(
                "data pipelined after STLS (possible command injection)", logging.WARNING
            )
        await self.writer.start_tls(
            self.service.tls_context,
            ssl_handshake_timeout=self.service.limits.idle_timeout_unauthenticated,
        )
        self.session.tls_started()

    async def _login(self, login: Login) -> list[Effect]:
        service = self.service
        guard = service.guard
        if guard is not None:
            await guard.before_login(self.peer, login.user)
        try:
            address = await service.auth.authenticate(login.user, login.password)
        except Exception as exc:
            _log.warning("POP3 login of %r: account store unavailable: %r", login.user, exc)
            if guard is not None:  # no outcome: the reserved attempt stops counting
                guard.release(self.peer, login.user)
            return self.session.login_failed(LoginFailure.TEMPORARY)
        if address is None:
            if guard is not None:
                guard.failed("pop3", self.peer, login.user)
            return self.session.login_failed(LoginFailure.BAD_CREDENTIALS)
        if guard is not None:
            guard.succeeded(self.peer, address)
        key = normalize_address(address)
        if key in service.locks:
            return self.session.login_failed(LoginFailure.IN_USE)
        service.locks.add(key)
        self.locked = key
        try:
            folder, messages = await asyncio.to_thread(service.maildrop, address)
        except Exception as exc:
            _log.warning("POP3 %s: cannot list the maildrop: %r", address, exc)
            self._unlock()
            return self.session.login_failed(LoginFailure.TEMPORARY)
        self.folder = folder
        _log.info("POP3 login %s from %s (%d messages)", address, self.peer, len(messages))
        return self.session.login_succeeded(address, messages)

    async def _retrieve(self, retrieve: Retrieve) -> None:
        assert self.folder is not None
        message = retrieve.message
        file = await asyncio.to_thread(_open_message, self.folder, message)
        if file is None:
            await self._send(err(f"message {message.number} is no longer available"))
            return
        try:
            if retrieve.lines is None:
                self.writer.write(ok(f"{message.size} octets"))
            else:
                self.writer.write(ok("top of message follows"))
            wire = WireReader(file, retrieve.lines)
            while True:
                chunk = await asyncio.to_thread(wire.next_chunk)
                if not chunk:
                    break
                self.writer.write(chunk)
                await self._drain()
            await self._send(b".\r\n")
        finally:
            await asyncio.to_thread(file.close)

    def _unlock(self) -> None:
        if self.locked is not None:
            self.service.locks.discard(self.locked)
            self.locked = None

    async def close(self) -> None:
        self._unlock()
        with contextlib.suppress(Exception):
            self.writer.close()
        # Bounded (a TLS peer may never answer close_notify), and not cancellable: the
        # connection task must end normally, or asyncio's stream callback logs the cancel.
        with contextlib.suppress(Exception, asyncio.CancelledError):
            async with asyncio.timeout(1):
                await self.writer.wait_closed()


class Pop3Service:
    """POP3 for mailbox holders: implicit TLS on ``port`` (995), optional STLS on ``stls_port``.

    ``sock``/``stls_sock``: pre-bound listening sockets to serve instead of binding
    ``host:port``. Port 0 binds an ephemeral port (see ``bound_ports``); None: no listener.
    """

    def __init__(
        self,
        *,
        store: MaildirStore,
        auth: Authenticator,
        tls_context: ssl.SSLContext,
        guard: Guard | None,
        limits: MailboxConfig,
        host: str = "127.0.0.1",
        port: int | None = 995,
        stls_port: int | None = None,
        sock: socket.socket | None = None,
        stls_sock: socket.socket | None = None,
        hostname: str = "localhost",
    ) -> None:
        self.store = store
        self.auth = auth
        self.tls_context = tls_context
        self.guard = guard
        self.limits = limits
        self.host = host
        self.port = port
        self.stls_port = stls_port
        self.hostname = hostname
        self._sock = sock
        self._stls_sock = stls_sock
        self._implicit: asyncio.Server | None = None
        self._stls: asyncio.Server | None = None
        self._connections: dict[asyncio.Task[None], _Connection] = {}
        #: Canonical addresses whose maildrop a session holds.
        self.locks: set[str] = set()

    @property
    def bound_ports(self) -> list[int]:
        """The ports listened on: implicit TLS first, then STLS."""
        return bound_ports((self._implicit, self._stls))

    async def start(self, stack: AsyncExitStack) -> None:
        """Listen; on stack exit stop listening and close every open connection."""
        stack.push_async_callback(self._stop)
        if self._sock is not None or self.port is not None:
            self._implicit = await self._listen(
                "pop3s", implicit_tls=True, sock=self._sock, port=self.port
            )
        if self._stls_sock is not None or self.stls_port is not None:
            self._stls = await self._listen(
                "pop3", implicit_tls=False, sock=self._stls_sock, port=self.stls_port
            )
        _log.info("POP3 listening on %s ports %s", self.host, self.bound_ports)

    async def _listen(
        self, listener: str, *, implicit_tls: bool, sock: socket.socket | None, port: int | None
    ) -> asyncio.Server:
        callback = partial(self._serve, listener, implicit_tls)
        tls = self.tls_context if implicit_tls else None
        timeout = self.limits.idle_timeout_unauthenticated if implicit_tls else None
        return await listen(
            callback,
            sock=sock,
            host=self.host,
            port=port,
            tls=tls,
            ssl_handshake_timeout=timeout,
            limit=_READ_LIMIT,
        )

    async def _stop(self) -> None:
        await stop_serving((self._implicit, self._stls), list(self._connections), wait=_STOP_WAIT)
        self._implicit = self._stls = None

    def maildrop(self, address: str) -> tuple[Path, list[Message]]:
        """INBOX of ``address`` and its messages in UID order (synchronous: run in a thread)."""
        self.store.ensure(address)
        folder = self.store.folder_path(address)
        listing = uidlist.sync(folder)
        messages = [
            Message(
                number=i,
                uidl=uidl_of(entry.uid, listing.uid_validity),
                size=entry.size,
                name=entry.name,
                path=entry.path,
            )
            for i, entry in enumerate(listing.entries, start=1)
        ]
        return folder, messages

    async def _serve(
        self,
        listener: str,
        implicit_tls: bool,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
    ) -> None:
        task = asyncio.current_task()
        assert task is not None
        conn = _Connection(self, reader, writer, listener=listener, implicit_tls=implicit_tls)
        self._connections[task] = conn
        admission: Admission | None = None
        try:
            if self.guard is not None:
                admission = self.guard.admit(listener, conn.peer)
                if admission is None:
                    writer.write(err("too many connections", "SYS/TEMP"))
                    with contextlib.suppress(Exception):
                        await writer.drain()
                    return
            await conn.run()
        except _SessionEnd as end:
            _log.log(end.level, "POP3 %s session from %s ended: %s", listener, conn.peer, end)
        except (ConnectionError, ssl.SSLError, TimeoutError) as exc:
            _log.info("POP3 %s session from %s dropped: %r", listener, conn.peer, exc)
        except asyncio.CancelledError:
            with contextlib.suppress(Exception):
                writer.write(err("server shutting down", "SYS/TEMP"))
        except Exception as exc:
            _log.error("POP3 %s session from %s failed: %r", listener, conn.peer, exc)
            _log.debug("POP3 session failure", exc_info=True)
        finally:
            if admission is not None:
                admission.release()
            self._connections.pop(task, None)
            await conn.close()
