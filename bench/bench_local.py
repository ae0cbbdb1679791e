"""Single-provider throughput: N SMTPS clients send M messages of S KB between local mailboxes.

Prints submissions/s, end-to-end messages/s (until every delivery receipt is in the sender's Maildir),
p50/p99 from DATA to the acceptance receipt stored, and a no-op aiosmtpd baseline measured in the
same run on the same machine. pecd and the baseline each run in their own process.

    .venv/bin/python bench/bench_local.py --clients 10 --messages 50 --size-kb 4
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import socket
import ssl
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import aiosmtplib

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from pecd.clock import SystemClock
from pecd.config import load_config
from pecd.devinit import config_text, init_installation
from pecd.mailbox.maildir import MaildirStore
from pecd.store.accounts import Accounts
from pecd.store.db import Database

DOMAIN = "pec.bench.test"
PASSWORD = "bench password 123"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_port(port: int, proc: subprocess.Popen[bytes], timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            return
        except OSError:
            if proc.poll() is not None:
                raise SystemExit("server exited during startup") from None
            time.sleep(0.05)
    raise SystemExit("server did not start")


def wait_started(log: Path, proc: subprocess.Popen[bytes], timeout: float = 120) -> None:
    """Until ``pecd serve`` has printed its client settings (every process it starts is up)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if b"Mail client settings" in log.read_bytes():
            return
        if proc.poll() is not None:
            raise SystemExit("server exited during startup")
        time.sleep(0.05)
    raise SystemExit("server did not finish starting")


def body(size_kb: int, tag: str, frm: str, to: str) -> bytes:
    head = (
        f"From: {frm}\r\nTo: {to}\r\nSubject: bench {tag}\r\nMessage-ID: <{tag}@bench.client>\r\n"
        "MIME-Version: 1.0\r\nContent-Type: text/plain; charset=us-ascii\r\n\r\n"
    )
    line = "Lorem ipsum dolor sit amet, consectetur adipiscing elit, sed do eiusmod tempor.\r\n"
    n = max(1, size_kb * 1024 // len(line))
    return (head + line * n).encode()


async def run_clients(
    port: int,
    ctx: ssl.SSLContext,
    clients: int,
    messages: int,
    size_kb: int,
    *,
    auth: bool,
    started: dict[str, float],
    rcpt_domain: str = DOMAIN,
) -> float:
    async def one(i: int) -> None:
        frm, to = f"sender{i}@{DOMAIN}", f"rcpt{i}@{rcpt_domain}"
        smtp = aiosmtplib.SMTP(hostname="127.0.0.1", port=port, use_tls=True, tls_context=ctx)
        await smtp.connect()
        if auth:
            await smtp.login(frm, PASSWORD)
        for j in range(messages):
            tag = f"c{i}m{j}"
            data = body(size_kb, tag, frm, to)
            started[f"<{tag}@bench.client>"] = time.monotonic()
            await smtp.sendmail(frm, [to], data)
        await smtp.quit()

    t0 = time.monotonic()
    await asyncio.gather(*(one(i) for i in range(clients)))
    return time.monotonic() - t0


BASELINE = r"""
import asyncio, ssl, sys
from aiosmtpd.smtp import SMTP
class H:
    async def handle_DATA(self, server, session, envelope):
        return "250 OK"
async def main():
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.load_cert_chain(sys.argv[2], sys.argv[3])
    loop = asyncio.get_running_loop()
    srv = await loop.create_server(lambda: SMTP(H(), decode_data=False), "127.0.0.1", int(sys.argv[1]), ssl=ctx)
    await srv.serve_forever()
asyncio.run(main())
"""


async def admin(url: str, sql: str) -> None:
    from sqlalchemy import text
    from sqlalchemy.ext.asyncio import create_async_engine

    from pecd.store.db import async_url

    engine = create_async_engine(async_url(url), isolation_level="AUTOCOMMIT")
    try:
        async with engine.connect() as conn:
            await conn.execute(text(sql))
    finally:
        await engine.dispose()


def db_name(url: str) -> str:
    from sqlalchemy.engine import make_url

    return str(make_url(url).database)


async def fresh_postgres(server: str) -> str:
    from sqlalchemy.engine import make_url

    name = f"pecd_bench_{os.getpid()}"
    await admin(server, f'DROP DATABASE IF EXISTS "{name}"')
    await admin(server, f'CREATE DATABASE "{name}"')
    return make_url(server).set(database=name).render_as_string(hide_password=False)


def _own_cpu(p: int) -> float:
    try:
        fields = Path(f"/proc/{p}/stat").read_text().rpartition(")")[2].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime + stime


def _children(p: int) -> list[int]:
    found: list[int] = []
    for task in Path(f"/proc/{p}/task").glob("*/children"):
        try:
            found += [int(c) for c in task.read_text().split()]
        except OSError:
            continue
    return found


def _cmdline(p: int) -> bytes:
    try:
        return Path(f"/proc/{p}/cmdline").read_bytes()
    except OSError:
        return b""


def machine_busy() -> float:
    """CPU seconds the whole machine spent busy (every core, every process, the kernel), from
    /proc/stat: with the bench's own and pecd's, it says what the rest of the machine took."""
    fields = Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]
    ticks = [int(x) for x in fields[:8]]
    idle = ticks[3] + ticks[4]  # idle + iowait
    return (sum(ticks) - idle) / os.sysconf("SC_CLK_TCK")


