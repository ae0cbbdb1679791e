"""The breve delivery receipt transformation (spec/pec.md section 2.3): pecd.pec.breve."""

from __future__ import annotations

import email
import hashlib
import re
from email import policy
from email.message import Message
from email.utils import collapse_rfc2231_value
from urllib.parse import quote

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from helpers import CORPUS_DIR as CORPUS
from pecd.pec.breve import HashedPart, to_breve
from pecd.pec.vocab import HASH_SUFFIX

ATTACH = "postacert-inner__aruba__toniorusso-postacert.eml"
NOATTACH = "postacert-inner__aruba__toniorusso-postacertnoattach.eml"
XDCR = "posta-certificata__aruba__fabioportieri-xdcr-2022-02-00583.eml"
HEX40 = re.compile(r"[0-9a-f]{40}")


def corpus(name: str) -> bytes:
    return (CORPUS / name).read_bytes()


def parse(raw: bytes) -> Message:
    return email.message_from_bytes(raw, policy=policy.compat32)


def email_route_sha1(part: Message) -> str:
    """The hash computed independently of pecd.pec.breve, through the email package.

    For a non-multipart part, ``get_payload(decode=False)`` is the body text as it sits in the
    message (still base64) between the blank line after the part headers and the line ending
    that belongs to the next boundary delimiter (the feed parser drops that one line ending).
    Bytes came in through ``message_from_bytes`` (ASCII with surrogateescape), so encoding back
    gives the original bytes; turning every line ending into CRLF gives the canonical form that
    to_breve hashes. Both routes must agree.
    """
    payload = part.get_payload(decode=False)
    assert isinstance(payload, str)
    body = payload.encode("ascii", "surrogateescape")
    return hashlib.sha1(re.sub(rb"\r?\n", b"\r\n", body)).hexdigest()


def hash_parts(msg: Message) -> list[Message]:
    return [p for p in msg.walk() if (p.get_filename() or "").endswith(HASH_SUFFIX)]


# --- the real corpus ---------------------------------------------------------------------------


def test_attachments_become_hash_parts() -> None:
    raw = corpus(ATTACH)
    out, hashed = to_breve(raw)
    # The Aruba webmail message carries two attachments (a PDF and a PNG).
    assert [h.filename for h in hashed] == [
        "MuleSoft_RPA_Architecture_Summary.pdf",
        "rpa flowchart 191223.PNG",  # RFC 2047 Q: "_" is a space
    ]
    originals = [p for p in parse(raw).walk() if p.get_filename()]
    assert [h.sha1_hex for h in hashed] == [email_route_sha1(p) for p in originals]
    assert all(HEX40.fullmatch(h.sha1_hex) for h in hashed)

    reparsed = parse(out)
    assert [p.get_content_type() for p in reparsed.walk()] == [
        "multipart/mixed",
        "multipart/alternative",
        "text/plain",
        "text/html",
        "text/plain",
        "text/plain",
    ]
    new_parts = hash_parts(reparsed)
    assert [p.get_filename() for p in new_parts] == [h.filename + ".hash" for h in hashed]
    for part, h in zip(new_parts, hashed, strict=True):
        assert part.get_param("name") == h.filename + ".hash"
        assert part.get_content_charset() == "us-ascii"
        assert part["Content-Transfer-Encoding"] == "7bit"
        assert part.get_content_disposition() == "attachment"
        assert part.get_payload() == h.sha1_hex + "\n"
    assert b"\r\n" not in out  # the LF message stays LF


def test_bytes_outside_replaced_parts_are_unchanged() -> None:
    raw = corpus(ATTACH)
    out, _ = to_breve(raw)
    start = raw.index(b"Content-Type: application/pdf")
    assert out[:start] == raw[:start]
    close = raw.rindex(b"\n--_=__=_XaM3_.1713786808.2A.526143.42.34697.52.42.007.821530095--")
    assert out.endswith(raw[close:])
    # Between the two replaced parts only the delimiter line survives, unchanged.
    delimiter = b"\n--_=__=_XaM3_.1713786808.2A.526143.42.34697.52.42.007.821530095\n"
    assert out.count(delimiter) == raw.count(delimiter)
    pdf_end = raw.index(delimiter, start)
    png_start = raw.index(b"Content-Type: image/png")
    assert raw[pdf_end:png_start] == delimiter
    assert len(out) < len(raw) // 10


