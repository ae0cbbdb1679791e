"""``pecd queue``: jobs waiting, running or parked; a parked job made ready again."""

from __future__ import annotations

import argparse
import asyncio
from typing import TYPE_CHECKING

from pecd.cli.common import EXIT_OK, Subcommands, load, print_table, with_accounts, with_config
from pecd.clock import SystemClock

if TYPE_CHECKING:
    from pecd.store.accounts import Accounts
    from pecd.store.db import Database


def cmd_queue(args: argparse.Namespace) -> int:
    from pecd.store import jobs

    cfg = load(args)

    async def go(acc: Accounts, db: Database) -> int:
        async with db.session() as s, s.begin():
            if args.queue_command == "requeue":
                await jobs.requeue(s, args.job_id, SystemClock().now())
                print(f"pecd: job {args.job_id} is ready again")
                return EXIT_OK
            states = [args.state] if args.state else ["ready", "running", "parked"]
            found = await jobs.list_jobs(
                s, states=states, kinds=[args.kind] if args.kind else None, limit=args.limit
            )
            rows = [
                (
                    j.id,
                    j.kind,
                    j.state,
                    j.attempts,
                    j.next_run_at,
                    (j.payload or {}).get("recipients"),
                    j.last_error,
                )
                for j in found
            ]
        print_table(
            "Queue",
            ["id", "kind", "state", "attempts", "next_run_at", "recipients", "last_error"],
            rows,
            args.json,
        )
        return EXIT_OK

    return asyncio.run(with_accounts(cfg, go))


def register(sub: Subcommands) -> None:
    """Add ``pecd queue …`` to the ``pecd`` parser."""
    q = sub.add_parser("queue", help="jobs waiting, running or parked")
    q_sub = q.add_subparsers(dest="queue_command", required=True)
    ql = with_config(q_sub.add_parser("list"))
    ql.add_argument("--state", choices=["ready", "running", "parked", "done"])
    ql.add_argument("--kind")
    ql.add_argument("--limit", type=int, default=100)
    ql.add_argument("--json", action="store_true")
    qr = with_config(q_sub.add_parser("requeue", help="make a parked job ready again"))
    qr.add_argument("job_id", type=int)
    q.set_defaults(func=cmd_queue)
