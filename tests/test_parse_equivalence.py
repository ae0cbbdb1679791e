"""The fast header, address and MIME readers give what the plain ones they replaced gave.

The submission stage and ``classify`` read headers through shortcuts (one split of the header
block, scans that jump between the characters that matter, a read of the header section in a few
passes, part headers reduced to the fields read and to a stand-in boundary). Each is judged here
against the code it replaced, kept below as the oracle, on the real messages in tests/data and on
generated heads that are anything but well formed: folded lines, bare LF and CR, NUL, 8-bit and
UTF-8 bytes, over-long lines, repeated and missing fields, encoded words, garbage lines.
"""

from __future__ import annotations

import email.header
import re
from collections.abc import Iterator

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from helpers import CORPUS_DIR
from pecd.pec import builders, checks, mime
from pecd.pec.address import normalize_address
from pecd.pec.msgid import bracket

CORPUS = sorted(CORPUS_DIR.glob("*.eml"))
NAMES = ("From", "To", "Cc", "Reply-To", "Subject", "Message-ID", "X-TipoRicevuta", "Date")

# --- the code before the shortcuts (the oracle) --------------------------------------------------

_OLD_HEAD_END = re.compile(rb"\r?\n\r?\n")
_OLD_FIELD_START = re.compile(rb"^[!-9;-~]+[ \t]*:", re.MULTILINE)
_OLD_DASH_LINE = re.compile(rb"(?:\A|\n)--([^\r\n]*)(?=\r?\n|\Z)")
_OLD_FIELD_RE = re.compile(rb"([\x21-\x39\x3b-\x7e]+)[ \t]*:")


def old_head_of(raw: bytes) -> bytes:
    m = _OLD_HEAD_END.search(raw)
    return raw if m is None else raw[: m.start()]


def old_header_fields(head: bytes) -> list[tuple[str, bytes]]:
    fields: list[tuple[str, bytes]] = []
    starts = [m.start() for m in _OLD_FIELD_START.finditer(head)]
    for i, start in enumerate(starts):
        end = starts[i + 1] if i + 1 < len(starts) else len(head)
        chunk = head[start:end]
        fields.append((chunk.split(b":", 1)[0].strip().decode("ascii", "replace"), chunk))
    return fields


def old_get_all(raw: bytes, name: str) -> list[str]:
    def unfold(chunk: bytes) -> str:
        text = chunk.split(b":", 1)[1].decode("utf-8", "replace")
        return re.sub(r"\r?\n[ \t]", " ", text).strip()

    fields = old_header_fields(old_head_of(raw))
    return [unfold(chunk) for n, chunk in fields if n.lower() == name.lower()]


def old_decode_words(value: str) -> str:
    try:
        decoded = str(email.header.make_header(email.header.decode_header(value)))
    except (LookupError, ValueError, UnicodeError, AssertionError):
        decoded = value
    return mime.unsurrogate(decoded)


def old_clean_header_text(text: str) -> str:
    text = mime.unsurrogate(text)
    return re.sub("[\x00-\x08\x0b-\x1f\x7f]", "", re.sub("[\r\n]+", " ", text))


def old_strip_comments(text: str) -> str | None:
    out: list[str] = []
    depth = 0
    in_quote = False
    i = 0
    while i < len(text):
        ch = text[i]
        if ch == "\\" and (in_quote or depth):
            if depth == 0:
                out.append(text[i : i + 2])
            i += 2
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
        i += 1
    if depth or in_quote:
        return None
    return "".join(out)


def old_find_unquoted(text: str, target: str) -> int:
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


def old_split_address_list(value: str) -> tuple[list[str], bool]:
    items: list[str] = []
    current: list[str] = []
    in_group = saw_group = in_quote = angle = False
    comment = 0

    def flush() -> None:
        raw = "".join(current).strip()
        current.clear()
        if raw:
            items.append(raw)

    i = 0
    while i < len(value):
        ch = value[i]
        if ch == "\\" and (in_quote or comment):
            current.append(value[i : i + 2])
            i += 2
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
            i += 1
            continue
        elif ch == ":" and not in_group:
            current.clear()
            in_group = saw_group = True
            i += 1
            continue
        elif ch == ";" and in_group:
            flush()
            in_group = False
            i += 1
            continue
        current.append(ch)
        i += 1
    flush()
    return items, saw_group


