"""Runs the once-per-installation duties (timers, sealer, purge) in the one process that holds the
leader lock (:mod:`pecd.store.leader`); every other process keeps trying and takes over when the
leader is gone. Each change is one log line."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable

from pecd.store.leader import LeaderLock, holder_name

__all__ = ["Leadership"]

log = logging.getLogger(__name__)

Duties = Callable[[contextlib.AsyncExitStack], Awaitable[None]]


class Leadership:
    """``await Leadership(lock, duties, every=...).start(stack)``: while this process holds
    ``lock``, ``duties`` run on an exit stack of their own, closed when leadership ends (lost, or
    the app stops). ``lock`` None: this process always leads (an in-memory database)."""

    def __init__(self, lock: LeaderLock | None, duties: Duties, *, every: float) -> None:
        self.lock = lock
        self.duties = duties
        self.every = every
        self.leading = False
        self._stack: contextlib.AsyncExitStack | None = None
        self._task: asyncio.Task[None] | None = None
        self._failing = False

    async def start(self, stack: contextlib.AsyncExitStack) -> None:
        stack.push_async_callback(self.stop)
        if self.lock is None:
            await self._lead()
            return
        # The first try before returning: a lone process leads from its first moment.
        await self._try()
        self._task = asyncio.create_task(self._loop(), name="leadership")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        await self._step_down()
        if self.lock is not None:
            with contextlib.suppress(Exception):
                await self.lock.release()

    async def _loop(self) -> None:
        assert self.lock is not None
        while True:
            await asyncio.sleep(self.every)
            if self.leading:
                if not await self.lock.still_held():
                    log.warning("leader: lost the leader lock; timers, sealer and purge stop here")
                    await self._step_down()
                    with contextlib.suppress(Exception):
                        await self.lock.release()
            else:
                await self._try()

    async def _try(self) -> None:
        assert self.lock is not None
        try:
            got = await self.lock.try_acquire()
        except Exception as exc:
            if not self._failing:  # once per outage
                log.warning("leader: cannot try the leader lock (%s); trying again", exc)
            self._failing = True
            return
        self._failing = False
        if got:
            try:
                await self._lead()
            except Exception:
                log.exception("leader: the timers or the sealer did not start; giving the lock up")
                with contextlib.suppress(Exception):
                    await self.lock.release()

    async def _lead(self) -> None:
        log.info("leader: %s runs the timers, the sealer and the purge", holder_name())
        self.leading = True
        self._stack = contextlib.AsyncExitStack()
        try:
            await self.duties(self._stack)
        except BaseException:
            await self._step_down()
            raise

    async def _step_down(self) -> None:
        stack, self._stack = self._stack, None
        self.leading = False
        if stack is not None:
            await stack.aclose()
