"""``pecd mailbox webhook set|show|delete``: where a mailbox's transmission events are POSTed
(``pecd.web.webhooks``), as the REST API's ``/api/v1/webhook`` sets it."""

from __future__ import annotations

import argparse
import asyncio
import secrets
import sys
from typing import TYPE_CHECKING

from pecd.cli.common import (
    EXIT_OK,
    Subcommands,
    fail,
    load,
    print_table,
    with_accounts,
    with_config,
)
from pecd.clock import SystemClock

if TYPE_CHECKING:
    from pecd.store.accounts import Accounts
    from pecd.store.db import Database


def cmd_webhook(args: argparse.Namespace) -> int:
    from pecd.store import webhooks
    from pecd.web.webhooks import check_url

    cfg = load(args)
    address = args.address.lower()

    async def go(_acc: Accounts, db: Database) -> int:
        c = args.webhook_command
        if c == "set":
            check_url(args.url, allow_private=cfg.webhooks.allow_private)
            if args.secret_stdin:
                secret = sys.stdin.readline().strip()
                if not 16 <= len(secret) <= 128 or not secret.isascii() or " " in secret:
                    raise ValueError("a webhook secret is 16 to 128 ASCII characters, no spaces")
            else:
                secret = "whsec_" + secrets.token_urlsafe(32)
            await webhooks.set_webhook(db, address, args.url, secret, SystemClock().now())
            print(f"pecd: webhook of {address} set to {args.url}")
            if not args.secret_stdin:
                print("pecd: its signing secret (shown only now):")
                print(secret)
        elif c == "delete":
            if not await webhooks.delete_webhook(db, address):
                return fail(f"{address} has no webhook", 1)
            print(f"pecd: webhook of {address} removed")
        else:
            hook = await webhooks.get_webhook(db, address)
            if hook is None:
                return fail(f"{address} has no webhook", 1)
            print_table(
                f"Webhook of {address}",
                ["mailbox", "url", "created_at"],
                [(hook.mailbox, hook.url, hook.created_at)],
                args.json,
            )
        return EXIT_OK

    return asyncio.run(with_accounts(cfg, go))


def register(mailbox_commands: Subcommands) -> None:
    """Add ``webhook …`` to the ``pecd mailbox`` commands."""
    wh = mailbox_commands.add_parser("webhook", help="where a mailbox's PEC events are POSTed")
    wh_sub = wh.add_subparsers(dest="webhook_command", required=True)
    ws = with_config(wh_sub.add_parser("set", help="set the URL (the secret is shown once)"))
    ws.add_argument("address")
    ws.add_argument("url", help="https:// or http://")
    ws.add_argument(
        "--secret-stdin", action="store_true", help="read the signing secret from standard input"
    )
    wg = with_config(wh_sub.add_parser("show"))
    wg.add_argument("address")
    wg.add_argument("--json", action="store_true")
    with_config(wh_sub.add_parser("delete")).add_argument("address")
    wh.set_defaults(func=cmd_webhook)
