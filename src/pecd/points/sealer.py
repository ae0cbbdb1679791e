"""The background task that seals the trace log every ``log.seal_seconds``."""

from __future__ import annotations

import asyncio
import contextlib
import logging

from pecd.clock import Clock
from pecd.pec.smime import Signer
from pecd.store.db import Database
from pecd.store.seals import seal_pending

log = logging.getLogger(__name__)


class Sealer:
    def __init__(
        self, db: Database, signer: Signer, clock: Clock, *, every: float, node: str
    ) -> None:
        self.db = db
        self.signer = signer
        self.clock = clock
        self.every = every
        self.node = node
        self._task: asyncio.Task[None] | None = None

    async def start(self, stack: contextlib.AsyncExitStack) -> None:
        self._task = asyncio.create_task(self._loop(), name="sealer")
        stack.push_async_callback(self.stop)

    async def stop(self) -> None:
        """Seal what the last moments wrote, then end."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
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

    async def _loop(self) -> None:
        while True:
            await asyncio.sleep(self.every)
            try:
                n = await self.seal_now()
                if n:
                    log.debug("sealed %d trace events", n)
            except Exception:
                log.exception("sealing the trace log failed; trying again later")
