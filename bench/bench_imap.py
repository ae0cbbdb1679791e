"""IMAP load: N aioimaplib clients log in, SELECT, FETCH and IDLE against pecd's mailbox process.

Each client owns a mailbox holding M delivered messages (S KB each). Every client does:
LOGIN, SELECT INBOX, FETCH 1:* (FLAGS RFC822.SIZE BODYSTRUCTURE ENVELOPE), FETCH every
BODY.PEEK[], then sits in IDLE while one more message is delivered to it (the IDLE update is
awaited), DONE, LOGOUT. Printed: sessions/s and messages fetched/s, the mailbox process's memory
(RSS) idle, with all sessions open in IDLE, and per session; its CPU per session; and the same
run against Dovecot serving the same Maildir tree in the same run (the baseline), when Dovecot is
installed.

    .venv/bin/python bench/bench_imap.py --clients 50 --messages 20 --size-kb 8
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import shutil
import ssl
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path

import aioimaplib

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from bench_local import free_port, wait_port

from pecd.clock import SystemClock
from pecd.config import Config, load_config
from pecd.devinit import config_text, init_installation
from pecd.mailbox.maildir import MaildirStore
from pecd.store.accounts import Accounts
from pecd.store.db import Database

DOMAIN = "pec.bench.test"
PASSWORD = "bench password 123"


def message(i: int, size_kb: int, to: str) -> bytes:
    head = (
        f"From: sender@{DOMAIN}\r\nTo: {to}\r\nSubject: bench {i}\r\n"
        f"Message-ID: <bench-{i}@{DOMAIN}>\r\nDate: Mon, 30 Nov 2026 10:00:00 +0100\r\n"
        "MIME-Version: 1.0\r\nContent-Type: multipart/mixed; boundary=b1\r\n\r\n"
        "--b1\r\nContent-Type: text/plain; charset=utf-8\r\n\r\n"
    )
    text = ("x" * 76 + "\r\n") * max(1, size_kb * 1024 // 78)
    tail = (
        "--b1\r\nContent-Type: application/xml\r\n"
        'Content-Disposition: attachment; filename="daticert.xml"\r\n\r\n<x/>\r\n--b1--\r\n'
    )
    return (head + text + tail).encode()


def _stat(pid: int) -> list[str]:
    return Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()


def _descendants(pid: int) -> list[int]:
    out: list[int] = []
    todo = [pid]
    while todo:
        p = todo.pop()
        for task in Path(f"/proc/{p}/task").glob("*/children"):
            try:
                kids = [int(c) for c in task.read_text().split()]
            except OSError:
                continue
            out += kids
            todo += kids
    return out


def tree_stats(root: int) -> tuple[float, int]:
    """(CPU seconds, RSS KiB) of ``root`` and every process below it: the root's own CPU plus
    what its exited children used (cutime, cstime), plus the live descendants' own."""
    tick = os.sysconf("SC_CLK_TCK")
    cpu = 0.0
    rss = 0
    for i, pid in enumerate([root, *_descendants(root)]):
        try:
            f = _stat(pid)
            status = Path(f"/proc/{pid}/status").read_text()
        except OSError:
            continue
        cpu += int(f[11]) + int(f[12]) + (int(f[13]) + int(f[14]) if i == 0 else 0)
        for line in status.splitlines():
            if line.startswith("VmRSS:"):
                rss += int(line.split()[1])
    return cpu / tick, rss


class Phase:
    """Every session reports when it idles; deliveries wait until all do."""

    def __init__(self, n: int) -> None:
        self.n = n
        self.idling = 0
        self.all_idle = asyncio.Event()
        self.go = asyncio.Event()

    def idle(self) -> None:
        self.idling += 1
        if self.idling == self.n:
            self.all_idle.set()


