"""pecd.store.security: TOTP enrolment and logins (RFC 6238), the "2FA mandatory" switch, and
what they do to Accounts' logins (mail protocols, the webmail's first step, password change).

Every test runs on SQLite and, with PECD_TEST_POSTGRES_URL, on PostgreSQL. The clock is a
FixedClock moved by hand, so the TOTP step is known; the codes are made by pyotp from the secret,
as an authenticator app makes them.
"""

from __future__ import annotations

import asyncio
import hashlib
from datetime import UTC, datetime, timedelta
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import pyotp
import pytest
from alembic import command
from sqlalchemy import func, inspect, select

from pecd.clock import FixedClock
from pecd.store.accounts import AccountError, Accounts
from pecd.store.db import Database, alembic_config, migrate
from pecd.store.models import AppPassword, MailboxSecurity, WebSession
from pecd.store.security import (
    TOTP_LOCK,
    TOTP_MAX_FAILURES,
    Security,
    TotpAttempt,
    TotpStatus,
)
from pecd.store.tokens import Tokens
from pecd.web.sessions import Sessions
from store_fixtures import (  # noqa: F401 (fixtures)
    Backend,
    cheap_hasher,
    db_fixture,
    pg_url_fixture,
    sqlite_template_fixture,
)

# A whole TOTP step: 2025-03-01 12:00:00 UTC is a multiple of 30 s.
T0 = datetime(2025, 3, 1, 12, 0, tzinfo=UTC)
STEP0 = int(T0.timestamp()) // 30
DOMAIN = "pec.example.it"
MARIO = f"mario.rossi@{DOMAIN}"
ANNA = f"anna.bianchi@{DOMAIN}"
PASSWORD = "correct horse battery"


def code_at(secret: str, step: int) -> str:
    """The code an authenticator app shows during ``step`` (SHA-1, 6 digits, 30 s)."""
    return pyotp.TOTP(secret, digits=6, digest=hashlib.sha1, interval=30).generate_otp(step)


async def setup(d: Database, clock: FixedClock) -> Accounts:
    acc = Accounts(d, hasher=cheap_hasher(), clock=clock)
    await acc.add_domain(DOMAIN)
    await acc.add_mailbox(MARIO, PASSWORD)
    await acc.add_mailbox(ANNA, PASSWORD)
    return acc


async def enrolled(sec: Security, address: str = MARIO, step: int = STEP0) -> str:
    secret = await sec.totp_begin(address)
    assert await sec.totp_confirm(address, code_at(secret, step))
    return secret


def test_enrolment_is_pending_until_a_right_code(db: Backend) -> None:
    async def main(d: Database) -> None:
        clock = FixedClock(T0)
        sec = (await setup(d, clock)).security
        assert await sec.totp_status(MARIO) == TotpStatus(False, False, False)
        assert await sec.totp_pending_secret(MARIO) is None
        secret = await sec.totp_begin(MARIO.upper())
        assert await sec.totp_pending_secret(MARIO.upper()) == secret
        assert len(secret) == 32 and pyotp.TOTP(secret).byte_secret()  # base32, 160 bits
        assert await sec.totp_status(MARIO) == TotpStatus(
            enabled=False, required=False, pending=True
        )
        # A pending secret is no second factor yet: no login with it.
        assert not await sec.totp_verify(MARIO, code_at(secret, STEP0))
        wrong = f"{(int(code_at(secret, STEP0)) + 1) % 10**6:06d}"
        assert not await sec.totp_confirm(MARIO, wrong)
        for junk in ("", "12345", "1234567", "12345a", "1" * 100, "１２３４５６"):
            assert not await sec.totp_confirm(MARIO, junk)
        # Beginning again replaces the pending secret; the old one's codes no longer confirm.
        again = await sec.totp_begin(MARIO)
        assert again != secret
        assert not await sec.totp_confirm(MARIO, code_at(secret, STEP0))
        # Spaces as apps show them ("123 456") are fine.
        code = code_at(again, STEP0)
        assert await sec.totp_confirm(MARIO, f" {code[:3]} {code[3:]} ")
        assert await sec.totp_status(MARIO) == TotpStatus(
            enabled=True, required=False, pending=False
        )
        assert await sec.totp_pending_secret(MARIO) is None
        # Confirming is once; a new enrolment needs the old TOTP disabled first.
        assert not await sec.totp_confirm(MARIO, code)
        with pytest.raises(AccountError, match="already has TOTP enabled; disable it first"):
            await sec.totp_begin(MARIO)
        # The code that confirmed the enrolment is used: no login with it.
        assert not await sec.totp_verify(MARIO, code)
        async with d.read_session() as s:
            row = await s.get(MailboxSecurity, MARIO)
        assert row is not None and row.totp_secret == again and row.totp_enabled_at == T0
        assert row.totp_last_step == STEP0
        # The other mailbox has nothing.
        assert await sec.totp_status(ANNA) == TotpStatus(False, False, False)
        for call in (sec.totp_begin, sec.totp_status, sec.totp_disable):
            with pytest.raises(AccountError, match=r"^mailbox x@pec\.example\.it does not exist$"):
                await call(f"x@{DOMAIN}")
        with pytest.raises(AccountError, match="does not exist"):
            await sec.set_totp_required(f"x@{DOMAIN}", True)

    db.run(main)


