"""pecd.store.db and the schema: URLs, connection setup, migrations, aware UTC datetimes."""

from __future__ import annotations

import asyncio
import os
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path

import pytest
from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy import Connection, inspect, select, text
from sqlalchemy.exc import IntegrityError, StatementError

import pecd
from pecd.store import db as dbmod
from pecd.store.db import Database, async_url, migrate, migrate_async
from pecd.store.models import Base, Domain, Job, Mailbox
from store_fixtures import (  # noqa: F401 (fixtures)
    PG_ENV,
    Backend,
    db_fixture,
    fresh_postgres_database,
    pg_url_fixture,
    sqlite_template_fixture,
)

T0 = datetime(2025, 3, 1, 12, 0, tzinfo=UTC)


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("sqlite:///data/pecd.db", "sqlite+aiosqlite:///data/pecd.db"),
        ("sqlite:////var/lib/pecd/pecd.db", "sqlite+aiosqlite:////var/lib/pecd/pecd.db"),
        ("sqlite://", "sqlite+aiosqlite://"),
        ("postgresql://u:p@h:5432/pecd", "postgresql+asyncpg://u:p@h:5432/pecd"),
        ("postgres://u@h/pecd?ssl=require", "postgresql+asyncpg://u@h/pecd?ssl=require"),
        ("sqlite+aiosqlite:///x.db", "sqlite+aiosqlite:///x.db"),
        ("postgresql+asyncpg://h/pecd", "postgresql+asyncpg://h/pecd"),
        ("postgresql+psycopg://h/pecd", "postgresql+psycopg://h/pecd"),
    ],
)
def test_async_url(url: str, expected: str) -> None:
    assert async_url(url) == expected


@pytest.mark.parametrize("url", ["mysql://h/db", "pecd.db"])
def test_async_url_refuses_others(url: str) -> None:
    with pytest.raises(ValueError):
        async_url(url)


def test_sqlite_open_creates_directory_and_sets_pragmas(tmp_path: Path) -> None:
    path = tmp_path / "deep" / "er" / "pecd.db"

    async def main() -> dict[str, object]:
        d = await Database.open(f"sqlite:///{path}")
        try:
            assert d.dialect == "sqlite"
            async with d.engine.connect() as conn:
                return {
                    p: (await conn.execute(text(f"PRAGMA {p}"))).scalar()
                    for p in ("journal_mode", "synchronous", "busy_timeout", "foreign_keys")
                }
        finally:
            await d.close()

    pragmas = asyncio.run(main())
    assert path.exists()
    assert pragmas == {
        "journal_mode": "wal",
        "synchronous": 2,  # FULL
        "busy_timeout": 10000,
        "foreign_keys": 1,
    }


def test_dialect(db: Backend) -> None:
    async def main(d: Database) -> str:
        return d.dialect

    assert db.run(main) == db.name


def _schema_differences(conn: Connection) -> list[object]:
    context = MigrationContext.configure(conn, opts={"compare_type": True})
    return list(compare_metadata(context, Base.metadata))


def test_migrated_schema_is_exactly_the_models(db: Backend) -> None:
    async def main(d: Database) -> tuple[list[object], list[str]]:
        async with d.engine.connect() as conn:
            diffs = await conn.run_sync(_schema_differences)
            names = await conn.run_sync(lambda c: sorted(inspect(c).get_table_names()))
        return diffs, names

    diffs, names = db.run(main)
    assert diffs == []
    assert names == sorted([*Base.metadata.tables, "alembic_version"])


def test_migrate_fresh_sqlite_is_idempotent(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'new' / 'pecd.db'}"
    migrate(url)
    migrate(url)  # nothing left to do

    async def main() -> list[object]:
        await migrate_async(url)
        d = await Database.open(url)
        try:
            async with d.engine.connect() as conn:
                return await conn.run_sync(_schema_differences)
        finally:
            await d.close()

    assert asyncio.run(main()) == []