async def session(
    port: int,
    ctx: ssl.SSLContext,
    user: str,
    phase: Phase,
    deliver: Callable[[str], Awaitable[None]],
) -> int:
    client = aioimaplib.IMAP4_SSL("127.0.0.1", port, ssl_context=ctx, timeout=60)
    await client.wait_hello_from_server()
    r = await client.login(user, PASSWORD)
    assert r.result == "OK", r
    r = await client.select("INBOX")
    assert r.result == "OK", r
    r = await client.fetch("1:*", "(FLAGS RFC822.SIZE BODYSTRUCTURE ENVELOPE)")
    assert r.result == "OK", r
    r = await client.search("ALL")
    count = len(r.lines[0].split()) if r.lines and r.lines[0] else 0
    for n in range(1, count + 1):
        r = await client.fetch(str(n), "(BODY.PEEK[])")
        assert r.result == "OK", r
    idle = await client.idle_start(timeout=120)
    await asyncio.sleep(0.2)  # the server's "+ idling" has come back by then
    phase.idle()
    await phase.go.wait()
    await deliver(user)  # one new message while this session idles: its EXISTS is awaited
    while client.has_pending_idle():
        push = await client.wait_server_push(timeout=60)
        if any(b"EXISTS" in (p if isinstance(p, bytes) else p.encode()) for p in push):
            break
    client.idle_done()
    await asyncio.wait_for(idle, 60)
    await client.logout()
    return count + 1


async def run(
    port: int,
    ctx: ssl.SSLContext,
    users: list[str],
    store: MaildirStore,
    args: argparse.Namespace,
    root: int,
    lend_to: tuple[str, str] | None = None,
) -> dict[str, float]:
    phase = Phase(len(users))

    async def deliver(user: str) -> None:
        done = await asyncio.to_thread(
            store.deliver, user, f"idle-{port}-{user}", message(10_000, 1, user)
        )
        if lend_to is not None:
            shutil.chown(done.path, *lend_to)

    cpu0, rss0 = tree_stats(root)
    t0 = time.monotonic()
    tasks = [asyncio.create_task(session(port, ctx, u, phase, deliver)) for u in users]
    waiter = asyncio.create_task(phase.all_idle.wait())
    await asyncio.wait([waiter, *tasks], return_when=asyncio.FIRST_COMPLETED)
    for t in tasks:
        if t.done() and t.exception() is not None:
            waiter.cancel()
            raise SystemExit(f"an IMAP session failed: {t.exception()!r}")
    await asyncio.sleep(0.5)
    _, rss_idle = tree_stats(root)
    phase.go.set()
    fetched = sum(await asyncio.gather(*tasks))
    elapsed = time.monotonic() - t0
    cpu1, _ = tree_stats(root)
    n = len(users)
    return {
        "sessions_s": n / elapsed,
        "messages_s": fetched / elapsed,
        "rss0": rss0,
        "rss_idle": rss_idle,
        "per_session_kib": (rss_idle - rss0) / n,
        "cpu_ms_session": (cpu1 - cpu0) / n * 1000,
    }


def dovecot_conf(cfg: Config, root: Path, port: int, passwd: Path) -> Path:
    conf = root / "dovecot.conf"
    run = root / "run"
    run.mkdir(exist_ok=True)
    conf.write_text(
        f"""protocols = imap
listen = 127.0.0.1
base_dir = {run}
state_dir = {root / "state"}
log_path = {root / "dovecot.log"}
ssl = required
ssl_cert = <{cfg.tls.cert}
ssl_key = <{cfg.tls.key}
disable_plaintext_auth = yes
auth_mechanisms = plain login
mail_location = maildir:{cfg.maildir_root}/%d/%n
mail_uid = nobody
mail_gid = nogroup
first_valid_uid = 1
default_internal_user = dovecot
default_login_user = dovenull
passdb {{
  driver = passwd-file
  args = {passwd}
}}
userdb {{
  driver = static
  args = uid=nobody gid=nogroup home={cfg.maildir_root}/%d/%n
}}
service imap-login {{
  inet_listener imap {{
    port = 0
  }}
  inet_listener imaps {{
    port = {port}
    ssl = yes
  }}
  process_limit = 1000
  client_limit = 1000
}}
service imap {{
  process_limit = 2000
}}
"""
    )
    return conf


@contextlib.contextmanager
def dovecot_running(cfg: Config, tmp: Path, passwd: Path) -> Iterator[tuple[int, int]]:
    """Dovecot over pecd's Maildir tree on a free port; yields (port, master pid). Dovecot will
    not serve mail as root: the tree is lent to "nobody" (pecd, as root here, reads it all the
    same)."""
    port = free_port()
    conf = dovecot_conf(cfg, tmp, port, passwd)
    subprocess.run(["chown", "-R", "nobody:nogroup", str(cfg.maildir_root)], check=True)
    tmp.chmod(0o755)
    dove = subprocess.Popen(["dovecot", "-F", "-c", str(conf)])
    try:
        wait_port(port, dove)
        yield port, dove.pid
    finally:
        dove.terminate()
        dove.wait(30)


