"""Workers that claim jobs and run their stage; failures back off, then park (design.md invariant 4)."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import os
import socket
import time
from collections.abc import Sequence
from datetime import timedelta
from typing import Protocol

from sqlalchemy.orm import Session

from pecd.clock import Clock
from pecd.config import Config
from pecd.engine.effects import Effect, StoreLocal, Unavailable, relay_wake
from pecd.runtime import diskspace, observe
from pecd.runtime.logutil import RateLimitedLog
from pecd.runtime.stages import Outbox
from pecd.store import jobs
from pecd.store import webhooks as store_webhooks
from pecd.store.db import Database
from pecd.store.effects import Lease, apply, commit_plan, one_statement
from pecd.store.models import Job
from pecd.store.nodes import current
from pecd.store.pgfast import LeasesLost

log = logging.getLogger(__name__)
# Failures that repeat per job or per poll: a line now and then, the traceback once.
_failures = RateLimitedLog()


RENEWALS = 30  # a batch keeps its leases for at most ten lease periods more
# A job waiting on a local storage fault is tried again after a tenth of its age, within
# [base_delay_seconds, this]: soon after the fault clears, without a hot loop meanwhile.
STORAGE_WAIT_CAP_SECONDS = 60.0


class LeaseLost(Exception):
    """A job's lease expired before its stage committed."""


class JobRunner(Protocol):
    """What a pool needs to run jobs (:class:`~pecd.runtime.stages.StageRunner`, or a test's)."""

    cfg: Config
    clock: Clock
    db: Database
    wake: asyncio.Event
    relay_wake: asyncio.Event
    webhook_wake: asyncio.Event

    async def prepare(self, job: Job) -> list[Effect]: ...

    def outbox(self, worker: str) -> Outbox: ...

    async def flush(self, outbox: Outbox) -> None: ...