def bench_cpu() -> float:
    """CPU seconds of this process (the SMTPS clients and the Maildir scanner)."""
    t = os.times()
    return t.user + t.system


def machine_reference() -> tuple[float, float]:
    """How fast this machine is right now, to read figures of different days side by side:
    (ms per RSA-2048 PKCS#1 v1.5 SHA-256 signature, as OpenSSL makes the four of each message;
    ms per million iterations of a plain Python loop), the best of a few tries."""
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.asymmetric import padding, rsa

    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    sign = min(
        _timed(lambda: [key.sign(b"x", padding.PKCS1v15(), hashes.SHA256()) for _ in range(50)])
        for _ in range(3)
    )

    def loop() -> None:
        n = 0
        for i in range(1_000_000):
            n += i

    py = min(_timed(loop) for _ in range(3))
    return sign / 50 * 1000, py * 1000


def reference_line(ref: tuple[float, float]) -> str:
    return (
        f"  machine reference: RSA-2048 sign {ref[0]:.3f} ms, "
        f"Python loop {ref[1]:.1f} ms per million"
    )


def _timed(fn: Any) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def cpu_seconds(pid: int) -> tuple[float, float]:
    """(CPU seconds of ``pid`` and of its engine processes, of their format processes), from
    /proc, over the live process tree. The mailbox (IMAP/POP3) and web processes are left out:
    nobody uses them during the run. With ``serve.processes`` > 1 the SMTP+pipeline work is in
    the engine child processes: "main" is their sum with the parent's."""
    main = formats = 0.0
    todo = [pid]
    while todo:
        p = todo.pop()
        cmd = _cmdline(p)
        if p != pid and (b"mailbox_process" in cmd or b"web_process" in cmd):
            continue
        if b"multiprocessing" in cmd:
            formats += _own_cpu(p)
        else:
            main += _own_cpu(p)
        todo += _children(p)
    return main, formats


class Scanner:
    """Per client msgid: when its accettazione and its avvenuta-consegna were first seen in the
    senders' Maildirs. Each file is read once, so watching costs the server's machine little."""

    def __init__(self, store: MaildirStore, senders: list[str]) -> None:
        self.store = store
        self.senders = senders
        self.read: set[str] = set()
        self.seen: dict[str, dict[str, float]] = {}

    def scan(self) -> dict[str, dict[str, float]]:
        now = time.monotonic()
        for s in self.senders:
            for path in self.store.list_folder(s):
                if path.name in self.read:
                    continue
                try:
                    head = path.read_bytes().split(b"\r\n\r\n", 1)[0]
                except FileNotFoundError:
                    continue
                self.read.add(path.name)
                kind = ref = None
                for line in head.splitlines():
                    low = line.lower()
                    if low.startswith(b"x-ricevuta:"):
                        kind = line.split(b":", 1)[1].strip().decode()
                    elif low.startswith(b"x-riferimento-message-id:"):
                        ref = line.split(b":", 1)[1].strip().decode()
                if kind and ref:
                    self.seen.setdefault(ref, {}).setdefault(kind, now)
        return self.seen


