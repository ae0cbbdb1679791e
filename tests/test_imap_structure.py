"""FETCH BODYSTRUCTURE, BODY, BODY[section], ENVELOPE and RFC822.SIZE as RFC 3501 defines them.

Three layers:

1. ``pecd.imap.structure`` on small messages against values computed by hand from RFC 3501
   (7.4.2, 6.4.5) and RFC 2045/2046/2231.
2. pecd's ImapService serving every message kind pecd builds, every file of the real PEC corpus
   and the hand-made edge cases: its answers must be consistent with the stored bytes (sizes,
   line counts, slices, the raw Date header).
3. The same messages in a throwaway Dovecot 2.3 (``/usr/sbin/dovecot`` on a loopback port): every
   item of every message and part must be the same token for token. Normalised: nothing but
   the wire form of strings (quoted vs literal, which RFC 3501 leaves free) and the response's
   item order; the letter case of atoms and strings is compared as sent.
"""

from __future__ import annotations

import base64
import contextlib
import grp
import hashlib
import imaplib
import os
import pwd
import re
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from helpers import FakeAccounts, Pki, every_kind, make_pki, read_manifest
from helpers import ImapServer as Server
from pecd.imap.structure import body_structure, envelope, find, parse
from pecd.mailbox.maildir import MaildirStore, to_crlf
from pecd.pec.pki import DevPki

DOVECOT = "/usr/sbin/dovecot"

# -- an IMAP response reader, independent of pymap ---------------------------------------------

Value = Any  # bytes | int | None | list[Value]


def _read(buf: bytes, i: int) -> tuple[Value, int]:
    while buf[i : i + 1] == b" ":
        i += 1
    c = buf[i : i + 1]
    if c == b"(":
        items: list[Value] = []
        i += 1
        while True:
            while buf[i : i + 1] == b" ":
                i += 1
            if buf[i : i + 1] == b")":
                return items, i + 1
            item, i = _read(buf, i)
            items.append(item)
    if c == b'"':
        out = bytearray()
        i += 1
        while buf[i : i + 1] != b'"':
            if buf[i : i + 1] == b"\\":
                i += 1
            out += buf[i : i + 1]
            i += 1
        return bytes(out), i + 1
    if c == b"{":
        close = buf.index(b"}", i)
        n = int(buf[i + 1 : close])
        start = close + 3  # "}\r\n"
        return buf[start : start + n], start + n
    m = re.compile(rb"[^ ()\[\]]+(\[[^\]]*\])?").match(buf, i)
    assert m is not None, buf[i : i + 50]
    word = m.group(0)
    if word.isdigit():
        return int(word), m.end()
    if word == b"NIL":
        return None, m.end()
    return word, m.end()


def fetch_items(data: list[Any]) -> dict[str, Value]:
    """The items of one FETCH response (as imaplib returns it), keyed by upper-case item name."""
    raw = b"".join(d[0] + b"\r\n" + d[1] if isinstance(d, tuple) else d for d in data)
    _, i = _read(raw, 0)  # the sequence number
    items, _ = _read(raw, i)
    assert isinstance(items, list) and len(items) % 2 == 0, raw[:200]
    return {_key(items[k]): items[k + 1] for k in range(0, len(items), 2)}


def _key(raw: bytes) -> str:
    """An item name as a key; the field names of HEADER.FIELDS sorted (pymap echoes them sorted,
    Dovecot as asked)."""
    key = raw.decode().upper().replace("BODY.PEEK[", "BODY[")
    m = re.match(r"(.*HEADER\.FIELDS(?:\.NOT)? \()([^)]*)(\).*)", key)
    if m:
        key = m.group(1) + " ".join(sorted(m.group(2).split())) + m.group(3)
    return key


def offline(raw: bytes, key: str, *, dovecot_crlf: bool) -> Value:
    """The value of one FETCH item computed by pecd.imap.structure directly."""
    tree = parse(raw, dovecot_crlf=dovecot_crlf)
    if key in ("BODYSTRUCTURE", "BODY"):
        return _read(bytes(body_structure(tree, extended=key == "BODYSTRUCTURE")), 0)[0]
    if key == "ENVELOPE":
        return _read(bytes(envelope(tree)), 0)[0]
    m = re.fullmatch(r"BODY\[([0-9.]*?)\.?(MIME|HEADER|TEXT|)\]", key)
    assert m is not None, key
    path = [int(n) for n in m.group(1).split(".") if n]
    part = find(tree, path)
    if part is None:
        return b""
    what = m.group(2)
    if what == "MIME":
        return part.header
    if what in ("HEADER", "TEXT") and path:
        part = part.message
        if part is None:
            return b""
    return {"HEADER": part.header, "TEXT": part.body}.get(what, part.body if path else part.whole)