def test_a_code_is_good_once_and_a_step_either_side(db: Backend) -> None:
    async def main(d: Database) -> None:
        clock = FixedClock(T0)
        sec = (await setup(d, clock)).security
        secret = await sec.totp_begin(MARIO)
        # Confirmed with the step before (a phone a little behind).
        assert await sec.totp_confirm(MARIO, code_at(secret, STEP0 - 1))
        clock.advance(timedelta(seconds=90))  # three steps on
        now = STEP0 + 3
        # Two steps away either side: refused.
        assert not await sec.totp_verify(MARIO, code_at(secret, now - 2))
        assert not await sec.totp_verify(MARIO, code_at(secret, now + 2))
        # One step behind: accepted, once.
        assert await sec.totp_verify(MARIO, code_at(secret, now - 1))
        assert not await sec.totp_verify(MARIO, code_at(secret, now - 1))
        # The current step, then one ahead (a phone a little ahead).
        assert await sec.totp_verify(MARIO, code_at(secret, now))
        assert await sec.totp_verify(MARIO, code_at(secret, now + 1))
        # Now every code of the window is used: the current one too, although in the window.
        assert not await sec.totp_verify(MARIO, code_at(secret, now))
        # Later steps bring new codes.
        clock.advance(timedelta(seconds=60))
        assert await sec.totp_verify(MARIO, code_at(secret, now + 2))
        # A code of a step before one that was used is refused, though within the window.
        clock.advance(timedelta(seconds=60))
        assert await sec.totp_verify(MARIO, code_at(secret, now + 5))
        assert not await sec.totp_verify(MARIO, code_at(secret, now + 4))
        # Another mailbox's code does not open this one.
        other = await enrolled(sec, ANNA, now + 4)
        clock.advance(timedelta(seconds=60))
        assert not await sec.totp_verify(MARIO, code_at(other, now + 6))
        assert await sec.totp_verify(MARIO, code_at(secret, now + 6))

    db.run(main)


def test_two_logins_racing_with_one_code_only_one_wins(db: Backend) -> None:
    async def main(d: Database) -> list[bool]:
        clock = FixedClock(T0)
        sec = (await setup(d, clock)).security
        secret = await enrolled(sec)
        clock.advance(timedelta(seconds=30))
        code = code_at(secret, STEP0 + 1)
        return list(await asyncio.gather(*(sec.totp_verify(MARIO, code) for _ in range(5))))

    assert sorted(db.run(main)) == [False, False, False, False, True]


