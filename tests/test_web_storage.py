"""The web's submissions while the storage is full: the REST API and the webmail's compose page
refuse, as the SMTP access point answers ``452 4.3.1``, and take the same submission in once
there is room again (pecd.web.submit.InsufficientStorage).

The whole HTTPS application in process (tests/web_fixtures.py), over one installation per
database (SQLite, and PostgreSQL when PECD_TEST_POSTGRES_URL is set); each test uses client keys
of its own. The full disk is simulated as in tests/test_storage_faults.py: the free-space reading
(``diskspace.free_bytes``) says how many bytes are left. A commit failing for want of space is
the real driver's error where it can be had: SQLite's ``SQLITE_FULL`` from a database capped at
its current size (``PRAGMA max_page_count``), PostgreSQL's ``disk_full`` raised inside the
transaction."""

from __future__ import annotations

import asyncio
import errno
import html
import re
import sqlite3
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
import sqlalchemy.exc
from sqlalchemy import func, select, text
from sqlalchemy.orm import Session
from starlette.formparsers import MultiPartParser

from helpers import install_e2e
from pecd.config import Config
from pecd.mailbox.maildir import MaildirStore
from pecd.runtime import diskspace
from pecd.store import jobs
from pecd.store.accounts import Accounts
from pecd.store.db import Database
from pecd.store.models import Job
from pecd.store.tokens import Tokens
from pecd.web import ui
from pecd.web.pages.compose import STORAGE_FULL
from pecd.web.sentcopy import SENT, sent_key
from pecd.web.submit import RETRY_AFTER, intake_key, no_space
from store_fixtures import BACKENDS, cheap_hasher, fresh_postgres_database
from web_fixtures import ALICE, BOB, CAROL, PASSWORD, Web, csrf_of, login, run_web

PROBLEM = "application/problem+json"
STORAGE_FULL_EN = (
    "The message was not sent: the provider's storage is full. Try again in a few minutes: "
    "what you wrote is still here."
)
_CLIENT_KEY = re.compile(r'name="client_key" value="([^"]+)"')
# PostgreSQL's answer when it cannot extend a file: SQLSTATE 53100, raised in the transaction.
_PG_DISK_FULL = (
    "DO $$ BEGIN RAISE EXCEPTION 'could not extend file: No space left on device' "
    "USING ERRCODE = 'disk_full'; END $$"
)


@dataclass
class Installation:
    cfg: Config
    token: str  # alice's API token


async def _install(directory: Path, url: str | None) -> Installation:
    cfg = await install_e2e(directory, url)
    db = await Database.open(cfg.database_url)
    try:
        accounts = Accounts(db, hasher=cheap_hasher())
        for user in (ALICE, BOB, CAROL):
            await accounts.set_password(user, PASSWORD)
        token = (await Tokens(db).create(ALICE, "storage"))[1]
    finally:
        await db.close()
    return Installation(cfg, token)


@pytest.fixture(scope="module", params=BACKENDS)
def inst(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Installation]:
    directory = tmp_path_factory.mktemp("web-storage") / "inst"
    if request.param == "sqlite":
        yield asyncio.run(_install(directory, None))
        return

    url, drop = fresh_postgres_database()
    try:
        yield asyncio.run(_install(directory, url))
    finally:
        drop()


@dataclass
class Disk:
    """The free space every filesystem reads (plenty until a test says otherwise), and the
    paths the probe asked about."""

    free: int = 1 << 40
    asked: set[Path] = field(default_factory=set)

    def free_bytes(self, path: Path) -> int:
        self.asked.add(Path(path))
        return self.free


@pytest.fixture
def disk(monkeypatch: pytest.MonkeyPatch) -> Disk:
    d = Disk()
    monkeypatch.setattr(diskspace, "free_bytes", d.free_bytes)
    monkeypatch.setattr(diskspace, "PROBE_TTL", 0.0)  # every request reads afresh
    return d


def full(cfg: Config) -> int:
    """One byte short of the SMTP points' threshold: room for two of the largest messages."""
    return 2 * cfg.limits.max_message_size - 1


