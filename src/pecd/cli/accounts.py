"""``pecd domain`` and ``pecd mailbox``: the domains this provider serves, holders' mailboxes,
their API tokens, second factor and app passwords."""

from __future__ import annotations

import argparse
import asyncio
import sys
from typing import TYPE_CHECKING

from pecd.cli import webhook
from pecd.cli.common import EXIT_OK, Subcommands, load, print_table, with_accounts, with_config

if TYPE_CHECKING:
    from pecd.store.accounts import Accounts
    from pecd.store.db import Database


def cmd_domain(args: argparse.Namespace) -> int:
    cfg = load(args)

    async def go(acc: Accounts, db: Database) -> int:
        if args.domain_command == "add":
            await acc.add_domain(args.name)
            print(f"pecd: domain {args.name.lower()} added")
            if args.name.lower() not in cfg.provider.local_domains:
                print(
                    f"pecd: note: add it to provider.local_domains in {cfg.source} to receive mail for it"
                )
            return EXIT_OK
        rows = [(d.name, d.created_at) for d in await acc.list_domains()]
        print_table("Domains", ["domain", "created_at"], rows, args.json)
        return EXIT_OK

    return asyncio.run(with_accounts(cfg, go))


def read_password(args: argparse.Namespace) -> str:
    """One line of standard input with ``--password-stdin``, else asked twice on the terminal."""
    if getattr(args, "password_stdin", False):
        return sys.stdin.readline().rstrip("\r\n")
    import getpass

    first = getpass.getpass("Password: ")
    if first != getpass.getpass("Again: "):
        raise ValueError("the two passwords differ")
    return first


def cmd_mailbox(args: argparse.Namespace) -> int:
    from pecd.store.accounts import parse_size

    cfg = load(args)

    async def go(acc: Accounts, db: Database) -> int:
        c = args.mailbox_command
        if c == "add":
            quota = parse_size(args.quota) if args.quota else None
            await acc.add_mailbox(args.address, read_password(args), quota)
            print(f"pecd: mailbox {args.address.lower()} added")
        elif c == "passwd":
            await acc.set_password(args.address, read_password(args))
            print(f"pecd: password of {args.address.lower()} changed")
        elif c == "disable":
            await acc.disable(args.address)
            print(f"pecd: mailbox {args.address.lower()} disabled")
        elif c == "enable":
            await acc.enable(args.address)
            print(f"pecd: mailbox {args.address.lower()} enabled")
        else:
            rows = [
                (m.address, m.quota_bytes, "yes" if m.disabled else "no", m.created_at)
                for m in await acc.list_mailboxes(args.domain)
            ]
            print_table(
                "Mailboxes", ["address", "quota_bytes", "disabled", "created_at"], rows, args.json
            )
        return EXIT_OK

    return asyncio.run(with_accounts(cfg, go))


def cmd_token(args: argparse.Namespace) -> int:
    """``pecd mailbox token create|list|revoke``: REST API tokens (the token is shown once)."""
    from pecd.store.tokens import Tokens

    cfg = load(args)

    async def go(_acc: Accounts, db: Database) -> int:
        tokens = Tokens(db)
        c = args.token_command
        if c == "create":
            token_id, token = await tokens.create(args.address, args.name)
            print(f"pecd: API token {token_id} for {args.address.lower()} (shown only now):")
            print(token)
        elif c == "revoke":
            info = await tokens.revoke(args.id)
            print(f"pecd: API token {info.id} of {info.mailbox} revoked")
        else:
            rows = [
                (t.id, t.name, t.created_at, t.last_used_at, t.revoked_at)
                for t in await tokens.list(args.address)
            ]
            print_table(
                f"API tokens of {args.address.lower()}",
                ["id", "name", "created_at", "last_used_at", "revoked_at"],
                rows,
                args.json,
            )
        return EXIT_OK

    return asyncio.run(with_accounts(cfg, go))


def cmd_2fa(args: argparse.Namespace) -> int:
    """``pecd mailbox 2fa require|optional|status|disable``: the mailbox's second factor."""
    cfg = load(args)

    async def go(acc: Accounts, _db: Database) -> int:
        security = acc.security
        address = args.address.lower()
        c = args.twofa_command
        if c == "require":
            await security.set_totp_required(args.address, True)
            print(
                f"pecd: {address} must use a second factor: the webmail asks for it, mail "
                "clients need app passwords (`pecd mailbox app-password create`)"
            )
        elif c == "optional":
            await security.set_totp_required(args.address, False)
            print(f"pecd: a second factor is optional for {address}")
        elif c == "disable":
            await security.totp_disable(args.address)
            print(f"pecd: TOTP of {address} removed (the holder can enrol again)")
        else:
            st = await security.totp_status(args.address)
            rows = [(address, _yes(st.enabled), _yes(st.pending), _yes(st.required))]
            print_table(
                "Second factor", ["address", "totp", "pending", "required"], rows, args.json
            )
        return EXIT_OK

    return asyncio.run(with_accounts(cfg, go))


