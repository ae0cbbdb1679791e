"""The 12 h / 24 h timers: a preavviso-errore-consegna when a PEC recipient has not answered in
time (spec 2.3): at another provider (its receipts settle it at the reception point), or ours (the
delivery point settles it; a delivery held back by a full disk waits with these as its clock).

At ``first_hours`` without presa in carico or delivery: the first notice. At ``final_hours``
without delivery: the final one, and the recipient's transaction is closed. So a presa in carico
within 12 h and no delivery gives only the final notice; nothing at all gives both (a first notice
not sent in time, the server being down at 12 h, still goes out just before the final one); a
delivery between 12 h and 24 h without presa in carico gives only the first. At most one of each:
the notice is keyed by transmission, recipient and timer, and sent only by the claim that marks it.
"""

from __future__ import annotations

import functools
from collections.abc import Generator, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from pecd.engine.context import Context
from pecd.engine.effects import Build, BuildCall, ClaimNotice, Command, Effect, Stage
from pecd.engine.vocab import TraceType
from pecd.pec import builders
from pecd.pec.builders import BuiltMessage, Transmission
from pecd.pec.timefmt import pec_time


@dataclass(frozen=True, slots=True)
class Waiting:
    """One PEC recipient (at another provider, or ours) whose transmission is still open."""

    pec_msgid: str
    recipient: str
    sender: str
    tx: Transmission
    sent_at: datetime
    presa_at: datetime | None
    first_notice_at: datetime | None
    closed: bool = False


def owed(w: Waiting, now: datetime, first: timedelta, final: timedelta) -> list[bool]:
    """The notices ``w`` is owed at ``now``, in order: False for the first, True for the final."""
    if w.closed or w.sent_at > now - first:
        return []
    out = [False] if w.first_notice_at is None and w.presa_at is None else []
    if w.sent_at <= now - final:
        out.append(True)
    return out


def timers(ctx: Context, waiting: Sequence[Waiting], now: datetime) -> Stage:
    """Every notice due at ``now``, built in one round trip. Should building them together fail,
    each is built alone and the ones that fail are left for the next run: one bad row never holds
    back everybody else's notices."""
    first = timedelta(hours=ctx.rules.first_hours)
    final = timedelta(hours=ctx.rules.final_hours)
    when = pec_time(now)
    due = [(w, f) for w in waiting for f in owed(w, now, first, final)]
    calls = tuple(
        functools.partial(
            builders.preavviso_errore_consegna,
            tx=w.tx,
            when=when,
            recipient=w.recipient,
            sent=pec_time(w.sent_at),
            final=f,
        )
        for w, f in due
    )
    if not calls:
        return []
    built: list[BuiltMessage | None]
    try:
        built = yield Build(calls)
    except Exception:
        built = []
        for call in calls:
            built.append((yield from _one(call)))
    effects: list[Effect] = []
    for (w, final_notice), notice in zip(due, built, strict=True):
        if notice is None:
            continue
        hours = "24h" if final_notice else "12h"
        effects.append(
            ClaimNotice(
                w.pec_msgid,
                w.recipient,
                now,
                final_notice,
                tuple(
                    ctx.emit(
                        key=f"timer:{w.pec_msgid}:{w.recipient}:{hours}",
                        mailbox=w.sender,
                        msg=notice,
                        event=ctx.event(
                            TraceType.PREAVVISO_ERRORE_CONSEGNA,
                            w.tx,
                            now,
                            [notice],
                            error=f"timeout {hours}",
                            data={"consegna": w.recipient, "timer": hours},
                        ),
                    )
                ),
            )
        )
    return effects


def _one(call: BuildCall) -> Generator[Command, Any, BuiltMessage | None]:
    try:
        [notice] = yield Build((call,))
    except Exception:
        return None
    built: BuiltMessage = notice
    return built
