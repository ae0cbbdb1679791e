"""Domains and mailboxes, and password checks (argon2id).

Addresses and domain names are stored lowercase. Password hashing and verification run in worker
threads of the Accounts' own small pool (:class:`HashSlots`), never asyncio's default one, so a
login neither blocks the event loop nor waits behind other work given to the default pool (the
webmail parses messages there). A mailbox's second factor and app passwords are in
``pecd.store.security``; :meth:`Accounts.authenticate` (mail protocols) and
:meth:`Accounts.authenticate_web` (the webmail's first step) apply them.

A new password, whoever sets it (the operator's :meth:`Accounts.set_password`, the holder's
:meth:`Accounts.change_password`), ends every webmail session of the mailbox and revokes its app
passwords in the same transaction, as large providers do: whoever knew the old password may have
made either. API tokens stay (they are for programs; the holder sees and revokes them in the
settings).
"""

from __future__ import annotations

import asyncio
import collections
import hashlib
import hmac
import os
import re
import secrets
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, TypeVar

from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError, VerifyMismatchError
from sqlalchemy import delete, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncSession

from pecd.clock import Clock, SystemClock
from pecd.pec.address import (
    domain_of,
    normalize_address,
    normalize_domain,
    valid_address,
    valid_domain,
)
from pecd.pec.size import parse_size as parse_size  # re-exported: cli.py imports it from here
from pecd.store.db import Database
from pecd.store.errors import AccountError as AccountError  # re-exported: its old home
from pecd.store.models import AppPassword, Domain, Mailbox, MailboxSecurity, WebSession

if TYPE_CHECKING:
    from pecd.store.security import Security

MIN_PASSWORD_LENGTH = 8
_T = TypeVar("_T")

_LABEL = r"(?!-)[a-z0-9-]{1,63}(?<!-)"
_DOMAIN_RE = re.compile(rf"^(?=.{{1,253}}$){_LABEL}(?:\.{_LABEL})+$")
_LOCAL_RE = re.compile(r"^[a-z0-9!#$%&'*+/=?^_`{|}~.-]{1,64}$")


def _account_domain(name: str) -> str:
    """A domain pecd hosts mailboxes in, normalised (``pecd.pec.address``), or AccountError.

    Narrower than a valid mail domain: ASCII letters, digits and hyphens only (an IDN is
    written in punycode), since the name becomes a directory of the Maildir tree.
    """
    domain = normalize_domain(name)
    if not _DOMAIN_RE.match(domain) or not valid_domain(domain):
        raise AccountError(f"not a domain name: {name!r}")
    return domain


def _account_address(address: str) -> str:
    """A mailbox address pecd creates, normalised (``pecd.pec.address``), or AccountError.

    Narrower than a valid mail address: an ASCII dot-atom local part (no quoted strings), in a
    domain as :func:`_account_domain` takes it.
    """
    text = normalize_address(address)
    local, at, domain = text.rpartition("@")
    if (
        not at
        or not valid_address(text)
        or not _LOCAL_RE.match(local)
        or not _DOMAIN_RE.match(domain)
    ):
        raise AccountError(f"not a mail address: {address!r}")
    return text


def _check_password(password: str) -> None:
    if len(password) < MIN_PASSWORD_LENGTH:
        raise AccountError(f"password must be at least {MIN_PASSWORD_LENGTH} characters")


class HashSlots:
    """At most ``n`` password-hash computations at once (each one holds a CPU for ~150 ms), so
    guessing cannot take every CPU from real logins. Waiting computations with ``first=True``
    (logins from a client address with no recent failure) are served before the others.

    They run in the slots' own pool of ``n`` threads (made when first needed), not in asyncio's
    default executor: work queued there by other parts of the process (the webmail reads and
    parses messages in it) cannot hold a login back."""

    def __init__(self, n: int) -> None:
        self.size = n
        self.free = n
        self._first: collections.deque[asyncio.Future[None]] = collections.deque()
        self._rest: collections.deque[asyncio.Future[None]] = collections.deque()
        self._pool: ThreadPoolExecutor | None = None

    @property
    def pool(self) -> ThreadPoolExecutor:
        """The threads the hashes run in (also for hashes made outside the slots, as when a
        password is set)."""
        if self._pool is None:
            self._pool = ThreadPoolExecutor(max_workers=self.size, thread_name_prefix="pecd-hash")
        return self._pool

    async def call(self, fn: Callable[..., _T], *args: object) -> _T:
        """``fn(*args)`` in the pool, without waiting for a slot."""
        return await asyncio.get_running_loop().run_in_executor(self.pool, fn, *args)

    def close(self) -> None:
        """Let the pool's threads end once their work is done (a later call makes a new pool)."""
        if self._pool is not None:
            self._pool.shutdown(wait=False)
            self._pool = None

    def waiting(self) -> int:
        return len(self._first) + len(self._rest)

    async def run(self, first: bool, fn: Callable[..., _T], *args: object) -> _T:
        """``fn(*args)`` in a worker thread, in a free slot."""
        if self.free > 0 and not self._first and not self._rest:
            self.free -= 1
        else:
            waiter = asyncio.get_running_loop().create_future()
            queue = self._first if first else self._rest
            queue.append(waiter)
            try:
                await waiter
            except asyncio.CancelledError:
                if waiter.done() and not waiter.cancelled():
                    self._release()  # handed a slot just as we were cancelled
                else:
                    queue.remove(waiter)
                raise
        # The slot is given back when the thread ends, not when a cancelled caller leaves.
        task = asyncio.ensure_future(self.call(fn, *args))
        task.add_done_callback(lambda _: self._release())
        return await asyncio.shield(task)

    def _release(self) -> None:
        for queue in (self._first, self._rest):
            while queue:
                waiter = queue.popleft()
                if not waiter.done():
                    waiter.set_result(None)
                    return
        self.free += 1


