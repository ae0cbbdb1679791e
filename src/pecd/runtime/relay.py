"""The relay: sends transport envelopes and receipts to other providers' reception points, and
envelopes for esterno recipients to ordinary mail servers.

One SMTP transaction per destination domain carries all of its recipients. A 4xx reply or a
connection failure is retried with backoff until ``relay.expire_hours`` (24 h, RFC 6109 2.2.2);
a 5xx reply for a PEC recipient of a transport envelope becomes an ``errore-consegna`` to the
sender, signed by this provider (pecd's choice: the rules expect that notice from the recipient's
provider, which never saw the message). Relay jobs have their own workers, so a slow or dead
peer never holds up local delivery, and a per-destination limit keeps one peer from taking all
of them.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import ssl
from dataclasses import dataclass
from datetime import datetime, timedelta

import aiosmtplib
import dns.asyncresolver
import dns.exception
import dns.resolver
from sqlalchemy.orm import Session

from pecd.config import Config
from pecd.pec.builders import BuiltMessage, Transmission
from pecd.pec.timefmt import pec_time
from pecd.pec.vocab import DestinatarioTipo, Errore, Ricevuta
from pecd.runtime.pipeline import (
    RELAY,
    Outbox,
    Services,
    Writer,
    _event,
    domain_of,
    emit,
)
from pecd.store import expectations, jobs
from pecd.store.models import Job
from pecd.store.trace import TraceEventData, record_sync

log = logging.getLogger(__name__)

RELAYED = "relay"  # trace event: handed to the next hop
RELAY_FAILED = "relay-fallito"  # trace event: given up for these recipients
RELAY_RETRY = "relay-rinviato"  # trace event: not accepted yet, tried again later


class TemporaryFailure(Exception):
    """Try again later: connection refused or timed out, 4xx, DNS server failure."""


class PermanentFailure(Exception):
    """No point in trying again: the domain does not exist, or the whole transaction got 5xx."""

    def __init__(self, reply: str, errore: Errore = Errore.ALTRO) -> None:
        super().__init__(reply)
        self.reply = reply
        self.errore = errore


@dataclass(frozen=True)
class Destination:
    host: str
    port: int

    def __str__(self) -> str:
        return f"{self.host}:{self.port}"


class Router:
    """Where mail for a domain goes: a static route from the config, else DNS MX (RFC 5321 5.1:
    the domain's own address when it has no MX)."""

    def __init__(self, cfg: Config) -> None:
        self.routes = {d: Destination(e.host, e.port) for d, e in cfg.routes.items()}
        self.port = cfg.relay.port

    async def resolve(self, domain: str) -> list[Destination]:
        domain = domain.lower()
        if domain in self.routes:
            return [self.routes[domain]]
        try:
            answer = await dns.asyncresolver.resolve(domain, "MX")
            mx = sorted(answer, key=lambda r: r.preference)  # type: ignore[attr-defined]
            hosts = [str(r.exchange).rstrip(".") for r in mx]  # type: ignore[attr-defined]
            if hosts == [""]:  # RFC 7505 null MX: the domain accepts no mail
                raise PermanentFailure(
                    f"5.1.10 {domain} accepts no mail (null MX)", Errore.NO_DOMINIO
                )
            return [Destination(h, self.port) for h in hosts]
        except dns.resolver.NXDOMAIN:
            raise PermanentFailure(f"5.1.2 {domain} does not exist", Errore.NO_DOMINIO) from None
        except dns.resolver.NoAnswer:
            return [Destination(domain, self.port)]
        except dns.exception.DNSException as exc:
            raise TemporaryFailure(f"DNS lookup of {domain} failed: {exc}") from None


BUSY_WAIT_SECONDS = 5.0  # how long a relay job waits for a busy destination's free connection


class RelayClient:
    """SMTP client side of the relay (aiosmtplib), with a connection limit per destination."""

    def __init__(self, cfg: Config, hostname: str) -> None:
        self.cfg = cfg
        self.router = Router(cfg)
        self.hostname = hostname
        self._limits: dict[str, asyncio.Semaphore] = {}
        r = cfg.relay
        self.tls = ssl.create_default_context(cafile=str(r.ca_bundle) if r.ca_bundle else None)
        self.tls.minimum_version = ssl.TLSVersion.TLSv1_2

    def _limit(self, dest: Destination) -> asyncio.Semaphore:
        key = str(dest)
        if key not in self._limits:
            self._limits[key] = asyncio.Semaphore(self.cfg.relay.max_per_destination)
        return self._limits[key]

    async def send(
        self, domain: str, mail_from: str, rcpts: list[str], data: bytes
    ) -> dict[str, str]:
        """Deliver to the first destination that answers. Returns the recipients refused for good
        (address -> reply); raises TemporaryFailure or PermanentFailure for the whole lot."""
        last: Exception | None = None
        for dest in await self.router.resolve(domain):
            limit = self._limit(dest)
            # Every connection to it busy: a busy peer frees one within milliseconds, so wait
            # a little; a slow one does not, so come back later rather than hold a relay worker
            # that other destinations need. (Bouncing at once sent most jobs of a burst to the
            # retry backoff, seconds each.)
            try:
                await asyncio.wait_for(limit.acquire(), timeout=BUSY_WAIT_SECONDS)
            except TimeoutError:
                last = TemporaryFailure(
                    f"{dest}: {self.cfg.relay.max_per_destination} connections busy"
                )
                continue
            try:
                return await self._send_to(dest, mail_from, rcpts, data)
            except TemporaryFailure as exc:
                log.info("relay to %s for %s: %s", dest, domain, exc)
                last = exc
            finally:
                limit.release()
        raise last or TemporaryFailure(f"no destination for {domain}")

    async def _send_to(
        self, dest: Destination, mail_from: str, rcpts: list[str], data: bytes
    ) -> dict[str, str]:
        r = self.cfg.relay
        start_tls = {"required": True, "opportunistic": None, "off": False}[r.starttls]
        smtp = aiosmtplib.SMTP(
            hostname=dest.host,
            port=dest.port,
            local_hostname=self.hostname,
            timeout=r.timeout_seconds,
            start_tls=start_tls,
            tls_context=self.tls,
            validate_certs=r.starttls == "required" or r.ca_bundle is not None,
        )
        try:
            await smtp.connect()
            errors, _ = await smtp.sendmail(mail_from, rcpts, data)
        except aiosmtplib.SMTPRecipientsRefused as exc:
            refused = {e.recipient: f"{e.code} {e.message}" for e in exc.recipients}
            if any(e.code < 500 for e in exc.recipients):
                raise TemporaryFailure("; ".join(refused.values())) from None
            return refused
        except aiosmtplib.SMTPResponseException as exc:
            if exc.code >= 500:
                raise PermanentFailure(f"{exc.code} {exc.message}") from None
            raise TemporaryFailure(f"{exc.code} {exc.message}") from None
        except (aiosmtplib.SMTPException, OSError, TimeoutError) as exc:
            raise TemporaryFailure(f"{type(exc).__name__}: {exc}") from None
        finally:
            with contextlib.suppress(Exception):
                await smtp.quit()
        temporary = {a: f"{c} {m}" for a, (c, m) in errors.items() if c < 500}
        if temporary:
            # Accepted recipients are done; the rest go round again in a job of their own.
            raise PartialFailure(
                {a: f"{c} {m}" for a, (c, m) in errors.items() if c >= 500}, temporary
            )
        return {a: f"{c} {m}" for a, (c, m) in errors.items()}


class PartialFailure(Exception):
    """Some recipients refused for now (4xx); the others were accepted or refused for good."""

    def __init__(self, refused: dict[str, str], retry: dict[str, str]) -> None:
        super().__init__("; ".join(retry.values()))
        self.refused = refused
        self.retry = retry


def _errore_for(reply: str) -> Errore:
    code = reply.split(" ", 2)
    if len(code) > 1 and code[1].startswith("5.1.1"):
        return Errore.NO_DEST
    if len(code) > 1 and code[1].startswith("5.1.2"):
        return Errore.NO_DOMINIO
    return Errore.ALTRO


async def stage_relay(svc: Services, job: Job) -> Writer:
    """Send one relay job; the writer records what happened and the notices it calls for."""
    assert svc.relay is not None
    p = job.payload
    rcpts: list[str] = list(p["recipients"])
    data = job.data or b""
    mail_from = p.get("mail_from") or svc.cfg.provider.service_address
    now = svc.clock.now()
    since = datetime.fromisoformat(p["since"]) if p.get("since") else job.created_at
    expired = now - since > timedelta(hours=svc.cfg.relay.expire_hours)
    retry: dict[str, str] = {}
    try:
        refused = await svc.relay.send(domain_of(rcpts[0]), mail_from, rcpts, data)
    except PartialFailure as exc:
        refused, retry = exc.refused, exc.retry
    except PermanentFailure as exc:
        refused = {r: exc.reply for r in rcpts}
    except TemporaryFailure as exc:
        refused, retry = {}, {r: str(exc) for r in rcpts}
    # Past the expiry nobody is tried again. No errore-consegna then: the 24 h timer's final
    # notice is what tells the sender (spec 2.3); the trace log keeps the reason.
    hours = svc.cfg.relay.expire_hours
    gave_up = {r: f"4.4.7 expired after {hours:g} h: {m}" for r, m in retry.items()}
    if not expired:
        gave_up = {}
    else:
        retry = {}
    accepted = [r for r in rcpts if r not in refused and r not in retry and r not in gave_up]

    tx = Transmission.from_json(p["tx"]) if p.get("tx") else None
    notices: list[tuple[str, BuiltMessage, str]] = []
    if tx is not None and p.get("kind", "envelope") == "envelope":
        certified = {d.address for d in tx.destinatari if d.tipo is DestinatarioTipo.CERTIFICATO}
        when = pec_time(now)
        for rcpt, reply in refused.items():
            if rcpt not in certified:
                continue  # esterno: the rules owe no PEC notice; the trace log keeps the failure
            notice = await svc.formats.build(
                "errore_consegna",
                tx=tx,
                when=when,
                recipient=rcpt,
                errore=_errore_for(reply),
                errore_esteso=f"{reply} - {svc.provider.name}"[:500],
            )
            notices.append((rcpt, notice, reply))

    def write(s: Session, outbox: Outbox) -> None:
        if accepted:
            record_sync(s, _relay_event(RELAYED, job, tx, now, accepted, None))
        failed = {**refused, **gave_up}
        if failed:
            record_sync(
                s,
                _relay_event(RELAY_FAILED, job, tx, now, list(failed), "; ".join(failed.values())),
            )
        for rcpt, notice, reply in notices:
            assert tx is not None
            expectations.close_sync(s, tx.identificativo, rcpt, now, Ricevuta.ERRORE_CONSEGNA.value)
            emit(
                s,
                svc,
                outbox,
                key=f"esito:{tx.identificativo}:{rcpt}",  # one esito per recipient, ever
                mailbox=tx.mittente,
                msg=notice,
                event=_event(
                    Ricevuta.ERRORE_CONSEGNA.value,
                    tx,
                    now,
                    svc.provider,
                    [notice],
                    error=reply,
                    data={"consegna": rcpt, "relay": job.key},
                ),
            )
        if retry:
            # Every attempt is in the trace log; the next one is a job of its own, due after
            # an exponential backoff, which keeps the time of the first attempt for the expiry.
            attempt = int(p.get("attempt", 1))
            record_sync(
                s,
                _relay_event(
                    RELAY_RETRY, job, tx, now, sorted(retry), "; ".join(sorted(set(retry.values())))
                ),
            )
            q = svc.cfg.queue
            delay = min(q.base_delay_seconds * 2 ** (attempt - 1), q.max_delay_seconds)
            outbox.relayed = True
            jobs.enqueue_sync(
                s,
                kind=RELAY,
                key=f"{job.key.split(':retry:')[0]}:retry:{attempt}",
                payload={
                    **p,
                    "recipients": sorted(retry),
                    "since": since.isoformat(),
                    "attempt": attempt + 1,
                },
                data=data,
                now=now,
                run_at=now + timedelta(seconds=delay),
            )

    return write


def _relay_event(
    event: str,
    job: Job,
    tx: Transmission | None,
    at: datetime,
    recipients: list[str],
    error: str | None,
) -> TraceEventData:
    p = job.payload
    return TraceEventData(
        at=at,
        event=event,
        pec_msgid=tx.identificativo if tx else p.get("pec_msgid"),
        client_msgid=tx.msgid if tx else None,
        sender=p.get("mail_from"),
        recipients=[{"address": r} for r in recipients],
        subject=tx.oggetto if tx else None,
        generated_ids=[p["message_id"]] if p.get("message_id") else [],
        error=error,
        data={"job": job.key, "kind": p.get("kind", "envelope"), "attempt": p.get("attempt", 1)},
    )
