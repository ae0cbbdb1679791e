"""The engine's vocabulary, defined once: job kinds, the payload of each kind, trace-event types,
delivery outcomes. Every module of pecd (and every test) imports these names; none spells the
strings again.

Payloads are frozen dataclasses that travel as JSON in the job table (``to_json``/``from_json``);
their JSON keys are the ones jobs written by earlier versions carry, so a queue survives an upgrade.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from enum import StrEnum
from typing import Any

from pecd.fastpickle import fast_pickle
from pecd.pec.builders import Transmission
from pecd.pec.vocab import Ricevuta, Trasporto


class JobKind(StrEnum):
    """What a queued job is; the value is the job table's ``kind`` column."""

    SUBMISSION = "submission"  # accepted at the access point, waiting for the formal checks
    RECEPTION = "reception"  # came in at the reception point, waiting to be classified
    DELIVERY = "delivery"  # a transport envelope for this provider's own recipients
    STORE = "store"  # a finished message (receipt, notice, anomaly) for one local mailbox
    RELAY = "relay"  # an envelope or a receipt for another provider
    WEBHOOK = "webhook"  # a transmission event for the sender's webhook (pecd.web.webhooks)


LOCAL_KINDS = (JobKind.SUBMISSION, JobKind.RECEPTION, JobKind.DELIVERY, JobKind.STORE)


class TraceType(StrEnum):
    """The ``event`` column of the trace log. The receipts keep their ``X-Ricevuta`` value, the
    envelope its ``X-Trasporto`` value, so that a reproduced receipt finds its event by kind."""

    ACCETTAZIONE = Ricevuta.ACCETTAZIONE.value
    NON_ACCETTAZIONE = Ricevuta.NON_ACCETTAZIONE.value
    PRESA_IN_CARICO = Ricevuta.PRESA_IN_CARICO.value
    AVVENUTA_CONSEGNA = Ricevuta.AVVENUTA_CONSEGNA.value
    ERRORE_CONSEGNA = Ricevuta.ERRORE_CONSEGNA.value
    PREAVVISO_ERRORE_CONSEGNA = Ricevuta.PREAVVISO_ERRORE_CONSEGNA.value
    RILEVAZIONE_VIRUS = Ricevuta.RILEVAZIONE_VIRUS.value
    POSTA_CERTIFICATA = Trasporto.POSTA_CERTIFICATA.value  # a transport envelope was made
    RICEZIONE = "ricezione"  # a valid envelope taken in charge at the reception point
    RICEVUTA_RICEVUTA = "ricevuta-ricevuta"  # a receipt of ours came back
    RICEVUTA_SCONOSCIUTA = "ricevuta-sconosciuta"  # a receipt of a transmission we never sent
    ANOMALIA = "anomalia"  # wrapped in an anomaly envelope
    VIRUS = "virus"  # infected: kept in the virus store, delivered to nobody
    DSN = "dsn"  # a delivery status notification for ordinary-mail recipients that failed
    DUPLICATE = "duplicato"  # received again: not delivered, taken in charge or answered again
    # Relay events. "relay" is the value sealed into existing logs: kept, although it reads like
    # the job kind of the same name (a different enum: they are never compared).
    RELAYED = "relay"  # handed to the next hop
    RELAY_FAILED = "relay-fallito"  # given up for these recipients
    RELAY_RETRY = "relay-rinviato"  # not accepted yet, tried again later


class Stored(StrEnum):
    """What became of one Maildir delivery."""

    DELIVERED = "delivered"  # in the mailbox (now, or by an earlier run)
    FULL = "full"  # refused: over the mailbox's quota
    FAILED = "failed"  # could not be written (a disk error, say); the error says why


@fast_pickle
@dataclass(frozen=True, slots=True)
class Outcome:
    """One delivery's outcome and, when it failed, why."""

    stored: Stored
    error: str = ""


DELIVERED = Outcome(Stored.DELIVERED)


class RelayKind(StrEnum):
    ENVELOPE = "envelope"  # a transport envelope for another provider's recipients
    RECEIPT = "receipt"  # a receipt or notice for another provider's holder


@dataclass(frozen=True, slots=True)
class TraceEventData:
    """One event of the trace log, as the engine decides it and the store writes it.

    ``recipients``: ``[{"address": ..., "tipo": "certificato"|"esterno"}, ...]``;
    ``daticert``: every daticert field as JSON; ``data``: anything else worth keeping.
    """

    at: datetime
    event: str
    pec_msgid: str | None = None
    client_msgid: str | None = None
    sender: str | None = None
    recipients: Sequence[Mapping[str, Any]] = ()
    subject: str | None = None
    provider: str | None = None
    generated_ids: Sequence[str] = ()
    error: str | None = None
    daticert: Mapping[str, Any] | None = None
    data: Mapping[str, Any] | None = None
    node: str | None = None


