"""FETCH answers computed from a message's exact bytes: BODYSTRUCTURE, BODY, ENVELOPE, sections.

pymap derives these from ``email`` parsing (re-serialised headers, sizes that include the part
headers, a disposition written as its header text, a reformatted ENVELOPE date). Here one walk
over the stored bytes finds every MIME part as offsets into them, so ``BODY[n]`` is a slice of
the file and every size and line count is counted on the bytes a client will receive.

The answers follow RFC 3501 (7.4.2 and the FETCH section rules of 6.4.5) and, where the RFC
leaves a choice, what Dovecot 2.3 answers for the same bytes, so that clients that were written
against it render PEC messages the same way:

* A part's size is its body's octets; its lines are the LF characters in that body. The line
  ending before a boundary delimiter belongs to the delimiter, not to the part.
* ``text/*`` without a ``charset`` parameter gets ``("charset" "us-ascii")`` appended; no
  ``Content-Type`` at all means ``text/plain`` (``message/rfc822`` in ``multipart/digest``).
* Type, subtype, parameter names and encodings keep the letter case of the header.
* RFC 2231: continuations (``name*0``, ``name*1``) are joined; an encoded value keeps its
  ``charset'lang'%XX`` form under the name ``name*`` (what Dovecot sends; clients decode it).
  Plain parameters come first in header order, then the RFC 2231 ones sorted by name.
* ENVELOPE: the date, message-id and in-reply-to are the raw header values (line breaks
  removed); the subject and display names have runs of white space made one space (Dovecot's
  "for humans" strings); address headers that appear more than once are concatenated; other
  fields take the last occurrence; a broken address reads ``MISSING_MAILBOX``/``MISSING_DOMAIN``.
* A ``message/rfc822`` part encoded other than 7bit/8bit/binary is not entered (RFC 2046
  forbids such encodings): it encloses an empty message.
* Boundary delimiters are matched strictly (RFC 2046 5.1.1: the boundary, then only white
  space, or ``--`` and white space); a multipart with no delimiter has one empty part.

One deliberate difference from Dovecot: the CRLF that follows a nested multipart's close
delimiter is the next delimiter's (RFC 2046), not the nested part's; see :func:`parse`.

:func:`parse` is pure (bytes in, a tree of offsets out); :class:`ExactLoadedMessage` is the
pymap ``LoadedMessage`` that answers FETCH from it.
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import Collection, Sequence
from dataclasses import dataclass
from typing import Any

from pymap.backend.maildir.mailbox import LoadedMessage, Message
from pymap.bytes import MaybeBytes, Writeable
from pymap.interfaces.message import MessageInterface
from pymap.mime import MessageContent
from pymap.parsing.primitives import List, LiteralString, Nil, Number, QuotedString
from pymap.parsing.response.fetch import BodyStructure, EnvelopeStructure
from pymap.parsing.specials import FetchRequirement

__all__ = [
    "ExactBodyStructure",
    "ExactEnvelope",
    "ExactLoadedMessage",
    "Part",
    "body_structure",
    "envelope",
    "install",
    "parse",
]

MAX_DEPTH = 100
#: Parts of one message that are split out at most; past that the rest of a multipart is the
#: body of its last part. A message of a million boundary lines would otherwise cost seconds
#: of CPU and hundreds of MB to describe, on the mailbox process's event loop.
MAX_PARTS = 1000
MAX_HEADER_LINES = 10_000
_ADDRESS_FIELDS = ("from", "sender", "reply-to", "to", "cc", "bcc")
_BLANK_LINE = re.compile(rb"\n\r?\n")


# -- the MIME tree ----------------------------------------------------------------------------


@dataclass(eq=False)
class Part:
    """One MIME entity as offsets into ``data``: header ``[start, body_start)``, body
    ``[body_start, end)``. ``children`` for a multipart, ``message`` for message/rfc822."""

    data: bytes
    start: int
    body_start: int
    end: int
    fields: list[tuple[str, bytes]]
    maintype: bytes
    subtype: bytes
    params: list[tuple[bytes, bytes]]
    children: list[Part] | None = None
    message: Part | None = None

    @property
    def header(self) -> bytes:
        """The header block with its terminating blank line, as stored."""
        return self.data[self.start : self.body_start]

    @property
    def body(self) -> bytes:
        return self.data[self.body_start : self.end]

    @property
    def whole(self) -> bytes:
        return self.data[self.start : self.end]

    @property
    def size(self) -> int:
        return self.end - self.body_start

    @property
    def lines(self) -> int:
        return self.data.count(b"\n", self.body_start, self.end)

    @property
    def is_multipart(self) -> bool:
        return self.children is not None

    def last(self, name: str) -> bytes | None:
        """The raw value of the last field called ``name`` (lower case), or None."""
        found = None
        for key, value in self.fields:
            if key == name:
                found = value
        return found

    def all(self, name: str) -> list[bytes]:
        return [value for key, value in self.fields if key == name]


def _header_end(data: bytes, start: int, end: int) -> int:
    """Where the body starts: after the first empty line, or ``end`` when there is none."""
    if data.startswith(b"\r\n", start) and start + 2 <= end:
        return start + 2
    if data.startswith(b"\n", start) and start < end:
        return start + 1
    m = _BLANK_LINE.search(data, start, end)
    return end if m is None else m.end()


def _fields(block: bytes) -> list[tuple[str, bytes]]:
    """(lower-case name, raw value after the colon with its inner line breaks) for each field."""
    out: list[tuple[str, bytes]] = []
    name: str | None = None
    value: list[bytes] = []
    # Only the first MAX_HEADER_LINES lines are read for fields (the header's bytes are still
    # served whole): a "header" of a million lines must not cost a million fields.
    for line in block.split(b"\n", MAX_HEADER_LINES)[:MAX_HEADER_LINES]:
        if line[:1] in (b" ", b"\t"):
            if name is not None:
                value.append(b"\n" + line)
            continue
        if name is not None:
            out.append((name, b"".join(value).rstrip(b"\r")))
            name = None
        key, colon, rest = line.partition(b":")
        if not colon:
            continue
        name = key.rstrip(b" \t").decode("latin-1").lower()
        value = [rest]
    if name is not None:
        out.append((name, b"".join(value).rstrip(b"\r")))
    return out


def parse(data: bytes, *, dovecot_crlf: bool = False) -> Part:
    """The MIME tree of a whole message (never raises: what cannot be split stays a leaf).

    ``dovecot_crlf`` reproduces Dovecot's one departure from RFC 2046 (for comparisons only): it
    counts the line ending after a close delimiter into the multipart, and a base64
    message/rfc822 part up to the next delimiter line. pecd does not: that CRLF is the next
    delimiter's, so ``BODY[1.MIME]`` + ``BODY[1]`` of a multipart/signed is exactly the signed
    content, whose signature a client can check."""
    budget = [MAX_PARTS]
    return _parse_part(
        data, 0, len(data), len(data), 0, digest=False, compat=dovecot_crlf, budget=budget
    )


def _parse_part(
    data: bytes,
    start: int,
    end: int,
    limit: int,
    depth: int,
    *,
    digest: bool,
    compat: bool,
    budget: list[int],
) -> Part:
    """The entity in ``[start, end)``. With ``compat`` it may grow up to ``limit`` (the next
    delimiter line of the enclosing multipart), as Dovecot counts (see :func:`parse`).
    ``budget[0]``: how many more parts may be made (see ``MAX_PARTS``)."""
    budget[0] -= 1
    body_start = _header_end(data, start, end)
    fields = _fields(data[start:body_start])
    ctype = _last(fields, "content-type")
    if ctype is None:
        maintype, subtype = (b"message", b"rfc822") if digest else (b"text", b"plain")
        params: list[tuple[bytes, bytes]] = []
    else:
        maintype, subtype, raw_params = _parse_content_type(_unfold(ctype))
        params = _rfc2231(raw_params)
    part = Part(data, start, body_start, end, fields, maintype, subtype, params)
    if ctype is None and not digest:
        part.params = [(b"charset", b"us-ascii")]
    elif maintype.lower() == b"text" and not any(k.lower() == b"charset" for k, _ in params):
        part.params = [*params, (b"charset", b"us-ascii")]
    if depth >= MAX_DEPTH or budget[0] <= 0:
        return part
    kind = maintype.lower()
    if kind == b"multipart":
        boundary = next((v for k, v in params if k.lower() == b"boundary"), None)
        spans: list[tuple[int, int, int]] = []
        if boundary:
            spans, close_end = _split_multipart(
                data, body_start, end, limit, boundary, max_spans=budget[0]
            )
            if close_end is not None and compat:
                part.end = max(part.end, close_end)
        if not spans:
            spans = [(part.end, part.end, part.end)]
        is_digest = subtype.lower() == b"digest"
        part.children = [
            _parse_part(data, s, e, lim, depth + 1, digest=is_digest, compat=compat, budget=budget)
            for s, e, lim in spans
        ]
        part.end = max(part.end, part.children[-1].end)
    elif kind == b"message" and subtype.lower() == b"rfc822":
        if _encoding(part).lower() == b"base64":
            # Not entered (RFC 2046 allows only identity encodings here): an empty message.
            if compat:
                part.end = limit
            at = part.end
            part.message = _parse_part(
                data, at, at, at, depth + 1, digest=False, compat=compat, budget=budget
            )
        else:
            part.message = _parse_part(
                data, body_start, end, limit, depth + 1, digest=False, compat=compat, budget=budget
            )
            part.end = max(part.end, part.message.end)
    return part


def _last(fields: list[tuple[str, bytes]], name: str) -> bytes | None:
    found = None
    for key, value in fields:
        if key == name:
            found = value
    return found


def _split_multipart(
    data: bytes, start: int, end: int, limit: int, boundary: bytes, *, max_spans: int
) -> tuple[list[tuple[int, int, int]], int | None]:
    """(start, end, limit) of each body part between the delimiters of ``boundary``, and where
    the close delimiter line ends (None when there is none). After ``max_spans`` parts the
    rest, delimiters included, is the last part's (as if the close delimiter were missing)."""
    dash = b"--" + boundary
    spans: list[tuple[int, int, int]] = []
    part_start: int | None = None
    pos = start
    while True:
        at = data.find(dash, pos, end)
        if at < 0:
            break
        pos = at + 1
        if at > start and data[at - 1] != 0x0A:  # not at the start of a line
            continue
        nl = data.find(b"\n", at, limit)
        line_end = limit if nl < 0 else nl + 1
        rest = data[at + len(dash) : line_end].rstrip(b"\r\n").rstrip(b" \t")
        if rest not in (b"", b"--"):
            continue
        if part_start is not None:
            stop = at
            if at > start and data[at - 1] == 0x0A:
                stop = at - 1
                if stop > start and data[stop - 1] == 0x0D:
                    stop -= 1
            spans.append((part_start, max(part_start, stop), max(part_start, at)))
        if rest == b"--":
            return spans, line_end
        if len(spans) + 1 >= max(1, max_spans):
            spans.append((min(line_end, end), end, limit))
            return spans, None
        part_start = min(line_end, end)
        pos = part_start
    if part_start is not None:
        spans.append((part_start, end, limit))
    return spans, None


