"""The *breve* (short) delivery receipt transformation (spec/pec.md section 2.3).

For a ``breve`` avvenuta-consegna the original message is attached with every MIME part that has
a ``name=`` (Content-Type) or ``filename=`` (Content-Disposition) parameter, and every embedded
``message/rfc822``, replaced by a small ``text/plain`` part ``<original filename>.hash`` that
holds the 40 lowercase hex digits of the part's SHA-1.

:func:`to_breve` works on the raw bytes as a splice: the output is the input with only the
replaced parts (their header block and body, i.e. everything between the boundary delimiter line
that opens them and the line ending that precedes the next delimiter) swapped for the new part.
The message headers, preambles, epilogues, boundaries and every other part stay byte-for-byte.

Exact rules:

* **Hashed bytes**: the part's body exactly as it sits in the message (transfer-encoded, e.g.
  the base64 text) - the bytes after the empty line that ends the part's header block, up to
  but excluding the line ending that precedes the next boundary delimiter (RFC 2046: that line
  ending belongs to the delimiter) - with every bare LF turned into CRLF, so that the hash is the
  same whether the message is stored with LF or CRLF. Nothing else is stripped. If a part's
  header block is not ended by an empty line, its body starts at the first line that is not a
  header line (as the ``email`` package reads it).
* **Which parts**: leaves with a ``filename`` or ``name`` parameter (present, even if empty),
  and every ``message/rfc822`` part (replaced whole, its contents are not visited). Multipart
  entities are always descended into, never replaced. In a ``multipart/signed`` the signature
  part (``application/(x-)pkcs7-signature``) is kept; the other parts are transformed (the
  signature then no longer verifies, which the rules accept). Parts without a Content-Type in a
  ``multipart/digest`` are ``message/rfc822``.
* **Top level**: the whole message is not a "part": its headers are never touched. A message
  whose top-level type is ``application/(x-)pkcs7-mime`` is returned unchanged, and so is a
  single-part message (even one whose body carries a filename).
* **File names**: RFC 2231 (charset, continuations) and RFC 2047 (also the non-standard quoted
  ``"=?utf-8?Q?...?="`` form real clients write) are decoded; raw UTF-8 bytes are read as UTF-8.
  Control characters are dropped. An empty name becomes ``messaggio.eml`` for message parts and
  ``allegato`` otherwise; :attr:`HashedPart.filename` holds that cleaned name. In the new
  part the name is written as a quoted string when it is short printable ASCII, otherwise with
  RFC 2231 (``utf-8''``, percent-encoded, split into ``*0*``, ``*1*``… sections when long).
* **Line endings** of the inserted text follow the message (CRLF if its first line ends with
  CRLF, LF otherwise).
* **Malformed input** never raises: a multipart without a boundary parameter or without any
  delimiter line is left as it is (nothing inside it is replaced), nesting deeper than
  :data:`MAX_DEPTH` is left as it is, a part missing its closing delimiter runs to the end of its
  enclosing entity, and if anything unexpected happens the original is returned unchanged with
  an empty list.
"""

from __future__ import annotations

import contextlib
import hashlib
import re
from dataclasses import dataclass
from email import policy
from email.header import decode_header, make_header
from email.message import Message
from email.parser import BytesHeaderParser
from urllib.parse import quote

from pecd.pec.mime import unsurrogate
from pecd.pec.vocab import CT_PKCS7_MIME, CT_POSTACERT, CT_SIGNATURE_ALIASES, HASH_SUFFIX

__all__ = ["MAX_DEPTH", "HashedPart", "to_breve"]

MAX_DEPTH = 32
DEFAULT_MESSAGE_NAME = "messaggio.eml"
DEFAULT_PART_NAME = "allegato"
_FOLD_AT = 78
_SECTION_CHARS = 50

# A line that the email package would read as part of a header block.
_HEADER_LINE_RE = re.compile(rb"From |[\x21-\x39\x3b-\x7e]*:|[ \t]")
_BARE_LF_RE = re.compile(rb"(?<!\r)\n")
_CONTROL_RE = re.compile(r"[\x00-\x1f\x7f-\x9f]")
_SIMPLE_VALUE_RE = re.compile(r"[\x20-\x7e]*")
_ATTR_CHAR_SAFE = "!#$&+-.^_`|~"
_UTF8_PREFIX = "utf-8''"


