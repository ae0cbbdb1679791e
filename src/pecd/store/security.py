"""A mailbox's login security beside its password: the TOTP second factor and app passwords.

TOTP (RFC 6238) as authenticator apps expect it: SHA-1, 6 digits, 30-second steps. A code is
accepted for the step before, the current one and the one after (clock drift), and only once:
the step of the last accepted code is stored (``totp_last_step``) and a code of that step or an
earlier one is refused, by a conditional UPDATE, so two logins racing with one code cannot both
win. Codes are compared with :func:`hmac.compare_digest`. Enrolment is two steps:
:meth:`Security.totp_begin` stores a new secret as pending, :meth:`Security.totp_confirm` enables
it once the holder types a right code from the app.

Wrong codes are counted per mailbox in the database (``totp_failures``), so that every web
process of every node, and every client address, adds to one count. The count goes up *before*
the code is looked at, in one UPDATE that also refuses a locked mailbox: requests racing in
parallel cannot all be checked against the count as it was before any of them failed. After
:data:`TOTP_MAX_FAILURES` wrong codes in a row the mailbox takes no code for :data:`TOTP_LOCK`
(not even the right one: a locked mailbox answers as for a wrong code), and each further wrong
code locks it again, so a guesser who knows the password gets one code per lock; a right code
sets the count back to zero. Nothing is exempt (no "known address"): the holder typing wrong
codes from home is locked out as a guesser would be, for at most :data:`TOTP_LOCK` after the
last wrong code.

An enrolment not yet confirmed belongs to the web session that began it
(``totp_pending_owner``, the session's digest): its secret is shown, and confirmed, only there.
A login that must enrol never reuses a secret begun elsewhere (in the holder's settings, or by
another login), so whoever knows the password cannot read the holder's new secret off the
login page.

``totp_required`` is the per-mailbox "2FA mandatory" switch: the webmail is to let the mailbox
in only with a second factor, and mail clients must use app passwords. The
mailbox password alone never opens a mailbox over IMAP, POP3 or SMTP once TOTP is enabled or
required (:meth:`pecd.store.accounts.Accounts.authenticate`).

App passwords: one per mail client, made here and shown once: 20 characters from the 32 of
Crockford's base32 alphabet, lowercase (no i, l, o, u), in four groups of five joined by dashes
(``k3j9x-...``): 100 bits from :mod:`secrets`. Being long and random they need no slow hash:
only ``sha256:`` and the SHA-256 (hex) of the canonical spelling are kept, and a login looks the
digest up (the database compares digests, never a secret with a guess), as API tokens do
(``pecd.store.tokens``). What the holder types is canonicalised first: spaces and dashes go,
letters are lowercased, and Crockford's look-alikes (o -> 0, i and l -> 1) are mapped. Dovecot's
passdb (``pecd.dovecot``) computes the digest of what is typed as it is, so with Dovecot the
password must be typed as shown.
"""

from __future__ import annotations

import builtins
import hashlib
import hmac
import re
import secrets
from dataclasses import dataclass
from datetime import datetime, timedelta

import pyotp
from sqlalchemy import case, func, literal, or_, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncSession

from pecd.clock import Clock, SystemClock
from pecd.pec.address import normalize_address
from pecd.store.db import Database
from pecd.store.errors import AccountError
from pecd.store.models import AppPassword, Mailbox, MailboxSecurity, UTCDateTime

__all__ = [
    "APP_PASSWORD_PREFIX",
    "TOTP_LOCK",
    "TOTP_MAX_FAILURES",
    "AppPasswordInfo",
    "Security",
    "TotpAttempt",
    "TotpStatus",
    "allows_password_alone",
    "app_password_canonical",
    "app_password_digest",
]

TOTP_DIGITS = 6
TOTP_PERIOD = 30
#: Steps accepted either side of the current one.
TOTP_WINDOW = 1
#: Wrong codes in a row after which the mailbox takes no code for TOTP_LOCK.
TOTP_MAX_FAILURES = 5
TOTP_LOCK = timedelta(minutes=15)