# -- structured header values -----------------------------------------------------------------


def _unfold(value: bytes) -> bytes:
    """The value without its line breaks, leading white space of the first line removed."""
    return value.lstrip(b" \t").replace(b"\r", b"").replace(b"\n", b"")


def _strip_comments(value: bytes) -> bytes:
    """``value`` with RFC 822 comments (nested, outside quoted strings) made one space."""
    out = bytearray()
    depth = 0
    quoted = False
    i = 0
    while i < len(value):
        c = value[i]
        if c == 0x5C and (quoted or depth) and i + 1 < len(value):  # backslash escape
            if not depth:
                out += value[i : i + 2]
            i += 2
            continue
        if quoted:
            out.append(c)
            if c == 0x22:
                quoted = False
        elif c == 0x28:  # (
            depth += 1
        elif c == 0x29 and depth:  # )
            depth -= 1
            if not depth:
                out.append(0x20)
        elif depth:
            pass
        else:
            out.append(c)
            if c == 0x22:
                quoted = True
        i += 1
    return bytes(out)


_WS = b" \t"


def _read_quoted(s: bytes, i: int) -> tuple[bytes, int]:
    """The unescaped content of the quoted string opening at ``s[i]``, and the index after it."""
    out = bytearray()
    i += 1
    while i < len(s):
        c = s[i]
        if c == 0x5C and i + 1 < len(s):
            out.append(s[i + 1])
            i += 2
            continue
        if c == 0x22:
            return bytes(out), i + 1
        out.append(c)
        i += 1
    return bytes(out), i