def test_disable_and_required(db: Backend) -> None:
    async def main(d: Database) -> None:
        clock = FixedClock(T0)
        sec = (await setup(d, clock)).security
        await sec.set_totp_required(MARIO, True)
        assert await sec.totp_status(MARIO) == TotpStatus(
            enabled=False, required=True, pending=False
        )
        secret = await enrolled(sec)
        assert await sec.totp_status(MARIO) == TotpStatus(
            enabled=True, required=True, pending=False
        )
        await sec.totp_disable(MARIO)
        # Gone (a lost phone), and its codes with it; the switch stays on.
        assert await sec.totp_status(MARIO) == TotpStatus(
            enabled=False, required=True, pending=False
        )
        clock.advance(timedelta(seconds=30))
        assert not await sec.totp_verify(MARIO, code_at(secret, STEP0 + 1))
        # Enrolling again works, with a new secret.
        fresh = await sec.totp_begin(MARIO)
        assert fresh != secret
        assert await sec.totp_confirm(MARIO, code_at(fresh, STEP0 + 1))
        await sec.set_totp_required(MARIO, False)
        assert await sec.totp_status(MARIO) == TotpStatus(
            enabled=True, required=False, pending=False
        )
        # Disabling a mailbox that never had TOTP makes nothing.
        await sec.totp_disable(ANNA)
        async with d.read_session() as s:
            assert await s.get(MailboxSecurity, ANNA) is None

    db.run(main)


def test_totp_uri_is_what_authenticator_apps_read() -> None:
    secret = pyotp.random_base32()
    uri = Security.totp_uri("Mario.Rossi@PEC.Example.it", secret, issuer="PEC Example")
    parts = urlsplit(uri)
    assert (parts.scheme, parts.netloc) == ("otpauth", "totp")
    assert parts.path == "/PEC%20Example:mario.rossi%40pec.example.it"
    query = parse_qs(parts.query)
    assert query["secret"] == [secret] and query["issuer"] == ["PEC Example"]
    # Defaults (SHA1, 6 digits, 30 s) are left out, as Google Authenticator expects them.
    assert "algorithm" not in query and "digits" not in query and "period" not in query
    parsed = pyotp.parse_uri(uri)
    assert isinstance(parsed, pyotp.TOTP)
    assert parsed.now() == pyotp.TOTP(secret).now()


# --- what the second factor does to logins ---------------------------------------------------------


class CountingAccounts(Accounts):
    """Accounts that count their argon2 checks (the work a login costs)."""

    checks = 0

    def _verify(self, password_hash: str, password: str) -> bool:
        self.checks += 1
        return super()._verify(password_hash, password)


def test_password_alone_no_longer_opens_a_mailbox_with_a_second_factor(db: Backend) -> None:
    async def main(d: Database) -> None:
        clock = FixedClock(T0)
        await setup(d, clock)
        acc = CountingAccounts(d, hasher=cheap_hasher(), clock=clock)
        sec = acc.security
        assert await acc.authenticate(MARIO, PASSWORD) == MARIO  # now remembered
        secret = await sec.totp_begin(MARIO)
        # A pending enrolment changes nothing yet.
        assert await acc.authenticate(MARIO, PASSWORD) == MARIO
        assert await sec.totp_confirm(MARIO, code_at(secret, STEP0))
        before = acc.checks
        # Refused though remembered, and at the cost of a full check all the same.
        assert await acc.authenticate(MARIO, PASSWORD) is None
        assert await acc.authenticate(MARIO, "wrong password") is None
        assert acc.checks == before + 2
        assert await acc.authenticate(MARIO, PASSWORD + "x") is None
        # The webmail's first step still takes the password (the second factor comes next).
        assert await acc.authenticate_web(MARIO, PASSWORD) == MARIO
        assert await acc.authenticate_web(MARIO, "wrong password") is None
        # An app password opens it to mail clients, never to the webmail.
        _id, app = await sec.app_password_create(MARIO, "Thunderbird")
        checks = acc.checks
        assert await acc.authenticate(MARIO, app) == MARIO
        assert acc.checks == checks  # looked up by digest: no argon2 check
        assert await acc.authenticate_web(MARIO, app) is None
        # Required without TOTP: the same for the password.
        assert not await sec.password_alone_allowed(MARIO)
        assert await sec.password_alone_allowed(ANNA)
        await sec.set_totp_required(ANNA, True)
        assert not await sec.password_alone_allowed(ANNA)
        assert await acc.authenticate(ANNA, PASSWORD) is None
        assert await acc.authenticate_web(ANNA, PASSWORD) == ANNA
        await sec.set_totp_required(ANNA, False)
        assert await acc.authenticate(ANNA, PASSWORD) == ANNA
        # TOTP removed: the password works for mail clients again.
        await sec.totp_disable(MARIO)
        assert await acc.authenticate(MARIO, PASSWORD) == MARIO

    db.run(main)


