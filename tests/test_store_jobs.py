"""pecd.store.jobs: idempotent enqueue, exclusive claims, leases, backoff, parking."""

from __future__ import annotations

import asyncio
from collections import Counter
from datetime import UTC, datetime, timedelta

import pytest
from hypothesis import given
from hypothesis import strategies as st

from pecd.store import jobs
from pecd.store.db import Database
from pecd.store.models import Job
from store_fixtures import (  # noqa: F401 (fixtures)
    Backend,
    db_fixture,
    pg_url_fixture,
    sqlite_template_fixture,
)

T0 = datetime(2025, 3, 1, 12, 0, tzinfo=UTC)
LEASE = timedelta(seconds=30)


async def add(d: Database, key: str, *, kind: str = "delivery", **kw: object) -> bool:
    async with d.session() as s, s.begin():
        return await s.run_sync(
            jobs.enqueue_sync,
            kind=kind,
            key=key,
            payload={"k": key},
            now=T0,
            **kw,  # type: ignore[arg-type]
        )


async def one(d: Database, job_id: int) -> Job:
    async with d.read_session() as s:
        job = await jobs.get_job(s, job_id)
    assert job is not None
    return job


def test_enqueue_is_idempotent(db: Backend) -> None:
    async def main(d: Database) -> tuple[list[bool], list[Job]]:
        created = [await add(d, "a", data=b"first")]
        async with d.session() as s, s.begin():
            created.append(
                await s.run_sync(
                    jobs.enqueue_sync,
                    kind="relay",
                    key="a",
                    payload={"other": 1},
                    data=b"second",
                    now=T0,
                )
            )
            created.append(
                await s.run_sync(jobs.enqueue_sync, kind="relay", key="b", payload={}, now=T0)
            )
            created.append(
                await s.run_sync(jobs.enqueue_sync, kind="relay", key="b", payload={}, now=T0)
            )
        async with d.read_session() as s:
            return created, await jobs.list_jobs(s)

    created, found = db.run(main)
    assert created == [True, False, True, False]
    assert [(j.key, j.kind, j.payload, j.data) for j in found] == [
        ("a", "delivery", {"k": "a"}, b"first"),
        ("b", "relay", {}, None),
    ]
    a = found[0]
    assert (a.state, a.attempts, a.next_run_at, a.created_at) == ("ready", 0, T0, T0)


def test_enqueue_key_stays_taken_after_done(db: Backend) -> None:
    async def main(d: Database) -> bool:
        await add(d, "a")
        job = await jobs.claim(d, kinds=["delivery"], worker="w", now=T0, lease=LEASE)
        assert job is not None
        async with d.session() as s, s.begin():
            await jobs.complete(s, job.id)
        return await add(d, "a")

    assert db.run(main) is False


def test_enqueue_does_not_commit(db: Backend) -> None:
    async def main(d: Database) -> int:
        async with d.session() as s:
            assert await s.run_sync(jobs.enqueue_sync, kind="x", key="k", payload={}, now=T0)
            await s.rollback()
        async with d.read_session() as s:
            return len(await jobs.list_jobs(s))

    assert db.run(main) == 0


def test_claim_takes_due_jobs_in_order(db: Backend) -> None:
    hour = timedelta(hours=1)

    async def main(d: Database) -> list[str | None]:
        await add(d, "later", run_at=T0 + timedelta(minutes=5))
        await add(d, "first", run_at=T0 - timedelta(minutes=1))
        await add(d, "second")
        await add(d, "other-kind", kind="relay")
        got: list[str | None] = []
        for _ in range(3):
            job = await jobs.claim(d, kinds=["delivery"], worker="w", now=T0, lease=hour)
            got.append(job.key if job else None)
        job = await jobs.claim(
            d, kinds=["delivery"], worker="w", now=T0 + timedelta(minutes=5), lease=hour
        )
        got.append(job.key if job else None)
        assert await jobs.claim(d, kinds=[], worker="w", now=T0, lease=LEASE) is None
        return got

    assert db.run(main) == ["first", "second", None, "later"]


def test_claim_leases_the_job(db: Backend) -> None:
    async def main(d: Database) -> Job:
        await add(d, "a", data=b"bytes")
        job = await jobs.claim(d, kinds=["delivery"], worker="node1/3", now=T0, lease=LEASE)
        assert job is not None
        stored = await one(d, job.id)
        assert (stored.state, stored.locked_by, stored.attempts) == ("running", "node1/3", 1)
        return job

    job = db.run(main)
    assert (job.state, job.locked_by, job.attempts) == ("running", "node1/3", 1)
    assert job.locked_until == T0 + LEASE
    assert job.data == b"bytes"
    assert job.payload == {"k": "a"}