def _yes(flag: bool) -> str:
    return "yes" if flag else "no"


def cmd_app_password(args: argparse.Namespace) -> int:
    """``pecd mailbox app-password create|list|revoke``: passwords for mail clients (shown
    once), the way a mailbox with a second factor reaches IMAP, POP3 and SMTP."""
    cfg = load(args)

    async def go(acc: Accounts, _db: Database) -> int:
        security = acc.security
        address = args.address.lower()
        c = args.app_password_command
        if c == "create":
            password_id, password = await security.app_password_create(args.address, args.name)
            print(f"pecd: app password {password_id} for {address} (shown only now):")
            print(password)
        elif c == "revoke":
            await security.app_password_revoke(args.address, args.id)
            print(f"pecd: app password {args.id} of {address} revoked")
        else:
            rows = [
                (p.id, p.name, p.created_at, p.last_used_at, p.revoked_at)
                for p in await security.app_password_list(args.address)
            ]
            print_table(
                f"App passwords of {address}",
                ["id", "name", "created_at", "last_used_at", "revoked_at"],
                rows,
                args.json,
            )
        return EXIT_OK

    return asyncio.run(with_accounts(cfg, go))


def register(sub: Subcommands) -> None:
    """Add ``pecd domain …`` and ``pecd mailbox …`` to the ``pecd`` parser."""
    dom = sub.add_parser("domain", help="PEC domains this provider serves")
    dom_sub = dom.add_subparsers(dest="domain_command", required=True)
    da = with_config(dom_sub.add_parser("add"))
    da.add_argument("name")
    dl = with_config(dom_sub.add_parser("list"))
    dl.add_argument("--json", action="store_true")
    dom.set_defaults(func=cmd_domain)

    mb = sub.add_parser("mailbox", help="holders' mailboxes")
    mb_sub = mb.add_subparsers(dest="mailbox_command", required=True)
    ma = with_config(mb_sub.add_parser("add"))
    ma.add_argument("address")
    ma.add_argument("--quota", help="e.g. 1G, 500M")
    ma.add_argument("--password-stdin", action="store_true")
    mp = with_config(mb_sub.add_parser("passwd"))
    mp.add_argument("address")
    mp.add_argument("--password-stdin", action="store_true")
    for name in ("disable", "enable"):
        with_config(mb_sub.add_parser(name)).add_argument("address")
    ml = with_config(mb_sub.add_parser("list"))
    ml.add_argument("--domain")
    ml.add_argument("--json", action="store_true")
    mb.set_defaults(func=cmd_mailbox)

    tk = mb_sub.add_parser("token", help="REST API tokens of a mailbox")
    tk_sub = tk.add_subparsers(dest="token_command", required=True)
    tc = with_config(tk_sub.add_parser("create", help="make a token (shown once)"))
    tc.add_argument("address")
    tc.add_argument("--name", required=True, help="what the token is for")
    tl = with_config(tk_sub.add_parser("list"))
    tl.add_argument("address")
    tl.add_argument("--json", action="store_true")
    tr = with_config(tk_sub.add_parser("revoke"))
    tr.add_argument("id", type=int)
    tk.set_defaults(func=cmd_token)

    webhook.register(mb_sub)

    tf = mb_sub.add_parser("2fa", help="the second factor (TOTP) of a mailbox")
    tf_sub = tf.add_subparsers(dest="twofa_command", required=True)
    for name, text in (
        ("require", "make a second factor mandatory (mail clients then need app passwords)"),
        ("optional", "make the second factor optional again"),
        ("disable", "remove the mailbox's TOTP (a lost phone); the holder enrols again"),
        ("status", "whether TOTP is enabled, pending or required"),
    ):
        tp = with_config(tf_sub.add_parser(name, help=text))
        tp.add_argument("address")
        if name == "status":
            tp.add_argument("--json", action="store_true")
    tf.set_defaults(func=cmd_2fa)

    ap = mb_sub.add_parser("app-password", help="passwords for mail clients (IMAP, POP3, SMTP)")
    ap_sub = ap.add_subparsers(dest="app_password_command", required=True)
    apc = with_config(ap_sub.add_parser("create", help="make an app password (shown once)"))
    apc.add_argument("address")
    apc.add_argument("name", help="the client it is for, e.g. 'Thunderbird, laptop'")
    apl = with_config(ap_sub.add_parser("list"))
    apl.add_argument("address")
    apl.add_argument("--json", action="store_true")
    apr = with_config(ap_sub.add_parser("revoke"))
    apr.add_argument("address")
    apr.add_argument("id", type=int)
    ap.set_defaults(func=cmd_app_password)
