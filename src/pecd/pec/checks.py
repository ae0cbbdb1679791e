"""Formal checks of a message submitted at the access point (spec/pec.md section 4).

Every failed check is a reason for an *avviso di non accettazione*. :func:`check_submission`
runs them all and returns every violation found, in the order of :data:`CODES` (at most one
:class:`Violation` per code; details of the same kind are joined into one line).

Decisions taken where the rules leave room (all deliberate, see the tests):

* **RFC 5322 conformance** (``not-rfc5322``) covers the header section only: it must start with
  a header field, every line up to the empty separator line must be a field (``name: value``,
  with optional white space before the colon, obs-syntax) or a continuation line, no header line
  may exceed 998 octets (without its line ending), headers must be 7-bit (PEC does not offer
  SMTPUTF8, so RFC 6532 UTF-8 headers are refused), and must not contain NUL or a bare CR.
  Both CRLF and LF line endings are accepted (a server may have converted them). A message made
  only of headers with no empty line and no body is RFC 5322-valid and is accepted.
  Fields that RFC 5322 section 3.6 allows at most once (``Date``, ``From``, ``Sender``,
  ``Reply-To``, ``To``, ``Cc``, ``Bcc``, ``Message-ID``, ``In-Reply-To``, ``References``,
  ``Subject``) must not be repeated.
* **Date**: RFC 5322 requires it, but clients often leave it to the submission server
  (RFC 6409 section 8.3), so a *missing* ``Date`` is accepted; a *malformed* one is refused.
  The body is not checked (line length, MIME structure).
* **From**: absent or blank → ``from-missing``; anything but exactly one valid mailbox
  (none, several, group syntax, unparseable, repeated header) → ``from-invalid``.
* **To**: absent, or without any valid address → ``to-missing``; any item of ``To`` or ``Cc``
  that does not parse → ``to-invalid``. Group syntax is allowed in To/Cc (its members count).
* **Comparisons** of addresses are fully case-insensitive (local part too): PEC mailboxes are
  treated case-insensitively by every provider, see :func:`normalize_address`.
  ``sender-mismatch`` is only reported when From holds exactly one valid address (otherwise the
  From violation says it all).
* **Recipient counts** use the set of distinct RCPT TO addresses (after normalisation).
* An ``authenticated`` value that is empty or blank counts as not authenticated.
* Addresses (see :func:`parse_address_list`): exactly one ``@``; the local part is a dot-atom
  (UTF-8 allowed) or a quoted string, at most 64 octets; the domain has at least two labels of
  1-63 letters/digits/hyphens (not starting or ending with a hyphen), UTF-8 IDN or punycode,
  a non-numeric top label and at most 253 octets; domain literals (``[1.2.3.4]``) are refused.
  ``name <addr>`` needs a display name made of atoms, dots and quoted strings; ``@``, ``[`` and
  ``]`` are tolerated unquoted there (``mario@pec.it <mario@pec.it>`` is common). Comments are
  ignored, obs-routes (``<@relay:addr>``) dropped.
"""

from __future__ import annotations

import datetime as _dt
import functools
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from pecd.pec.address import ATEXT, normalize_address, valid_address
from pecd.pec.vocab import MIN_RECIPIENTS_GUARANTEED, MIN_RECIPIENTS_TIMES_SIZE

__all__ = [
    "CODES",
    "Submission",
    "SubmissionLimits",
    "Violation",
    "check_submission",
    "normalize_address",
    "parse_address_list",
]

NOT_RFC5322 = "not-rfc5322"
FROM_MISSING = "from-missing"
FROM_INVALID = "from-invalid"
TO_MISSING = "to-missing"
TO_INVALID = "to-invalid"
SENDER_MISMATCH = "sender-mismatch"
RECIPIENTS_MISMATCH = "recipients-mismatch"
BCC_PRESENT = "bcc-present"
TOO_MANY_RECIPIENTS = "too-many-recipients"
TOO_LARGE = "too-large"
RECIPIENTS_TIMES_SIZE = "recipients-times-size"
NOT_AUTHENTICATED = "not-authenticated"
AUTH_MISMATCH = "auth-mismatch"
# Not a formal check (so not in CODES): the antivirus could not look at all of it.
UNSCANNABLE = "unscannable"