def _read_token(s: bytes, i: int, stops: bytes) -> tuple[bytes, int]:
    j = i
    while j < len(s) and s[j] not in stops and s[j] not in _WS:
        j += 1
    return s[i:j], j


def _skip_ws(s: bytes, i: int) -> int:
    while i < len(s) and s[i] in _WS:
        i += 1
    return i


def _parse_params(s: bytes, i: int) -> list[tuple[bytes, bytes]]:
    params: list[tuple[bytes, bytes]] = []
    while True:
        semi = s.find(b";", i)
        if semi < 0:
            return params
        i = _skip_ws(s, semi + 1)
        name, i = _read_token(s, i, b";=")
        i = _skip_ws(s, i)
        if not name or i >= len(s) or s[i] != 0x3D:  # no "="
            continue
        i = _skip_ws(s, i + 1)
        if i < len(s) and s[i] == 0x22:
            value, i = _read_quoted(s, i)
        else:
            value, i = _read_token(s, i, b";")
        params.append((name, value))


def _parse_content_type(value: bytes) -> tuple[bytes, bytes, list[tuple[bytes, bytes]]]:
    s = _strip_comments(value)
    i = _skip_ws(s, 0)
    maintype, i = _read_token(s, i, b"/;")
    i = _skip_ws(s, i)
    subtype = b""
    if i < len(s) and s[i] == 0x2F:  # /
        subtype, i = _read_token(s, _skip_ws(s, i + 1), b";")
    return maintype, subtype, _parse_params(s, i)


