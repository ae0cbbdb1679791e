"""Several engine processes on one machine (``[serve] processes``, runtime/supervisor.py
EngineGroup, runtime/engine_process.py): `pecd serve` binds the SMTP sockets once and supervises
N processes that serve them and run the pipeline; timers and sealer run in the leader only; a
SIGKILLed engine is replaced and nothing is lost or duplicated; the metrics port sums the
processes' counters; SIGTERM stops everything with no process left and no error line."""

from __future__ import annotations

import asyncio
import os
import re
import signal
import smtplib
import subprocess
import sys
import threading
import time
import urllib.request
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest

from helpers import DOMAIN, PASSWORD, children, client_tls, free_port, install, start, wait_for
from pecd.config import Config, ConfigError, load_config
from store_fixtures import PG_ENV, migrated_postgres, sql_rows

needs_pg = pytest.mark.skipif(not os.environ.get(PG_ENV), reason=f"{PG_ENV} not set")

ENGINE_UP = re.compile(r"\[engine (\d+) pid (\d+)\] pecd\.engine: engine process \d+ serving")
TOOK = re.compile(
    r"\[engine \d+ pid (\d+)\] pecd\.engine: engine process \d+ stopping; it took (\d+)"
)
LEADER = re.compile(r"leader: [^:\s]+:(\d+) runs the timers")


# --- the config ----------------------------------------------------------------------------------


def _with_serve(source: Path, section: str, database_url: str | None = None) -> Config:
    base = source.read_text("utf-8").split("\n[serve]")[0]
    if database_url:
        base = base.replace(
            'data_dir = "data"', f'data_dir = "data"\ndatabase_url = "{database_url}"'
        )
    path = source.parent / "variant.toml"
    path.write_text(base + "\n[serve]\n" + section + "\n", "utf-8")
    return load_config(path)


def test_serve_processes_config(tmp_path: Path) -> None:
    cfg = asyncio.run(install(tmp_path / "inst", None))
    assert cfg.source is not None
    assert cfg.serve.processes is None and cfg.processes == 1  # SQLite: one writer
    assert _with_serve(cfg.source, "processes = 3").processes == 3  # explicit: honoured
    pg = _with_serve(cfg.source, "", "postgresql://pecd@db.example/pecd")
    assert pg.processes == max(1, os.cpu_count() or 1)  # PostgreSQL: one per CPU
    assert _with_serve(cfg.source, "processes = 1", "postgresql://x@y/z").processes == 1
    for value, why in (
        ("0", "serve.processes: Input should be greater than or equal to 1"),
        ("-2", "serve.processes: Input should be greater than or equal to 1"),
        ('"2"', "serve.processes: Input should be a valid integer"),
        ("1.5", "serve.processes: Input should be a valid integer"),
        ("true", "serve.processes: Input should be a valid integer"),
        ("1000", "serve.processes: Input should be less than or equal to 256"),
    ):
        with pytest.raises(ConfigError, match=re.escape(why)):
            _with_serve(cfg.source, f"processes = {value}")
    with pytest.raises(ConfigError, match=r"serve\.procs: is not a known key"):
        _with_serve(cfg.source, "procs = 2")


# --- two engine processes on PostgreSQL ------------------------------------------------------------


@pytest.fixture(name="url")
def url_fixture() -> Iterator[str]:
    yield from migrated_postgres()


def _rows(url: str, sql: str) -> list[tuple[object, ...]]:
    return asyncio.run(sql_rows(url, sql))


def _leader_pids(url: str) -> list[int]:
    """OS pids of the holders of the leader lock (``pecd-leader host:pid`` sessions)."""
    rows = _rows(
        url,
        "SELECT a.application_name FROM pg_locks l JOIN pg_stat_activity a ON a.pid = l.pid"
        " WHERE l.locktype = 'advisory' AND l.granted AND a.datname = current_database()"
        " AND a.application_name LIKE 'pecd-leader %'",
    )
    return [int(str(r[0]).rsplit(":", 1)[1]) for r in rows]


