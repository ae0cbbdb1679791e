"""The access point's rules for one accepted SMTP transaction: formal checks and the antivirus,
then either a non-accettazione (formal, or the virus variant, the message kept in the virus store),
or an accettazione and a transport envelope routed to every recipient (spec 2.1, 2.2, 4)."""

from __future__ import annotations

import functools
from dataclasses import asdict
from datetime import datetime

from pecd.engine.context import Context
from pecd.engine.effects import (
    Build,
    BuildCall,
    Effect,
    Enqueue,
    Expect,
    KeepInfected,
    Record,
    Scan,
    Scanned,
    Stage,
)
from pecd.engine.vocab import (
    DeliveryPayload,
    IntakePayload,
    JobKind,
    RelayKind,
    RelayPayload,
    TraceType,
)
from pecd.pec import builders
from pecd.pec.address import domain_of
from pecd.pec.builders import Transmission
from pecd.pec.checks import Submission, check_submission, unscannable
from pecd.pec.timefmt import PecTime, pec_time


def submission(ctx: Context, key: str, p: IntakePayload, raw: bytes, now: datetime) -> Stage:
    """Stage of a SUBMISSION job ``key``; ``now`` is the acceptance instant, one value for the
    receipt, the envelope, their daticert and the trace log."""
    when = pec_time(now)
    now = when.instant
    tx = Transmission.from_submission(
        raw,
        mail_from=p.mail_from,
        rcpt_to=p.rcpt_to,
        identificativo=ctx.provider.new_msgid(when),
        is_certified=ctx.is_certified,
    )
    violations = check_submission(Submission(raw, p.mail_from, p.rcpt_to, p.user), ctx.rules.limits)
    if not violations:
        # The antivirus after the formal checks (spec 4, step 8): an infected message gets the
        # virus non-accettazione, is neither delivered nor relayed, and goes to the virus store;
        # one it could not check whole is refused like a formal fault, with the reason.
        scanned: Scanned = yield Scan(raw)
        if scanned.infected:
            return (yield from infected(ctx, key, tx, when, raw, scanned))
        if scanned.unscannable is not None:
            violations = [unscannable(scanned.unscannable)]
    if violations:
        return (
            yield from refuse(
                ctx,
                key,
                tx,
                functools.partial(
                    builders.non_accettazione, tx=tx, when=when, violations=violations
                ),
                now,
                "; ".join(v.code for v in violations),
                {"violations": [asdict(v) for v in violations]},
            )
        )

    acc, env = yield Build(
        (
            functools.partial(builders.accettazione, tx=tx, when=when),
            functools.partial(builders.transport_envelope, original=raw, tx=tx, when=when),
        )
    )
    effects: list[Effect] = ctx.emit(
        key=f"{key}:accettazione",
        unique=True,  # from this transaction's own intake key
        mailbox=tx.mittente,
        msg=acc,
        event=ctx.event(TraceType.ACCETTAZIONE, tx, now, [acc], data={"intake": key}),
    )
    effects.append(Record(ctx.event(TraceType.POSTA_CERTIFICATA, tx, now, [env])))
    local = tuple(r for r in tx.addresses if ctx.is_local(r))
    remote: dict[str, list[str]] = {}
    for r in tx.addresses:
        if not ctx.is_local(r):
            remote.setdefault(domain_of(r), []).append(r)
    if local:
        # Same-provider mail gets the full processing (RFC 6109 3.4): the delivery point takes
        # it as a reception point would.
        effects.append(
            Enqueue(
                JobKind.DELIVERY,
                f"{key}:delivery",
                DeliveryPayload(recipients=local, tx=tx, sent_at=now),
                env.raw,
                now,
            )
        )
    # The 12 h / 24 h timers run for every PEC recipient (spec 2.3), ours too: same-provider
    # mail gets the full processing (RFC 6109 3.4), and a local delivery held back by a
    # transient fault (a full disk) waits with these timers as the rules' clock. One effect
    # for the whole transmission (one executemany); the delivery point or the receipts that
    # come back settle each recipient.
    watched = tuple(r for r in tx.addresses if ctx.is_certified(r))
    if watched:
        effects.append(Expect(tx.identificativo, watched, tx.mittente, tx, now))
    for dom, rcpts in sorted(remote.items()):
        effects.append(
            Enqueue(
                JobKind.RELAY,
                f"{key}:relay:{dom}",
                RelayPayload(
                    recipients=tuple(rcpts),
                    message_id=tx.identificativo,
                    mail_from=tx.mittente,  # the reverse path stays the sender's (spec 2.3)
                    kind=RelayKind.ENVELOPE,
                    tx=tx,
                    sent_at=now,
                ),
                env.raw,
                now,
            )
        )
    return effects


def infected(
    ctx: Context, key: str, tx: Transmission, when: PecTime, raw: bytes, scanned: Scanned
) -> Stage:
    """The virus non-accettazione; the message kept byte-exact in the virus store."""
    found = scanned.signature or "virus"
    call = functools.partial(builders.non_accettazione, tx=tx, when=when, virus=found)
    effects = yield from refuse(
        ctx, key, tx, call, when.instant, f"virus: {found}", {"virus": found}
    )
    return [
        *effects,
        KeepInfected(
            key, when.instant, "access", found, tx.identificativo, tx.mittente, tx.addresses, raw
        ),
    ]


def refuse(
    ctx: Context,
    key: str,
    tx: Transmission,
    notice_call: BuildCall,
    now: datetime,
    error: str,
    data: dict[str, object],
) -> Stage:
    """The one non-accettazione of SMTP transaction ``key``, to the sender, logged."""
    [notice] = yield Build((notice_call,))
    return ctx.emit(
        key=f"{key}:non-accettazione",
        unique=True,  # from this transaction's own intake key
        mailbox=tx.mittente,
        msg=notice,
        event=ctx.event(
            TraceType.NON_ACCETTAZIONE, tx, now, [notice], error=error, data={**data, "intake": key}
        ),
    )
