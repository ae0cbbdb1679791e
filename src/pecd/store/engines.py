"""The jobs of an engine process that died: given back at once by the ``pecd serve`` that ran it.

Every worker of an engine process has an id that starts with that process's prefix
(``host:pid:node.index``, see :mod:`pecd.runtime.supervisor`). When the supervisor has reaped a
dead engine process, nothing of that process can still commit, so the jobs it held are ready again
at once, on SQLite (where no heartbeat runs) as on PostgreSQL (where the other nodes would take
them only after ``node_timeout_seconds``). As with a restart, the attempt still counts: a message
that kills its process ends up parked rather than crashing processes forever.
"""

from __future__ import annotations

from sqlalchemy import update
from sqlalchemy.orm import Session

from pecd.store.db import Database
from pecd.store.jobs import READY, RUNNING
from pecd.store.models import Job

__all__ = ["release_worker_jobs"]


def _like_prefix(prefix: str) -> str:
    escaped = prefix.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")
    return escaped + ":%"


async def release_worker_jobs(db: Database, prefix: str) -> int:
    """Make the running jobs of the workers named ``prefix:...`` ready; returns how many."""

    def write(s: Session) -> int:
        stmt = (
            update(Job)
            .where(Job.state == RUNNING, Job.locked_by.like(_like_prefix(prefix), escape="\\"))
            .values(state=READY, locked_by=None, locked_until=None, leased_by=None)
            .returning(Job.id)
            .execution_options(synchronize_session=False)
        )
        return len(s.execute(stmt).all())

    return await db.write(write)
