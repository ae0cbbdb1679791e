"""Process faults (issue 14): format workers never outlive ``pecd serve``; a stop ends open SMTP
sessions with one 421; an outage logs a few lines, not a traceback per 451; leftover Maildir
tmp/ files are cleaned."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import smtplib
import socket
import subprocess
import sys
import threading
import time
from datetime import UTC, datetime
from pathlib import Path

import pytest
from aiosmtpd.smtp import Session

import pecd.runtime.intake as intake_mod
from helpers import (
    DOMAIN,
    PASSWORD,
    AppThread,
    children,
    client_tls,
    install,
    install_e2e,
    message,
    start,
    wait_for,
)
from pecd.engine.vocab import JobKind
from pecd.runtime.intake import Intake
from pecd.runtime.logutil import RateLimitedLog
from pecd.runtime.smtp import IntakeEnvelope, Reply

# --- format workers never outlive the server --------------------------------------------------


def _format_workers(pid: int) -> list[int]:
    found = []
    for child in children(pid):
        try:
            cmd = Path(f"/proc/{child}/cmdline").read_bytes()
        except (FileNotFoundError, ProcessLookupError):
            continue
        if b"multiprocessing" in cmd:  # the workers, and multiprocessing's resource tracker
            found.append(child)
    return found


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError):
        return False
    return state != "Z"


@pytest.mark.slow
def test_format_workers_end_with_serve(tmp_path: Path) -> None:
    cfg = asyncio.run(
        install(tmp_path / "inst", None, extra_config="\n[queue]\nformat_processes = 2\n")
    )
    proc = start(cfg, tmp_path / "serve.log")
    try:
        # Two workers and multiprocessing's resource tracker.
        workers = wait_for(lambda: len(w := _format_workers(proc.pid)) == 3 and w, 20, "workers")
        proc.send_signal(signal.SIGTERM)
        proc.wait(30)
        assert not [w for w in workers if _alive(w)]  # all ended before the server exits
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


_SERVER = """
import asyncio, contextlib, sys
from pathlib import Path
from busy import busy
from pecd.config import load_config
from pecd.runtime.formats import FormatWorkers
from pecd.runtime.identity import provider_identity

async def main():
    cfg = load_config(Path(sys.argv[1]))
    formats = FormatWorkers(cfg, provider_identity(cfg), processes=1)
    async with contextlib.AsyncExitStack() as stack:
        await formats.start(stack)
        print(formats._workers[0].proc.pid, flush=True)
        await formats._run(busy)

