"""The work behind the format commands that touch the Maildir, run in a format worker process (or
inline): deliveries, and the delivery point's one round trip (verify, deliver, take in charge,
answer). The decisions come from the engine: this only carries them out."""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Sequence

from pecd.clock import Clock
from pecd.engine.effects import BuildCall, Delivery, TakeInCharge, TakenInCharge
from pecd.engine.vocab import DELIVERED, Outcome, Stored
from pecd.mailbox.maildir import INBOX, Delivered, MailboxFull, MaildirStore, Parcel
from pecd.pec.builders import BuiltMessage, ProviderIdentity
from pecd.pec.classify import Classification, classify
from pecd.pec.timefmt import pec_time
from pecd.runtime.diskspace import TRANSIENT_ERRNOS, unavailable
from pecd.runtime.logutil import RateLimitedLog

log = logging.getLogger(__name__)
# A delivery that fails for good (a permission, a name too long...) fails the same way for every
# message while its cause lasts: one line a while, the traceback once.
_failures = RateLimitedLog()


def build_each(provider: ProviderIdentity, calls: Sequence[BuildCall]) -> list[BuiltMessage]:
    """Carry out builder calls, in order, as ``provider``."""
    return [call(provider=provider) for call in calls]


def deliver_each(
    store: MaildirStore, items: Sequence[Delivery], fresh: bool = False
) -> list[Outcome]:
    """Deliver every item, made durable together (:meth:`MaildirStore.deliver_many`); one
    failure does not stop the others. ``fresh``: no key of ``items`` was ever delivered (see
    :meth:`MaildirStore.deliver`).

    A transient local fault (a full or failing filesystem: :mod:`pecd.runtime.diskspace`) is
    not an outcome: once every item was tried, it raises
    :class:`~pecd.runtime.diskspace.StorageUnavailable`, so the job waits uncounted and nobody
    is answered errore-consegna for it (what was delivered meanwhile is found again on the next
    run: deliveries are idempotent)."""
    return outcomes_of(items, store.deliver_many([parcel(d, fresh) for d in items]))


def deliver_groups(
    store: MaildirStore, groups: Sequence[tuple[Sequence[Delivery], bool]]
) -> list[list[Outcome] | Exception]:
    """:func:`deliver_each` for each (items, fresh) group, in one batch made durable together:
    per group its outcomes, or the StorageUnavailable it met."""
    results = store.deliver_many([parcel(d, fresh) for items, fresh in groups for d in items])
    answers: list[list[Outcome] | Exception] = []
    at = 0
    for items, _ in groups:
        try:
            answers.append(outcomes_of(items, results[at : at + len(items)]))
        except Exception as exc:
            answers.append(exc)
        at += len(items)
    return answers


def parcel(d: Delivery, fresh: bool = False) -> Parcel:
    return Parcel(d.mailbox, d.key, d.data, INBOX, d.quota_bytes, fresh)


def outcomes_of(
    items: Sequence[Delivery], results: Sequence[Delivered | Exception]
) -> list[Outcome]:
    """The outcome of each delivery from what the Maildir answered (see :func:`deliver_each`)."""
    outcomes = []
    transient: OSError | None = None
    for d, result in zip(items, results, strict=True):
        if not isinstance(result, Exception):
            outcomes.append(DELIVERED)
        elif isinstance(result, MailboxFull):
            outcomes.append(Outcome(Stored.FULL))
        elif isinstance(result, OSError) and result.errno in TRANSIENT_ERRNOS:
            transient = transient or result
        else:  # reported to the stage, which retries or gives up
            _failures.failure(log, "delivery of %s to %s failed", result, d.key, d.mailbox)
            outcomes.append(Outcome(Stored.FAILED, f"{type(result).__name__}: {result}"))
    if transient is not None:
        raise unavailable(transient)
    return outcomes


def take_in_charge(
    provider: ProviderIdentity, store: MaildirStore, cmd: TakeInCharge, clock: Clock
) -> TakenInCharge:
    """Verify the envelope; when it is valid PEC, deliver it, build the presa in carico, and
    build the receipts the engine's ``answer`` owes, timed after the deliveries they attest."""
    [answer] = take_in_charge_many(provider, store, [(cmd, clock)])
    if isinstance(answer, Exception):
        raise answer
    return answer


def take_in_charge_many(
    provider: ProviderIdentity,
    store: MaildirStore,
    calls: Sequence[tuple[TakeInCharge, Clock]],
) -> list[TakenInCharge | Exception]:
    """:func:`take_in_charge` for several envelopes (of several jobs), their deliveries made
    durable together, in one batch: per call its answer, or the exception it met."""
    answers: list[TakenInCharge | Exception | None] = [None] * len(calls)
    valid: list[tuple[int, Classification]] = []
    for i, (cmd, _) in enumerate(calls):
        try:
            c = classify(cmd.envelope)
        except Exception as exc:
            answers[i] = exc
            continue
        if c.is_valid_pec:
            valid.append((i, c))
        else:
            answers[i] = TakenInCharge(c)
    delivered = store.deliver_many([parcel(d) for i, _ in valid for d in calls[i][0].deliveries])
    at = 0
    for i, c in valid:
        cmd, clock = calls[i]
        mine = delivered[at : at + len(cmd.deliveries)]
        at += len(cmd.deliveries)
        try:
            answers[i] = _answer(provider, cmd, clock, c, tuple(outcomes_of(cmd.deliveries, mine)))
        except Exception as exc:
            answers[i] = exc
    return [a if a is not None else RuntimeError("not taken in charge") for a in answers]


def _answer(
    provider: ProviderIdentity,
    cmd: TakeInCharge,
    clock: Clock,
    c: Classification,
    outcomes: tuple[Outcome, ...],
) -> TakenInCharge:
    presa = cmd.presa(provider=provider)
    when = pec_time(clock.now())
    answered = cmd.answer(c, outcomes, when)
    if answered.failed:
        return TakenInCharge(c, outcomes, presa, (), answered.failed)
    receipts = tuple(
        (rcpt, event, call(provider=provider), error)
        for rcpt, event, call, error in answered.receipts
    )
    return TakenInCharge(c, outcomes, presa, receipts, {}, when)


def portable(taken: TakenInCharge) -> TakenInCharge:
    """``taken`` without what need not cross back from a worker process: the signer's certificate
    (the object, and its DER: the delivery point does not look the signer up), and the wrapped
    original (it went into the receipts already)."""
    return dataclasses.replace(
        taken,
        classification=dataclasses.replace(
            taken.classification, signature_info=None, postacert=None, signer_der=None
        ),
    )