CODES: tuple[str, ...] = (
    NOT_RFC5322,
    FROM_MISSING,
    FROM_INVALID,
    TO_MISSING,
    TO_INVALID,
    SENDER_MISMATCH,
    RECIPIENTS_MISMATCH,
    BCC_PRESENT,
    TOO_MANY_RECIPIENTS,
    TOO_LARGE,
    RECIPIENTS_TIMES_SIZE,
    NOT_AUTHENTICATED,
    AUTH_MISMATCH,
)

MAX_LINE_OCTETS = 998
_SINGLETON_FIELDS = (
    "date",
    "from",
    "sender",
    "reply-to",
    "to",
    "cc",
    "bcc",
    "message-id",
    "in-reply-to",
    "references",
    "subject",
)
# How much user-controlled text goes into one notice line.
_MAX_LISTED = 10
_MAX_ITEM_CHARS = 80


@dataclass(frozen=True)
class Violation:
    """One failed formal check."""

    code: str  # one of CODES, or UNSCANNABLE
    it: str  # one line, Italian, for the non-accettazione notice
    en: str  # one line, English, for logs and operators


def unscannable(reason: str) -> Violation:
    """The formal reason for a message the antivirus could not check whole: it cannot be
    accepted (spec 4, step 8: it must be found free of viruses), and is not a virus either."""
    return Violation(
        UNSCANNABLE,
        "il messaggio non può essere verificato dall'antivirus (dimensioni o struttura oltre i"
        " limiti)",
        f"the antivirus could not check the whole message: {reason}",
    )


@dataclass(frozen=True)
class SubmissionLimits:
    """Provider limits; the rules (DM art. 12) set minimums a provider must guarantee."""

    max_size: int
    max_recipients: int
    max_recipients_times_size: int

    def __post_init__(self) -> None:
        if self.max_size <= 0:
            raise ValueError(f"max_size must be positive, got {self.max_size}")
        if self.max_recipients < MIN_RECIPIENTS_GUARANTEED:
            raise ValueError(
                f"max_recipients must be at least {MIN_RECIPIENTS_GUARANTEED}, "
                f"got {self.max_recipients}"
            )
        if self.max_recipients_times_size < MIN_RECIPIENTS_TIMES_SIZE:
            raise ValueError(
                f"max_recipients_times_size must be at least {MIN_RECIPIENTS_TIMES_SIZE}, "
                f"got {self.max_recipients_times_size}"
            )


@dataclass(frozen=True)
class Submission:
    """A message as received by the submission service."""

    raw: bytes  # the message as received in DATA
    mail_from: str  # SMTP reverse-path (bare addr-spec)
    rcpt_to: tuple[str, ...]  # SMTP forward-paths
    authenticated: str | None  # the authenticated mailbox, None if not authenticated


# --- addresses ----------------------------------------------------------------------------------

# A display name: words of atext, dots (obs-phrase), white space and quoted strings. Leniency:
# "@", "[" and "]" are tolerated unquoted (clients write ``mario@pec.it <mario@pec.it>``).
_PHRASE_RE = re.compile(rf'(?:[{ATEXT}.@\[\]\s]|"(?:[^"\\]|\\.)*")*', re.DOTALL)
_ROUTE_RE = re.compile(r"@[^:<>]*:")


# The characters that can change the state of the scans below; every other character is copied
# (or, inside a comment, dropped) whatever the state, so the scans jump from one of these to the
# next instead of stepping through every character.
_COMMENT_SPECIALS = re.compile(r'[\\"()]')
_LIST_SPECIALS = re.compile(r'[\\"()<>,:;]')


def _strip_comments(text: str) -> str | None:
    """Replace (possibly nested) comments outside quoted strings by a space; None if unbalanced."""
    if "(" not in text and ")" not in text and '"' not in text:
        return text
    out: list[str] = []
    depth = 0
    in_quote = False
    pos = 0  # the next character not yet copied or dropped
    for m in _COMMENT_SPECIALS.finditer(text):
        i = m.start()
        if i < pos:
            continue  # escaped by the backslash before it
        if not depth:
            out.append(text[pos:i])
        ch = text[i]
        pos = i + 1
        if ch == "\\" and (in_quote or depth):
            if depth == 0:
                out.append(text[i : i + 2])
            pos = i + 2
            continue
        if in_quote:
            out.append(ch)
            if ch == '"':
                in_quote = False
        elif depth:
            if ch == "(":
                depth += 1
            elif ch == ")":
                depth -= 1
                if depth == 0:
                    out.append(" ")
        elif ch == "(":
            depth = 1
        elif ch == ")":
            return None
        else:
            out.append(ch)
            if ch == '"':
                in_quote = True
    if depth or in_quote:
        return None
    out.append(text[pos:])
    return "".join(out)


