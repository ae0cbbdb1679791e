"""Receipts reproduced from the trace log (spec section 7: the log must be able to rebuild a lost
receipt), as pure decisions: which logged events are receipts this provider issued, which one a
request means, and what :func:`pecd.pec.builders.reproduced_receipt` is called with.

Sans-I/O: the events come in as :class:`LoggedEvent` values (``pecd.store.reproduce`` reads them
from the database), the provider identity and the time as values; the receipt comes out as bytes.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from pecd.pec import builders
from pecd.pec.address import normalize_address
from pecd.pec.builders import BuiltMessage, ProviderIdentity
from pecd.pec.daticert import Daticert, from_json
from pecd.pec.timefmt import PecTime
from pecd.pec.vocab import DaticertTipo, Errore

__all__ = [
    "LoggedEvent",
    "NoReceipt",
    "Reproduction",
    "ReproductionError",
    "SeveralReceipts",
    "Wanted",
    "choose",
    "describe",
    "is_issued_receipt",
    "matching",
    "plan",
    "reproduce",
]


@dataclass(frozen=True, slots=True)
class LoggedEvent:
    """What reproduction needs of one trace-log event: its id, its type, the daticert logged with
    it (every field, as JSON) and its other data (``to``: where the receipt went)."""

    id: int
    event: str
    daticert: Mapping[str, Any] | None = None
    data: Mapping[str, Any] | None = None


@dataclass(frozen=True, slots=True)
class Wanted:
    """Which receipt of a transmission is asked for: any filter left ``None`` matches all."""

    identificativo: str
    tipo: str | None = None
    recipient: str | None = None
    """The recipient the receipt speaks for (the daticert's ``consegna``)."""
    event_id: int | None = None


class ReproductionError(Exception):
    """No single receipt answers the request."""


class NoReceipt(ReproductionError):
    """The log holds no receipt this provider issued that matches the request."""

    def __init__(self, wanted: Wanted) -> None:
        super().__init__(f"{wanted.identificativo}: no matching receipt in the trace log")
        self.wanted = wanted


class SeveralReceipts(ReproductionError):
    """More than one receipt matches: ``events`` says which."""

    def __init__(self, events: Sequence[LoggedEvent]) -> None:
        super().__init__(f"several receipts match ({', '.join(describe(e) for e in events)})")
        self.events = tuple(events)


def describe(e: LoggedEvent) -> str:
    """``event 12: avvenuta-consegna for bob@…``: one event among several, for a person."""
    consegna = (e.daticert or {}).get("consegna")
    return f"event {e.id}: {e.event}" + (f" for {consegna}" if consegna else "")


def is_issued_receipt(e: LoggedEvent) -> bool:
    """Whether ``e`` logs a receipt this provider issued: a daticert that is not a transport
    envelope's, logged under the receipt's own type."""
    d = e.daticert
    if not d:
        return False
    return d.get("tipo") != DaticertTipo.POSTA_CERTIFICATA.value and e.event == d.get("tipo")


def matching(events: Iterable[LoggedEvent], wanted: Wanted) -> list[LoggedEvent]:
    """The receipts among ``events`` (those of one transmission) that ``wanted`` describes."""
    out = []
    for e in events:
        if not is_issued_receipt(e):
            continue
        d = e.daticert or {}
        if wanted.tipo and d.get("tipo") != wanted.tipo:
            continue
        if wanted.recipient and (d.get("consegna") or "") != normalize_address(wanted.recipient):
            continue
        if wanted.event_id is not None and e.id != wanted.event_id:
            continue
        out.append(e)
    return out


def choose(events: Iterable[LoggedEvent], wanted: Wanted) -> LoggedEvent:
    """The one receipt ``wanted`` means; NoReceipt or SeveralReceipts if not exactly one."""
    found = matching(events, wanted)
    if not found:
        raise NoReceipt(wanted)
    if len(found) > 1:
        raise SeveralReceipts(found)
    return found[0]


@dataclass(frozen=True, slots=True)
class Reproduction:
    """What :func:`pecd.pec.builders.reproduced_receipt` is called with, but the signer and time."""

    daticert: Daticert
    to: str
    virus: bool


def plan(event: LoggedEvent, *, mail_receipt: str) -> Reproduction:
    """How ``event``'s receipt is rebuilt: its logged daticert (DaticertError if it is not one),
    sent where the original went (logged ``to``), else to the sender or, for a presa in carico,
    to ``mail_receipt`` (this provider's receipts mailbox)."""
    d = from_json(dict(event.daticert or {}))
    logged_to = (event.data or {}).get("to")
    to = logged_to or (d.mittente if d.tipo is not DaticertTipo.PRESA_IN_CARICO else mail_receipt)
    return Reproduction(daticert=d, to=str(to), virus=d.errore is Errore.VIRUS)


def reproduce(r: Reproduction, provider: ProviderIdentity, now: PecTime) -> BuiltMessage:
    """The receipt ``r`` describes, signed by ``provider`` at ``now``."""
    return builders.reproduced_receipt(r.daticert, provider, now, to=r.to, virus=r.virus)
