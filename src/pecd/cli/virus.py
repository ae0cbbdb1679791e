"""``pecd virus list|show|export``: the infected messages the antivirus stopped, kept byte-exact."""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import sys
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING

from pecd.cli.common import (
    EXIT_INVALID,
    EXIT_OK,
    Subcommands,
    fail,
    load,
    print_table,
    with_config,
)

if TYPE_CHECKING:
    from pecd.store.db import Database
    from pecd.store.models import InfectedMessage

#: The index ``pecd virus export --all`` writes beside the messages, one JSON object a line.
INDEX = "index.jsonl"


def _when(value: str | None) -> datetime | None:
    if not value:
        return None
    t = datetime.fromisoformat(value)
    return t if t.tzinfo else t.replace(tzinfo=UTC)


def _intact(m: InfectedMessage) -> bool:
    return len(m.data) == m.size and hashlib.sha256(m.data).hexdigest() == m.sha256


async def _list(db: Database, args: argparse.Namespace) -> int:
    from pecd.store import virus

    async with db.read_session() as s:
        found = await virus.list_kept(
            s, since=_when(args.since), until=_when(args.until), limit=args.limit
        )
    if args.json:
        print(json.dumps([virus.as_json(k) for k in found], indent=2, ensure_ascii=False))
        return EXIT_OK
    print_table(
        "Virus store",
        ["id", "time", "point", "signature", "pec msgid", "sender", "recipients", "size"],
        [
            (
                k.id,
                k.at.isoformat(),
                k.point,
                k.signature,
                k.pec_msgid,
                k.sender,
                ", ".join(k.recipients),
                k.size,
            )
            for k in found
        ],
        False,
    )
    return EXIT_OK


async def _show(db: Database, args: argparse.Namespace) -> int:
    from pecd.store import virus

    async with db.read_session() as s:
        m = await virus.get_kept(s, args.id)
    if m is None:
        return fail(f"no infected message {args.id} in the virus store", EXIT_INVALID)
    if args.raw:
        sys.stdout.flush()
        sys.stdout.buffer.write(m.data)
        sys.stdout.buffer.flush()
        return EXIT_OK
    meta = virus.as_json(m)
    intact = _intact(m)
    if args.json:
        print(json.dumps({**meta, "intact": intact}, indent=2, ensure_ascii=False))
    else:
        for name, value in meta.items():
            shown = ", ".join(value) if isinstance(value, list) else value
            print(f"{name + ':':<11} {'' if shown is None else shown}")
        print(f"{'intact:':<11} {'yes' if intact else 'NO: the bytes do not match size/sha256'}")
    return EXIT_OK if intact else EXIT_INVALID


async def _export(db: Database, args: argparse.Namespace) -> int:
    from pecd.store import virus

    out = Path(args.output)
    if args.all and args.id is not None:
        return fail("export one message (ID) or --all, not both", EXIT_INVALID)
    if args.all:
        out.mkdir(parents=True, exist_ok=True)
        damaged = 0
        async with db.read_session() as s:
            found = await virus.list_kept(
                s, since=_when(args.since), until=_when(args.until), limit=None
            )
            with (out / INDEX).open("w", encoding="utf-8", newline="\n") as index:
                for k in found:
                    m = await virus.get_kept(s, k.id)
                    if m is None:  # purged meanwhile
                        continue
                    name = f"{m.id}.eml"
                    (out / name).write_bytes(m.data)
                    intact = _intact(m)
                    damaged += not intact
                    row = {**virus.as_json(m), "file": name, "intact": intact}
                    index.write(json.dumps(row, ensure_ascii=False) + "\n")
                    s.expunge(m)  # one message's bytes in memory at a time
        print(f"pecd: exported {len(found)} infected messages to {out}", file=sys.stderr)
        if damaged:
            return fail(f"{damaged} of them do not match their size/sha256", EXIT_INVALID)
        return EXIT_OK
    if args.id is None:
        return fail("name the message to export (ID) or pass --all", EXIT_INVALID)
    async with db.read_session() as s:
        m = await virus.get_kept(s, args.id)
    if m is None:
        return fail(f"no infected message {args.id} in the virus store", EXIT_INVALID)
    out.write_bytes(m.data)
    print(f"pecd: wrote message {m.id} ({m.size} bytes, sha256 {m.sha256}) to {out}")
    if not _intact(m):
        return fail(f"message {m.id} does not match its size/sha256", EXIT_INVALID)
    return EXIT_OK


def cmd_virus(args: argparse.Namespace) -> int:
    from pecd.store.db import Database

    cfg = load(args)
    run = {"list": _list, "show": _show, "export": _export}[args.virus_command]

    async def go() -> int:
        db = await Database.open(cfg.database_url)
        try:
            return await run(db, args)
        finally:
            await db.close()

    return asyncio.run(go())


def register(sub: Subcommands) -> None:
    """Add ``pecd virus …`` to the ``pecd`` parser."""
    v = sub.add_parser("virus", help="the virus store: infected messages kept byte-exact")
    v_sub = v.add_subparsers(dest="virus_command", required=True)
    vl = with_config(v_sub.add_parser("list", help="the kept messages, oldest first"))
    vl.add_argument("--since", help="ISO 8601 time (included)")
    vl.add_argument("--until", help="ISO 8601 time (excluded)")
    vl.add_argument("--limit", type=int, default=1000)
    vl.add_argument("--json", action="store_true")
    vs = with_config(v_sub.add_parser("show", help="one message's metadata and SHA-256"))
    vs.add_argument("id", type=int)
    vs.add_argument("--raw", action="store_true", help="write its exact bytes to standard output")
    vs.add_argument("--json", action="store_true")
    ve = with_config(v_sub.add_parser("export", help="write messages byte-exact as .eml files"))
    ve.add_argument("id", type=int, nargs="?", help="the message (or --all)")
    ve.add_argument("--all", action="store_true", help=f"every message into -o DIR, and {INDEX}")
    ve.add_argument("--since", help="with --all: ISO 8601 time (included)")
    ve.add_argument("--until", help="with --all: ISO 8601 time (excluded)")
    ve.add_argument("-o", "--output", required=True, help="FILE (one message) or DIR (--all)")
    v.set_defaults(func=cmd_virus)