#: Crockford's base32 alphabet, lowercase: no i, l, o (read as 1 and 0) and no u.
APP_ALPHABET = "0123456789abcdefghjkmnpqrstvwxyz"
APP_GROUPS = 4
APP_GROUP_LEN = 5
APP_LENGTH = APP_GROUPS * APP_GROUP_LEN
#: How ``app_passwords.password_hash`` names its scheme.
APP_PASSWORD_PREFIX = "sha256:"
#: Unrevoked app passwords a mailbox may have at once.
MAX_APP_PASSWORDS = 50
#: ``last_used_at`` is written at most this often per app password.
TOUCH_EVERY = timedelta(minutes=1)

_LOOKALIKES = str.maketrans({"o": "0", "i": "1", "l": "1"})
_SEPARATORS = re.compile(r"[\s\-]+")
_APP_RE = re.compile(f"[{APP_ALPHABET}]{{{APP_LENGTH}}}")
_CODE_RE = re.compile(f"[0-9]{{{TOTP_DIGITS}}}")


@dataclass(frozen=True, slots=True)
class TotpStatus:
    """``enabled``: a confirmed secret; ``pending``: a secret waiting for its first code;
    ``required``: the mailbox must use a second factor ("2FA mandatory")."""

    enabled: bool
    required: bool
    pending: bool


@dataclass(frozen=True, slots=True)
class TotpAttempt:
    """What a code tried against the mailbox's enabled TOTP came to. ``ok``: right and unused.
    ``locked_until``: the mailbox takes no code until then (the attempt found it locked, and
    the code was not looked at; or the attempt was the wrong code that locked it)."""

    ok: bool
    locked_until: datetime | None = None


@dataclass(frozen=True, slots=True)
class AppPasswordInfo:
    id: int
    name: str
    created_at: datetime
    last_used_at: datetime | None
    revoked_at: datetime | None


def _info(row: AppPassword) -> AppPasswordInfo:
    return AppPasswordInfo(row.id, row.name, row.created_at, row.last_used_at, row.revoked_at)


def app_password_canonical(text: str) -> str | None:
    """``text`` as an app password is stored (four dash-joined groups of five, lowercase), or
    None if it cannot be one (then it may still be a mailbox password)."""
    if len(text) > 4 * APP_LENGTH:
        return None
    compact = _SEPARATORS.sub("", text).lower().translate(_LOOKALIKES)
    if not _APP_RE.fullmatch(compact):
        return None
    return "-".join(compact[i : i + APP_GROUP_LEN] for i in range(0, APP_LENGTH, APP_GROUP_LEN))


def app_password_digest(canonical: str) -> str:
    """What ``app_passwords.password_hash`` holds for the app password ``canonical``."""
    return APP_PASSWORD_PREFIX + hashlib.sha256(canonical.encode("ascii")).hexdigest()


def _new_app_password() -> str:
    chars = "".join(secrets.choice(APP_ALPHABET) for _ in range(APP_LENGTH))
    return "-".join(chars[i : i + APP_GROUP_LEN] for i in range(0, APP_LENGTH, APP_GROUP_LEN))


def _totp(secret: str) -> pyotp.TOTP:
    return pyotp.TOTP(secret, digits=TOTP_DIGITS, digest=hashlib.sha1, interval=TOTP_PERIOD)


def _code(text: str) -> str | None:
    """The six digits of a typed code (spaces allowed, as apps show ``123 456``), or None."""
    if len(text) > 32:
        return None
    code = "".join(text.split())
    return code if _CODE_RE.fullmatch(code) else None