def _parse_disposition(value: bytes) -> tuple[bytes, list[tuple[bytes, bytes]]]:
    s = _strip_comments(value)
    kind, i = _read_token(s, _skip_ws(s, 0), b";")
    return kind, _rfc2231(_parse_params(s, i))


_SECTION = re.compile(rb"^(.*?)\*([0-9]+)(\*?)$|^(.*?)(\*)$", re.S)


def _rfc2231(params: list[tuple[bytes, bytes]]) -> list[tuple[bytes, bytes]]:
    """RFC 2231 continuations joined, as Dovecot does (see the module docstring)."""
    plain: list[tuple[bytes, bytes]] = []
    extended: list[tuple[bytes, int, bool, bytes]] = []
    for name, value in params:
        m = _SECTION.match(name) if b"*" in name else None
        if m is None:
            plain.append((name, value))
        elif m.group(1) is not None:
            extended.append((m.group(1), int(m.group(2)), bool(m.group(3)), value))
        else:
            extended.append((m.group(4), 0, True, value))
    if not extended:
        return plain
    extended.sort(key=lambda e: (e[0].lower(), e[1]))
    merged: list[tuple[bytes, bytes]] = []
    i = 0
    while i < len(extended):
        name, _index, encoded, value = extended[i]
        pieces = [value]
        j = i + 1
        while j < len(extended) and extended[j][0].lower() == name.lower():
            piece = extended[j][3]
            if encoded and not extended[j][2]:
                piece = b"".join(bytes([c]) if _attr_char(c) else b"%%%02X" % c for c in piece)
            pieces.append(piece)
            j += 1
        merged.append((name + (b"*" if encoded else b""), b"".join(pieces)))
        i = j
    return plain + merged


def _attr_char(c: int) -> bool:
    return 0x20 < c < 0x7F and c not in b"*'%()<>@,;:\\\"/[]?="


def _encoding(part: Part) -> bytes:
    raw = part.last("content-transfer-encoding")
    if raw is None:
        return b"7bit"
    words = _strip_comments(_unfold(raw)).split()
    return words[0] if words else b"7bit"


def _language(part: Part) -> list[bytes] | None:
    raw = part.last("content-language")
    if raw is None:
        return None
    tags = [t.strip(b" \t") for t in _strip_comments(_unfold(raw)).split(b",")]
    return [t for t in tags if t] or None


# -- IMAP strings -----------------------------------------------------------------------------


