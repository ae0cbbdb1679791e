"""Punto di accesso: authenticated submission over SMTPS (465) and STARTTLS (587).

The handler decides; aiosmtpd speaks the protocol. A message gets 250 only after it and its job are
committed (design.md invariant 1); formal checks run in the pipeline, which answers with a
non-accettazione, except for what must be refused at SMTP (no TLS, bad login, foreign MAIL FROM,
oversize).
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import functools
import logging
import secrets
import socket
import ssl
import warnings
from collections.abc import Mapping
from typing import Any

from aiosmtpd.smtp import SMTP, AuthResult, Envelope, Session

from pecd.clock import Clock
from pecd.config import Config, Endpoint
from pecd.engine.vocab import JobKind
from pecd.guard import Guard
from pecd.pec.address import normalize_address, valid_address
from pecd.runtime import observe
from pecd.runtime.diskspace import INSUFFICIENT_STORAGE
from pecd.runtime.intake import Intake
from pecd.runtime.refusals import ObservedSMTP
from pecd.runtime.smtp import (
    IntakeEnvelope,
    IntakeSMTP,
    Reply,
    Sessions,
    bound_port,
    close_servers,
    peer_of,
    received_header,
)
from pecd.store.accounts import Accounts

log = logging.getLogger(__name__)


class _ExpectedAiosmtpdWarnings(logging.Filter):
    """aiosmtpd logs two warnings for every session that are about what pecd does on purpose:
    AUTH on the implicit-TLS port (TLS it cannot see, see AccessPoint), and its own deprecated
    ``Session.login_data``, which it sets itself after each AUTH. Its other warnings pass."""

    EXPECTED = (
        "auth_required == True but auth_require_tls == False",
        "Session.login_data is deprecated",
    )

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(self.EXPECTED)


logging.getLogger("mail.log").addFilter(_ExpectedAiosmtpdWarnings())


class AccessHandler:
    """aiosmtpd handler of the access point."""

    def __init__(
        self,
        cfg: Config,
        clock: Clock,
        accounts: Accounts,
        hostname: str,
        intake: Intake,
        guard: Guard,
    ) -> None:
        self.cfg = cfg
        self.clock = clock
        self.accounts = accounts
        self.hostname = hostname
        self.intake = intake
        self.guard = guard
        limits = cfg.limits
        # RCPTs beyond the formal limit still get a non-accettazione; past this hard cap
        # the SMTP session refuses them.
        self.rcpt_cap = max(limits.max_recipients * 2, 1000)

    # -- AUTH: checked off the event loop (argon2 is deliberately slow) --------------------------

    async def _check(self, server: SMTP, login: bytes, password: bytes) -> AuthResult:
        assert server.session is not None
        peer = peer_of(server.session)
        account = normalize_address(login.decode("utf-8", "replace"))
        # The delay owed for earlier failures comes before the password check, and so before
        # a hash slot is taken: throttled guesses do not queue ahead of real logins.
        await self.guard.before_login(peer, account)
        try:
            pw = password.decode("utf-8")
        except UnicodeDecodeError:
            address = None
        else:
            try:
                address = await self.accounts.authenticate(
                    account, pw, first=self.guard.clean(peer)
                )
            except BaseException:  # the store failed, or the session ended: no outcome
                self.guard.release(peer, account)
                raise
        if address is None:
            return await self._failed(server, peer, account)
        self.guard.succeeded(peer, address)
        return AuthResult(success=True, auth_data=address)

    async def _failed(self, server: SMTP, peer: str, account: str) -> AuthResult:
        self.guard.failed("smtp", peer, account)
        if isinstance(server, IntakeSMTP):
            server.login_failures += 1
            if server.login_failures >= self.guard.disconnect_after:
                await server.close_with(Reply.TOO_MANY_FAILURES)
                return AuthResult(success=False, handled=True)
        return AuthResult(success=False, handled=False)

    async def auth_PLAIN(self, server: SMTP, args: list[str]) -> AuthResult:
        if len(args) == 1:
            blob = await server.challenge_auth("")
            if not isinstance(blob, bytes):
                return AuthResult(success=False)
        else:
            try:
                blob = base64.b64decode(args[1].encode(), validate=True)
            except binascii.Error:
                await server.push("501 5.5.2 Can't decode base64")
                return AuthResult(success=False, handled=True)
        parts = blob.split(b"\0")
        if len(parts) != 3:
            await server.push("501 5.5.2 Can't split auth value")
            return AuthResult(success=False, handled=True)
        authzid, login, password = parts
        if authzid and authzid != login:
            assert server.session is not None
            account = normalize_address(login.decode("utf-8", "replace"))
            return await self._failed(server, peer_of(server.session), account)
        return await self._check(server, login, password)

    async def auth_LOGIN(self, server: SMTP, args: list[str]) -> AuthResult:
        if len(args) == 2:
            try:
                login: Any = base64.b64decode(args[1].encode(), validate=True)
            except binascii.Error:
                await server.push("501 5.5.2 Can't decode base64")
                return AuthResult(success=False, handled=True)
        else:
            login = await server.challenge_auth("User Name\x00")
        if not isinstance(login, bytes):
            return AuthResult(success=False)
        password = await server.challenge_auth("Password\x00")
        if not isinstance(password, bytes):
            return AuthResult(success=False)
        return await self._check(server, login, password)

    # -- the transaction ---------------------------------------------------------------------------

    async def handle_MAIL(
        self,
        server: SMTP,
        session: Session,
        envelope: Envelope,
        address: str,
        mail_options: list[str],
    ) -> str:
        if not session.authenticated:
            return Reply.AUTH_REQUIRED
        if normalize_address(address) != session.auth_data:
            return Reply.SENDER_NOT_OWNED
        if not self.intake.room():
            return INSUFFICIENT_STORAGE
        envelope.mail_from = normalize_address(address)
        envelope.mail_options.extend(mail_options)
        return Reply.OK

    async def handle_RCPT(
        self,
        server: SMTP,
        session: Session,
        envelope: Envelope,
        address: str,
        rcpt_options: list[str],
    ) -> str:
        addr = normalize_address(address)
        if not valid_address(addr):
            return Reply.BAD_ADDRESS
        if len(envelope.rcpt_tos) >= self.rcpt_cap:
            return Reply.TOO_MANY_RCPTS
        envelope.rcpt_tos.append(addr)
        return Reply.RCPT_OK

    async def data_prefix(self, server: SMTP, session: Session, envelope: Envelope) -> bytes:
        """The Received: field, written ahead of the message as DATA begins (IntakeSMTP)."""
        assert isinstance(envelope, IntakeEnvelope)
        key = envelope.intake_key = secrets.token_hex(12)
        now = envelope.received_at = self.clock.now()
        return received_header(
            session,
            by=self.hostname,
            protocol="ESMTPSA",
            key=key,
            now=now,
            rcpt=envelope.rcpt_tos[0],
        )

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        if not session.authenticated:
            return Reply.AUTH_REQUIRED
        if not envelope.rcpt_tos:
            return Reply.NO_RCPTS
        return await self.intake.reply(
            JobKind.SUBMISSION, session, envelope, user=session.auth_data
        )


class AccessPoint:
    """The access point's listeners: implicit TLS (465) and STARTTLS submission (587)."""

    def __init__(
        self,
        cfg: Config,
        clock: Clock,
        accounts: Accounts,
        tls: ssl.SSLContext,
        *,
        intake: Intake,
        smtps: Endpoint | None,
        submission: Endpoint | None,
        hostname: str,
        guard: Guard | None = None,
        sockets: Mapping[str, socket.socket] | None = None,
    ) -> None:
        self.cfg = cfg
        self.tls = tls
        self.smtps = smtps
        self.submission = submission
        # Listening sockets bound before ("smtps", "submission"), shared by engine processes.
        self.sockets = dict(sockets or {})
        self.hostname = hostname
        # Connection limits and login throttling; one Guard per process, shared by listeners.
        self.guard = guard if guard is not None else Guard(cfg.security)
        self.handler = AccessHandler(cfg, clock, accounts, hostname, intake, self.guard)
        self.servers: dict[str, asyncio.Server] = {}
        self.sessions = Sessions()  # ended with 421 when the point stops
        self.accepted = 0  # connections taken, both listeners (said when an engine process stops)

    def _factory(self, implicit_tls: bool) -> IntakeSMTP:
        self.accepted += 1
        common: dict[str, Any] = dict(
            hostname=self.hostname,
            ident="pecd",
            data_size_limit=self.cfg.limits.max_message_size,
            decode_data=False,
            auth_required=True,
            enable_SMTPUTF8=False,
            auth_exclude_mechanism=[],
            guard=self.guard,
            sessions=self.sessions,
            listener="smtps" if implicit_tls else "submission",
            # Refusals before any trace event: a mail log line each, and counted.
            on_refusal=functools.partial(observe.refused, self.cfg),
            point="access",
            clock=self.handler.clock,
        )
        if implicit_tls:
            # The socket is TLS from the first byte, which aiosmtpd cannot see (aiosmtpd
            # issue 281): AUTH must not wait for a STARTTLS that will never come. Its warning
            # about AUTH without TLS is about plain sockets, so it is silenced here only.
            with warnings.catch_warnings():
                warnings.filterwarnings("ignore", "Requiring AUTH while not requiring TLS")
                return ObservedSMTP(self.handler, auth_require_tls=False, **common)
        return ObservedSMTP(
            self.handler,
            tls_context=self.tls,
            require_starttls=True,
            auth_require_tls=True,
            **common,
        )

    async def start(self, stack: contextlib.AsyncExitStack) -> None:
        loop = asyncio.get_running_loop()
        if (sock := self.sockets.get("smtps")) is not None:
            self.servers["smtps"] = await loop.create_server(
                lambda: self._factory(True), sock=sock, ssl=self.tls
            )
        elif self.smtps is not None:
            srv = await loop.create_server(
                lambda: self._factory(True), self.smtps.host, self.smtps.port, ssl=self.tls
            )
            self.servers["smtps"] = srv
        if (sock := self.sockets.get("submission")) is not None:
            self.servers["submission"] = await loop.create_server(
                lambda: self._factory(False), sock=sock
            )
        elif self.submission is not None:
            srv = await loop.create_server(
                lambda: self._factory(False), self.submission.host, self.submission.port
            )
            self.servers["submission"] = srv
        stack.push_async_callback(self.stop)

    def port(self, name: str) -> int:
        return bound_port(self.servers[name])

    async def stop(self) -> None:
        await close_servers(list(self.servers.values()), self.sessions)