def _unfinished(url: str) -> int:
    return int(str(_rows(url, "SELECT count(*) FROM jobs WHERE state <> 'done'")[0][0]))


def _metric(port: int, name: str) -> float:
    body = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    found = re.search(rf"^{re.escape(name)} ([0-9.e+]+)$", body, re.M)
    return float(found.group(1)) if found else 0.0


class Senders:
    """Clients submitting over SMTPS, each message on a connection of its own; every attempt has
    a client Message-ID of its own, and those answered 250 are recorded."""

    def __init__(self, cfg: Config) -> None:
        assert cfg.listeners.smtps is not None
        self.port = cfg.listeners.smtps.port
        self.tls = client_tls(cfg)
        self.accepted: list[str] = []
        self.failed: list[str] = []
        self._lock = threading.Lock()

    def send(self, tag: str) -> None:
        msgid = f"<{tag}@client.example>"
        body = (
            f"From: alice@{DOMAIN}\r\nTo: bob@{DOMAIN}\r\nSubject: {tag}\r\n"
            f"Message-ID: {msgid}\r\nDate: Tue, 24 Nov 2026 10:00:00 +0100\r\n\r\nciao\r\n"
        ).encode()
        try:
            with smtplib.SMTP_SSL("127.0.0.1", self.port, context=self.tls, timeout=60) as s:
                s.login(f"alice@{DOMAIN}", PASSWORD)
                s.sendmail(f"alice@{DOMAIN}", [f"bob@{DOMAIN}"], body)
        except (smtplib.SMTPException, OSError):
            with self._lock:
                self.failed.append(msgid)
            return
        with self._lock:
            self.accepted.append(msgid)

    def batch(
        self, name: str, clients: int, each: int, pause: float = 0.0
    ) -> list[threading.Thread]:
        def run(c: int) -> None:
            for i in range(each):
                self.send(f"{name}-{c}-{i}")
                time.sleep(pause)

        threads = [threading.Thread(target=run, args=(c,)) for c in range(clients)]
        for t in threads:
            t.start()
        return threads


def _events(url: str) -> Counter[tuple[str, str]]:
    """(event, client msgid) -> how many trace events."""
    rows = _rows(url, "SELECT event, client_msgid FROM trace_events WHERE client_msgid IS NOT NULL")
    return Counter((str(e), str(m)) for e, m in rows)