def test_change_password(db: Backend) -> None:
    async def main(d: Database) -> None:
        clock = FixedClock(T0)
        acc = await setup(d, clock)
        assert await acc.authenticate(MARIO, PASSWORD) == MARIO  # remembered
        assert not await acc.change_password(MARIO, "wrong password", "a new long password")
        with pytest.raises(AccountError, match=r"^password must be at least 8 characters$"):
            await acc.change_password(MARIO, PASSWORD, "short")
        assert await acc.authenticate(MARIO, PASSWORD) == MARIO
        assert await acc.change_password(MARIO.upper(), PASSWORD, "a new long password")
        assert await acc.authenticate(MARIO, PASSWORD) is None
        assert await acc.authenticate_web(MARIO, PASSWORD) is None
        assert await acc.authenticate(MARIO, "a new long password") == MARIO
        assert await acc.authenticate_web(MARIO, "a new long password") == MARIO
        # An app password is no way to change the mailbox password.
        _id, app = await acc.security.app_password_create(MARIO, "phone")
        assert not await acc.change_password(MARIO, app, "yet another password")
        # Nor is a disabled mailbox's password, nor an unknown mailbox.
        await acc.disable(ANNA)
        assert not await acc.change_password(ANNA, PASSWORD, "yet another password")
        assert not await acc.change_password(f"x@{DOMAIN}", PASSWORD, "yet another password")
        # Another process that remembered the old password sees the change at once.
        other = Accounts(d, hasher=cheap_hasher(), clock=clock)
        assert await other.authenticate(MARIO, "a new long password") == MARIO
        assert await acc.change_password(MARIO, "a new long password", "the third password")
        assert await other.authenticate(MARIO, "a new long password") is None

    db.run(main)


# --- the TOTP lockout (counted in the database, before the code is looked at) -----------------


def _wrong(secret: str, step: int) -> str:
    """A code that is right for no step in the window around ``step``."""
    right = {code_at(secret, s) for s in range(step - 2, step + 3)}
    return next(f"{n:06d}" for n in range(10**6) if f"{n:06d}" not in right)


async def _failures(d: Database, address: str = MARIO) -> tuple[int, datetime | None]:
    async with d.read_session() as s:
        row = await s.get(MailboxSecurity, address)
    assert row is not None
    return row.totp_failures, row.totp_locked_until


