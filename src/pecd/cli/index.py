"""``pecd index show|lookup|export``: what the provider index holds, and this provider's entry."""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from pecd.cli.common import (
    EXIT_INVALID,
    EXIT_OK,
    Handler,
    Subcommands,
    fail,
    load,
    print_table,
    with_config,
)
from pecd.clock import SystemClock
from pecd.index.ldif import write_ldif
from pecd.index.model import ProviderEntry, domain_of, normalize_hash
from pecd.index.service import IndexLoadError, load_index_report, own_entry
from pecd.index.signed import sign_index

__all__ = ["cmd_index", "cmd_index_export", "cmd_index_lookup", "cmd_index_show", "register"]

_SHA1_RE = re.compile(r"^[0-9a-f]{40}$")
_COLUMNS = ["provider", "unit", "mail_receipt", "domains", "certificate_sha1"]


def _row(e: ProviderEntry, as_json: bool) -> list[object]:
    if as_json:
        return [e.name, e.unit, e.mail_receipt, list(e.domains), list(e.certificate_hashes)]
    return [
        e.name,
        e.unit or "",
        e.mail_receipt,
        " ".join(e.domains),
        " ".join(e.certificate_hashes),
    ]


def cmd_index_show(args: argparse.Namespace) -> int:
    loaded = load_index_report(load(args))
    if not args.json:
        print(f"source: {loaded.source or '(no index.path: this provider only)'}")
        if loaded.signer is not None:
            print(f"signed by: {loaded.signer.subject.rfc4514_string()}")
    for note in (*loaded.skipped, *loaded.warnings):
        print(f"pecd: index: {note}", file=sys.stderr)
    rows = [_row(e, args.json) for e in loaded.index]
    print_table("Provider index", _COLUMNS, rows, args.json)
    return EXIT_OK


def cmd_index_lookup(args: argparse.Namespace) -> int:
    index = load_index_report(load(args)).index
    what = args.what.strip()
    if _SHA1_RE.match(normalize_hash(what)):
        found = list(index.providers_for_hash(what))
    else:
        entry = index.provider_for_domain(domain_of(what) if "@" in what else what)
        found = [entry] if entry else []
    if not found:
        return fail(f"{what}: not in the provider index (not PEC)", EXIT_INVALID)
    print_table("Provider index", _COLUMNS, [_row(e, args.json) for e in found], args.json)
    return EXIT_OK


def cmd_index_export(args: argparse.Namespace) -> int:
    cfg = load(args)
    data = write_ldif([own_entry(cfg)]).encode("utf-8")
    if args.sign:
        try:
            key = serialization.load_pem_private_key(cfg.signing.key.read_bytes(), None)
            cert = x509.load_pem_x509_certificate(cfg.signing.cert.read_bytes())
            chain = [
                c
                for p in cfg.signing.chain
                for c in x509.load_pem_x509_certificates(p.read_bytes())
            ]
        except (OSError, ValueError, TypeError) as exc:
            raise IndexLoadError(f"cannot load the signing key or certificate: {exc}") from None
        if not isinstance(key, rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey):
            return fail(f"{cfg.signing.key}: an RSA or EC key is needed to sign", 1)
        data = sign_index(
            data,
            cert,
            key,
            digest=cfg.signing.digest,
            signing_time=SystemClock().now(),
            chain=chain,
        )
    if args.output:
        Path(args.output).write_bytes(data)
        print(f"pecd: wrote {args.output}", file=sys.stderr)
    else:
        sys.stdout.buffer.write(data)
        sys.stdout.buffer.flush()
    return EXIT_OK


def cmd_index(args: argparse.Namespace) -> int:
    commands: dict[str, Handler] = {
        "show": cmd_index_show,
        "lookup": cmd_index_lookup,
        "export": cmd_index_export,
    }
    return commands[args.index_command](args)


def register(sub: Subcommands) -> None:
    """Add ``pecd index …`` to the ``pecd`` parser."""
    ix = sub.add_parser("index", help="the provider index (indice dei gestori PEC)")
    ix_sub = ix.add_subparsers(dest="index_command", required=True)
    show = with_config(ix_sub.add_parser("show", help="every provider known, this one included"))
    show.add_argument("--json", action="store_true", help="print JSON")
    lookup = with_config(
        ix_sub.add_parser("lookup", help="the provider of a domain, address or certificate SHA-1")
    )
    lookup.add_argument("what", help="a domain (or address), or a certificate SHA-1 in hex")
    lookup.add_argument("--json", action="store_true", help="print JSON")
    export = with_config(
        ix_sub.add_parser("export", help="this provider's own entry as LDIF, for its peers")
    )
    export.add_argument("-o", "--output", help="file to write (default: standard output)")
    export.add_argument(
        "--sign", action="store_true", help="sign it into a .p7m (DER) with the provider key"
    )
    ix.set_defaults(func=cmd_index)