def old_parse_headers(raw: bytes) -> tuple[list[tuple[str, str]], list[str], list[str]]:
    fields: list[tuple[str, str]] = []
    problems_it: list[str] = []
    problems_en: list[str] = []

    def problem(it: str, en: str) -> None:
        if en not in problems_en:
            problems_it.append(it)
            problems_en.append(en)

    if not raw:
        problem("messaggio vuoto", "empty message")
        return fields, problems_it, problems_en
    pending: list[tuple[str, list[bytes]]] = []
    cuts = [pos for pos in (raw.find(b"\n\n"), raw.find(b"\n\r\n")) if pos >= 0]
    section = raw[: min(cuts) + 1] if cuts else raw
    for line in section.splitlines(keepends=True):
        if line.endswith(b"\r\n"):
            content = line[:-2]
        elif line.endswith((b"\n", b"\r")):
            content = line[:-1]
        else:
            content = line
        if not content and line != b"\r":
            break
        if len(content) > checks.MAX_LINE_OCTETS:
            problem(
                f"riga di intestazione più lunga di {checks.MAX_LINE_OCTETS} byte",
                f"header line longer than {checks.MAX_LINE_OCTETS} octets",
            )
        if line.endswith(b"\r"):
            problem("carattere CR isolato nelle intestazioni", "bare CR in the headers")
        if b"\x00" in content:
            problem("carattere NUL nelle intestazioni", "NUL character in the headers")
        if not content.isascii():
            problem(
                "caratteri non ASCII nelle intestazioni", "non-ASCII (8-bit) bytes in the headers"
            )
        match = None if content[:1] in (b" ", b"\t") else _OLD_FIELD_RE.match(content)
        if match is None and content[:1] in (b" ", b"\t") and pending:
            pending[-1][1].append(content)
            continue
        if match is None:
            if pending:
                problem(
                    "manca la riga vuota tra intestazioni e corpo",
                    "no empty line between the header section and the body",
                )
            else:
                problem(
                    "il messaggio non inizia con un campo di intestazione",
                    "the message does not start with a header field",
                )
            break
        pending.append((match.group(1).decode("ascii").lower(), [content[match.end() :]]))
    for name, parts in pending:
        fields.append((name, b"".join(parts).decode("utf-8", "replace").strip()))
    return fields, problems_it, problems_en


def old_dash_lines(body: bytes) -> list[tuple[int, int, bytes]]:
    return [(m.start(), m.end(), m.group(1)) for m in _OLD_DASH_LINE.finditer(body)]


# --- comparisons -----------------------------------------------------------------------------------


def params_or_error(read: object, head: bytes) -> object:
    try:
        ctype, params, fname = read(head)  # type: ignore[operator]
    except Exception as exc:  # what parse_entity turns into text/plain
        return type(exc)
    return ctype, dict(params), fname


def assert_same_headers(raw: bytes) -> None:
    end = _OLD_HEAD_END.search(raw)
    assert mime.head_end(raw) == (None if end is None else end.span())
    assert mime.head_end(memoryview(raw)) == (None if end is None else end.span())
    assert mime.head_of(raw) == old_head_of(raw)
    head = mime.Headers(raw)
    assert head.fields == old_header_fields(old_head_of(raw))
    assert mime.header_fields(mime.head_of(raw)) == head.fields
    for name in (*NAMES, "content-type", "X-Missing"):
        assert head.get_all(name) == old_get_all(raw, name) == mime.get_all(raw, name)
        assert head.get_first(name) == (old_get_all(raw, name) or [None])[0]
        assert head.has(name) == bool(old_get_all(raw, name))


def assert_same_checks_headers(raw: bytes) -> None:
    fields, problems_it, problems_en = old_parse_headers(raw)
    new = checks._parse_headers(raw)
    by_name: dict[str, list[str]] = {}
    for name, value in fields:
        by_name.setdefault(name, []).append(value)
    assert (new.fields, new.problems_it, new.problems_en) == (by_name, problems_it, problems_en)


def assert_same_address_parsing(value: str) -> None:
    assert checks._split_address_list(value) == old_split_address_list(value)
    assert checks._strip_comments(value) == old_strip_comments(value)
    assert checks._find_unquoted(value, "<") == old_find_unquoted(value, "<")
    for cleaned in (value, mime.clean_header_text(value)):
        items, _ = old_split_address_list(cleaned)
        valid = [a for a in map(checks._read_mailbox, items) if a is not None]
        invalid = [i for i in items if checks._read_mailbox(i) is None]
        assert checks.parse_address_list(cleaned) == (valid, invalid)


def assert_same_params(head: bytes) -> None:
    expected = params_or_error(mime._read_params, head)
    assert params_or_error(mime._params, head) == expected
    assert params_or_error(mime._read_params, mime._param_fields(head)) == expected


def entities(raw: bytes) -> Iterator[mime.Entity]:
    yield from mime.parse_entity(raw).walk(into_messages=True)


