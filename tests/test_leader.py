"""The leader lock (store/leader.py) and the leadership it gives (runtime/leadership.py): one
holder at a time, on PostgreSQL (an advisory lock held by a database session) and on SQLite (a
flock beside the database file); the lock goes when its holder dies or its session ends, and
another process takes over the timers, the sealer and the purge. Two `pecd serve` nodes on one
PostgreSQL: only the leader seals, and the other takes over when the leader is SIGKILLed."""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import signal
import socket
import subprocess
import sys
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path

import pytest

from helpers import add_events, free_port, install, start, wait_for
from pecd.runtime.leadership import Leadership
from pecd.store.db import Database
from pecd.store.leader import FileLeaderLock, PostgresLeaderLock, leader_lock
from store_fixtures import PG_ENV, migrated_postgres, sql_rows

needs_pg = pytest.mark.skipif(not os.environ.get(PG_ENV), reason=f"{PG_ENV} not set")


@pytest.fixture(name="url")
def url_fixture() -> Iterator[str]:
    yield from migrated_postgres()


LEADERS = (
    "SELECT a.application_name, a.pid FROM pg_locks l JOIN pg_stat_activity a ON a.pid = l.pid"
    " WHERE l.locktype = 'advisory' AND l.granted AND a.datname = current_database()"
    " AND a.application_name LIKE 'pecd-leader %'"
)


def leader_pids(url: str) -> list[int]:
    """The OS pids of the processes holding the leader lock of ``url`` (from their sessions'
    application_name, ``pecd-leader host:pid``)."""
    rows = asyncio.run(sql_rows(url, LEADERS))
    return [int(str(name).rsplit(":", 1)[1]) for name, _ in rows]


@needs_pg
def test_postgres_lock_has_one_holder_and_goes_with_its_session(url: str) -> None:
    async def main() -> None:
        a, b = PostgresLeaderLock(url), PostgresLeaderLock(url)
        try:
            assert await a.try_acquire()
            assert not await b.try_acquire()
            assert not await b.try_acquire()  # a second try reuses b's session, still refused
            assert await a.still_held()
            assert len(await sql_rows(url, LEADERS)) == 1
            # The leader's database session ends (a network cut, a server restart, a kill).
            [(_, backend)] = await sql_rows(url, LEADERS)
            await sql_rows(url, f"SELECT pg_terminate_backend({int(str(backend))})")
            assert not await a.still_held()
            await a.release()
            assert await b.try_acquire()
            assert not await a.try_acquire()
            await b.release()  # a clean release: the next one gets it at once
            assert await a.try_acquire()
        finally:
            await a.release()
            await b.release()

    asyncio.run(main())


_HOLDER = """
import asyncio, sys, time
from pathlib import Path
from pecd.store.leader import FileLeaderLock

async def main():
    lock = FileLeaderLock(Path(sys.argv[1]))
    assert await lock.try_acquire()
    print("held", flush=True)
    time.sleep(600)

asyncio.run(main())
"""


def test_sqlite_lock_goes_with_a_killed_holder(tmp_path: Path) -> None:
    db = tmp_path / "pecd.db"
    lock = leader_lock(f"sqlite:///{db}")
    assert isinstance(lock, FileLeaderLock) and lock.path == tmp_path / "pecd.db.leader"
    holder = subprocess.Popen(
        [sys.executable, "-c", _HOLDER, str(lock.path)], stdout=subprocess.PIPE, text=True
    )
    try:
        assert holder.stdout is not None and holder.stdout.readline() == "held\n"
        assert f":{holder.pid}" in lock.path.read_text()
        assert not asyncio.run(lock.try_acquire())
        holder.send_signal(signal.SIGKILL)
        holder.wait(10)
        assert asyncio.run(lock.try_acquire())
        assert f":{os.getpid()}" in lock.path.read_text()
        other = FileLeaderLock(lock.path)  # another descriptor, even in this process: refused
        assert not asyncio.run(other.try_acquire())
        asyncio.run(lock.release())
        assert asyncio.run(other.try_acquire())
        asyncio.run(other.release())
    finally:
        if holder.poll() is None:
            holder.kill()
            holder.wait()


