"""Punto di ricezione: SMTP from other providers and from the Internet, for local domains only.

No AUTH, STARTTLS offered and not required (RFC 6109 section 2.2.2: both plain and TLS
connections). RCPT is accepted only for this provider's domains (no open relay); each transaction
is committed with its job before the 250 (design.md invariant 1). The ``reception`` stage then
decides what it got, by the signature and the provider index, never by the unsigned headers:

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
import hashlib
import logging
import secrets
import ssl
from typing import Any

from aiosmtpd.smtp import SMTP, Envelope
from aiosmtpd.smtp import Session as SMTPSession
from sqlalchemy import select
from sqlalchemy.orm import Session

from pecd.config import Endpoint
from pecd.guard import Guard
from pecd.pec.builders import Transmission
from pecd.pec.classify import Classification
from pecd.pec.mime import get_first
from pecd.pec.timefmt import pec_time
from pecd.pec.vocab import DaticertTipo, Errore, Kind, Ricevuta, Trasporto
from pecd.runtime.intake import Intake
from pecd.runtime.pipeline import (
    DELIVERY,
    Outbox,
    Services,
    Writer,
    _event,
    _store_job,
    domain_of,
    emit,
)
from pecd.runtime.smtp import (
    IntakeEnvelope,
    IntakeSMTP,
    Reply,
    bare,
    bound_port,
    close_servers,
    received_header,
    valid_address,
)
from pecd.store import expectations, jobs
from pecd.store.models import Job, TraceEvent
from pecd.store.trace import TraceEventData, record_sync

log = logging.getLogger(__name__)

RECEPTION = "reception"  # job kind: a message that came in at the reception point

# Trace events of the reception point.
RICEZIONE = "ricezione"  # a valid envelope taken in charge
RICEVUTA_RICEVUTA = "ricevuta-ricevuta"  # a receipt of ours came back
RICEVUTA_SCONOSCIUTA = "ricevuta-sconosciuta"  # a receipt of a transmission we never sent
ANOMALIA = "anomalia"  # wrapped in an anomaly envelope

# Receipts that go to the service mailbox rather than to a holder (spec section 1).
SERVICE_RECEIPTS = (Ricevuta.PRESA_IN_CARICO, Ricevuta.RILEVAZIONE_VIRUS)


class ReceptionHandler:
    """aiosmtpd handler of the reception point."""

    def __init__(self, svc: Services, hostname: str, intake: Intake) -> None:
        self.svc = svc
        self.hostname = hostname
        self.intake = intake
        self.rcpt_cap = max(svc.cfg.limits.max_recipients * 2, 1000)

    async def handle_MAIL(
        self,
        server: SMTP,
        session: SMTPSession,
        envelope: Envelope,
        address: str,
        options: list[str],
    ) -> str:
        envelope.mail_from = bare(address)
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
        addr = bare(address)
        if not valid_address(addr):
            return Reply.BAD_ADDRESS
        if not self.svc.is_local(addr):
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
        now = envelope.received_at = self.svc.clock.now()
        protocol = "ESMTPS" if session.ssl else "ESMTP"
        return received_header(session, by=self.hostname, protocol=protocol, key=key, now=now)

    async def handle_DATA(self, server: SMTP, session: SMTPSession, envelope: Envelope) -> str:
        if not envelope.rcpt_tos:
            return Reply.NO_RCPTS
        return await self.intake.reply(RECEPTION, session, envelope, tls=bool(session.ssl))


class ReceptionPoint:
    """The reception point's listener (port 25 in production)."""

    def __init__(
        self,
        svc: Services,
        tls: ssl.SSLContext,
        *,
        intake: Intake,
        endpoint: Endpoint,
        hostname: str,
        guard: Guard | None = None,
    ) -> None:
        self.svc = svc
        self.tls = tls
        self.endpoint = endpoint
        self.hostname = hostname
        # Connection limits per client address and in total (no AUTH here).
        self.guard = guard if guard is not None else Guard(svc.cfg.security)
        self.handler = ReceptionHandler(svc, hostname, intake)
        self.server: asyncio.Server | None = None

    def _factory(self) -> SMTP:
        return IntakeSMTP(
            self.handler,
            hostname=self.hostname,
            ident="pecd",
            tls_context=self.tls,
            require_starttls=False,
            auth_required=False,
            auth_require_tls=True,
            auth_exclude_mechanism=["LOGIN", "PLAIN"],
            data_size_limit=self.svc.cfg.limits.max_message_size,
            decode_data=False,
            enable_SMTPUTF8=False,
            guard=self.guard,
            listener="reception",
        )

    async def start(self, stack: contextlib.AsyncExitStack) -> None:
        loop = asyncio.get_running_loop()
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
            await close_servers([self.server])


# --- the stage ------------------------------------------------------------------------------------


