"""LDIF (RFC 2849) reading and writing for the provider index, sans I/O.

Reads what the central index publishes: entries separated by blank lines, ``attr: value``,
``attr:: base64``, continuation lines starting with one space, ``#`` comments, attribute names in
any letter case (or as OIDs) and with options (``providerCertificate;binary``). An entry that is
not a usable ``provider`` is skipped with its reason; only a text that is not LDIF at all raises.
"""

from __future__ import annotations

import base64
import binascii
import re
from collections.abc import Iterable
from dataclasses import dataclass, field

from cryptography import x509

from pecd.index.model import ProviderEntry, certificate_sha1, normalize_hash
from pecd.pec.address import normalize_address, normalize_domain, valid_address, valid_domain

__all__ = ["LdifError", "ParsedIndex", "entry_ldif", "escape_dn_value", "parse_ldif", "write_ldif"]

_WRAP = 76  # RFC 2849 lets lines be folded anywhere; 76 is what ldapsearch and the AgID file use

# The schema of spec section 8, so that a file naming attributes by OID reads the same.
_OIDS = {
    "1.3.6.1.4.1.16572.2.2.1": "providercertificatehash",
    "1.3.6.1.4.1.16572.2.2.2": "providercertificate",
    "1.3.6.1.4.1.16572.2.2.3": "providername",
    "1.3.6.1.4.1.16572.2.2.4": "mailreceipt",
    "1.3.6.1.4.1.16572.2.2.5": "manageddomains",
    "1.3.6.1.4.1.16572.2.2.6": "ldiflocationurl",
    "1.3.6.1.4.1.16572.2.2.7": "providerunit",
    "2.5.4.0": "objectclass",
    "2.5.4.13": "description",
}
_ATTR_RE = re.compile(r"^(?:[A-Za-z][A-Za-z0-9-]*|\d+(?:\.\d+)+)(?:;[A-Za-z0-9-]+)*$")
_HASH_RE = re.compile(r"^[0-9a-f]{40}$")


class LdifError(ValueError):
    """The text is not LDIF at all (as opposed to LDIF with some unusable entries)."""


@dataclass(frozen=True)
class ParsedIndex:
    """What an LDIF text holds: the usable provider entries and what was left out, and why."""

    entries: tuple[ProviderEntry, ...]
    skipped: tuple[str, ...] = ()  # whole entries left out
    warnings: tuple[str, ...] = ()  # single values left out of entries that were kept
    records: int = 0  # every entry of the file, providers or not (o=postacert itself, …)


class _Skip(Exception):
    """Raised inside the parser to leave one entry out; never escapes parse_ldif."""


@dataclass
class _Record:
    line: int  # where it starts, for messages an operator can find in the file
    lines: list[tuple[int, str]] = field(default_factory=list)


def _logical_records(text: str) -> list[_Record]:
    """Unfold continuation lines, drop comments, split on blank lines."""
    records: list[_Record] = []
    current: _Record | None = None
    in_comment = False
    for number, raw in enumerate(text.split("\n"), start=1):
        line = raw.removesuffix("\r")
        if line.startswith(" ") and (in_comment or (current and current.lines)):
            # A continuation: of a comment (dropped with it) or of the previous line.
            if not in_comment and current is not None:
                n, prev = current.lines[-1]
                current.lines[-1] = (n, prev + line[1:])
            continue
        in_comment = line.startswith("#")
        if in_comment:
            continue
        if not line.strip():
            if current is not None and current.lines:
                records.append(current)
            current = None
            continue
        if current is None:
            current = _Record(number)
        current.lines.append((number, line))
    if current is not None and current.lines:
        records.append(current)
    return records


def _split(number: int, line: str) -> tuple[str, bytes]:
    """``name: value`` / ``name:: base64`` -> (lower-case name with options, value bytes)."""
    name, sep, rest = line.partition(":")
    name = name.strip()
    if not sep or not _ATTR_RE.match(name):
        raise _Skip(f"line {number}: not an LDIF attribute line: {line[:60]!r}")
    base, _, options = name.lower().partition(";")
    name = _OIDS.get(base, base) + (";" + options if options else "")
    if rest.startswith(":"):
        try:
            return name, base64.b64decode("".join(rest[1:].split()), validate=True)
        except binascii.Error:
            raise _Skip(f"line {number}: bad base64 in {name}") from None
    if rest.startswith("<"):
        raise _Skip(f"line {number}: {name}: values by URL (:<) are not read")
    return name, rest.lstrip(" ").encode("utf-8")


