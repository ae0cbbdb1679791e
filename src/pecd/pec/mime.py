"""Byte-preserving helpers over raw RFC 5322 messages: header lookup, rewriting, MIME part building."""

from __future__ import annotations

import binascii
import email
import email.header
import email.utils
import functools
import re
import secrets
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from email.parser import BytesHeaderParser
from email.policy import compat32
from email.utils import formataddr

CRLF = b"\r\n"
# The blank line that ends a header block is the first "\r?\n\r?\n". The pattern is searched from
# its second byte, the first "\n" (a leading literal the regex engine skips to quickly, where an
# optional "\r" first makes it try every position): a CR just before that "\n" belongs to it.
_BLANK_LINE = re.compile(rb"\n\r?\n")
# A field starts at the beginning of a line that is not a continuation (not SP/HTAB): the first
# line, or after a "\n" (the same leading-literal reason as above).
_FIELD_NAME = rb"[!-9;-~]+[ \t]*:"
_FIELD_FIRST = re.compile(_FIELD_NAME)
_FIELD_NEXT = re.compile(rb"\n(?=" + _FIELD_NAME + rb")")
_FOLD = re.compile(r"\r?\n[ \t]")
_LONE_LF = re.compile(rb"(?<!\r)\n")
# Header text pecd writes into what it signs: no C0 control but TAB, no DEL (spec 2.1; XML 1.0
# forbids most of them in daticert too). Line breaks become one space, the rest is dropped.
_LINE_BREAKS = re.compile("[\r\n]+")
_CONTROLS = re.compile("[\x00-\x08\x0b-\x1f\x7f]")
_ESCAPED_BYTES = re.compile("[\udc80-\udcff]+")
_SURROGATES = re.compile("[\ud800-\udfff]")
# The same in a raw field copied byte for byte: controls dropped, CR/LF kept only as folding.
_FIELD_CONTROLS = re.compile(rb"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f]|\r(?!\n)")
_BARE_LINE = re.compile(rb"\r\n(?![ \t]|\Z)")

Buffer = bytes | memoryview


def to_crlf(data: bytes) -> bytes:
    """Canonical line endings (every lone LF becomes CRLF), as S/MIME signing requires.

    Data that is CRLF already (what SMTP delivers) comes back as the same object, no copy."""
    if data.count(b"\n") == data.count(b"\r\n"):
        return data
    return _LONE_LF.sub(b"\r\n", data)


def head_end(raw: Buffer) -> tuple[int, int] | None:
    """Where the blank line after the header block starts and where the body starts (the span of
    the first ``\r?\n\r?\n``), or None when there is no blank line."""
    m = _BLANK_LINE.search(raw)
    if m is None:
        return None
    start = m.start()
    return (start - 1 if start and raw[start - 1] == 13 else start), m.end()  # 13: "\r"


def head_of(raw: bytes) -> bytes:
    """The header block of ``raw`` without the blank line (all of it when there is none)."""
    end = head_end(raw)
    return raw if end is None else raw[: end[0]]


def header_fields(head: bytes) -> list[tuple[str, bytes]]:
    """Each header field as (name, its raw bytes including continuation lines and line ending)."""
    if len(head) <= _CACHED_HEAD:
        return list(_header_fields_cached(head))
    return _header_fields(head)


# A message's header block is read many times over (each field looked up, by several builders
# and by classify): the last few blocks are kept split. A long block is split each time.
_CACHED_HEAD = 16384


@functools.lru_cache(maxsize=32)
def _header_fields_cached(head: bytes) -> tuple[tuple[str, bytes], ...]:
    return tuple(_header_fields(head))


def _field_starts(head: bytes) -> list[int]:
    starts = [m.end() for m in _FIELD_NEXT.finditer(head)]
    if _FIELD_FIRST.match(head):
        starts.insert(0, 0)
    return starts


def _header_fields(head: bytes) -> list[tuple[str, bytes]]:
    fields: list[tuple[str, bytes]] = []
    starts = _field_starts(head)
    for start, end in zip(starts, [*starts[1:], len(head)], strict=False):
        chunk = head[start:end]
        name = chunk.split(b":", 1)[0].strip().decode("ascii", "replace")
        fields.append((name, chunk))
    return fields


