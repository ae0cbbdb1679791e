"""The provider index read from an LDAP directory (``index.source = "ldap://…"`` or ``"ldaps://…"``).

Every provider entry under the base DN (``o=postacert`` by default) is read in one subtree search
with the RFC 6109 attributes (spec section 8), and turned into the same :class:`ParsedIndex` the
LDIF source gives: the entries are written out as LDIF and read by :func:`parse_ldif`, so both
sources keep and skip exactly the same things (multi-valued ``providerCertificateHash`` and
``providerCertificate`` during a rollover included).

The client is python-ldap (OpenLDAP's libldap), synchronous: :class:`~pecd.index.IndexService`
runs the load in a worker thread, and reloads are rare (daily, and on SIGHUP). Connect, bind and
search each have the configured timeout. Anything that goes wrong, including a directory with no
usable provider entry, raises :class:`LdapIndexError`, and the service keeps the last good copy.
"""

from __future__ import annotations

import base64
import contextlib
import re
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import ldap  # type: ignore[import-untyped]

from pecd.index.ldif import LdifError, ParsedIndex, parse_ldif

__all__ = [
    "ATTRIBUTES",
    "DEFAULT_BASE_DN",
    "LdapIndexError",
    "LdapSource",
    "fetch_entries",
    "parse_ldap_entries",
    "read_ldap_index",
]

DEFAULT_BASE_DN = "o=postacert"
#: What is asked for: the RFC 6109 attributes, plus objectClass and description.
ATTRIBUTES = (
    "objectClass",
    "providerName",
    "providerCertificateHash",
    "providerCertificate;binary",
    "mailReceipt",
    "managedDomains",
    "LDIFLocationURL",
    "providerUnit",
    "description",
)
# The provider entries, whether or not the server knows the objectClass by that name.
_FILTER = "(|(objectClass=provider)(providerName=*))"
_LINE_RE = re.compile(r" \(line \d+\)")


class LdapIndexError(Exception):
    """The directory could not be read, or held nothing usable; ``str()`` is the one line."""


@dataclass(frozen=True)
class LdapSource:
    """Where and how to read the index: built from ``[index]`` by the service."""

    url: str  # ldap://host[:port] or ldaps://host[:port]
    base_dn: str = DEFAULT_BASE_DN
    bind_dn: str | None = None  # None: anonymous
    bind_password: str | None = None
    bind_password_file: Path | None = None  # read at each load, so it can be rotated
    ca: Path | None = None  # CA file the server certificate must chain to (ldaps:// or StartTLS)
    starttls: bool = False
    timeout: float = 10.0

    @property
    def label(self) -> str:
        """The URL and base DN, for the log and ``pecd index show`` (never the password)."""
        return f"{self.url.rstrip('/')}/{self.base_dn}"

    def password(self) -> str:
        if self.bind_password_file is not None:
            try:
                text = self.bind_password_file.read_text("utf-8")
            except (OSError, UnicodeDecodeError) as exc:
                raise LdapIndexError(
                    f"{self.bind_password_file}: cannot read index.bind_password_file: {exc}"
                ) from None
            return text.rstrip("\r\n")
        return self.bind_password or ""


def _describe(exc: Exception) -> str:
    """python-ldap's errors carry a dict (desc, info, …); one short line out of it."""
    args = getattr(exc, "args", ())
    if args and isinstance(args[0], dict):
        info = args[0]
        desc = str(info.get("desc", type(exc).__name__))
        extra = str(info.get("info", "") or "").strip()
        return f"{desc} ({extra})" if extra else desc
    return f"{type(exc).__name__}: {exc}"


