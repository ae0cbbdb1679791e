"""Runs the engine's stages: reads a job into its typed payload, drives the stage's generator by
carrying out each command it yields (the format worker processes, the accounts, the trace log, the
relay client), and hands back the effects for the worker to commit. No PEC decision is made here.

After the commit, the messages for local mailboxes that the batch made are stored at once by the
worker that committed them (:class:`Outbox`, :func:`flush`).
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import select

from pecd.antivirus.scanner import NullScanner, Scanner
from pecd.clock import Clock, FixedClock, SystemClock
from pecd.config import Config
from pecd.engine.context import Context, ProviderIndex, Rules
from pecd.engine.delivery import delivery, store
from pecd.engine.effects import (
    Build,
    Classify,
    Command,
    Deliver,
    Delivery,
    Effect,
    History,
    Logged,
    LookUpMailboxes,
    MailboxState,
    Scan,
    Send,
    Stage,
    StoreLocal,
    TakeInCharge,
)
from pecd.engine.reception import reception
from pecd.engine.relay import relay
from pecd.engine.submission import submission
from pecd.engine.vocab import (
    DeliveryPayload,
    IntakePayload,
    JobKind,
    RelayPayload,
    Stored,
    StorePayload,
)
from pecd.pec.builders import ProviderIdentity
from pecd.pec.checks import SubmissionLimits
from pecd.runtime import diskspace, metrics
from pecd.runtime.formats import FormatWorkers
from pecd.runtime.logutil import RateLimitedLog
from pecd.runtime.relay import RelayClient
from pecd.store import jobs, nodes, sqlitefast
from pecd.store.accounts import Accounts
from pecd.store.db import Database
from pecd.store.models import Job, TraceEvent
from pecd.web import webhooks

log = logging.getLogger(__name__)
# A failure that repeats for every batch (a format worker gone, a fault): a line now and then.
_failures = RateLimitedLog()

MAILBOX_TTL = 2.0  # seconds an account read is reused by deliveries


def make_context(cfg: Config, provider: ProviderIdentity, index: ProviderIndex | None) -> Context:
    """The engine's view of this provider, from the config."""
    return Context(
        provider=provider,
        local_domains=frozenset(cfg.provider.local_domains),
        mail_receipt=cfg.provider.mail_receipt,
        index=index,
        rules=Rules(
            limits=SubmissionLimits(
                max_size=cfg.limits.max_message_size,
                max_recipients=cfg.limits.max_recipients,
                max_recipients_times_size=cfg.limits.max_recipients_times_size,
            ),
            max_attempts=cfg.queue.max_attempts,
            relay_expire_hours=cfg.relay.expire_hours,
            base_delay_seconds=cfg.queue.base_delay_seconds,
            max_delay_seconds=cfg.queue.max_delay_seconds,
            first_hours=cfg.timers.first_hours,
            final_hours=cfg.timers.final_hours,
        ),
    )


@dataclass
class Outbox:
    """Messages for local mailboxes that a commit made durable as store jobs leased to the worker
    that committed them, stored right after the commit (:func:`flush`)."""

    worker: str
    lease_until: datetime
    items: list[StoreLocal] = field(default_factory=list)
    relayed: bool = False  # the commit queued work for the relay: wake its workers
    webhooks: bool = False  # the commit queued webhook events: wake their workers
    # This process's node on the database when the outbox was made (before the commit), and
    # when its last heartbeat written by then began (nodes.last_beat): see may_be_fresh.
    node: nodes.NodeLease | None = None
    beat: float | None = None


def may_be_fresh(
    outbox: Outbox,
    *,
    now: datetime,
    lease_seconds: float,
    node: nodes.NodeLease | None,
    beat_clock: float,
) -> bool:
    """Whether the outbox's store jobs, created leased to its worker by the commit, can have
    been nobody else's until now (``now``: the clock's time; ``node``: this process's node
    now; ``beat_clock``: :func:`pecd.store.nodes.beat_clock` now), with time to spare for the
    deliveries: then no earlier copy of them can be in a folder.

    Another worker may claim them once their lease ends, so half of it must be left; and, on
    PostgreSQL, another node may claim them once this node has not beaten for its node timeout
    (a stall of the process or its connection), however long the lease: so this node's last
    heartbeat written before the commit must be less than half a node timeout old. A node that
    stopped and started beating since (or the other way round) gives no such guarantee. Without
    a heartbeat (SQLite, one node; a process that runs no node) only the lease's end frees
    them."""
    if (outbox.lease_until - now).total_seconds() <= lease_seconds / 2:
        return False
    if node != outbox.node:
        return False
    if node is None:
        return True
    if outbox.beat is None:
        return False
    return beat_clock - outbox.beat < node.timeout.total_seconds() / 2


