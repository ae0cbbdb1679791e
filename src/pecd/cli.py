"""The ``pecd`` command line."""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import signal
import sys
from collections.abc import Sequence
from dataclasses import asdict
from datetime import UTC, datetime
from enum import Enum
from pathlib import Path
from typing import Any

from cryptography import x509

from pecd import __version__
from pecd.clock import SystemClock
from pecd.config import Config, ConfigError, load_config
from pecd.index import cli as index_cli
from pecd.pec.classify import Classification, NotMailError, classify

EXIT_OK, EXIT_INVALID, EXIT_UNREADABLE = 0, 1, 2


def _fail(message: str, code: int = EXIT_UNREADABLE) -> int:
    print(f"pecd: {message}", file=sys.stderr)
    return code


def _jsonable(value: Any) -> Any:
    if isinstance(value, Enum):
        return value.value
    if isinstance(value, datetime):
        return value.isoformat()
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_jsonable(v) for v in value]
    return value


def _report(c: Classification) -> dict[str, Any]:
    return {
        "kind": c.kind.value,
        "trasporto": c.trasporto.value if c.trasporto else None,
        "ricevuta": c.ricevuta.value if c.ricevuta else None,
        "virus": c.virus,
        "valid": c.is_valid_pec,
        "signature": _jsonable(asdict(c.signature)),
        "daticert": _jsonable(asdict(c.daticert)) if c.daticert else None,
        "postacert_bytes": len(c.postacert) if c.postacert is not None else None,
        "errors": list(c.errors),
    }


def _load_cas(paths: Sequence[str]) -> list[x509.Certificate]:
    certs: list[x509.Certificate] = []
    for p in paths:
        data = Path(p).read_bytes()
        try:
            certs += x509.load_pem_x509_certificates(data)
        except ValueError:
            certs.append(x509.load_der_x509_certificate(data))
    return certs


def cmd_verify(args: argparse.Namespace) -> int:
    try:
        raw = Path(args.file).read_bytes()
    except OSError as exc:
        return _fail(f"cannot read {args.file}: {exc.strerror}")
    try:
        roots = _load_cas(args.ca) if args.ca else None
    except (OSError, ValueError) as exc:
        return _fail(f"cannot load CA certificate: {exc}")
    at = None
    if args.at:
        try:
            at = datetime.fromisoformat(args.at)
        except ValueError:
            return _fail(
                f"--at {args.at!r} is not an ISO 8601 time (e.g. 2024-05-01T12:00:00+02:00)"
            )
        if at.tzinfo is None:
            at = at.replace(tzinfo=UTC)
    elif roots is not None:
        at = SystemClock().now()
    try:
        c = classify(raw, at=at, trust_roots=roots)
    except NotMailError as exc:
        return _fail(f"{args.file} is not a mail message: {exc}")
    code = EXIT_OK if c.is_valid_pec else EXIT_INVALID
    if args.json:
        print(json.dumps(_report(c), indent=2, ensure_ascii=False))
        return code
    what = c.kind.value + (f" ({c.ricevuta.value})" if c.ricevuta else "")
    print(f"{args.file}: {what}")
    s = c.signature
    if s.valid:
        print(f"  signature: valid, {s.digest}, signed by {s.signer_subject}")
        print(f"  signer sha1: {s.signer_sha1}  signing time: {s.signing_time}")
    else:
        print(f"  signature: {'INVALID: ' + (s.error or '') if s.present else 'absent'}")
    if c.daticert:
        d = c.daticert
        print(
            f"  daticert: tipo={d.tipo.value} errore={d.errore.value} gestore={d.gestore_emittente!r}"
        )
        print(f"    identificativo={d.identificativo} data={d.giorno} {d.ora} {d.zona}")
        print(
            f"    mittente={d.mittente} destinatari={', '.join(r.address for r in d.destinatari)}"
        )
    for e in c.errors:
        print(f"  error: {e}")
    print("  => " + ("valid PEC message" if c.is_valid_pec else "NOT a valid PEC message"))
    return code


def cmd_pki_init(args: argparse.Namespace) -> int:
    from pecd.devpki import write_dev_pki
    from pecd.pec.pki import create_dev_pki

    pki = create_dev_pki(domain=args.domain, name=args.name, now=SystemClock().now())
    try:
        paths = write_dev_pki(Path(args.dir), pki)
    except FileExistsError as exc:
        return _fail(f"{exc}; choose another directory or remove the old files", 1)
    for label, path in paths.items():
        print(f"{label:>12}: {path}")
    return EXIT_OK