def test_message_without_attachments_is_unchanged() -> None:
    raw = corpus(NOATTACH)
    assert to_breve(raw) == (raw, [])


def test_crlf_message_same_hashes_and_crlf_insertions() -> None:
    raw = corpus(ATTACH).replace(b"\n", b"\r\n")
    out, hashed = to_breve(raw)
    assert [h.sha1_hex for h in hashed] == [h.sha1_hex for h in to_breve(corpus(ATTACH))[1]]
    assert re.search(rb"(?<!\r)\n", out) is None


def _inner_postacert() -> bytes:
    envelope = parse(corpus(XDCR))
    for part in envelope.walk():
        if part.get_content_type() == "message/rfc822":
            inner = part.get_payload(0)
            assert isinstance(inner, Message)
            return inner.as_bytes()
    raise AssertionError("no postacert.eml in the envelope")


def test_rfc2047_filename_is_decoded() -> None:
    raw = _inner_postacert()
    assert b"=?utf-8?Q?xdcr=5F2022=5F02=5F00583.txt?=" in raw
    out, hashed = to_breve(raw)
    assert len(hashed) == 1
    assert hashed[0].filename == "xdcr_2022_02_00583.txt"
    (part,) = hash_parts(parse(out))
    assert part.get_filename() == "xdcr_2022_02_00583.txt.hash"
    original = next(p for p in parse(raw).walk() if p.get_filename())
    assert hashed[0].sha1_hex == email_route_sha1(original)


def test_signed_envelope_keeps_signature_part() -> None:
    """A whole PEC envelope: daticert.xml and postacert.eml go, smime.p7s stays."""
    raw = corpus(XDCR)
    out, hashed = to_breve(raw)
    assert [h.filename for h in hashed] == ["daticert.xml", "postacert.eml"]
    signature = raw[raw.index(b"Content-Type: application/x-pkcs7-signature") :]
    assert out.endswith(signature)
    reparsed = parse(out)
    assert reparsed.get_content_type() == "multipart/signed"
    assert [p.get_content_type() for p in reparsed.get_payload()] == [  # type: ignore[union-attr]
        "multipart/mixed",
        "application/x-pkcs7-signature",
    ]
    header_end = raw.index(b"\n\n")
    assert out[:header_end] == raw[:header_end]


# --- synthetic messages -------------------------------------------------------------------------

NESTED = b"""From: a@pec.example.it
To: b@pec.example.it
Subject: nested
MIME-Version: 1.0
Content-Type: multipart/mixed; boundary="OUTER"

preamble
--OUTER
Content-Type: text/plain; charset=us-ascii

Hello.
--OUTER
Content-Type: message/rfc822

From: c@example.it
Subject: inner
MIME-Version: 1.0
Content-Type: multipart/mixed; boundary="INNER"

--INNER
Content-Type: text/plain

inner text
--INNER
Content-Type: application/octet-stream; name="inner.bin"
Content-Transfer-Encoding: base64

AAECAw==
--INNER--
--OUTER
Content-Type: application/pdf
Content-Disposition: attachment; filename*=utf-8''caff%C3%A8.pdf
Content-Transfer-Encoding: base64

JVBERi0xLjQK
--OUTER--
epilogue
"""


def test_nested_message_replaced_whole() -> None:
    out, hashed = to_breve(NESTED)
    assert [h.filename for h in hashed] == ["messaggio.eml", "caffè.pdf"]
    inner_start = NESTED.index(b"From: c@example.it")
    inner_end = NESTED.index(b"--INNER--\n") + len(b"--INNER--")
    inner = NESTED[inner_start:inner_end].replace(b"\n", b"\r\n")
    assert hashed[0].sha1_hex == hashlib.sha1(inner).hexdigest()
    assert hashed[1].sha1_hex == hashlib.sha1(b"JVBERi0xLjQK").hexdigest()
    assert b"inner.bin" not in out and b"INNER" not in out
    prefix_end = NESTED.index(b"Content-Type: message/rfc822")
    assert out[:prefix_end] == NESTED[:prefix_end]
    assert out.endswith(b"\n--OUTER--\nepilogue\n")

    reparsed = parse(out)
    assert [p.get_content_type() for p in reparsed.walk()] == [
        "multipart/mixed",
        "text/plain",
        "text/plain",
        "text/plain",
    ]
    names = [p.get_filename() for p in hash_parts(reparsed)]
    assert names == ["messaggio.eml.hash", "caffè.pdf.hash"]
    assert b"filename*=utf-8''caff%C3%A8.pdf.hash" in out  # RFC 2231 for the non-ASCII name
    assert reparsed.preamble == "preamble"


