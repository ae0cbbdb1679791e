"""The one way pecd normalises, splits and validates a mail address (every module uses these).

Rules, chosen once:

* **Normal form** (:func:`normalize_address`): surrounding white space removed; one enclosing pair
  of angle brackets removed (``<a@b.it>``, as SMTP and headers write it), then white space again;
  the **whole** address lowercased, local part included. RFC 5321 lets a server treat the local
  part as case-sensitive, but PEC providers treat mailboxes case-insensitively, and pecd compares,
  stores, keys and routes addresses only in this form. Nothing else is changed: no IDNA
  conversion, no removal of comments, display names or ``+tags``. An empty string (the SMTP null
  path ``<>``) stays empty.
* **Domain** (:func:`normalize_domain`, :func:`domain_of`): white space removed, lowercased, one
  trailing root dot dropped (``pec.it.`` is ``pec.it``; LDAP's ``managedDomains`` compare so).
  :func:`domain_of` is the domain of the normal form, split at the *last* ``@``.
* **Valid** (:func:`valid_address`): an RFC 5322 addr-spec as the formal checks accept it: exactly
  one ``@``; the local part a dot-atom (UTF-8 allowed) or a quoted string, at most 64 octets; the
  domain valid for :func:`valid_domain`. Domain literals (``[1.2.3.4]``) are refused.
  ``valid_address`` judges the text it is given: normalise first.
* **Valid domain** (:func:`valid_domain`): at least two labels of 1-63 letters, digits and hyphens
  (not at either end of a label), UTF-8 IDN or punycode, a non-numeric top label, at most 253
  octets. ``localhost`` is not a mail domain.

Narrower policies (the local parts pecd itself creates, see ``store.accounts``) add their own
rules on top of these; they never relax them.
"""

from __future__ import annotations

import encodings.idna
import re

__all__ = [
    "ATEXT",
    "domain_of",
    "normalize_address",
    "normalize_domain",
    "valid_address",
    "valid_domain",
]

#: RFC 5322 ``atext`` as a regex character-class body, UTF-8 (RFC 6532) included.
ATEXT = r"A-Za-z0-9!#$%&'*+/=?^_`{|}~\-\u0080-\U0010ffff"
_DOT_ATOM_RE = re.compile(rf"[{ATEXT}]+(?:\.[{ATEXT}]+)*")
_QUOTED_LOCAL_RE = re.compile(r'"(?:[^"\\\r\n@]|\\[^\r\n@])*"')
_LDH_LABEL_RE = re.compile(r"[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?", re.IGNORECASE)


def normalize_address(address: str) -> str:
    """``" <Mario.Rossi@PEC.It> "`` -> ``"mario.rossi@pec.it"`` (see the module's rules)."""
    value = address.strip()
    if value.startswith("<") and value.endswith(">"):
        value = value[1:-1].strip()
    return value.lower()


def normalize_domain(domain: str) -> str:
    """``" PEC.It. "`` -> ``"pec.it"``."""
    value = domain.strip().lower()
    return value[:-1] if value.endswith(".") else value


def domain_of(address: str) -> str:
    """The normalised domain of an address (``""`` when it has no ``@``)."""
    _local, at, domain = normalize_address(address).rpartition("@")
    return normalize_domain(domain) if at else ""


def valid_domain(domain: str) -> bool:
    """A domain name a mailbox can live at (see the module's rules); no normalisation."""
    if not domain or len(domain.encode("utf-8", "surrogatepass")) > 253:
        return False
    labels = domain.split(".")
    if len(labels) < 2:
        return False
    for label in labels:
        if label.isascii():
            ascii_label = label
        else:
            try:
                ascii_label = encodings.idna.ToASCII(label).decode("ascii")
            except (UnicodeError, ValueError):
                return False
        if not _LDH_LABEL_RE.fullmatch(ascii_label):
            return False
    return not labels[-1].isdigit()


def valid_address(address: str) -> bool:
    """An addr-spec (see the module's rules); no normalisation, so ``<a@b.it>`` is not valid."""
    if address.count("@") != 1:
        return False
    local, domain = address.split("@")
    if not local or len(local.encode("utf-8", "surrogatepass")) > 64:
        return False
    if not (_DOT_ATOM_RE.fullmatch(local) or _QUOTED_LOCAL_RE.fullmatch(local)):
        return False
    return valid_domain(domain)