DEFAULT_DIR = Path("pecd-data")


def _config_path(args: argparse.Namespace) -> Path:
    return Path(args.config) if args.config else DEFAULT_DIR / "pecd.toml"


def _load(args: argparse.Namespace) -> Config:
    path = _config_path(args)
    if not path.exists():
        raise ConfigError(f"{path}: no config file here; run `pecd init` or pass -c FILE")
    return load_config(path)


def _print_table(
    title: str, columns: Sequence[str], rows: Sequence[Sequence[object]], as_json: bool
) -> None:
    if as_json:
        print(
            json.dumps(
                [dict(zip(columns, map(_jsonable, r), strict=True)) for r in rows],
                indent=2,
                default=str,
            )
        )
        return
    from rich.console import Console
    from rich.table import Table

    table = Table(title=title)
    for c in columns:
        table.add_column(c)
    for r in rows:
        table.add_row(*("" if v is None else str(v) for v in r))
    Console().print(table)


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
            )
        )
    except (FileExistsError, ValueError) as exc:
        return _fail(str(exc), 1)
    print(f"pecd: wrote {result.config}")
    if args.mailbox_server == "dovecot":
        conf = directory.resolve() / "dovecot" / "dovecot.conf"
        print(f"pecd: wrote {conf}; run: dovecot -c {conf} (see docs/dovecot.md)")
    print("Mailboxes (passwords are shown only now):")
    for addr, pw in result.mailboxes.items():
        print(f"  {addr:<40} {pw}")
    return EXIT_OK


def cmd_dovecot_config(args: argparse.Namespace) -> int:
    from pecd.dovecot import lookup_mail_user, mail_user_for, write_config

    cfg = _load(args)
    try:
        user = (
            lookup_mail_user(args.mail_user) if args.mail_user is not None else mail_user_for(cfg)
        )
        files = write_config(cfg, Path(args.dir) if args.dir else None, mail_user=user)
    except ValueError as exc:
        return _fail(str(exc), 1)
    print(f"pecd: wrote {files.conf} and {files.sql}; run: dovecot -c {files.conf}")
    if cfg.mailbox.server != "dovecot":
        print('pecd: set [mailbox] server = "dovecot" so that pecd serve opens no IMAP/POP3')
    return EXIT_OK


def cmd_serve(args: argparse.Namespace) -> int:
    from pecd.app import App
    from pecd.devinit import CONFIG_NAME, init_installation

    if not args.config and not (DEFAULT_DIR / CONFIG_NAME).exists():
        print(f"pecd: no configuration found; initialising {DEFAULT_DIR}/ for development")
        result = asyncio.run(
            init_installation(
                DEFAULT_DIR,
                domain="pec.localhost",
                name="pecd Development PEC",
                clock=SystemClock(),
            )
        )
        print("Mailboxes (passwords are shown only now):")
        for addr, pw in result.mailboxes.items():
            print(f"  {addr:<40} {pw}")
    cfg = _load(args)
    if os.environ.get("PECD_DEBUG"):
        logging.getLogger("pecd").setLevel(logging.DEBUG)
    else:
        # aiosmtpd echoes every SMTP command and address at INFO: five lines per message that
        # say less than the trace log does, cost the event loop a write each, and spread
        # addresses over an ordinary log file. Its warnings and errors still show.
        logging.getLogger("mail.log").setLevel(logging.WARNING)
    logging.basicConfig(
        level=logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )

    async def run() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        async with App(cfg) as app:
            index = app.index
            if index is not None:
                loop.add_signal_handler(signal.SIGHUP, lambda: loop.create_task(index.reload()))
            print(
                f"pecd {__version__} serving {cfg.provider.name} ({', '.join(cfg.provider.local_domains)})"
            )
            print("Mail client settings:")
            for line in app.client_settings():
                print(line)
            sys.stdout.flush()
            await stop.wait()
            print("pecd: stopping (draining work in progress)")
        print("pecd: stopped")

    asyncio.run(run())
    return EXIT_OK


