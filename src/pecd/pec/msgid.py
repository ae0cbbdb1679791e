"""PEC message identifiers (spec section 6): unique, ``<alphanumeric>@<provider mail domain>``."""

from __future__ import annotations

import re
import secrets

from pecd.pec.timefmt import PecTime

_DOMAIN_RE = re.compile(r"^[A-Za-z0-9](?:[A-Za-z0-9.-]*[A-Za-z0-9])?$")


def new_pec_msgid(domain: str, when: PecTime, *, token: str | None = None) -> str:
    """A new PEC msgid, without angle brackets: ``pecd.<YYYYMMDDhhmmss>.<32 hex>@<domain>``.

    128 random bits make a collision negligible across nodes without coordination; the timestamp makes
    ids sort by time and helps an operator reading the log. ``token`` is for reproducible tests.
    """
    if not _DOMAIN_RE.match(domain):
        raise ValueError(f"not a mail domain: {domain!r}")
    tok = token if token is not None else secrets.token_hex(16)
    if not tok.isalnum():
        raise ValueError("msgid token must be alphanumeric")
    return f"pecd.{when.compact}.{tok}@{domain.lower()}"


def bracket(msgid: str) -> str:
    """``<id>`` form for headers."""
    msgid = msgid.strip()
    return msgid if msgid.startswith("<") else f"<{msgid}>"


def unbracket(msgid: str) -> str:
    """Bare id form, as daticert ``<identificativo>`` carries it."""
    msgid = msgid.strip()
    if msgid.startswith("<") and msgid.endswith(">"):
        return msgid[1:-1].strip()
    return msgid
