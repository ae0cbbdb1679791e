"""Pipeline workers: a stage that runs longer than a lease keeps its job."""

from __future__ import annotations

import asyncio
import contextlib
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from helpers import DOMAIN, install
from pecd.clock import Clock, SystemClock
from pecd.config import Config
from pecd.engine.effects import Effect, StoreLocal
from pecd.mailbox.maildir import MaildirStore
from pecd.runtime.formats import FormatWorkers
from pecd.runtime.identity import provider_identity
from pecd.runtime.stages import Outbox, StageRunner, make_context, may_be_fresh
from pecd.runtime.workers import WorkerPool
from pecd.store import jobs
from pecd.store.accounts import Accounts
from pecd.store.db import Database
from pecd.store.models import Job
from pecd.store.nodes import NodeLease


@dataclass
class SlowRunner:
    """A job runner whose every stage takes 2.5 s and has no effect."""

    cfg: Config
    db: Database
    clock: Clock = field(default_factory=SystemClock)
    wake: asyncio.Event = field(default_factory=asyncio.Event)
    relay_wake: asyncio.Event = field(default_factory=asyncio.Event)
    runs: list[str] = field(default_factory=list)

    async def prepare(self, job: Job) -> list[Effect]:
        self.runs.append(job.locked_by or "")
        await asyncio.sleep(2.5)  # the stage under test: longer than two lease periods
        return []

    def outbox(self, worker: str) -> Outbox:
        return Outbox(worker, self.clock.now() + timedelta(seconds=self.cfg.queue.lease_seconds))

    async def flush(self, outbox: Outbox) -> None:
        return None


def test_a_long_stage_keeps_its_lease(tmp_path: Path) -> None:
    """With a 1 s lease and a 2.5 s stage, a second worker polling all along never gets the
    job: the lease is renewed while the stage runs, and the job is done once."""
    runs: list[str] = []

    async def scenario() -> str:
        cfg = await install(
            tmp_path / "inst",
            None,
            extra_config="\n[queue]\nlease_seconds = 1\npoll_seconds = 0.1\n",
        )
        db = await Database.open(cfg.database_url)
        try:
            runner = SlowRunner(cfg, db, runs=runs)

            await db.write(
                lambda s: jobs.enqueue_sync(
                    s, kind="slow", key="k", payload={}, now=datetime.now(UTC)
                )
            )
            async with contextlib.AsyncExitStack() as stack:
                for name in ("a", "b"):
                    pool = WorkerPool(runner, ["slow"], count=1, name=name)
                    await pool.start(stack)
                for _ in range(100):
                    async with db.read_session() as s:
                        job = await jobs.get_job(s, 1)
                    if job is not None and job.state == jobs.DONE:
                        break
                    await asyncio.sleep(0.1)  # the poll of a wait for DONE, 10 s at most
                # Stays: no event marks "nobody took it", so two more lease periods must pass.
                await asyncio.sleep(1.5)
            assert job is not None
            return job.state
        finally:
            await db.close()

    assert asyncio.run(scenario()) == jobs.DONE
    assert len(runs) == 1, runs


def test_an_outbox_is_delivered_fresh_only_while_nobody_else_can_have_its_jobs() -> None:
    """Fresh (no search for an earlier copy) only with more than half the lease left and, on a
    node with a heartbeat, a heartbeat written before the commit less than half a node timeout
    ago: after a longer silence another node may have taken and stored the jobs."""
    now = datetime(2026, 3, 1, 9, 0, tzinfo=UTC)
    node = NodeLease("n1", timedelta(seconds=15))

    def fresh(
        *,
        left: float = 100,
        made: NodeLease | None = node,
        beat: float | None = 1000.0,
        at: float = 1001.0,
        current: NodeLease | None = node,
    ) -> bool:
        outbox = Outbox("w", now + timedelta(seconds=left), node=made, beat=beat)
        return may_be_fresh(outbox, now=now, lease_seconds=120, node=current, beat_clock=at)

    assert fresh()
    assert fresh(at=1007.4)  # the beat 7.4 s old: under half the node timeout
    assert not fresh(at=1007.5)  # a stall: the node's jobs may be free soon, or were
    assert not fresh(at=1060.0)
    assert not fresh(left=60)  # half the lease used: another worker may have begun
    assert not fresh(beat=None)  # no heartbeat written yet
    # The node changed since the outbox was made (a heartbeat started or stopped).
    assert not fresh(made=None, beat=None)
    assert not fresh(current=None)
    assert not fresh(current=NodeLease("n2", timedelta(seconds=15)))
    # No heartbeat at all (SQLite, one node): only the lease's end frees the jobs.
    assert fresh(made=None, beat=None, current=None, at=1e9)
    assert not fresh(made=None, beat=None, current=None, left=10)


def test_an_outbox_of_fresh_and_other_messages_is_stored_in_one_format_call(
    tmp_path: Path,
) -> None:
    """A store flush's fresh and not fresh deliveries go to the format workers together (one
    call, one Maildir flush), and both are stored."""

    async def scenario() -> None:
        cfg = await install(tmp_path / "inst", None)
        db = await Database.open(cfg.database_url)
        try:
            async with contextlib.AsyncExitStack() as stack:
                provider = provider_identity(cfg)
                formats = FormatWorkers(cfg, provider, processes=1)
                await formats.start(stack)
                calls: list[str] = []
                run = formats._run

                async def counted(fn: Any, *args: Any) -> Any:
                    calls.append(fn.__name__)
                    return await run(fn, *args)

                formats._run = counted  # type: ignore[method-assign]
                runner = StageRunner(
                    cfg=cfg,
                    clock=SystemClock(),
                    ctx=make_context(cfg, provider, None),
                    db=db,
                    accounts=Accounts(db),
                    formats=formats,
                )
                outbox = runner.outbox("w")
                now = datetime.now(UTC)
                alice, bob = f"alice@{DOMAIN}", f"bob@{DOMAIN}"
                outbox.items += [
                    StoreLocal("k:1", alice, b"Subject: 1\r\n\r\none\r\n", None, now, unique=True),
                    StoreLocal("k:2", bob, b"Subject: 2\r\n\r\ntwo\r\n", None, now),
                ]
                await runner.flush(outbox)
                assert calls == ["_deliver_groups"]
                store = MaildirStore(cfg.maildir_root)
                assert [len(store.list_folder(a)) for a in (alice, bob)] == [1, 1]
        finally:
            await db.close()

    asyncio.run(scenario())
