"""pecd.store.accounts: domains, mailboxes, argon2id logins (quota sizes: test_address.py)."""

from __future__ import annotations

import threading
from datetime import UTC, datetime
from typing import Literal

import pytest
from argon2 import PasswordHasher

from pecd.clock import FixedClock
from pecd.store.accounts import AccountError, Accounts
from pecd.store.db import Database
from pecd.store.models import Mailbox
from store_fixtures import (  # noqa: F401 (fixtures)
    Backend,
    cheap_hasher,
    db_fixture,
    pg_url_fixture,
    sqlite_template_fixture,
)

T0 = datetime(2025, 3, 1, 12, 0, tzinfo=UTC)
DOMAIN = "pec.example.it"
PASSWORD = "correct horse battery"


def accounts(d: Database, hasher: PasswordHasher | None = None) -> Accounts:
    return Accounts(d, hasher=hasher or cheap_hasher(), clock=FixedClock(T0))


async def with_mailbox(d: Database, address: str = f"mario.rossi@{DOMAIN}") -> Accounts:
    acc = accounts(d)
    await acc.add_domain(DOMAIN)
    await acc.add_mailbox(address, PASSWORD)
    return acc


def test_domains(db: Backend) -> None:
    async def main(d: Database) -> list[tuple[str, datetime]]:
        acc = accounts(d)
        await acc.add_domain("PEC.Example.IT")
        await acc.add_domain("pec.altro.it")
        with pytest.raises(AccountError, match=r"^domain pec\.example\.it already exists$"):
            await acc.add_domain("pec.example.it")
        for bad in ("", "localhost", "pec..it", "-x.it", "a b.it", "x@y.it"):
            with pytest.raises(AccountError, match="not a domain name"):
                await acc.add_domain(bad)
        return [(x.name, x.created_at) for x in await acc.list_domains()]

    assert db.run(main) == [("pec.altro.it", T0), ("pec.example.it", T0)]


def test_add_mailbox(db: Backend) -> None:
    async def main(d: Database) -> list[Mailbox]:
        acc = accounts(d)
        with pytest.raises(AccountError, match=r"^domain pec\.example\.it is not configured$"):
            await acc.add_mailbox(f"a@{DOMAIN}", PASSWORD)
        await acc.add_domain(DOMAIN)
        await acc.add_domain("pec.altro.it")
        added = await acc.add_mailbox("  Mario.Rossi@PEC.Example.it ", PASSWORD, 500 * 2**20)
        assert added.address == f"mario.rossi@{DOMAIN}"
        await acc.add_mailbox("b@pec.altro.it", PASSWORD)
        with pytest.raises(AccountError, match=r"^mailbox mario\.rossi@pec\.example\.it already"):
            await acc.add_mailbox(f"MARIO.ROSSI@{DOMAIN}", PASSWORD)
        with pytest.raises(AccountError, match=r"^password must be at least 8 characters$"):
            await acc.add_mailbox(f"c@{DOMAIN}", "short")
        with pytest.raises(AccountError, match="must not be negative"):
            await acc.add_mailbox(f"c@{DOMAIN}", PASSWORD, -1)
        for bad in ("nobody", "@pec.example.it", "a@", "a b@pec.example.it", "a..b@x.it"):
            with pytest.raises(AccountError, match=r"^not a mail address: "):
                await acc.add_mailbox(bad, PASSWORD)
        assert [m.address for m in await acc.list_mailboxes("pec.altro.it")] == ["b@pec.altro.it"]
        assert await acc.get("nobody@pec.example.it") is None
        return await acc.list_mailboxes()

    found = db.run(main)
    assert [(m.address, m.domain, m.quota_bytes, m.disabled, m.created_at) for m in found] == [
        ("b@pec.altro.it", "pec.altro.it", None, False, T0),
        (f"mario.rossi@{DOMAIN}", DOMAIN, 500 * 2**20, False, T0),
    ]
    assert found[1].password_hash.startswith("$argon2id$")
    assert PASSWORD not in found[1].password_hash


def test_authenticate(db: Backend) -> None:
    async def main(d: Database) -> list[str | None]:
        acc = await with_mailbox(d)
        return [
            await acc.authenticate(f"mario.rossi@{DOMAIN}", PASSWORD),
            await acc.authenticate(" Mario.Rossi@PEC.EXAMPLE.IT", PASSWORD),
            await acc.authenticate(f"mario.rossi@{DOMAIN}", PASSWORD.upper()),
            await acc.authenticate(f"mario.rossi@{DOMAIN}", ""),
            await acc.authenticate(f"nobody@{DOMAIN}", PASSWORD),
            await acc.authenticate("not an address", PASSWORD),
        ]

    ok = f"mario.rossi@{DOMAIN}"
    assert db.run(main) == [ok, ok, None, None, None, None]