_STATE_SQL = "SELECT disabled, quota_bytes FROM mailboxes WHERE address = $1"


class Accounts:
    """Domains and mailboxes in the database.

    ``hasher``: the argon2 ``PasswordHasher`` (default parameters: argon2id, RFC 9106 low-memory
    profile); tests pass cheap parameters. A stored hash made with other parameters is rehashed
    at the next successful login. ``clock`` stamps ``created_at``.

    Successful logins are remembered for ``login_cache_seconds`` (as Dovecot's auth cache does):
    mail clients open a connection per message sent and several IMAP connections at once, and
    one argon2id check costs about 150 ms of CPU, so without it a 2-core server could take only
    a dozen logins a second. What is kept is an HMAC of the password under a key made at start
    and never stored, next to the stored hash it was checked against: a changed password (its
    hash changes) or a disabled mailbox is seen at once, a wrong password always pays the full
    check, and nothing of it is written anywhere.

    At most ``max_hash_checks`` (default: the CPU count) password checks run at once
    (``HashSlots``); a login found in the cache takes no slot.

    Mail protocols (:meth:`authenticate`) also take the mailbox's app passwords
    (``pecd.store.security``): random and high-entropy, they are looked up by their SHA-256, so
    they need neither a slot nor the cache. The mailbox password is refused there when the
    mailbox has TOTP enabled or required: such a mailbox is opened by mail clients with app
    passwords only, and the password serves only the webmail's first step
    (:meth:`authenticate_web`), which asks for the second factor after it.
    """

    LOGIN_CACHE_MAX = 100_000

    def __init__(
        self,
        db: Database,
        *,
        hasher: PasswordHasher | None = None,
        clock: Clock | None = None,
        login_cache_seconds: float = 300.0,
        max_hash_checks: int | None = None,
    ) -> None:
        self.db = db
        self.hash_slots = HashSlots(max_hash_checks or max(1, os.cpu_count() or 1))
        self.hasher = hasher if hasher is not None else PasswordHasher()
        self.clock: Clock = clock if clock is not None else SystemClock()
        self._dummy_hash: str | None = None
        self.login_cache_seconds = login_cache_seconds
        self._login_key = secrets.token_bytes(32)
        # canonical address -> (stored hash it was checked against, HMAC of the password, until)
        self._logins: dict[str, tuple[str, bytes, float]] = {}
        from pecd.store.security import Security  # security.py imports AccountError from here

        self.security: Security = Security(db, clock=self.clock)

    # --- domains ---------------------------------------------------------------------------

    async def add_domain(self, name: str) -> Domain:
        domain = Domain(name=_account_domain(name), created_at=self.clock.now())
        try:
            async with self.db.session() as s, s.begin():
                if await s.get(Domain, domain.name) is not None:
                    raise AccountError(f"domain {domain.name} already exists")
                s.add(domain)
        except IntegrityError:
            raise AccountError(f"domain {domain.name} already exists") from None
        return domain

    async def list_domains(self) -> list[Domain]:
        async with self.db.read_session() as s:
            return list((await s.scalars(select(Domain).order_by(Domain.name))).all())

    # --- mailboxes -------------------------------------------------------------------------

    async def add_mailbox(
        self, address: str, password: str, quota_bytes: int | None = None
    ) -> Mailbox:
        """Create a mailbox in an existing domain."""
        canonical = _account_address(address)
        domain = domain_of(canonical)
        _check_password(password)
        if quota_bytes is not None and quota_bytes < 0:
            raise AccountError("quota must not be negative")
        async with self.db.read_session() as s:
            if await s.get(Domain, domain) is None:
                raise AccountError(f"domain {domain} is not configured")
            if await s.get(Mailbox, canonical) is not None:
                raise AccountError(f"mailbox {canonical} already exists")
        password_hash = await self.hash_slots.call(self.hasher.hash, password)
        mailbox = Mailbox(
            address=canonical,
            domain=domain,
            password_hash=password_hash,
            quota_bytes=quota_bytes,
            disabled=False,
            created_at=self.clock.now(),
        )
        try:
            async with self.db.session() as s, s.begin():
                if await s.get(Domain, domain) is None:
                    raise AccountError(f"domain {domain} is not configured")
                if await s.get(Mailbox, canonical) is not None:
                    raise AccountError(f"mailbox {canonical} already exists")
                s.add(mailbox)
        except IntegrityError:
            raise AccountError(f"mailbox {canonical} already exists") from None
        return mailbox

    async def list_mailboxes(self, domain: str | None = None) -> list[Mailbox]:
        stmt = select(Mailbox).order_by(Mailbox.address)
        if domain is not None:
            stmt = stmt.where(Mailbox.domain == normalize_domain(domain))
        async with self.db.read_session() as s:
            return list((await s.scalars(stmt)).all())

    async def get(self, address: str) -> Mailbox | None:
        async with self.db.read_session() as s:
            return await s.get(Mailbox, normalize_address(address))

    async def state(self, address: str) -> tuple[bool, int | None] | None:
        """Whether the mailbox is disabled and its quota (None: no such mailbox): what a
        delivery needs, read without an ORM object (on PostgreSQL in one round trip)."""
        canonical = normalize_address(address)
        if self.db.pg is not None:
            row = await self.db.pg.fetchrow(_STATE_SQL, canonical)
        else:
            async with self.db.read_session() as s:
                row = (
                    await s.execute(
                        select(Mailbox.disabled, Mailbox.quota_bytes).where(
                            Mailbox.address == canonical
                        )
                    )
                ).first()
        return None if row is None else (bool(row[0]), row[1])

    async def set_password(self, address: str, password: str) -> None:
        """The operator sets the mailbox password: every webmail session of the mailbox ends
        and its app passwords are revoked (see the module docstring)."""
        canonical = normalize_address(address)
        _check_password(password)
        password_hash = await self.hash_slots.call(self.hasher.hash, password)
        async with self.db.session() as s, s.begin():
            result = await s.execute(
                update(Mailbox)
                .where(Mailbox.address == canonical)
                .values(password_hash=password_hash)
                .returning(Mailbox.address)
            )
            if result.first() is None:
                raise AccountError(f"mailbox {canonical} does not exist")
            await self._password_changed(s, canonical)
        self._logins.pop(canonical, None)

    async def change_password(self, address: str, old: str, new: str) -> bool:
        """The holder changes the mailbox password: False if ``old`` is not the current one (or
        the mailbox is disabled, or the password changed meanwhile); AccountError if ``new``
        breaks the rules of :meth:`set_password`. Logins remembered with the old password are
        forgotten (the stored hash changes, so other processes' caches see it too); as with
        :meth:`set_password`, every webmail session of the mailbox ends (the caller's too: it
        starts a new one) and its app passwords are revoked."""
        canonical = normalize_address(address)
        _check_password(new)
        checked = await self._check(canonical, old, first=False, mail=False)
        if checked is None:
            return False
        password_hash = await self.hash_slots.call(self.hasher.hash, new)
        async with self.db.session() as s, s.begin():
            result = await s.execute(
                update(Mailbox)
                .where(Mailbox.address == checked[0], Mailbox.password_hash == checked[1])
                .values(password_hash=password_hash)
                .returning(Mailbox.address)
            )
            changed = result.first() is not None
            if changed:
                await self._password_changed(s, checked[0])
        self._logins.pop(canonical, None)
        return changed

    async def _password_changed(self, s: AsyncSession, canonical: str) -> None:
        """In the transaction that set a new password: end the mailbox's web sessions (the rows
        ``pecd.web.sessions`` reads) and revoke its app passwords."""
        await s.execute(delete(WebSession).where(WebSession.mailbox == canonical))
        await s.execute(
            update(AppPassword)
            .where(AppPassword.mailbox == canonical, AppPassword.revoked_at.is_(None))
            .values(revoked_at=self.clock.now())
        )

    async def disable(self, address: str) -> None:
        await self._update(normalize_address(address), disabled=True)

    async def enable(self, address: str) -> None:
        await self._update(normalize_address(address), disabled=False)

    async def _update(self, canonical: str, **values: object) -> None:
        async with self.db.session() as s, s.begin():
            result = await s.execute(
                update(Mailbox)
                .where(Mailbox.address == canonical)
                .values(**values)
                .returning(Mailbox.address)
            )
            if result.first() is None:
                raise AccountError(f"mailbox {canonical} does not exist")

    # --- logins ----------------------------------------------------------------------------

    async def _dummy(self) -> str:
        if self._dummy_hash is None:
            self._dummy_hash = await self.hash_slots.call(self.hasher.hash, "pecd: no such mailbox")
        return self._dummy_hash

    def _verify(self, password_hash: str, password: str) -> bool:
        try:
            return self.hasher.verify(password_hash, password)
        except (VerifyMismatchError, VerificationError, InvalidHashError):
            return False

    async def authenticate(self, address: str, password: str, *, first: bool = False) -> str | None:
        """A login over a mail protocol (IMAP, POP3, SMTP submission): the canonical address if
        the mailbox is enabled and ``password`` is one of its unrevoked app passwords, or its
        mailbox password while it has neither TOTP enabled nor required; else None.

        Takes about the same time whether or not the mailbox exists (an unknown address is
        checked against a dummy hash), and a refused mailbox password costs the same check
        whatever the reason. ``first``: the client address has no recent failed login
        (``Guard.clean``), so its check goes ahead of those waiting for a slot.
        """
        checked = await self._check(address, password, first=first, mail=True)
        return None if checked is None else checked[0]

    async def authenticate_web(
        self, address: str, password: str, *, first: bool = False
    ) -> str | None:
        """The webmail's first step: the canonical address if ``password`` is the mailbox
        password (never an app password) and the mailbox is enabled, else None. The caller
        asks for the second factor next when the mailbox has one
        (``Security.totp_status``)."""
        checked = await self._check(address, password, first=first, mail=False)
        return None if checked is None else checked[0]

    async def _check(
        self, address: str, password: str, *, first: bool, mail: bool
    ) -> tuple[str, str] | None:
        """The canonical address and the stored hash the password was checked against (for an
        app password, the hash of the mailbox password then), or None."""
        canonical = normalize_address(address)
        if not _encodable(canonical) or not _encodable(password):
            # Bytes that are not UTF-8 (lone surrogates from a client's raw bytes) name no
            # mailbox and are no password: a refused login, not a store failure.
            await self.hash_slots.run(first, self._verify, await self._dummy(), "")
            return None
        async with self.db.read_session() as s:
            mailbox = await s.get(Mailbox, canonical)
            security = await s.get(MailboxSecurity, canonical) if mail else None
        if mailbox is None:
            await self.hash_slots.run(first, self._verify, await self._dummy(), password)
            return None
        stored = mailbox.password_hash
        if mailbox.disabled:
            # The same work as a wrong password: a disabled mailbox is not told apart by time.
            await self.hash_slots.run(first, self._verify, stored, password)
            return None
        if mail:
            from pecd.store.security import allows_password_alone

            if await self.security.app_password_login(canonical, password):
                return canonical, stored
            if not allows_password_alone(security):
                # Right or wrong, the password alone does not open this mailbox to a mail
                # client; the check is made all the same, so time tells nothing of it.
                await self.hash_slots.run(first, self._verify, stored, password)
                return None
        mac = hmac.new(self._login_key, password.encode("utf-8"), hashlib.sha256).digest()
        seen = self._logins.get(canonical)
        now = time.monotonic()
        fresh = seen is not None and seen[0] == stored and now < seen[2]
        if fresh and seen is not None and hmac.compare_digest(seen[1], mac):
            return canonical, stored
        if not await self.hash_slots.run(first, self._verify, stored, password):
            return None
        if self.login_cache_seconds > 0:
            if len(self._logins) >= self.LOGIN_CACHE_MAX:
                self._logins.clear()
            self._logins[canonical] = (stored, mac, now + self.login_cache_seconds)
        if self.hasher.check_needs_rehash(stored):
            rehashed = await self.hash_slots.run(first, self.hasher.hash, password)
            async with self.db.session() as s, s.begin():
                # Only if the password did not change meanwhile.
                result = await s.execute(
                    update(Mailbox)
                    .where(Mailbox.address == canonical, Mailbox.password_hash == stored)
                    .values(password_hash=rehashed)
                    .returning(Mailbox.address)
                )
                if result.first() is not None:
                    stored = rehashed
        return canonical, stored


def _encodable(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return "\x00" not in text