async def count_jobs(db: Database, key: str) -> int:
    async with db.read_session() as s:
        return int(await s.scalar(select(func.count()).select_from(Job).where(Job.key == key)))


def sent_copies(cfg: Config, intake: str) -> int:
    prefix = MaildirStore.name_for(sent_key(intake))
    return sum(
        p.name.startswith(prefix) for p in MaildirStore(cfg.maildir_root).list_folder(ALICE, SENT)
    )


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def assert_storage_problem(r: httpx.Response) -> None:
    assert r.status_code == 503, r.text[:500]
    assert r.headers["content-type"].startswith(PROBLEM)
    assert r.headers["retry-after"] == str(RETRY_AFTER)
    doc = r.json()
    assert doc["type"].endswith("/insufficient-storage") and doc["status"] == 503
    assert doc["title"] == "Insufficient storage" and "client_key" in doc["detail"]


def submission(client_key: str, subject: str, body: str = "Testo.") -> dict[str, Any]:
    return {"to": [BOB], "subject": subject, "body": body, "client_key": client_key}


# --- commits that fail for want of space ----------------------------------------------------------


@dataclass
class FailingCommit:
    """``jobs.enqueue_sync`` (the web's commit) failing as ``how`` says while ``on``."""

    # "driver": the database's own "full"; "enospc"; "other" (a failure of no kind); "lost": the
    # connection to the database lost (SQLSTATE 08006), after which a commit's outcome is unknown
    how: str
    disk: Disk
    on: bool = True
    then_full: bool = False  # the disk reads full once the commit has failed
    _max_pages: int | None = None

    def __call__(self, real: Callable[..., bool]) -> Callable[..., bool]:
        def enqueue(s: Session, **kw: Any) -> bool:
            if not self.on:
                return real(s, **kw)
            try:
                if self.how == "enospc":
                    raise OSError(errno.ENOSPC, "No space left on device")
                if self.how == "other":
                    raise RuntimeError("the commit failed")
                if self.how == "lost":
                    raise _ConnectionLost("server closed the connection unexpectedly")
                if s.get_bind().dialect.name == "postgresql":
                    s.execute(text(_PG_DISK_FULL))
                # SQLite capped at its current size: the job's pages do not fit (SQLITE_FULL).
                self._max_pages = s.execute(text("PRAGMA max_page_count")).scalar_one()
                pages = s.execute(text("PRAGMA page_count")).scalar_one()
                s.execute(text(f"PRAGMA max_page_count = {pages}"))
                return real(s, **kw)
            finally:
                if self.then_full:
                    self.disk.free = 0

        return enqueue

    async def restore(self, db: Database) -> None:
        """Space again: the commit works (SQLite's writer connection uncapped)."""
        self.on, self.then_full = False, False
        self.disk.free = 1 << 40
        if self._max_pages is not None:
            pages = self._max_pages
            await db.write(lambda s: s.execute(text(f"PRAGMA max_page_count = {pages}")))


@pytest.fixture
def failing(monkeypatch: pytest.MonkeyPatch, disk: Disk) -> Callable[[str], FailingCommit]:
    def make(how: str) -> FailingCommit:
        fail = FailingCommit(how, disk)
        monkeypatch.setattr(jobs, "enqueue_sync", fail(jobs.enqueue_sync))
        return fail

    return make


# --- the REST API ---------------------------------------------------------------------------------