def _first_rdn(dn: str) -> tuple[str, str]:
    """The attribute and (unescaped) value of a DN's first RDN: ``providerUnit=x,…`` -> ..."""
    out: list[str] = []
    i = 0
    while i < len(dn) and dn[i] != ",":
        if dn[i] == "\\" and i + 1 < len(dn):
            pair = dn[i + 1 : i + 3]
            if re.fullmatch(r"[0-9A-Fa-f]{2}", pair):
                out.append(chr(int(pair, 16)))
                i += 3
                continue
            out.append(dn[i + 1])
            i += 2
            continue
        out.append(dn[i])
        i += 1
    attr, _, value = "".join(out).partition("=")
    return attr.strip().lower(), value.strip()


def _text(name: str, value: bytes) -> str:
    try:
        return value.decode("utf-8").strip()
    except UnicodeDecodeError:
        raise _Skip(f"{name} is not UTF-8") from None


def _single(attrs: dict[str, list[bytes]], name: str, warn: list[str]) -> str | None:
    values = attrs.get(name.lower())
    if not values:
        return None
    if len(values) > 1:
        # SINGLE-VALUE in the schema; the first is as good a guess as any, and saying so helps.
        warn.append(f"{name} has {len(values)} values, the first is used")
    return _text(name, values[0])


def _provider(dn: str, attrs: dict[str, list[bytes]], warn: list[str]) -> ProviderEntry:
    name = _single(attrs, "providerName", warn)
    if not name:
        raise _Skip("no providerName")
    receipt = _single(attrs, "mailReceipt", warn)
    if not receipt:
        raise _Skip("no mailReceipt")
    if not valid_address(normalize_address(receipt)):
        raise _Skip(f"mailReceipt {receipt!r} is not a mail address")

    domains: list[str] = []
    for v in attrs.get("manageddomains", []):
        d = normalize_domain(_text("managedDomains", v))
        if valid_domain(d):
            domains.append(d)
        else:
            warn.append(f"managedDomains {d!r} is not a domain, left out")
    if not domains:
        raise _Skip("no usable managedDomains")

    certs: list[bytes] = []
    for n, der in enumerate(attrs.get("providercertificate", []), start=1):
        try:
            x509.load_der_x509_certificate(der)
        except ValueError:
            warn.append(f"providerCertificate #{n} is not a DER certificate, left out")
            continue
        certs.append(der)
    if not certs:
        raise _Skip("no usable providerCertificate")

    hashes: list[str] = []
    for v in attrs.get("providercertificatehash", []):
        h = normalize_hash(_text("providerCertificateHash", v))
        if _HASH_RE.match(h):
            hashes.append(h)
        else:
            warn.append(f"providerCertificateHash {h[:50]!r} is not a SHA-1 in hex, left out")
    if not hashes:
        raise _Skip("no usable providerCertificateHash")
    listed = {certificate_sha1(c) for c in certs}
    # Kept as they are: lookups compare the whole certificate anyway, but an operator should
    # know why a provider's messages will not be recognised.
    for h in hashes:
        if h not in listed:
            warn.append(f"providerCertificateHash {h} matches none of its providerCertificate")
    for c in certs:
        if certificate_sha1(c) not in hashes:
            warn.append(f"providerCertificate {certificate_sha1(c)} has no providerCertificateHash")

    unit = _single(attrs, "providerUnit", warn)
    if not unit:
        rdn_attr, rdn_value = _first_rdn(dn)
        unit = rdn_value if rdn_attr == "providerunit" and rdn_value else None
    url = _single(attrs, "LDIFLocationURL", warn)
    if url and unit:
        warn.append("LDIFLocationURL is not allowed on a secondary (providerUnit) entry, ignored")
        url = None
    return ProviderEntry(
        name=name,
        mail_receipt=receipt,
        domains=tuple(dict.fromkeys(domains)),
        certificate_hashes=tuple(dict.fromkeys(hashes)),
        certificates=tuple(dict.fromkeys(certs)),
        unit=unit,
        dn=dn,
        description=_single(attrs, "description", warn) or None,
        ldif_location_url=url or None,
    )


