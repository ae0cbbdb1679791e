"""REST API tokens: per mailbox, shown once when made, kept only as their SHA-256.

A token is ``pecd_`` followed by :func:`secrets.token_urlsafe` of 32 random bytes. Looking a token
up by the SHA-256 of what the client presents is the constant-time comparison: the database
compares digests, never a secret with a guess, and a guess tells nothing about any stored hash.
A token is good while it is not revoked and its mailbox exists and is not disabled.
"""

from __future__ import annotations

import builtins
import hashlib
import secrets
from dataclasses import dataclass
from datetime import datetime, timedelta

from sqlalchemy import select, update

from pecd.clock import Clock, SystemClock
from pecd.pec.address import normalize_address
from pecd.store.accounts import AccountError
from pecd.store.db import Database
from pecd.store.models import ApiToken, Mailbox

PREFIX = "pecd_"
#: ``last_used_at`` is written at most this often per token (not a write per request).
TOUCH_EVERY = timedelta(minutes=1)


def token_digest(token: str) -> str:
    return hashlib.sha256(token.encode("utf-8", "surrogatepass")).hexdigest()


@dataclass(frozen=True, slots=True)
class TokenInfo:
    id: int
    mailbox: str
    name: str
    created_at: datetime
    last_used_at: datetime | None
    revoked_at: datetime | None


def _info(t: ApiToken) -> TokenInfo:
    return TokenInfo(t.id, t.mailbox, t.name, t.created_at, t.last_used_at, t.revoked_at)


class Tokens:
    def __init__(self, db: Database, clock: Clock | None = None) -> None:
        self.db = db
        self.clock = clock or SystemClock()

    async def create(self, mailbox: str, name: str) -> tuple[int, str]:
        """A new token for an existing mailbox: its id and the token (shown once)."""
        address = normalize_address(mailbox)
        name = name.strip()
        if not name or len(name) > 255:
            raise AccountError("a token needs a name of 1 to 255 characters")
        token = PREFIX + secrets.token_urlsafe(32)
        async with self.db.session() as s, s.begin():
            if await s.get(Mailbox, address) is None:
                raise AccountError(f"mailbox {address} does not exist")
            row = ApiToken(
                mailbox=address,
                name=name,
                token_sha256=token_digest(token),
                created_at=self.clock.now(),
                last_used_at=None,
                revoked_at=None,
            )
            s.add(row)
            await s.flush()
            return row.id, token

    async def authenticate(self, token: str) -> str | None:
        """The mailbox ``token`` speaks for, or None (unknown, revoked, mailbox disabled)."""
        if not token.startswith(PREFIX) or len(token) > 200:
            return None
        digest = token_digest(token)
        async with self.db.read_session() as s:
            found = (
                await s.execute(
                    select(ApiToken.id, ApiToken.mailbox, ApiToken.last_used_at, Mailbox.disabled)
                    .join(Mailbox, Mailbox.address == ApiToken.mailbox)
                    .where(ApiToken.token_sha256 == digest, ApiToken.revoked_at.is_(None))
                )
            ).first()
        if found is None or found.disabled:
            return None
        now = self.clock.now()
        if found.last_used_at is None or now - found.last_used_at >= TOUCH_EVERY:
            async with self.db.session() as s, s.begin():
                await s.execute(
                    update(ApiToken).where(ApiToken.id == found.id).values(last_used_at=now)
                )
        return str(found.mailbox)

    async def list(self, mailbox: str) -> builtins.list[TokenInfo]:
        async with self.db.read_session() as s:
            rows = await s.scalars(
                select(ApiToken)
                .where(ApiToken.mailbox == normalize_address(mailbox))
                .order_by(ApiToken.id)
            )
            return [_info(t) for t in rows]

    async def revoke(self, token_id: int) -> TokenInfo:
        """Revoke token ``token_id`` (again: nothing changes); AccountError if there is none."""
        async with self.db.session() as s, s.begin():
            row = await s.get(ApiToken, token_id)
            if row is None:
                raise AccountError(f"no API token {token_id}")
            if row.revoked_at is None:
                row.revoked_at = self.clock.now()
            return _info(row)