def part_paths(bs: Value, prefix: str = "") -> list[tuple[str, bool]]:
    """(section number, is message/rfc822) of every part a parsed BODYSTRUCTURE describes."""
    out: list[tuple[str, bool]] = []
    if isinstance(bs[0], list):  # multipart: the parts come first
        kids = [p for p in bs if isinstance(p, list) and p and isinstance(p[0], (list, bytes))]
        for n, kid in enumerate(k for k in kids if isinstance(k[0], list) or len(k) > 6):
            path = f"{prefix}{n + 1}"
            out += _one(kid, path)
        return out
    return _one(bs, f"{prefix}1") if not prefix else out


def _one(bs: Value, path: str) -> list[tuple[str, bool]]:
    if isinstance(bs[0], list):
        return [(path, False), *part_paths(bs, path + ".")]
    rfc822 = bs[0].lower() == b"message" and bs[1].lower() == b"rfc822"
    out = [(path, rfc822)]
    if rfc822:
        inner = bs[8]
        if isinstance(inner[0], list):
            out += part_paths(inner, path + ".")
        else:
            out += _one(inner, path + ".1")
    return out


def items_for(bs: Value) -> list[str]:
    items = [
        "BODYSTRUCTURE",
        "BODY",
        "ENVELOPE",
        "RFC822.SIZE",
        "BODY.PEEK[HEADER]",
        "BODY.PEEK[TEXT]",
        "BODY.PEEK[HEADER.FIELDS (FROM SUBJECT DATE)]",
    ]
    for path, rfc822 in part_paths(bs):
        items += [f"BODY.PEEK[{path}]", f"BODY.PEEK[{path}.MIME]"]
        if rfc822:
            items += [f"BODY.PEEK[{path}.HEADER]", f"BODY.PEEK[{path}.TEXT]"]
    return items


# -- 1. hand-computed values -----------------------------------------------------------------

MIXED = (
    b'From: "Rossi, Mario" <mario@example.org>\r\n'
    b"To: undisclosed-recipients:;\r\n"
    b"Cc: Anna <anna@example.org>, b@example.org (Bea)\r\n"
    b"Subject: Fattura\r\n\tdi marzo\r\n"
    b"Date:  Mon, 2 Mar 2026 10:15:00 +0100 (CET)\r\n"
    b"Message-ID: <m1@example.org>\r\n"
    b"MIME-Version: 1.0\r\n"
    b'Content-Type: multipart/mixed; boundary="B1"\r\n'
    b"Content-Language: it\r\n"
    b"\r\n"
    b"preamble\r\n"
    b"--B1\r\n"
    b"Content-Type: text/plain; charset=utf-8\r\n"
    b"Content-Transfer-Encoding: quoted-printable\r\n"
    b"\r\n"
    b"Citt=C3=A0\r\n"
    b"riga due\r\n"
    b"--B1\r\n"
    b'Content-Type: application/xml; name="daticert.xml"\r\n'
    b'Content-Disposition: inline; filename="daticert.xml"\r\n'
    b"Content-Transfer-Encoding: base64\r\n"
    b"Content-ID: <d1>\r\n"
    b"Content-Description: dati\r\n"
    b"Content-Language: it, en\r\n"
    b"Content-Location: http://example.org/d.xml\r\n"
    b"\r\n"
    b"PHgvPg==\r\n"
    b"--B1\r\n"
    b"Content-Type: message/rfc822\r\n"
    b"\r\n"
    b"From: x@example.org\r\n"
    b"Subject: inner\r\n"
    b"\r\n"
    b"inner body\r\n"
    b"last\r\n"
    b"--B1--\r\n"
    b"epilogue\r\n"
)