def test_api_refuses_while_full_and_takes_the_same_submission_once_after(
    inst: Installation, disk: Disk
) -> None:
    cfg = inst.cfg
    client_key = f"full-{uuid.uuid4().hex}"
    key = intake_key(ALICE, client_key)

    async def scenario(web: Web) -> None:
        c, auth = web.client, bearer(inst.token)
        disk.free = full(cfg)
        # JSON and multipart alike, refused before the body is read: nothing committed.
        r = await c.post(
            "/api/v1/messages", json=submission(client_key, "Disco pieno"), headers=auth
        )
        assert_storage_problem(r)
        r = await c.post(
            "/api/v1/messages",
            data={"to": BOB, "subject": "Disco pieno", "client_key": client_key},
            files=[("attachments", ("a.txt", b"allegato", "text/plain"))],
            headers=auth,
        )
        assert_storage_problem(r)
        assert await count_jobs(web.db, key) == 0

        disk.free = full(cfg) + 1  # exactly the SMTP points' threshold: room again
        disk.asked.clear()
        r = await c.post(
            "/api/v1/messages", json=submission(client_key, "Disco pieno"), headers=auth
        )
        assert r.status_code == 202, r.text
        assert r.json()["id"] == key and r.json()["message_id"]
        # The probe read the filesystems the SMTP points watch: the data and Maildir ones.
        assert {cfg.storage.data_dir, cfg.maildir_root} <= disk.asked
        again = await c.post(
            "/api/v1/messages", json=submission(client_key, "Disco pieno"), headers=auth
        )
        assert again.status_code == 200 and again.json()["id"] == key
        assert again.json()["message_id"] is None
        assert await count_jobs(web.db, key) == 1

        # The refusal is in the API's own description.
        doc = (await c.get("/api/v1/openapi.json")).json()
        answer = doc["paths"]["/api/v1/messages"]["post"]["responses"]["503"]
        assert "insufficient-storage" in answer["description"]
        assert "Retry-After" in answer["headers"]
        assert PROBLEM in answer["content"]

    run_web(cfg, scenario)


@pytest.mark.parametrize(
    ("how", "then_full"),
    [("driver", False), ("enospc", False), ("other", True)],
    ids=["database-full", "ENOSPC", "full-after-failing"],
)
def test_api_commit_failing_for_want_of_space_is_a_503_and_uses_no_key(
    inst: Installation,
    disk: Disk,
    failing: Callable[[str], FailingCommit],
    how: str,
    then_full: bool,
) -> None:
    """The probe said there was room, then the commit failed: for want of space by its own
    account (the database full, ENOSPC), or of no known kind while the disk reads full afresh.
    503 as before the commit, not a 500; the retry is taken in, once."""
    cfg = inst.cfg
    client_key = f"commit-{how}-{uuid.uuid4().hex}"
    key = intake_key(ALICE, client_key)
    # Big enough that its row needs pages of its own (SQLite's cap then refuses it).
    body = "Fattura allegata. " * 20000

    async def scenario(web: Web) -> None:
        c, auth = web.client, bearer(inst.token)
        fail = failing(how)
        fail.then_full = then_full
        r = await c.post(
            "/api/v1/messages", json=submission(client_key, "Pieno", body), headers=auth
        )
        assert_storage_problem(r)
        await fail.restore(web.db)
        assert await count_jobs(web.db, key) == 0

        r = await c.post(
            "/api/v1/messages", json=submission(client_key, "Pieno", body), headers=auth
        )
        assert r.status_code == 202 and r.json()["id"] == key, r.text
        r = await c.post(
            "/api/v1/messages", json=submission(client_key, "Pieno", body), headers=auth
        )
        assert r.status_code == 200 and r.json()["id"] == key
        assert await count_jobs(web.db, key) == 1

    run_web(cfg, scenario)


def test_api_other_commit_failures_with_room_stay_500(
    inst: Installation, disk: Disk, failing: Callable[[str], FailingCommit]
) -> None:
    """A failure that is not for want of space, with the disk reading room, is not a 503: the
    client must not be told to wait for space that is there."""
    client_key = f"other-{uuid.uuid4().hex}"

    async def scenario(web: Web) -> None:
        failing("other")
        r = await web.client.post(
            "/api/v1/messages", json=submission(client_key, "Altro"), headers=bearer(inst.token)
        )
        assert r.status_code == 500 and r.json()["type"].endswith("/internal-error")
        assert "retry-after" not in r.headers
        assert await count_jobs(web.db, intake_key(ALICE, client_key)) == 0

    run_web(inst.cfg, scenario)


class _ConnectionLost(Exception):
    sqlstate = "08006"  # connection_failure, as asyncpg and psycopg name it


