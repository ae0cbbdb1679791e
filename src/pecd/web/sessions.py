"""Webmail sessions, kept in the database (table ``web_sessions``) so that every web process of
every node sees the same ones.

A session id is 256 random bits (:func:`secrets.token_urlsafe`), given to the browser in the
cookie ``__Host-pecd_session`` and never stored: the row is keyed by its SHA-256, so a copy of
the database logs nobody in. Looking a session up by the digest of what the client presents is
the constant-time comparison (the database compares digests, never a secret with a guess).

A session ends at the first of:

* its absolute lifetime (``lifetime``, 12 hours; ``pending``, 5 minutes, for a session that
  still owes its second factor), written as ``expires_at`` when it starts;
* ``idle`` (30 minutes) without a request: ``last_seen_at`` slides, written at most once per
  ``touch_every`` (a minute) rather than on every request;
* logout; a new password (every session of the mailbox: ``pecd.store.accounts`` deletes the
  rows in the transaction that sets it, whoever sets it, the operator or the holder); a second
  factor set up (every other session of the mailbox); the mailbox being disabled; or the next
  login step,
  which always starts a *new* session and deletes the one it came from (no id is ever promoted,
  so an id planted before login is worth nothing after it).

Each session has its own CSRF token (``csrf``), compared with :func:`hmac.compare_digest`.
Expired rows are deleted when met and, a bounded batch at a time, whenever a session starts.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Final, Literal

from sqlalchemy import delete, or_, select, update

from pecd.clock import Clock, SystemClock
from pecd.pec.address import normalize_address
from pecd.store.db import Database
from pecd.store.models import Mailbox, WebSession

__all__ = [
    "CSRF_COOKIE",
    "SESSION_COOKIE",
    "SessionInfo",
    "Sessions",
    "Stage",
    "new_secret",
    "same_secret",
    "session_digest",
]

SESSION_COOKIE: Final = "__Host-pecd_session"
#: The CSRF token of a browser with no session (the login form): double-submitted, the form
#: field must equal this cookie. ``__Host-``: no sibling subdomain can set it.
CSRF_COOKIE: Final = "__Host-pecd_csrf"

Stage = Literal["password", "ok"]

IDLE: Final = timedelta(minutes=30)
LIFETIME: Final = timedelta(hours=12)
PENDING: Final = timedelta(minutes=5)
TOUCH_EVERY: Final = timedelta(minutes=1)
PURGE_BATCH: Final = 200
#: Longer values are no session id of ours (43 characters): not even hashed.
MAX_ID_LENGTH: Final = 128
_PEER_LENGTH: Final = 64


def new_secret() -> str:
    """256 random bits, URL-safe (a session id, a CSRF token)."""
    return secrets.token_urlsafe(32)


def session_digest(session_id: str) -> str:
    return hashlib.sha256(session_id.encode("utf-8", "surrogatepass")).hexdigest()


def same_secret(given: str | None, expected: str | None) -> bool:
    """Whether ``given`` is ``expected`` (both present and non-empty), in constant time."""
    if not given or not expected:
        return False
    return hmac.compare_digest(
        given.encode("utf-8", "surrogatepass"), expected.encode("utf-8", "surrogatepass")
    )


@dataclass(frozen=True, slots=True)
class SessionInfo:
    """One live session (never its id: the caller has the cookie)."""

    digest: str
    mailbox: str
    stage: Stage
    csrf: str
    created_at: datetime
    last_seen_at: datetime
    expires_at: datetime


def _stage(value: str) -> Stage:
    if value == "password":
        return "password"
    if value == "ok":
        return "ok"
    raise ValueError(f"unknown session stage {value!r}")


class Sessions:
    """The session store over ``db`` (see the module docstring). ``clock`` is the time source
    (tests move a FixedClock); the durations are attributes tests and operators may change."""

    def __init__(
        self,
        db: Database,
        clock: Clock | None = None,
        *,
        idle: timedelta = IDLE,
        lifetime: timedelta = LIFETIME,
        pending: timedelta = PENDING,
        touch_every: timedelta = TOUCH_EVERY,
    ) -> None:
        self.db = db
        self.clock: Clock = clock if clock is not None else SystemClock()
        self.idle = idle
        self.lifetime = lifetime
        self.pending = pending
        self.touch_every = touch_every

    async def start(
        self,
        mailbox: str,
        stage: Stage,
        *,
        peer: str | None = None,
        replacing: str | None = None,
    ) -> tuple[str, SessionInfo]:
        """A new session of ``mailbox`` at ``stage``: its id (for the cookie) and what it is.
        The session ``replacing`` (the id the client brought, if any) is deleted in the same
        transaction: a login step never keeps the id it started from."""
        now = self.clock.now()
        session_id = new_secret()
        info = SessionInfo(
            digest=session_digest(session_id),
            mailbox=normalize_address(mailbox),
            stage=stage,
            csrf=new_secret(),
            created_at=now,
            last_seen_at=now,
            expires_at=now + (self.lifetime if stage == "ok" else self.pending),
        )
        async with self.db.session() as s, s.begin():
            if replacing and len(replacing) <= MAX_ID_LENGTH:
                await s.execute(
                    delete(WebSession).where(WebSession.id_sha256 == session_digest(replacing))
                )
            s.add(
                WebSession(
                    id_sha256=info.digest,
                    mailbox=info.mailbox,
                    stage=info.stage,
                    csrf=info.csrf,
                    created_at=now,
                    last_seen_at=now,
                    expires_at=info.expires_at,
                    peer=None if peer is None else peer[:_PEER_LENGTH],
                )
            )
        await self.purge()
        return session_id, info

    def _expired(self, row: WebSession, now: datetime) -> bool:
        return now >= row.expires_at or now - row.last_seen_at >= self.idle

    async def get(self, session_id: str | None) -> SessionInfo | None:
        """The live session of ``session_id``, or None (unknown, ended, expired: an expired row
        is deleted). Slides the idle timeout."""
        if not session_id or len(session_id) > MAX_ID_LENGTH:
            return None
        digest = session_digest(session_id)
        async with self.db.read_session() as s:
            found = (
                await s.execute(
                    select(WebSession, Mailbox.disabled)
                    .outerjoin(Mailbox, Mailbox.address == WebSession.mailbox)
                    .where(WebSession.id_sha256 == digest)
                )
            ).first()
        if found is None:
            return None
        row, disabled = found
        now = self.clock.now()
        if self._expired(row, now) or disabled is not False:
            # A disabled (or deleted) mailbox loses its sessions at their next request.
            await self.end(session_id)
            return None
        if now - row.last_seen_at >= self.touch_every:
            async with self.db.session() as s, s.begin():
                await s.execute(
                    update(WebSession)
                    .where(WebSession.id_sha256 == digest, WebSession.last_seen_at < now)
                    .values(last_seen_at=now)
                )
        return SessionInfo(
            digest=digest,
            mailbox=row.mailbox,
            stage=_stage(row.stage),
            csrf=row.csrf,
            created_at=row.created_at,
            last_seen_at=max(row.last_seen_at, now),
            expires_at=row.expires_at,
        )

    async def end(self, session_id: str | None) -> None:
        """Delete the session (logout). Nothing happens for an unknown id."""
        if not session_id or len(session_id) > MAX_ID_LENGTH:
            return
        async with self.db.session() as s, s.begin():
            await s.execute(
                delete(WebSession).where(WebSession.id_sha256 == session_digest(session_id))
            )

    async def end_all(self, mailbox: str, *, keep: str | None = None) -> int:
        """End every session of ``mailbox`` but the one of id ``keep``; how many ended."""
        stmt = delete(WebSession).where(WebSession.mailbox == normalize_address(mailbox))
        if keep:
            stmt = stmt.where(WebSession.id_sha256 != session_digest(keep))
        async with self.db.session() as s, s.begin():
            result = await s.execute(stmt.returning(WebSession.id_sha256))
            return len(result.all())

    async def count(self, mailbox: str) -> int:
        """Live sessions of ``mailbox`` (for the settings page)."""
        now = self.clock.now()
        async with self.db.read_session() as s:
            rows = await s.scalars(
                select(WebSession.id_sha256).where(
                    WebSession.mailbox == normalize_address(mailbox),
                    WebSession.expires_at > now,
                    WebSession.last_seen_at > now - self.idle,
                )
            )
            return len(rows.all())

    async def purge(self, limit: int = PURGE_BATCH) -> int:
        """Delete at most ``limit`` expired sessions; how many."""
        now = self.clock.now()
        async with self.db.session() as s, s.begin():
            ids = (
                await s.scalars(
                    select(WebSession.id_sha256)
                    .where(
                        or_(
                            WebSession.expires_at <= now,
                            WebSession.last_seen_at <= now - self.idle,
                        )
                    )
                    .limit(limit)
                )
            ).all()
            if ids:
                await s.execute(delete(WebSession).where(WebSession.id_sha256.in_(ids)))
            return len(ids)