def test_multipart_mixed_bodystructure_by_hand() -> None:
    tree = parse(MIXED)
    text = b'("text" "plain" ("charset" "utf-8") NIL NIL "quoted-printable" 20 1'
    xml = (
        b'("application" "xml" ("name" "daticert.xml") "<d1>" "dati" "base64" 8'
        b' NIL ("inline" ("filename" "daticert.xml")) ("it" "en") "http://example.org/d.xml")'
    )
    inner_env = (
        b'(NIL "inner" ((NIL NIL "x" "example.org")) ((NIL NIL "x" "example.org"))'
        b' ((NIL NIL "x" "example.org")) NIL NIL NIL NIL NIL)'
    )
    rfc822 = (
        b'("message" "rfc822" NIL NIL NIL "7bit" 55 ' + inner_env + b' ("text" "plain"'
        b' ("charset" "us-ascii") NIL NIL "7bit" 16 1 NIL NIL NIL NIL) 4 NIL NIL NIL NIL)'
    )
    # Sizes: "Citt=C3=A0\r\nriga due" is 20 octets and 1 line (the CRLF before "--B1" belongs
    # to the delimiter); the disposition is a list, not the header text.
    assert bytes(body_structure(tree, extended=True)) == (
        b"("
        + text
        + b" NIL NIL NIL NIL)"
        + xml
        + rfc822
        + b' "mixed" ("boundary" "B1") NIL ("it") NIL)'
    )
    assert bytes(body_structure(tree, extended=False)) == (
        b"(" + text + b")"
        b'("application" "xml" ("name" "daticert.xml") "<d1>" "dati" "base64" 8)'
        b'("message" "rfc822" NIL NIL NIL "7bit" 55 ' + inner_env + b' ("text" "plain"'
        b' ("charset" "us-ascii") NIL NIL "7bit" 16 1) 4) "mixed")'
    )
    # The envelope date is the header's text (leading white space dropped), the subject unfolded.
    assert bytes(envelope(tree)) == (
        b'("Mon, 2 Mar 2026 10:15:00 +0100 (CET)" "Fattura di marzo"'
        b' (("Rossi, Mario" NIL "mario" "example.org")) (("Rossi, Mario" NIL "mario" "example.org"))'
        b' (("Rossi, Mario" NIL "mario" "example.org"))'
        b' ((NIL NIL "undisclosed-recipients" NIL)(NIL NIL NIL NIL))'
        b' (("Anna" NIL "anna" "example.org")("Bea" NIL "b" "example.org")) NIL NIL "<m1@example.org>")'
    )


def section(tree_raw: bytes, path: list[int], what: str) -> bytes:
    tree = parse(tree_raw)
    part = find(tree, path)
    assert part is not None
    if what == "MIME":
        return part.header
    if what == "HEADER":
        assert part.message is not None
        return part.message.header
    if what == "TEXT":
        assert part.message is not None
        return part.message.body
    return part.body


def test_sections_by_hand() -> None:
    assert section(MIXED, [1], "") == b"Citt=C3=A0\r\nriga due"
    assert section(MIXED, [1], "MIME") == (
        b"Content-Type: text/plain; charset=utf-8\r\n"
        b"Content-Transfer-Encoding: quoted-printable\r\n\r\n"
    )
    assert section(MIXED, [2], "") == b"PHgvPg=="
    assert (
        section(MIXED, [3], "")
        == b"From: x@example.org\r\nSubject: inner\r\n\r\ninner body\r\nlast"
    )
    assert section(MIXED, [3], "HEADER") == b"From: x@example.org\r\nSubject: inner\r\n\r\n"
    assert section(MIXED, [3], "TEXT") == b"inner body\r\nlast"
    assert section(MIXED, [3, 1], "") == b"inner body\r\nlast"  # the inner message's only part
    assert section(MIXED, [3, 1], "MIME") == b"From: x@example.org\r\nSubject: inner\r\n\r\n"
    assert find(parse(MIXED), [4]) is None
    # A non-multipart message has exactly one part: its body.
    plain = b"Subject: x\r\n\r\nhello"
    assert section(plain, [1], "") == b"hello"
    assert section(plain, [1], "MIME") == b"Subject: x\r\n\r\n"


SIGNED = (
    b"From: posta-certificata@pec.example.test\r\n"
    b'Content-Type: multipart/signed; protocol="application/pkcs7-signature"; micalg=sha-256;'
    b' boundary="S"\r\n'
    b"\r\n"
    b"--S\r\n"
    b'Content-Type: multipart/mixed; boundary="M"\r\n'
    b"\r\n"
    b"--M\r\n"
    b"Content-Type: multipart/alternative; boundary=A\r\n"
    b"\r\n"
    b"--A\r\n"
    b"Content-Type: text/plain\r\n"
    b"\r\n"
    b"testo\r\n"
    b"--A\r\n"
    b"Content-Type: text/html\r\n"
    b"\r\n"
    b"<p>testo</p>\r\n"
    b"--A--\r\n"
    b"\r\n"
    b"--M\r\n"
    b"Content-Type: message/rfc822; name=postacert.eml\r\n"
    b"Content-Disposition: inline; filename=postacert.eml\r\n"
    b"\r\n"
    b"Subject: orig\r\n"
    b"Content-Type: multipart/mixed; boundary=O\r\n"
    b"\r\n"
    b"--O\r\n"
    b"\r\n"
    b"ciao\r\n"
    b"--O--\r\n"
    b"--M--\r\n"
    b"--S\r\n"
    b"Content-Type: application/pkcs7-signature; name=smime.p7s\r\n"
    b"Content-Transfer-Encoding: base64\r\n"
    b"Content-Disposition: attachment; filename=smime.p7s\r\n"
    b"\r\n"
    b"MIAGCSqGSIb3DQEHAqCAMIACAQExDzANBglghkgBZQMEAgEFADCABgkqhkiG9w0BBwEAAKCA\r\n"
    b"AAAA\r\n"
    b"--S--\r\n"
)