def _string(value: bytes) -> QuotedString | LiteralString:
    if len(value) < 1024 and all(0 < c < 0x80 and c not in (0x0D, 0x0A) for c in value):
        return QuotedString(value)
    return LiteralString(value)


def _nstring(value: bytes | None) -> MaybeBytes:
    return Nil() if value is None else _string(value)


def for_humans(value: bytes) -> bytes:
    """White space (SP, HTAB, CR, LF) trimmed and each run made one space; NUL made 0x80."""
    return b" ".join(value.replace(b"\x00", b"\x80").split())


def _nolf(value: bytes) -> bytes:
    return value.replace(b"\r", b"").replace(b"\n", b"")


def _params_list(params: list[tuple[bytes, bytes]]) -> MaybeBytes:
    if not params:
        return Nil()
    return List([_string(item) for pair in params for item in pair])


# -- addresses --------------------------------------------------------------------------------

Address = tuple[bytes | None, bytes | None, bytes | None, bytes | None]
_MISSING_MAILBOX = b"MISSING_MAILBOX"
_MISSING_DOMAIN = b"MISSING_DOMAIN"
_SPECIALS = b"<>@,;:[]"


def _tokens(value: bytes) -> list[tuple[str, bytes]]:
    """RFC 5322 lexical tokens: ("atom"|"qs"|"comment"|"dlit"|"sp", text). Dots stay in atoms."""
    out: list[tuple[str, bytes]] = []
    i = 0
    n = len(value)
    while i < n:
        c = value[i]
        if c in b" \t\r\n":
            i += 1
        elif c == 0x22:
            text, i = _read_quoted(value, i)
            out.append(("qs", text))
        elif c == 0x28:
            depth = 0
            j = i
            buf = bytearray()
            while j < n:
                d = value[j]
                if d == 0x5C and j + 1 < n:
                    buf.append(value[j + 1])
                    j += 2
                    continue
                if d == 0x28:
                    depth += 1
                    if depth > 1:
                        buf.append(d)
                elif d == 0x29:
                    depth -= 1
                    if depth == 0:
                        j += 1
                        break
                    buf.append(d)
                else:
                    buf.append(d)
                j += 1
            out.append(("comment", bytes(buf)))
            i = j
        elif c == 0x5B:  # [ domain literal
            j = value.find(b"]", i)
            j = n if j < 0 else j + 1
            out.append(("dlit", value[i:j]))
            i = j
        elif c in _SPECIALS:
            out.append(("sp", bytes([c])))
            i += 1
        else:
            j = i
            while j < n and value[j] not in b' \t\r\n"()[' and value[j] not in _SPECIALS:
                j += 1
            out.append(("atom", value[i:j]))
            i = j
    return out


