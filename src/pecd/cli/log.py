"""``pecd log verify|seal|purge|search|export``: the trace log, its seals and extracts of it."""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from dataclasses import asdict
from datetime import UTC, datetime
from typing import TYPE_CHECKING

from pecd.cli.common import EXIT_INVALID, EXIT_OK, Subcommands, load, print_table, with_config
from pecd.clock import SystemClock

if TYPE_CHECKING:
    from pecd.store.db import Database
    from pecd.store.trace import Query


def query_of(args: argparse.Namespace) -> Query:
    """The trace-log query ``pecd log search|export``'s options describe."""
    from pecd.store.trace import Query

    def when(value: str | None) -> datetime | None:
        if not value:
            return None
        t = datetime.fromisoformat(value)
        return t if t.tzinfo else t.replace(tzinfo=UTC)

    return Query(
        pec_msgid=args.msgid,
        client_msgid=args.client_msgid,
        sender=args.sender,
        recipient=args.recipient,
        subject=args.subject,
        event=args.event,
        since=when(args.since),
        until=when(args.until),
    )


async def log_select(db: Database, args: argparse.Namespace) -> int:
    """``pecd log search`` (a table or JSON) and ``pecd log export`` (JSON lines or CSV)."""
    import csv

    from rich.progress import Progress

    from pecd.store import trace

    query = query_of(args)
    async with db.read_session() as s:
        if args.log_command == "search":
            found = await trace.search(s, query, limit=args.limit)
            rows = [trace.as_json(e) for e in found]
            if args.json:
                print(json.dumps(rows, indent=2, ensure_ascii=False))
            else:
                print_table(
                    "Trace log",
                    ["id", "at", "event", "pec_msgid", "sender", "recipients", "subject", "error"],
                    [
                        (
                            r["id"],
                            r["at"],
                            r["event"],
                            r["pec_msgid"],
                            r["sender"],
                            ", ".join(x.get("address", "") for x in r["recipients"] or []),
                            r["subject"],
                            r["error"],
                        )
                        for r in rows
                    ],
                    False,
                )
            return EXIT_OK
        total = await trace.count(s, query)
        out = (
            open(args.output, "w", encoding="utf-8", newline="")  # noqa: SIM115 (closed below)
            if args.output
            else sys.stdout
        )
        try:
            writer = csv.writer(out) if args.format == "csv" else None
            if writer is not None:
                writer.writerow(list(trace.FIELDS))
            with Progress(transient=True, disable=not args.output) as bar:
                task = bar.add_task("exporting", total=total)
                async for chunk in trace.stream(s, query):
                    for e in chunk:
                        row = trace.as_json(e)
                        if writer is not None:
                            writer.writerow(
                                [
                                    json.dumps(row[c], ensure_ascii=False)
                                    if isinstance(row[c], dict | list)
                                    else row[c]
                                    for c in trace.FIELDS
                                ]
                            )
                        else:
                            out.write(json.dumps(row, ensure_ascii=False) + "\n")
                    bar.advance(task, len(chunk))
        finally:
            if out is not sys.stdout:
                out.close()
        if args.output:
            print(f"pecd: exported {total} events to {args.output}", file=sys.stderr)
        return EXIT_OK


def cmd_log(args: argparse.Namespace) -> int:
    from datetime import timedelta

    from rich.progress import Progress

    from pecd.runtime.identity import load_signer
    from pecd.store import seals
    from pecd.store.db import Database

    cfg = load(args)

    async def go() -> int:
        db = await Database.open(cfg.database_url)
        try:
            if args.log_command in ("search", "export"):
                return await log_select(db, args)
            if args.log_command == "purge":
                n_seals, n_events = await seals.purge(
                    db,
                    load_signer(cfg),
                    now=SystemClock().now(),
                    retention_months=cfg.log.retention_months,
                )
                print(
                    f"pecd: purged {n_seals} seals and {n_events} events older than "
                    f"{cfg.log.retention_months} months"
                )
                return EXIT_OK
            if args.log_command == "seal":
                signer = load_signer(cfg)
                total = 0
                while (
                    seal := await seals.seal_pending(
                        db, signer, now=SystemClock().now(), node="pecd log seal"
                    )
                ) is not None and seal.count:
                    total += seal.count
                print(f"pecd: sealed {total} events")
                return EXIT_OK
            with Progress(transient=True, disable=args.json) as bar:
                task = bar.add_task("verifying the trace log", total=None)

                def step(done: int, total: int) -> None:
                    bar.update(task, completed=done, total=total)

                report = await seals.verify(
                    db,
                    now=SystemClock().now(),
                    unsealed_grace=timedelta(seconds=cfg.log.seal_seconds * 3 + 60),
                    first_seal=args.from_seal,
                    last_seal=args.to_seal,
                    progress=step,
                )
        finally:
            await db.close()
        if args.json:
            print(
                json.dumps(
                    {
                        "ok": report.ok,
                        "seals": report.seals,
                        "events": report.events,
                        "findings": [asdict(f) for f in report.findings],
                    },
                    indent=2,
                )
            )
        else:
            for f in report.findings:
                print(f"pecd: {f}")
            verdict = "holds" if report.ok else f"does NOT hold: {len(report.findings)} findings"
            print(
                f"pecd: {report.events} events in {report.seals} seals checked; the log {verdict}"
            )
        return EXIT_OK if report.ok else EXIT_INVALID

    return asyncio.run(go())


def register(sub: Subcommands) -> None:
    """Add ``pecd log …`` to the ``pecd`` parser."""
    lg = sub.add_parser("log", help="the trace log: seals and their verification")
    lg_sub = lg.add_subparsers(dest="log_command", required=True)
    lv = with_config(lg_sub.add_parser("verify", help="check the seal chain and every event"))
    lv.add_argument("--from", dest="from_seal", type=int, help="first seal id to check")
    lv.add_argument("--to", dest="to_seal", type=int, help="last seal id to check")
    lv.add_argument("--json", action="store_true")
    with_config(lg_sub.add_parser("seal", help="seal the events not sealed yet, now"))
    with_config(
        lg_sub.add_parser("purge", help="remove sealed ranges older than log.retention_months")
    )
    lg.set_defaults(func=cmd_log)
    for name, what in (("search", "find events"), ("export", "write events for a holder")):
        ls = with_config(lg_sub.add_parser(name, help=what))
        ls.add_argument("--msgid", help="PEC msgid (identificativo)")
        ls.add_argument("--client-msgid", help="the client's Message-ID")
        ls.add_argument("--sender")
        ls.add_argument("--recipient")
        ls.add_argument("--subject", help="text in the subject")
        ls.add_argument("--event", help="event type, e.g. accettazione, avvenuta-consegna")
        ls.add_argument("--since", help="ISO 8601 time")
        ls.add_argument("--until", help="ISO 8601 time")
        if name == "search":
            ls.add_argument("--limit", type=int, default=100)
            ls.add_argument("--json", action="store_true")
        else:
            ls.add_argument("--format", choices=["jsonl", "csv"], default="jsonl")
            ls.add_argument("-o", "--output", help="file (default: standard output)")