def test_signed_pec_shape_by_hand() -> None:
    tree = parse(SIGNED)
    assert tree.children is not None and len(tree.children) == 2
    _mixed, sig = tree.children
    assert bytes(body_structure(sig, extended=True)) == (
        b'("application" "pkcs7-signature" ("name" "smime.p7s") NIL NIL "base64" 78 NIL'
        b' ("attachment" ("filename" "smime.p7s")) NIL NIL)'
    )
    # The CRLF after "--O--" is the "--M--" delimiter's (RFC 2046), not the message's.
    postacert = find(tree, [1, 2])
    assert postacert is not None and postacert.body.endswith(b"ciao\r\n--O--")
    assert postacert.size == 78 and postacert.lines == 6
    # Dovecot counts it into the part (the one difference kept, see structure.parse).
    compat = find(parse(SIGNED, dovecot_crlf=True), [1, 2])
    assert compat is not None and compat.size == 80 and compat.lines == 7
    assert find(tree, [1, 2, 1]) is not None
    assert section(SIGNED, [1, 2, 1], "") == b"ciao"
    assert section(SIGNED, [1, 1, 2], "") == b"<p>testo</p>"
    # The signed content (BODY[1.MIME] + BODY[1]) is exactly what the signature covers.
    assert section(SIGNED, [1], "MIME") + section(SIGNED, [1], "") in SIGNED
    assert section(SIGNED, [1], "").endswith(b"--M--")


def test_no_trailing_crlf_and_missing_final_boundary() -> None:
    raw = b"Content-Type: multipart/mixed; boundary=z\r\n\r\n--z\r\n\r\nA\r\n--z\r\nContent-Type: text/html\r\n\r\nB\r\nC"
    assert bytes(body_structure(parse(raw), extended=True)) == (
        b'(("text" "plain" ("charset" "us-ascii") NIL NIL "7bit" 1 0 NIL NIL NIL NIL)'
        b'("text" "html" ("charset" "us-ascii") NIL NIL "7bit" 4 1 NIL NIL NIL NIL)'
        b' "mixed" ("boundary" "z") NIL NIL NIL)'
    )
    assert section(raw, [2], "") == b"B\r\nC"
    assert bytes(body_structure(parse(b"Subject: nt\r\n\r\nno trailing"), extended=False)) == (
        b'("text" "plain" ("charset" "us-ascii") NIL NIL "7bit" 11 0)'
    )
    # Header only, no blank line: all header, empty body.
    headonly = parse(b"Subject: x\r\n")
    assert headonly.header == b"Subject: x\r\n" and headonly.body == b""


def test_rfc2231_parameters_and_disposition() -> None:
    raw = (
        b'Content-Type: application/pdf; name*0="fat"; name*1="tura.pdf"\r\n'
        b"Content-Disposition: attachment; filename*=utf-8''citt%C3%A0.pdf; size=10\r\n"
        b"Content-Language: (commento) it-IT,\r\n en\r\n"
        b"\r\n"
        b"JVBER\r\n"
    )
    assert bytes(body_structure(parse(raw), extended=True)) == (
        b'("application" "pdf" ("name" "fattura.pdf") NIL NIL "7bit" 7 NIL'
        b' ("attachment" ("size" "10" "filename*" "utf-8\'\'citt%C3%A0.pdf")) ("it-IT" "en") NIL)'
    )


