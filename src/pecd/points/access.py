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
import enum
import io
import logging
import secrets
import ssl
import warnings
from datetime import datetime
from typing import Any

from aiosmtpd.smtp import MISSING, SMTP, AuthResult, Envelope, Session, syntax

from pecd.config import Endpoint
from pecd.points.intake import Intake
from pecd.points.pipeline import SUBMISSION, Services
from pecd.points.smtp import (
    Reply,
    bare,
    bound_port,
    close_servers,
    peer_of,
    received_header,
    valid_address,
)

log = logging.getLogger(__name__)


class IntakeEnvelope(Envelope):
    """aiosmtpd's envelope plus what :meth:`AccessHandler.data_prefix` decided at DATA."""

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
    """

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
            self._set_post_data_state()
            return
        assert not fragments  # a partial last line only if the connection closed
        content = buf.getvalue()  # buf's own bytes, no copy
        del buf
        self.envelope.content = self.envelope.original_content = content
        del content
        status = await self._call_handler_hook("DATA")
        self._set_post_data_state()
        await self.push("250 OK" if status is MISSING else status)


class AccessHandler:
    """aiosmtpd handler of the access point."""

    def __init__(self, svc: Services, hostname: str, intake: Intake) -> None:
        self.svc = svc
        self.hostname = hostname
        self.intake = intake
        limits = svc.cfg.limits
        # RCPTs beyond the formal limit still get a non-accettazione; past this hard cap
        # the SMTP session refuses them.
        self.rcpt_cap = max(limits.max_recipients * 2, 1000)

    # -- AUTH: checked off the event loop (argon2 is deliberately slow) --------------------------

    async def _check(self, login: bytes, password: bytes) -> AuthResult:
        try:
            user, pw = login.decode("utf-8"), password.decode("utf-8")
        except UnicodeDecodeError:
            return AuthResult(success=False, handled=False)
        address = await self.svc.accounts.authenticate(user.strip().lower(), pw)
        if address is None:
            log.info("failed login for %r", user)
            return AuthResult(success=False, handled=False)
        return AuthResult(success=True, auth_data=address)

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
            return AuthResult(success=False, handled=False)
        return await self._check(login, password)

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
        return await self._check(login, password)

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
        if bare(address) != session.auth_data:
            return Reply.SENDER_NOT_OWNED
        envelope.mail_from = bare(address)
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
        addr = bare(address)
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
        now = envelope.received_at = self.svc.clock.now()
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
        # IntakeSMTP has put the Received: field in front already: these are the job's bytes.
        assert isinstance(envelope, IntakeEnvelope)
        key, now = envelope.intake_key, envelope.received_at
        assert key is not None and now is not None
        return await self.intake.reply(
            kind=SUBMISSION,
            key=key,
            now=now,
            mail_from=envelope.mail_from,
            rcpt_to=list(envelope.rcpt_tos),
            data=envelope.original_content or b"",
            peer=peer_of(session),
            user=session.auth_data,
        )


class AccessPoint:
    """The access point's listeners: implicit TLS (465) and STARTTLS submission (587)."""

    def __init__(
        self,
        svc: Services,
        tls: ssl.SSLContext,
        *,
        intake: Intake,
        smtps: Endpoint | None,
        submission: Endpoint | None,
        hostname: str,
    ) -> None:
        self.svc = svc
        self.tls = tls
        self.smtps = smtps
        self.submission = submission
        self.hostname = hostname
        self.handler = AccessHandler(svc, hostname, intake)
        self.servers: dict[str, asyncio.Server] = {}

    def _factory(self, implicit_tls: bool) -> IntakeSMTP:
        common: dict[str, Any] = dict(
            hostname=self.hostname,
            ident="pecd",
            data_size_limit=self.svc.cfg.limits.max_message_size,
            decode_data=False,
            auth_required=True,
            enable_SMTPUTF8=False,
            auth_exclude_mechanism=[],
        )
        if implicit_tls:
            # The socket is TLS from the first byte, which aiosmtpd cannot see (aiosmtpd
            # issue 281): AUTH must not wait for a STARTTLS that will never come. Its warning
            # about AUTH without TLS is about plain sockets, so it is silenced here only.
            with warnings.catch_warnings():
                warnings.filterwarnings("ignore", "Requiring AUTH while not requiring TLS")
                return IntakeSMTP(self.handler, auth_require_tls=False, **common)
        return IntakeSMTP(
            self.handler,
            tls_context=self.tls,
            require_starttls=True,
            auth_require_tls=True,
            **common,
        )

    async def start(self, stack: contextlib.AsyncExitStack) -> None:
        loop = asyncio.get_running_loop()
        if self.smtps is not None:
            srv = await loop.create_server(
                lambda: self._factory(True), self.smtps.host, self.smtps.port, ssl=self.tls
            )
            self.servers["smtps"] = srv
        if self.submission is not None:
            srv = await loop.create_server(
                lambda: self._factory(False), self.submission.host, self.submission.port
            )
            self.servers["submission"] = srv
        stack.push_async_callback(self.stop)

    def port(self, name: str) -> int:
        return bound_port(self.servers[name])

    async def stop(self) -> None:
        await close_servers(list(self.servers.values()))
