"""Helpers of the tests that run pecd as a separate process (`python -m pecd serve -c FILE`)."""

from __future__ import annotations

import contextlib
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

from pecd.clock import SystemClock
from pecd.config import Config, load_config
from pecd.devinit import config_text, init_installation
from pecd.store.accounts import Accounts
from pecd.store.db import Database, migrate_async

DOMAIN = "pec.example.test"
PASSWORD = "correct horse battery"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def install(
    directory: Path,
    db_url: str | None,
    *,
    extra_config: str = "\n[queue]\nbase_delay_seconds = 0.2\nlease_seconds = 3\n",
) -> Config:
    """A fresh installation in ``directory`` with mailboxes alice, bob and carol (password
    PASSWORD) on free loopback ports; ``extra_config`` is appended to the config file."""
    await init_installation(
        directory, domain=DOMAIN, name="Example PEC S.p.A.", clock=SystemClock(), demo=False
    )
    ports = {"smtps": free_port(), "submission": free_port(), "imaps": free_port()}
    text = config_text(domain=DOMAIN, name="Example PEC S.p.A.", ports=ports)
    if db_url:
        text = text.replace('data_dir = "data"', f'data_dir = "data"\ndatabase_url = "{db_url}"')
    (directory / "pecd.toml").write_text(text + extra_config, "utf-8")
    cfg = load_config(directory / "pecd.toml")
    await migrate_async(cfg.database_url)
    db = await Database.open(cfg.database_url)
    try:
        acc = Accounts(db)
        if db_url:
            await acc.add_domain(DOMAIN)
            await acc.add_mailbox(cfg.provider.mail_receipt, PASSWORD)
        for user in ("alice", "bob", "carol"):
            await acc.add_mailbox(f"{user}@{DOMAIN}", PASSWORD)
    finally:
        await db.close()
    return cfg


def start(cfg: Config, log: Path) -> subprocess.Popen[bytes]:
    """Start `pecd serve` on ``cfg``, output appended to ``log``; return once SMTPS listens."""
    assert cfg.source is not None and cfg.listeners.smtps is not None
    proc = subprocess.Popen(
        [sys.executable, "-m", "pecd", "serve", "-c", str(cfg.source)],
        stdout=log.open("ab"),
        stderr=subprocess.STDOUT,
    )
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", cfg.listeners.smtps.port), timeout=0.5).close()
            return proc
        except OSError:
            if proc.poll() is not None:
                raise AssertionError(f"pecd exited: {log.read_text()[-3000:]}") from None
            time.sleep(0.1)
    raise AssertionError("pecd did not start listening")


# --- memory of a running process (Linux /proc) ---------------------------------------------------


def proc_status_kib(pid: int, field: str) -> int:
    """A ``/proc/PID/status`` field in KiB (``VmRSS``, ``VmHWM``); 0 if the process is gone."""
    try:
        with open(f"/proc/{pid}/status", encoding="ascii") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except (FileNotFoundError, ProcessLookupError):
        return 0
    return 0


def children(pid: int) -> list[int]:
    """Every descendant of ``pid`` (pecd's format worker processes, among others)."""
    found: list[int] = []
    todo = [pid]
    while todo:
        p = todo.pop()
        try:
            tasks = list(Path(f"/proc/{p}/task").iterdir())
        except FileNotFoundError:
            continue
        for task in tasks:
            with contextlib.suppress(FileNotFoundError, ProcessLookupError):
                for c in (task / "children").read_text().split():
                    found.append(int(c))
                    todo.append(int(c))
    return found


class RssSampler:
    """Samples VmRSS of a process and of its descendants in a thread, every ``interval`` s.

    ``peak`` is the largest VmRSS seen of the process itself, ``peak_children`` that of any one
    descendant, ``peak_total`` of the sum over the tree at one instant (all in KiB). ``hwm``
    reads the kernel's own high-water mark (VmHWM) of the process, which no sampling can miss.
    """

    def __init__(self, pid: int, interval: float = 0.05) -> None:
        self.pid = pid
        self.interval = interval
        self.peak = 0
        self.peak_children = 0
        self.peak_total = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.sample()
            self._stop.wait(self.interval)

    def sample(self) -> None:
        own = proc_status_kib(self.pid, "VmRSS")
        kids = [proc_status_kib(c, "VmRSS") for c in children(self.pid)]
        self.peak = max(self.peak, own)
        self.peak_children = max(self.peak_children, *kids, 0)
        self.peak_total = max(self.peak_total, own + sum(kids))

    def hwm(self) -> int:
        return proc_status_kib(self.pid, "VmHWM")

    def __enter__(self) -> RssSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.sample()


def reset_hwm(pid: int) -> None:
    """Reset the kernel's VmHWM of ``pid`` to its current RSS (Linux >= 4.0, same user)."""
    with open(f"/proc/{pid}/clear_refs", "w", encoding="ascii") as f:
        f.write("5")
