"""LDIF (RFC 2849) reading and writing for the provider index, sans I/O.

Reads what the central index publishes: entries separated by blank lines, ``attr: value``,
``attr:: base64``, continuation lines starting with one space, ``#`` comments, attribute names in
any letter case and with options (``providerCertificate;binary``). Entries that are not a usable
``provider`` are skipped, each with its reason.
"""

from __future__ import annotations

import base64
import binascii
from collections.abc import Iterable

from pecd.index.model import ProviderEntry, certificate_sha1

_WRAP = 76


class LdifError(ValueError):
    """The text is not LDIF at all."""


def _records(text: str) -> list[list[tuple[str, bytes]]]:
    records: list[list[tuple[str, bytes]]] = []
    current: list[str] = []
    lines: list[str] = []
    for raw in text.splitlines():
        if raw.startswith(" ") and lines:
            lines[-1] += raw[1:]
            continue
        lines.append(raw)
    for line in [*lines, ""]:
        if line.startswith("#"):
            continue
        if not line.strip():
            if current:
                records.append([_attribute(x) for x in current])
                current = []
            continue
        current.append(line)
    return records


def _attribute(line: str) -> tuple[str, bytes]:
    name, sep, rest = line.partition(":")
    if not sep or not name.strip():
        raise LdifError(f"not an LDIF line: {line[:60]!r}")
    name = name.strip().lower()
    if rest.startswith(":"):
        try:
            return name, base64.b64decode(rest[1:].strip(), validate=True)
        except binascii.Error:
            raise LdifError(f"bad base64 in {name}") from None
    if rest.startswith("<"):
        raise LdifError(f"{name}: URL values are not supported")
    return name, rest.strip().encode("utf-8")


def parse_ldif(text: str) -> tuple[list[ProviderEntry], list[str]]:
    """The provider entries of an LDIF text, and why each other entry was skipped."""
    entries: list[ProviderEntry] = []
    skipped: list[str] = []
    records = _records(text)
    if text.strip() and not records:
        raise LdifError("no LDIF records")
    for record in records:
        attrs: dict[str, list[bytes]] = {}
        for name, value in record:
            base = name.split(";", 1)[0]
            attrs.setdefault(base, []).append(value)
        dn = (attrs.get("dn") or [b""])[0].decode("utf-8", "replace")
        if "version" in attrs and len(attrs) == 1:
            continue
        classes = {v.decode("utf-8", "replace").lower() for v in attrs.get("objectclass", [])}
        if "provider" not in classes:
            continue  # o=postacert itself, or anything else the file carries
        try:
            entries.append(_entry(dn, attrs))
        except ValueError as exc:
            skipped.append(f"{dn or '(no dn)'}: {exc}")
    return entries, skipped


def _one(attrs: dict[str, list[bytes]], name: str) -> str:
    values = attrs.get(name.lower())
    if not values:
        raise ValueError(f"no {name}")
    return values[0].decode("utf-8").strip()


def _entry(dn: str, attrs: dict[str, list[bytes]]) -> ProviderEntry:
    certs = tuple(attrs.get("providercertificate", []))
    hashes = tuple(
        v.decode("ascii").strip().lower() for v in attrs.get("providercertificatehash", [])
    )
    if not certs:
        raise ValueError("no providerCertificate")
    if not hashes:
        raise ValueError("no providerCertificateHash")
    unmatched = [h for h in hashes if h not in {certificate_sha1(c) for c in certs}]
    if unmatched:
        # A hash with no certificate behind it would make a lookup fail later; say so now.
        raise ValueError(f"providerCertificateHash {unmatched[0]} matches no providerCertificate")
    domains = tuple(v.decode("utf-8").strip() for v in attrs.get("manageddomains", []))
    if not domains:
        raise ValueError("no managedDomains")
    unit = attrs.get("providerunit")
    return ProviderEntry(
        name=_one(attrs, "providerName"),
        mail_receipt=_one(attrs, "mailReceipt"),
        domains=domains,
        certificate_hashes=hashes,
        certificates=certs,
        unit=unit[0].decode("utf-8").strip() if unit else None,
        dn=dn,
    )


def _line(name: str, value: bytes) -> str:
    safe = (
        value
        and value.isascii()
        and value[:1] not in (b" ", b":", b"<")
        and not value.endswith(b" ")
        and b"\n" not in value
        and b"\r" not in value
        and b"\0" not in value
    )
    text = (
        f"{name}: {value.decode('ascii')}"
        if safe
        else f"{name}:: {base64.b64encode(value).decode()}"
    )
    # Fold long lines: the continuation starts with one space (RFC 2849).
    out = [text[:_WRAP]]
    rest = text[_WRAP:]
    while rest:
        out.append(" " + rest[: _WRAP - 1])
        rest = rest[_WRAP - 1 :]
    return "\n".join(out)


def entry_ldif(entry: ProviderEntry) -> str:
    """One provider entry as LDIF (``providerName=<name>,o=postacert``)."""
    dn = entry.dn or f"providerName={entry.name},o=postacert"
    lines = [_line("dn", dn.encode()), "objectClass: top", "objectClass: provider"]
    lines.append(_line("providerName", entry.name.encode()))
    if entry.unit:
        lines.append(_line("providerUnit", entry.unit.encode()))
    lines.append(_line("mailReceipt", entry.mail_receipt.encode()))
    lines += [_line("managedDomains", d.encode()) for d in entry.domains]
    lines += [_line("providerCertificateHash", h.encode()) for h in entry.certificate_hashes]
    lines += [_line("providerCertificate;binary", c) for c in entry.certificates]
    return "\n".join(lines) + "\n"


def write_ldif(entries: Iterable[ProviderEntry]) -> str:
    return "version: 1\n\n" + "\n".join(entry_ldif(e) for e in entries)
