"""Node death on PostgreSQL: the running jobs of a node whose heartbeat stopped are claimed by
another node within node_timeout, not after their whole lease; a live node's are not; a node
that comes back cannot complete what another took (pecd.store.nodes, pecd.store.jobs.claim)."""

from __future__ import annotations

import asyncio
import contextlib
import os
import time
from collections import Counter
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from sqlalchemy import select, text

from helpers import DOMAIN, AppThread, install, install_e2e, message, wait_for
from pecd.clock import SystemClock
from pecd.engine.effects import StoreLocal
from pecd.engine.vocab import IntakePayload, JobKind
from pecd.mailbox.maildir import Delivered, MaildirStore, Parcel
from pecd.pec.classify import classify
from pecd.runtime.formats import FormatWorkers
from pecd.runtime.identity import provider_identity
from pecd.runtime.stages import StageRunner, make_context
from pecd.store import jobs
from pecd.store.accounts import Accounts
from pecd.store.db import Database
from pecd.store.effects import Lease, apply
from pecd.store.models import Job, Node
from pecd.store.nodes import start_heartbeat
from store_fixtures import PG_ENV, fresh_postgres_database, migrated_postgres

pytestmark = pytest.mark.skipif(not os.environ.get(PG_ENV), reason=f"{PG_ENV} not set")

LEASE = timedelta(seconds=120)
BEAT = 0.2  # seconds
TIMEOUT = 1.0  # seconds: a node silent this long is dead
ALICE = f"alice@{DOMAIN}"


@pytest.fixture(scope="module", name="url")
def url_fixture() -> Iterator[str]:
    yield from migrated_postgres()


async def _clean(db: Database) -> None:
    async with db.session() as s, s.begin():
        await s.execute(text("DELETE FROM jobs"))
        await s.execute(text("DELETE FROM nodes"))


async def _add(db: Database, n: int, *, now: datetime, worker: str | None = None) -> None:
    async with db.session() as s, s.begin():
        for i in range(n):
            await s.run_sync(
                jobs.enqueue_sync,
                kind="delivery",
                key=f"job-{i}",
                payload={},
                now=now,
                lease_to=worker,
                lease_until=now + LEASE if worker else None,
            )


async def _complete(db: Database, ids: list[int], worker: str) -> int:
    return await db.write(lambda s: jobs.complete_many_sync(s, ids, worker=worker))


async def _jobs(db: Database) -> list[Job]:
    async with db.read_session() as s:
        return list((await s.scalars(select(Job).order_by(Job.id))).all())


def test_a_dead_nodes_jobs_are_taken_over_at_once(url: str) -> None:
    """A node row whose heartbeat is a minute old, holding leases valid for two more minutes:
    a live node claims its jobs at once, and the dead node's worker cannot complete them."""

    async def main() -> None:
        db = await Database.open(url)
        try:
            await _clean(db)
            now = datetime.now(UTC)
            async with db.session() as s, s.begin():
                await s.execute(
                    text(
                        "INSERT INTO nodes (id, hostname, pid, started_at, heartbeat_at) VALUES "
                        "('dead', 'gone', 1, now() - interval '1 hour', now() - interval '60 s')"
                    )
                )
            await _add(db, 3, now=now)
            claimed = await jobs.claim_batch(
                db, kinds=["delivery"], worker="gone:1:w0", now=now, lease=LEASE, limit=10
            )
            assert len(claimed) == 3
            # What the dead node held: leased by it, the lease far from over.
            async with db.session() as s, s.begin():
                await s.execute(text("UPDATE jobs SET leased_by = 'dead'"))
            async with contextlib.AsyncExitStack() as stack:
                hb = await start_heartbeat(db, stack, every=BEAT, timeout=TIMEOUT)
                assert hb is not None
                t0 = time.monotonic()
                taken = await jobs.claim_batch(
                    db, kinds=["delivery"], worker="live:2:w0", now=now, lease=LEASE, limit=10
                )
                assert time.monotonic() - t0 < TIMEOUT
                assert sorted(j.id for j in taken) == sorted(j.id for j in claimed)
                assert {j.leased_by for j in taken} == {hb.node.id}
                ids = [j.id for j in taken]
                # The dead node comes back: its lease is gone, its work does not commit.
                assert await _complete(db, ids, "gone:1:w0") == 0
                assert await _complete(db, ids, "live:2:w0") == 3
                assert [(j.state, j.attempts) for j in await _jobs(db)] == [("done", 2)] * 3
            async with db.read_session() as s:  # a clean stop deletes the node's row
                assert (await s.scalars(select(Node.id))).all() == ["dead"]
        finally:
            await db.close()

    asyncio.run(main())