def test_successful_logins_are_remembered_not_wrong_ones(db: Backend) -> None:
    """A right password is checked with argon2 once per login_cache_seconds; a wrong one, a
    changed password or a disabled mailbox always goes to the full check."""
    address = f"mario.rossi@{DOMAIN}"

    async def main(d: Database) -> list[tuple[str | None, int]]:
        acc = await with_mailbox(d)
        calls = 0
        real = acc._verify

        def counting(stored: str, password: str) -> bool:
            nonlocal calls
            calls += 1
            return real(stored, password)

        acc._verify = counting  # type: ignore[method-assign]
        seen = []
        for password in (PASSWORD, PASSWORD, "wrong password", PASSWORD):
            seen.append((await acc.authenticate(address, password), calls))
        await acc.set_password(address, "another long password")
        seen.append((await acc.authenticate(address, PASSWORD), calls))
        seen.append((await acc.authenticate(address, "another long password"), calls))
        await acc.disable(address)
        seen.append((await acc.authenticate(address, "another long password"), calls))
        await acc.enable(address)
        acc.login_cache_seconds = 0
        acc._logins.clear()
        seen.append((await acc.authenticate(address, "another long password"), calls))
        seen.append((await acc.authenticate(address, "another long password"), calls))
        return seen

    assert db.run(main) == [
        (address, 1),
        (address, 1),  # remembered
        (None, 2),  # a wrong password is always checked
        (address, 2),
        (None, 3),  # the old password after a change
        (address, 4),
        (None, 5),  # disabled
        (address, 6),  # no cache: every login is checked
        (address, 7),
    ]


def test_disable_enable_and_password_change(db: Backend) -> None:
    address = f"mario.rossi@{DOMAIN}"

    async def main(d: Database) -> None:
        acc = await with_mailbox(d)
        await acc.disable(address.upper())
        mailbox = await acc.get(address)
        assert mailbox is not None and mailbox.disabled
        assert await acc.authenticate(address, PASSWORD) is None
        await acc.enable(address)
        assert await acc.authenticate(address, PASSWORD) == address
        await acc.set_password(address, "another long password")
        assert await acc.authenticate(address, PASSWORD) is None
        assert await acc.authenticate(address, "another long password") == address
        with pytest.raises(AccountError, match=r"^password must be at least 8 characters$"):
            await acc.set_password(address, "1234567")
        for call in (acc.disable, acc.enable):
            with pytest.raises(AccountError, match=r"^mailbox x@pec\.example\.it does not exist$"):
                await call(f"x@{DOMAIN}")
        with pytest.raises(AccountError, match="does not exist"):
            await acc.set_password(f"x@{DOMAIN}", PASSWORD)

    db.run(main)


def test_rehash_when_parameters_change(db: Backend) -> None:
    address = f"mario.rossi@{DOMAIN}"
    stronger = PasswordHasher(time_cost=2, memory_cost=16, parallelism=1)

    async def main(d: Database) -> tuple[str, str]:
        await with_mailbox(d)
        before = await accounts(d).get(address)
        assert before is not None
        acc = accounts(d, stronger)
        assert await acc.authenticate(address, "wrong password") is None
        unchanged = await acc.get(address)
        assert unchanged is not None and unchanged.password_hash == before.password_hash
        assert await acc.authenticate(address, PASSWORD) == address
        after = await acc.get(address)
        assert after is not None
        return before.password_hash, after.password_hash

    before, after = db.run(main)
    assert before != after
    assert not stronger.check_needs_rehash(after)
    assert stronger.verify(after, PASSWORD)


class RecordingHasher(PasswordHasher):
    def __init__(self) -> None:
        super().__init__(time_cost=1, memory_cost=8, parallelism=1)
        self.threads: set[int] = set()

    def verify(self, hash: str | bytes, password: str | bytes) -> Literal[True]:
        self.threads.add(threading.get_ident())
        return super().verify(hash, password)


def test_password_checks_run_off_the_event_loop(db: Backend) -> None:
    hasher = RecordingHasher()

    async def main(d: Database) -> int:
        await with_mailbox(d)
        acc = accounts(d, hasher)
        await acc.authenticate(f"mario.rossi@{DOMAIN}", PASSWORD)
        await acc.authenticate(f"nobody@{DOMAIN}", PASSWORD)  # checked against the dummy hash
        return threading.get_ident()

    loop_thread = db.run(main)
    assert hasher.threads and loop_thread not in hasher.threads
    assert len(hasher.threads) >= 1


def test_a_login_with_undecodable_or_nul_text_is_refused_not_an_error(db: Backend) -> None:
    async def main(d: Database) -> list[str | None]:
        acc = await with_mailbox(d)
        return [
            await acc.authenticate(f"mario.rossi@{DOMAIN}\udccb", PASSWORD),
            await acc.authenticate(f"mario.rossi@{DOMAIN}", PASSWORD + "\udcff"),
            await acc.authenticate(f"mario.rossi\x00@{DOMAIN}", PASSWORD),
        ]

    assert db.run(main) == [None, None, None]
