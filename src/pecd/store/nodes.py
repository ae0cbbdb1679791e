"""Nodes and their heartbeats: how the death of a ``pecd serve`` process becomes visible.

Every node (a running ``pecd serve``) has a row in ``nodes`` under a random id chosen at each
start, and sets its ``heartbeat_at`` every ``[queue] heartbeat_seconds``. The jobs its workers
claim carry that id (``jobs.leased_by``). On PostgreSQL, :func:`pecd.store.jobs.claim_batch`
counts a running job as free when no node with that id has beaten within ``node_timeout_seconds``,
even if its lease has not run out: a killed process's jobs go to another node within seconds,
not after the whole lease. A node that was only slow and comes back cannot commit over the job
another node took: its lease (``locked_by``, one worker) is gone, and the stage fails with
LeaseLost as when a lease expires.

Heartbeats use the database's clock (``now()``), never a node's: nodes whose clocks differ, or
a test's injected clock, do not make a live node look dead. A node deletes its row when it stops
cleanly (whatever it left running is then free at once); rows silent for an hour are purged by
the others.

SQLite has one node only: there the running jobs are released at start instead
(:func:`pecd.store.jobs.release_all_running`) and no heartbeat runs.

A node can tell how long its jobs are safe from the others: :func:`last_beat` is when its last
heartbeat that was written began (this process's :func:`beat_clock`, which keeps counting while
the process is stopped or the machine suspended). Until ``node_timeout`` after it, no other node
counts the node's running jobs as free.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import os
import secrets
import socket
import time
import weakref
from dataclasses import dataclass
from datetime import timedelta

from sqlalchemy import Engine, Executable, delete, func, select
from sqlalchemy.dialects import postgresql
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine
from sqlalchemy.orm import Session

from pecd.store.db import Database
from pecd.store.models import Node, table_of

log = logging.getLogger(__name__)

_NODES = table_of(Node)

#: Rows of nodes silent this long are deleted (their leases were free long before).
PURGE_AFTER = timedelta(hours=1)


@dataclass(frozen=True)
class NodeLease:
    """The node this process runs as on one database, and when a silent node counts as dead."""

    id: str
    timeout: timedelta


@dataclass(frozen=True)
class Heartbeat:
    """A running heartbeat: the node, and the task that beats (cancelled: the node falls silent
    as if its process had frozen, while its row stays)."""

    node: NodeLease
    task: asyncio.Task[None]


# One entry per open database (keyed by its sync Engine, which a sync Session's bind leads to).
_REGISTERED: weakref.WeakKeyDictionary[Engine, NodeLease] = weakref.WeakKeyDictionary()


# The start of the last heartbeat written, by node id (beat_clock()).
_BEATS: dict[str, float] = {}

#: Seconds that keep counting while the process is stopped or the machine sleeps (Linux's
#: CLOCK_BOOTTIME; elsewhere the monotonic clock).
beat_clock = (
    functools.partial(time.clock_gettime, time.CLOCK_BOOTTIME)
    if hasattr(time, "CLOCK_BOOTTIME")
    else time.monotonic
)


def last_beat(node: NodeLease) -> float | None:
    """When (:func:`beat_clock`) the last heartbeat of ``node`` that was written began, or None
    if none was written by this process. The row's ``heartbeat_at`` is no earlier than that:
    other nodes count the node's jobs as free no sooner than ``node.timeout`` after it."""
    return _BEATS.get(node.id)


def new_node_id() -> str:
    return secrets.token_hex(16)


def current(bind: object) -> NodeLease | None:
    """The node registered for the database of ``bind`` (a Database, Engine, Connection or
    Session), or None (no heartbeat runs there: SQLite, a tool, a test)."""
    if isinstance(bind, Database):
        engine: object = bind.engine.sync_engine
    elif isinstance(bind, Session):
        engine = bind.get_bind().engine
    else:
        engine = getattr(bind, "engine", None)
    if not isinstance(engine, Engine):
        return None
    return _REGISTERED.get(engine)