# --- the real messages -----------------------------------------------------------------------------


@pytest.mark.parametrize("path", CORPUS, ids=lambda p: p.name)
def test_corpus_reads_as_before(path: object) -> None:
    raw = path.read_bytes()  # type: ignore[attr-defined]
    for variant in (raw, raw.replace(b"\r\n", b"\n"), b"X-Seq: 1\r\n" + raw):
        assert_same_headers(variant)
        assert_same_checks_headers(variant)
        for name in NAMES:
            for value in old_get_all(variant, name):
                assert_same_address_parsing(value)
        for entity in entities(variant):
            assert_same_params(entity.head)
            assert [(m.start(), m.end(), m.group(1)) for m in mime._dash_lines(entity.body)] == (
                old_dash_lines(entity.body)
            )


def test_submission_of_corpus_messages_reads_as_before() -> None:
    """Transmission.from_submission over one split of the header block gives what a lookup of
    each field on the raw message gave."""
    for path in CORPUS:
        raw = path.read_bytes()
        froms = [
            a
            for v in old_get_all(raw, "From")
            for a in checks.parse_address_list(mime.clean_header_text(v))[0]
        ]
        mail_from = froms[0] if froms else "x@example.test"
        tx = builders.Transmission.from_submission(
            raw,
            mail_from=mail_from,
            rcpt_to=["someone@example.test"],
            identificativo="id@example.test",
            is_certified=lambda _: True,
        )
        subject = old_get_all(raw, "Subject")
        expected_subject = old_clean_header_text(old_decode_words(subject[0])) if subject else ""
        assert tx.oggetto == expected_subject
        msgid = old_clean_header_text((old_get_all(raw, "Message-ID") or [""])[0]).strip()
        assert tx.msgid == (bracket(msgid.split()[0]) if msgid else None)
        for field, name in ((tx.to, "To"), (tx.cc, "Cc")):
            found = [
                normalize_address(a)
                for v in old_get_all(raw, name)
                for a in checks.parse_address_list(old_clean_header_text(v))[0]
            ]
            assert list(field) == list(dict.fromkeys(found))


# --- generated heads -------------------------------------------------------------------------------

_PIECES = [
    b"From",
    b"To",
    b"Cc",
    b"cc",
    b"Reply-To",
    b"Subject",
    b"Date",
    b"Message-ID",
    b"X-TipoRicevuta",
    b"Content-Type",
    b"content-type",
    b"Content-Disposition",
    b"Received",
    b"Bcc",
    b": ",
    b":",
    b" : ",
    b"From ",
    b"Fr om",
    b"\r\n",
    b"\r\n",
    b"\n",
    b"\r",
    b"\r\n ",
    b"\r\n\t",
    b"\n ",
    b" ",
    b"\t",
    b"\x00",
    b"\xff",
    b"\xc3\xa9",
    b"\x85",
    b"\x0b",
    b"\x7f",
    b"a@b.it",
    b"<a@b.it>",
    b"Mario <m@pec.it>",
    b'"Rossi, Mario" <mario@pec.it>',
    b'"unterminated <a@b.it>',
    b"(comment (nested)) a@b.it",
    b"a@b.it (trailing",
    b"group: a@b.it, c@d.it;",
    b", ,",
    b"<@relay:a@b.it>",
    b'"quoted\\"x" <q@b.it>',
    b"\\",
    b"=?utf-8?q?caf=C3=A9?=",
    b"=?utf-8?b?w6k=?=",
    b"=?bogus?q?x?=",
    b"completa",
    b"BREVE",
    b"Mon, 2 Mar 2026 10:00:00 +0100",
    b"multipart/mixed; boundary=",
    b'multipart/mixed; boundary="b1=_x"',
    b'multipart/mixed;\r\n\tboundary="b-2"; charset=x',
    b"multipart/alternative; boundary=pecd-boundary-stand-in",
    b'text/plain; name="x.txt"',
    b"text/plain; name*=utf-8''%C3%A9.txt",
    b'attachment; filename="=?utf-8?b?w6k=?="',
    b'; boundary="a b"',
    b"; boundary=abc; boundary=def",
    b";",
    b'"',
    b"x" * 1000,
    b"\r\n\r\n",
    b"--b1\r\n",
    b"--b1--\r\n",
]

heads = st.lists(st.sampled_from(_PIECES), max_size=40).map(b"".join)


