"""The background task that seals the trace log every ``log.seal_seconds`` and, once a day,
purges whole seals older than the retention (``log.retention_months``, 30 at least)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from datetime import timedelta

from pecd.clock import Clock
from pecd.pec.smime import Signer
from pecd.store.db import Database
from pecd.store.jobs import purge_done
from pecd.store.seals import purge, seal_pending
from pecd.tasks import Background

log = logging.getLogger(__name__)


class Sealer:
    def __init__(
        self,
        db: Database,
        signer: Signer,
        clock: Clock,
        *,
        every: float,
        node: str,
        retention_months: int = 30,
    ) -> None:
        self.retention_months = retention_months
        self._last_purge: float | None = None
        self.db = db
        self.signer = signer
        self.clock = clock
        self.every = every
        self.node = node
        self._background = Background("sealer", self._loop)

    async def start(self, stack: contextlib.AsyncExitStack) -> None:
        stack.push_async_callback(self._last_seal)  # runs after the loop is cancelled
        await self._background.start(stack)

    async def _last_seal(self) -> None:
        """Seal what the last moments wrote."""
        with contextlib.suppress(Exception):
            await self.seal_now()

    async def seal_now(self) -> int:
        """Seal everything pending; returns how many events."""
        total = 0
        while True:
            seal = await seal_pending(self.db, self.signer, now=self.clock.now(), node=self.node)
            if seal is None or seal.count == 0:
                return total
            total += seal.count

    async def purge_now(self) -> tuple[int, int]:
        now = self.clock.now()
        seals, events = await purge(
            self.db, self.signer, now=now, retention_months=self.retention_months
        )
        if seals:
            log.info("retention: purged %d seals and %d trace events", seals, events)
        # Finished jobs are kept a week for `pecd queue list --state done`, then dropped.
        async with self.db.session() as s, s.begin():
            done = await purge_done(s, older_than=now - timedelta(days=7))
        if done:
            log.info("removed %d jobs finished more than 7 days ago", done)
        return seals, events

    async def _loop(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            await asyncio.sleep(self.every)
            try:
                n = await self.seal_now()
                if n:
                    log.debug("sealed %d trace events", n)
                if self._last_purge is None or loop.time() - self._last_purge >= 86400:
                    self._last_purge = loop.time()
                    await self.purge_now()
            except Exception:
                log.exception("sealing or purging the trace log failed; trying again later")