class _AddressParser:
    def __init__(self, value: bytes) -> None:
        self.toks = _tokens(value)
        self.i = 0

    def peek(self) -> tuple[str, bytes] | None:
        return self.toks[self.i] if self.i < len(self.toks) else None

    def at_special(self, chars: bytes) -> bool:
        tok = self.peek()
        return tok is not None and tok[0] == "sp" and tok[1] in [bytes([c]) for c in chars]

    def parse(self) -> list[Address]:
        out: list[Address] = []
        while self.peek() is not None:
            if self.at_special(b","):
                out.append((None, None, _MISSING_MAILBOX, _MISSING_DOMAIN))
                self.i += 1
                continue
            self.address(out, in_group=False)
            if self.at_special(b",;"):
                self.i += 1
        return out

    def address(self, out: list[Address], *, in_group: bool) -> None:
        words: list[bytes] = []
        comments: list[bytes] = []
        while (tok := self.peek()) is not None and tok[0] != "sp":
            (comments if tok[0] == "comment" else words).append(tok[1])
            self.i += 1
        if self.at_special(b"<"):
            self.i += 1
            name = b" ".join(words) if words else None
            out.append(self.angle(name))
            self.skip_to(b",;" if in_group else b",")
            return
        if self.at_special(b":") and not in_group:
            self.i += 1
            out.append((None, None, b" ".join(words), None))
            while self.peek() is not None and not self.at_special(b";"):
                if self.at_special(b","):
                    self.i += 1
                    continue
                self.address(out, in_group=True)
            if self.at_special(b";"):
                self.i += 1
            out.append((None, None, None, None))
            return
        local = b"".join(words)
        domain: bytes | None = None
        if self.at_special(b"@"):
            self.i += 1
            domain, more = self.domain(b",;>" if in_group else b",>")
            comments += more
        self.skip_to(b",;" if in_group else b",")
        name = comments[0] if comments else None
        out.append((name, None, local or _MISSING_MAILBOX, domain or _MISSING_DOMAIN))

    def domain(self, stops: bytes) -> tuple[bytes, list[bytes]]:
        parts: list[bytes] = []
        comments: list[bytes] = []
        while (tok := self.peek()) is not None:
            if tok[0] == "sp" and tok[1][0] in stops:
                break
            if tok[0] == "comment":
                comments.append(tok[1])
            elif tok[0] in ("atom", "dlit") or tok[1] == b".":
                parts.append(tok[1])
            else:
                break
            self.i += 1
        return b"".join(parts), comments

    def angle(self, name: bytes | None) -> Address:
        route: list[bytes] = []
        while self.at_special(b"@"):
            self.i += 1
            dom, _ = self.domain(b",:>")
            route.append(b"@" + dom)
            if self.at_special(b","):
                self.i += 1
        if route and self.at_special(b":"):
            self.i += 1
        words: list[bytes] = []
        while (tok := self.peek()) is not None and tok[0] != "sp":
            if tok[0] != "comment":
                words.append(tok[1])
            self.i += 1
        local = b"".join(words)
        domain: bytes | None = None
        if self.at_special(b"@"):
            self.i += 1
            domain, _ = self.domain(b">,;")
        adl = b",".join(route) if route else None
        if not self.at_special(b">"):
            return (name, adl, local or _MISSING_MAILBOX, b"SYNTAX_ERROR")
        self.i += 1
        return (name, adl, local or _MISSING_MAILBOX, domain or _MISSING_DOMAIN)

    def skip_to(self, stops: bytes) -> None:
        while self.peek() is not None and not self.at_special(stops):
            self.i += 1


def parse_addresses(values: Sequence[bytes]) -> list[Address]:
    """The addresses of every occurrence of an address field, concatenated."""
    out: list[Address] = []
    for value in values:
        out += _AddressParser(_unfold(value)).parse()
    return out


def _address_list(addresses: list[Address]) -> MaybeBytes:
    if not addresses:
        return Nil()
    items: list[MaybeBytes] = []
    for name, adl, mailbox, host in addresses:
        items.append(
            List(
                [
                    Nil() if name is None else _string(for_humans(name)),
                    _nstring(adl),
                    _nstring(mailbox),
                    _nstring(host),
                ]
            )
        )
    return _Joined(items)


class _Joined(Writeable):
    """A parenthesised list with no separators between items (address lists, body parts)."""

    def __init__(self, items: Sequence[MaybeBytes], tail: Sequence[MaybeBytes] = ()) -> None:
        self.items = items
        self.tail = tail

    def __bytes__(self) -> bytes:
        out = b"(" + b"".join(bytes(i) for i in self.items)
        if self.tail:
            out += b" " + b" ".join(bytes(i) for i in self.tail)
        return out + b")"


# -- the FETCH structures ---------------------------------------------------------------------


def envelope(part: Part) -> Writeable:
    """The RFC 3501 ENVELOPE of a message (the top-level one or an encapsulated one)."""
    date = part.last("date")
    subject = part.last("subject")
    addresses = {name: parse_addresses(part.all(name)) for name in _ADDRESS_FIELDS}
    for name in ("sender", "reply-to"):
        if not addresses[name]:
            addresses[name] = addresses["from"]
    in_reply_to = part.last("in-reply-to")
    message_id = part.last("message-id")
    return List(
        [
            Nil() if date is None else _string(_nolf(date.lstrip(_WS))),
            Nil() if subject is None else _string(for_humans(subject)),
            *(_address_list(addresses[name]) for name in _ADDRESS_FIELDS),
            Nil() if in_reply_to is None else _string(_nolf(in_reply_to.lstrip(_WS))),
            Nil() if message_id is None else _string(_nolf(message_id.lstrip(_WS))),
        ]
    )