@needs_pg
def test_leadership_runs_duties_in_one_holder_and_moves_when_it_is_lost(url: str) -> None:
    """Two contenders: one runs the duties; when its session is ended, it stops them (their
    stack closes) and the other starts them."""

    async def main() -> None:
        running: dict[str, bool] = {}

        def duties(name: str) -> Callable[[contextlib.AsyncExitStack], Awaitable[None]]:
            async def start(stack: contextlib.AsyncExitStack) -> None:
                running[name] = True
                stack.callback(running.__setitem__, name, False)

            return start

        async with contextlib.AsyncExitStack() as stack:
            one = Leadership(PostgresLeaderLock(url), duties("one"), every=0.1)
            two = Leadership(PostgresLeaderLock(url), duties("two"), every=0.1)
            await one.start(stack)
            await two.start(stack)
            assert (one.leading, two.leading) == (True, False)
            assert running == {"one": True}
            [(_, backend)] = await sql_rows(url, LEADERS)
            await sql_rows(url, f"SELECT pg_terminate_backend({int(str(backend))})")
            async with asyncio.timeout(20):
                while not two.leading:
                    await asyncio.sleep(0.05)
            assert running == {"one": False, "two": True}
            assert not one.leading
            assert len(await sql_rows(url, LEADERS)) == 1
        assert running == {"one": False, "two": False}  # a stop ends the duties
        assert await sql_rows(url, LEADERS) == []

    asyncio.run(main())


def _second_node(first: Path, second: Path) -> None:
    """``second``: the config of ``first`` (same database, PKI, Maildir root) on other ports."""
    text_ = first.read_text("utf-8")
    ports = sorted(set(re.findall(r'"127\.0\.0\.1:(\d+)"', text_)))
    for port in ports:
        text_ = text_.replace(f"127.0.0.1:{port}", f"127.0.0.1:{free_port()}")
    second.write_text(text_, "utf-8")


async def _add_events(url: str, n: int, first: int) -> None:
    db = await Database.open(url)
    try:
        await add_events(db, n, first)
    finally:
        await db.close()


async def _unsealed(url: str) -> int:
    return int(
        str((await sql_rows(url, "SELECT count(*) FROM trace_events WHERE seal_id IS NULL"))[0][0])
    )


async def _seal_nodes(url: str) -> list[str]:
    return [str(r[0]) for r in await sql_rows(url, "SELECT node FROM trace_seals ORDER BY id")]


@needs_pg
@pytest.mark.slow
def test_two_serve_nodes_one_leader_and_a_takeover(tmp_path: Path, url: str) -> None:
    """Two `pecd serve` nodes (one process each) on one PostgreSQL: one holds the leader lock and
    makes every seal; SIGKILL it, and the other takes the lock over and seals from then on."""
    from pecd.config import load_config

    extra = (
        "\n[queue]\nbase_delay_seconds = 0.2\nformat_processes = 1\n"
        "heartbeat_seconds = 0.3\nnode_timeout_seconds = 1\n"
        "[serve]\nprocesses = 1\n[log]\nseal_seconds = 0.5\n"
    )
    cfg1 = asyncio.run(install(tmp_path / "inst", url, extra_config=extra))
    assert cfg1.source is not None
    _second_node(cfg1.source, cfg1.source.parent / "node2.toml")
    cfg2 = load_config(cfg1.source.parent / "node2.toml")
    procs = [start(cfg1, tmp_path / "node1.log")]
    try:
        procs.append(start(cfg2, tmp_path / "node2.log"))
        pids = [p.pid for p in procs]
        holders = wait_for(lambda: (h := leader_pids(url)) and h, 30, "a leader", interval=0.1)
        assert len(holders) == 1 and holders[0] in pids
        leader = holders[0]
        host = socket.gethostname()
        asyncio.run(_add_events(url, 5, 0))
        wait_for(lambda: asyncio.run(_unsealed(url)) == 0, 30, "events sealed", interval=0.1)
        assert set(asyncio.run(_seal_nodes(url))) == {f"{host}:{leader}"}
        os.kill(leader, signal.SIGKILL)
        survivor = next(p for p in pids if p != leader)
        wait_for(lambda: leader_pids(url) == [survivor], 30, "the other node leads", interval=0.1)
        asyncio.run(_add_events(url, 5, 5))
        wait_for(lambda: asyncio.run(_unsealed(url)) == 0, 30, "new events sealed", interval=0.1)
        assert set(asyncio.run(_seal_nodes(url))) == {f"{host}:{leader}", f"{host}:{survivor}"}
        log = (tmp_path / ("node1.log" if procs[0].pid == survivor else "node2.log")).read_text()
        assert f"leader: {host}:{survivor} runs the timers" in log
        verify = subprocess.run(
            [sys.executable, "-m", "pecd", "log", "verify", "-c", str(cfg1.source)],
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert verify.returncode == 0, verify.stdout + verify.stderr
    finally:
        for p in procs:
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        for p in procs:
            with contextlib.suppress(subprocess.TimeoutExpired):
                p.wait(60)
            if p.poll() is None:
                p.kill()
                p.wait()
    assert leader_pids(url) == []