def test_wrong_codes_lock_the_mailbox_and_a_right_code_is_refused_while_locked(
    db: Backend,
) -> None:
    async def main(d: Database) -> None:
        clock = FixedClock(T0)
        sec = (await setup(d, clock)).security
        secret = await enrolled(sec)
        clock.advance(timedelta(seconds=30))
        step = STEP0 + 1
        wrong = _wrong(secret, step)
        assert await _failures(d) == (0, None)
        # Four wrong codes: counted, no lock; a right one then starts the count again.
        for n in range(1, TOTP_MAX_FAILURES):
            assert await sec.totp_attempt(MARIO, wrong) == TotpAttempt(ok=False)
            assert await _failures(d) == (n, None)
        assert await sec.totp_attempt(MARIO, code_at(secret, step)) == TotpAttempt(ok=True)
        assert await _failures(d) == (0, None)
        # Five wrong codes in a row (malformed ones count too): the fifth locks.
        for _ in range(TOTP_MAX_FAILURES - 2):
            assert not (await sec.totp_attempt(MARIO, wrong)).ok
        assert await sec.totp_attempt(MARIO, "12") == TotpAttempt(ok=False)
        until = T0 + timedelta(seconds=30) + TOTP_LOCK
        assert await sec.totp_attempt(MARIO, wrong) == TotpAttempt(ok=False, locked_until=until)
        assert await _failures(d) == (TOTP_MAX_FAILURES, until)
        assert await sec.totp_locked_until(MARIO) == until
        # Locked: the right code of the next step gets what a wrong one gets, and neither counts.
        clock.advance(timedelta(seconds=30))
        right = code_at(secret, step + 1)
        assert await sec.totp_attempt(MARIO, right) == TotpAttempt(ok=False, locked_until=until)
        assert await sec.totp_attempt(MARIO, wrong) == TotpAttempt(ok=False, locked_until=until)
        assert not await sec.totp_verify(MARIO, right)
        assert await _failures(d) == (TOTP_MAX_FAILURES, until)
        # Lock over: one more wrong code locks again at once (one guess per lock) ...
        clock.advance(until - clock.now())
        assert await sec.totp_locked_until(MARIO) is None
        again = until + TOTP_LOCK
        assert await sec.totp_attempt(MARIO, wrong) == TotpAttempt(ok=False, locked_until=again)
        # ... and after that lock a right code goes in and clears the count.
        clock.advance(again - clock.now())
        now_step = int(again.timestamp()) // 30
        assert await sec.totp_attempt(MARIO, code_at(secret, now_step)) == TotpAttempt(ok=True)
        assert await _failures(d) == (0, None)
        # The other mailbox has its own count; disabling TOTP clears one.
        assert await sec.totp_attempt(ANNA, wrong) == TotpAttempt(ok=False)  # no TOTP: nothing
        async with d.read_session() as s:
            assert await s.get(MailboxSecurity, ANNA) is None
        for _ in range(TOTP_MAX_FAILURES):
            await sec.totp_attempt(MARIO, wrong)
        assert (await _failures(d))[0] == TOTP_MAX_FAILURES
        await sec.totp_disable(MARIO)
        assert await _failures(d) == (0, None)

    db.run(main)


def test_parallel_codes_are_counted_before_they_are_checked(db: Backend) -> None:
    """Twenty codes tried at once: the count goes up in the UPDATE that refuses a locked
    mailbox, so only TOTP_MAX_FAILURES of them are ever looked at."""

    async def main(d: Database) -> None:
        clock = FixedClock(T0)
        sec = (await setup(d, clock)).security
        secret = await enrolled(sec)
        clock.advance(timedelta(seconds=30))
        codes = [f"{n:06d}" for n in range(100000, 100020)]
        right = {code_at(secret, s) for s in range(STEP0, STEP0 + 3)}
        codes = [c for c in codes if c not in right]
        results = await asyncio.gather(*(sec.totp_attempt(MARIO, c) for c in codes))
        assert not any(r.ok for r in results)
        looked_at = [r for r in results if r.locked_until is None]
        assert len(looked_at) == TOTP_MAX_FAILURES - 1  # the fifth locked, the rest found it
        assert (await _failures(d))[0] == TOTP_MAX_FAILURES

    db.run(main)


def test_an_enrolment_belongs_to_whoever_began_it(db: Backend) -> None:
    async def main(d: Database) -> None:
        clock = FixedClock(T0)
        sec = (await setup(d, clock)).security
        mine = await sec.totp_begin(MARIO, owner="a" * 64)
        assert await sec.totp_pending_secret(MARIO, owner="a" * 64) == mine
        assert await sec.totp_pending_secret(MARIO, owner="b" * 64) is None
        assert await sec.totp_pending_secret(MARIO) is None
        assert not await sec.totp_confirm(MARIO, code_at(mine, STEP0), owner="b" * 64)
        assert not await sec.totp_confirm(MARIO, code_at(mine, STEP0))
        # Another begins: a secret of its own replaces the first, which no longer confirms.
        theirs = await sec.totp_begin(MARIO, owner="b" * 64)
        assert theirs != mine
        assert await sec.totp_pending_secret(MARIO, owner="a" * 64) is None
        assert not await sec.totp_confirm(MARIO, code_at(mine, STEP0), owner="a" * 64)
        assert await sec.totp_confirm(MARIO, code_at(theirs, STEP0), owner="b" * 64)
        async with d.read_session() as s:
            row = await s.get(MailboxSecurity, MARIO)
        assert row is not None and row.totp_pending_owner is None and row.totp_secret == theirs

    db.run(main)