def test_digest_parts_default_to_message() -> None:
    raw = b"Content-Type: multipart/digest; boundary=D\n\n--D\n\nFrom: x@y.it\n\nhi\n--D--\n"
    _, hashed = to_breve(raw)
    assert [h.filename for h in hashed] == ["messaggio.eml"]
    assert hashed[0].sha1_hex == hashlib.sha1(b"From: x@y.it\r\n\r\nhi").hexdigest()


SIGNED = b"""From: a@pec.example.it
Content-Type: multipart/signed; protocol="application/pkcs7-signature"; micalg=sha-256;
 boundary="SIG"

This is an S/MIME signed message
--SIG
Content-Type: multipart/mixed; boundary="MIX"

--MIX
Content-Type: text/plain

body
--MIX
Content-Type: text/plain; name="a.txt"

attached
--MIX--

--SIG
Content-Type: application/pkcs7-signature; name="smime.p7s"
Content-Disposition: attachment; filename="smime.p7s"
Content-Transfer-Encoding: base64

MIIBAAAA
--SIG--
"""


def test_multipart_signed_structure_kept() -> None:
    out, hashed = to_breve(SIGNED)
    assert hashed == [HashedPart("a.txt", hashlib.sha1(b"attached").hexdigest())]
    signature = SIGNED[SIGNED.index(b"\n--SIG\nContent-Type: application/pkcs7-signature") :]
    assert out.endswith(signature)
    reparsed = parse(out)
    assert [p.get_content_type() for p in reparsed.walk()] == [
        "multipart/signed",
        "multipart/mixed",
        "text/plain",
        "text/plain",
        "application/pkcs7-signature",
    ]


@pytest.mark.parametrize("ctype", ["application/pkcs7-mime", "application/x-pkcs7-mime"])
def test_pkcs7_mime_untouched(ctype: str) -> None:
    raw = (
        f"From: a@pec.example.it\r\nContent-Type: {ctype}; smime-type=enveloped-data;"
        ' name="smime.p7m"\r\nContent-Disposition: attachment; filename="smime.p7m"\r\n'
        "Content-Transfer-Encoding: base64\r\n\r\nMIAGCSqGSIb3DQEHA6CAMIACAQAx\r\n"
    ).encode()
    assert to_breve(raw) == (raw, [])


def test_single_part_message_is_not_replaced() -> None:
    raw = b'Content-Type: application/pdf; name="x.pdf"\n\nJVBERi0=\n'
    assert to_breve(raw) == (raw, [])


def test_inline_part_without_name_is_kept_and_name_only_is_enough() -> None:
    raw = (
        b"Content-Type: multipart/related; boundary=R\n\n--R\nContent-Type: text/html\n\n<p>\n"
        b'--R\nContent-Type: image/png; name="logo.png"\nContent-ID: <logo>\n\niVBO\n--R--\n'
    )
    out, hashed = to_breve(raw)
    assert [h.filename for h in hashed] == ["logo.png"]
    assert b"<p>" in out and b"Content-ID" not in out


def test_long_and_awkward_names_are_encoded() -> None:
    long_name = "fattura elettronica n° 12345 del 31-12-2024 – copia conforme all'originale.pdf"
    quoted = 'a "quoted" name.txt'
    raw = (
        b"Content-Type: multipart/mixed; boundary=B\n\n"
        b"--B\nContent-Type: text/plain\nContent-Disposition: attachment;\n filename*0*=utf-8''"
        + quote(long_name[:40]).encode()
        + b";\n filename*1*="
        + quote(long_name[40:]).encode()
        + b'\n\nx\n--B\nContent-Type: text/plain; name="a \\"quoted\\" name.txt"\n\ny\n--B--\n'
    )
    out, hashed = to_breve(raw)
    assert [h.filename for h in hashed] == [long_name, quoted]
    reparsed = parse(out)
    assert [p.get_filename() for p in hash_parts(reparsed)] == [
        long_name + ".hash",
        quoted + ".hash",
    ]
    assert [collapse_rfc2231_value(p.get_param("name") or "") for p in hash_parts(reparsed)] == [
        long_name + ".hash",
        quoted + ".hash",
    ]
    for line in out.split(b"\n"):
        assert len(line) <= 78
    assert out.isascii()