@pytest.mark.skipif(not os.environ.get(PG_ENV), reason=f"{PG_ENV} not set")
def test_migrate_fresh_postgres() -> None:
    url, drop = fresh_postgres_database()
    try:

        async def main() -> list[object]:
            # Two nodes starting together: the advisory lock serialises them.
            await asyncio.gather(migrate_async(url), migrate_async(url))
            d = await Database.open(url)
            try:
                async with d.engine.connect() as conn:
                    return await conn.run_sync(_schema_differences)
            finally:
                await d.close()

        assert asyncio.run(main()) == []
    finally:
        drop()


def test_downgrade_and_upgrade_again(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'pecd.db'}"
    migrate(url)
    cfg = dbmod.alembic_config(url)

    async def tables() -> list[str]:
        d = await Database.open(url)
        try:
            async with d.engine.connect() as conn:
                return await conn.run_sync(lambda c: inspect(c).get_table_names())
        finally:
            await d.close()

    # 0005 made the virus store; going below it drops the table.
    assert "virus_store" in asyncio.run(tables())
    command.downgrade(cfg, "0004")
    assert "virus_store" not in asyncio.run(tables())
    # 0004 dropped the never-used delivery_records; going below it brings the table back.
    assert "delivery_records" not in asyncio.run(tables())
    command.downgrade(cfg, "0003")
    assert "delivery_records" in asyncio.run(tables())
    command.downgrade(cfg, "base")
    assert asyncio.run(tables()) == ["alembic_version"]
    migrate(url)
    assert set(asyncio.run(tables())) == {*Base.metadata.tables, "alembic_version"}


def test_missing_migrations_is_a_clear_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(pecd, "__file__", str(tmp_path / "site" / "x" / "pecd" / "__init__.py"))
    with pytest.raises(RuntimeError, match="Alembic migrations not found"):
        migrate(f"sqlite:///{tmp_path / 'pecd.db'}")


def test_datetimes_come_back_aware_utc(db: Backend) -> None:
    rome = timezone(timedelta(hours=2))
    at_rome = datetime(2025, 6, 1, 14, 30, 15, 123456, tzinfo=rome)

    async def main(d: Database) -> tuple[datetime, int]:
        async with d.session() as s, s.begin():
            s.add(Domain(name="pec.example.it", created_at=at_rome))
        async with d.session() as s:
            got = (await s.scalars(select(Domain.created_at))).one()
            # Comparison in the database is by instant, whatever offset was given.
            later = await s.scalar(
                select(Domain.name).where(
                    Domain.created_at < datetime(2025, 6, 1, 12, 31, tzinfo=UTC)
                )
            )
            earlier = await s.scalar(
                select(Domain.name).where(
                    Domain.created_at < datetime(2025, 6, 1, 12, 30, tzinfo=UTC)
                )
            )
        return got, int(later is not None) + 2 * int(earlier is not None)

    got, found = db.run(main)
    assert got == at_rome
    assert got.tzinfo is UTC
    assert got.hour == 12
    assert found == 1


def test_naive_datetimes_are_refused(db: Backend) -> None:
    async def main(d: Database) -> None:
        async with d.session() as s, s.begin():
            s.add(Domain(name="pec.example.it", created_at=datetime(2025, 1, 1)))

    with pytest.raises(StatementError, match="naive datetime"):
        db.run(main)


def test_foreign_keys_are_enforced(db: Backend) -> None:
    async def main(d: Database) -> None:
        async with d.session() as s, s.begin():
            s.add(
                Mailbox(
                    address="a@nowhere.it",
                    domain="nowhere.it",
                    password_hash="x",
                    created_at=T0,
                )
            )

    with pytest.raises(IntegrityError):
        db.run(main)


def test_job_state_is_checked(db: Backend) -> None:
    async def main(d: Database) -> None:
        async with d.session() as s, s.begin():
            s.add(
                Job(
                    kind="delivery",
                    key="k",
                    state="lost",
                    payload={},
                    attempts=0,
                    next_run_at=T0,
                    created_at=T0,
                    updated_at=T0,
                )
            )

    with pytest.raises(IntegrityError):
        db.run(main)
