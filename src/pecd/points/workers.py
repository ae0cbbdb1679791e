"""Workers that claim jobs and run their stage; failures back off, then park (design.md invariant 4)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
from collections.abc import Awaitable, Callable, Sequence
from datetime import timedelta

from pecd.points.pipeline import Services
from pecd.store import jobs
from pecd.store.models import Job

log = logging.getLogger(__name__)

Stage = Callable[[Services, Job], Awaitable[None]]


class WorkerPool:
    """``count`` tasks that claim jobs of ``stages``' kinds until stopped."""

    def __init__(self, svc: Services, stages: dict[str, Stage], *, count: int, name: str) -> None:
        self.svc = svc
        self.stages = stages
        self.count = count
        self.name = name
        self._tasks: list[asyncio.Task[None]] = []
        self._stopping = asyncio.Event()
        self.node = f"{socket.gethostname()}:{os.getpid()}"

    async def start(self, stack: contextlib.AsyncExitStack) -> None:
        self._tasks = [
            asyncio.create_task(self._run(f"{self.node}:{self.name}{i}"), name=f"{self.name}{i}")
            for i in range(self.count)
        ]
        stack.push_async_callback(self.stop)

    async def stop(self) -> None:
        self._stopping.set()
        self.svc.wake.set()
        # A stage finishing its transaction is allowed to complete: that is the drain.
        await asyncio.gather(*self._tasks, return_exceptions=True)

    async def _wait_for_work(self) -> None:
        q = self.svc.cfg.queue
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self.svc.wake.wait(), timeout=q.poll_seconds)
        self.svc.wake.clear()

    async def _run(self, worker: str) -> None:
        q = self.svc.cfg.queue
        kinds: Sequence[str] = list(self.stages)
        while not self._stopping.is_set():
            try:
                job = await jobs.claim(
                    self.svc.db,
                    kinds=kinds,
                    worker=worker,
                    now=self.svc.clock.now(),
                    lease=timedelta(seconds=q.lease_seconds),
                )
            except Exception:
                log.exception("claiming a job failed; retrying")
                await asyncio.sleep(q.poll_seconds)
                continue
            if job is None:
                await self._wait_for_work()
                continue
            try:
                await self.stages[job.kind](self.svc, job)
            except Exception as exc:
                await self._failed(job, exc)

    async def _failed(self, job: Job, exc: Exception) -> None:
        q = self.svc.cfg.queue
        error = f"{type(exc).__name__}: {exc}"
        log.warning("job %s (%s %s) failed: %s", job.id, job.kind, job.key, error, exc_info=exc)
        try:
            async with self.svc.db.session() as s, s.begin():
                state = await jobs.retry_or_park(
                    s,
                    job.id,
                    error=error[:2000],
                    now=self.svc.clock.now(),
                    max_attempts=q.max_attempts,
                    base_delay=timedelta(seconds=q.base_delay_seconds),
                    max_delay=timedelta(seconds=q.max_delay_seconds),
                )
            if state == "parked":
                log.error(
                    "job %s (%s %s) parked after %s attempts: %s",
                    job.id,
                    job.kind,
                    job.key,
                    job.attempts,
                    error,
                )
        except Exception:
            log.exception("could not record the failure of job %s; its lease will expire", job.id)
