"""The ``db`` fixture of the store tests: every test runs on SQLite, and on PostgreSQL too when
``PECD_TEST_POSTGRES_URL`` names a server (e.g. ``postgresql://postgres@127.0.0.1:5432/test``).

PostgreSQL runs are isolated in a database of their own (``pecd_test_<random>``), created for the
test session, migrated once, emptied before each test and dropped at the end. SQLite tests each
get a copy of a database file migrated once per session.

Test modules import the fixture functions (``db_fixture``, ``pg_url_fixture``,
``sqlite_template_fixture``); pytest knows them as ``db``, ``pg_url`` and ``sqlite_template``.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import uuid
from collections.abc import Callable, Coroutine, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import pytest
from argon2 import PasswordHasher
from sqlalchemy import text
from sqlalchemy.engine import make_url
from sqlalchemy.ext.asyncio import create_async_engine

from pecd.store.db import Database, async_url, migrate
from pecd.store.models import Base

PG_ENV = "PECD_TEST_POSTGRES_URL"
T = TypeVar("T")

BACKENDS = [
    pytest.param("sqlite", id="sqlite"),
    pytest.param(
        "postgresql",
        id="postgresql",
        marks=pytest.mark.skipif(not os.environ.get(PG_ENV), reason=f"{PG_ENV} not set"),
    ),
]


def cheap_hasher() -> PasswordHasher:
    """argon2id with the smallest parameters: tests stay fast."""
    return PasswordHasher(time_cost=1, memory_cost=8, parallelism=1)


@dataclass(frozen=True)
class Backend:
    """A migrated, empty database for one test."""

    name: str  # "sqlite" | "postgresql"
    url: str

    def run(self, fn: Callable[[Database], Coroutine[Any, Any, T]]) -> T:
        """Open the database, await ``fn(db)`` in a fresh event loop, close it."""

        async def go() -> T:
            db = await Database.open(self.url)
            try:
                return await fn(db)
            finally:
                await db.close()

        return asyncio.run(go())


async def _admin(base_url: str, sql: str) -> None:
    engine = create_async_engine(async_url(base_url), isolation_level="AUTOCOMMIT")
    try:
        async with engine.connect() as conn:
            await conn.execute(text(sql))
    finally:
        await engine.dispose()


def fresh_postgres_database() -> tuple[str, Callable[[], None]]:
    """Create a uniquely named database beside the one ``PECD_TEST_POSTGRES_URL`` names; return
    its URL and a function that drops it."""
    base = os.environ[PG_ENV]
    name = f"pecd_test_{uuid.uuid4().hex[:12]}"
    asyncio.run(_admin(base, f'CREATE DATABASE "{name}"'))
    url = make_url(base).set(database=name).render_as_string(hide_password=False)

    def drop() -> None:
        asyncio.run(_admin(base, f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))

    return url, drop


def migrated_postgres() -> Iterator[str]:
    """A fresh, migrated PostgreSQL database while the generator runs (a fixture's body:
    ``yield from migrated_postgres()``), dropped afterwards."""
    url, drop = fresh_postgres_database()
    try:
        migrate(url)
        yield url
    finally:
        drop()


async def sql_rows(url: str, sql: str) -> list[tuple[object, ...]]:
    """Run ``sql`` on its own connection (autocommit); its rows, if it returns any."""
    engine = create_async_engine(async_url(url), isolation_level="AUTOCOMMIT")
    try:
        async with engine.connect() as conn:
            result = await conn.execute(text(sql))
            return [tuple(r) for r in result.all()] if result.returns_rows else []
    finally:
        await engine.dispose()


@pytest.fixture(scope="session", name="pg_url")
def pg_url_fixture() -> Iterator[str]:
    """A migrated PostgreSQL database of this test session."""
    yield from migrated_postgres()


@pytest.fixture(scope="session", name="sqlite_template")
def sqlite_template_fixture(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("store-template") / "pecd.db"
    migrate(f"sqlite:///{path}")
    return path


async def empty_tables(url: str) -> None:
    """Empty every table of the database at ``url`` (PostgreSQL), restarting its sequences."""
    tables = ", ".join(t.name for t in Base.metadata.sorted_tables)
    engine = create_async_engine(async_url(url))
    try:
        async with engine.begin() as conn:
            await conn.execute(text(f"TRUNCATE {tables} RESTART IDENTITY CASCADE"))
    finally:
        await engine.dispose()


@pytest.fixture(params=BACKENDS, name="db")
def db_fixture(request: pytest.FixtureRequest, tmp_path: Path) -> Backend:
    if request.param == "sqlite":
        path = tmp_path / "pecd.db"
        shutil.copyfile(request.getfixturevalue("sqlite_template"), path)
        return Backend("sqlite", f"sqlite:///{path}")
    url: str = request.getfixturevalue("pg_url")
    asyncio.run(empty_tables(url))
    return Backend("postgresql", url)
