"""The 12 h / 24 h timers: a preavviso-errore-consegna when a PEC recipient at another provider
has not answered in time (spec section 2.3).

At ``first_hours`` without presa in carico or delivery: the first notice. At ``final_hours``
without delivery: the final one, and the recipient's transaction is closed. So a presa in carico
within 12 h and no delivery gives only the final notice; nothing at all gives both; a delivery
between 12 h and 24 h without presa in carico gives only the first. At most one of each: the
notice is keyed by transmission, recipient and timer, and the row is marked in the same
transaction. Time comes from the injected clock, so tests move it instead of waiting.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from datetime import timedelta

from sqlalchemy.orm import Session

from pecd.pec.builders import BuiltMessage, Transmission
from pecd.pec.timefmt import pec_time
from pecd.pec.vocab import Ricevuta
from pecd.runtime.pipeline import Outbox, Services, _event, emit, flush
from pecd.store import expectations
from pecd.store.models import Expectation
from pecd.tasks import Background

log = logging.getLogger(__name__)


class Timers:
    """``await timers.run_once()`` sends what is due; ``start`` runs it every ``check_seconds``."""

    def __init__(self, svc: Services, *, check_seconds: float, node: str) -> None:
        self.svc = svc
        self.check_seconds = check_seconds
        self.worker = f"{node}:timers"
        self._background = Background("timers", self._loop)

    async def start(self, stack: contextlib.AsyncExitStack) -> None:
        await self._background.start(stack)

    async def _loop(self) -> None:
        while True:
            try:
                await self.run_once()
            except Exception:
                log.exception("timer check failed; trying again later")
            await asyncio.sleep(self.check_seconds)

    async def run_once(self) -> int:
        """Send every notice due now; returns how many went out."""
        svc = self.svc
        t = svc.cfg.timers
        now = svc.clock.now()
        first, final = timedelta(hours=t.first_hours), timedelta(hours=t.final_hours)
        async with svc.db.read_session() as s:
            rows = await expectations.due(s, now, first, final)
        if not rows:
            return 0
        when = pec_time(now)
        notices: list[tuple[Expectation, bool, Transmission, BuiltMessage]] = []
        for row in rows:
            is_final = row.sent_at <= now - final
            # "Nothing at all -> both notices": a first one not sent in time (the server was
            # down at 12 h) still goes out, just before the final one.
            owed = [False] if row.first_notice_at is None and row.presa_at is None else []
            owed += [True] if is_final else []
            try:
                tx = Transmission.from_json(row.tx)
                for final_notice in owed:
                    notice = await svc.formats.build(
                        "preavviso_errore_consegna",
                        tx=tx,
                        when=when,
                        recipient=row.recipient,
                        sent=pec_time(row.sent_at),
                        final=final_notice,
                    )
                    notices.append((row, final_notice, tx, notice))
            except Exception:
                # One bad row must not hold back everybody else's notices.
                log.exception("timer notice for %s / %s failed", row.pec_msgid, row.recipient)
        outbox = Outbox.for_worker(svc, self.worker)

        def write(s: Session) -> int:
            sent = 0
            for row, final_notice, tx, notice in notices:
                if not expectations.noticed_sync(
                    s, row.pec_msgid, row.recipient, now, final=final_notice
                ):
                    continue  # another node was first
                hours = "24h" if final_notice else "12h"
                emit(
                    s,
                    svc,
                    outbox,
                    key=f"timer:{row.pec_msgid}:{row.recipient}:{hours}",
                    mailbox=row.sender,
                    msg=notice,
                    event=_event(
                        Ricevuta.PREAVVISO_ERRORE_CONSEGNA.value,
                        tx,
                        now,
                        svc.provider,
                        [notice],
                        error=f"timeout {hours}",
                        data={"consegna": row.recipient, "timer": hours},
                    ),
                )
                sent += 1
            return sent

        sent = await svc.db.write(write)
        svc.wake.set()
        await flush(svc, outbox)
        return sent