@dataclass(frozen=True)
class HashedPart:
    """One part that the breve receipt replaced."""

    filename: str  # original file name (decoded and cleaned, see the module docstring)
    sha1_hex: str  # 40 lowercase hex digits


@dataclass
class _Ctx:
    data: bytes
    eol: bytes
    spans: list[tuple[int, int, bytes]]
    hashed: list[HashedPart]


def to_breve(original: bytes) -> tuple[bytes, list[HashedPart]]:
    """Return the breve form of ``original`` and the parts it replaced, in message order.

    Returns ``(original, [])`` when nothing has to be replaced or the message cannot be
    processed. Never raises.
    """
    try:
        return _to_breve(original)
    except Exception:  # defensive: malformed input must never escape as an exception
        return original, []


def _to_breve(original: bytes) -> tuple[bytes, list[HashedPart]]:
    first_lf = original.find(b"\n")
    eol = b"\r\n" if first_lf <= 0 or original[first_lf - 1 : first_lf] == b"\r" else b"\n"
    ctx = _Ctx(original, eol, [], [])
    _walk(ctx, 0, len(original), "text/plain", 0, top=True, in_signed=False)
    if not ctx.spans:
        return original, []
    out: list[bytes] = []
    pos = 0
    for start, end, replacement in sorted(ctx.spans):
        out.append(original[pos:start])
        out.append(replacement)
        pos = end
    out.append(original[pos:])
    return b"".join(out), ctx.hashed


def _split_entity(data: bytes, start: int, end: int) -> tuple[int, int]:
    """``(header_end, body_start)`` of the entity ``data[start:end]``.

    The header block is ``data[start:header_end]`` (with its last line ending); the body is
    ``data[body_start:end]``. They differ by the empty separator line, when there is one.
    """
    pos = start
    while pos < end:
        nl = data.find(b"\n", pos, end)
        line_end = end if nl < 0 else nl + 1
        line = data[pos:line_end]
        if line in (b"\n", b"\r\n"):
            return pos, line_end
        if not _HEADER_LINE_RE.match(line):
            return pos, pos
        pos = line_end
    return end, end


def _parse_headers(block: bytes) -> Message:
    return BytesHeaderParser(policy=policy.default).parsebytes(block)


def _content_type(msg: Message, default: str) -> str:
    if msg.get("content-type") is None:
        return default
    return msg.get_content_type()


def _walk(
    ctx: _Ctx, start: int, end: int, default: str, depth: int, *, top: bool, in_signed: bool
) -> None:
    data = ctx.data
    header_end, body_start = _split_entity(data, start, end)
    msg = _parse_headers(data[start:header_end])
    ctype = _content_type(msg, default)
    if top and ctype in CT_PKCS7_MIME:
        return
    if in_signed and ctype in CT_SIGNATURE_ALIASES:
        return
    if ctype.startswith("multipart/"):
        if depth >= MAX_DEPTH:
            return
        boundary = msg.get_boundary()
        if not boundary:
            return
        child_default = CT_POSTACERT if ctype == "multipart/digest" else "text/plain"
        signed = ctype == "multipart/signed"
        for part_start, part_end in _split_multipart(data, body_start, end, boundary):
            _walk(ctx, part_start, part_end, child_default, depth + 1, top=False, in_signed=signed)
        return
    if top:
        return
    filename = _filename(msg)
    if ctype == CT_POSTACERT:
        filename = filename or DEFAULT_MESSAGE_NAME
    elif filename is None:
        return
    filename = filename or DEFAULT_PART_NAME
    body = _BARE_LF_RE.sub(b"\r\n", data[body_start:end])
    digest = hashlib.sha1(body).hexdigest()  # SHA-1 is what the PEC rules mandate
    ctx.spans.append((start, end, _replacement(filename + HASH_SUFFIX, digest, ctx.eol)))
    ctx.hashed.append(HashedPart(filename, digest))