async def install(
    tmp: Path, args: argparse.Namespace, extra: str = ""
) -> tuple[Path, Any, dict[str, int], list[str]]:
    """A fresh installation under ``tmp`` with one sender and one recipient per client."""
    inst = tmp / "inst"
    await init_installation(inst, domain=DOMAIN, name="Bench PEC", clock=SystemClock(), demo=False)
    ports = {"smtps": free_port(), "submission": free_port(), "imaps": free_port()}
    text = config_text(domain=DOMAIN, name="Bench PEC", ports=ports)
    if args.database_url:
        text = text.replace(
            'data_dir = "data"', f'data_dir = "data"\ndatabase_url = "{args.database_url}"'
        )
    if args.processes is not None:
        text += f"\n[serve]\nprocesses = {args.processes}\n"
    text += f"\n[queue]\nworkers = {args.workers}\npoll_seconds = 0.2\n"
    if args.format_processes is not None:
        text += f"format_processes = {args.format_processes}\n"
    if args.batch is not None:
        text += f"batch = {args.batch}\n"
    (inst / "pecd.toml").write_text(text + extra)
    cfg = load_config(inst / "pecd.toml")
    from pecd.store.db import migrate_async

    await migrate_async(cfg.database_url)
    db = await Database.open(cfg.database_url)
    acc = Accounts(db)
    if args.database_url:
        await acc.add_domain(DOMAIN)
        await acc.add_mailbox(cfg.provider.mail_receipt, PASSWORD)
    senders = [f"sender{i}@{DOMAIN}" for i in range(args.clients)]
    for i in range(args.clients):
        await acc.add_mailbox(senders[i], PASSWORD)
        await acc.add_mailbox(f"rcpt{i}@{DOMAIN}", PASSWORD)
    await db.close()
    return inst, cfg, ports, senders


