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
from pecd.mailbox.maildir import MailboxFull, MaildirStore
from pecd.pec.builders import BuiltMessage, ProviderIdentity
from pecd.pec.classify import classify
from pecd.pec.timefmt import pec_time
from pecd.runtime.diskspace import TRANSIENT_ERRNOS, unavailable

log = logging.getLogger(__name__)


def build_each(provider: ProviderIdentity, calls: Sequence[BuildCall]) -> list[BuiltMessage]:
    """Carry out builder calls, in order, as ``provider``."""
    return [call(provider=provider) for call in calls]


def deliver_each(
    store: MaildirStore, items: Sequence[Delivery], fresh: bool = False
) -> list[Outcome]:
    """Deliver every item; one failure does not stop the others. ``fresh``: no key of ``items``
    was ever delivered (see :meth:`MaildirStore.deliver`).

    A transient local fault (a full or failing filesystem: :mod:`pecd.runtime.diskspace`) is
    not an outcome: once every item was tried, it raises
    :class:`~pecd.runtime.diskspace.StorageUnavailable`, so the job waits uncounted and nobody
    is answered errore-consegna for it (what was delivered meanwhile is found again on the next
    run: deliveries are idempotent)."""
    outcomes = []
    transient: OSError | None = None
    for d in items:
        try:
            store.deliver(d.mailbox, d.key, d.data, quota_bytes=d.quota_bytes, fresh=fresh)
        except MailboxFull:
            outcomes.append(Outcome(Stored.FULL))
        except OSError as exc:
            if exc.errno not in TRANSIENT_ERRNOS:
                log.exception("delivery of %s to %s failed", d.key, d.mailbox)
                outcomes.append(Outcome(Stored.FAILED, f"{type(exc).__name__}: {exc}"))
            elif transient is None:
                transient = exc
        except Exception as exc:  # reported to the stage, which retries or gives up
            log.exception("delivery of %s to %s failed", d.key, d.mailbox)
            outcomes.append(Outcome(Stored.FAILED, f"{type(exc).__name__}: {exc}"))
        else:
            outcomes.append(DELIVERED)
    if transient is not None:
        raise unavailable(transient)
    return outcomes


def take_in_charge(
    provider: ProviderIdentity, store: MaildirStore, cmd: TakeInCharge, clock: Clock
) -> TakenInCharge:
    """Verify the envelope; when it is valid PEC, deliver it, build the presa in carico, and
    build the receipts the engine's ``answer`` owes, timed after the deliveries they attest."""
    c = classify(cmd.envelope)
    if not c.is_valid_pec:
        return TakenInCharge(c)
    outcomes = tuple(deliver_each(store, cmd.deliveries))
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
    object, and the wrapped original (it went into the receipts already)."""
    return dataclasses.replace(
        taken,
        classification=dataclasses.replace(
            taken.classification, signature_info=None, postacert=None
        ),
    )