@dataclass
class StageRunner:
    """What the stages need from the world, and the one place that drives them."""

    cfg: Config
    clock: Clock
    ctx: Context
    db: Database
    accounts: Accounts
    formats: FormatWorkers
    relay: RelayClient | None = None
    scanner: Scanner = field(default_factory=NullScanner)
    wake: asyncio.Event = field(default_factory=asyncio.Event)
    relay_wake: asyncio.Event = field(default_factory=asyncio.Event)
    webhook_wake: asyncio.Event = field(default_factory=asyncio.Event)
    _mailboxes: dict[str, tuple[float, MailboxState | None]] = field(default_factory=dict)
    _lookups: dict[str, asyncio.Future[MailboxState | None]] = field(default_factory=dict)

    def outbox(self, worker: str) -> Outbox:
        """An outbox for the commit about to be made by ``worker`` (made before it: see
        :func:`may_be_fresh`)."""
        lease = timedelta(seconds=self.cfg.queue.lease_seconds)
        node = nodes.current(self.db)
        return Outbox(
            worker=worker,
            lease_until=self.clock.now() + lease,
            node=node,
            beat=None if node is None else nodes.last_beat(node),
        )

    # --- one job -------------------------------------------------------------------------------

    def stage(self, job: Job) -> Stage:
        """The engine's stage for ``job``, over its typed payload."""
        kind, p, data, ctx = JobKind(job.kind), job.payload, job.data or b"", self.ctx
        if kind is JobKind.SUBMISSION:
            return submission(ctx, job.key, IntakePayload.from_json(p), data, self.clock.now())
        if kind is JobKind.RECEPTION:
            return reception(ctx, job.key, IntakePayload.from_json(p), data, self.clock.now())
        if kind is JobKind.DELIVERY:
            return delivery(
                ctx,
                job.key,
                DeliveryPayload.from_json(p),
                data,
                attempts=job.attempts,
                now=self.clock.now(),
            )
        if kind is JobKind.STORE:
            return store(job.key, StorePayload.from_json(p), data)
        return relay(
            ctx,
            job.key,
            RelayPayload.from_json(p),
            data,
            created_at=job.created_at,
            now=self.clock.now(),
        )

    async def prepare(self, job: Job) -> list[Effect]:
        kind = job.kind  # an ORM attribute: each read goes through its descriptor
        if kind == JobKind.WEBHOOK:
            # Not a PEC stage: one POST, which raises for the queue to retry.
            await webhooks.deliver(self.cfg, self.db, job.payload, self.clock.now())
            return []
        t0 = metrics.clock()
        effects = await self.drive(self.stage(job))
        metrics.stage_done(kind, t0, job.created_at, self.clock.now())  # latency histograms
        return effects

    async def drive(self, stage: Stage) -> list[Effect]:
        """Run ``stage`` to its end: each command it yields is carried out and its answer sent
        back in (a failure is thrown back in, where the stage may handle it)."""
        try:
            command = next(stage)
            while True:
                try:
                    answer = await self.execute(command)
                except Exception as exc:
                    command = stage.throw(exc)
                else:
                    command = stage.send(answer)
        except StopIteration as done:
            effects: list[Effect] = done.value
            return effects
        finally:
            stage.close()

    async def execute(self, command: Command) -> Any:
        if isinstance(command, Build):
            return await self.formats.build_many(command.calls)
        if isinstance(command, Classify):
            return await self.formats.classify(command.raw)
        if isinstance(command, LookUpMailboxes):
            return {a: await self.mailbox(a) for a in command.addresses}
        if isinstance(command, TakeInCharge):
            # The receipts' time is read after the deliveries, in the worker: the system clock
            # goes there as it is, an injected one as a fixed copy of its time now.
            clock = (
                self.clock if isinstance(self.clock, SystemClock) else FixedClock(self.clock.now())
            )
            return await self.formats.take_in_charge(command, clock)
        if isinstance(command, Deliver):
            return await self.formats.deliver_many(command.items)
        if isinstance(command, History):
            return await self.history(command.pec_msgid, command.types)
        if isinstance(command, Scan):
            return await self.scanner.scan(command.data)
        if isinstance(command, Send):
            if self.relay is None:
                raise RuntimeError("this node has no relay client")
            return await self.relay.send(
                command.domain, command.mail_from, list(command.recipients), command.data
            )
        raise TypeError(f"unknown command {command!r}")

    async def mailbox(self, address: str) -> MailboxState | None:
        """The account of a local mailbox, read at most every MAILBOX_TTL seconds: deliveries
        look every recipient up, and a mailbox disabled or resized is seen within that time."""
        now = asyncio.get_running_loop().time()
        hit = self._mailboxes.get(address)
        if hit is not None and now - hit[0] < MAILBOX_TTL:
            return hit[1]
        # The stages of a batch run at once and often name the same mailbox: one read for all.
        pending = self._lookups.get(address)
        if pending is None:
            pending = asyncio.ensure_future(self._look_up(address, now))
            self._lookups[address] = pending
            pending.add_done_callback(lambda _done: self._lookups.pop(address, None))
        return await asyncio.shield(pending)

    async def _look_up(self, address: str, now: float) -> MailboxState | None:
        found = await self.accounts.state(address)
        state = None if found is None else MailboxState(*found)
        if len(self._mailboxes) > 10_000:
            self._mailboxes.clear()
        self._mailboxes[address] = (now, state)
        return state

    async def history(self, pec_msgid: str, types: tuple[str, ...]) -> tuple[Logged, ...]:
        """The trace log's events of ``types`` about transmission ``pec_msgid``, oldest first."""
        async with self.db.read_session() as s:
            rows = (
                await s.execute(
                    select(
                        TraceEvent.event, TraceEvent.sender, TraceEvent.recipients, TraceEvent.data
                    )
                    .where(TraceEvent.pec_msgid == pec_msgid, TraceEvent.event.in_(types))
                    .order_by(TraceEvent.id)
                    .limit(1000)
                )
            ).all()
        return tuple(
            Logged(
                event,
                sender,
                tuple(str(r.get("address", "")) for r in recipients or () if isinstance(r, dict)),
                data or {},
            )
            for event, sender, recipients, data in rows
        )

    # --- after the commit ------------------------------------------------------------------------

    async def _give_back(self, outbox: Outbox, error: str) -> None:
        """The outbox's store jobs due again soon, not when their lease ends (they are born
        leased, uncounted: never parked for a full disk)."""
        now = self.clock.now()
        run_at = now + timedelta(seconds=self.cfg.queue.base_delay_seconds)
        keys = [i.key for i in outbox.items]
        try:
            await self.db.write(
                lambda s: jobs.release_leased(
                    s, keys, outbox.worker, error=error[:2000], now=now, run_at=run_at
                )
            )
        except Exception:
            log.debug("giving back %d store jobs failed; their leases will end", len(keys))

    async def flush(self, outbox: Outbox) -> None:
        """Store the outbox's committed messages now and complete their jobs in one
        transaction. Whatever fails keeps its job, which runs again when its lease ends."""
        if not outbox.items:
            return
        try:
            # Each store job was created by the transaction just committed and is still leased to
            # us, so nobody delivered it yet, unless the lease or this node's heartbeat may have
            # lapsed since (may_be_fresh); if its key is also unique for good (no later job can
            # carry it again), there is no earlier copy to search the folder for (fresh): the
            # service mailbox, which gets every presa in carico and is never read, is not read on
            # each delivery.
            fresh_ok = may_be_fresh(
                outbox,
                now=self.clock.now(),
                lease_seconds=self.cfg.queue.lease_seconds,
                node=nodes.current(self.db),
                beat_clock=nodes.beat_clock(),
            )
            groups: dict[bool, list[StoreLocal]] = {}
            for item in outbox.items:
                groups.setdefault(fresh_ok and item.unique, []).append(item)

            async def deliver(fresh: bool, items: list[StoreLocal]) -> list[str]:
                outcomes = await self.formats.deliver_many(
                    [Delivery(i.mailbox, i.key, i.data, None) for i in items], fresh=fresh
                )
                return [
                    i.key
                    for i, o in zip(items, outcomes, strict=True)
                    if o.stored is Stored.DELIVERED
                ]

            # Both groups at once: the format workers take them in one call. Both are over
            # before anything is decided (a failure gives back the whole outbox, and nothing of
            # it may still be under way then).
            done = await asyncio.gather(
                *(deliver(fresh, items) for fresh, items in groups.items()),
                return_exceptions=True,
            )
            keys = []
            for result in done:
                if isinstance(result, BaseException):
                    raise result
                keys += result
            if self.db.pg is not None:  # one round trip
                await self.db.pg.complete_leased(keys, outbox.worker)
            elif self.db.sqlite_writer:
                await self.db.write_sqlite(
                    lambda conn: sqlitefast.complete_leased(conn, keys, outbox.worker)
                )
            else:
                await self.db.write(lambda s: jobs.complete_leased(s, keys, outbox.worker))
        except Exception as exc:
            fault = diskspace.transient_cause(exc)
            if fault is not None:  # a full or failing disk: one alert a minute, not a trace each
                diskspace.ALERTS.fault(fault, f"storing {len(outbox.items)} messages: {exc}")
                await self._give_back(outbox, f"{type(exc).__name__}: {exc}")
                return
            _failures.failure(
                log, "storing %d messages failed; retried later", exc, len(outbox.items)
            )