async def _with_accounts(cfg: Config, fn: Any) -> Any:
    from pecd.store.accounts import Accounts
    from pecd.store.db import Database

    db = await Database.open(cfg.database_url)
    try:
        return await fn(Accounts(db), db)
    finally:
        await db.close()


def cmd_domain(args: argparse.Namespace) -> int:
    cfg = _load(args)

    async def go(acc: Any, db: Any) -> int:
        if args.domain_command == "add":
            await acc.add_domain(args.name)
            print(f"pecd: domain {args.name.lower()} added")
            if args.name.lower() not in cfg.provider.local_domains:
                print(
                    f"pecd: note: add it to provider.local_domains in {cfg.source} to receive mail for it"
                )
            return EXIT_OK
        rows = [(d.name, d.created_at) for d in await acc.list_domains()]
        _print_table("Domains", ["domain", "created_at"], rows, args.json)
        return EXIT_OK

    rc: int = asyncio.run(_with_accounts(cfg, go))
    return rc


def _read_password(args: argparse.Namespace) -> str:
    if getattr(args, "password_stdin", False):
        return sys.stdin.readline().rstrip("\r\n")
    import getpass

    first = getpass.getpass("Password: ")
    if first != getpass.getpass("Again: "):
        raise ValueError("the two passwords differ")
    return first


def cmd_mailbox(args: argparse.Namespace) -> int:
    from pecd.store.accounts import parse_size

    cfg = _load(args)

    async def go(acc: Any, db: Any) -> int:
        c = args.mailbox_command
        if c == "add":
            quota = parse_size(args.quota) if args.quota else None
            await acc.add_mailbox(args.address, _read_password(args), quota)
            print(f"pecd: mailbox {args.address.lower()} added")
        elif c == "passwd":
            await acc.set_password(args.address, _read_password(args))
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
            _print_table(
                "Mailboxes", ["address", "quota_bytes", "disabled", "created_at"], rows, args.json
            )
        return EXIT_OK

    rc: int = asyncio.run(_with_accounts(cfg, go))
    return rc


def cmd_queue(args: argparse.Namespace) -> int:
    from pecd.store import jobs

    cfg = _load(args)

    async def go(acc: Any, db: Any) -> int:
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
        _print_table(
            "Queue",
            ["id", "kind", "state", "attempts", "next_run_at", "recipients", "last_error"],
            rows,
            args.json,
        )
        return EXIT_OK

    rc: int = asyncio.run(_with_accounts(cfg, go))
    return rc


def _query(args: argparse.Namespace) -> Any:
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


