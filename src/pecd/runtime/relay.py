"""The relay's SMTP client: sends transport envelopes and receipts to other providers' reception
points, and envelopes for esterno recipients to ordinary mail servers.

One SMTP transaction per destination domain carries all of its recipients. What a reply means
for each recipient (retry, give up, errore-consegna) is the engine's (``engine/relay.py``): this
only reports, per recipient, refused for good or for now. Relay jobs have their own workers, so a
slow or dead peer never holds up local delivery, and a per-destination limit keeps one peer from
taking all of them.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import ssl
from collections.abc import Mapping
from dataclasses import dataclass

import aiosmtplib
import dns.asyncresolver
import dns.exception
import dns.resolver

from pecd.config import Config
from pecd.engine.effects import Sent
from pecd.pec.address import normalize_domain
from pecd.pec.vocab import Errore

log = logging.getLogger(__name__)


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

    def __init__(self, routes: Mapping[str, Destination], port: int) -> None:
        self.routes = dict(routes)
        self.port = port

    @classmethod
    def from_config(cls, cfg: Config) -> Router:
        return cls({d: Destination(e.host, e.port) for d, e in cfg.routes.items()}, cfg.relay.port)

    async def resolve(self, domain: str) -> list[Destination]:
        domain = normalize_domain(domain)
        if domain in self.routes:
            return [self.routes[domain]]
        try:
            answer = await dns.asyncresolver.resolve(domain, "MX")
            mx = sorted(answer, key=lambda r: r.preference)
            hosts = [str(r.exchange).rstrip(".") for r in mx]
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
        self.router = Router.from_config(cfg)
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

    async def send(self, domain: str, mail_from: str, rcpts: list[str], data: bytes) -> Sent:
        """Send to the next hop for ``domain``; per recipient, refused for good or for now."""
        try:
            refused = await self.transmit(domain, mail_from, rcpts, data)
        except PartialFailure as exc:
            return Sent(exc.refused, exc.retry)
        except PermanentFailure as exc:
            return Sent({r: exc.reply for r in rcpts})
        except TemporaryFailure as exc:
            return Sent({}, {r: str(exc) for r in rcpts})
        return Sent(refused)

    async def transmit(
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
            # Every recipient refused: those refused for good are answered now, the others
            # tried again (not all of them again because one said "later").
            final = {e.recipient: f"{e.code} {e.message}" for e in exc.recipients if e.code >= 500}
            later = {e.recipient: f"{e.code} {e.message}" for e in exc.recipients if e.code < 500}
            if later:
                raise PartialFailure(final, later) from None
            return final
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