def test_nested_multipart_and_digest() -> None:
    raw = (
        b"Content-Type: multipart/mixed; boundary=q\r\n\r\n"
        b"--q\r\nContent-Type: multipart/digest; boundary=r\r\n\r\n"
        b"--r\r\n\r\nSubject: d\r\n\r\nhi\r\n--r--\r\n"
        b"--q\r\nContent-Type: text/plain; format=flowed\r\n\r\nsecond\r\n--q--\r\n"
    )
    assert bytes(body_structure(parse(raw), extended=False)) == (
        b'((("message" "rfc822" NIL NIL NIL "7bit" 16 (NIL "d" NIL NIL NIL NIL NIL NIL NIL NIL)'
        b' ("text" "plain" ("charset" "us-ascii") NIL NIL "7bit" 2 0) 2) "digest")'
        b'("text" "plain" ("format" "flowed" "charset" "us-ascii") NIL NIL "7bit" 6 0) "mixed")'
    )
    assert section(raw, [1, 1, 1], "") == b"hi"


# -- the messages compared -------------------------------------------------------------------

#: Headers ENVELOPE and BODYSTRUCTURE have more to say about than in helpers.ORIGINAL: an
#: encoded Subject, two addresses in To, an attachment's Content-Disposition.
ORIGINAL = (
    b"Date: Mon, 02 Mar 2026 10:15:00 +0100\r\n"
    b"From: Alice Rossi <alice@pec.example.test>\r\n"
    b"To: Bob <bob@pec.example.test>, dave@pec.other.test\r\n"
    b"Cc: carol@pec.example.test\r\n"
    b"Subject: =?utf-8?q?Fattura_n=2E_12_=E2=80=94_citt=C3=A0?=\r\n"
    b"Message-ID: <client-42@alice.laptop>\r\n"
    b"X-TipoRicevuta: completa\r\n"
    b"MIME-Version: 1.0\r\n"
    b'Content-Type: multipart/mixed; boundary="XYZ"\r\n'
    b"\r\n"
    b"--XYZ\r\nContent-Type: text/plain; charset=utf-8\r\n\r\nCiao Bob, in allegato.\r\n"
    b'--XYZ\r\nContent-Type: application/pdf; name="fattura.pdf"\r\n'
    b'Content-Disposition: attachment; filename="fattura.pdf"\r\n'
    b"Content-Transfer-Encoding: base64\r\n\r\n"
    b"JVBERi0xLjQKJcfsj6IKNSAwIG9iago8PC9MZW5ndGggNiAwIFI+PgpzdHJlYW0K\r\n--XYZ--\r\n"
)


#: Variants whose MIME structure another kind here already has (the virus notices, the second
#: preavviso): the ten left are one message per builder and receipt kind.
SAME_STRUCTURE = {"non-accettazione-virus", "preavviso-24h", "rilevazione-virus"}


def pec_messages(dev_pki: DevPki) -> list[tuple[str, bytes]]:
    """Every kind of message pecd emits, built with the test PKI."""
    rcpt_to = ["bob@pec.example.test", "dave@pec.other.test", "carol@pec.example.test"]
    kinds = every_kind(dev_pki, ORIGINAL, rcpt_to)
    return [(f"pecd:{name}", raw) for name, raw in kinds.items() if name not in SAME_STRUCTURE]


EDGE_CASES = [
    ("edge:mixed", MIXED),
    ("edge:signed", SIGNED),
    ("edge:no-trailing-crlf", b"Subject: nt\r\n\r\nno trailing"),
    (
        "edge:missing-final-boundary",
        b"Content-Type: multipart/mixed; boundary=z\r\n\r\n--z\r\n\r\nA\r\n--z\r\n"
        b"Content-Type: text/html\r\n\r\nB\r\nC",
    ),
    ("edge:header-only", b"Subject: x\r\n"),
    (
        "edge:rfc2231",
        b'Content-Type: application/pdf; name*0="fat"; name*1="tura.pdf"\r\n'
        b"Content-Disposition: attachment; filename*=utf-8''citt%C3%A0.pdf; size=10\r\n"
        b"Content-Language: (commento) it-IT,\r\n en\r\nContent-Location: http://e.org/x\r\n"
        b"\r\nJVBER\r\n",
    ),
    (
        "edge:base64-rfc822",
        b"Content-Type: multipart/mixed; boundary=o\r\n\r\n--o\r\n"
        b"Content-Type: message/rfc822\r\nContent-Transfer-Encoding: base64\r\n\r\n"
        b"U3ViamVjdDogeA0KDQpoaQ0K\r\n--o\r\nContent-Type: message/rfc822\r\n"
        b"Content-Transfer-Encoding: quoted-printable\r\n\r\nSubject: q\r\n\r\nqp\r\n--o--\r\n",
    ),
    (
        "edge:addresses",
        b'From: a@b (Mr A), "we\\"ird" <w@x>, =?utf-8?q?J=C3=B6rg?= <j@k>\r\n'
        b'From: second@x\r\nTo: grp: a@b.c, "q" <d@e.f>;, <@route:x@y.z>\r\n'
        b'Cc: Mario   "Q  x"\t Rossi <m@x>, "john doe"@x.y, <a@[1.2.3.4]>\r\n'
        b"Subject: first\r\nSubject:  \t second \r\n Line\r\nIn-Reply-To: <r@x>\r\n"
        b"Date: Thu, 15 Jan\r\n 2026 10:00:00 +0100\r\nMessage-ID:\r\n <long@id>\r\n\r\nbody\r\n",
    ),
]