async def measure(
    tmp: Path,
    inst: Path,
    cfg: Any,
    ports: dict[str, int],
    senders: list[str],
    args: argparse.Namespace,
    ctx: ssl.SSLContext,
) -> dict[str, float]:
    """Run ``pecd serve`` on ``inst``, submit, wait for every delivery receipt; the figures."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "pecd", "serve", "-c", str(inst / "pecd.toml")],
        stdout=(tmp / "pecd.log").open("wb"),
        stderr=subprocess.STDOUT,
    )
    wait_port(ports["smtps"], proc)
    # The port answers once pecd serve has bound it; with serve.processes > 1 its engine processes
    # may still be starting: wait for the whole start, or its CPU would count as the run's.
    wait_started(tmp / "pecd.log", proc)
    store = MaildirStore(cfg.maildir_root)
    cpu0 = cpu_seconds(proc.pid)
    own0, busy0 = bench_cpu(), machine_busy()
    started: dict[str, float] = {}
    t0 = time.monotonic()
    sub_elapsed = await run_clients(
        ports["smtps"], ctx, args.clients, args.messages, args.size_kb, auth=True, started=started
    )
    total = args.clients * args.messages
    seen: dict[str, dict[str, float]] = {}
    scanner = Scanner(store, senders)
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline:
        seen = scanner.scan()
        if sum(1 for v in seen.values() if "avvenuta-consegna" in v) >= total:
            break
        await asyncio.sleep(0.05)
    e2e_elapsed = (
        max(v.get("avvenuta-consegna", 0) for v in seen.values()) - t0 if seen else float("nan")
    )
    cpu1 = cpu_seconds(proc.pid)
    own1, busy1 = bench_cpu(), machine_busy()
    latencies = sorted(
        (v["accettazione"] - started[mid]) * 1000
        for mid, v in seen.items()
        if "accettazione" in v and mid in started
    )
    proc.terminate()
    proc.wait(60)

    def p(q: float) -> float:
        if not latencies:
            return float("nan")
        return latencies[min(len(latencies) - 1, int(q * len(latencies)))]

    done = sum(1 for v in seen.values() if "avvenuta-consegna" in v)
    return {
        "total": total,
        "done": done,
        "submissions": total / sub_elapsed,
        "e2e": done / e2e_elapsed,
        "p50": p(0.5),
        "p99": p(0.99),
        "cpu_main": (cpu1[0] - cpu0[0]) / done * 1000 if done else float("nan"),
        "cpu_formats": (cpu1[1] - cpu0[1]) / done * 1000 if done else float("nan"),
        "cpu_bench": (own1 - own0) / done * 1000 if done else float("nan"),
        "cpu_machine": (busy1 - busy0) / done * 1000 if done else float("nan"),
    }


def report(label: str, f: dict[str, float]) -> None:
    rows = [
        ("submissions/s", f"{f['submissions']:8.1f}"),
        (
            "end-to-end messages/s",
            f"{f['e2e']:8.1f}  ({f['done']:.0f}/{f['total']:.0f} delivery receipts)",
        ),
        ("DATA -> accettazione stored p50 / p99", f"{f['p50']:8.1f} ms / {f['p99']:.1f} ms"),
    ]
    if f["done"]:
        rows.append(
            (
                "CPU per message, main / formats",
                f"{f['cpu_main']:8.1f} ms / {f['cpu_formats']:.1f} ms",
            )
        )
        rows.append(
            (
                "machine CPU per message, all / clients",
                f"{f['cpu_machine']:8.1f} ms / {f['cpu_bench']:.1f} ms",
            )
        )
    if "cpu_clamd" in f:
        rows.append(("CPU per message, clamd", f"{f['cpu_clamd']:8.1f} ms"))
    for name, value in rows:
        print(f"  {label + name:<38}: {value}")


def start_clamd(tmp: Path) -> tuple[subprocess.Popen[bytes], Path]:
    """A clamd on the database pecd generates (EICAR and the project signature), on a socket
    in ``tmp``: what the access point's scan costs, with ClamAV's own engine."""
    from pecd.antivirus.clamd import clamd_binary, write_clamd

    program = clamd_binary()
    if program is None:
        raise SystemExit("clamd is not installed: run scripts/setup (Debian: clamav-daemon)")
    files = write_clamd(tmp / "clamd", max_scan_size=100 * 1024 * 1024)
    proc = subprocess.Popen([program, "-c", str(files.config)], stdout=subprocess.DEVNULL)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            with socket.socket(socket.AF_UNIX) as s:
                s.connect(str(files.socket))
                s.sendall(b"zPING\0")
                if s.recv(16) == b"PONG\0":
                    return proc, files.socket
        except OSError:
            time.sleep(0.1)
    proc.kill()
    raise SystemExit("clamd did not answer")


async def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--clients", type=int, default=10)
    ap.add_argument("--messages", type=int, default=50, help="per client")
    ap.add_argument("--size-kb", type=int, default=4)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument(
        "--format-processes", type=int, default=None, help="default: the config default"
    )
    ap.add_argument("--batch", type=int, default=None, help="queue.batch; default: the config's")
    ap.add_argument(
        "--postgres",
        default="",
        help="a PostgreSQL server URL (e.g. postgresql://postgres@127.0.0.1:5432/test): the run "
        "uses a fresh database of its own there, dropped afterwards; default: SQLite",
    )
    ap.add_argument(
        "--clamd",
        action="store_true",
        help="also run pecd with the antivirus on (a real clamd), in the same run, on a fresh "
        "installation: the figures side by side",
    )
    ap.add_argument(
        "--processes",
        type=int,
        default=None,
        help="serve.processes (SMTP+pipeline processes); default: the config default",
    )
    ap.add_argument(
        "--sweep",
        action="store_true",
        help="one run after another, each on a fresh installation: SQLite with the default "
        "processes, then PostgreSQL (--postgres, default the local server) with 1, 2 and 4 "
        "processes; a table beside the baseline",
    )
    ap.add_argument("--keep", action="store_true")
    args = ap.parse_args()
    if args.sweep:
        await sweep(args)
        return

    tmp = Path(tempfile.mkdtemp(prefix="pecd-bench-"))
    args.database_url = await fresh_postgres(args.postgres) if args.postgres else ""
    inst, cfg, ports, senders = await install(tmp, args)
    assert cfg.tls.ca is not None
    ctx = ssl.create_default_context(cafile=str(cfg.tls.ca))

    b_rate = await baseline(cfg, args, ctx)
    ref = machine_reference()

    plain = await measure(tmp, inst, cfg, ports, senders, args, ctx)
    scanned = None
    if args.clamd:
        clamd, sock = start_clamd(tmp)
        try:
            if args.postgres:
                await admin(
                    args.postgres, f'DROP DATABASE IF EXISTS "{db_name(args.database_url)}"'
                )
                args.database_url = await fresh_postgres(args.postgres)
            tmp2 = tmp / "antivirus"
            inst2, cfg2, ports2, senders2 = await install(
                tmp2, args, f'\n[antivirus]\nenabled = true\nsocket = "{sock}"\n'
            )
            assert cfg2.tls.ca is not None
            ctx2 = ssl.create_default_context(cafile=str(cfg2.tls.ca))
            clamd0 = cpu_seconds(clamd.pid)[0]
            scanned = await measure(tmp2, inst2, cfg2, ports2, senders2, args, ctx2)
            if scanned["done"]:
                scanned["cpu_clamd"] = (cpu_seconds(clamd.pid)[0] - clamd0) / scanned["done"] * 1000
        finally:
            clamd.terminate()
            clamd.wait(10)

    print(
        f"pecd bench: {args.clients} clients x {args.messages} messages x {args.size_kb} KB, "
        f"{args.workers} workers, db={'postgresql' if args.database_url else 'sqlite'}, cpus={os.cpu_count()}"
    )
    print(f"  baseline no-op aiosmtpd submissions/s : {b_rate:8.1f}")
    print(reference_line(ref))
    report("pecd ", plain)
    if scanned is not None:
        report("pecd+clamd ", scanned)
    if args.postgres:
        await admin(args.postgres, f'DROP DATABASE IF EXISTS "{db_name(args.database_url)}"')
    if args.keep:
        print(f"  kept {tmp}")
    else:
        shutil.rmtree(tmp, ignore_errors=True)


async def sweep(args: argparse.Namespace) -> None:
    """SQLite (default processes), then PostgreSQL with 1, 2, 4 processes: one table."""
    server = args.postgres or "postgresql://postgres@127.0.0.1:5432/test"
    runs: list[tuple[str, str, int | None]] = [("sqlite", "", None)]
    runs += [("postgresql", server, n) for n in (1, 2, 4)]
    rows: list[tuple[str, dict[str, float]]] = []
    baselines: list[float] = []
    ref = machine_reference()
    for db, url, processes in runs:
        tmp = Path(tempfile.mkdtemp(prefix="pecd-bench-"))
        args.processes = processes
        args.database_url = await fresh_postgres(url) if url else ""
        try:
            inst, cfg, ports, senders = await install(tmp, args)
            assert cfg.tls.ca is not None
            ctx = ssl.create_default_context(cafile=str(cfg.tls.ca))
            baselines.append(await baseline(cfg, args, ctx))
            figures = await measure(tmp, inst, cfg, ports, senders, args, ctx)
            label = f"{db}, processes={processes if processes else 'default'}"
            rows.append((label, figures))
        finally:
            if url:
                await admin(url, f'DROP DATABASE IF EXISTS "{db_name(args.database_url)}"')
            shutil.rmtree(tmp, ignore_errors=True)
    print(
        f"pecd bench sweep: {args.clients} clients x {args.messages} messages x "
        f"{args.size_kb} KB, {args.workers} workers per process, cpus={os.cpu_count()}"
    )
    print(
        "  baseline no-op aiosmtpd submissions/s, before each run: "
        + ", ".join(f"{b:.0f}" for b in baselines)
    )
    print(reference_line(ref))
    print(
        f"  {'run':<28} {'e2e msg/s':>10} {'submit/s':>9} {'CPU main':>9} {'formats':>8} "
        f"{'total ms':>9} {'machine':>8} {'done':>10}"
    )
    for label, f in rows:
        total = f["cpu_main"] + f["cpu_formats"]
        print(
            f"  {label:<28} {f['e2e']:10.1f} {f['submissions']:9.1f} {f['cpu_main']:9.2f} "
            f"{f['cpu_formats']:8.2f} {total:9.2f} {f['cpu_machine']:8.2f} "
            f"{f['done']:5.0f}/{f['total']:.0f}"
        )


async def baseline(cfg: Any, args: argparse.Namespace, ctx: ssl.SSLContext) -> float:
    """Submissions/s of a no-op aiosmtpd over the same TLS, no AUTH, nothing stored."""
    bport = free_port()
    base = subprocess.Popen(
        [sys.executable, "-c", BASELINE, str(bport), str(cfg.tls.cert), str(cfg.tls.key)]
    )
    try:
        wait_port(bport, base)
        elapsed = await run_clients(
            bport, ctx, args.clients, args.messages, args.size_kb, auth=False, started={}
        )
    finally:
        base.terminate()
        base.wait()
    return args.clients * args.messages / elapsed


if __name__ == "__main__":
    asyncio.run(main())
