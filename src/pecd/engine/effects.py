"""What a stage asks of the world (commands, answered while it runs) and what it decides must
happen (effects, applied by the runtime in the stage's transaction).

A stage is a generator: it yields a command, the runtime carries it out and sends the answer
back in, and at the end the stage returns its effects. The runtime never decides anything PEC;
the stage never touches a socket, a file or the database. Tests drive a stage by hand, answering
each command with what they like (``tests/unit/engine``).
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Generator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from pecd.engine.vocab import JobKind, Outcome, Payload, TraceEventData
from pecd.fastpickle import fast_pickle
from pecd.pec.builders import BuiltMessage, Transmission
from pecd.pec.classify import Classification
from pecd.pec.timefmt import PecTime

# One call of a builder of ``pec.builders`` with every argument but ``provider``, which the
# runtime adds (the provider's key lives where the signing happens: a format worker process).
BuildCall = functools.partial[BuiltMessage]


# --- commands -----------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Build:
    """Build (and sign) these messages; the answer is a list of BuiltMessage in order."""

    calls: tuple[BuildCall, ...]


@dataclass(frozen=True, slots=True)
class Classify:
    """Verify and classify ``raw``; the answer is a Classification."""

    raw: bytes


@dataclass(frozen=True, slots=True)
class MailboxState:
    """What the delivery point needs to know of a local mailbox."""

    disabled: bool
    quota_bytes: int | None


@dataclass(frozen=True, slots=True)
class LookUpMailboxes:
    """The accounts of these local addresses; the answer maps each to a MailboxState, or None
    when nobody holds it."""

    addresses: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class Logged:
    """One earlier trace-log event about a transmission, as the rules need it."""

    event: str
    sender: str | None
    recipients: tuple[str, ...]
    data: Mapping[str, Any]


@dataclass(frozen=True, slots=True)
class History:
    """What the trace log holds about transmission ``pec_msgid`` (events of ``types`` only):
    whether we sent it (posta-certificata), took it in charge before (ricezione), stored a
    receipt of it (ricevuta-ricevuta). The answer is a tuple of Logged, oldest first."""

    pec_msgid: str
    types: tuple[str, ...]


@fast_pickle
@dataclass(frozen=True, slots=True)
class Delivery:
    """One Maildir delivery: ``data`` into ``mailbox``, idempotent by ``key``; ``quota_bytes``
    None: never refused for quota (receipts: losing one would lose the holder's proof)."""

    mailbox: str
    key: str
    data: bytes
    quota_bytes: int | None = None


@dataclass(frozen=True, slots=True)
class Deliver:
    """Deliver each item; the answer is one Outcome per item, in order."""

    items: tuple[Delivery, ...]


@fast_pickle
@dataclass(frozen=True, slots=True)
class TakeInCharge:
    """The delivery point's one round trip: verify ``envelope``; when it is valid PEC, make the
    ``deliveries``, build the presa in carico (``presa``), then the receipts that
    ``answer(classification, outcomes, when)`` calls for, ``when`` being the time read once the
    deliveries are done. ``answer`` is the engine's own rule (delivery.receipts_owed) run where
    the deliveries happen; the answer to the command is a TakenInCharge."""

    envelope: bytes
    deliveries: tuple[Delivery, ...]
    presa: BuildCall
    answer: functools.partial[Answered]


@dataclass(frozen=True, slots=True)
class Answered:
    """What the delivery point owes after the deliveries: per recipient (in order) the ricevuta
    value, the builder call and the errore-esteso (None for avvenuta-consegna); ``failed``: the
    recipients whose delivery failed and is to be retried (then nothing is owed yet)."""

    receipts: tuple[tuple[str, str, BuildCall, str | None], ...] = ()
    failed: Mapping[str, str] = field(default_factory=dict)


@fast_pickle
@dataclass(frozen=True, slots=True)
class TakenInCharge:
    """The answer to TakeInCharge: the classification; when valid PEC, each delivery's outcome,
    the presa in carico, and per recipient (recipient, ricevuta, message, errore-esteso) unless
    some delivery is to be retried (``failed``); ``answered``: the receipts' time."""

    classification: Classification
    outcomes: tuple[Outcome, ...] = ()
    presa: BuiltMessage | None = None
    receipts: tuple[tuple[str, str, BuiltMessage, str | None], ...] = ()
    failed: Mapping[str, str] = field(default_factory=dict)
    answered: PecTime | None = None


@dataclass(frozen=True, slots=True)
class Send:
    """Send ``data`` over SMTP to the next hop for ``domain``; the answer is a Sent."""

    domain: str
    mail_from: str
    recipients: tuple[str, ...]
    data: bytes


@dataclass(frozen=True, slots=True)
class Sent:
    """How a Send went, per recipient: ``refused`` for good (address -> reply), ``retry`` for
    now (address -> reason); a recipient in neither was accepted."""

    refused: Mapping[str, str] = field(default_factory=dict)
    retry: Mapping[str, str] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class Scan:
    """Scan ``data`` for viruses; the answer is a Scanned. A scanner that cannot answer raises
    (the stage fails this attempt and is retried: nothing is accepted or delivered unscanned)."""

    data: bytes


@dataclass(frozen=True, slots=True)
class Scanned:
    """The antivirus verdict: ``signature`` names what was found. ``unscannable``: the scanner
    answered, but could not look at all of it (over its size or recursion limits): a fact about
    the message, not a scanner that is down, so the message is neither clean nor retried."""

    infected: bool
    signature: str | None = None
    unscannable: str | None = None


CLEAN = Scanned(False)


Command = Build | Classify | LookUpMailboxes | History | Deliver | TakeInCharge | Send | Scan


# --- effects ------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Enqueue:
    """A new job, unless one with ``key`` exists (keys make re-runs harmless); ``then`` take
    effect only if this one made the job (two stages racing for the same key: one wins)."""

    kind: JobKind
    key: str
    payload: Payload
    data: bytes
    at: datetime
    run_at: datetime | None = None
    then: tuple[Effect, ...] = ()


@dataclass(frozen=True, slots=True)
class StoreLocal:
    """A finished message for a local mailbox, stored right after the commit (by the worker that
    committed it). ``unique``: ``key`` derives from one SMTP transaction's own intake key, so no
    other job will ever carry it (the delivery then skips looking for an earlier copy)."""

    key: str
    mailbox: str
    data: bytes
    message_id: str | None
    at: datetime
    unique: bool = False


@dataclass(frozen=True, slots=True)
class Record:
    """An event for the trace log."""

    event: TraceEventData


@dataclass(frozen=True, slots=True)
class Expect:
    """Start the 12 h / 24 h timers for these PEC recipients (at other providers and local)."""

    pec_msgid: str
    recipients: tuple[str, ...]
    sender: str
    tx: Transmission
    sent_at: datetime


@dataclass(frozen=True, slots=True)
class TookCharge:
    """A presa in carico came back for these recipients: the first timer is satisfied."""

    pec_msgid: str
    recipients: tuple[str, ...]
    at: datetime


@dataclass(frozen=True, slots=True)
class Settle:
    """The transmission to ``recipient`` has its answer (``outcome``): its timers stop."""

    pec_msgid: str
    recipient: str
    at: datetime
    outcome: str


@dataclass(frozen=True, slots=True)
class ClaimNotice:
    """Mark the first (``final`` False) or final timer notice of a recipient as sent; only if
    this claim is the one that marks it (not another node's) do ``then`` take effect."""

    pec_msgid: str
    recipient: str
    at: datetime
    final: bool
    then: tuple[Effect, ...]


@dataclass(frozen=True, slots=True)
class KeepInfected:
    """An infected message into the virus store, byte-exact, kept for the log's retention (30
    months); keyed, so a re-run keeps it once. ``point``: "access" or "reception"."""

    key: str
    at: datetime
    point: str
    signature: str
    pec_msgid: str | None
    sender: str | None
    recipients: tuple[str, ...]
    data: bytes


Effect = Enqueue | StoreLocal | Record | Expect | TookCharge | Settle | ClaimNotice | KeepInfected

# A stage: yields commands, is sent their answers, returns its effects.
Stage = Generator[Command, Any, list[Effect]]


def play(stage: Stage, answer: Callable[[Command], Any]) -> list[Effect]:
    """Drive ``stage`` to its end, synchronously, answering each command with ``answer`` (a
    failure of ``answer`` is thrown into the stage). The runtime's driver is the same loop with
    an ``await`` (``runtime/stages.py``); tests and tools use this one."""
    try:
        command = next(stage)
        while True:
            try:
                reply = answer(command)
            except Exception as exc:
                command = stage.throw(exc)
            else:
                command = stage.send(reply)
    except StopIteration as done:
        effects: list[Effect] = done.value
        return effects


class Unavailable(Exception):
    """Something a stage needs cannot answer now (the antivirus, say): the job waits and is
    tried again, without counting an attempt, so it is never parked, and never goes on without
    the answer."""


class StageError(Exception):
    """A stage that cannot finish now; its job is retried with backoff, then parked."""


def relay_wake(effects: Sequence[Effect]) -> bool:
    """Whether these effects queue work for the relay."""
    for e in effects:
        if isinstance(e, Enqueue) and (e.kind is JobKind.RELAY or relay_wake(e.then)):
            return True
        if isinstance(e, ClaimNotice) and relay_wake(e.then):
            return True
    return False