def _unfold(raw_field: bytes) -> str:
    value = raw_field.split(b":", 1)[1]
    text = value.decode("utf-8", "replace")
    return _FOLD.sub(" ", text).strip()


def get_all(raw: bytes, name: str) -> list[str]:
    """Unfolded raw values of every field called ``name`` (any letter case) in the top header block."""
    wanted = name.lower()
    return [_unfold(chunk) for n, chunk in header_fields(head_of(raw)) if n.lower() == wanted]


def get_first(raw: bytes, name: str) -> str | None:
    values = get_all(raw, name)
    return values[0] if values else None


class Headers:
    """The top header block of one message, split once, for code that reads several of its fields:
    each :func:`get_all` splits the block again. Lookups give what :func:`get_all` and
    :func:`get_first` give on the same message."""

    __slots__ = ("_by_name", "fields")

    def __init__(self, raw: bytes) -> None:
        # Not through the cache of header_fields: one split per message is the point here, and a
        # new message's block would only push another's out of the cache.
        self.fields: list[tuple[str, bytes]] = _header_fields(head_of(raw))
        by_name: dict[str, list[bytes]] = {}
        for name, chunk in self.fields:
            by_name.setdefault(name.lower(), []).append(chunk)
        self._by_name = by_name

    def get_all(self, name: str) -> list[str]:
        return [_unfold(chunk) for chunk in self._by_name.get(name.lower(), ())]

    def get_first(self, name: str) -> str | None:
        chunks = self._by_name.get(name.lower())
        return _unfold(chunks[0]) if chunks else None

    def has(self, name: str) -> bool:
        return name.lower() in self._by_name


def unsurrogate(text: str) -> str:
    """``text`` with no lone surrogate, so that it can always be encoded.

    Bytes smuggled in by ``surrogateescape`` come back as UTF-8 where they are UTF-8; any other
    lone surrogate (a UTF-7 or ``unicode-escape`` encoded word can make one) becomes U+FFFD."""
    if not _SURROGATES.search(text):
        return text
    text = _ESCAPED_BYTES.sub(
        lambda m: m.group().encode("utf-8", "surrogateescape").decode("utf-8", "replace"), text
    )
    return _SURROGATES.sub("\ufffd", text)


def clean_header_text(text: str) -> str:
    """Text copied from a message into a header or a daticert pecd signs, made harmless.

    Line breaks become one space (no header injection), other C0 controls but TAB and DEL are
    dropped (a NUL must never reach a signed header, a database or the XML), lone surrogates
    become U+FFFD. Every builder passes what it copies through here."""
    if text.isprintable():
        # No line break, control or surrogate (none is printable): nothing to do.
        return text
    text = unsurrogate(text)
    return _CONTROLS.sub("", _LINE_BREAKS.sub(" ", text))


def clean_field(chunk: bytes) -> bytes:
    """A raw header field (CRLF) copied byte for byte, less what :func:`clean_header_text` drops:
    controls go, and a line that is not a continuation is folded (it would start a new field)."""
    chunk = _FIELD_CONTROLS.sub(b"", chunk)
    return _BARE_LINE.sub(b"\r\n ", chunk)


def decode_words(value: str) -> str:
    """Decode RFC 2047 encoded words; undecodable input comes back as it was. The result never
    holds a lone surrogate (:func:`unsurrogate`); controls are the caller's to clean."""
    if "=?" not in value:
        # No encoded word can start: the stdlib would give the text back as it is, through a
        # Header object that costs more than the rest of a submission's header reading.
        return unsurrogate(value)
    try:
        decoded = str(email.header.make_header(email.header.decode_header(value)))
    except (LookupError, ValueError, UnicodeError, AssertionError):
        decoded = value
    return unsurrogate(decoded)


