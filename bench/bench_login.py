"""How long a real SMTP AUTH login takes while password guessers hammer the access point.

Starts ``pecd serve`` (its own process, real argon2id hashes, default [security] unless a scenario
changes it) and runs, from 127.0.0.1, ``--guessers`` threads that each loop: connect over SMTPS,
AUTH PLAIN with a wrong password, again until the server closes, reconnect. Meanwhile a real
holder logs in from 127.0.0.2 (another loopback address, so another client for the Guard), each
time as a mailbox not logged in before (so the login cache does not help: a full argon2 check).
Prints the time of the whole login (TCP + TLS + EHLO + AUTH) and of the AUTH alone.

Scenarios:
  other-accounts   guessers try other (random) accounts; default throttling
  same-account     guessers try the holder's own accounts; default throttling. A holder logging in
                   from a new address waits the account's delay (at most delay_max_seconds), by
                   design; from an address it logged in from before, no delay.
  no-throttle      throttling off (delays never start): only the hash slots protect the holder,
                   whose check goes ahead of the guesses queued for a slot

    .venv/bin/python bench/bench_login.py [--guessers 16] [--samples 5] [--scenario all]
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import random
import smtplib
import socket
import ssl
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from pecd.clock import SystemClock
from pecd.config import load_config
from pecd.devinit import config_text, init_installation
from pecd.store.accounts import Accounts
from pecd.store.db import Database, migrate_async

DOMAIN = "pec.example.test"
PASSWORD = "correct horse battery"
HOLDERS = 40  # mailboxes the holder logs in as, each once (login cache misses)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def install(directory: Path, security: str) -> Path:
    await init_installation(directory, domain=DOMAIN, name="Bench", clock=SystemClock(), demo=False)
    ports = {"smtps": free_port(), "submission": free_port(), "imaps": free_port()}
    text = config_text(domain=DOMAIN, name="Bench", ports=ports)
    text = text.replace(f'imaps = "127.0.0.1:{ports["imaps"]}"', "")
    path = directory / "pecd.toml"
    path.write_text(text + security, "utf-8")
    cfg = load_config(path)
    await migrate_async(cfg.database_url)
    db = await Database.open(cfg.database_url)
    try:
        acc = Accounts(db)  # default argon2id parameters, as in production
        for i in range(HOLDERS):
            await acc.add_mailbox(f"holder{i}@{DOMAIN}", PASSWORD)
    finally:
        await db.close()
    return path


def tls() -> ssl.SSLContext:
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    return ctx


def auth_plain(user: str, password: str) -> str:
    return "PLAIN " + base64.b64encode(f"\0{user}\0{password}".encode()).decode()


class Guessers:
    def __init__(self, port: int, count: int, accounts: list[str] | None) -> None:
        self.port = port
        self.accounts = accounts
        self.stop = threading.Event()
        self.attempts = 0
        self.refused = 0  # 421 too many connections
        self.dropped = 0  # 421 too many failures
        self.lock = threading.Lock()
        self.threads = [threading.Thread(target=self.run, daemon=True) for _ in range(count)]

    def run(self) -> None:
        rnd = random.Random()
        while not self.stop.is_set():
            try:
                with smtplib.SMTP_SSL(
                    "127.0.0.1",
                    self.port,
                    context=tls(),
                    timeout=60,
                    source_address=("127.0.0.1", 0),
                ) as smtp:
                    smtp.ehlo()
                    while not self.stop.is_set():
                        user = (
                            rnd.choice(self.accounts)
                            if self.accounts
                            else f"nobody{rnd.randrange(10**6)}@{DOMAIN}"
                        )
                        code, _ = smtp.docmd("AUTH", auth_plain(user, f"guess{rnd.random()}"))
                        with self.lock:
                            self.attempts += 1
                            if code == 421:
                                self.dropped += 1
                        if code == 421:
                            break
            except smtplib.SMTPConnectError:
                with self.lock:
                    self.refused += 1
            except (OSError, smtplib.SMTPException):
                pass

    def __enter__(self) -> Guessers:
        for t in self.threads:
            t.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()


def holder_login(port: int, user: str, source: str = "127.0.0.2") -> tuple[float, float, int]:
    t0 = time.perf_counter()
    with smtplib.SMTP_SSL(
        "127.0.0.1", port, context=tls(), timeout=60, source_address=(source, 0)
    ) as smtp:
        smtp.ehlo()
        t1 = time.perf_counter()
        code, _ = smtp.docmd("AUTH", auth_plain(user, PASSWORD))
        t2 = time.perf_counter()
    return t2 - t0, t2 - t1, code


def run(scenario: str, guessers: int, samples: int) -> None:
    security = {
        "other-accounts": "",
        "same-account": "",
        "no-throttle": "\n[security]\ndelay_after_failures = 1000000000\n"
        "disconnect_after_failures = 1000000000\n",
    }[scenario]
    with tempfile.TemporaryDirectory() as tmp:
        config = asyncio.run(install(Path(tmp), security))
        cfg = load_config(config)
        assert cfg.listeners.smtps is not None
        port = cfg.listeners.smtps.port
        log = (Path(tmp) / "serve.log").open("wb")
        proc = subprocess.Popen(
            [sys.executable, "-m", "pecd", "serve", "-c", str(config)],
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        try:
            for _ in range(300):
                try:
                    socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
                    break
                except OSError:
                    time.sleep(0.1)
            time.sleep(3)  # pecd starts its format processes
            base = []
            for i in range(samples):
                base.append(holder_login(port, f"holder{HOLDERS - 1 - i}@{DOMAIN}"))
                time.sleep(0.3)
            targets = [f"holder{i}@{DOMAIN}" for i in range(samples)]
            with Guessers(port, guessers, targets if scenario == "same-account" else None) as g:
                time.sleep(3)  # let the guessers fill the queues and run into the throttle
                start_attempts = g.attempts
                t_start = time.perf_counter()
                results = []
                for user in targets:
                    results.append(holder_login(port, user))
                    time.sleep(0.3)
                elapsed = time.perf_counter() - t_start
                rate = (g.attempts - start_attempts) / elapsed
            whole = [r[0] for r in results]
            auth = [r[1] for r in results]
            print(f"scenario {scenario}: {guessers} guessers from 127.0.0.1, holder from 127.0.0.2")
            print(
                f"  without guessers, {samples} logins: whole login median "
                f"{statistics.median(b[0] for b in base):.3f} s, max {max(b[0] for b in base):.3f} s;"
                f" AUTH alone median {statistics.median(b[1] for b in base):.3f} s, "
                f"max {max(b[1] for b in base):.3f} s"
            )
            print(
                f"  under attack, {samples} logins: codes {sorted({r[2] for r in results})}; "
                f"whole login median {statistics.median(whole):.3f} s, max {max(whole):.3f} s; "
                f"AUTH alone median {statistics.median(auth):.3f} s, max {max(auth):.3f} s"
            )
            print(
                f"  guesses answered: {rate:.1f}/s while measuring; {g.attempts} in all, "
                f"{g.dropped} connections closed after too many failures, "
                f"{g.refused} connections refused"
            )
        finally:
            proc.terminate()
            proc.wait(30)
            log.close()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--guessers", type=int, default=16)
    ap.add_argument("--samples", type=int, default=5)
    ap.add_argument(
        "--scenario",
        choices=["all", "other-accounts", "same-account", "no-throttle"],
        default="all",
    )
    args = ap.parse_args()
    assert 2 * args.samples <= HOLDERS
    scenarios = (
        ["other-accounts", "same-account", "no-throttle"]
        if args.scenario == "all"
        else [args.scenario]
    )
    for s in scenarios:
        run(s, args.guessers, args.samples)


if __name__ == "__main__":
    main()
