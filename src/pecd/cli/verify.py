"""``pecd verify``: what a message is, and whether its PEC signature holds."""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence
from dataclasses import asdict
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from cryptography import x509

from pecd.cli.common import EXIT_INVALID, EXIT_OK, Subcommands, fail, jsonable
from pecd.clock import SystemClock
from pecd.pec.classify import Classification, NotMailError, classify


def report(c: Classification) -> dict[str, Any]:
    """``c`` as the JSON object ``pecd verify --json`` prints."""
    return {
        "kind": c.kind.value,
        "trasporto": c.trasporto.value if c.trasporto else None,
        "ricevuta": c.ricevuta.value if c.ricevuta else None,
        "virus": c.virus,
        "valid": c.is_valid_pec,
        "signature": jsonable(asdict(c.signature)),
        "daticert": jsonable(asdict(c.daticert)) if c.daticert else None,
        "postacert_bytes": len(c.postacert) if c.postacert is not None else None,
        "errors": list(c.errors),
    }


def load_cas(paths: Sequence[str]) -> list[x509.Certificate]:
    """The certificates in ``paths`` (PEM, several per file, or DER)."""
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
        return fail(f"cannot read {args.file}: {exc.strerror}")
    try:
        roots = load_cas(args.ca) if args.ca else None
    except (OSError, ValueError) as exc:
        return fail(f"cannot load CA certificate: {exc}")
    at = None
    if args.at:
        try:
            at = datetime.fromisoformat(args.at)
        except ValueError:
            return fail(
                f"--at {args.at!r} is not an ISO 8601 time (e.g. 2024-05-01T12:00:00+02:00)"
            )
        if at.tzinfo is None:
            at = at.replace(tzinfo=UTC)
    elif roots is not None:
        at = SystemClock().now()
    try:
        c = classify(raw, at=at, trust_roots=roots)
    except NotMailError as exc:
        return fail(f"{args.file} is not a mail message: {exc}")
    code = EXIT_OK if c.is_valid_pec else EXIT_INVALID
    if args.json:
        print(json.dumps(report(c), indent=2, ensure_ascii=False))
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


def register(sub: Subcommands) -> None:
    """Add ``pecd verify`` to the ``pecd`` parser."""
    v = sub.add_parser("verify", help="say what a message is and whether its PEC signature holds")
    v.add_argument("file", help="an .eml file")
    v.add_argument("--ca", action="append", default=[], help="trusted CA (PEM/DER); repeatable")
    v.add_argument("--at", help="check certificate validity at this ISO 8601 time")
    v.add_argument("--json", action="store_true", help="print one JSON object")
    v.set_defaults(func=cmd_verify)