def encode_header_text(name: str, text: str) -> str:
    """A header value for ``text``: plain when short ASCII, else folded RFC 2047 UTF-8 words.

    The text is cleaned first (:func:`clean_header_text`)."""
    text = clean_header_text(text)
    if text.isascii() and len(name) + len(text) < 76:
        return text
    charset = (
        "us-ascii" if text.isascii() and max(map(len, text.split(" ") or [""])) < 70 else "utf-8"
    )
    return email.header.Header(text, charset, header_name=name).encode(linesep="\r\n")


def format_mailbox(display: str, address: str) -> str:
    """``"display" <address>`` with quoting or RFC 2047 as needed; both cleaned first."""
    return formataddr((clean_header_text(display), clean_header_text(address)), charset="utf-8")


def copy_fields(raw: bytes | Headers, names: Iterable[str]) -> list[bytes]:
    """The raw fields of the top header block whose names are in ``names``, in original order, CRLF,
    unchanged but for the controls :func:`clean_field` drops (nothing, in a well-formed field)."""
    wanted = {n.lower() for n in names}
    out = []
    fields = raw.fields if isinstance(raw, Headers) else header_fields(head_of(raw))
    for name, chunk in fields:
        if name.lower() in wanted:
            chunk = to_crlf(chunk)
            chunk = chunk if chunk.endswith(CRLF) else chunk + CRLF
            out.append(clean_field(chunk))
    return out


def replace_fields(raw: bytes, drop: Iterable[str], append: Sequence[tuple[str, str]]) -> bytes:
    """``raw`` in CRLF with the fields named in ``drop`` removed and ``append`` added at the header end.

    Everything else stays byte for byte (bar line endings): this is how the wrapped original keeps its
    headers while its Message-ID becomes the PEC msgid.
    """
    dropped = {n.lower() for n in drop}
    raw = to_crlf(raw)
    cut = raw.find(b"\r\n\r\n")
    # The body is not sliced out (a copy of a whole message): the join below reads it in place.
    head, rest = (raw, CRLF) if cut < 0 else (raw[: cut + 2], memoryview(raw)[cut + 2 :])
    if not head.endswith(CRLF):
        head += CRLF
    kept = [chunk for name, chunk in header_fields(head) if name.lower() not in dropped]
    # Anything before the first field (garbage) is kept as it was, ahead of the fields.
    starts = _field_starts(head)
    prefix = head[: starts[0]] if starts else head
    added = [f"{n}: {v}".encode() + CRLF for n, v in append]
    return b"".join([prefix, *kept, *added, rest])


def new_boundary(*contents: bytes) -> str:
    """A random boundary that occurs in none of ``contents``."""
    while True:
        b = f"----=_pecd_{secrets.token_hex(16)}"
        if not any(b.encode() in c for c in contents):
            return b


def qp_text_part(content_type: str, text: str) -> bytes:
    """A text part in ISO-8859-1 quoted-printable (the rules' charset); UTF-8 when Latin-1 cannot hold it."""
    if "\r" not in text and "\n" in text:
        # What pecd writes: LF line ends, no CR. A text that encodes as it is holds no lone
        # surrogate (unsurrogate would give it back unchanged), every LF is lone (so the
        # conversion below is to_crlf's), and with CRLF before its first LF b2a_qp writes only
        # CRLF line ends, soft breaks included: the output is CRLF already.
        try:
            data, charset = text.encode("iso-8859-1"), "iso-8859-1"
        except UnicodeEncodeError:
            try:
                data, charset = text.encode("utf-8"), "utf-8"
            except UnicodeEncodeError:
                return _qp_text_part(content_type, text)
        return _qp_head(content_type, charset) + binascii.b2a_qp(data.replace(b"\n", b"\r\n"))
    return _qp_text_part(content_type, text)


def _qp_text_part(content_type: str, text: str) -> bytes:
    # Any text: CR, lone surrogates, no line end at all.
    text = unsurrogate(text)
    try:
        data, charset = text.encode("iso-8859-1"), "iso-8859-1"
    except UnicodeEncodeError:
        data, charset = text.encode("utf-8"), "utf-8"
    body = binascii.b2a_qp(to_crlf(data.replace(b"\r\n", b"\n")))
    return _qp_head(content_type, charset) + to_crlf(body)