def test_concurrent_claimers_take_every_job_exactly_once(db: Backend) -> None:
    n_jobs, workers_per_db = 60, 4

    async def worker(d: Database, name: str) -> list[int]:
        taken: list[int] = []
        while True:
            job = await jobs.claim(d, kinds=["delivery"], worker=name, now=T0, lease=LEASE)
            if job is None:
                return taken
            taken.append(job.id)
            await asyncio.sleep(0)  # a turn for the other claimers: the contention under test

    async def main(d1: Database) -> tuple[list[list[int]], list[Job]]:
        async with d1.session() as s, s.begin():
            for i in range(n_jobs):
                await s.run_sync(
                    jobs.enqueue_sync, kind="delivery", key=f"j{i}", payload={}, now=T0
                )
        d2 = await Database.open(db.url)  # a second node on the same database
        try:
            results = await asyncio.gather(
                *(
                    worker(d, f"{tag}-{i}")
                    for tag, d in (("a", d1), ("b", d2))
                    for i in range(workers_per_db)
                )
            )
        finally:
            await d2.close()
        async with d1.read_session() as s:
            return results, await jobs.list_jobs(s, limit=1000)

    results, stored = db.run(main)
    taken = [job_id for r in results for job_id in r]
    assert len(taken) == n_jobs
    assert Counter(taken).most_common(1)[0][1] == 1
    assert sorted(taken) == sorted(j.id for j in stored)
    assert all(j.state == "running" and j.attempts == 1 for j in stored)
    # Each job is leased to the worker whose list it is in.
    by_id = {j.id: j.locked_by for j in stored}
    names = [f"{tag}-{i}" for tag in "ab" for i in range(workers_per_db)]
    for name, ids in zip(names, results, strict=True):
        assert all(by_id[i] == name for i in ids)


def test_expired_lease_is_claimed_again(db: Backend) -> None:
    async def main(d: Database) -> list[tuple[str, int] | None]:
        await add(d, "a")
        seen: list[tuple[str, int] | None] = []
        for worker, at in (
            ("crashing", T0),
            ("w2", T0 + LEASE - timedelta(seconds=1)),  # still leased
            ("w2", T0 + LEASE + timedelta(seconds=1)),  # the lease has expired
            ("w3", T0 + LEASE + timedelta(seconds=2)),
        ):
            job = await jobs.claim(d, kinds=["delivery"], worker=worker, now=at, lease=LEASE)
            seen.append((job.locked_by or "", job.attempts) if job else None)
        return seen

    assert db.run(main) == [("crashing", 1), None, ("w2", 2), None]


def test_retry_with_backoff_then_park_then_requeue(db: Backend) -> None:
    base, cap = timedelta(seconds=10), timedelta(seconds=25)

    async def fail(d: Database, job_id: int, now: datetime) -> str:
        async with d.session() as s, s.begin():
            return await jobs.retry_or_park(
                s,
                job_id,
                error=f"boom at {now:%S}",
                now=now,
                max_attempts=4,
                base_delay=base,
                max_delay=cap,
            )

    async def main(d: Database) -> None:
        await add(d, "a", data=b"msg")
        now = T0
        delays = []
        for _ in range(3):
            job = await jobs.claim(d, kinds=["delivery"], worker="w", now=now, lease=LEASE)
            assert job is not None
            assert await fail(d, job.id, now) == "ready"
            stored = await one(d, job.id)
            assert stored.locked_by is None and stored.locked_until is None
            delays.append(stored.next_run_at - now)
            early = stored.next_run_at - timedelta(microseconds=1)
            assert (
                await jobs.claim(d, kinds=["delivery"], worker="w", now=early, lease=LEASE) is None
            )
            now = stored.next_run_at
        assert delays == [base, 2 * base, cap]

        job = await jobs.claim(d, kinds=["delivery"], worker="w", now=now, lease=LEASE)
        assert job is not None and job.attempts == 4
        assert await fail(d, job.id, now) == "parked"
        far = now + timedelta(days=365)
        assert await jobs.claim(d, kinds=["delivery"], worker="w", now=far, lease=LEASE) is None

        async with d.read_session() as s:
            parked = await jobs.list_jobs(s, states=["parked"])
        assert [(p.id, p.attempts, p.last_error, p.data) for p in parked] == [
            (job.id, 4, f"boom at {now:%S}", b"msg")
        ]

        async with d.session() as s, s.begin():
            await jobs.requeue(s, job.id, far)
        again = await jobs.claim(d, kinds=["delivery"], worker="w", now=far, lease=LEASE)
        assert again is not None and again.id == job.id and again.attempts == 1
        async with d.session() as s, s.begin():
            await jobs.complete(s, again.id, now=far)
        done = await one(d, job.id)
        assert (done.state, done.data, done.locked_by, done.updated_at) == ("done", None, None, far)

    db.run(main)


