"""Runs the 12 h / 24 h timers (the rules are the engine's, ``engine/timers.py``): every
``check_seconds`` the open rows that may owe a notice are read, the engine says which notices are
due, and they are committed in one transaction (a notice only by the node whose claim marks its
row) and stored. Time comes from the injected clock, so tests move it instead of waiting.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from datetime import timedelta

from sqlalchemy.orm import Session

from pecd.engine.effects import relay_wake
from pecd.engine.timers import Waiting, timers
from pecd.pec.builders import Transmission
from pecd.runtime.stages import StageRunner
from pecd.store import expectations
from pecd.store.effects import Applied, Lease, apply
from pecd.tasks import Background

log = logging.getLogger(__name__)


class Timers:
    """``await timers.run_once()`` sends what is due; ``start`` runs it every ``check_seconds``."""

    def __init__(self, runner: StageRunner, *, check_seconds: float, node: str) -> None:
        self.runner = runner
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
        runner = self.runner
        rules = runner.ctx.rules
        now = runner.clock.now()
        first, final = timedelta(hours=rules.first_hours), timedelta(hours=rules.final_hours)
        async with runner.db.read_session() as s:
            rows = await expectations.due(s, now, first, final)
        if not rows:
            return 0
        waiting = []
        for row in rows:
            try:
                tx = Transmission.from_json(row.tx)
            except Exception:
                # One bad row must not hold back everybody else's notices.
                log.exception("timer row %s / %s is unreadable", row.pec_msgid, row.recipient)
                continue
            waiting.append(
                Waiting(
                    row.pec_msgid,
                    row.recipient,
                    row.sender,
                    tx,
                    row.sent_at,
                    row.presa_at,
                    row.first_notice_at,
                    row.closed_at is not None,
                )
            )
        effects = await runner.drive(timers(runner.ctx, waiting, now))
        if not effects:
            return 0
        outbox = runner.outbox(self.worker)
        lease = Lease(outbox.worker, outbox.lease_until)

        def write(s: Session) -> Applied:
            return apply(s, effects, lease)

        done = await runner.db.write(write)
        outbox.items += done.stored
        runner.wake.set()
        if relay_wake(effects):
            runner.relay_wake.set()
        await runner.flush(outbox)
        return done.claimed