@functools.lru_cache(maxsize=16)
def _qp_head(content_type: str, charset: str) -> bytes:
    return (
        f'Content-Type: {content_type}; charset="{charset}"\r\n'
        "Content-Transfer-Encoding: quoted-printable\r\n\r\n"
    ).encode()


def base64_lines(data: bytes) -> bytes:
    """``data`` in base64, lines of 76 characters each ended by CRLF (``base64.encodebytes`` in
    CRLF), encoded in one call: every 57 bytes make one whole line, padding comes only at the end."""
    if not data:
        return b""
    encoded = binascii.b2a_base64(data, newline=False)
    return b"\r\n".join([encoded[i : i + 76] for i in range(0, len(encoded), 76)]) + CRLF


def base64_part(headers: Sequence[str], data: bytes) -> bytes:
    head = "".join(h + "\r\n" for h in headers)
    return (head + "Content-Transfer-Encoding: base64\r\n\r\n").encode() + base64_lines(data)


def rfc822_part(filename: str, message: bytes) -> bytes:
    """A ``message/rfc822`` part; 7bit when the message is ASCII, else 8bit (RFC 2046 allows no other)."""
    # One join, one copy of the message.
    return b"".join(rfc822_pieces(filename, message))


def rfc822_pieces(filename: str, message: bytes) -> list[bytes]:
    """:func:`rfc822_part` as the pieces that join into it: its head, the message in CRLF, and a
    CRLF when the message does not end with one. A caller that joins them into something larger
    copies the message once, there."""
    message = to_crlf(message)
    head = _rfc822_head(filename, "7bit" if message.isascii() else "8bit")
    return [head, message] if message.endswith(CRLF) else [head, message, CRLF]


@functools.lru_cache(maxsize=16)
def _rfc822_head(filename: str, cte: str) -> bytes:
    return (
        f'Content-Type: message/rfc822; name="{filename}"\r\n'
        f"Content-Transfer-Encoding: {cte}\r\n"
        f'Content-Disposition: inline; filename="{filename}"\r\n\r\n'
    ).encode()


def multipart(subtype: str, parts: Sequence[bytes]) -> bytes:
    """A ``multipart/<subtype>`` entity (headers + body) around already-built parts."""
    boundary = new_boundary(*parts)
    out = [f'Content-Type: multipart/{subtype}; boundary="{boundary}"\r\n\r\n'.encode()]
    for part in parts:
        out.append(f"--{boundary}\r\n".encode())
        # The CRLF before a delimiter belongs to the delimiter: adding one keeps each part's own
        # final line ending, so a wrapped message comes back out byte for byte. (Appended, not
        # concatenated: a part may be a whole message, and the join below copies it once.)
        out += [part, CRLF]
    out.append(f"--{boundary}--\r\n".encode())
    return b"".join(out)


# --- a byte-exact MIME tree ---------------------------------------------------------------------

MAX_DEPTH = 32


@dataclass
class Entity:
    """One MIME entity with its exact bytes: ``head`` and ``body`` slice the original.

    The body is kept as a view into the parsed message (``view``): a tree of nested parts costs no
    copy of them, however large. ``body`` makes the bytes of one part when they are asked for.
    """

    head: bytes
    view: memoryview
    content_type: str
    params: dict[str, str]
    filename: str | None
    children: list[Entity] = field(default_factory=list)

    @property
    def body(self) -> bytes:
        """The body's bytes (a new copy at each access)."""
        return self.view.tobytes()

    def walk(self, *, into_messages: bool = False) -> Iterator[Entity]:
        """This entity and its descendants; wrapped messages are not entered unless asked."""
        yield self
        if self.content_type == "message/rfc822" and not into_messages:
            return
        for child in self.children:
            yield from child.walk(into_messages=into_messages)


_HEADER_PARSER = BytesHeaderParser(policy=compat32)


