"""`pecd queue list|show|retry|requeue|park|delete`: filters, dry runs, leased jobs left alone,
deletions that lose a certified message refused without --force. Through the real CLI entry, on
SQLite and (with PECD_TEST_POSTGRES_URL) PostgreSQL."""

from __future__ import annotations

import asyncio
import json
import logging
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import select, update
from sqlalchemy.orm import Session

from pecd.cli import main
from pecd.clock import SystemClock
from pecd.devinit import init_installation
from pecd.store import jobs
from pecd.store.db import Database
from pecd.store.models import Job
from store_fixtures import Backend, db_fixture, pg_url_fixture, sqlite_template_fixture

__all__ = ["db_fixture", "pg_url_fixture", "sqlite_template_fixture"]

NOW = datetime.now(UTC)


@pytest.fixture(scope="module")
def installation(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One installation (config, PKI) for the module; each test points it at its own database."""
    d = tmp_path_factory.mktemp("queue-cli") / "inst"
    result = asyncio.run(
        init_installation(d, domain="pec.test", name="Test PEC", clock=SystemClock(), demo=False)
    )
    return result.config


@pytest.fixture
def conf(installation: Path, db: Backend, tmp_path: Path) -> str:
    text = installation.read_text("utf-8").replace(
        'data_dir = "data"', f'data_dir = "data"\ndatabase_url = "{db.url}"', 1
    )
    assert db.url in text
    text += '\n[routes]\n"far.test" = "mx.far.test:2525"\n'
    path = installation.parent / f"pecd-{tmp_path.name}.toml"
    path.write_text(text, "utf-8")
    return str(path)


def relay(to: str, n: int) -> dict[str, Any]:
    return {
        "recipients": [f"r{n}@{to}"],
        "message_id": f"<m{n}@pec.test>",
        "mail_from": "alice@pec.test",
        "kind": "envelope",
    }


# name: (kind, payload, state, extra columns)
JOBS: dict[str, tuple[str, dict[str, Any], str, dict[str, Any]]] = {
    "far-ready": (
        "relay",
        relay("far.test", 1),
        "ready",
        {"last_error": "Connection REFUSED by mx.far.test", "attempts": 2},
    ),
    "far-parked": (
        "relay",
        relay("far.test", 2),
        "parked",
        {"last_error": "connection refused", "attempts": 8},
    ),
    "far-parked-old": (
        "relay",
        relay("FAR.test", 3),
        "parked",
        {"last_error": "timed out", "attempts": 8, "created_at": NOW - timedelta(days=3)},
    ),
    "far-leased": (
        "relay",
        relay("far.test", 4),
        "running",
        {"locked_by": "w1", "locked_until": NOW + timedelta(hours=1), "attempts": 1},
    ),
    "far-expired": (
        "relay",
        relay("far.test", 5),
        "running",
        {"locked_by": "w0", "locked_until": NOW - timedelta(hours=1), "attempts": 1},
    ),
    "near-parked": (
        "relay",
        relay("near.test", 6),
        "parked",
        {"last_error": "connection refused", "attempts": 8},
    ),
    "delivery": (
        "delivery",
        {"recipients": ["bob@pec.test"], "sent_at": NOW.isoformat()},
        "ready",
        {},
    ),
    "submission": (
        "submission",
        {"mail_from": "alice@pec.test", "rcpt_to": ["carol@other.test"]},
        "parked",
        {"last_error": "scanner down", "attempts": 8},
    ),
    "hook-parked": ("webhook", {"url": "https://h.test/"}, "parked", {"last_error": "HTTP 503"}),
    "done": ("relay", relay("far.test", 9), "done", {}),
}


def fill(db: Backend) -> dict[str, int]:
    """The jobs of JOBS; their ids by name."""

    def add(s: Session) -> dict[str, int]:
        ids: dict[str, int] = {}
        for name, (kind, payload, state, extra) in JOBS.items():
            key = f"key-{name}"
            jobs.enqueue_sync(s, kind=kind, key=key, payload=payload, data=b"x" * 100, now=NOW)
            job_id = s.scalars(select(Job.id).where(Job.key == key)).one()
            s.execute(update(Job).where(Job.id == job_id).values(state=state, **extra))
            ids[name] = job_id
        return ids

    async def go(d: Database) -> dict[str, int]:
        return await d.write(add)

    return db.run(go)


def states(db: Backend) -> dict[str, tuple[str, int]]:
    async def go(d: Database) -> dict[str, tuple[str, int]]:
        async with d.read_session() as s:
            rows = await s.execute(select(Job.key, Job.state, Job.attempts))
            return {k.removeprefix("key-"): (st, a) for k, st, a in rows}

    return db.run(go)


def run(capsys: pytest.CaptureFixture[str], *args: str, code: int = 0) -> Any:
    capsys.readouterr()
    assert main(list(args)) == code, capsys.readouterr()
    out = capsys.readouterr().out
    return json.loads(out) if "--json" in args and code == 0 else out


def listed(capsys: pytest.CaptureFixture[str], conf: str, *args: str) -> list[str]:
    rows = run(capsys, "queue", "list", "-c", conf, "--json", *args)
    return sorted(r["key"].removeprefix("key-") for r in rows)


def test_list_filters(db: Backend, conf: str, capsys: pytest.CaptureFixture[str]) -> None:
    fill(db)
    assert "done" not in listed(capsys, conf) and len(listed(capsys, conf)) == len(JOBS) - 1
    assert listed(capsys, conf, "--kind", "webhook", "--kind", "delivery") == [
        "delivery",
        "hook-parked",
    ]
    assert listed(capsys, conf, "--state", "parked", "--kind", "relay") == [
        "far-parked",
        "far-parked-old",
        "near-parked",
    ]
    far = ["far-expired", "far-leased", "far-parked", "far-parked-old", "far-ready"]
    assert listed(capsys, conf, "--destination", "far.test") == far
    assert listed(capsys, conf, "--destination", "mx.far.test") == far  # the route's host
    assert listed(capsys, conf, "--destination", "mx.far.test:2525") == far
    assert listed(capsys, conf, "--error", "REFUSED") == ["far-parked", "far-ready", "near-parked"]
    assert listed(capsys, conf, "--older-than", "2d") == ["far-parked-old"]
    assert listed(capsys, conf, "--state", "leased") == ["far-leased"]
    assert listed(capsys, conf, "--state", "expired") == ["far-expired"]
    assert len(listed(capsys, conf, "--destination", "far.test", "--limit", "2")) == 2
    assert listed(capsys, conf, "--state", "done") == ["done"]
    table = run(capsys, "queue", "list", "-c", conf, "--destination", "near.test")
    assert "near" in table and "refused" in table


def test_show(db: Backend, conf: str, capsys: pytest.CaptureFixture[str]) -> None:
    ids = fill(db)
    j = run(capsys, "queue", "show", str(ids["far-leased"]), "-c", conf, "--json")
    assert (j["kind"], j["state"], j["lease"], j["locked_by"]) == (
        "relay",
        "running",
        "leased",
        "w1",
    )
    assert j["sender"] == "alice@pec.test" and j["recipients"] == ["r4@far.test"]
    assert j["destinations"] == ["far.test"] and j["size"] == 100
    assert j["message_id"] == "<m4@pec.test>" and j["attempts"] == 1
    text = run(capsys, "queue", "show", str(ids["far-ready"]), "-c", conf)
    assert "Connection REFUSED" in text and "r1@far.test" in text and "never sent" in text
    run(capsys, "queue", "show", "99999", "-c", conf, code=1)


def test_bulk_needs_a_filter(db: Backend, conf: str, capsys: pytest.CaptureFixture[str]) -> None:
    fill(db)
    before = states(db)
    for action in ("retry", "requeue", "park", "delete"):
        run(capsys, "queue", action, "-c", conf, code=1)
    run(capsys, "queue", "park", "1", "--kind", "relay", "-c", conf, code=1)
    assert states(db) == before
    out = run(capsys, "queue", "retry", "--all", "--dry-run", "-c", conf, "--json")
    assert len(out["matched"]) == len(JOBS) - 1 and out["dry_run"]
    assert states(db) == before


def test_retry_and_park_by_filter(
    db: Backend, conf: str, capsys: pytest.CaptureFixture[str]
) -> None:
    ids = fill(db)
    before = states(db)
    args = ("-c", conf, "--destination", "far.test")
    dry = run(capsys, "queue", "park", *args, "--dry-run", "--json")
    assert sorted(dry["changed"]) == sorted([ids["far-ready"], ids["far-expired"]])
    assert states(db) == before
    out = run(capsys, "queue", "park", *args)
    assert "5 job(s) matched; 2 parked" in out and "1 leased" in out
    after = states(db)
    assert after["far-ready"] == ("parked", 2) and after["far-expired"] == ("parked", 1)
    assert after["far-leased"] == before["far-leased"]  # the worker keeps it
    # retry: ready now, attempts kept; the leased one still untouched
    out = run(capsys, "queue", "retry", *args, "--state", "parked", "--json")
    assert len(out["changed"]) == 4
    after = states(db)
    assert after["far-ready"] == ("ready", 2) and after["far-parked-old"] == ("ready", 8)
    assert after["far-leased"] == before["far-leased"] and after["near-parked"][0] == "parked"
    # one job by id: a leased one is refused
    run(capsys, "queue", "park", str(ids["far-leased"]), "-c", conf, code=1)
    run(capsys, "queue", "park", str(ids["delivery"]), "-c", conf)
    assert states(db)["delivery"][0] == "parked"


def test_requeue_parked_relays_to_one_destination(
    db: Backend, conf: str, capsys: pytest.CaptureFixture[str]
) -> None:
    ids = fill(db)
    out = run(
        capsys,
        "queue", "requeue", "-c", conf, "--kind", "relay", "--state", "parked",
        "--destination", "far.test", "--json",
    )  # fmt: skip
    assert sorted(out["changed"]) == sorted([ids["far-parked"], ids["far-parked-old"]])
    after = states(db)
    assert after["far-parked"] == ("ready", 0) and after["far-parked-old"] == ("ready", 0)
    assert after["near-parked"] == ("parked", 8) and after["hook-parked"][0] == "parked"
    # the one-id form, as before
    run(capsys, "queue", "requeue", str(ids["near-parked"]), "-c", conf)
    assert states(db)["near-parked"] == ("ready", 0)
    run(capsys, "queue", "requeue", str(ids["far-leased"]), "-c", conf, code=1)
    run(capsys, "queue", "requeue", str(ids["done"]), "-c", conf, code=1)


def test_delete(
    db: Backend,
    conf: str,
    capsys: pytest.CaptureFixture[str],
    caplog: pytest.LogCaptureFixture,
) -> None:
    ids = fill(db)
    before = states(db)
    # Relays carry an accepted message: refused without --force, nothing deleted.
    capsys.readouterr()
    assert main(["queue", "delete", "-c", conf, "--destination", "far.test"]) == 1
    err = capsys.readouterr().err
    assert "refused, nothing deleted: 2 job(s)" in err and "r2@far.test" in err and "--force" in err
    assert states(db) == before
    # A parked webhook loses nothing certified.
    with caplog.at_level(logging.WARNING, logger="pecd.queue"):
        out = run(capsys, "queue", "delete", "-c", conf, "--kind", "webhook")
    assert "1 deleted" in out and "hook-parked" not in states(db)
    assert "key-hook-parked" in caplog.text
    # --force: ready and lease-expired ones too, never a leased one; each loss printed and logged
    dry = run(capsys, "queue", "delete", "-c", conf, "--destination", "far.test", "--force",
               "--dry-run")  # fmt: skip
    assert "would lose" in dry and "4 would be deleted" in dry and "1 leased" in dry
    assert len(states(db)) == len(before) - 1
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="pecd.queue"):
        out = run(capsys, "queue", "delete", "-c", conf, "--destination", "far.test", "--force")
    assert "5 job(s) matched; 4 deleted" in out and "losing job" in out
    left = states(db)
    assert "far-leased" in left and "far-ready" not in left and "far-expired" not in left
    assert all(f"key-far-{n}" in caplog.text for n in ("ready", "parked", "parked-old", "expired"))
    run(capsys, "queue", "delete", str(ids["far-leased"]), "--force", "-c", conf, code=1)
    # a submission's receipt is still owed: never deleted, --force or not
    capsys.readouterr()
    assert main(["queue", "delete", "-c", conf, "--kind", "submission", "--force"]) == 1
    assert "never deletes" in capsys.readouterr().err and "submission" in states(db)
    # without --force a ready job is not deleted, even by id
    run(capsys, "queue", "delete", str(ids["delivery"]), "-c", conf, code=1)
    assert "delivery" in states(db)


def test_a_claim_between_the_look_and_the_change_wins(db: Backend) -> None:
    """The change repeats its states in its WHERE: a job a worker claimed after the operator's
    look (the summaries) is left to the worker."""
    from pecd.store import queue_admin as qa

    ids = fill(db)

    async def go(d: Database) -> list[int]:
        async with d.session() as s, s.begin():
            now = datetime.now(UTC)
            seen = await qa.find(s, qa.JobFilter(destination="far.test"), now=now)
            await s.execute(
                update(Job)
                .where(Job.id == ids["far-ready"])
                .values(state="running", locked_by="w9", locked_until=now + timedelta(minutes=5))
            )
            return await qa.change(s, qa.Action.RETRY, seen, now=now)

    changed = db.run(go)
    assert ids["far-ready"] not in changed and ids["far-leased"] not in changed
    assert sorted(changed) == sorted(
        ids[n] for n in ("far-parked", "far-parked-old", "far-expired")
    )
    assert states(db)["far-ready"] == ("running", 2)
