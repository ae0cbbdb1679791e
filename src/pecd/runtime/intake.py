"""Durable intake with group commit: what the SMTP points accept is committed before their 250.

Each accepted message becomes a job row holding its bytes (design.md invariant 1). Committing one
transaction per message makes every SMTP session pay for its own fsync; here concurrent sessions
hand their job to one writer task, which commits whatever has queued up meanwhile in a single
transaction and then answers each of them. An idle server commits at once; a busy one shares
the cost of each commit among all the messages that arrived during the previous one.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from dataclasses import dataclass, field
from datetime import datetime

from aiosmtpd.smtp import Envelope
from aiosmtpd.smtp import Session as SMTPSession
from sqlalchemy.orm import Session

from pecd.engine.vocab import IntakePayload, JobKind
from pecd.runtime.diskspace import INSUFFICIENT_STORAGE, FreeSpace
from pecd.runtime.logutil import RateLimitedLog
from pecd.runtime.smtp import IntakeEnvelope, Reply, peer_of
from pecd.store import jobs, sqlitefast
from pecd.store.db import Database

log = logging.getLogger(__name__)

# During an outage every submission fails the same way: a line now and then, one traceback.
_failures = RateLimitedLog()


@dataclass
class _Pending:
    kind: JobKind
    key: str
    payload: IntakePayload
    data: bytes
    now: datetime
    done: asyncio.Future[None] = field(
        default_factory=lambda: asyncio.get_running_loop().create_future()
    )


class Intake:
    """``await intake.submit(...)`` returns once the job is committed, or raises;
    ``await intake.reply(...)`` does the same for an SMTP point and gives its DATA reply."""

    def __init__(
        self,
        db: Database,
        wake: asyncio.Event,
        *,
        max_batch: int = 64,
        space: FreeSpace | None = None,
    ) -> None:
        self.db = db
        self.wake = wake
        self.max_batch = max_batch
        # The filesystems the accepted messages go to: while they are (nearly) full, both SMTP
        # points answer 452 4.3.1 (RFC 3463), so the client keeps the message and tries again
        # rather than getting a 250 for something that could not be delivered.
        self.space = space
        self._queue: asyncio.Queue[_Pending | None] = asyncio.Queue()
        self._task: asyncio.Task[None] | None = None

    async def start(self, stack: contextlib.AsyncExitStack) -> None:
        self._task = asyncio.create_task(self._run(), name="intake")
        stack.push_async_callback(self.stop)

    async def stop(self) -> None:
        """Commit what is queued, then end (called after the listeners have closed)."""
        if self._task is None:
            return
        self._queue.put_nowait(None)
        await self._task
        self._task = None

    def room(self, *, fresh: bool = False) -> bool:
        """Whether there is room for messages now (always, without a ``space`` to watch)."""
        return self.space is None or self.space.enough(fresh=fresh)

    async def submit(
        self, *, kind: JobKind, key: str, payload: IntakePayload, data: bytes, now: datetime
    ) -> None:
        if self._task is None or self._task.done():
            raise RuntimeError("the intake is not running")
        item = _Pending(kind, key, payload, data, now)
        self._queue.put_nowait(item)
        await asyncio.shield(item.done)

    async def reply(
        self,
        kind: JobKind,
        session: SMTPSession,
        envelope: Envelope,
        *,
        user: str | None = None,
        tls: bool | None = None,
    ) -> str:
        """Commit one SMTP transaction, read by :class:`IntakeSMTP` (its ``data_prefix`` has put
        the Received: field in front: these are the job's bytes), as a job of ``kind``, and give
        the DATA reply: 250 with the key once it is durable (design.md invariant 1), 451 if it
        could not be stored, 452 4.3.1 while the storage is full (checked before, and again when
        the commit failed)."""
        assert isinstance(envelope, IntakeEnvelope)
        if not self.room():
            return INSUFFICIENT_STORAGE
        key, now = envelope.intake_key, envelope.received_at
        assert key is not None and now is not None
        try:
            await self.submit(
                kind=kind,
                key=key,
                payload=IntakePayload(
                    # "<>": the null reverse path (see ReceptionHandler.handle_MAIL).
                    mail_from="" if envelope.mail_from in (None, "<>") else envelope.mail_from,
                    rcpt_to=tuple(envelope.rcpt_tos),
                    received_at=now,
                    peer=peer_of(session),
                    user=user,
                    tls=tls,
                ),
                data=envelope.original_content or b"",
                now=now,
            )
        except NotStored:  # its commit's failure is logged (rate-limited) where it happened
            return self._not_stored()
        except Exception as exc:
            _failures.failure(log, "durable intake of %s failed; answering 451", exc, kind)
            return self._not_stored()
        return Reply.queued(key)

    def _not_stored(self) -> str:
        # The commit failed: for want of space, say so (452 4.3.1), else 451.
        return INSUFFICIENT_STORAGE if not self.room(fresh=True) else Reply.TEMP_FAILURE

    async def _run(self) -> None:
        stopping = False
        while not stopping:
            batch, stopping = await self._take()
            if batch:
                await self._commit_batch(batch)
            # Committed: let the messages' bytes go now, not when the next message comes.
            del batch
        # Anything submitted after the stop marker is refused rather than left hanging.
        while not self._queue.empty():
            item = self._queue.get_nowait()
            if item is not None and not item.done.done():
                item.done.set_exception(RuntimeError("the intake has stopped"))

    async def _take(self) -> tuple[list[_Pending], bool]:
        """The next batch (whatever has queued up, at least one item), and whether to stop."""
        first = await self._queue.get()
        if first is None:
            return [], True
        batch = [first]
        while len(batch) < self.max_batch and not self._queue.empty():
            nxt = self._queue.get_nowait()
            if nxt is None:
                return batch, True
            batch.append(nxt)
        return batch, False

    async def _commit_batch(self, batch: list[_Pending]) -> None:
        try:
            await self._commit(batch)
        except Exception as exc:
            if len(batch) == 1:
                _failures.failure(log, "durable intake failed for %s", exc, batch[0].key)
                _fail(batch[0])
                return
            # One bad message must not refuse the others: commit them one by one.
            _failures.failure(
                log, "a batch of %d messages failed to commit; one by one", exc, len(batch)
            )
            for item in batch:
                try:
                    await self._commit([item])
                except Exception as one:
                    _failures.failure(log, "durable intake failed for %s", one, item.key)
                    _fail(item)
                    continue
                _succeed(item)
            self.wake.set()
            return
        for item in batch:
            _succeed(item)
        self.wake.set()

    async def _commit(self, batch: list[_Pending]) -> None:
        rows = [
            jobs.job_row(
                kind=item.kind,
                key=item.key,
                payload=item.payload.to_json(),
                data=item.data,
                now=item.now,
            )
            for item in batch
        ]

        if self.db.pg is not None:  # PostgreSQL: one statement, one round trip
            await self.db.pg.insert_jobs(rows)
            return
        if self.db.sqlite_writer:  # SQLite: one executemany over sqlite3
            await self.db.write_sqlite(lambda conn: sqlitefast.insert_jobs_blind(conn, rows))
            return

        def commit(s: Session) -> None:
            # One INSERT for the whole batch.
            jobs.insert_many_sync(s, rows)

        await self.db.write(commit)


def _succeed(item: _Pending) -> None:
    if not item.done.done():
        item.done.set_result(None)


class NotStored(RuntimeError):
    """The commit of a submission failed (and was logged)."""


def _fail(item: _Pending) -> None:
    if not item.done.done():
        item.done.set_exception(NotStored(f"could not store {item.key}"))