def _params(head: bytes) -> tuple[str, dict[str, str], str | None]:
    head = _param_fields(head)
    if len(head) > _CACHED_PART_HEAD:
        ctype, params, fname = _read_params(head)
    else:
        # Most part headers repeat from one message to the next (the text parts, daticert.xml,
        # postacert.eml as pecd and other providers write them): read once.
        ctype, params, fname = _read_multipart_params(head) or _read_params_cached(head)
    return ctype, dict(params), fname


# What the stdlib's header parser takes for the first line of a field: a name and its colon, no
# white space between. (Lines are found from their "\n", a literal the regex engine skips to.)
_FEED_FIELD = re.compile(rb"[\x21-\x39\x3b-\x7e]+:")
_NOT_FEED_LINE = re.compile(rb"\n(?![ \t]|[\x21-\x39\x3b-\x7e]+:)")
_PARAM_FIELD = re.compile(
    rb"\n((?:content-type|content-disposition):[^\n]*(?:\n[ \t][^\n]*)*)", re.IGNORECASE
)


def _param_fields(head: bytes) -> bytes:
    """The Content-Type and Content-Disposition fields of ``head``, all that :func:`_read_params`
    reads: a message's whole header block reads as slowly as it is long, and is never the same
    twice (Received, Message-ID), where these two fields alone often are.

    Only where the stdlib parser would take every line for a field or its continuation: no CR but
    in CRLF, the first line a name and its colon, every other one that or a continuation; then it
    reads each field on its own, and the others can go. Else ``head`` as it is."""
    if (
        head.count(b"\r") != head.count(b"\r\n")
        or _FEED_FIELD.match(head) is None
        or _NOT_FEED_LINE.search(head) is not None
    ):
        return head
    kept = b"\n".join(m.group(1) for m in _PARAM_FIELD.finditer(b"\n" + head))
    # The last line of a head has no line ending.
    return kept[:-1] if kept.endswith(b"\r") else kept


_CACHED_PART_HEAD = 1024
# A multipart head differs from one message to the next only by its boundary, new and random in
# each: read with a fixed stand-in for the boundary, such heads are read once too. The swap is
# made only where it cannot change how the rest is read: one ``boundary`` parameter, whole, of
# characters with no meaning in a parameter list, in an ASCII head that does not hold the stand-in.
_BOUNDARY_PARAM = re.compile(
    rb'(;[ \t\r\n]*boundary[ \t]*=[ \t]*)("?)([A-Za-z0-9+_,./:=?-]+)\2(?=[ \t]*(?:;|\r?\n|\Z))',
    re.IGNORECASE,
)
_STAND_IN = "pecd-boundary-stand-in"
_STAND_IN_BYTES = _STAND_IN.encode()

Params = tuple[str, tuple[tuple[str, str], ...], str | None]


def _read_multipart_params(head: bytes) -> Params | None:
    """What :func:`_read_params` gives for ``head``, read through the stand-in boundary; None
    where the swap is not made (or would show in what is read: then it is not used)."""
    m = _BOUNDARY_PARAM.search(head)
    if (
        m is None
        or _BOUNDARY_PARAM.search(head, m.end()) is not None
        or _STAND_IN_BYTES in head
        or not head.isascii()
    ):
        return None
    try:
        ctype, params, fname = _read_params_cached(
            head[: m.start(3)] + _STAND_IN_BYTES + head[m.end(3) :]
        )
    except Exception:  # the caller reads the head as it is, and fails or not on its own
        return None
    # The stand-in must come back as the boundary's value and nowhere else.
    others = [ctype, fname or "", *(k for k, _ in params)]
    others += [v for k, v in params if k != "boundary"]
    if dict(params).get("boundary") != _STAND_IN or any(_STAND_IN in text for text in others):
        return None
    boundary = m.group(3).decode("ascii")
    return ctype, tuple((k, boundary if k == "boundary" else v) for k, v in params), fname


@functools.lru_cache(maxsize=256)
def _read_params_cached(head: bytes) -> Params:
    return _read_params(head)