async def stage_reception(svc: Services, job: Job) -> Writer:
    p = job.payload
    raw = job.data or b""
    rcpts: list[str] = list(p["rcpt_to"])
    c = await svc.formats.classify(raw)
    sender_provider = _trusted_provider(svc, c)
    now = svc.clock.now()
    # Decisions rest on the verified daticert, never on the unsigned outer headers: classify()
    # reports any disagreement between the two as an error, so is_valid_pec covers both.
    if sender_provider is not None and c.is_valid_pec and c.daticert is not None:
        tipo = c.daticert.tipo
        if tipo is DaticertTipo.POSTA_CERTIFICATA and c.kind is Kind.TRANSPORT_ENVELOPE:
            listed = {d.address for d in c.daticert.destinatari}
            # Only recipients the signed daticert names: an envelope replayed to someone
            # else is not PEC for them.
            ours = [r for r in rcpts if r in listed]
            strangers = [r for r in rcpts if r not in listed]
            if ours:
                take = _take_in_charge(svc, job, c, raw, ours, sender_provider.mail_receipt, now)
                if not strangers:
                    return take
                wrap = await _anomaly(
                    svc,
                    job,
                    c,
                    raw,
                    strangers,
                    now,
                    "destinatario non presente nei dati di certificazione",
                )
                return _both(take, wrap)
        elif c.kind is Kind.RECEIPT and c.ricevuta is not None:
            return await _receipt_back(svc, job, c, raw, rcpts, now)
    return await _anomaly(svc, job, c, raw, rcpts, now, _anomaly_reason(svc, c))


def _both(first: Writer, second: Writer) -> Writer:
    def write(s: Session, outbox: Outbox) -> None:
        first(s, outbox)
        second(s, outbox)

    return write


async def _existing(svc: Services, rcpts: list[str]) -> list[str]:
    """The recipients that are open mailboxes here: mail for anyone else is not stored (and no
    directory is made for an address nobody holds)."""
    out = []
    for r in rcpts:
        mb = await svc.mailbox(r)
        if mb is not None and not mb.disabled:
            out.append(r)
        else:
            log.info("reception: no open mailbox %s; not stored", r)
    return out


async def _anomaly(
    svc: Services, job: Job, c: Classification, raw: bytes, rcpts: list[str], now: Any, reason: str
) -> Writer:
    p = job.payload
    rcpts = await _existing(svc, rcpts)
    when = pec_time(now)
    anomaly = await svc.formats.build(
        "anomaly_envelope", received=raw, when=when, rcpt_to=rcpts or ["-"], error=reason
    )

    def wrap(s: Session, outbox: Outbox) -> None:
        for rcpt in rcpts:
            _store_job(
                s,
                svc,
                key=f"{job.key}:anomalia:{rcpt}",
                mailbox=rcpt,
                msg=anomaly,
                now=now,
                outbox=outbox,
            )
        record_sync(
            s,
            TraceEventData(
                at=now,
                event=ANOMALIA,
                pec_msgid=c.daticert.identificativo if c.daticert else None,
                sender=p.get("mail_from"),
                recipients=[{"address": r} for r in rcpts],
                generated_ids=[anomaly.message_id],
                error=reason,
                data={"job": job.key, "peer": p.get("peer"), "kind": c.kind.value},
            ),
        )

    return wrap


def _trusted_provider(svc: Services, c: Classification) -> Any:
    """The index entry of the signer, when the signature holds and the signer is a provider."""
    if svc.index is None or not c.signature.valid or c.signer_der is None:
        return None
    return svc.index.provider_for_certificate(c.signer_der)


def _anomaly_reason(svc: Services, c: Classification) -> str:
    if not c.signature.present:
        return "messaggio privo di firma del gestore (posta ordinaria)"
    if not c.signature.valid:
        return f"firma non valida: {c.signature.error or 'verifica fallita'}"
    if svc.index is None or c.signer_der is None or _trusted_provider(svc, c) is None:
        return "firma di un soggetto non presente nell'indice dei gestori PEC"
    if c.errors:
        return "messaggio PEC non conforme: " + "; ".join(c.errors)
    return "messaggio PEC non conforme"


def _take_in_charge(
    svc: Services,
    job: Job,
    c: Classification,
    raw: bytes,
    rcpts: list[str],
    mail_receipt: str,
    now: Any,
) -> Writer:
    assert c.daticert is not None
    # To and Cc (which receipt kind each recipient earns) from the signed original.
    tx = Transmission.from_daticert(c.daticert, envelope=c.postacert or b"")

    def write(s: Session, outbox: Outbox) -> None:
        # One delivery job for the whole SMTP transaction: one presa in carico covering every
        # recipient of it (spec 2.3), to the sending provider's service mailbox.
        jobs.enqueue_sync(
            s,
            kind=DELIVERY,
            key=f"{job.key}:delivery",
            payload={
                "recipients": rcpts,
                "tx": tx.to_json(),
                "sent_at": now.isoformat(),
                "mail_receipt": mail_receipt,
            },
            data=raw,
            now=now,
        )
        record_sync(
            s,
            TraceEventData(
                at=now,
                event=RICEZIONE,
                pec_msgid=tx.identificativo,
                client_msgid=tx.msgid,
                sender=tx.mittente,
                recipients=[{"address": r} for r in rcpts],
                subject=tx.oggetto,
                provider=c.daticert.gestore_emittente if c.daticert else None,
                data={"job": job.key, "mail_receipt": mail_receipt},
            ),
        )

    return write