def _parse_mailbox(item: str) -> str | None:
    """The bare addr-spec of one mailbox (``name <addr>`` or ``addr``), None if invalid."""
    # The same mailboxes come back in message after message (a sender, its usual recipients),
    # and in one message twice (the envelope builder and these checks read the same fields).
    return _read_mailbox(item) if len(item) > _CACHED_ITEM else _read_mailbox_cached(item)


_CACHED_ITEM = 256


@functools.lru_cache(maxsize=1024)
def _read_mailbox_cached(item: str) -> str | None:
    return _read_mailbox(item)


def _read_mailbox(item: str) -> str | None:
    text = _strip_comments(item)
    if text is None:
        return None
    text = text.strip()
    lt = _find_unquoted(text, "<")
    if lt < 0:
        addr = text
    else:
        gt = text.find(">", lt)
        if gt < 0 or text[gt + 1 :].strip():
            return None
        if not _PHRASE_RE.fullmatch(text[:lt]):
            return None
        addr = text[lt + 1 : gt].strip()
        route = _ROUTE_RE.match(addr)  # obs-route "<@relay:user@dom>": ignore the route
        if route:
            addr = addr[route.end() :].strip()
    if not valid_address(addr):
        return None
    return addr


def _find_unquoted(text: str, target: str) -> int:
    if '"' not in text:
        return text.find(target)
    in_quote = False
    i = 0
    while i < len(text):
        ch = text[i]
        if ch == "\\" and in_quote:
            i += 2
            continue
        if ch == '"':
            in_quote = not in_quote
        elif ch == target and not in_quote:
            return i
        i += 1
    return -1


def _split_address_list(value: str) -> tuple[list[str], bool]:
    """Split an address-list at top-level commas; returns the items and whether a group occurs.

    Group syntax (``name: a, b;``) contributes its members as items; quoted strings, comments and
    angle brackets protect their commas. Empty items (obs-addr-list) are dropped.
    """
    items: list[str] = []
    current: list[str] = []
    in_group = False
    saw_group = False
    in_quote = False
    comment = 0
    angle = False

    def flush() -> None:
        raw = "".join(current).strip()
        current.clear()
        if raw:
            items.append(raw)

    pos = 0  # the next character not yet copied
    for m in _LIST_SPECIALS.finditer(value):
        i = m.start()
        if i < pos:
            continue  # escaped by the backslash before it
        current.append(value[pos:i])
        ch = value[i]
        pos = i + 1
        if ch == "\\" and (in_quote or comment):
            current.append(value[i : i + 2])
            pos = i + 2
            continue
        if in_quote:
            in_quote = ch != '"'
        elif comment:
            comment += {"(": 1, ")": -1}.get(ch, 0)
        elif ch == '"':
            in_quote = True
        elif ch == "(":
            comment = 1
        elif angle:
            angle = ch != ">"
        elif ch == "<":
            angle = True
        elif ch == ",":
            flush()
            continue
        elif ch == ":" and not in_group:
            # Everything so far was the group's display name.
            current.clear()
            in_group = saw_group = True
            continue
        elif ch == ";" and in_group:
            flush()
            in_group = False
            continue
        current.append(ch)
    current.append(value[pos:])
    flush()
    return items, saw_group


def parse_address_list(value: str) -> tuple[list[str], list[str]]:
    """Parse an address-list header value (To, Cc, …).

    Returns ``(valid, invalid)``: the bare addr-specs of the valid mailboxes in order (as
    written, not normalised; group members included), and the raw text of the items that do not
    parse. RFC 2047 encoded display names are fine (an encoded word is an atom). Never raises.
    """
    items, _ = _split_address_list(value)
    valid: list[str] = []
    invalid: list[str] = []
    for item in items:
        addr = _parse_mailbox(item)
        if addr is None:
            invalid.append(item)
        else:
            valid.append(addr)
    return valid, invalid


# --- header section -----------------------------------------------------------------------------

