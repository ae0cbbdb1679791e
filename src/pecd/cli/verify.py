"""``pecd verify``: what a message is, and whether its PEC signature holds.

:func:`examine` is the check itself, pure (bytes in, :class:`Verdict` out): the command and the
webmail's verify page (``pecd.web.pages.compose``) both run it; :func:`text_report` is what the
command prints.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from cryptography import x509

from pecd.cli.common import EXIT_INVALID, EXIT_OK, Subcommands, fail, jsonable
from pecd.clock import SystemClock
from pecd.index.model import ProviderEntry, ProviderIndex
from pecd.pec.classify import Classification, NotMailError, classify

__all__ = ["NotMailError", "Verdict", "examine", "load_cas", "register", "report", "text_report"]


@dataclass(frozen=True)
class Verdict:
    """What :func:`examine` found. ``provider``: the entry of the provider index whose
    certificate made the (valid) signature, when an index was given and lists it; ``indexed``:
    None when no index was given, else whether the signer is in it."""

    classification: Classification
    provider: ProviderEntry | None = None
    indexed: bool | None = None

    @property
    def valid(self) -> bool:
        """A valid PEC message and, when an index was given, signed by a provider in it."""
        return self.classification.is_valid_pec and self.indexed is not False


def examine(
    raw: bytes,
    *,
    at: datetime | None = None,
    trust_roots: Sequence[x509.Certificate] | None = None,
    index: ProviderIndex | None = None,
) -> Verdict:
    """Classify ``raw`` as ``pecd verify`` does (signature over the signed content, certificate
    time validity at ``at`` and the chain to ``trust_roots`` when given) and, with ``index``,
    look the signer's certificate up in the provider index, as the reception point does. Raises
    only NotMailError (no header at all): ``raw`` may be anything."""
    c = classify(raw, at=at, trust_roots=trust_roots)
    if index is None:
        return Verdict(c)
    provider = (
        index.provider_for_certificate(c.signer_der)
        if c.signature.valid and c.signer_der is not None
        else None
    )
    return Verdict(c, provider, provider is not None)


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
        c = examine(raw, at=at, trust_roots=roots).classification
    except NotMailError as exc:
        return fail(f"{args.file} is not a mail message: {exc}")
    code = EXIT_OK if c.is_valid_pec else EXIT_INVALID
    if args.json:
        print(json.dumps(report(c), indent=2, ensure_ascii=False))
        return code
    print("\n".join(text_report(args.file, c)))
    return code


def text_report(name: str, c: Classification) -> list[str]:
    """The lines ``pecd verify`` prints about ``c`` (the message read from ``name``)."""
    what = c.kind.value + (f" ({c.ricevuta.value})" if c.ricevuta else "")
    lines = [f"{name}: {what}"]
    s = c.signature
    if s.valid:
        lines.append(f"  signature: valid, {s.digest}, signed by {s.signer_subject}")
        lines.append(f"  signer sha1: {s.signer_sha1}  signing time: {s.signing_time}")
    else:
        lines.append(f"  signature: {'INVALID: ' + (s.error or '') if s.present else 'absent'}")
    if c.daticert:
        d = c.daticert
        lines.append(
            f"  daticert: tipo={d.tipo.value} errore={d.errore.value} gestore={d.gestore_emittente!r}"
        )
        lines.append(f"    identificativo={d.identificativo} data={d.giorno} {d.ora} {d.zona}")
        lines.append(
            f"    mittente={d.mittente} destinatari={', '.join(r.address for r in d.destinatari)}"
        )
    lines += [f"  error: {e}" for e in c.errors]
    lines.append("  => " + ("valid PEC message" if c.is_valid_pec else "NOT a valid PEC message"))
    return lines


def register(sub: Subcommands) -> None:
    """Add ``pecd verify`` to the ``pecd`` parser."""
    v = sub.add_parser("verify", help="say what a message is and whether its PEC signature holds")
    v.add_argument("file", help="an .eml file")
    v.add_argument("--ca", action="append", default=[], help="trusted CA (PEM/DER); repeatable")
    v.add_argument("--at", help="check certificate validity at this ISO 8601 time")
    v.add_argument("--json", action="store_true", help="print one JSON object")
    v.set_defaults(func=cmd_verify)
