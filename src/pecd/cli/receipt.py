"""``pecd receipt reproduce``: a lost receipt rebuilt from the trace log and signed anew.

The decisions are :mod:`pecd.engine.reproduce`'s, the reading :mod:`pecd.store.reproduce`'s."""

from __future__ import annotations

import argparse
import asyncio
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from pecd.cli.common import EXIT_INVALID, EXIT_OK, Subcommands, fail, load, with_config
from pecd.clock import SystemClock

if TYPE_CHECKING:
    from pecd.engine.reproduce import LoggedEvent


def cmd_receipt(args: argparse.Namespace) -> int:
    from pecd.engine.reproduce import NoReceipt, SeveralReceipts, Wanted, choose, plan, reproduce
    from pecd.pec.daticert import DaticertError
    from pecd.pec.timefmt import pec_time
    from pecd.runtime.identity import provider_identity
    from pecd.store.db import Database
    from pecd.store.reproduce import logged_events

    cfg = load(args)

    async def read() -> list[LoggedEvent]:
        db = await Database.open(cfg.database_url)
        try:
            return await logged_events(db, args.identificativo)
        finally:
            await db.close()

    wanted = Wanted(
        args.identificativo, tipo=args.type, recipient=args.recipient, event_id=args.event_id
    )
    try:
        event = choose(asyncio.run(read()), wanted)
    except NoReceipt as exc:
        return fail(str(exc), EXIT_INVALID)
    except SeveralReceipts as exc:
        return fail(f"{exc}; choose with --type, --recipient or --event-id", 1)
    try:
        how = plan(event, mail_receipt=cfg.provider.mail_receipt)
    except DaticertError as exc:
        return fail(str(exc), EXIT_INVALID)
    msg = reproduce(how, provider_identity(cfg), pec_time(SystemClock().now()))
    if args.output:
        Path(args.output).write_bytes(msg.raw)
        d = how.daticert
        print(f"pecd: wrote {args.output} ({d.tipo.value} of {d.giorno} {d.ora})")
    else:
        sys.stdout.buffer.write(msg.raw)
    return EXIT_OK


def register(sub: Subcommands) -> None:
    """Add ``pecd receipt reproduce`` to the ``pecd`` parser."""
    rc = sub.add_parser("receipt", help="receipts rebuilt from the trace log")
    rc_sub = rc.add_subparsers(dest="receipt_command", required=True)
    rr = with_config(rc_sub.add_parser("reproduce", help="rebuild a lost receipt from the log"))
    rr.add_argument("identificativo", help="the PEC msgid of the transmission")
    rr.add_argument("--recipient", help="the recipient the receipt speaks for (consegna)")
    rr.add_argument("--type", help="accettazione, avvenuta-consegna, errore-consegna, ...")
    rr.add_argument("--event-id", type=int, help="the trace event (see pecd log search)")
    rr.add_argument("-o", "--output", help="file (default: standard output)")
    rc.set_defaults(func=cmd_receipt)