@pytest.fixture(scope="module")
def messages(dev_pki: DevPki, corpus_dir: Path) -> list[tuple[str, bytes]]:
    corpus = [
        (f"corpus:{row['file']}", (corpus_dir / row["file"]).read_bytes())
        for row in read_manifest(corpus_dir)
    ]
    out: list[tuple[str, bytes]] = []
    seen: set[bytes] = set()
    for name, raw in [*pec_messages(dev_pki), *corpus, *EDGE_CASES]:
        data = to_crlf(raw)  # what the Maildir store keeps
        digest = hashlib.sha256(data).digest()
        if digest not in seen:
            seen.add(digest)
            out.append((name, data))
    return out


def fetch_all(
    client: imaplib.IMAP4, messages: list[tuple[str, bytes]], items_of: dict[str, list[str]] | None
) -> dict[str, dict[str, Value]]:
    """name -> item -> value for every message (found by its bytes) in the selected mailbox."""
    typ, data = client.uid("SEARCH", "ALL")
    assert typ == "OK"
    by_digest: dict[bytes, bytes] = {}
    for uid in data[0].split():
        typ, body = client.uid("FETCH", uid, "(BODY.PEEK[])")
        assert typ == "OK"
        by_digest[hashlib.sha256(fetch_items(body)["BODY[]"]).digest()] = uid
    out: dict[str, dict[str, Value]] = {}
    for name, raw in messages:
        uid = by_digest[hashlib.sha256(raw).digest()]
        if items_of is None:
            typ, data = client.uid("FETCH", uid, "(BODYSTRUCTURE)")
            wanted = items_for(fetch_items(data)["BODYSTRUCTURE"])
        else:
            wanted = items_of[name]
        typ, data = client.uid("FETCH", uid, "(" + " ".join(wanted) + ")")
        assert typ == "OK", data
        out[name] = fetch_items(data)
    return out


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return make_pki(tmp_path_factory.mktemp("pki"))


@pytest.fixture(scope="module")
def pecd_answers(
    tmp_path_factory: pytest.TempPathFactory, pki: Pki, messages: list[tuple[str, bytes]]
) -> dict[str, dict[str, Value]]:
    base = tmp_path_factory.mktemp("imap-structure")
    with Server(MaildirStore(base / "mail"), FakeAccounts(), pki) as srv:
        address, password = srv.new_user()
        for i, (_, raw) in enumerate(messages):
            assert srv.store.deliver(address, f"k{i}", raw).created
        with srv.logged_in(address, password) as c:
            assert c.select("INBOX")[0] == "OK"
            return fetch_all(c, messages, None)


# -- 2. pecd's answers against the stored bytes ------------------------------------------------


def _node(bs: Value, path: str) -> Value:
    """The BODYSTRUCTURE element of a section number."""
    node = bs
    for n in (int(x) for x in path.split(".")):
        if isinstance(node[0], list):
            node = [p for p in node if isinstance(p, list)][n - 1]
        elif node[0].lower() == b"message" and node[1].lower() == b"rfc822":
            inner = node[8]
            node = (
                [p for p in inner if isinstance(p, list)][n - 1]
                if isinstance(inner[0], list)
                else inner
            )
        else:
            assert n == 1
    return node