def _extension(part: Part) -> list[MaybeBytes]:
    """body-fld-dsp, body-fld-lang, body-fld-loc."""
    raw = part.last("content-disposition")
    dsp: MaybeBytes = Nil()
    if raw is not None:
        kind, params = _parse_disposition(_unfold(raw))
        dsp = List([_string(kind), _params_list(params)])
    lang = _language(part)
    loc = part.last("content-location")
    return [
        dsp,
        Nil() if lang is None else List([_string(t) for t in lang]),
        Nil() if loc is None else _string(_nolf(loc.lstrip(_WS))),
    ]


def body_structure(part: Part, *, extended: bool) -> MaybeBytes:
    """BODYSTRUCTURE (``extended``) or BODY of a part, as RFC 3501 7.4.2 defines them."""
    if part.children is not None:
        tail: list[MaybeBytes] = [_string(part.subtype)]
        if extended:
            tail += [_params_list(part.params), *_extension(part)]
        return _Joined([body_structure(c, extended=extended) for c in part.children], tail)
    cid = part.last("content-id")
    desc = part.last("content-description")
    fields: list[MaybeBytes] = [
        _string(part.maintype),
        _string(part.subtype),
        _params_list(part.params),
        Nil() if cid is None else _string(_nolf(cid.lstrip(_WS))),
        Nil() if desc is None else _string(_nolf(desc.lstrip(_WS))),
        _string(_encoding(part)),
        Number(part.size),
    ]
    if part.message is not None:
        fields += [
            envelope(part.message),
            body_structure(part.message, extended=extended),
            Number(part.lines),
        ]
    elif part.maintype.lower() == b"text":
        fields.append(Number(part.lines))
    if extended:
        fields += [Nil(), *_extension(part)]
    return List(fields)


def find(root: Part, section: Sequence[int] | None) -> Part | None:
    """The part a section number names (RFC 3501 6.4.5), or None when there is none."""
    if not section:
        return root
    cur = root
    kids = root.children if root.children is not None else [root]
    for n in section:
        if not 1 <= n <= len(kids):
            return None
        cur = kids[n - 1]
        if cur.children is not None:
            kids = cur.children
        elif cur.message is not None:
            inner = cur.message
            kids = inner.children if inner.children is not None else [inner]
        else:
            kids = [cur]
    return cur


def header_fields(part: Part, subset: Collection[bytes], *, inverse: bool) -> bytes:
    """The fields of ``part``'s header named (or, ``inverse``, not named) in ``subset``."""
    wanted = {s.upper() for s in subset}
    out: list[bytes] = []
    block = part.header
    starts = [0] + [m.end() for m in re.finditer(rb"\n(?=[^ \t])", block)]
    for i, s in enumerate(starts):
        chunk = block[s : starts[i + 1] if i + 1 < len(starts) else len(block)]
        name, colon, _ = chunk.partition(b":")
        if not colon:
            continue
        if (name.rstrip(b" \t").upper() in wanted) != inverse:
            if not chunk.endswith(b"\n"):
                chunk += b"\r\n"
            out.append(chunk)
    return b"".join(out) + b"\r\n"


# -- pymap objects ----------------------------------------------------------------------------


class ExactBodyStructure(BodyStructure):
    """pymap's BodyStructure role (``bytes()`` is BODY, ``extended`` is BODYSTRUCTURE)."""

    def __init__(self, part: Part) -> None:
        super().__init__(
            part.maintype.decode("latin-1"), part.subtype.decode("latin-1"), None, None, None, None
        )
        self.part = part

    @property
    def _value(self) -> List:
        value = body_structure(self.part, extended=False)
        return _AsList(value)

    @property
    def extended(self) -> List:
        return _AsList(body_structure(self.part, extended=True))


class _AsList(List):
    """A prebuilt structure in pymap's List type (what its FETCH code expects)."""

    def __init__(self, value: MaybeBytes) -> None:
        super().__init__([])
        self._raw = bytes(value)

    def __bytes__(self) -> bytes:
        return self._raw

    def write(self, writer: Any) -> None:
        writer.write(self._raw)


