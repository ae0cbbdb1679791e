"""Pipeline workers: a stage that runs longer than a lease keeps its job."""

from __future__ import annotations

import asyncio
import contextlib
import types
from datetime import UTC, datetime
from pathlib import Path

from helpers import install
from pecd.clock import SystemClock
from pecd.runtime.workers import WorkerPool
from pecd.store import jobs
from pecd.store.db import Database


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
            svc = types.SimpleNamespace(
                cfg=cfg,
                clock=SystemClock(),
                db=db,
                wake=asyncio.Event(),
                relay_wake=asyncio.Event(),
            )

            async def slow(svc: object, job: object) -> object:
                runs.append(getattr(job, "locked_by", ""))
                await asyncio.sleep(2.5)

                def nothing(session: object, outbox: object) -> None:
                    return None

                return nothing

            async with db.session() as s, s.begin():
                await jobs.enqueue(s, kind="slow", key="k", payload={}, now=datetime.now(UTC))
            async with contextlib.AsyncExitStack() as stack:
                for name in ("a", "b"):
                    pool = WorkerPool(svc, {"slow": slow}, count=1, name=name)  # type: ignore[arg-type, dict-item]
                    await pool.start(stack)
                for _ in range(100):
                    async with db.read_session() as s:
                        job = await jobs.get_job(s, 1)
                    if job is not None and job.state == jobs.DONE:
                        break
                    await asyncio.sleep(0.1)
                await asyncio.sleep(1.5)  # two more lease periods: nobody takes it again
            assert job is not None
            return job.state
        finally:
            await db.close()

    assert asyncio.run(scenario()) == jobs.DONE
    assert len(runs) == 1, runs