_FIELD_RE = re.compile(rb"([\x21-\x39\x3b-\x7e]+)[ \t]*:")
_MONTHS = ("jan", "feb", "mar", "apr", "may", "jun", "jul", "aug", "sep", "oct", "nov", "dec")
_DATE_RE = re.compile(
    r"(?:(?:mon|tue|wed|thu|fri|sat|sun)\s*,\s*)?"
    r"(\d{1,2})\s+([a-z]{3})\s+(\d{2,4})\s+"
    r"(\d{1,2})\s*:\s*(\d{2})(?:\s*:\s*(\d{2}))?\s+"
    r"([+-]\d{4}|ut|gmt|[ecmp][sd]t|[a-ik-z])",
    re.IGNORECASE,
)


# One field of a header section with nothing to report (see _read_clean_section): the name, then
# the rest of its first line and its continuation lines, with their line endings.
_FIELD_BLOCK = re.compile(
    rb"([\x21-\x39\x3b-\x7e]+)[ \t]*:([^\r\n]*(?:\r?\n[ \t][^\r\n]*)*)(?:\r?\n|\Z)"
)


@dataclass
class _Headers:
    fields: dict[str, list[str]]  # lowercase name -> unfolded values, in order
    problems_it: list[str]
    problems_en: list[str]

    def get_all(self, name: str) -> list[str]:
        return self.fields.get(name, [])

    def add(self, name: str, value: str) -> None:
        self.fields.setdefault(name, []).append(value)

    def problem(self, it: str, en: str) -> None:
        if en not in self.problems_en:
            self.problems_it.append(it)
            self.problems_en.append(en)


def _parse_headers(raw: bytes) -> _Headers:
    """Split and check the header section (see the module docstring for what is checked)."""
    result = _Headers({}, [], [])
    if not raw:
        result.problem("messaggio vuoto", "empty message")
        return result
    # Only the lines up to the first empty line matter; do not split the whole body. (The first
    # "\n\r\n" bounds the search for "\n\n": a CRLF message does not hold one, and would
    # otherwise be read to its end.)
    crlf = raw.find(b"\n\r\n")
    lf = raw.find(b"\n\n", 0, len(raw) if crlf < 0 else crlf + 1)
    cut = lf if lf >= 0 else crlf
    section = raw if cut < 0 else raw[: cut + 1]
    if not _read_clean_section(section, result):
        _read_section(section, result)
    return result


def _read_clean_section(section: bytes, result: _Headers) -> bool:
    """Read ``section`` as :func:`_read_section` would when it finds nothing to report, and say
    so; leave ``result`` alone and return False when it might (then that is what reads it).

    Nothing to report: 7-bit, no NUL, no CR but in CRLF, no line longer than allowed, and every
    line a field or its continuation. That is every well-formed message, read with a few scans
    of the whole section instead of a loop over its lines."""
    if (
        not section.isascii()
        or b"\x00" in section
        or section.count(b"\r") != section.count(b"\r\n")
        or (
            len(section) > MAX_LINE_OCTETS and max(map(len, section.split(b"\n"))) > MAX_LINE_OCTETS
        )
    ):
        return False
    found: list[tuple[str, str]] = []
    pos = 0
    while pos < len(section):
        # Matched where the last field ended, never searched for: a search would try every
        # position of a long line that is not a field.
        m = _FIELD_BLOCK.match(section, pos)
        if m is None:
            return False
        value = m.group(2).translate(None, b"\r\n").decode("ascii").strip()
        found.append((m.group(1).decode("ascii").lower(), value))
        pos = m.end()
    for name, value in found:
        result.add(name, value)
    return True