def test_live_leases_are_kept_and_a_silent_node_loses_them(url: str) -> None:
    """Two nodes (two Database objects, as two processes): B steals nothing from A while A
    beats; once A falls silent B takes A's jobs within the node timeout, exactly once; and
    the jobs A made leased to itself (enqueue with lease_to) go the same way."""

    async def main() -> None:
        a = await Database.open(url)
        b = await Database.open(url)
        try:
            await _clean(a)
            now = datetime.now(UTC)
            async with contextlib.AsyncExitStack() as stack:
                hb_a = await start_heartbeat(a, stack, every=BEAT, timeout=TIMEOUT)
                hb_b = await start_heartbeat(b, stack, every=BEAT, timeout=TIMEOUT)
                assert hb_a is not None and hb_b is not None
                await _add(a, 2, now=now)
                held = await jobs.claim_batch(
                    a, kinds=["delivery"], worker="a:1:w0", now=now, lease=LEASE, limit=10
                )
                assert {j.leased_by for j in held} == {hb_a.node.id}
                async with a.session() as s, s.begin():  # born running, leased to A's worker
                    await s.run_sync(
                        jobs.enqueue_sync,
                        kind="delivery",
                        key="made",
                        payload={},
                        now=now,
                        lease_to="a:1:w0",
                        lease_until=now + LEASE,
                    )
                # A is alive for three timeouts: B gets nothing.
                deadline = time.monotonic() + 3 * TIMEOUT
                while time.monotonic() < deadline:
                    assert not await jobs.claim_batch(
                        b, kinds=["delivery"], worker="b:2:w0", now=now, lease=LEASE, limit=10
                    )
                    await asyncio.sleep(BEAT)
                # A freezes: its heartbeat stops, its row stays.
                hb_a.task.cancel()
                silent = time.monotonic()
                taken: list[Job] = []
                while len(taken) < 3 and time.monotonic() - silent < 5 * TIMEOUT:
                    taken += await jobs.claim_batch(
                        b, kinds=["delivery"], worker="b:2:w0", now=now, lease=LEASE, limit=10
                    )
                    await asyncio.sleep(0.05)
                waited = time.monotonic() - silent
                assert len(taken) == 3, waited
                assert TIMEOUT * 0.5 <= waited <= TIMEOUT + 4 * BEAT + 1, waited
                assert {j.leased_by for j in taken} == {hb_b.node.id}
                ids = [j.id for j in taken]
                assert len(set(ids)) == 3  # exactly once
                # A wakes up: nothing of what it held completes under its lease.
                assert await _complete(a, ids, "a:1:w0") == 0
                assert await _complete(b, ids, "b:2:w0") == 3
                assert [j.state for j in await _jobs(a)] == ["done"] * 3
        finally:
            await a.close()
            await b.close()

    asyncio.run(main())


def test_a_stalled_node_resuming_does_not_store_a_receipt_twice(url: str, tmp_path: Path) -> None:
    """A commits a receipt as a store job leased to its worker for two minutes, then stalls
    before storing it: B takes the job once A's heartbeat is a node timeout old and stores it;
    an IMAP server moves it to cur/. A resumes with most of its lease left and stores its
    outbox: it must look for the copy already there (not deliver fresh), so the mailbox holds
    one copy."""

    async def main() -> None:
        queue = f"\n[queue]\nlease_seconds = 120\nheartbeat_seconds = {BEAT}\n"
        cfg = await install(
            tmp_path / "inst", url, extra_config=f"{queue}node_timeout_seconds = {TIMEOUT}\n"
        )
        a = await Database.open(url)
        b = await Database.open(url)
        try:
            await _clean(a)
            provider = provider_identity(cfg)
            store = MaildirStore(cfg.maildir_root)
            async with contextlib.AsyncExitStack() as stack:
                hb_a = await start_heartbeat(a, stack, every=BEAT, timeout=TIMEOUT)
                hb_b = await start_heartbeat(b, stack, every=BEAT, timeout=TIMEOUT)
                assert hb_a is not None and hb_b is not None
                formats = FormatWorkers(cfg, provider, processes=0, maildir=store)
                await formats.start(stack)
                runner = StageRunner(
                    cfg=cfg,
                    clock=SystemClock(),
                    ctx=make_context(cfg, provider, None),
                    db=a,
                    accounts=Accounts(a),
                    formats=formats,
                )
                # A's worker commits, as WorkerPool does: the outbox first, then the commit.
                outbox = runner.outbox("a:1:w0")
                assert outbox.node == hb_a.node and outbox.beat is not None
                receipt = StoreLocal(
                    "ricevuta:r1:alice",
                    ALICE,
                    b"Subject: ricevuta\r\n\r\nr1\r\n",
                    None,
                    datetime.now(UTC),
                    unique=True,
                )
                lease = Lease(outbox.worker, outbox.lease_until)
                applied = await a.write(lambda s: apply(s, [receipt], lease))
                outbox.items += applied.stored
                assert outbox.items == [receipt]
                # A stalls: no heartbeat; B takes the job within the node timeout.
                hb_a.task.cancel()
                silent = time.monotonic()
                taken: list[Job] = []
                while not taken and time.monotonic() - silent < 5 * TIMEOUT:
                    await asyncio.sleep(0.05)
                    taken = await jobs.claim_batch(
                        b,
                        kinds=[JobKind.STORE],
                        worker="b:2:w0",
                        now=datetime.now(UTC),
                        lease=LEASE,
                        limit=10,
                    )
                assert [j.key for j in taken] == [receipt.key]
                # B stores it (a claimed job: not fresh), completes it; Dovecot moves it.
                [stored] = store.deliver_many([Parcel(ALICE, receipt.key, receipt.data)])
                assert isinstance(stored, Delivered)
                assert (
                    await b.write(lambda s: jobs.complete_leased(s, [receipt.key], "b:2:w0")) == 1
                )
                folder = store.folder_path(ALICE)
                for name in os.listdir(folder / "new"):
                    os.rename(folder / "new" / name, folder / "cur" / f"{name}:2,S")
                # A resumes, its lease far from over, and stores its outbox.
                assert (outbox.lease_until - datetime.now(UTC)).total_seconds() > 60
                await runner.flush(outbox)
                copies = store.list_folder(ALICE)
                assert len(copies) == 1, copies
                assert [j.state for j in await _jobs(a)] == ["done"]
        finally:
            await a.close()
            await b.close()

    asyncio.run(main())