class Security:
    """The second factor and app passwords of mailboxes in ``db``; ``clock`` gives TOTP's time
    (tests move it) and stamps the rows."""

    def __init__(self, db: Database, clock: Clock | None = None) -> None:
        self.db = db
        self.clock: Clock = clock if clock is not None else SystemClock()

    # --- TOTP --------------------------------------------------------------------------------

    def _step(self) -> int:
        return int(self.clock.now().timestamp()) // TOTP_PERIOD

    def _matching_step(self, secret: str, code: str, after: int | None) -> int | None:
        """The latest step within the window whose code is ``code`` and that comes after
        ``after`` (the last step used), or None. Every candidate is computed and compared in
        constant time, so how long this takes does not tell which step matched."""
        totp = _totp(secret)
        now = self._step()
        found: int | None = None
        for step in range(now - TOTP_WINDOW, now + TOTP_WINDOW + 1):
            good = hmac.compare_digest(totp.generate_otp(step).encode(), code.encode())
            if good and (after is None or step > after):
                found = step
        return found

    async def _row(self, s: AsyncSession, mailbox: str) -> MailboxSecurity | None:
        return await s.get(MailboxSecurity, mailbox)

    async def _existing(self, s: AsyncSession, mailbox: str) -> str:
        address = normalize_address(mailbox)
        if await s.get(Mailbox, address) is None:
            raise AccountError(f"mailbox {address} does not exist")
        return address

    async def _upsert(self, mailbox: str, **values: object) -> None:
        """Set ``values`` on the mailbox's row, making the row if there is none."""
        for attempt in range(2):
            try:
                async with self.db.session() as s, s.begin():
                    address = await self._existing(s, mailbox)
                    row = await self._row(s, address)
                    if row is None:
                        row = MailboxSecurity(
                            mailbox=address,
                            totp_secret=None,
                            totp_enabled_at=None,
                            totp_last_step=None,
                            totp_required=False,
                            totp_failures=0,
                            totp_locked_until=None,
                            totp_pending_owner=None,
                        )
                        s.add(row)
                    for key, value in values.items():
                        setattr(row, key, value)
                    row.updated_at = self.clock.now()
                return
            except IntegrityError:
                # Another writer made the row first (PostgreSQL): set it again, now it exists.
                if attempt:
                    raise

    async def totp_status(self, mailbox: str) -> TotpStatus:
        async with self.db.read_session() as s:
            address = await self._existing(s, mailbox)
            row = await self._row(s, address)
        if row is None:
            return TotpStatus(enabled=False, required=False, pending=False)
        enabled = row.totp_secret is not None and row.totp_enabled_at is not None
        return TotpStatus(
            enabled=enabled,
            required=bool(row.totp_required),
            pending=row.totp_secret is not None and row.totp_enabled_at is None,
        )

    async def totp_begin(self, mailbox: str, *, owner: str | None = None) -> str:
        """A new secret for the mailbox's authenticator app, pending until
        :meth:`totp_confirm`; it replaces any enrolment pending. ``owner``: who began it (the
        digest of a web session), the only one :meth:`totp_pending_secret` and
        :meth:`totp_confirm` then serve. AccountError if TOTP is already enabled (disable it
        first)."""
        if (await self.totp_status(mailbox)).enabled:
            raise AccountError(
                f"{normalize_address(mailbox)} already has TOTP enabled; disable it first"
            )
        secret = pyotp.random_base32()  # 32 base32 characters: 160 bits, as RFC 4226 advises
        await self._upsert(
            mailbox,
            totp_secret=secret,
            totp_enabled_at=None,
            totp_last_step=None,
            totp_pending_owner=owner,
        )
        return secret

    async def totp_pending_secret(self, mailbox: str, *, owner: str | None = None) -> str | None:
        """The secret :meth:`totp_begin` made for ``owner``, while it waits for its first code
        (to show its QR code again); None when nothing is pending or what is pending was begun
        by someone else (``None`` as ``owner`` matches only an enrolment begun without one)."""
        async with self.db.read_session() as s:
            row = await self._row(s, normalize_address(mailbox))
        if row is None or row.totp_enabled_at is not None or row.totp_pending_owner != owner:
            return None
        return row.totp_secret

    @staticmethod
    def totp_uri(mailbox: str, secret: str, issuer: str = "pecd") -> str:
        """The ``otpauth://totp/...`` URI an authenticator app reads (from a QR code)."""
        return _totp(secret).provisioning_uri(name=normalize_address(mailbox), issuer_name=issuer)

    async def totp_confirm(self, mailbox: str, code: str, *, owner: str | None = None) -> bool:
        """Enable the pending secret ``owner`` began (:meth:`totp_begin`) if ``code`` is right
        for it; False otherwise (or when nothing is pending, or it is someone else's). Wrong
        codes here are not counted: whoever confirms is shown the secret."""
        typed = _code(code)
        if typed is None:
            return False
        address = normalize_address(mailbox)
        async with self.db.read_session() as s:
            row = await self._row(s, address)
        if (
            row is None
            or row.totp_secret is None
            or row.totp_enabled_at is not None
            or row.totp_pending_owner != owner
        ):
            return False
        step = self._matching_step(row.totp_secret, typed, None)
        if step is None:
            return False
        now = self.clock.now()
        async with self.db.session() as s, s.begin():
            done = await s.execute(
                update(MailboxSecurity)
                .where(
                    MailboxSecurity.mailbox == address,
                    MailboxSecurity.totp_secret == row.totp_secret,
                    MailboxSecurity.totp_enabled_at.is_(None),
                )
                .values(
                    totp_enabled_at=now,
                    totp_last_step=step,
                    totp_failures=0,
                    totp_locked_until=None,
                    totp_pending_owner=None,
                    updated_at=now,
                )
                .returning(MailboxSecurity.mailbox)
            )
            return done.first() is not None

    async def totp_verify(self, mailbox: str, code: str) -> bool:
        """Whether ``code`` is a right, unused code of the mailbox's enabled TOTP (a login); the
        lockout of :meth:`totp_attempt` applies."""
        return (await self.totp_attempt(mailbox, code)).ok

    async def totp_attempt(self, mailbox: str, code: str) -> TotpAttempt:
        """Try ``code`` against the mailbox's enabled TOTP, counted (see the module docstring):
        the count goes up first, in the UPDATE that also refuses a locked mailbox; a right,
        unused code then sets it back to zero."""
        address = normalize_address(mailbox)
        now = self.clock.now()
        until = now + TOTP_LOCK
        async with self.db.session() as s, s.begin():
            # SET reads the row as it was: totp_failures + 1 is this attempt's count.
            counted = (
                await s.execute(
                    update(MailboxSecurity)
                    .where(
                        MailboxSecurity.mailbox == address,
                        MailboxSecurity.totp_secret.is_not(None),
                        MailboxSecurity.totp_enabled_at.is_not(None),
                        or_(
                            MailboxSecurity.totp_locked_until.is_(None),
                            MailboxSecurity.totp_locked_until <= now,
                        ),
                    )
                    .values(
                        totp_failures=MailboxSecurity.totp_failures + 1,
                        totp_locked_until=case(
                            (
                                MailboxSecurity.totp_failures + 1 >= TOTP_MAX_FAILURES,
                                literal(until, UTCDateTime()),
                            ),
                            else_=None,
                        ),
                        updated_at=now,
                    )
                    .returning(
                        MailboxSecurity.totp_secret,
                        MailboxSecurity.totp_last_step,
                        MailboxSecurity.totp_locked_until,
                    )
                )
            ).first()
            if counted is None:
                row = await self._row(s, address)
                locked = row.totp_locked_until if row is not None else None
                if row is None or row.totp_enabled_at is None or locked is None or locked <= now:
                    return TotpAttempt(ok=False)  # no TOTP enabled
                return TotpAttempt(ok=False, locked_until=locked)
        secret, last_step, locked_until = counted
        typed = _code(code)
        step = (
            None
            if typed is None or secret is None
            else self._matching_step(secret, typed, last_step)
        )
        if step is None or secret is None:
            return TotpAttempt(ok=False, locked_until=locked_until)
        async with self.db.session() as s, s.begin():
            # Only if no login used this step (or a later one) meanwhile: a code is good once.
            done = await s.execute(
                update(MailboxSecurity)
                .where(
                    MailboxSecurity.mailbox == address,
                    MailboxSecurity.totp_secret == secret,
                    MailboxSecurity.totp_enabled_at.is_not(None),
                    or_(
                        MailboxSecurity.totp_last_step.is_(None),
                        MailboxSecurity.totp_last_step < step,
                    ),
                )
                .values(
                    totp_last_step=step,
                    totp_failures=0,
                    totp_locked_until=None,
                    updated_at=self.clock.now(),
                )
                .returning(MailboxSecurity.mailbox)
            )
            if done.first() is not None:
                return TotpAttempt(ok=True)
        return TotpAttempt(ok=False, locked_until=locked_until)

    async def totp_locked_until(self, mailbox: str) -> datetime | None:
        """When the mailbox's TOTP lock ends, or None when it takes codes now."""
        async with self.db.read_session() as s:
            row = await self._row(s, normalize_address(mailbox))
        if row is None or row.totp_locked_until is None:
            return None
        return row.totp_locked_until if row.totp_locked_until > self.clock.now() else None

    async def totp_disable(self, mailbox: str) -> None:
        """Forget the mailbox's TOTP secret, enabled or pending (``totp_required`` stays)."""
        async with self.db.read_session() as s:
            address = await self._existing(s, mailbox)
            row = await self._row(s, address)
        if row is not None:
            await self._upsert(
                address,
                totp_secret=None,
                totp_enabled_at=None,
                totp_last_step=None,
                totp_failures=0,
                totp_locked_until=None,
                totp_pending_owner=None,
            )

    async def set_totp_required(self, mailbox: str, required: bool) -> None:
        """Turn the mailbox's "2FA mandatory" switch on or off."""
        await self._upsert(mailbox, totp_required=bool(required))

    async def password_alone_allowed(self, mailbox: str) -> bool:
        """Whether the mailbox password alone may open the mailbox over a mail protocol: the
        mailbox has neither TOTP enabled nor ``totp_required``."""
        async with self.db.read_session() as s:
            row = await self._row(s, normalize_address(mailbox))
        return allows_password_alone(row)

    # --- app passwords -----------------------------------------------------------------------

    async def app_password_create(self, mailbox: str, name: str) -> tuple[int, str]:
        """A new app password for the mailbox: its id and the password (shown only now)."""
        name = name.strip()
        if not name or len(name) > 255:
            raise AccountError("an app password needs a name of 1 to 255 characters")
        password = _new_app_password()
        async with self.db.session() as s, s.begin():
            address = await self._existing(s, mailbox)
            active = await s.scalar(
                select(func.count())
                .select_from(AppPassword)
                .where(AppPassword.mailbox == address, AppPassword.revoked_at.is_(None))
            )
            if (active or 0) >= MAX_APP_PASSWORDS:
                raise AccountError(
                    f"{address} has {MAX_APP_PASSWORDS} app passwords; revoke one first"
                )
            row = AppPassword(
                mailbox=address,
                name=name,
                password_hash=app_password_digest(password),
                created_at=self.clock.now(),
                last_used_at=None,
                revoked_at=None,
            )
            s.add(row)
            await s.flush()
            return row.id, password

    async def app_password_list(self, mailbox: str) -> builtins.list[AppPasswordInfo]:
        """The mailbox's app passwords, revoked ones too, oldest first."""
        async with self.db.read_session() as s:
            rows = await s.scalars(
                select(AppPassword)
                .where(AppPassword.mailbox == normalize_address(mailbox))
                .order_by(AppPassword.id)
            )
            return [_info(r) for r in rows]

    async def app_password_revoke(self, mailbox: str, password_id: int) -> None:
        """Revoke the mailbox's app password ``password_id`` (again: nothing changes);
        AccountError if the mailbox has no app password with that id."""
        address = normalize_address(mailbox)
        async with self.db.session() as s, s.begin():
            row = await s.get(AppPassword, password_id)
            if row is None or row.mailbox != address:
                raise AccountError(f"{address} has no app password {password_id}")
            if row.revoked_at is None:
                row.revoked_at = self.clock.now()

    async def app_password_login(self, mailbox: str, password: str) -> bool:
        """Whether ``password`` is an unrevoked app password of ``mailbox`` (canonical address;
        whether the mailbox is enabled is the caller's business). Notes the use."""
        canonical = app_password_canonical(password)
        if canonical is None:
            return False
        digest = app_password_digest(canonical)
        async with self.db.read_session() as s:
            found = (
                await s.execute(
                    select(AppPassword.id, AppPassword.last_used_at).where(
                        AppPassword.mailbox == mailbox,
                        AppPassword.password_hash == digest,
                        AppPassword.revoked_at.is_(None),
                    )
                )
            ).first()
        if found is None:
            return False
        now = self.clock.now()
        if found.last_used_at is None or now - found.last_used_at >= TOUCH_EVERY:
            async with self.db.session() as s, s.begin():
                await s.execute(
                    update(AppPassword).where(AppPassword.id == found.id).values(last_used_at=now)
                )
        return True


def allows_password_alone(row: MailboxSecurity | None) -> bool:
    """Whether a mailbox with this ``mailbox_security`` row (None: it has none) may log in to a
    mail protocol with its password alone."""
    if row is None:
        return True
    return row.totp_enabled_at is None and not row.totp_required