class ExactEnvelope(EnvelopeStructure):
    """pymap's EnvelopeStructure: its attributes (used by SEARCH) from pymap's own parse, its
    bytes (FETCH ENVELOPE) from :func:`envelope`."""

    def __init__(self, base: EnvelopeStructure, part: Part) -> None:
        super().__init__(
            base.date,
            base.subject,
            base.from_,
            base.sender,
            base.reply_to,
            base.to,
            base.cc,
            base.bcc,
            base.in_reply_to,
            base.message_id,
        )
        self.part = part

    @property
    def _value(self) -> Writeable:
        return envelope(self.part)


class ExactLoadedMessage(LoadedMessage):
    """pymap's loaded message answering FETCH from the stored bytes (see the module docstring).

    pymap's own parse (:class:`MessageContent`) is still made, lazily, for what is not about
    structure: SEARCH, header lookups, BINARY.
    """

    def __init__(
        self, message: MessageInterface, requirement: FetchRequirement, raw: bytes | None
    ) -> None:
        super().__init__(message, requirement, None)
        self._raw = raw
        self._tree: Part | None = None

    @property
    def content(self) -> MessageContent:
        if self._content is None and self._raw is not None:
            self._content = MessageContent.parse(self._raw)
        return super().content

    @property
    def tree(self) -> Part | None:
        if self._tree is None and self._raw is not None:
            self._tree = parse(self._raw)
        return self._tree

    def __bytes__(self) -> bytes:
        return self._raw if self._raw is not None else b""

    def _find(self, section: Sequence[int] | None) -> Part | None:
        tree = self.tree
        return None if tree is None else find(tree, section)

    def get_headers(self, section: Sequence[int]) -> Writeable:
        part = self._find(section)
        return Writeable.wrap(part.header if part is not None else b"")

    def get_body(self, section: Sequence[int] | None = None, binary: bool = False) -> Writeable:
        if binary:
            return super().get_body(section, binary)
        part = self._find(section)
        if part is None:
            return Writeable.empty()
        return Writeable.wrap(part.body if section else part.whole)

    def _message_of(self, section: Sequence[int] | None) -> Part | None:
        part = self._find(section)
        if part is None or not section:
            return part
        return part.message

    def get_message_headers(
        self,
        section: Sequence[int] | None = None,
        subset: Collection[bytes] | None = None,
        inverse: bool = False,
    ) -> Writeable:
        msg = self._message_of(section)
        if msg is None:
            return Writeable.empty()
        if subset is None:
            return Writeable.wrap(msg.header)
        return Writeable.wrap(header_fields(msg, subset, inverse=inverse))

    def get_message_text(self, section: Sequence[int] | None = None) -> Writeable:
        msg = self._message_of(section)
        return Writeable.empty() if msg is None else Writeable.wrap(msg.body)

    def get_size(self, section: Sequence[int] | None = None) -> int:
        if not section:
            return len(self._raw) if self._raw is not None else 0
        part = self._find(section)
        return 0 if part is None else part.end - part.start

    def get_envelope_structure(self) -> EnvelopeStructure:
        tree = self.tree
        base = super().get_envelope_structure()
        return base if tree is None else ExactEnvelope(base, tree)

    def get_body_structure(self) -> BodyStructure:
        tree = self.tree
        return super().get_body_structure() if tree is None else ExactBodyStructure(tree)


async def _load_exact_content(self: Message, requirement: FetchRequirement) -> LoadedMessage:
    # pymap's Message.load_content, with the loaded message answering from the exact bytes.
    maildir, key = self._maildir, self._key
    if key is None or maildir is None or requirement.has_none(FetchRequirement.CONTENT):
        return ExactLoadedMessage(self, requirement, None)
    try:
        # In a worker thread: a message may be up to the largest size accepted (100 MB), and
        # reading it must not hold the event loop every other session shares.
        raw = await asyncio.to_thread(lambda: bytes(maildir.get_message(key)))
    except (KeyError, FileNotFoundError):
        return ExactLoadedMessage(self, requirement, None)
    return ExactLoadedMessage(self, requirement, raw)


def install() -> None:
    """Make pymap's maildir ``Message`` load :class:`ExactLoadedMessage` (idempotent).

    pymap builds its ``Message`` objects in many places of its ``MailboxData`` through the class
    name, so the one method that loads content is replaced on the class rather than each of those
    places being overridden."""
    Message.load_content = _load_exact_content  # type: ignore[method-assign]