async def _receipt_back(
    svc: Services, job: Job, c: Classification, raw: bytes, rcpts: list[str], now: Any
) -> Writer:
    assert c.daticert is not None and c.ricevuta is not None
    ident = c.daticert.identificativo
    async with svc.db.read_session() as s:
        ours = (
            await s.execute(
                select(TraceEvent.sender)
                .where(
                    TraceEvent.pec_msgid == ident,
                    TraceEvent.event == Trasporto.POSTA_CERTIFICATA.value,
                )
                .limit(1)
            )
        ).first()
    sender = ours[0] if ours else None
    # Where this receipt may go: the service mailbox for the provider-to-provider receipts,
    # else only the sender of our transmission (never whoever the unsigned RCPT names).
    service = c.ricevuta in SERVICE_RECEIPTS
    allowed = svc.cfg.provider.mail_receipt if service else sender
    targets = [r for r in rcpts if r == allowed] if ours else []
    # A receipt sent to us twice is stored once: its Message-ID names it.
    mid = (get_first(raw, "Message-ID") or "").strip() or hashlib.sha256(raw).hexdigest()
    ricevuta = c.ricevuta
    event = RICEVUTA_RICEVUTA if ours else RICEVUTA_SCONOSCIUTA
    virus_notice = None
    if ours and ricevuta is Ricevuta.RILEVAZIONE_VIRUS and c.daticert.consegna:
        # The recipient's provider found a virus: the sender hears it from us, as an
        # errore-consegna of the virus kind built from the rilevazione (spec 2.3, Virus).
        tx = Transmission.from_daticert(c.daticert)
        virus_notice = await svc.formats.build(
            "errore_consegna",
            tx=tx,
            when=pec_time(now),
            recipient=c.daticert.consegna,
            errore=Errore.VIRUS,
            errore_esteso=c.daticert.errore_esteso or "virus rilevato dal gestore del destinatario",
        )

    def write(s: Session, outbox: Outbox) -> None:
        for rcpt in targets:
            msg_key = f"ricevuta:{mid}:{rcpt}"
            created = jobs.enqueue_sync(
                s,
                kind="store",
                key=msg_key,
                payload={"mailbox": rcpt, "message_id": None},
                data=raw,
                now=now,
                lease_to=outbox.worker,
                lease_until=outbox.lease_until,
            )
            if created:
                outbox.items.append((msg_key, rcpt, raw, False))
        if ours and c.daticert is not None:
            _settle(s, ricevuta, ident, c, now)
        if virus_notice is not None and sender and c.daticert is not None and c.daticert.consegna:
            expectations.close_sync(s, ident, c.daticert.consegna, now, "virus")
            emit(
                s,
                svc,
                outbox,
                key=f"virus:{ident}:{c.daticert.consegna}",
                mailbox=sender,
                msg=virus_notice,
                event=_event(
                    Ricevuta.ERRORE_CONSEGNA.value,
                    Transmission.from_daticert(c.daticert),
                    now,
                    svc.provider,
                    [virus_notice],
                    error="virus",
                    data={"consegna": c.daticert.consegna, "rilevazione": job.key},
                ),
            )
        record_sync(
            s,
            TraceEventData(
                at=now,
                event=event,
                pec_msgid=ident,
                client_msgid=c.daticert.msgid if c.daticert else None,
                sender=c.daticert.mittente if c.daticert else None,
                recipients=[{"address": r} for r in rcpts],
                provider=c.daticert.gestore_emittente if c.daticert else None,
                daticert=None,
                data={
                    "job": job.key,
                    "ricevuta": ricevuta.value,
                    "consegna": c.daticert.consegna if c.daticert else None,
                    "ricezione": list(c.daticert.ricezione) if c.daticert else [],
                    "dropped": not ours,
                },
            ),
        )

    if not ours:
        log.warning(
            "dropped a %s for %s: not a transmission of this provider", ricevuta.value, ident
        )
    return write


def _settle(s: Session, ricevuta: Ricevuta, ident: str, c: Classification, now: Any) -> None:
    """What a receipt that came back settles for the timers."""
    assert c.daticert is not None
    if ricevuta is Ricevuta.PRESA_IN_CARICO:
        expectations.took_charge_sync(s, ident, list(c.daticert.ricezione), now)
    elif ricevuta in (Ricevuta.AVVENUTA_CONSEGNA, Ricevuta.ERRORE_CONSEGNA) and c.daticert.consegna:
        expectations.close_sync(s, ident, c.daticert.consegna, now, ricevuta.value)


__all__ = ["RECEPTION", "ReceptionPoint", "domain_of", "stage_reception"]