def fetch_entries(source: LdapSource) -> list[tuple[str, dict[str, list[bytes]]]]:
    """Bind (simple, or anonymous) and read every provider entry under the base DN.

    Blocking: call it in a worker thread. Raises LdapIndexError on any failure."""
    scheme = urlsplit(source.url).scheme.lower()
    conn: Any = None
    try:
        conn = ldap.initialize(source.url)
        conn.set_option(ldap.OPT_PROTOCOL_VERSION, ldap.VERSION3)
        conn.set_option(ldap.OPT_REFERRALS, 0)  # never chase a referral to another server
        conn.set_option(ldap.OPT_NETWORK_TIMEOUT, source.timeout)  # connect
        conn.set_option(ldap.OPT_TIMEOUT, source.timeout)  # each operation's result
        conn.timeout = source.timeout  # python-ldap's own wait in the *_s calls
        if scheme == "ldaps" or source.starttls:
            conn.set_option(ldap.OPT_X_TLS_REQUIRE_CERT, ldap.OPT_X_TLS_DEMAND)
            if source.ca is not None:
                conn.set_option(ldap.OPT_X_TLS_CACERTFILE, str(source.ca))
            conn.set_option(ldap.OPT_X_TLS_NEWCTX, 0)  # last: applies the TLS options above
        if source.starttls:
            conn.start_tls_s()
        if source.bind_dn:
            conn.simple_bind_s(source.bind_dn, source.password())
        else:
            conn.simple_bind_s("", "")
        found = conn.search_ext_s(
            source.base_dn,
            ldap.SCOPE_SUBTREE,
            _FILTER,
            attrlist=list(ATTRIBUTES),
            timeout=source.timeout,
        )
    except LdapIndexError:
        raise
    except ldap.INVALID_CREDENTIALS:
        raise LdapIndexError(f"{source.label}: bind as {source.bind_dn!r} refused") from None
    except ldap.NO_SUCH_OBJECT:
        raise LdapIndexError(f"{source.label}: the base DN does not exist") from None
    except ldap.TIMEOUT:
        raise LdapIndexError(f"{source.label}: no answer within {source.timeout:g} s") from None
    except ldap.LDAPError as exc:
        raise LdapIndexError(f"{source.label}: {_describe(exc)}") from None
    finally:
        if conn is not None:
            # The connection may never have been made: nothing to close then.
            with contextlib.suppress(Exception):
                conn.unbind_s()
    out: list[tuple[str, dict[str, list[bytes]]]] = []
    for dn, attrs in found:
        if dn is None or not isinstance(attrs, dict):
            continue  # a search reference (OPT_REFERRALS is off)
        out.append((str(dn), {str(k): [bytes(v) for v in vs] for k, vs in attrs.items()}))
    return out


def _b64(name: str, value: bytes) -> str:
    return f"{name}:: {base64.b64encode(value).decode('ascii')}"


def parse_ldap_entries(
    entries: Iterable[tuple[str, dict[str, list[bytes]]]], *, source: str = "ldap"
) -> ParsedIndex:
    """What a search returned, read exactly as the LDIF source reads a file: sans I/O.

    Raises LdapIndexError when no usable provider entry is there (an empty or unreadable
    directory must not replace a good copy)."""
    blocks: list[str] = []
    for dn, attrs in entries:
        lines = [_b64("dn", dn.encode("utf-8"))]
        for name, values in attrs.items():
            lines += [_b64(name, v) for v in values]
        blocks.append("\n".join(lines))
    if not blocks:
        raise LdapIndexError(f"{source}: no provider entry found")
    try:
        parsed = parse_ldif("\n\n".join(blocks) + "\n")
    except LdifError as exc:  # cannot happen with what is written above; said plainly if it does
        raise LdapIndexError(f"{source}: {exc}") from None
    # The line numbers refer to the LDIF written here, which nobody sees.
    parsed = ParsedIndex(
        parsed.entries,
        tuple(_LINE_RE.sub("", s) for s in parsed.skipped),
        tuple(_LINE_RE.sub("", w) for w in parsed.warnings),
        parsed.records,
    )
    if not parsed.entries:
        why = "; ".join(parsed.skipped[:3])
        raise LdapIndexError(
            f"{source}: no usable provider entry ({len(parsed.skipped)} skipped: {why})"
        )
    return parsed


def read_ldap_index(source: LdapSource) -> ParsedIndex:
    """Fetch and read the directory's provider entries. Blocking; LdapIndexError on failure."""
    return parse_ldap_entries(fetch_entries(source), source=source.label)
