"""``pecd dovecot-config``: Dovecot's config for this installation."""

from __future__ import annotations

import argparse
from pathlib import Path

from pecd.cli.common import EXIT_OK, Subcommands, fail, load, with_config


def cmd_dovecot_config(args: argparse.Namespace) -> int:
    from pecd.dovecot import lookup_mail_user, mail_user_for, write_config

    cfg = load(args)
    try:
        user = (
            lookup_mail_user(args.mail_user) if args.mail_user is not None else mail_user_for(cfg)
        )
        files = write_config(cfg, Path(args.dir) if args.dir else None, mail_user=user)
    except ValueError as exc:
        return fail(str(exc), 1)
    print(f"pecd: wrote {files.conf} and {files.sql}; run: dovecot -c {files.conf}")
    if cfg.mailbox.server != "dovecot":
        print('pecd: set [mailbox] server = "dovecot" so that pecd serve opens no IMAP/POP3')
    return EXIT_OK


def register(sub: Subcommands) -> None:
    """Add ``pecd dovecot-config`` to the ``pecd`` parser."""
    dv = with_config(
        sub.add_parser("dovecot-config", help="(re)write Dovecot's config for this installation")
    )
    dv.add_argument("--dir", help="where (default: dovecot/ beside the config file)")
    dv.add_argument("--mail-user", help="the user pecd and Dovecot's mail run as")
    dv.set_defaults(func=cmd_dovecot_config)
