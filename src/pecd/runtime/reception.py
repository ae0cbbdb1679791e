"""Punto di ricezione: SMTP from other providers and from the Internet, for local domains only.

No AUTH, STARTTLS offered and not required (RFC 6109 section 2.2.2: both plain and TLS
connections). RCPT is accepted only for this provider's domains (no open relay); each transaction
is committed with its job before the 250 (design.md invariant 1). The engine's ``reception``
stage (``engine/reception.py``) then decides what it got, by the signature and the provider
index, never by the unsigned headers:

- a valid transport envelope from a provider in the index: one ``presa-in-carico`` for the whole
  transaction to that provider's ``mailReceipt``, then delivery with a receipt per recipient;
- a valid receipt of a transmission this provider sent: into the sender's mailbox, or for
  ``presa-in-carico`` and ``rilevazione-virus`` into the service mailbox, recorded against it;
  a receipt of a transmission this provider never sent is recorded and dropped;
- anything else (no signature, a signer not in the index, a broken signature, malformed PEC): a
  ``busta di anomalia`` to the recipients, and no receipt at all.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import secrets
import socket
import ssl

from aiosmtpd.smtp import SMTP, Envelope
from aiosmtpd.smtp import Session as SMTPSession

from pecd.clock import Clock
from pecd.config import Config, Endpoint
from pecd.engine.vocab import JobKind
from pecd.guard import Guard
from pecd.pec.address import domain_of, normalize_address, valid_address
from pecd.runtime import observe
from pecd.runtime.diskspace import INSUFFICIENT_STORAGE
from pecd.runtime.intake import Intake
from pecd.runtime.refusals import ObservedSMTP
from pecd.runtime.smtp import (
    IntakeEnvelope,
    Reply,
    Sessions,
    bound_port,
    close_servers,
    received_header,
)

log = logging.getLogger(__name__)


class ReceptionHandler:
    """aiosmtpd handler of the reception point."""

    def __init__(self, cfg: Config, clock: Clock, hostname: str, intake: Intake) -> None:
        self.cfg = cfg
        self.clock = clock
        self.local_domains = frozenset(cfg.provider.local_domains)
        self.hostname = hostname
        self.intake = intake
        self.rcpt_cap = max(cfg.limits.max_recipients * 2, 1000)

    async def handle_MAIL(
        self,
        server: SMTP,
        session: SMTPSession,
        envelope: Envelope,
        address: str,
        options: list[str],
    ) -> str:
        # A null reverse path (bounces) must be accepted (RFC 5321 4.5.5): kept as "<>", since
        # aiosmtpd takes an empty MAIL FROM for "no MAIL command" (the intake stores "").
        # As at the access point: 452 4.3.1 while the storage is full (Intake.room), so that a
        # peer keeps the message and tries again later (RFC 5321 4.2.5).
        if not self.intake.room():
            return INSUFFICIENT_STORAGE
        envelope.mail_from = normalize_address(address) or "<>"
        envelope.mail_options.extend(options)
        return Reply.OK

    async def handle_RCPT(
        self,
        server: SMTP,
        session: SMTPSession,
        envelope: Envelope,
        address: str,
        options: list[str],
    ) -> str:
        addr = normalize_address(address)
        if not valid_address(addr):
            return Reply.BAD_ADDRESS
        if domain_of(addr) not in self.local_domains:
            return Reply.RELAY_DENIED
        if len(envelope.rcpt_tos) >= self.rcpt_cap:
            return Reply.TOO_MANY_RCPTS
        envelope.rcpt_tos.append(addr)
        return Reply.RCPT_OK

    async def data_prefix(self, server: SMTP, session: SMTPSession, envelope: Envelope) -> bytes:
        """The Received: field, written ahead of the message as DATA begins (IntakeSMTP reads
        the message into one buffer after it: one copy of it, however large)."""
        assert isinstance(envelope, IntakeEnvelope)
        key = envelope.intake_key = "rx-" + secrets.token_hex(12)
        now = envelope.received_at = self.clock.now()
        protocol = "ESMTPS" if session.ssl else "ESMTP"
        return received_header(session, by=self.hostname, protocol=protocol, key=key, now=now)

    async def handle_DATA(self, server: SMTP, session: SMTPSession, envelope: Envelope) -> str:
        if not envelope.rcpt_tos:
            return Reply.NO_RCPTS
        return await self.intake.reply(JobKind.RECEPTION, session, envelope, tls=bool(session.ssl))


class ReceptionPoint:
    """The reception point's listener (port 25 in production)."""

    def __init__(
        self,
        cfg: Config,
        clock: Clock,
        tls: ssl.SSLContext,
        *,
        intake: Intake,
        endpoint: Endpoint,
        hostname: str,
        guard: Guard | None = None,
        sock: socket.socket | None = None,
    ) -> None:
        self.cfg = cfg
        self.tls = tls
        self.endpoint = endpoint
        self.sock = sock  # a listening socket bound before (shared by engine processes)
        self.hostname = hostname
        # Connection limits per client address and in total (no AUTH here).
        self.guard = guard if guard is not None else Guard(cfg.security)
        self.handler = ReceptionHandler(cfg, clock, hostname, intake)
        self.server: asyncio.Server | None = None
        self.sessions = Sessions()  # ended with 421 when the point stops

    def _factory(self) -> SMTP:
        return ObservedSMTP(
            self.handler,
            hostname=self.hostname,
            ident="pecd",
            tls_context=self.tls,
            require_starttls=False,
            auth_required=False,
            auth_require_tls=True,
            auth_exclude_mechanism=["LOGIN", "PLAIN"],
            data_size_limit=self.cfg.limits.max_message_size,
            decode_data=False,
            enable_SMTPUTF8=False,
            guard=self.guard,
            sessions=self.sessions,
            listener="reception",
            # Refusals before any trace event: a mail log line each, and counted.
            on_refusal=functools.partial(observe.refused, self.cfg),
            point="reception",
            clock=self.handler.clock,
        )

    async def start(self, stack: contextlib.AsyncExitStack) -> None:
        loop = asyncio.get_running_loop()
        if self.sock is not None:
            self.server = await loop.create_server(self._factory, sock=self.sock)
        else:
            self.server = await loop.create_server(
                self._factory, self.endpoint.host, self.endpoint.port
            )
        stack.push_async_callback(self.stop)

    @property
    def port(self) -> int:
        assert self.server is not None
        return bound_port(self.server)

    async def stop(self) -> None:
        if self.server is not None:
            await close_servers([self.server], self.sessions)