# --- payloads ---------------------------------------------------------------------------------


def _opt_str(v: object) -> str | None:
    return None if v is None else str(v)


def _time(v: object) -> datetime | None:
    return None if v is None else datetime.fromisoformat(str(v))


@dataclass(frozen=True, slots=True)
class IntakePayload:
    """A message one of the SMTP points took in (kinds SUBMISSION and RECEPTION): its envelope,
    the client's address, for a submission the authenticated holder, for a reception whether
    the session was under TLS."""

    mail_from: str
    rcpt_to: tuple[str, ...]
    received_at: datetime | None = None
    peer: str | None = None
    user: str | None = None
    tls: bool | None = None

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "mail_from": self.mail_from,
            "rcpt_to": list(self.rcpt_to),
            "received_at": self.received_at.isoformat() if self.received_at else None,
            "peer": self.peer,
        }
        if self.user is not None:
            out["user"] = self.user
        if self.tls is not None:
            out["tls"] = self.tls
        return out

    @classmethod
    def from_json(cls, p: Mapping[str, Any]) -> IntakePayload:
        return cls(
            mail_from=str(p.get("mail_from") or ""),
            rcpt_to=tuple(str(r) for r in p.get("rcpt_to") or ()),
            received_at=_time(p.get("received_at")),
            peer=_opt_str(p.get("peer")),
            user=_opt_str(p.get("user")),
            tls=None if p.get("tls") is None else bool(p["tls"]),
        )


@dataclass(frozen=True, slots=True)
class DeliveryPayload:
    """A verified-to-be transport envelope for local recipients. ``mail_receipt``: where the
    presa in carico goes (the sending provider's address; None: our own service mailbox)."""

    recipients: tuple[str, ...]
    tx: Transmission
    sent_at: datetime
    mail_receipt: str | None = None

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "recipients": list(self.recipients),
            "tx": self.tx.to_json(),
            "sent_at": self.sent_at.isoformat(),
        }
        if self.mail_receipt is not None:
            out["mail_receipt"] = self.mail_receipt
        return out

    @classmethod
    def from_json(cls, p: Mapping[str, Any]) -> DeliveryPayload:
        return cls(
            recipients=tuple(str(r) for r in p["recipients"]),
            tx=Transmission.from_json(p["tx"]),
            sent_at=datetime.fromisoformat(str(p["sent_at"])),
            mail_receipt=_opt_str(p.get("mail_receipt")),
        )


@dataclass(frozen=True, slots=True)
class StorePayload:
    """A finished message for one local mailbox."""

    mailbox: str
    message_id: str | None = None

    def to_json(self) -> dict[str, Any]:
        return {"mailbox": self.mailbox, "message_id": self.message_id}

    @classmethod
    def from_json(cls, p: Mapping[str, Any]) -> StorePayload:
        return cls(mailbox=str(p["mailbox"]), message_id=_opt_str(p.get("message_id")))


@dataclass(frozen=True, slots=True)
class RelayPayload:
    """A message for recipients of one other domain. ``since``: the first attempt's time (the
    expiry counts from it; None: the job's own creation); ``attempt`` counts the tries."""

    recipients: tuple[str, ...]
    message_id: str
    mail_from: str
    kind: RelayKind = RelayKind.ENVELOPE
    tx: Transmission | None = None
    pec_msgid: str | None = None
    sent_at: datetime | None = None
    since: datetime | None = None
    attempt: int = 1

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "recipients": list(self.recipients),
            "message_id": self.message_id,
            "mail_from": self.mail_from,
            "kind": self.kind.value,
        }
        if self.tx is not None:
            out["tx"] = self.tx.to_json()
        if self.pec_msgid is not None:
            out["pec_msgid"] = self.pec_msgid
        if self.sent_at is not None:
            out["sent_at"] = self.sent_at.isoformat()
        if self.since is not None:
            out["since"] = self.since.isoformat()
        if self.attempt != 1:
            out["attempt"] = self.attempt
        return out

    @classmethod
    def from_json(cls, p: Mapping[str, Any]) -> RelayPayload:
        return cls(
            recipients=tuple(str(r) for r in p["recipients"]),
            message_id=str(p.get("message_id") or ""),
            mail_from=str(p.get("mail_from") or ""),
            kind=RelayKind(p.get("kind") or RelayKind.ENVELOPE.value),
            tx=Transmission.from_json(p["tx"]) if p.get("tx") else None,
            pec_msgid=_opt_str(p.get("pec_msgid")),
            sent_at=_time(p.get("sent_at")),
            since=_time(p.get("since")),
            attempt=int(p.get("attempt") or 1),
        )


Payload = IntakePayload | DeliveryPayload | StorePayload | RelayPayload