class WorkerPool:
    """``count`` tasks that claim jobs of ``kinds`` and run their stage until stopped."""

    def __init__(
        self,
        runner: JobRunner,
        kinds: Sequence[str],
        *,
        count: int,
        name: str,
        batch: int | None = None,
        max_attempts: int | None = None,
        lease_seconds: float | None = None,
        wake: asyncio.Event | None = None,
    ) -> None:
        q = runner.cfg.queue
        self.lease_seconds = lease_seconds or q.lease_seconds
        # Each pool has its own wake-up: waking the relay's many workers for every local
        # commit would send each of them to the database for nothing.
        self.wake = wake or runner.wake
        self.runner = runner
        self.kinds = list(kinds)
        self.count = count
        self.name = name
        self.batch = batch or q.batch
        self.max_attempts = max_attempts or q.max_attempts
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
        self.wake.set()
        # A stage finishing its transaction is allowed to complete: that is the drain. One
        # that takes longer (a relay waiting on a silent peer) is cancelled: it has not
        # committed, so its job runs again after a restart (every stage is idempotent). A
        # commit already running in the SQLite writer thread still completes.
        if not self._tasks:
            return
        _, late = await asyncio.wait(self._tasks, timeout=self.runner.cfg.queue.drain_seconds)
        for task in late:
            task.cancel()
        if late:
            log.warning("%s: %d workers cancelled after the drain time", self.name, len(late))
            await asyncio.gather(*late, return_exceptions=True)

    async def _wait_for_work(self) -> None:
        q = self.runner.cfg.queue
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self.wake.wait(), timeout=q.poll_seconds)
        self.wake.clear()

    async def _run(self, worker: str) -> None:
        q = self.runner.cfg.queue
        while not self._stopping.is_set():
            try:
                batch = await jobs.claim_batch(
                    self.runner.db,
                    kinds=self.kinds,
                    worker=worker,
                    now=self.runner.clock.now(),
                    lease=timedelta(seconds=self.lease_seconds),
                    limit=self.batch,
                )
            except Exception as exc:
                fault = diskspace.transient_cause(exc)
                if fault is not None:  # the database out of reach or full: an alert a minute
                    diskspace.ALERTS.fault(fault, f"claiming {self.name} jobs: {exc}")
                else:
                    _failures.failure(log, "claiming %s jobs failed; retrying", exc, self.name)
                await asyncio.sleep(q.poll_seconds)
                continue
            if not batch:
                await self._wait_for_work()
                continue
            renewal = asyncio.create_task(self._renew([job.id for job in batch], worker))
            try:
                await self._run_batch(worker, batch)
            except Exception as exc:
                # Never lose a worker task: the jobs of a batch that broke here are still
                # leased to us and run again once the lease expires.
                _failures.failure(
                    log, "a batch of %d jobs broke; their leases will expire", exc, len(batch)
                )
            finally:
                renewal.cancel()
            # Done with these jobs and their bytes: not kept while the next batch is claimed.
            del batch

    async def _renew(self, job_ids: list[int], worker: str) -> None:
        """Keep extending the leases of the jobs in hand while their stage runs (a relay to a
        slow peer may try several hosts, each up to its timeout): a lease that ran out would
        hand a job still being worked to another worker, which would do it a second time."""
        period = self.lease_seconds / 3
        # Not for ever: a stage stuck beyond this lets its jobs go to another worker.
        for _ in range(RENEWALS):
            await asyncio.sleep(period)
            until = self.runner.clock.now() + timedelta(seconds=self.lease_seconds)
            try:
                await self.runner.db.write(
                    functools.partial(
                        jobs.extend_leases, job_ids=job_ids, worker=worker, until=until
                    )
                )
            except Exception as exc:
                _failures.failure(log, "extending the leases of %d jobs failed", exc, len(job_ids))

    async def _run_batch(self, worker: str, batch: Sequence[Job]) -> None:
        """Prepare every job, then commit all their outputs and completions in one transaction.

        A job whose preparation fails is retried on its own. If the shared transaction fails,
        each job is committed alone, so one bad job never holds the others back."""
        t0 = time.perf_counter()
        # Prepared concurrently: their signing runs in the format processes meanwhile.
        results = await asyncio.gather(
            *(self.runner.prepare(job) for job in batch), return_exceptions=True
        )
        prepared: list[tuple[Job, list[Effect]]] = []
        for job, result in zip(batch, results, strict=True):
            if isinstance(result, Exception):
                await self._failed(job, result)
            elif isinstance(result, BaseException):
                raise result
            else:
                prepared.append((job, result))
        if not prepared:
            return
        outbox = self.runner.outbox(worker)
        try:
            await self._commit(prepared, outbox)
        except Exception as exc:
            _failures.failure(
                log,
                "a batch of %d jobs failed to commit; committing one by one",
                exc,
                len(prepared),
            )
            outbox = self.runner.outbox(worker)
            for job, effects in prepared:
                try:
                    await self._commit([(job, effects)], outbox)
                except Exception as exc:
                    await self._failed(job, exc)
        self.runner.wake.set()
        if outbox.relayed:
            self.runner.relay_wake.set()
        if outbox.webhooks:
            self.runner.webhook_wake.set()
        await self.runner.flush(outbox)
        if log.isEnabledFor(logging.DEBUG):  # its arguments read every job: only when logged
            log.debug(
                "%d jobs (%s) done in %.1f ms",
                len(prepared),
                ",".join(sorted({j.kind for j, _ in prepared})),
                (time.perf_counter() - t0) * 1000,
            )

    async def _commit(self, prepared: Sequence[tuple[Job, list[Effect]]], outbox: Outbox) -> None:
        ids = [job.id for job, _ in prepared]
        lease = Lease(outbox.worker, outbox.lease_until)
        db = self.runner.db
        if (db.pg is not None or db.sqlite_writer) and await self._commit_one_statement(
            prepared, outbox, ids, lease
        ):
            return

        webhooks = 0

        def commit(s: Session) -> list[StoreLocal]:
            nonlocal webhooks
            # Every job's effects at once: a few statements for the whole batch.
            applied = apply(s, [e for _job, effects in prepared for e in effects], lease)
            webhooks = applied.webhooks
            stored = applied.stored
            done = jobs.complete_many_sync(s, ids, worker=outbox.worker)
            if done != len(prepared):
                # A lease ran out while we worked: that job is another worker's now, and
                # what we made for it must not commit beside what that worker makes.
                raise LeaseLost(f"{len(prepared) - done} of {len(prepared)} leases lost")
            return stored

        # Only once committed are the messages durable, and so the outbox's to store.
        outbox.items += await self.runner.db.write(commit)
        if any(relay_wake(effects) for _job, effects in prepared):
            outbox.relayed = True
        if webhooks:
            outbox.webhooks = True

    async def _commit_one_statement(
        self,
        prepared: Sequence[tuple[Job, list[Effect]]],
        outbox: Outbox,
        ids: list[int],
        lease: Lease,
    ) -> bool:
        """The batch's commit from a plan of rows (:func:`one_statement`): on PostgreSQL one
        statement, one round trip (pecd.store.pgfast), on SQLite straight over sqlite3
        (pecd.store.sqlitefast). False when its effects need :func:`apply` instead."""
        db = self.runner.db
        pg = db.pg
        engine = db.engine.sync_engine
        known, generation = store_webhooks.known_mailboxes(engine)
        if known is None:
            if pg is not None:
                rows = await pg.fetch(store_webhooks.MAILBOXES_SQL)
            else:
                rows = await db.write_sqlite(
                    lambda conn: conn.execute(store_webhooks.MAILBOXES_SQL).fetchall()
                )
            known = frozenset(r[0] for r in rows)
            store_webhooks.remember_mailboxes(engine, generation, known)
        node = current(db)
        effects = [e for _job, effects in prepared for e in effects]
        plan = one_statement(effects, lease, node.id if node is not None else None, known)
        if plan is None:
            return False
        try:
            created = await commit_plan(db, plan, ids, outbox.worker)
        except LeasesLost as exc:
            raise LeaseLost(str(exc)) from exc
        # No session saw these events: the mail log and the metrics get the ones inserted.
        observe.committed(db, (row for row, req in plan.events if req is None or req in created))
        applied = plan.applied(created)
        # Only once committed are the messages durable, and so the outbox's to store.
        outbox.items += applied.stored
        if relay_wake(effects):
            outbox.relayed = True
        if applied.webhooks:
            outbox.webhooks = True
        return True

    async def _failed(self, job: Job, exc: Exception) -> None:
        q = self.runner.cfg.queue
        error = f"{type(exc).__name__}: {exc}"
        # A full or failing disk, a database out of reach: the machine's fault, not the job's.
        fault = diskspace.transient_cause(exc)
        waiting = fault is not None or isinstance(exc, Unavailable)
        base_delay = timedelta(seconds=q.base_delay_seconds)
        max_delay = timedelta(seconds=q.max_delay_seconds)
        if fault is not None:
            # One alert line per cause and minute, not one per job and retry.
            diskspace.ALERTS.fault(fault, f"job {job.id} ({job.kind} {job.key}): {error}")
            cap = min(max_delay, timedelta(seconds=STORAGE_WAIT_CAP_SECONDS))
            age = self.runner.clock.now() - job.created_at
            max_delay = max(cap, base_delay)
            base_delay = min(max(age / 10, base_delay), max_delay)
        elif waiting:
            # Not the job's fault: it waits, uncounted, and the reason shows in `pecd queue`.
            log.warning("job %s (%s %s) waits: %s", job.id, job.kind, job.key, error)
        else:
            # One line per kind of failure and interval (the error is in the job, for `pecd
            # queue`); the traceback the first time only.
            _failures.failure(log, "a %s job failed (job %s, %s)", exc, job.kind, job.id, job.key)
        try:
            async with self.runner.db.session() as s, s.begin():
                state = await jobs.retry_or_park(
                    s,
                    job.id,
                    error=error[:2000],
                    now=self.runner.clock.now(),
                    max_attempts=self.max_attempts,
                    base_delay=base_delay,
                    max_delay=max_delay,
                    worker=job.locked_by,
                    counted=not waiting,
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
        except Exception as record_exc:
            fault = diskspace.transient_cause(record_exc)
            if fault is not None:
                diskspace.ALERTS.fault(
                    fault, f"recording the failure of job {job.id}: {record_exc}"
                )
            else:
                _failures.failure(
                    log,
                    "could not record the failure of job %s; its lease will expire",
                    record_exc,
                    job.id,
                )
