"""The leader lock: one process of an installation (all its nodes and processes) holds it and runs
what must run once: the 12 h / 24 h timers, the sealer and the purge.

* PostgreSQL: a session-level advisory lock (``pg_try_advisory_lock``) taken on a connection of
  its own, kept open while this process leads. The lock lives as long as that database session:
  a leader that is killed, or whose connection drops, loses it at once (the server ends the
  session and frees the lock), and another process takes it at its next try. While leading, the
  connection is checked every try (``SELECT 1``): a failed check means the session may be gone,
  and this process stops leading. Until that check (``heartbeat_seconds``) an old leader whose
  session the server already ended may still run beside the new one: the duties tolerate it
  (a seal is made under an advisory lock of its own, a timer notice is sent only by whoever
  claimed it). The server ends the session of a leader whose host died within a minute (TCP
  keepalives and user timeout set on that connection). The connection carries the
  ``application_name`` ``pecd-leader <host>:<pid>``, so ``pg_stat_activity`` names the leader.
* SQLite: an exclusive ``flock`` on a file beside the database (``pecd.db.leader``), held on an
  open descriptor while this process leads; the kernel releases it when the process dies. The file
  holds the leader's ``host:pid`` for operators. (A lock row with a lease would need a clock and a
  renewal; the file lock has neither and cannot outlive its holder.)
"""

from __future__ import annotations

import abc
import asyncio
import contextlib
import fcntl
import logging
import os
import socket
from pathlib import Path

from sqlalchemy import text
from sqlalchemy.engine import make_url
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine, create_async_engine

from pecd.store.db import async_url

__all__ = ["LEADER_KEY", "FileLeaderLock", "LeaderLock", "PostgresLeaderLock", "leader_lock"]

log = logging.getLogger(__name__)

#: The advisory lock's key: "pecd" and "lead" in ASCII, far from the sealer's transaction lock.
LEADER_KEY = 0x70656364_6C656164


def holder_name() -> str:
    """How this process names itself as a leader (host and pid)."""
    return f"{socket.gethostname()}:{os.getpid()}"


class LeaderLock(abc.ABC):
    """Try to become the leader; check that leadership still holds; give it up."""

    @abc.abstractmethod
    async def try_acquire(self) -> bool:
        """Take the lock if nobody holds it; True when this process now leads."""

    @abc.abstractmethod
    async def still_held(self) -> bool:
        """Whether this process still surely holds the lock (False: stop leading now)."""

    @abc.abstractmethod
    async def release(self) -> None:
        """Give the lock up (a clean stop, or after :meth:`still_held` said False)."""


class PostgresLeaderLock(LeaderLock):
    """``pg_try_advisory_lock`` on a dedicated connection (see the module's docstring)."""

    def __init__(self, url: str, *, key: int = LEADER_KEY, timeout: float = 5.0) -> None:
        self.url = url
        self.key = key
        self.timeout = timeout
        self._engine: AsyncEngine | None = None
        self._conn: AsyncConnection | None = None

    async def _connect(self) -> AsyncConnection:
        if self._engine is None:
            self._engine = create_async_engine(
                async_url(self.url),
                pool_size=1,
                max_overflow=0,
                isolation_level="AUTOCOMMIT",
                connect_args={
                    "server_settings": {
                        "application_name": f"pecd-leader {holder_name()}"[:63],
                        # The server must notice a leader whose host died or was cut off and end
                        # its session (freeing the lock) within a minute, not after the
                        # system's keepalive default (two hours).
                        "tcp_keepalives_idle": "10",
                        "tcp_keepalives_interval": "5",
                        "tcp_keepalives_count": "3",
                        "tcp_user_timeout": "30000",
                    },
                    "timeout": self.timeout,
                },
            )
        return await self._engine.connect()

    async def try_acquire(self) -> bool:
        conn = await self._connect()
        try:
            got = (
                await conn.execute(text("SELECT pg_try_advisory_lock(:k)"), {"k": self.key})
            ).scalar_one()
        except BaseException:
            await self._drop(conn)
            raise
        if not got:
            await conn.close()  # back to the pool: the next try reuses the session
            return False
        self._conn = conn
        return True

    async def still_held(self) -> bool:
        conn = self._conn
        if conn is None:
            return False
        try:
            async with asyncio.timeout(self.timeout):
                await conn.execute(text("SELECT 1"))
        except Exception as exc:
            log.warning("leader lock: its database session failed (%s)", exc)
            return False
        return True

    async def release(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            try:
                async with asyncio.timeout(self.timeout):
                    await conn.execute(text("SELECT pg_advisory_unlock(:k)"), {"k": self.key})
            except Exception:
                await self._drop(conn)  # ending the session frees the lock as well
            else:
                await conn.close()
        if self._engine is not None:
            await self._engine.dispose()
            self._engine = None

    async def _drop(self, conn: AsyncConnection) -> None:
        with contextlib.suppress(Exception):
            await conn.invalidate()
        with contextlib.suppress(Exception):
            await conn.close()
        if self._engine is not None:
            with contextlib.suppress(Exception):
                await self._engine.dispose()
            self._engine = None


class FileLeaderLock(LeaderLock):
    """An exclusive ``flock`` on ``path`` (see the module's docstring)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._fd: int | None = None

    async def try_acquire(self) -> bool:
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            return False
        except BaseException:
            os.close(fd)
            raise
        os.ftruncate(fd, 0)
        os.write(fd, f"{holder_name()}\n".encode())
        self._fd = fd
        return True

    async def still_held(self) -> bool:
        return self._fd is not None

    async def release(self) -> None:
        fd, self._fd = self._fd, None
        if fd is not None:
            with contextlib.suppress(OSError):
                os.ftruncate(fd, 0)
            os.close(fd)  # closing the last descriptor releases the flock


def leader_lock(database_url: str) -> LeaderLock | None:
    """The leader lock of the database at ``database_url``; None for an in-memory SQLite
    database (one process only: it always leads)."""
    url = make_url(database_url)
    if url.get_backend_name() == "postgresql":
        return PostgresLeaderLock(database_url)
    path = url.database
    if not path or path == ":memory:":
        return None
    return FileLeaderLock(Path(path + ".leader"))
