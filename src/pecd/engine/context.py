"""What every stage knows of the provider it runs for, and the rules they share: which addresses
are local, which are PEC, how a generated message is sent and logged."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Protocol

from pecd.engine.effects import Effect, Enqueue, Record, StoreLocal
from pecd.engine.vocab import JobKind, RelayKind, RelayPayload, TraceEventData
from pecd.pec.address import domain_of
from pecd.pec.builders import BuiltMessage, ProviderIdentity, Transmission
from pecd.pec.checks import SubmissionLimits
from pecd.pec.daticert import Daticert
from pecd.pec.daticert import to_json as daticert_json
from pecd.pec.smime import certificate_sha1


class ProviderEntry(Protocol):
    """A provider of the index, as the reception point needs it."""

    @property
    def mail_receipt(self) -> str: ...

    @property
    def domains(self) -> tuple[str, ...]:
        """Its managedDomains, lower case."""
        ...


class ProviderIndex(Protocol):
    """The provider index (in memory; reloaded by the runtime)."""

    def is_certified(self, address: str) -> bool: ...

    def provider_for_certificate(self, der: bytes) -> ProviderEntry | None: ...


@dataclass(frozen=True)
class Rules:
    """The settings of the rules: limits, retries, expiry."""

    limits: SubmissionLimits
    max_attempts: int  # a delivery's last try answers errore-consegna rather than fail again
    relay_expire_hours: float  # a relay given up after this long
    base_delay_seconds: float  # relay retries: exponential backoff from this...
    max_delay_seconds: float  # ...up to this
    first_hours: float  # timers: first preavviso
    final_hours: float  # timers: final preavviso


@dataclass(frozen=True)
class Context:
    """The provider a stage works for."""

    provider: ProviderIdentity
    local_domains: frozenset[str]
    mail_receipt: str  # our service mailbox: where presa in carico for our own mail goes
    rules: Rules
    index: ProviderIndex | None = None

    def is_local(self, address: str) -> bool:
        return domain_of(address) in self.local_domains

    def is_certified(self, address: str) -> bool:
        """PEC or not: a local domain, or a domain the provider index lists (spec section 1)."""
        if self.is_local(address):
            return True
        return self.index is not None and self.index.is_certified(address)

    def trusted_provider(self, signer_der: bytes | None) -> ProviderEntry | None:
        if self.index is None or signer_der is None:
            return None
        return self.index.provider_for_certificate(signer_der)

    def event(
        self,
        event: str,
        tx: Transmission,
        at: datetime,
        generated: Sequence[BuiltMessage] = (),
        *,
        error: str | None = None,
        daticert: Daticert | None = None,
        data: dict[str, Any] | None = None,
    ) -> TraceEventData:
        """A trace event about transmission ``tx``, with every field a reproduced receipt needs."""
        d = daticert or (generated[0].daticert if generated else None)
        return TraceEventData(
            at=at,
            event=event,
            pec_msgid=tx.identificativo,
            client_msgid=tx.msgid,
            sender=tx.mittente,
            recipients=[{"address": r.address, "tipo": r.tipo.value} for r in tx.destinatari],
            subject=tx.oggetto,
            provider=self.provider.name,
            generated_ids=[m.message_id for m in generated],
            error=error,
            daticert=daticert_json(d) if d is not None else None,
            # Which certificate signed what this event generated: a reproduced receipt says so.
            data={**(data or {}), "signer_sha1": signer_sha1(self.provider)} if generated else data,
        )

    def send(
        self,
        *,
        key: str,
        mailbox: str,
        msg: BuiltMessage,
        at: datetime,
        unique: bool = False,
    ) -> Effect:
        """Send a generated message to one mailbox: stored here when local, else relayed from our
        service address. Keyed: whatever runs this twice sends it once."""
        if self.is_local(mailbox):
            return StoreLocal(key, mailbox, msg.raw, msg.message_id, at, unique)
        return Enqueue(
            JobKind.RELAY,
            key,
            RelayPayload(
                recipients=(mailbox,),
                message_id=msg.message_id,
                mail_from=self.provider.service_address,
                kind=RelayKind.RECEIPT,
                pec_msgid=msg.daticert.identificativo if msg.daticert else None,
            ),
            msg.raw,
            at,
        )

    def emit(
        self,
        *,
        key: str,
        mailbox: str,
        msg: BuiltMessage,
        event: TraceEventData,
        unique: bool = False,
    ) -> list[Effect]:
        """Send one generated message (at most once) and log it, at the event's time."""
        return [
            self.send(key=key, mailbox=mailbox, msg=msg, at=event.at, unique=unique),
            Record(event),
        ]


def signer_sha1(provider: ProviderIdentity) -> str:
    """The SHA-1 of the certificate that signs what ``provider`` generates."""
    return certificate_sha1(provider.signer.certificate)
