"""The virus store: infected messages stopped at the access or reception point, kept byte-exact.

A message is kept once per key (the engine's ``KeepInfected`` effect; a stage that runs again
keeps nothing new), with its size and SHA-256, in the stage's transaction. Rows go with the trace
log's retention purge (:func:`pecd.store.seals.purge` calls :func:`purge_expired` in its
transaction): a row is kept at least as long as the trace events of its time.

Nothing here reads the clock or commits.
"""

from __future__ import annotations

import functools
import hashlib
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import delete, func, select
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.ext.asyncio import AsyncSession
from sqlalchemy.orm import Session

from pecd.store.models import InfectedMessage, TraceEvent, table_of
from pecd.store.trace import storable

log = logging.getLogger(__name__)

_VIRUS = table_of(InfectedMessage)

POINTS: tuple[str, ...] = ("access", "reception")


@dataclass(frozen=True)
class Kept:
    """A kept message without its bytes (what :func:`list_kept` returns)."""

    id: int
    key: str
    at: datetime
    point: str
    signature: str
    pec_msgid: str | None
    sender: str | None
    recipients: list[str]
    size: int
    sha256: str


#: The metadata columns, in the order of :class:`Kept` (everything but ``data``).
_META = tuple(getattr(InfectedMessage, name) for name in Kept.__dataclass_fields__)


def keep_sync(
    session: Session,
    *,
    key: str,
    at: datetime,
    point: str,
    signature: str,
    pec_msgid: str | None,
    sender: str | None,
    recipients: Sequence[str],
    data: bytes,
) -> bool:
    """Keep ``data`` unless a message with the same ``key`` is kept already. Returns True if it
    was kept now. Does not commit."""
    if point not in POINTS:
        raise ValueError(f"virus store: point {point!r} is not one of {', '.join(POINTS)}")
    # The text comes from hostile bytes (an envelope sender with a NUL, say): stored as the
    # trace log stores it, or PostgreSQL refuses the row and the job could never end.
    values: dict[str, Any] = {
        "key": storable(key),
        "at": at,
        "point": point,
        "signature": storable(signature),
        "pec_msgid": storable(pec_msgid),
        "sender": storable(sender),
        "recipients": storable(list(recipients)),
        "size": len(data),
        "sha256": hashlib.sha256(data).hexdigest(),
        "data": bytes(data),
    }
    result = session.execute(_insert_stmt(session.get_bind().dialect.name), values)
    return result.first() is not None


@functools.cache
def _insert_stmt(dialect: str) -> Any:
    """``INSERT … ON CONFLICT (key) DO NOTHING RETURNING id``, built once per dialect."""
    insert = postgresql.insert if dialect == "postgresql" else sqlite.insert
    return insert(_VIRUS).on_conflict_do_nothing(index_elements=["key"]).returning(_VIRUS.c.id)


async def list_kept(
    session: AsyncSession,
    *,
    since: datetime | None = None,
    until: datetime | None = None,
    limit: int | None = 1000,
) -> list[Kept]:
    """The kept messages with ``since <= at < until``, oldest first, without their bytes
    (``limit`` None: all of them)."""
    stmt = select(*_META).order_by(InfectedMessage.at, InfectedMessage.id)
    if since is not None:
        stmt = stmt.where(InfectedMessage.at >= since)
    if until is not None:
        stmt = stmt.where(InfectedMessage.at < until)
    if limit is not None:
        stmt = stmt.limit(limit)
    return [Kept(**row._mapping) for row in await session.execute(stmt)]


async def get_kept(session: AsyncSession, id: int) -> InfectedMessage | None:
    """One kept message with its bytes; None if there is no such id."""
    return await session.get(InfectedMessage, id)


def as_json(k: Kept | InfectedMessage) -> dict[str, Any]:
    """A kept message's metadata as a JSON object (``--json``, the export's index)."""
    out: dict[str, Any] = {name: getattr(k, name) for name in Kept.__dataclass_fields__}
    out["at"] = k.at.isoformat()
    return out


async def purge_expired(session: AsyncSession, *, cutoff: datetime) -> int:
    """Remove the messages kept before the trace log's retention ``cutoff`` and before its oldest
    event still there, so that none goes before the trace events of its time (the log removes
    whole seals, which may hold events older than the cutoff). Returns how many. Does not
    commit; :func:`pecd.store.seals.purge` calls it in its own transaction, after removing the
    events."""
    oldest = await session.scalar(select(func.min(TraceEvent.at)))
    horizon = min(cutoff, oldest) if oldest is not None else cutoff
    removed = (
        await session.execute(
            delete(InfectedMessage)
            .where(InfectedMessage.at < horizon)
            .returning(InfectedMessage.id)
            .execution_options(synchronize_session=False)
        )
    ).all()
    if removed:
        log.info("retention: removed %d infected messages kept before %s", len(removed), horizon)
    return len(removed)