# --- a new password: sessions end, app passwords are revoked ----------------------------------


async def _sessions_and_app_passwords(d: Database, address: str) -> tuple[int, int]:
    async with d.read_session() as s:
        sessions = await s.scalar(
            select(func.count()).select_from(WebSession).where(WebSession.mailbox == address)
        )
        active = await s.scalar(
            select(func.count())
            .select_from(AppPassword)
            .where(AppPassword.mailbox == address, AppPassword.revoked_at.is_(None))
        )
    return sessions or 0, active or 0


def test_a_new_password_ends_web_sessions_and_revokes_app_passwords(db: Backend) -> None:
    async def main(d: Database) -> None:
        clock = FixedClock(T0)
        acc = await setup(d, clock)
        sessions = Sessions(d, clock)
        for address in (MARIO, MARIO, ANNA):
            await sessions.start(address, "ok")
            await acc.security.app_password_create(address, "phone")
        _id, api_token = await Tokens(d, clock).create(MARIO, "erp")
        assert await _sessions_and_app_passwords(d, MARIO) == (2, 2)
        # The holder's change: a wrong old password changes nothing.
        assert not await acc.change_password(MARIO, "wrong password", "a new long password")
        assert await _sessions_and_app_passwords(d, MARIO) == (2, 2)
        assert await acc.change_password(MARIO, PASSWORD, "a new long password")
        assert await _sessions_and_app_passwords(d, MARIO) == (0, 0)
        [first, second] = await acc.security.app_password_list(MARIO)
        assert first.revoked_at == T0 and second.revoked_at == T0
        # The operator's: the same.
        await sessions.start(MARIO, "ok")
        _id, app = await acc.security.app_password_create(MARIO, "tablet")
        assert await acc.authenticate(MARIO, app) == MARIO
        await acc.set_password(MARIO, "set by the operator")
        assert await _sessions_and_app_passwords(d, MARIO) == (0, 0)
        assert await acc.authenticate(MARIO, app) is None
        # Another mailbox keeps its own; API tokens stay (they are for programs).
        assert await _sessions_and_app_passwords(d, ANNA) == (1, 1)
        assert await Tokens(d, clock).authenticate(api_token) == MARIO
        with pytest.raises(AccountError, match="does not exist"):
            await acc.set_password(f"x@{DOMAIN}", "a long enough one")

    db.run(main)


def test_password_checks_do_not_wait_behind_the_default_executor(db: Backend) -> None:
    """Work queued in asyncio's default executor (the webmail parses messages there) does not
    hold logins back: the hashes have their own threads."""

    async def main(d: Database) -> None:
        import threading
        from concurrent.futures import ThreadPoolExecutor

        clock = FixedClock(T0)
        acc = await setup(d, clock)
        loop = asyncio.get_running_loop()
        loop.set_default_executor(ThreadPoolExecutor(max_workers=1))
        busy = threading.Event()
        hog = loop.run_in_executor(None, busy.wait, 10)
        try:
            fresh = Accounts(d, hasher=cheap_hasher(), clock=clock)  # nothing remembered
            ok = await asyncio.wait_for(fresh.authenticate_web(MARIO, PASSWORD), timeout=5)
            assert ok == MARIO
            await asyncio.wait_for(acc.set_password(ANNA, "another password"), timeout=5)
        finally:
            busy.set()
            await hog

    db.run(main)


def test_migration_0008_down_and_up(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'pecd.db'}"
    migrate(url)

    async def columns() -> set[str]:
        d = await Database.open(url)
        try:
            async with d.engine.connect() as conn:
                cols = await conn.run_sync(lambda c: inspect(c).get_columns("mailbox_security"))
            return {c["name"] for c in cols}
        finally:
            await d.close()

    added = {"totp_failures", "totp_locked_until", "totp_pending_owner"}
    assert added <= asyncio.run(columns())
    command.downgrade(alembic_config(url), "0007")
    assert not added & asyncio.run(columns())
    migrate(url)
    assert added <= asyncio.run(columns())