def test_pecd_answers_match_the_stored_bytes(
    messages: list[tuple[str, bytes]], pecd_answers: dict[str, dict[str, Value]]
) -> None:
    parts_checked = 0
    for name, raw in messages:
        got = pecd_answers[name]
        assert got["RFC822.SIZE"] == len(raw), name
        assert got["BODY[HEADER]"] + got["BODY[TEXT]"] == raw, name
        date = re.search(rb"^Date:[ \t]*(.*(?:\r\n[ \t].*)*)\r\n", raw, re.M | re.I)
        env_date = got["ENVELOPE"][0]
        if date is not None and b"\r\nDate:" not in raw[date.end() :]:
            assert env_date == date.group(1).replace(b"\r\n", b""), name
        bs = got["BODYSTRUCTURE"]
        for path, _rfc822 in part_paths(bs):
            body = got[f"BODY[{path}]"]
            mime = got[f"BODY[{path}.MIME]"]
            assert mime + body in raw, (name, path)
            node = _node(bs, path)
            if not isinstance(node[0], list):
                assert node[6] == len(body), (name, path)  # body-fld-octets
                is_text = node[0].lower() == b"text"
                is_msg = node[0].lower() == b"message" and node[1].lower() == b"rfc822"
                if is_text:
                    assert node[7] == body.count(b"\n"), (name, path)
                if is_msg:
                    assert node[9] == body.count(b"\n"), (name, path)
                    if node[5].lower() != b"base64":  # a base64 message is not entered
                        assert got[f"BODY[{path}.HEADER]"] + got[f"BODY[{path}.TEXT]"] == body
                # body-fld-dsp is a list (or NIL), never the header's text.
                dsp = node[9] if is_text else node[11] if is_msg else node[8]
                assert dsp is None or isinstance(dsp, list), (name, path, dsp)
            parts_checked += 1
    assert parts_checked > 100


def test_signed_content_from_sections_verifies(
    messages: list[tuple[str, bytes]],
    pecd_answers: dict[str, dict[str, Value]],
    corpus_dir: Path,
    tmp_path: Path,
) -> None:
    """BODY[1.MIME] + BODY[1] of each signed message is exactly what BODY[2] signs (RFC 1847),
    so a client that fetches parts can check the signature (openssl, signature only)."""
    intact = {
        f"corpus:{row['file']}"
        for row in read_manifest(corpus_dir)
        if "cms-verify-noverify OK" in row["notes"]  # the "-edited" files no longer verify
    }
    checked = 0
    for name, _ in messages:
        if not (name.startswith("pecd:") or name in intact):
            continue
        got = pecd_answers[name]
        bs = got["BODYSTRUCTURE"]
        if not isinstance(bs[0], list) or bs[-5].lower() != b"signed":
            continue
        content = tmp_path / "content"
        content.write_bytes(got["BODY[1.MIME]"] + got["BODY[1]"])
        sig = tmp_path / "sig.der"
        sig.write_bytes(base64.b64decode(got["BODY[2]"]))
        r = subprocess.run(
            [
                *("openssl", "cms", "-verify", "-binary", "-inform", "DER", "-in", str(sig)),
                *("-content", str(content), "-noverify", "-out", "/dev/null"),
            ],
            capture_output=True,
            check=False,
        )
        assert r.returncode == 0, (name, r.stderr[-500:])
        checked += 1
    assert checked == len(intact) + 10, checked


# -- 3. Dovecot, for the same bytes ------------------------------------------------------------