@contextlib.contextmanager
def pecd_running(inst: Path, tmp: Path, imaps_port: int) -> Iterator[int]:
    """``pecd serve`` of the installation in ``inst``; yields its pid once IMAPS answers."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "pecd", "serve", "-c", str(inst / "pecd.toml")],
        stdout=(tmp / "pecd.log").open("wb"),
        stderr=subprocess.STDOUT,
    )
    try:
        wait_port(imaps_port, proc)
        yield proc.pid
    finally:
        proc.terminate()
        proc.wait(60)


async def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--clients", type=int, default=50)
    ap.add_argument("--messages", type=int, default=20)
    ap.add_argument("--size-kb", type=int, default=8)
    ap.add_argument("--no-dovecot", action="store_true", help="skip the Dovecot baseline")
    ap.add_argument("--keep", action="store_true")
    args = ap.parse_args()

    tmp = Path(tempfile.mkdtemp(prefix="pecd-bench-imap-"))
    inst = tmp / "inst"
    await init_installation(inst, domain=DOMAIN, name="Bench PEC", clock=SystemClock(), demo=False)
    ports = {"smtps": free_port(), "submission": free_port(), "imaps": free_port()}
    (inst / "pecd.toml").write_text(
        config_text(domain=DOMAIN, name="Bench PEC", ports=ports)
        + "\n[security]\nmax_connections_per_address = 100000\nmax_connections = 100000\n"
    )
    cfg = load_config(inst / "pecd.toml")
    db = await Database.open(cfg.database_url)
    acc = Accounts(db)
    users = [f"user{i}@{DOMAIN}" for i in range(args.clients)]
    store = MaildirStore(cfg.maildir_root)
    hashes: dict[str, str] = {}
    for u in users:
        hashes[u] = (await acc.add_mailbox(u, PASSWORD)).password_hash
        for m in range(args.messages):
            store.deliver(u, f"{u}-{m}", message(m, args.size_kb, u))
    await db.close()
    assert cfg.tls.ca is not None
    ctx = ssl.create_default_context(cafile=str(cfg.tls.ca))

    results: dict[str, dict[str, float]] = {}
    if not args.no_dovecot and shutil.which("dovecot"):
        passwd = tmp / "passwd"
        # The same argon2id hashes pecd checks: both servers pay the same for a login.
        passwd.write_text("".join(f"{u}:{{ARGON2ID}}{hashes[u]}\n" for u in users))
        with dovecot_running(cfg, tmp, passwd) as (dport, dpid):
            await asyncio.sleep(0.5)
            results["dovecot"] = await run(
                dport, ctx, users, store, args, dpid, lend_to=("nobody", "nogroup")
            )

    with pecd_running(inst, tmp, ports["imaps"]) as pid:
        await asyncio.sleep(0.5)
        children = [
            int(c)
            for t in Path(f"/proc/{pid}/task").glob("*/children")
            for c in t.read_text().split()
        ]
        mailbox = [
            c for c in children if b"mailbox_process" in Path(f"/proc/{c}/cmdline").read_bytes()
        ]
        results["pecd"] = await run(ports["imaps"], ctx, users, store, args, mailbox[0])

    print(
        f"IMAP bench: {args.clients} clients, {args.messages} messages x {args.size_kb} KB each, "
        f"cpus={os.cpu_count()}"
    )
    for name, r in results.items():
        print(
            f"  {name:8} sessions/s {r['sessions_s']:7.1f}   messages fetched/s {r['messages_s']:8.1f}   "
            f"RSS idle {r['rss0'] / 1024:6.1f} MiB, in IDLE {r['rss_idle'] / 1024:6.1f} MiB "
            f"({r['per_session_kib']:.0f} KiB/session)   CPU {r['cpu_ms_session']:.1f} ms/session"
        )
    print("  (memory and CPU: pecd's mailbox process; Dovecot's master and all its processes)")
    if args.keep:
        print(f"  kept {tmp}")
    else:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    asyncio.run(main())