@pytest.mark.slow
def test_a_running_app_finishes_a_dead_nodes_message_once(tmp_path: Path) -> None:
    """A node took a submission in and died holding its lease (two minutes left): a running
    pecd does the whole message within its node timeout, every receipt exactly once; its own
    node row is there while it runs and gone after a clean stop."""
    url, drop = fresh_postgres_database()
    try:
        queue = "heartbeat_seconds = 0.5\nnode_timeout_seconds = 1.5\nlease_seconds = 120\n"
        cfg = asyncio.run(install_e2e(tmp_path / "inst", url, queue=queue))
        alice, bob, carol = (f"{u}@{DOMAIN}" for u in ("alice", "bob", "carol"))

        async def plant() -> None:
            db = await Database.open(cfg.database_url)
            try:
                now = datetime.now(UTC)
                payload = IntakePayload(
                    mail_from=alice, rcpt_to=(bob, carol), received_at=now, user=alice
                )
                async with db.session() as s, s.begin():
                    await s.execute(
                        text(
                            "INSERT INTO nodes (id, hostname, pid, started_at, heartbeat_at) "
                            "VALUES ('dead', 'gone', 1, now(), now() - interval '30 s')"
                        )
                    )
                    await s.run_sync(
                        jobs.enqueue_sync,
                        kind=JobKind.SUBMISSION,
                        key="dead-node-submission",
                        payload=payload.to_json(),
                        data=message(alice, [bob], [carol], "node death"),
                        now=now,
                        lease_to="gone:1:pipeline0",
                        lease_until=now + LEASE,
                    )
                    await s.execute(text("UPDATE jobs SET leased_by = 'dead'"))
            finally:
                await db.close()

        asyncio.run(plant())
        store = MaildirStore(cfg.maildir_root)

        def tally() -> Counter[str]:
            seen: Counter[str] = Counter()
            for user in (alice, bob, carol):
                for path in store.list_folder(user):
                    c = classify(path.read_bytes())
                    assert c.daticert is not None
                    what = c.ricevuta.value if c.ricevuta is not None else "envelope"
                    seen[f"{user} {what}:{c.daticert.consegna or ''}"] += 1
            return seen

        want = {
            f"{alice} accettazione:": 1,
            f"{alice} avvenuta-consegna:{bob}": 1,
            f"{alice} avvenuta-consegna:{carol}": 1,
            f"{bob} envelope:": 1,
            f"{carol} envelope:": 1,
        }
        app = AppThread(cfg).start()
        try:
            t0 = time.monotonic()
            wait_for(lambda: len(tally()) >= len(want), 10, "every receipt of the dead node's mail")
            took = time.monotonic() - t0
            assert took < 8, took  # node timeout, not the two-minute lease
            time.sleep(0.5)  # nothing more comes
            assert dict(tally()) == want, tally()

            async def node_ids() -> list[str]:
                db = await Database.open(cfg.database_url)
                try:
                    async with db.read_session() as s:
                        return list((await s.scalars(select(Node.id).order_by(Node.id))).all())
                finally:
                    await db.close()

            ids = asyncio.run(node_ids())
            assert len(ids) == 2 and "dead" in ids, ids
        finally:
            app.stop()
        assert asyncio.run(node_ids()) == ["dead"]
    finally:
        drop()