def test_raw_utf8_filename() -> None:
    raw = (
        "Content-Type: multipart/mixed; boundary=B\n\n"
        '--B\nContent-Type: text/plain; name="però.txt"\n\nx\n--B--\n'
    ).encode()
    out, hashed = to_breve(raw)
    assert [h.filename for h in hashed] == ["però.txt"]
    assert out.isascii()


def test_empty_filename_falls_back() -> None:
    raw = (
        b"Content-Type: multipart/mixed; boundary=B\n\n"
        b'--B\nContent-Type: text/plain; name=""\n\nx\n--B--\n'
    )
    _, hashed = to_breve(raw)
    assert [h.filename for h in hashed] == ["allegato"]


# --- malformed input ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "raw",
    [
        b"",
        b"no headers at all",
        b"Content-Type: multipart/mixed\n\n--B\nContent-Type: text/plain; name=a\n\nx\n--B--\n",
        b"Content-Type: multipart/mixed; boundary=Z\n\n--B\nContent-Type: text/plain; name=a\n\n",
        b'Content-Type: multipart/mixed; boundary=""\n\n--\n\n',
        b"\n\n\n",
    ],
    ids=["empty", "garbage", "no-boundary", "no-delimiter", "empty-boundary", "blank"],
)
def test_unparseable_structure_returns_original(raw: bytes) -> None:
    assert to_breve(raw) == (raw, [])


def test_missing_close_delimiter_still_replaces() -> None:
    raw = (
        b"Content-Type: multipart/mixed; boundary=B\n\n--B\nContent-Type: text/plain; name=a\n\nx\n"
    )
    out, hashed = to_breve(raw)
    assert hashed == [HashedPart("a", hashlib.sha1(b"x\r\n").hexdigest())]
    assert out.startswith(b"Content-Type: multipart/mixed; boundary=B\n\n--B\n")


def test_deep_nesting_is_bounded() -> None:
    depth = 200
    head = b"".join(
        b"--B%d\nContent-Type: multipart/mixed; boundary=B%d\n\n" % (i, i + 1) for i in range(depth)
    )
    raw = (
        b"Content-Type: multipart/mixed; boundary=B0\n\n"
        + head
        + b'--B200\nContent-Type: text/plain; name="deep.txt"\n\nx\n'
    )
    out, hashed = to_breve(raw)
    assert (out, hashed) == (raw, [])


# --- fuzz ---------------------------------------------------------------------------------------


def _assert_sane(raw: bytes) -> None:
    out, hashed = to_breve(raw)
    assert isinstance(out, bytes)
    if not hashed:
        assert out == raw
    for h in hashed:
        assert HEX40.fullmatch(h.sha1_hex)


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=3000))
def test_fuzz_random_bytes_never_raise(raw: bytes) -> None:
    _assert_sane(raw)


_SEEDS = [NESTED, SIGNED, corpus(NOATTACH)]


@settings(max_examples=400, deadline=None)
@given(
    seed=st.sampled_from(_SEEDS),
    edits=st.lists(
        st.tuples(
            st.floats(0, 1),
            st.integers(0, 12),
            st.binary(max_size=8)
            | st.sampled_from([b"\n", b"\r\n", b"--", b"--OUTER", b"=?utf-8?Q?", b'"', b";"]),
        ),
        max_size=8,
    ),
)
def test_fuzz_mutated_messages_never_raise(
    seed: bytes, edits: list[tuple[float, int, bytes]]
) -> None:
    raw = seed
    for where, cut, insert in edits:
        pos = int(where * len(raw))
        raw = raw[:pos] + insert + raw[pos + cut :]
    _assert_sane(raw)