def test_api_commit_with_its_connection_lost_is_not_a_503_even_when_full(
    inst: Installation, disk: Disk, failing: Callable[[str], FailingCommit]
) -> None:
    """A connection lost during the commit, while the disk reads full: the commit may have
    happened, so the client is not told "nothing was taken in" (503): a 500."""
    client_key = f"lost-{uuid.uuid4().hex}"

    async def scenario(web: Web) -> None:
        fail = failing("lost")
        fail.then_full = True
        r = await web.client.post(
            "/api/v1/messages", json=submission(client_key, "Perso"), headers=bearer(inst.token)
        )
        assert r.status_code == 500 and "retry-after" not in r.headers, r.text

    run_web(inst.cfg, scenario)


def test_api_multipart_spooled_to_a_full_disk_is_a_503(
    inst: Installation, disk: Disk, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The form parser spools big attachments to a temporary file: on a full disk (the
    temporary directory's, which the probe does not watch) that write fails with ENOSPC."""

    async def spool_fails(self: MultiPartParser) -> Any:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(MultiPartParser, "parse", spool_fails)
    client_key = f"spool-{uuid.uuid4().hex}"

    async def scenario(web: Web) -> None:
        r = await web.client.post(
            "/api/v1/messages",
            data={"to": BOB, "client_key": client_key},
            files=[("attachments", ("a.bin", b"\0" * 4096, "application/octet-stream"))],
            headers=bearer(inst.token),
        )
        assert_storage_problem(r)
        assert await count_jobs(web.db, intake_key(ALICE, client_key)) == 0

    run_web(inst.cfg, scenario)


# --- the compose page ---------------------------------------------------------------------------


def text_of(page: httpx.Response) -> str:
    return html.unescape(re.sub(r"\s+", " ", re.sub(r"<[^>]+>", " ", page.text)))


async def compose_form(client: httpx.AsyncClient) -> dict[str, str]:
    """A fresh compose form, typed in (its CSRF token and client key included)."""
    page = await client.get("/compose")
    assert page.status_code == 200, page.text[:300]
    found = _CLIENT_KEY.search(page.text)
    assert found is not None
    return {
        "csrf": csrf_of(page),
        "client_key": html.unescape(found.group(1)),
        "to": f"Bob <{BOB}>",
        "cc": CAROL,
        "subject": "Fattura <7> è pronta",
        "body": "Buongiorno,\r\nla fattura & il resto.\r\n",
        "receipt": "breve",
    }


def assert_kept(page: httpx.Response, form: dict[str, str], sentence: str) -> None:
    """The form again, 503, saying why, with what was typed and the same client key."""
    assert page.status_code == 503, page.text[:500]
    assert page.headers["retry-after"] == str(RETRY_AFTER)
    words = text_of(page)
    assert sentence in words
    assert "correggi i campi" not in words and "correct the fields" not in words
    assert f'name="client_key" value="{form["client_key"]}"' in page.text
    assert f"{html.escape(form['to'], quote=False)}</textarea>" in page.text
    assert f"{CAROL}</textarea>" in page.text
    assert f'value="{html.escape(form["subject"])}"' in page.text
    assert "la fattura &amp; il resto." in page.text
    assert re.search(r'value="breve"[^>]* checked', page.text)


def test_compose_keeps_the_message_while_full_and_sends_it_once_after(
    inst: Installation, disk: Disk
) -> None:
    cfg = inst.cfg

    async def scenario(web: Web) -> None:
        client = web.client
        assert (await login(client, ALICE, PASSWORD)).status_code == 303
        form = await compose_form(client)
        key = intake_key(ALICE, "webmail:" + form["client_key"])
        attachment = [("attachments", ("fattura.pdf", b"%PDF-1.4 x", "application/pdf"))]
        disk.free = full(cfg)
        r = await client.post("/compose", data=form, files=attachment)
        assert_kept(r, form, STORAGE_FULL)
        assert "Gli allegati vanno scelti di nuovo." in text_of(r)  # a browser cannot keep them
        # In English for an English browser.
        en = await client.post("/compose", data=form, headers={"Accept-Language": "en-GB,en;q=0.9"})
        assert_kept(en, form, STORAGE_FULL_EN)
        assert await count_jobs(web.db, key) == 0 and sent_copies(cfg, key) == 0

        disk.free = 1 << 40  # space returns: Send again, twice
        first = await client.post("/compose", data=form, files=attachment)
        second = await client.post("/compose", data=form, files=attachment)
        for r in (first, second):
            assert r.status_code == 303 and r.headers["location"] == f"/transmissions/{key}"
        assert await count_jobs(web.db, key) == 1

    run_web(cfg, scenario)


def test_compose_commit_failing_for_want_of_space_keeps_the_message(
    inst: Installation, disk: Disk, failing: Callable[[str], FailingCommit]
) -> None:
    cfg = inst.cfg

    async def scenario(web: Web) -> None:
        client = web.client
        assert (await login(client, ALICE, PASSWORD)).status_code == 303
        form = await compose_form(client)
        form["body"] += "Fattura allegata. " * 20000
        key = intake_key(ALICE, "webmail:" + form["client_key"])
        fail = failing("driver")
        refused = await client.post("/compose", data=form)
        await fail.restore(web.db)
        assert refused.status_code == 503, refused.text[:500]
        assert STORAGE_FULL in text_of(refused)
        assert f'name="client_key" value="{form["client_key"]}"' in refused.text
        assert await count_jobs(web.db, key) == 0 and sent_copies(cfg, key) == 0

        r = await client.post("/compose", data=form)
        assert r.status_code == 303 and r.headers["location"] == f"/transmissions/{key}"
        assert await count_jobs(web.db, key) == 1 and sent_copies(cfg, key) == 1

    run_web(cfg, scenario)


def test_compose_spooled_to_a_full_disk_is_the_same_page_not_an_error(
    inst: Installation, disk: Disk, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Reading the form failed for want of space (attachments spooled to a full temporary
    directory): what was typed is lost with the form, but the answer is the storage page."""

    async def spool_fails(request: Any, **kw: Any) -> Any:
        raise OSError(errno.ENOSPC, "No space left on device")

    async def scenario(web: Web) -> None:
        client = web.client
        assert (await login(client, ALICE, PASSWORD)).status_code == 303
        form = await compose_form(client)
        with monkeypatch.context() as m:
            m.setattr(ui, "read_form", spool_fails)
            r = await client.post("/compose", data=form)
        assert r.status_code == 503 and STORAGE_FULL in text_of(r)
        assert r.headers["retry-after"] == str(RETRY_AFTER)
        assert 'name="client_key" value="' in r.text

    run_web(inst.cfg, scenario)


# --- which failures are for want of space ------------------------------------------------------


class _PgError(Exception):
    def __init__(self, sqlstate: str) -> None:
        super().__init__(sqlstate)
        self.sqlstate = sqlstate


def _caused(outer: BaseException, inner: BaseException) -> BaseException:
    outer.__cause__ = inner
    return outer


@pytest.mark.parametrize(
    ("exc", "expected"),
    [
        (OSError(errno.ENOSPC, "No space left on device"), True),
        (OSError(errno.EDQUOT, "Disk quota exceeded"), True),
        (sqlite3.OperationalError("database or disk is full"), True),
        (
            sqlalchemy.exc.OperationalError(
                "INSERT", {}, sqlite3.OperationalError("database or disk is full")
            ),
            True,
        ),
        (_caused(RuntimeError("commit"), _PgError("53100")), True),
        (OSError(errno.EIO, "Input/output error"), False),
        (OSError(errno.EACCES, "Permission denied"), False),
        (sqlite3.OperationalError("database is locked"), False),
        (_caused(RuntimeError("commit"), _PgError("53200")), False),  # out of memory
        (RuntimeError("the commit failed"), False),
    ],
)
def test_what_is_for_want_of_space(exc: BaseException, expected: bool) -> None:
    assert no_space(exc) is expected


def test_a_cycle_of_causes_ends() -> None:
    a, b = RuntimeError("a"), RuntimeError("b")
    a.__cause__, b.__cause__ = b, a
    assert no_space(a) is False