@needs_pg
@pytest.mark.slow
def test_two_engine_processes(tmp_path: Path, url: str) -> None:
    metrics_port = free_port()
    extra = (
        "\n[queue]\nbase_delay_seconds = 0.2\nformat_processes = 1\n"
        "heartbeat_seconds = 0.5\nnode_timeout_seconds = 2\n"  # lease_seconds stays 120
        f'[serve]\nprocesses = 2\n[metrics]\nlisten = "127.0.0.1:{metrics_port}"\n'
        "queue_cache_seconds = 0\n[log]\nseal_seconds = 1\n"
    )
    cfg = asyncio.run(install(tmp_path / "inst", url, extra_config=extra))
    log = tmp_path / "serve.log"
    proc = start(cfg, log)
    try:
        wait_for(lambda: "Mail client settings" in log.read_text(), 60, "pecd serving")
        engines = {int(i): int(p) for i, p in ENGINE_UP.findall(log.read_text())}
        assert sorted(engines) == [0, 1] and len(set(engines.values())) == 2
        leaders = wait_for(lambda: (h := _leader_pids(url)) and h, 30, "a leader", interval=0.1)
        assert len(leaders) == 1 and leaders[0] in engines.values()
        leader = leaders[0]
        assert urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/readyz").status == 200

        # Phase 1: several clients at once; the metrics port shows the sum over both processes.
        senders = Senders(cfg)
        for t in senders.batch("one", 4, 4):
            t.join()
        assert len(senders.accepted) == 16, senders.failed
        wait_for(lambda: _unfinished(url) == 0, 60, "every job done", interval=0.2)
        wait_for(
            lambda: _metric(metrics_port, "pecd_messages_accepted_total") == 16,
            20,
            "16 accepted in the metrics",
        )
        # The leader seals every seal_seconds: wait for its first seal after the traffic.
        seals = wait_for(lambda: _rows(url, "SELECT DISTINCT node FROM trace_seals"), 30, "a seal")
        assert seals and {str(r[0]).rsplit(":", 1)[1] for r in seals} == {str(leader)}

        # Phase 2: SIGKILL the leading engine process while clients submit.
        threads = senders.batch("two", 4, 6, pause=0.05)
        wait_for(lambda: len(senders.accepted) >= 16 + 6, 60, "phase two under way", interval=0.02)
        os.kill(leader, signal.SIGKILL)
        for t in threads:
            t.join()
        replaced = wait_for(
            lambda: len(up := ENGINE_UP.findall(log.read_text())) == 3 and int(up[-1][1]),
            60,
            "a new engine process",
            interval=0.1,
        )
        assert replaced not in engines.values()
        new_leader = wait_for(
            lambda: (h := _leader_pids(url)) and h != [leader] and h, 30, "a new leader", 0.1
        )
        assert len(new_leader) == 1 and new_leader[0] != leader
        # Phase 3: both live engine processes serve.
        for t in senders.batch("three", 4, 5):
            t.join()
        wait_for(lambda: _unfinished(url) == 0, 120, "every job done", interval=0.2)
    finally:
        family = [proc.pid, *children(proc.pid)]
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
        try:
            code = proc.wait(90)
        except subprocess.TimeoutExpired:
            proc.kill()
            raise
    text_ = log.read_text()
    assert code == 0, text_[-3000:]
    # Nothing is left: the engine processes, their format processes, the mailbox process.
    assert len(family) >= 6
    left = [p for p in family if _alive(p)]
    assert not left, left

    # Every 250 has exactly one accettazione and one avvenuta-consegna; an attempt cut by the
    # kill has at most one of each; nothing twice.
    events = _events(url)
    for msgid in senders.accepted:
        assert events[("accettazione", msgid)] == 1, msgid
        assert events[("avvenuta-consegna", msgid)] == 1, msgid
    assert all(n == 1 for n in events.values()), [k for k, n in events.items() if n != 1]
    assert _rows(url, "SELECT count(*) FROM jobs WHERE state = 'parked'") == [(0,)]

    # The kill was one restart; timers and sealer ran in one process, then in one other.
    assert f"engine process {leader} exited" in text_ or f"engine process {leader} lost" in text_
    # (Counted until the stop: engines stop one after the other, and one still running may take
    # over the timers from one that has stopped, as it should.)
    before_stop = text_.split("pecd: stopping")[0]
    assert [int(p) for p in LEADER.findall(before_stop)] == [leader, new_leader[0]]
    # The SMTP connections were spread: both engine processes alive at the end took some.
    took = {int(pid): int(n) for pid, n in TOOK.findall(text_)}
    assert len(took) == 2 and all(n > 0 for n in took.values()), took
    # The stop was orderly: no error after the signal, and no restart.
    after = text_.split("pecd: stopping")[1]
    assert " ERROR " not in after and "starting a new one" not in after, after


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii") as f:
            return f.read().split(") ", 1)[1][0] != "Z"
    except (FileNotFoundError, ProcessLookupError, IndexError):
        return False


# --- a signal to the whole process group (Ctrl-C in a terminal, a kill of the group) ---------------


