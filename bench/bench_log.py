"""The trace log at scale: N events written and sealed, then `log search` by PEC msgid and
`log verify` timed on them.

    .venv/bin/python bench/bench_log.py --events 1000000
    .venv/bin/python bench/bench_log.py --events 1000000 --postgres postgresql://postgres@127.0.0.1:5432/test
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import statistics
import sys
import tempfile
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from bench_local import admin, db_name, fresh_postgres
from sqlalchemy import insert

from pecd.pec.pki import create_dev_pki
from pecd.pec.smime import KeySigner
from pecd.store import seals
from pecd.store.db import Database, migrate_async
from pecd.store.models import TraceEvent
from pecd.store.trace import Query, search

T0 = datetime(2026, 1, 1, tzinfo=UTC)


def event(i: int) -> dict[str, object]:
    ident = f"opec{i:09d}.20260101.{i % 997}@pec.bench.test"
    return {
        "at": T0 + timedelta(milliseconds=37 * i),
        "event": ("accettazione", "posta-certificata", "presa-in-carico", "avvenuta-consegna")[
            i % 4
        ],
        "pec_msgid": ident,
        "client_msgid": f"<c{i}@client.example>",
        "sender": f"user{i % 5000}@pec.bench.test",
        "recipients": [{"address": f"dest{i % 7000}@pec.other.test", "tipo": "certificato"}],
        "subject": f"Fattura elettronica n. {i}",
        "provider": "Bench PEC S.p.A.",
        "generated_ids": [f"opec{i:09d}.r@pec.bench.test"],
        "error": None,
        "daticert": {
            "tipo": "accettazione",
            "mittente": f"user{i % 5000}@pec.bench.test",
            "identificativo": ident,
            "giorno": "01/01/2026",
            "ora": "10:00:00",
            "zona": "+0100",
        },
        "data": {"signer_sha1": "0" * 40},
        "node": "bench",
    }


async def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--events", type=int, default=1_000_000)
    ap.add_argument("--seal-every", type=int, default=50_000, help="events per seal")
    ap.add_argument("--searches", type=int, default=200)
    ap.add_argument("--postgres", default="", help="a PostgreSQL server URL; default: SQLite")
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="pecd-benchlog-"))
    url = await fresh_postgres(args.postgres) if args.postgres else f"sqlite:///{tmp / 'log.db'}"
    await migrate_async(url)
    db = await Database.open(url)
    pki = create_dev_pki(domain="pec.bench.test", name="Bench PEC", now=datetime.now(UTC))
    signer = KeySigner.from_pem(pki.signing.key_pem, pki.signing.cert_pem)
    try:
        t0 = time.perf_counter()
        chunk = 10_000
        for start in range(0, args.events, chunk):
            async with db.session() as s, s.begin():
                await s.execute(
                    insert(TraceEvent.__table__),
                    [event(i) for i in range(start, min(start + chunk, args.events))],
                )
            if start % args.seal_every == args.seal_every - chunk:
                await seals.seal_pending(db, signer, now=datetime.now(UTC), node="bench")
        while await seals.seal_pending(db, signer, now=datetime.now(UTC), node="bench"):
            pass
        t_load = time.perf_counter() - t0

        times = []
        rng = random.Random(1)
        async with db.read_session() as s:
            for _ in range(args.searches):
                i = rng.randrange(args.events)
                q = Query(pec_msgid=f"opec{i:09d}.20260101.{i % 997}@pec.bench.test")
                t = time.perf_counter()
                found = await search(s, q, limit=100)
                times.append((time.perf_counter() - t) * 1000)
                assert len(found) == 1
        t = time.perf_counter()
        report = await seals.verify(db, now=datetime.now(UTC), unsealed_grace=timedelta(hours=1))
        t_verify = time.perf_counter() - t
        assert report.ok and report.events == args.events, report.findings[:3]
    finally:
        await db.close()
        if args.postgres:
            await admin(args.postgres, f'DROP DATABASE IF EXISTS "{db_name(url)}"')
    times.sort()
    print(
        f"pecd log bench: {args.events} events, {report.seals} seals, "
        f"db={'postgresql' if args.postgres else 'sqlite'}, cpus={os.cpu_count()}"
    )
    print(
        f"  write + seal                    : {t_load:8.1f} s ({args.events / t_load:,.0f} events/s)"
    )
    print(
        f"  log search by PEC msgid         : p50 {statistics.median(times):.2f} ms, "
        f"p99 {times[int(len(times) * 0.99) - 1]:.2f} ms, max {times[-1]:.2f} ms"
    )
    print(
        f"  log verify                      : {t_verify:8.1f} s ({args.events / t_verify:,.0f} events/s)"
    )


if __name__ == "__main__":
    asyncio.run(main())
