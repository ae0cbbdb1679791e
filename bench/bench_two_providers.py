"""Two providers on loopback: N SMTPS clients of provider A send M messages of S KB to holders of
provider B. Prints end-to-end messages/s (until every avvenuta-consegna signed by B is in the A
sender's Maildir) beside the single-provider figure of bench_local.py measured in the same run.

    .venv/bin/python bench/bench_two_providers.py --clients 10 --messages 50 --size-kb 4
"""

from __future__ import annotations

import argparse
import asyncio
import os
import re
import shutil
import ssl
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from bench_local import DOMAIN, PASSWORD, Scanner, free_port, run_clients, wait_port

from pecd.clock import SystemClock
from pecd.config import load_config
from pecd.devinit import config_text, init_installation
from pecd.index import entry_ldif, own_entry
from pecd.mailbox.maildir import MaildirStore
from pecd.store.accounts import Accounts
from pecd.store.db import Database

DOMAIN_B = "pec-b.bench.test"


async def install(tmp: Path, args: argparse.Namespace) -> dict[str, Path]:
    reception = {DOMAIN: free_port(), DOMAIN_B: free_port()}
    paths: dict[str, Path] = {}
    for domain in (DOMAIN, DOMAIN_B):
        inst = tmp / domain
        await init_installation(
            inst, domain=domain, name=f"Bench {domain}", clock=SystemClock(), demo=False
        )
        ports = {"smtps": free_port(), "submission": free_port(), "imaps": free_port()}
        other = DOMAIN_B if domain == DOMAIN else DOMAIN
        text = config_text(domain=domain, name=f"Bench {domain}", ports=ports)
        text = text.replace(
            'hostname = "localhost"',
            f'hostname = "localhost"\nreception = "127.0.0.1:{reception[domain]}"',
        )
        text += f"\n[queue]\nworkers = {args.workers}\npoll_seconds = 0.2\n"
        text += '\n[relay]\nstarttls = "required"\nca_bundle = "../peers-ca.pem"\n'
        text += f'\n[index]\npath = "../index-for-{domain}.ldif"\n'
        text += f'\n[routes]\n"{other}" = "127.0.0.1:{reception[other]}"\n'
        (inst / "pecd.toml").write_text(text)
        paths[domain] = inst / "pecd.toml"
    (tmp / "peers-ca.pem").write_bytes(
        b"".join((tmp / d / "pki/ca.pem").read_bytes() for d in (DOMAIN, DOMAIN_B))
    )
    for me, other in ((DOMAIN, DOMAIN_B), (DOMAIN_B, DOMAIN)):
        (tmp / f"index-for-{me}.ldif").write_text("")
        other_cfg = load_config(paths[other])
        (tmp / f"index-for-{me}.ldif").write_text(entry_ldif(own_entry(other_cfg)))
    for domain, users in ((DOMAIN, "sender"), (DOMAIN_B, "rcpt")):
        cfg = load_config(paths[domain])
        db = await Database.open(cfg.database_url)
        acc = Accounts(db)
        for i in range(args.clients):
            await acc.add_mailbox(f"{users}{i}@{domain}", PASSWORD)
        await db.close()
    return paths


async def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--clients", type=int, default=10)
    ap.add_argument("--messages", type=int, default=50, help="per client")
    ap.add_argument("--size-kb", type=int, default=4)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--keep", action="store_true")
    args = ap.parse_args()

    single = subprocess.run(
        [
            sys.executable,
            str(Path(__file__).with_name("bench_local.py")),
            "--clients",
            str(args.clients),
            "--messages",
            str(args.messages),
            "--size-kb",
            str(args.size_kb),
            "--workers",
            str(args.workers),
        ],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    m = re.search(r"end-to-end messages/s\s*:\s*([\d.]+)", single)
    single_e2e = float(m.group(1)) if m else float("nan")

    tmp = Path(tempfile.mkdtemp(prefix="pecd-bench2-"))
    paths = await install(tmp, args)
    procs = []
    for domain in (DOMAIN, DOMAIN_B):
        cfg = load_config(paths[domain])
        proc = subprocess.Popen(
            [sys.executable, "-m", "pecd", "serve", "-c", str(paths[domain])],
            stdout=(tmp / f"{domain}.log").open("wb"),
            stderr=subprocess.STDOUT,
        )
        assert cfg.listeners.smtps is not None
        wait_port(cfg.listeners.smtps.port, proc)
        procs.append(proc)
    cfg_a = load_config(paths[DOMAIN])
    assert cfg_a.tls.ca is not None and cfg_a.listeners.smtps is not None
    ctx = ssl.create_default_context(cafile=str(cfg_a.tls.ca))
    senders = [f"sender{i}@{DOMAIN}" for i in range(args.clients)]
    scanner = Scanner(MaildirStore(cfg_a.maildir_root), senders)
    started: dict[str, float] = {}
    t0 = time.monotonic()
    sub = await run_clients(
        cfg_a.listeners.smtps.port,
        ctx,
        args.clients,
        args.messages,
        args.size_kb,
        auth=True,
        started=started,
        rcpt_domain=DOMAIN_B,
    )
    total = args.clients * args.messages
    seen: dict[str, dict[str, float]] = {}
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline:
        seen = scanner.scan()
        if sum(1 for v in seen.values() if "avvenuta-consegna" in v) >= total:
            break
        await asyncio.sleep(0.05)
    done = sum(1 for v in seen.values() if "avvenuta-consegna" in v)
    e2e = max((v.get("avvenuta-consegna", 0) for v in seen.values()), default=t0) - t0
    for proc in procs:
        proc.terminate()
        proc.wait(60)
    print(
        f"pecd two-provider bench: {args.clients} clients x {args.messages} messages x "
        f"{args.size_kb} KB, A -> B over SMTP+STARTTLS on loopback, SQLite, cpus={os.cpu_count()}"
    )
    print(f"  single provider end-to-end messages/s : {single_e2e:8.1f}")
    print(f"  A submissions/s                       : {total / sub:8.1f}")
    print(
        f"  two providers end-to-end messages/s   : {done / e2e if e2e > 0 else float('nan'):8.1f}  ({done}/{total} delivery receipts from B)"
    )
    if args.keep:
        print(f"  kept {tmp}")
    else:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    asyncio.run(main())