def _beat_statements(node_id: str) -> list[Executable]:
    """Insert or refresh the row of ``node_id`` (heartbeat: the database's now); delete the rows
    of nodes silent for :data:`PURGE_AFTER`. PostgreSQL only."""
    t = _NODES.c
    upsert = postgresql.insert(_NODES).values(
        id=node_id,
        hostname=socket.gethostname()[:255],
        pid=os.getpid(),
        started_at=func.now(),
        heartbeat_at=func.now(),
    )
    return [
        upsert.on_conflict_do_update(index_elements=[t.id], set_={"heartbeat_at": func.now()}),
        delete(_NODES).where(t.heartbeat_at < func.now() - PURGE_AFTER),
    ]


def beat_sync(session: Session, node_id: str) -> None:
    """One heartbeat of ``node_id`` in ``session`` (see :func:`_beat_statements`). Does not
    commit. PostgreSQL only."""
    for stmt in _beat_statements(node_id):
        session.execute(stmt)


def forget_sync(session: Session, node_id: str) -> None:
    """Delete the row of ``node_id`` (a clean stop). Does not commit."""
    session.execute(delete(_NODES).where(_NODES.c.id == node_id))


async def live_nodes(db: Database, timeout: timedelta) -> list[Node]:
    """The nodes that have beaten within ``timeout``, oldest first."""
    async with db.read_session() as s:
        stmt = (
            select(Node)
            .where(Node.heartbeat_at >= func.now() - timeout)
            .order_by(Node.started_at, Node.id)
        )
        return list((await s.scalars(stmt)).all())


async def start_heartbeat(
    db: Database, stack: contextlib.AsyncExitStack, *, every: float, timeout: float
) -> Heartbeat | None:
    """Register this process as a node of ``db`` and keep its heartbeat while ``stack`` is open
    (on PostgreSQL; on SQLite nothing, None). On close: stop beating and delete the row. The
    first beat is written before this returns, so jobs claimed afterwards are covered.

    The beats go through a connection of their own: a node whose workers hold every pooled
    connection is busy, not dead."""
    if db.dialect != "postgresql":
        return None
    node = NodeLease(new_node_id(), timedelta(seconds=timeout))
    beats = create_async_engine(db.engine.url, pool_size=1, max_overflow=0, pool_pre_ping=True)
    try:
        await _beat_once(beats, node.id)
    except BaseException:
        await beats.dispose()
        raise
    engine = db.engine.sync_engine
    _REGISTERED[engine] = node
    task = asyncio.create_task(_beat(beats, node.id, every), name="node-heartbeat")

    async def stop() -> None:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        if _REGISTERED.get(engine) == node:
            del _REGISTERED[engine]
        _BEATS.pop(node.id, None)
        try:
            await db.write(lambda s: forget_sync(s, node.id))
        except Exception:
            log.warning("could not delete node %s; it will count as dead soon", node.id)
        finally:
            await beats.dispose()

    stack.push_async_callback(stop)
    log.info("node %s (%s:%d) beating every %gs", node.id, socket.gethostname(), os.getpid(), every)
    return Heartbeat(node, task)


async def _beat_once(engine: AsyncEngine, node_id: str) -> None:
    began = beat_clock()  # before the database's now() that the row gets
    async with engine.begin() as conn:
        for stmt in _beat_statements(node_id):
            await conn.execute(stmt)
    _BEATS[node_id] = began


async def _beat(engine: AsyncEngine, node_id: str, every: float) -> None:
    failing = False
    while True:
        await asyncio.sleep(every)
        try:
            await asyncio.wait_for(_beat_once(engine, node_id), timeout=max(every, 1.0) * 2)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            if not failing:  # once per outage, not every few seconds
                log.warning("node heartbeat failed (%s); other nodes may take our jobs", exc)
            failing = True
        else:
            if failing:
                log.info("node heartbeat written again")
            failing = False