@settings(max_examples=1500, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(heads)
def test_generated_heads_read_as_before(raw: bytes) -> None:
    assert_same_headers(raw)
    assert_same_checks_headers(raw)
    assert_same_params(raw)
    assert_same_params(mime.head_of(raw))
    assert [(m.start(), m.end(), m.group(1)) for m in mime._dash_lines(raw)] == old_dash_lines(raw)
    text = raw.decode("utf-8", "surrogateescape")
    assert_same_address_parsing(text)
    assert mime.decode_words(text) == old_decode_words(text)
    assert mime.clean_header_text(text) == old_clean_header_text(text)


# Part headers around a boundary parameter, to exercise the stand-in boundary: values of
# characters it takes and of characters it must refuse, quoted or not, folded, repeated.
_VALUES = st.text(alphabet="abcXYZ09'()+_,./:=?- \t\"\\;<>*%\u00e9", max_size=12)
_PARAMS = st.sampled_from(
    [
        '; boundary="{}"',
        "; boundary={}",
        ';\r\n\tboundary="{}"',
        '; Boundary = "{}"',
        ' boundary="{}"',
        '; boundary="{}" x',
        "; boundary*=utf-8''{}",
        '; name="{}"',
        "; charset=utf-8",
        '; boundary="{}"\r\n x',
        "; boundary={};",
    ]
)
_PART_LINES = st.sampled_from(
    [
        "MIME-Version: 1.0",
        'Content-Disposition: attachment; filename="{}"',
        "Content-Transfer-Encoding: base64",
        "X-Note: boundary={}",
        " folded {}",
    ]
)


@st.composite
def part_heads(draw: st.DrawFn) -> bytes:
    ctype = draw(st.sampled_from(["multipart/mixed", "multipart/Alternative", "text/plain", ""]))
    name = draw(st.sampled_from(["Content-Type: ", "content-type:", "Content-Type : "]))
    line = name + ctype
    for param in draw(st.lists(_PARAMS, max_size=3)):
        line += param.format(draw(_VALUES))
    lines = [line]
    for other in draw(st.lists(_PART_LINES, max_size=3)):
        lines.insert(draw(st.integers(0, len(lines))), other.format(draw(_VALUES)))
    sep = draw(st.sampled_from(["\r\n", "\n"]))
    return sep.join(lines).encode("utf-8", "surrogateescape")


@settings(max_examples=1000, deadline=None)
@given(part_heads())
def test_generated_part_heads_read_as_before(head: bytes) -> None:
    assert_same_params(head)


@settings(max_examples=1500, deadline=None)
@given(st.text(alphabet='a@b.<>(),:;"\\ \t\r\nxé=?-\x00\ud800', max_size=60))
def test_generated_address_lists_parse_as_before(value: str) -> None:
    assert_same_address_parsing(value)
    assert mime.decode_words(value) == old_decode_words(value)
    assert mime.clean_header_text(value) == old_clean_header_text(value)


@settings(max_examples=1000, deadline=None)
@given(heads)
def test_the_quick_section_read_agrees_with_the_line_by_line_one(raw: bytes) -> None:
    quick = checks._Headers({}, [], [])
    slow = checks._Headers({}, [], [])
    if checks._read_clean_section(raw, quick):
        checks._read_section(raw, slow)
        assert (quick.fields, quick.problems_en) == (slow.fields, [])


def test_the_quick_reads_are_taken_for_well_formed_messages() -> None:
    """The shortcuts are not dead code: a usual message goes through them."""
    raw = (
        b"From: a@pec.example.test\r\nTo: b@pec.example.test,\r\n c@pec.example.test\r\n"
        b'Subject: hello\r\nContent-Type: multipart/mixed; boundary="x-1"\r\n\r\nbody\r\n'
    )
    result = checks._Headers({}, [], [])
    assert checks._read_clean_section(raw[: raw.find(b"\r\n\r\n") + 2], result)
    assert result.fields["to"] == ["b@pec.example.test, c@pec.example.test"]
    head = mime.head_of(raw)
    assert mime._param_fields(head) == b'Content-Type: multipart/mixed; boundary="x-1"'
    assert mime._read_multipart_params(mime._param_fields(head)) == (
        "multipart/mixed",
        (("boundary", "x-1"),),
        None,
    )


def test_a_long_line_without_a_colon_is_read_in_linear_time() -> None:
    """No scan backtracks over a long run of name characters (a quadratic search would take
    minutes here)."""
    raw = b"From: a@b.it\r\n" + (b"x" * 990 + b"\r\n") * 2000 + b"\r\n"
    assert checks._parse_headers(raw).problems_en
    assert mime._param_fields(mime.head_of(raw)) == mime.head_of(raw)
    # Lines that are not fields belong to the field before them, as they always did.
    assert mime.Headers(raw).get_all("From") == old_get_all(raw, "From")
