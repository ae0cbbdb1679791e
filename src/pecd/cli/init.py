"""``pecd init`` and ``pecd pki init``: a development installation, development certificates."""

from __future__ import annotations

import argparse
import asyncio
from pathlib import Path

from pecd.cli.common import DEFAULT_DIR, EXIT_OK, Subcommands, fail
from pecd.clock import SystemClock


def cmd_pki_init(args: argparse.Namespace) -> int:
    from pecd.devpki import write_dev_pki
    from pecd.pec.pki import create_dev_pki

    pki = create_dev_pki(
        domain=args.domain, name=args.name, now=SystemClock().now(), intermediate=True
    )
    try:
        paths = write_dev_pki(Path(args.dir), pki)
    except FileExistsError as exc:
        return fail(f"{exc}; choose another directory or remove the old files", 1)
    for label, path in paths.items():
        print(f"{label:>12}: {path}")
    return EXIT_OK


def cmd_init(args: argparse.Namespace) -> int:
    from pecd.devinit import init_installation

    directory = Path(args.dir)
    try:
        result = asyncio.run(
            init_installation(
                directory,
                domain=args.domain,
                name=args.name,
                clock=SystemClock(),
                mailbox_server=args.mailbox_server,
                mail_user=args.mail_user,
                antivirus=False if args.no_antivirus else None,
            )
        )
    except (FileExistsError, ValueError) as exc:
        return fail(str(exc), 1)
    print(f"pecd: wrote {result.config}")
    if args.mailbox_server == "dovecot":
        conf = directory.resolve() / "dovecot" / "dovecot.conf"
        print(f"pecd: wrote {conf}; run: dovecot -c {conf} (see docs/dovecot.md)")
    if result.clamd_config is not None:
        print(
            f"pecd: wrote {result.clamd_config} (antivirus on: pecd serve starts this clamd,"
            " on a signature database pecd generated: EICAR and Pecd.Test.Signature)"
        )
    elif not args.no_antivirus:
        print("pecd: clamd is not installed: antivirus off (apt-get install clamav-daemon)")
    print("Mailboxes (passwords are shown only now):")
    for addr, pw in result.mailboxes.items():
        print(f"  {addr:<40} {pw}")
    return EXIT_OK


def register_pki(sub: Subcommands) -> None:
    """Add ``pecd pki init`` to the ``pecd`` parser."""
    pki = sub.add_parser("pki", help="development certificates")
    pki_sub = pki.add_subparsers(dest="pki_command", required=True)
    init = pki_sub.add_parser(
        "init",
        help="write a development CA, intermediate (chain.pem), signing and TLS certificates",
    )
    init.add_argument("dir")
    init.add_argument("--domain", required=True, help="the provider's mail domain")
    init.add_argument("--name", required=True, help="the provider's name (gestore-emittente)")
    init.set_defaults(func=cmd_pki_init)


def register(sub: Subcommands) -> None:
    """Add ``pecd init`` to the ``pecd`` parser."""
    i = sub.add_parser("init", help="write a working development installation")
    i.add_argument("--dir", default=str(DEFAULT_DIR))
    i.add_argument("--domain", default="pec.localhost")
    i.add_argument("--name", default="pecd Development PEC")
    i.add_argument(
        "--mailbox-server",
        choices=("pecd", "dovecot"),
        default="pecd",
        help="who serves IMAPS/POP3S: pecd itself, or Dovecot (writes dovecot/dovecot.conf)",
    )
    i.add_argument("--mail-user", help="with dovecot: the user pecd and Dovecot's mail run as")
    i.add_argument(
        "--no-antivirus",
        action="store_true",
        help="no [antivirus] section even when clamd is installed (default: on when it is)",
    )
    i.set_defaults(func=cmd_init)
