"""IMAP on one large folder: what a command costs when INBOX holds N messages.

A PEC mailbox only grows (every transmission leaves its receipts; the provider's service mailbox
gets every presa in carico), so the cost of a command must not grow with the folder. One
mailbox gets N messages; one imaplib client then times SELECT, NOOP with nothing new, NOOP after
one new delivery, and FETCH of one message, against pecd's mailbox process and, in the same run,
Dovecot over the same tree (the baseline).

    .venv/bin/python bench/bench_imap_large.py --messages 10000
"""

from __future__ import annotations

import argparse
import asyncio
import imaplib
import shutil
import ssl
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from bench_imap import DOMAIN, PASSWORD, dovecot_running, message, pecd_running
from bench_local import free_port

from pecd.clock import SystemClock
from pecd.config import load_config
from pecd.devinit import config_text, init_installation
from pecd.mailbox.maildir import MaildirStore
from pecd.store.accounts import Accounts
from pecd.store.db import Database


def timed(fn: Callable[[], object]) -> float:
    start = time.monotonic()
    fn()
    return time.monotonic() - start


def measure(
    port: int, ctx: ssl.SSLContext, user: str, store: MaildirStore, lend_to: bool
) -> dict[str, float]:
    client = imaplib.IMAP4_SSL("127.0.0.1", port, ssl_context=ctx, timeout=600)
    client.login(user, PASSWORD)
    out = {"select": timed(lambda: client.select("INBOX"))}
    time.sleep(1.5)  # the folder's last change is now more than a second old
    out["noop, nothing new"] = min(timed(client.noop) for _ in range(3))
    new = store.deliver(user, f"large-{port}", message(0, 1, user))
    if lend_to:
        shutil.chown(new.path, "nobody", "nogroup")
    out["noop, one new message"] = timed(client.noop)
    out["fetch one message"] = timed(lambda: client.fetch("1", "(BODY.PEEK[])"))
    client.logout()
    return out


async def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--messages", type=int, default=10000)
    ap.add_argument("--no-dovecot", action="store_true")
    args = ap.parse_args()

    tmp = Path(tempfile.mkdtemp(prefix="pecd-bench-imap-large-"))
    inst = tmp / "inst"
    await init_installation(inst, domain=DOMAIN, name="Bench PEC", clock=SystemClock(), demo=False)
    ports = {"smtps": free_port(), "submission": free_port(), "imaps": free_port()}
    (inst / "pecd.toml").write_text(config_text(domain=DOMAIN, name="Bench PEC", ports=ports))
    cfg = load_config(inst / "pecd.toml")
    db = await Database.open(cfg.database_url)
    user = f"large@{DOMAIN}"
    mailbox = await Accounts(db).add_mailbox(user, PASSWORD)
    await db.close()
    store = MaildirStore(cfg.maildir_root)
    for m in range(args.messages):
        store.deliver(user, f"m{m}", message(m, 2, user), fresh=True)
    assert cfg.tls.ca is not None
    ctx = ssl.create_default_context(cafile=str(cfg.tls.ca))
    results: dict[str, dict[str, float]] = {}

    if not args.no_dovecot and shutil.which("dovecot"):
        passwd = tmp / "passwd"
        passwd.write_text(f"{user}:{{ARGON2ID}}{mailbox.password_hash}\n")
        with dovecot_running(cfg, tmp, passwd) as (dport, _):
            results["dovecot"] = measure(dport, ctx, user, store, lend_to=True)

    with pecd_running(inst, tmp, ports["imaps"]):
        results["pecd"] = measure(ports["imaps"], ctx, user, store, lend_to=False)

    print(f"IMAP on one folder of {args.messages} messages (seconds per command)")
    names = list(next(iter(results.values())))
    print(f"  {'':24}" + "".join(f"{n:>12}" for n in results))
    for item in names:
        print(f"  {item:24}" + "".join(f"{r[item]:12.3f}" for r in results.values()))
    shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    asyncio.run(main())