def _read_section(section: bytes, result: _Headers) -> None:
    """Split ``section`` into fields line by line, noting every problem on the way."""
    pending: list[tuple[str, list[bytes]]] = []  # (name, [first value part, continuation lines])
    for line in section.splitlines(keepends=True):
        if line.endswith(b"\r\n"):
            content = line[:-2]
        elif line.endswith((b"\n", b"\r")):
            content = line[:-1]
        else:
            content = line
        if not content and line != b"\r":
            break  # the empty separator line
        if len(content) > MAX_LINE_OCTETS:
            result.problem(
                f"riga di intestazione più lunga di {MAX_LINE_OCTETS} byte",
                f"header line longer than {MAX_LINE_OCTETS} octets",
            )
        if line.endswith(b"\r"):
            result.problem("carattere CR isolato nelle intestazioni", "bare CR in the headers")
        if b"\x00" in content:
            result.problem("carattere NUL nelle intestazioni", "NUL character in the headers")
        if not content.isascii():
            result.problem(
                "caratteri non ASCII nelle intestazioni", "non-ASCII (8-bit) bytes in the headers"
            )
        match = None if content[:1] in (b" ", b"\t") else _FIELD_RE.match(content)
        if match is None and content[:1] in (b" ", b"\t") and pending:
            pending[-1][1].append(content)
            continue
        if match is None:
            if pending:
                result.problem(
                    "manca la riga vuota tra intestazioni e corpo",
                    "no empty line between the header section and the body",
                )
            else:
                result.problem(
                    "il messaggio non inizia con un campo di intestazione",
                    "the message does not start with a header field",
                )
            break
        pending.append((match.group(1).decode("ascii").lower(), [content[match.end() :]]))
    for name, parts in pending:
        result.add(name, b"".join(parts).decode("utf-8", "replace").strip())


def _valid_date(value: str) -> bool:
    """RFC 5322 date-time (obs forms: 2-digit year, named zones); trailing comments allowed."""
    text = _strip_comments(value)
    if text is None:
        return False
    match = _DATE_RE.fullmatch(text.strip())
    if match is None:
        return False
    day, month, year, hour, minute, second, _zone = match.groups()
    if month.lower() not in _MONTHS:
        return False
    year_num = int(year)
    if len(year) == 2:
        year_num += 2000 if year_num < 50 else 1900
    elif len(year) == 3:
        year_num += 1900
    try:
        _dt.datetime(year_num, _MONTHS.index(month.lower()) + 1, int(day), int(hour), int(minute))
    except ValueError:
        return False
    return second is None or int(second) <= 60


# --- the checks ---------------------------------------------------------------------------------


def _one_line(text: str) -> str:
    cleaned = "".join(ch if ch.isprintable() else " " for ch in text)
    if len(cleaned) > _MAX_ITEM_CHARS:
        cleaned = cleaned[: _MAX_ITEM_CHARS - 1] + "…"
    return cleaned


def _listing(items: Iterable[str]) -> str:
    values = [_one_line(item) for item in items]
    shown = ", ".join(values[:_MAX_LISTED])
    if len(values) > _MAX_LISTED:
        shown += f" … (+{len(values) - _MAX_LISTED})"
    return shown


def _normalized_set(addresses: Sequence[str]) -> set[str]:
    return {normalize_address(addr) for addr in addresses}