def _split_multipart(data: bytes, start: int, end: int, boundary: str) -> list[tuple[int, int]]:
    """The ``(start, end)`` of each body part between the delimiter lines of ``boundary``.

    ``end`` excludes the line ending before the next delimiter. Parts after a missing close
    delimiter run to ``end``. No delimiter at all gives no parts.
    """
    delimiter = re.compile(
        rb"^--" + re.escape(boundary.encode("utf-8", "surrogateescape")) + rb"(--)?[ \t]*\r?$",
        re.MULTILINE,
    )
    parts: list[tuple[int, int]] = []
    current: int | None = None
    for match in delimiter.finditer(data, start, end):
        if current is not None:
            part_end = match.start()
            if part_end - 2 >= current and data[part_end - 2 : part_end] == b"\r\n":
                part_end -= 2
            elif part_end - 1 >= current and data[part_end - 1 : part_end] == b"\n":
                part_end -= 1
            parts.append((current, part_end))
        if match.group(1):
            return parts
        current = match.end()
        if current < end and data[current : current + 1] == b"\n":
            current += 1
    if current is not None:
        parts.append((current, end))
    return parts


# --- file names ----------------------------------------------------------------------------------


def _param(msg: Message, header: str, name: str) -> str | None:
    value = msg.get(header)
    params = getattr(value, "params", None)
    if params is None:
        return None
    found = params.get(name)
    return None if found is None else str(found)


def _filename(msg: Message) -> str | None:
    """The decoded ``filename`` (Content-Disposition) or else ``name`` (Content-Type)."""
    value = _param(msg, "content-disposition", "filename")
    if value is None:
        value = _param(msg, "content-type", "name")
    if value is None:
        return None
    if "=?" in value:
        # An unknown charset or a broken encoded word leaves the text as it is.
        with contextlib.suppress(Exception):
            value = str(make_header(decode_header(value)))
    # Bytes the parser smuggled as surrogates come back as UTF-8; a lone surrogate from an encoded
    # word (UTF-7 can make one) becomes U+FFFD instead of failing the encode.
    value = unsurrogate(value)
    return _CONTROL_RE.sub("", value).strip()


def _encode_param(name: str, value: str) -> list[str]:
    """``name="value"`` when simple, else RFC 2231 sections (``name*0*=utf-8''...``)."""
    if (
        _SIMPLE_VALUE_RE.fullmatch(value)
        and '"' not in value
        and "\\" not in value
        and len(value) <= _SECTION_CHARS
    ):
        return [f'{name}="{value}"']
    encoded = quote(value.encode("utf-8"), safe=_ATTR_CHAR_SAFE)
    tokens = re.findall(r"%[0-9A-F]{2}|.", encoded)
    sections: list[str] = []
    current = ""
    for token in tokens:
        if len(current) + len(token) > _SECTION_CHARS:
            sections.append(current)
            current = ""
        current += token
    sections.append(current)
    if len(sections) == 1:
        return [f"{name}*=utf-8''{sections[0]}"]
    return [
        f"{name}*{index}*={_UTF8_PREFIX if index == 0 else ''}{section}"
        for index, section in enumerate(sections)
    ]


def _header(name: str, value: str, params: list[str], eol: str) -> str:
    text = f"{name}: {value}"
    line_len = len(text)
    for param in params:
        if line_len + 2 + len(param) <= _FOLD_AT:
            text += "; " + param
            line_len += 2 + len(param)
        else:
            text += ";" + eol + "\t" + param
            line_len = 1 + len(param)
    return text + eol


def _replacement(filename: str, digest: str, eol_bytes: bytes) -> bytes:
    eol = eol_bytes.decode("ascii")
    text = (
        _header(
            "Content-Type",
            "text/plain",
            ['charset="us-ascii"', *_encode_param("name", filename)],
            eol,
        )
        + f"Content-Transfer-Encoding: 7bit{eol}"
        + _header("Content-Disposition", "attachment", _encode_param("filename", filename), eol)
        + eol
        + digest
        + eol
    )
    return text.encode("ascii")