def _read_params(head: bytes) -> Params:
    # Headers only: the full parser, seeing a multipart Content-Type, would compile a pattern
    # for its boundary (a new one in every message, so never from the cache) to split a body
    # that is not there; what is read here depends on the header fields alone.
    msg = _HEADER_PARSER.parsebytes(head + b"\r\n\r\n")
    ctype = msg.get_content_type()
    params: dict[str, str] = {}
    for key, value in msg.get_params(failobj=[], header="content-type")[1:]:
        params[key.lower()] = str(email.utils.collapse_rfc2231_value(value)).strip()
    fname = msg.get_filename()
    if fname is None and "name" in params:
        fname = params["name"]
    return ctype, tuple(params.items()), None if fname is None else decode_words(str(fname))


_NL = re.compile(rb"\n")
# Any line that starts with "--", with the rest of the line (its ending excluded). Boundaries
# are compared with the line's text, not built into a pattern: compiling a pattern for each
# message's own boundary cost more than the search. The first line is looked at on its own:
# "\n--" as the pattern's start is a literal the regex engine skips to quickly, where "(?:\A|\n)"
# made it try every byte of a body (a hundred times slower over a large attachment).
_DASH_REST = rb"--([^\r\n]*)(?=\r?\n|\Z)"
_DASH_FIRST = re.compile(_DASH_REST)
_DASH_LINE = re.compile(rb"\n" + _DASH_REST)


def _dash_lines(body: Buffer) -> Iterator[re.Match[bytes]]:
    first = _DASH_FIRST.match(body)
    if first is not None:
        yield first
    yield from _DASH_LINE.finditer(body, 0 if first is None else first.end())


def delimiter_kind(line: bytes, boundary: bytes) -> int:
    """For the text after ``--`` of a line: 1 if it is ``boundary``'s delimiter, 2 if its closing
    delimiter, 0 if neither (trailing spaces and tabs allowed, RFC 2046 5.1.1)."""
    line = line.rstrip(b" \t")
    if line == boundary:
        return 1
    if line == boundary + b"--":
        return 2
    return 0


def split_multipart(body: Buffer, boundary: str) -> list[Buffer] | None:
    """The body parts between ``--boundary`` delimiters (each without the delimiter's line ending),
    or None when the opening delimiter is missing. Parts slice ``body``: views of a memoryview."""
    bnd = boundary.encode("latin-1", "replace")
    parts: list[Buffer] = []
    start: int | None = None
    for m in _dash_lines(body):
        kind = delimiter_kind(m.group(1), bnd)
        if not kind:
            continue
        # The delimiter includes the line ending before it.
        at = m.start()
        if at > 0 and body[at - 1] == 13:  # \r
            at -= 1
        if start is not None:
            parts.append(body[start:at])
        if kind == 2:
            return parts
        nl = _NL.search(body, m.end())
        start = len(body) if nl is None else nl.end()
    if start is None:
        return None
    parts.append(body[start:])  # no closing delimiter: keep what is there
    return parts


def parse_entity(raw: Buffer, _depth: int = 0, *, into_messages: bool = True) -> Entity:
    """Parse ``raw`` into a tree that keeps the exact bytes of every part. Never raises on bad input:
    what cannot be split stays a leaf. The tree holds views of ``raw``, not copies.

    With ``into_messages`` false a wrapped message (message/rfc822) stays a leaf: a caller that
    only looks at the outer structure does not pay for parsing the message inside."""
    view = raw if isinstance(raw, memoryview) else memoryview(raw)
    end = head_end(view)
    head, body = (
        (view.tobytes(), view[len(view) :])
        if end is None
        else (view[: end[0]].tobytes(), view[end[1] :])
    )
    try:
        ctype, params, fname = _params(head)
    except Exception:  # any header the stdlib cannot make sense of
        ctype, params, fname = "text/plain", {}, None
    entity = Entity(head, body, ctype, params, fname)
    if _depth >= MAX_DEPTH:
        return entity
    if ctype.startswith("multipart/") and params.get("boundary"):
        for part in split_multipart(body, params["boundary"]) or []:
            entity.children.append(parse_entity(part, _depth + 1, into_messages=into_messages))
    elif ctype == "message/rfc822" and into_messages:
        entity.children.append(parse_entity(body, _depth + 1))
    return entity