def parse_ldif(text: str | bytes) -> ParsedIndex:
    """The provider entries of an LDIF text, and why anything else was left out.

    Raises :class:`LdifError` only when ``text`` is not LDIF at all (empty, not UTF-8, or no
    entry that starts with ``dn:``), so that a caller can refuse to replace a good copy with it.
    """
    if isinstance(text, bytes):
        try:
            text = text.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise LdifError(f"not UTF-8 text (byte {exc.start})") from None
    text = text.removeprefix("\ufeff")
    records = _logical_records(text)
    entries: list[ProviderEntry] = []
    skipped: list[str] = []
    warnings: list[str] = []
    with_dn = 0
    for i, rec in enumerate(records):
        lines = rec.lines
        if i == 0 and lines[0][1].lower().replace(" ", "").startswith("version:"):
            lines = lines[1:]  # "version: 1" may share the first record (RFC 2849)
            if not lines:
                continue
        where = f"entry at line {lines[0][0]}"
        try:
            first = _split(*lines[0])
        except _Skip as exc:
            skipped.append(f"{where}: {exc}")
            continue
        if first[0] != "dn":
            skipped.append(f"{where}: does not start with dn:")
            continue
        with_dn += 1
        dn = first[1].decode("utf-8", "replace").strip()
        where = f"{dn or '(empty dn)'} (line {lines[0][0]})"
        try:
            pairs = [_split(n, line) for n, line in lines[1:]]
        except _Skip as exc:
            skipped.append(f"{where}: {exc}")
            continue
        attrs: dict[str, list[bytes]] = {}
        for name, value in pairs:
            if name == "control":
                continue
            attrs.setdefault(name.split(";", 1)[0], []).append(value)
        change = attrs.pop("changetype", [b"add"])[0].decode("ascii", "replace").strip().lower()
        classes = {
            v.decode("utf-8", "replace").strip().lower() for v in attrs.get("objectclass", [])
        }
        rdn_attr = _first_rdn(dn)[0]
        if (
            "provider" not in classes
            and "providername" not in attrs
            and rdn_attr not in ("providername", "providerunit")
        ):
            continue  # o=postacert itself, or anything else the file carries
        if change != "add":
            skipped.append(f"{where}: changetype {change} is not applied (a full copy is read)")
            continue
        warn: list[str] = []
        try:
            entries.append(_provider(dn, attrs, warn))
        except _Skip as exc:
            skipped.append(f"{where}: {exc}")
            continue
        warnings += [f"{where}: {w}" for w in warn]
    if not with_dn:
        what = "empty" if not text.strip() else "no entry starting with dn:"
        raise LdifError(f"not LDIF: {what}")
    return ParsedIndex(tuple(entries), tuple(skipped), tuple(warnings), with_dn)


def escape_dn_value(value: str) -> str:
    """An RDN value escaped as RFC 4514 asks (``Acme, S.p.A.`` -> ``Acme\\, S.p.A.``)."""
    out = re.sub(r'([,+"\\<>;=])', r"\\\1", value)
    if out.startswith((" ", "#")):
        out = "\\" + out
    if out.endswith(" ") and not out.endswith("\\ "):
        out = out[:-1] + "\\ "
    return out


def _line(name: str, value: bytes) -> str:
    # RFC 2849 SAFE-STRING: ASCII, no NUL/LF/CR, not starting with space, colon or "<"; a
    # trailing space would be lost by readers that strip, so that goes to base64 too.
    safe = (
        value.isascii()
        and value[:1] not in (b" ", b":", b"<")
        and not value.endswith(b" ")
        and not any(c in value for c in b"\0\n\r")
    )
    text = (
        f"{name}: {value.decode('ascii')}"
        if safe and value
        else f"{name}:: {base64.b64encode(value).decode('ascii')}"
    )
    # Fold long lines: each continuation starts with one space (RFC 2849).
    out = [text[:_WRAP]]
    rest = text[_WRAP:]
    while rest:
        out.append(" " + rest[: _WRAP - 1])
        rest = rest[_WRAP - 1 :]
    return "\n".join(out)


def entry_ldif(entry: ProviderEntry) -> str:
    """One provider entry as LDIF (dn ``providerName=<name>,o=postacert``, or its own dn)."""
    dn = entry.dn or (
        (f"providerUnit={escape_dn_value(entry.unit)}," if entry.unit else "")
        + f"providerName={escape_dn_value(entry.name)},o=postacert"
    )
    lines = [_line("dn", dn.encode()), "objectClass: top", "objectClass: provider"]
    lines.append(_line("providerName", entry.name.encode()))
    if entry.unit:
        lines.append(_line("providerUnit", entry.unit.encode()))
    if entry.description:
        lines.append(_line("description", entry.description.encode()))
    lines.append(_line("mailReceipt", entry.mail_receipt.encode()))
    lines += [_line("managedDomains", d.encode()) for d in entry.domains]
    lines += [_line("providerCertificateHash", h.encode()) for h in entry.certificate_hashes]
    lines += [_line("providerCertificate;binary", c) for c in entry.certificates]
    if entry.ldif_location_url and not entry.unit:
        lines.append(_line("LDIFLocationURL", entry.ldif_location_url.encode()))
    return "\n".join(lines) + "\n"


def write_ldif(entries: Iterable[ProviderEntry]) -> str:
    """A whole LDIF file (``version: 1``, then the entries, blank-line separated)."""
    return "version: 1\n\n" + "\n".join(entry_ldif(e) for e in entries)