def test_a_job_that_waits_for_a_dependency_is_never_parked(db: Backend) -> None:
    """``counted=False`` (the antivirus is down, say): the claim's attempt is given back and
    the job waits, however often, with its reason visible; it is never parked."""
    base, cap = timedelta(seconds=10), timedelta(seconds=25)

    async def main(d: Database) -> None:
        await add(d, "w", data=b"msg")
        now = T0
        for _ in range(6):  # far more than max_attempts
            job = await jobs.claim(d, kinds=["delivery"], worker="w", now=now, lease=LEASE)
            assert job is not None and job.attempts == 1
            async with d.session() as s, s.begin():
                state = await jobs.retry_or_park(
                    s,
                    job.id,
                    error="ScannerUnavailable: clamd down",
                    now=now,
                    max_attempts=2,
                    base_delay=base,
                    max_delay=cap,
                    counted=False,
                )
            assert state == "ready"
            stored = await one(d, job.id)
            assert (stored.attempts, stored.last_error) == (0, "ScannerUnavailable: clamd down")
            assert stored.next_run_at - now == base
            now = stored.next_run_at

    db.run(main)


@pytest.mark.parametrize(
    ("attempts", "seconds"), [(0, 5), (1, 5), (2, 10), (3, 20), (7, 320), (8, 600), (10**6, 600)]
)
def test_backoff(attempts: int, seconds: int) -> None:
    assert jobs.backoff(attempts, timedelta(seconds=5), timedelta(seconds=600)) == timedelta(
        seconds=seconds
    )


@given(st.integers(min_value=1, max_value=10**9), st.integers(min_value=1, max_value=10**6))
def test_backoff_is_monotonic_and_capped(attempts: int, base_ms: int) -> None:
    base, cap = timedelta(milliseconds=base_ms), timedelta(hours=6)
    delay = jobs.backoff(attempts, base, cap)
    assert min(base, cap) <= delay <= cap
    assert jobs.backoff(attempts + 1, base, cap) >= delay


def test_release_gives_the_attempt_back(db: Backend) -> None:
    async def main(d: Database) -> tuple[Job, int, Job]:
        await add(d, "a")
        await add(d, "b")
        a = await jobs.claim(d, kinds=["delivery"], worker="w", now=T0, lease=LEASE)
        assert a is not None
        async with d.session() as s, s.begin():
            await jobs.release(s, a.id, now=T0)
        released = await one(d, a.id)
        await jobs.claim(d, kinds=["delivery"], worker="w", now=T0, lease=LEASE)
        await jobs.claim(d, kinds=["delivery"], worker="w", now=T0, lease=LEASE)
        async with d.session() as s, s.begin():
            n = await jobs.release_all_running(s)
        async with d.read_session() as s:
            return released, n, (await jobs.list_jobs(s, states=["ready"]))[0]

    released, n, first = db.run(main)
    assert (released.state, released.attempts, released.locked_by) == ("ready", 0, None)
    assert n == 2
    # After a crash the attempt counts (a message that kills pecd must end up parked).
    assert (first.state, first.attempts, first.locked_until) == ("ready", 1, None)


def test_requeue_and_complete_refuse_what_they_cannot_do(db: Backend) -> None:
    async def main(d: Database) -> None:
        await add(d, "a")
        job = await jobs.claim(d, kinds=["delivery"], worker="w", now=T0, lease=LEASE)
        assert job is not None
        async with d.session() as s, s.begin():
            with pytest.raises(jobs.JobError, match=r"job \d+ is running"):
                await jobs.requeue(s, job.id, T0)
            with pytest.raises(jobs.JobError, match="job 999999 does not exist"):
                await jobs.complete(s, 999999)

    db.run(main)


def test_list_jobs_filters(db: Backend) -> None:
    async def main(d: Database) -> list[list[str]]:
        for i in range(5):
            await add(d, f"d{i}")
            await add(d, f"r{i}", kind="relay")
        await jobs.claim(d, kinds=["relay"], worker="w", now=T0, lease=LEASE)
        async with d.read_session() as s:
            return [
                [j.key for j in found]
                for found in (
                    await jobs.list_jobs(s, kinds=["relay"], states=["running"]),
                    await jobs.list_jobs(s, kinds=["relay"], states=["ready"], limit=2),
                    await jobs.list_jobs(s, states=["parked", "done"]),
                    await jobs.list_jobs(s, limit=3),
                )
            ]

    assert db.run(main) == [["r0"], ["r1", "r2"], [], ["d0", "r0", "d1"]]


def test_purge_done_keeps_everything_else(db: Backend) -> None:
    async def main(d: Database) -> list[str]:
        for key in ("old-done", "new-done", "old-ready"):
            await add(d, key)
        async with d.session() as s, s.begin():
            found = {j.key: j for j in await jobs.list_jobs(s)}
            await jobs.complete(s, found["old-done"].id, now=T0)
            await jobs.complete(s, found["new-done"].id, now=T0 + timedelta(days=10))
        async with d.session() as s, s.begin():
            assert await jobs.purge_done(s, older_than=T0 + timedelta(days=3)) == 1
            return [j.key for j in await jobs.list_jobs(s)]

    assert db.run(main) == ["new-done", "old-ready"]