class Dovecot:
    """A throwaway Dovecot on a loopback port serving one Maildir (plain LOGIN, test only)."""

    def __init__(self, messages: list[bytes]) -> None:
        self.dir = Path(tempfile.mkdtemp(prefix="pecd-dovecot-", dir="/tmp"))
        os.chmod(self.dir, 0o755)
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = int(s.getsockname()[1])
        if os.geteuid() == 0:
            user = login_user = "dovecot"
            null = "dovenull"
        else:
            user = login_user = null = pwd.getpwuid(os.geteuid()).pw_name
        owner = pwd.getpwnam(user)
        conf = f"""base_dir = {self.dir}/run
state_dir = {self.dir}/state
log_path = {self.dir}/dovecot.log
protocols = imap
listen = 127.0.0.1
ssl = no
disable_plaintext_auth = no
auth_mechanisms = plain
default_internal_user = {login_user}
default_internal_group = {grp.getgrgid(pwd.getpwnam(login_user).pw_gid).gr_name}
default_login_user = {null}
first_valid_uid = 1
passdb {{
  driver = static
  args = password=pw
}}
userdb {{
  driver = static
  args = uid={owner.pw_uid} gid={owner.pw_gid} home={self.dir}/home/%u
}}
mail_location = maildir:~/Maildir
service imap-login {{
  inet_listener imap {{
    address = 127.0.0.1
    port = {self.port}
  }}
  inet_listener imaps {{
    port = 0
  }}
}}
"""
        (self.dir / "dovecot.conf").write_text(conf)
        maildir = self.dir / "home" / "u" / "Maildir"
        for sub in ("cur", "new", "tmp"):
            (maildir / sub).mkdir(parents=True)
        for i, raw in enumerate(messages):
            (maildir / "cur" / f"{1700000000 + i}.M{i}P1.test:2,").write_bytes(raw)
        for root, _dirs, files in os.walk(self.dir / "home"):
            os.chown(root, owner.pw_uid, owner.pw_gid)
            for f in files:
                os.chown(os.path.join(root, f), owner.pw_uid, owner.pw_gid)
        self.proc = subprocess.Popen(
            [DOVECOT, "-F", "-c", str(self.dir / "dovecot.conf")],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )

    def client(self) -> imaplib.IMAP4:
        deadline = time.monotonic() + 20
        while True:
            try:
                c = imaplib.IMAP4("127.0.0.1", self.port, timeout=20)
                break
            except OSError:
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    log = self.dir / "dovecot.log"
                    raise RuntimeError(log.read_text() if log.exists() else "no log") from None
                time.sleep(0.05)
        c.login("u", "pw")
        return c

    def close(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:  # pragma: no cover
            self.proc.kill()
            self.proc.wait()
        shutil.rmtree(self.dir, ignore_errors=True)


@pytest.fixture(scope="module")
def dovecot_answers(
    messages: list[tuple[str, bytes]], pecd_answers: dict[str, dict[str, Value]]
) -> Iterator[dict[str, dict[str, Value]]]:
    if not os.path.exists(DOVECOT):
        pytest.skip("Dovecot is not installed")
    server = Dovecot([raw for _, raw in messages])
    try:
        c = server.client()
        try:
            assert c.select("INBOX")[0] == "OK"
            # The items asked come from Dovecot's own BODYSTRUCTURE; pecd is asked the same.
            answers = fetch_all(c, messages, None)
        finally:
            with contextlib.suppress(Exception):
                c.logout()
        yield answers
    finally:
        server.close()


def test_pecd_answers_like_dovecot(
    messages: list[tuple[str, bytes]],
    pecd_answers: dict[str, dict[str, Value]],
    dovecot_answers: dict[str, dict[str, Value]],
) -> None:
    differences: list[str] = []
    identical = known = skipped = parts = 0
    for name, raw in messages:
        theirs = dovecot_answers[name]
        ours = pecd_answers[name]
        parts += sum(1 for k in theirs if k.endswith(".MIME]"))
        # Sections inside a base64 message/rfc822 (which RFC 2046 forbids): both servers leave
        # it unparsed but Dovecot then answers its sub-sections with the encoded text.
        opaque = [
            f"BODY[{p}."
            for p, rfc822 in part_paths(theirs["BODYSTRUCTURE"])
            if rfc822 and _node(theirs["BODYSTRUCTURE"], p)[5].lower() == b"base64"
        ]
        for key, value in theirs.items():
            if key not in ours:
                # pecd was asked from its own BODYSTRUCTURE: a part Dovecot sees and pecd not.
                differences.append(f"{name} {key}: missing from pecd")
            elif ours[key] == value:
                identical += 1
            elif any(key.startswith(o) for o in opaque):
                skipped += 1
            elif (
                "HEADER.FIELDS" not in key
                and offline(raw, key, dovecot_crlf=True) == value
                and offline(raw, key, dovecot_crlf=False) == ours[key]
            ):
                known += 1  # only the CRLF after a close delimiter (see structure.parse)
            else:
                differences.append(f"{name} {key}:\n  pecd    {ours[key]!r}\n  dovecot {value!r}")
    assert not differences, "\n".join(differences)
    assert identical > 600 and parts > 150, (identical, parts)
    print(
        f"{len(messages)} messages, {parts} parts: {identical} items identical to Dovecot's,"
        f" {known} differ only by the close-delimiter CRLF, {skipped} inside base64 rfc822"
    )


def test_a_message_of_a_million_boundaries_is_described_in_bounded_parts() -> None:
    """A hostile message of boundary lines only: at most MAX_PARTS parts are split out (the rest
    is the last part's body), so describing it costs bounded time and memory on the event loop."""
    import time

    from pecd.imap.structure import MAX_PARTS
    from pecd.imap.structure import parse as parse_structure

    raw = b"Content-Type: multipart/mixed; boundary=b\r\n\r\n" + b"--b\r\n" * 1_000_000
    start = time.monotonic()
    tree = parse_structure(raw)
    elapsed = time.monotonic() - start

    def count(part: object) -> int:
        children = getattr(part, "children", None) or []
        message = getattr(part, "message", None)
        return 1 + sum(count(c) for c in children) + (count(message) if message else 0)

    print(f"parsed in {elapsed:.3f} s")
    assert count(tree) <= MAX_PARTS
    assert tree.children[-1].end == len(raw)  # nothing is lost: the rest is the last part's