def check_submission(sub: Submission, limits: SubmissionLimits) -> list[Violation]:
    """Run every formal check of spec section 4 (antivirus aside) on a submission.

    Returns all violations, ordered as :data:`CODES`; an empty list means the message may be
    accepted. Never raises on malformed input.
    """
    found: dict[str, Violation] = {}

    def add(code: str, it: str, en: str) -> None:
        found.setdefault(code, Violation(code, it, en))

    headers = _parse_headers(sub.raw)
    for name in _SINGLETON_FIELDS:
        if len(headers.get_all(name)) > 1:
            label = _FIELD_LABELS.get(name, name)
            headers.problem(f"campo {label} ripetuto", f"repeated {label} header")
    dates = headers.get_all("date")
    if dates and not _valid_date(dates[0]):
        headers.problem("campo Date non valido", "malformed Date header")
    if headers.problems_en:
        add(
            NOT_RFC5322,
            "Il messaggio non è conforme a RFC 5322: " + "; ".join(headers.problems_it),
            "The message does not conform to RFC 5322: " + "; ".join(headers.problems_en),
        )

    # From: exactly one valid mailbox.
    from_values = headers.get_all("from")
    from_addr: str | None = None
    if not any(value.strip() for value in from_values):
        add(FROM_MISSING, "Il campo From è assente", "The From header is missing")
    else:
        items, group = _split_address_list(", ".join(from_values))
        parsed = [_parse_mailbox(item) for item in items]
        if len(from_values) == 1 and not group and len(parsed) == 1 and parsed[0] is not None:
            from_addr = parsed[0]
        else:
            add(
                FROM_INVALID,
                "Il campo From deve contenere un solo indirizzo valido",
                "The From header must contain exactly one valid address",
            )

    # To / Cc.
    to_valid: list[str] = []
    bad: list[str] = []
    for value in headers.get_all("to"):
        valid, invalid = parse_address_list(value)
        to_valid += valid
        bad += invalid
    cc_valid: list[str] = []
    for value in headers.get_all("cc"):
        valid, invalid = parse_address_list(value)
        cc_valid += valid
        bad += invalid
    if not to_valid:
        add(
            TO_MISSING,
            "Il campo To è assente o non contiene indirizzi validi",
            "The To header is missing or holds no valid address",
        )
    if bad:
        add(
            TO_INVALID,
            f"Indirizzi non validi nei campi To/Cc: {_listing(bad)}",
            f"Invalid addresses in To/Cc: {_listing(bad)}",
        )

    # Envelope against headers.
    mail_from = normalize_address(sub.mail_from)
    if from_addr is not None and normalize_address(from_addr) != mail_from:
        add(
            SENDER_MISMATCH,
            f"Il mittente SMTP (MAIL FROM) <{_one_line(mail_from)}> non coincide "
            f"con il campo From <{_one_line(normalize_address(from_addr))}>",
            f"The SMTP sender (MAIL FROM) <{_one_line(mail_from)}> differs "
            f"from the From address <{_one_line(normalize_address(from_addr))}>",
        )
    rcpts = _normalized_set(sub.rcpt_to)
    header_rcpts = _normalized_set(to_valid + cc_valid)
    if rcpts != header_rcpts:
        extra = sorted(rcpts - header_rcpts)
        missing = sorted(header_rcpts - rcpts)
        it_parts = []
        en_parts = []
        if extra:
            it_parts.append(f"destinatari SMTP assenti da To/Cc: {_listing(extra)}")
            en_parts.append(f"SMTP recipients not in To/Cc: {_listing(extra)}")
        if missing:
            it_parts.append(f"indirizzi in To/Cc non tra i destinatari SMTP: {_listing(missing)}")
            en_parts.append(f"To/Cc addresses not among the SMTP recipients: {_listing(missing)}")
        add(
            RECIPIENTS_MISMATCH,
            "I destinatari SMTP (RCPT TO) non coincidono con i campi To/Cc: " + "; ".join(it_parts),
            "The SMTP recipients (RCPT TO) differ from To/Cc: " + "; ".join(en_parts),
        )

    if any(value.strip() for value in headers.get_all("bcc")):
        add(BCC_PRESENT, "Il campo Bcc non è ammesso", "The Bcc header is not allowed")

    # Limits.
    size = len(sub.raw)
    count = len(rcpts)
    if count > limits.max_recipients:
        add(
            TOO_MANY_RECIPIENTS,
            f"Numero di destinatari ({count}) superiore al massimo consentito "
            f"({limits.max_recipients})",
            f"Too many recipients ({count}, at most {limits.max_recipients})",
        )
    if size > limits.max_size:
        add(
            TOO_LARGE,
            f"Dimensione del messaggio ({size} byte) superiore al massimo consentito "
            f"({limits.max_size} byte)",
            f"Message too large ({size} octets, at most {limits.max_size})",
        )
    if count * size > limits.max_recipients_times_size:
        add(
            RECIPIENTS_TIMES_SIZE,
            f"Il prodotto destinatari × dimensione ({count} × {size} byte) supera il limite "
            f"consentito ({limits.max_recipients_times_size} byte)",
            f"Recipients × size ({count} × {size} octets) exceeds the limit "
            f"({limits.max_recipients_times_size} octets)",
        )

    # Authentication.
    if sub.authenticated is None or not sub.authenticated.strip():
        add(NOT_AUTHENTICATED, "Utente non autenticato", "The user is not authenticated")
    elif normalize_address(sub.authenticated) != mail_from:
        auth = _one_line(normalize_address(sub.authenticated))
        add(
            AUTH_MISMATCH,
            f"L'utente autenticato <{auth}> non coincide con il mittente SMTP "
            f"<{_one_line(mail_from)}>",
            f"The authenticated user <{auth}> differs from the SMTP sender "
            f"<{_one_line(mail_from)}>",
        )

    return [found[code] for code in CODES if code in found]


_FIELD_LABELS = {
    "date": "Date",
    "from": "From",
    "sender": "Sender",
    "reply-to": "Reply-To",
    "to": "To",
    "cc": "Cc",
    "bcc": "Bcc",
    "message-id": "Message-ID",
    "in-reply-to": "In-Reply-To",
    "references": "References",
    "subject": "Subject",
}