asyncio.run(main())
"""


@pytest.mark.slow
def test_a_busy_format_worker_dies_with_a_killed_server(tmp_path: Path) -> None:
    """SIGKILL of the server while a worker is in a long call that holds the GIL (a thread of
    the worker watching its parent cannot run): the worker dies with it all the same."""
    cfg = asyncio.run(install(tmp_path / "inst", None))
    (tmp_path / "busy.py").write_text(
        "def busy():\n    return pow(7, 2 * 10**7).bit_length()  # ~20 s, GIL held\n"
    )
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(tmp_path), *sys.path]))
    server = subprocess.Popen(
        [sys.executable, "-c", _SERVER, str(cfg.source)], stdout=subprocess.PIPE, env=env
    )
    try:
        assert server.stdout is not None
        worker = int(server.stdout.readline())
        time.sleep(0.5)  # the call is under way
        assert _alive(worker)
        server.kill()
        server.wait(10)
        wait_for(lambda: not _alive(worker), 3, "the worker gone", interval=0.02)
    finally:
        if server.poll() is None:
            server.kill()
            server.wait()
        with contextlib.suppress(NameError, ProcessLookupError):
            os.kill(worker, signal.SIGKILL)


# --- the SIGTERM drain: one 421, then the connection closes -----------------------------------


def _stop_in_background(srv: AppThread) -> threading.Thread:
    t = threading.Thread(target=srv.stop, daemon=True)
    t.start()
    assert srv.app is not None and srv.app.access is not None
    sessions = srv.app.access.sessions
    wait_for(lambda: sessions.closing, 10, "the drain begun", interval=0.01)
    return t


def _read_reply(f: object) -> str:
    lines = []
    while True:
        line = f.readline()  # type: ignore[attr-defined]
        if not line:
            return "".join(lines)
        lines.append(line.decode())
        if line[3:4] != b"-":
            return "".join(lines)


def test_drain_ends_open_sessions_with_one_421(tmp_path: Path) -> None:
    cfg = asyncio.run(install_e2e(tmp_path / "inst", None, queue="format_processes = 0"))
    # A leftover of a writer killed two days ago: the server removes it as it starts.
    from pecd.mailbox.maildir import MaildirStore

    old = MaildirStore(cfg.maildir_root).ensure(f"carol@{DOMAIN}") / "tmp" / "1.M1P1.host"
    old.write_bytes(b"partial")
    os.utime(old, (time.time() - 48 * 3600,) * 2)
    srv = AppThread(cfg).start()
    alice, bob = f"alice@{DOMAIN}", f"bob@{DOMAIN}"
    ctx = client_tls(cfg)
    idle = smtplib.SMTP_SSL("127.0.0.1", srv.port("smtps"), context=ctx)
    idle.login(alice, PASSWORD)
    # A second session stops between the end of its DATA and its final dot.
    raw = ctx.wrap_socket(
        socket.create_connection(("127.0.0.1", srv.port("smtps"))), server_hostname="127.0.0.1"
    )
    f = raw.makefile("rb")

    def cmd(line: str) -> str:
        raw.sendall(line.encode() + b"\r\n")
        return _read_reply(f)

    assert _read_reply(f).startswith("220")
    assert cmd("EHLO client.example").startswith("250")
    import base64

    auth = base64.b64encode(f"\0{alice}\0{PASSWORD}".encode()).decode()
    assert cmd(f"AUTH PLAIN {auth}").startswith("235")
    assert cmd(f"MAIL FROM:<{alice}>").startswith("250")
    assert cmd(f"RCPT TO:<{bob}>").startswith("250")
    assert cmd("DATA").startswith("354")
    raw.sendall(message(alice, [bob], [], "during the drain") + b"\r\n")

    stopper = _stop_in_background(srv)
    try:
        # The idle session: its next command reads the one 421, then the connection is closed.
        code, text = idle.docmd("NOOP")
        assert (code, text.decode()) == (421, Reply.SHUTTING_DOWN[4:])
        with pytest.raises((smtplib.SMTPServerDisconnected, OSError)):
            idle.docmd("MAIL", f"FROM:<{alice}>")
            idle.docmd("NOOP")
        # The DATA in progress completes and gets its reply (durable, so 250), then the 421.
        done = cmd(".")
        assert done.startswith("250 2.0.0 OK: queued as"), done
        assert _read_reply(f).startswith("421 4.3.2")
        assert f.readline() == b""
    finally:
        idle.close()
        raw.close()
        stopper.join(30)
    assert not stopper.is_alive()
    assert not old.exists()


# --- an outage: a few lines, one traceback ----------------------------------------------------


class _DownDatabase:
    async def write(self, fn: object) -> None:
        raise ConnectionRefusedError("connection to the database refused")


def test_outage_logs_a_bounded_number_of_lines(
    caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(intake_mod, "_failures", RateLimitedLog(every=3600))

    async def main() -> list[str]:
        intake = Intake(_DownDatabase(), asyncio.Event())  # type: ignore[arg-type]
        import contextlib

        async with contextlib.AsyncExitStack() as stack:
            await intake.start(stack)
            session = Session(asyncio.get_running_loop())
            session.peer = ("127.0.0.1", 1)
            replies = []
            for i in range(200):
                env = IntakeEnvelope()
                env.intake_key = f"k{i}"
                env.received_at = datetime.now(UTC)
                env.mail_from = f"alice@{DOMAIN}"
                env.rcpt_tos = [f"bob@{DOMAIN}"]
                env.original_content = b"Subject: x\r\n\r\nx\r\n"
                replies.append(await intake.reply(JobKind.SUBMISSION, session, env))
            return replies

    with caplog.at_level(logging.INFO, logger="pecd"):
        replies = asyncio.run(main())
    assert replies == [Reply.TEMP_FAILURE] * 200
    records = [r for r in caplog.records if r.name.startswith("pecd.runtime.intake")]
    assert 1 <= len(records) <= 3, [r.getMessage() for r in records]
    assert sum(1 for r in records if r.exc_info) == 1


def test_rate_limited_log_counts_what_it_left_out(caplog: pytest.LogCaptureFixture) -> None:
    now = [0.0]
    limited = RateLimitedLog(every=10, clock=lambda: now[0])
    log = logging.getLogger("pecd.test.limited")
    with caplog.at_level(logging.INFO, logger="pecd.test.limited"):
        for _ in range(50):
            limited.failure(log, "commit of %s failed", OSError("disk"), "x")
        now[0] = 11
        limited.failure(log, "commit of %s failed", OSError("disk"), "x")
        limited.failure(log, "commit of %s failed", ValueError("other"), "x")
    msgs = [r.getMessage() for r in caplog.records]
    assert msgs == [
        "commit of x failed: OSError: disk",
        "commit of x failed: OSError: disk (49 more like it not logged)",
        "commit of x failed: ValueError: other",
    ]
    assert [bool(r.exc_info) for r in caplog.records] == [True, False, True]


# --- leftovers in Maildir tmp/ ------------------------------------------------------------------


def test_old_leftovers_in_tmp_are_removed_recent_ones_kept(tmp_path: Path) -> None:
    from pecd.mailbox.maildir import MaildirStore

    store = MaildirStore(tmp_path / "maildir")
    base = store.ensure(f"alice@{DOMAIN}")
    now = time.time()
    hour = 3600.0

    def leftover(folder: Path, name: str, age: float) -> Path:
        p = folder / "tmp" / name
        p.write_bytes(b"partial")
        os.utime(p, (now - age, now - age))
        return p

    own = "a" * 40 + ",S=7.1234.0123456789ab"
    removed = [
        leftover(base, "1700000000.M1P2.host", 37 * hour),  # Dovecot's (36 hours)
        leftover(base / ".Sent", "1700000001.M1P2.host", 40 * hour),
        leftover(base, own, 2 * hour),  # pecd's own: an hour
    ]
    kept = [
        leftover(base, "1700000002.M1P2.host", 35 * hour),  # may still be written elsewhere
        leftover(base / ".Trash", "b" * 40 + ",S=7.99.0123456789ab", 10 * 60),
        leftover(base, "1700000003.M1P2.host", 0),
    ]
    delivered = store.deliver(f"alice@{DOMAIN}", "k1", b"Subject: x\r\n\r\nx\r\n").path
    os.utime(delivered, (now - 100 * hour, now - 100 * hour))

    assert store.clean_tmp(now=now, batch=2, pause=0) == 3
    assert not [p for p in removed if p.exists()]
    assert all(p.exists() for p in kept) and delivered.exists()

    stop = threading.Event()
    stop.set()
    leftover(base, "1700000004.M1P2.host", 37 * hour)
    leftover(base, "1700000005.M1P2.host", 37 * hour)
    assert store.clean_tmp(now=now, batch=1, stop=stop) == 0  # stopped: nothing more done


def test_a_failing_command_is_a_451_logged_rate_limited(
    caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    """aiosmtpd answered a command whose store failed (AUTH with the database down) with a
    permanent 500 and a traceback per session."""
    import pecd.runtime.smtp as smtp_mod
    from pecd.runtime.smtp import IntakeSMTP

    monkeypatch.setattr(smtp_mod, "_failures", RateLimitedLog(every=3600))

    async def main() -> list[str]:
        server = IntakeSMTP(object())
        return [
            await server.handle_exception(ConnectionRefusedError("database down"))
            for _ in range(100)
        ]

    with caplog.at_level(logging.INFO, logger="pecd"):
        replies = asyncio.run(main())
    assert set(replies) == {Reply.LOCAL_ERROR}
    records = [r for r in caplog.records if r.name == "pecd.runtime.smtp"]
    assert len(records) == 1 and records[0].exc_info