@pytest.mark.slow
@pytest.mark.parametrize(("processes", "sig"), [(1, signal.SIGINT), (2, signal.SIGTERM)])
def test_a_signal_to_the_group_stops_everything_once(
    tmp_path: Path, processes: int, sig: signal.Signals
) -> None:
    """The supervised processes (the mailbox process; with 2, the engine processes) are in
    sessions of their own: the group's signal reaches `pecd serve` only, which stops them in
    order. No restart, no error line, exit status 0, nothing left (SQLite: the leader lock is a
    flock beside the database, held by one engine process)."""
    # With one process its format processes are in `pecd serve`'s group: they ignore the
    # group's SIGINT and SIGTERM (runtime/formats.py) and end when the server closes them.
    extra = (
        "\n[queue]\nbase_delay_seconds = 0.2\nformat_processes = 1\n"
        f"[serve]\nprocesses = {processes}\n"
    )
    cfg = asyncio.run(install(tmp_path / "inst", None, extra_config=extra))
    assert cfg.source is not None and cfg.listeners.smtps is not None
    # A reception point too, on a port chosen at bind time: shared by the engines as well.
    text_ = cfg.source.read_text("utf-8")
    cfg.source.write_text(
        text_.replace("[listeners]\n", '[listeners]\nreception = "127.0.0.1:0"\n')
    )
    cfg = load_config(cfg.source)
    assert cfg.listeners.reception is not None
    log = tmp_path / "serve.log"
    proc = subprocess.Popen(
        [sys.executable, "-m", "pecd", "serve", "-c", str(cfg.source)],
        stdout=log.open("ab"),
        stderr=subprocess.STDOUT,
        start_new_session=True,  # a group of its own, as a shell gives a foreground job
    )
    try:
        wait_for(lambda: "Mail client settings" in log.read_text(), 60, "pecd serving")
        senders = Senders(cfg)
        senders.send("group-1")
        assert senders.accepted == ["<group-1@client.example>"], senders.failed
        found = re.search(r"Other providers deliver to: \S+ port (\d+)", log.read_text())
        assert found is not None
        with smtplib.SMTP("127.0.0.1", int(found.group(1)), timeout=30) as peer:
            assert peer.ehlo()[0] == 250 and peer.has_extn("starttls")
        # A session open at the stop gets one 421 4.3.2 from the engine that serves it.
        assert cfg.listeners.smtps is not None
        open_session = smtplib.SMTP_SSL(
            "127.0.0.1", cfg.listeners.smtps.port, context=client_tls(cfg), timeout=60
        )
        assert open_session.ehlo()[0] == 250
        family = [proc.pid, *children(proc.pid)]
        holder = (Path(str(cfg.database_url).removeprefix("sqlite:///") + ".leader")).read_text()
        leader_pid = int(holder.strip().rsplit(":", 1)[1])
        if processes == 1:
            assert leader_pid == proc.pid
        else:
            engines = [int(p) for _, p in ENGINE_UP.findall(log.read_text())]
            assert len(engines) == 2 and leader_pid in engines
        os.killpg(proc.pid, sig)
        code_, reply = open_session.getreply()
        assert (code_, reply[:5]) == (421, b"4.3.2"), (code_, reply)
        open_session.close()
        code = proc.wait(90)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    text_ = log.read_text()
    assert code == 0, text_[-3000:]
    assert not [p for p in family if _alive(p)]
    after = text_.split("pecd: stopping")[1]
    assert " ERROR " not in after and "starting a new one" not in after, after
    assert "Traceback" not in after, after


@pytest.mark.slow
def test_no_engine_outlives_a_killed_serve(tmp_path: Path) -> None:
    """SIGKILL of `pecd serve` (no chance to stop anything): each engine process sees its control
    socket close and stops, its format processes with it; nothing is left."""
    extra = "\n[queue]\nbase_delay_seconds = 0.2\nformat_processes = 1\n[serve]\nprocesses = 2\n"
    cfg = asyncio.run(install(tmp_path / "inst", None, extra_config=extra))
    log = tmp_path / "serve.log"
    proc = start(cfg, log)
    try:
        wait_for(lambda: "Mail client settings" in log.read_text(), 60, "pecd serving")
        family = children(proc.pid)
        engines = [int(p) for _, p in ENGINE_UP.findall(log.read_text())]
        assert len(engines) == 2 and set(engines) <= set(family)
        proc.kill()
        proc.wait(10)
        wait_for(lambda: not [p for p in family if _alive(p)], 60, "every child gone", 0.1)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