async def _log_select(db: Any, args: argparse.Namespace) -> int:
    import csv

    from rich.progress import Progress

    from pecd.store import trace

    query = _query(args)
    async with db.read_session() as s:
        if args.log_command == "search":
            found = await trace.search(s, query, limit=args.limit)
            rows = [trace.as_json(e) for e in found]
            if args.json:
                print(json.dumps(rows, indent=2, ensure_ascii=False))
            else:
                _print_table(
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


def cmd_receipt(args: argparse.Namespace) -> int:
    from pecd.pec import builders
    from pecd.pec.daticert import DaticertError, from_json
    from pecd.pec.timefmt import pec_time
    from pecd.runtime.formats import provider_identity
    from pecd.store.db import Database
    from pecd.store.trace import Query, search

    cfg = _load(args)

    async def events() -> list[Any]:
        db = await Database.open(cfg.database_url)
        try:
            async with db.read_session() as s:
                found = await search(s, Query(pec_msgid=args.identificativo), limit=10_000)
        finally:
            await db.close()
        out = []
        for e in found:
            d = e.daticert
            if not d or d.get("tipo") == "posta-certificata" or e.event != d.get("tipo"):
                continue  # not a receipt this provider issued
            if args.type and d.get("tipo") != args.type:
                continue
            if args.recipient and (d.get("consegna") or "") != args.recipient.strip().lower():
                continue
            if args.event_id is not None and e.id != args.event_id:
                continue
            out.append(e)
        return out

    found = asyncio.run(events())
    if not found:
        return _fail(f"{args.identificativo}: no matching receipt in the trace log", EXIT_INVALID)
    if len(found) > 1:
        kinds = ", ".join(
            f"event {e.id}: {e.event}"
            + (f" for {e.daticert.get('consegna')}" if e.daticert.get("consegna") else "")
            for e in found
        )
        return _fail(
            f"several receipts match ({kinds}); choose with --type, --recipient or --event-id", 1
        )
    event = found[0]
    try:
        d = from_json(event.daticert)
    except DaticertError as exc:
        return _fail(str(exc), EXIT_INVALID)
    provider = provider_identity(cfg)
    to = (event.data or {}).get("to") or (
        d.mittente if d.tipo.value != "presa-in-carico" else cfg.provider.mail_receipt
    )
    virus = d.errore.value == "virus"
    msg = builders.reproduced_receipt(
        d, provider, pec_time(SystemClock().now()), to=to, virus=virus
    )
    if args.output:
        Path(args.output).write_bytes(msg.raw)
        print(f"pecd: wrote {args.output} ({d.tipo.value} of {d.giorno} {d.ora})")
    else:
        sys.stdout.buffer.write(msg.raw)
    return EXIT_OK


def cmd_log(args: argparse.Namespace) -> int:
    from datetime import timedelta

    from rich.progress import Progress

    from pecd.runtime.formats import load_signer
    from pecd.store import seals
    from pecd.store.db import Database

    cfg = _load(args)

    async def go() -> int:
        db = await Database.open(cfg.database_url)
        try:
            if args.log_command in ("search", "export"):
                return await _log_select(db, args)
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

    rc: int = asyncio.run(go())
    return rc


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="pecd", description="PEC (posta elettronica certificata) provider"
    )
    p.add_argument("--version", action="version", version=f"pecd {__version__}")
    sub = p.add_subparsers(dest="command", required=True)

    v = sub.add_parser("verify", help="say what a message is and whether its PEC signature holds")
    v.add_argument("file", help="an .eml file")
    v.add_argument("--ca", action="append", default=[], help="trusted CA (PEM/DER); repeatable")
    v.add_argument("--at", help="check certificate validity at this ISO 8601 time")
    v.add_argument("--json", action="store_true", help="print one JSON object")
    v.set_defaults(func=cmd_verify)

    pki = sub.add_parser("pki", help="development certificates")
    pki_sub = pki.add_subparsers(dest="pki_command", required=True)
    init = pki_sub.add_parser("init", help="write a development CA, signing and TLS certificates")
    init.add_argument("dir")
    init.add_argument("--domain", required=True, help="the provider's mail domain")
    init.add_argument("--name", required=True, help="the provider's name (gestore-emittente)")
    init.set_defaults(func=cmd_pki_init)

    def with_config(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
        parser.add_argument("-c", "--config", help=f"config file (default {DEFAULT_DIR}/pecd.toml)")
        return parser

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
    i.set_defaults(func=cmd_init)

    dv = with_config(
        sub.add_parser("dovecot-config", help="(re)write Dovecot's config for this installation")
    )
    dv.add_argument("--dir", help="where (default: dovecot/ beside the config file)")
    dv.add_argument("--mail-user", help="the user pecd and Dovecot's mail run as")
    dv.set_defaults(func=cmd_dovecot_config)

    sv = with_config(
        sub.add_parser("serve", help="run the provider (initialises ./pecd-data if needed)")
    )
    sv.set_defaults(func=cmd_serve)

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

    index_cli.register(sub, with_config)

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

    rc = sub.add_parser("receipt", help="receipts rebuilt from the trace log")
    rc_sub = rc.add_subparsers(dest="receipt_command", required=True)
    rr = with_config(rc_sub.add_parser("reproduce", help="rebuild a lost receipt from the log"))
    rr.add_argument("identificativo", help="the PEC msgid of the transmission")
    rr.add_argument("--recipient", help="the recipient the receipt speaks for (consegna)")
    rr.add_argument("--type", help="accettazione, avvenuta-consegna, errore-consegna, ...")
    rr.add_argument("--event-id", type=int, help="the trace event (see pecd log search)")
    rr.add_argument("-o", "--output", help="file (default: standard output)")
    rc.set_defaults(func=cmd_receipt)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        rc: int = args.func(args)
    except ConfigError as exc:
        return _fail(str(exc), 1)
    except ValueError as exc:  # AccountError and bad arguments: one line, no traceback
        return _fail(str(exc), 1)
    except KeyboardInterrupt:
        return 130
    return rc


if __name__ == "__main__":
    sys.exit(main())
