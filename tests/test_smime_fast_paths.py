"""The quick paths of S/MIME signing and MIME reading give exactly what the plain code they
replace gave: each is compared with that plain code (kept here as the reference) on ordinary
and on hostile input."""

from __future__ import annotations

import binascii
import random
import re
from datetime import UTC, datetime

import pytest

from pecd.pec import smime
from pecd.pec.mime import delimiter_kind
from pecd.pec.pki import DevPki, create_dev_pki
from pecd.pec.smime import KeySigner, sign_multipart, verify

NOW = datetime(2026, 6, 1, 12, 0, 0, tzinfo=UTC)

# --- the reference: the plain code the quick paths replaced --------------------------------------

_DASH_LINE = re.compile(rb"^--([^\r\n]*)\r?$", re.MULTILINE)


def ref_delimiter(body: bytes, boundary: bytes, pos: int) -> tuple[int, int, bool] | None:
    for m in _DASH_LINE.finditer(body, pos):
        kind = delimiter_kind(m.group(1), boundary)
        if kind:
            return m.start(), m.end(), kind == 2
    return None


def ref_split_params(value: str) -> list[str]:
    parts: list[str] = []
    buf: list[str] = []
    quoted = escaped = False
    for ch in value:
        if escaped:
            escaped = False
        elif quoted and ch == "\\":
            escaped = True
        elif ch == '"':
            quoted = not quoted
        elif ch == ";" and not quoted:
            parts.append("".join(buf))
            buf = []
            continue
        buf.append(ch)
    parts.append("".join(buf))
    return parts


def ref_header_value(head: bytes, wanted: str) -> str | None:
    value: list[bytes] | None = None
    for line in head.split(b"\n"):
        line = line.removesuffix(b"\r")
        if line[:1] in (b" ", b"\t"):
            if value is not None:
                value.append(line)
            continue
        if value is not None:
            break
        name, colon, rest = line.partition(b":")
        if colon and name.strip().lower() == wanted.encode("ascii"):
            value = [rest]
    if value is None:
        return None
    return " ".join(v.decode("latin-1").strip() for v in value).strip()


def ref_base64_lines(data: bytes) -> bytes:
    text = binascii.b2a_base64(data, newline=False)
    return b"".join(text[i : i + 76] + b"\r\n" for i in range(0, len(text), 76))


def outcome(fn: object, *args: object) -> object:
    """What ``fn(*args)`` gives, or the type and text of what it raises."""
    try:
        return fn(*args)  # type: ignore[operator]
    except Exception as exc:
        return (type(exc), str(exc))


# --- inputs --------------------------------------------------------------------------------------

PIECES = [b"--", b"--b", b"--b--", b"b", b"\r\n", b"\n", b"\r", b" ", b"\t", b"x", b"--b \t", b"-"]


def bodies(seed: int, count: int) -> list[bytes]:
    rng = random.Random(seed)
    return [b"".join(rng.choice(PIECES) for _ in range(rng.randrange(0, 30))) for _ in range(count)]


@pytest.mark.parametrize("boundary", [b"b", b"", b"-", b"b--"])
def test_the_delimiter_search_finds_what_the_line_pattern_found(boundary: bytes) -> None:
    for body in bodies(14, 4000):
        for pos in {0, len(body) // 2, len(body)}:
            assert smime._delimiter(body, boundary, pos) == ref_delimiter(body, boundary, pos), (
                body,
                pos,
            )


def test_the_delimiter_search_on_a_long_hostile_body() -> None:
    # Many near misses: the boundary inside lines, after a CR, with a lone CR in its line.
    body = (b"x--b\r\n--b\rx\n --b\n--bb\n--b\r\r\n" * 2000) + b"--b  \r\n"
    assert smime._delimiter(body, b"b", 0) == ref_delimiter(body, b"b", 0)
    assert smime._delimiter(body, b"b", 0) is not None


VALUES = [
    "",
    "text/plain",
    'multipart/signed; protocol="application/pkcs7-signature"; micalg=sha-256; boundary="a;b"',
    'a; b="x\\"; y"; c=d',
    'a; b="unterminated; c=d',
    'a; b="x\\',
    'a; b=\\"x; c="y;z"',
    '";";";"',
    ";;",
    'x"y"z;w',
]


def test_parameters_split_as_before() -> None:
    rng = random.Random(7)
    alphabet = ['"', ";", "\\", "a", " ", "="]
    fuzz = ["".join(rng.choice(alphabet) for _ in range(rng.randrange(0, 20))) for _ in range(5000)]
    for value in VALUES + fuzz:
        assert smime._split_params(value) == ref_split_params(value), value


HEADS = [
    b"Content-Type: text/plain",
    b'X: 1\r\nContent-Type: multipart/signed;\r\n\tboundary="b"\r\nY: 2',
    b" Content-Type: folded, not a field\r\nContent-type : second",
    b"\x0c content-TYPE\t: odd space\n more\n\tand more\nNext: x",
    b"\rContent-Type: after a CR",
    b"X\rContent-Type: inside a line",
    b"Content-Type-Foo: no\r\ncontent-type:yes",
    b"Content-Transfer-Encoding: base64\r\nContent-Type: application/pkcs7-signature",
    b"\xa0Content-Type: \x85latin\xa0\r\n",
    b"",
]


@pytest.mark.parametrize("wanted", ["content-type", "content-transfer-encoding"])
def test_a_header_value_is_read_as_before(wanted: str) -> None:
    rng = random.Random(11)
    parts = [b"Content-Type", b"content-transfer-encoding", b":", b" ", b"\t", b"\r", b"\n"]
    parts += [b"\r\n", b"\x0b", b"\x0c", b"x", b"X-Other: v"]
    fuzz = [b"".join(rng.choice(parts) for _ in range(rng.randrange(0, 25))) for _ in range(5000)]
    for head in HEADS + fuzz:
        assert smime._header_value(head, wanted) == ref_header_value(head, wanted), head


@pytest.mark.parametrize("size", [0, 1, 2, 3, 56, 57, 58, 114, 1300, 1301])
def test_base64_lines_as_before(size: int) -> None:
    data = bytes(range(256)) * 6
    assert smime._base64_lines(data[:size]) == ref_base64_lines(data[:size])


HEADER_SETS: list[list[tuple[str, str]]] = [
    [],
    [("Subject", "ciao"), ("To", "a@b.it")],
    [("Subject", "caffè ☕")],
    [("Subject", "folded\r\n continued")],
    [("Subject", "folded\n\tcontinued with LF")],
    [("Subject", "a\r\nNew: field")],
    [("Subject", "bare\rCR")],
    [("Bad Name", "x")],
    [("", "x")],
    [("Ok", "x"), ("Bad:Name", "y")],
    [("Ok", "lone surrogate \udc80"), ("Bad Name", "y")],
    [("Ok", "\udc80")],
]


@pytest.mark.parametrize("headers", HEADER_SETS)
def test_the_header_block_is_what_each_line_gave(headers: list[tuple[str, str]]) -> None:
    def per_line() -> bytes:
        return b"".join(smime._header_line(n, v) for n, v in headers)

    assert outcome(smime._header_block, headers) == outcome(per_line)


def test_a_template_fills_in_any_order() -> None:
    der = b"%head%AAAA-mid%-BB-%tail"
    in_order = smime._Template.cut(der, [b"AAAA", b"BB"])
    reversed_ = smime._Template.cut(der, [b"BB", b"AAAA"])
    assert in_order is not None and reversed_ is not None
    assert in_order.fill([b"1111", b"22"]) == b"%head%1111-mid%-22-%tail"
    assert reversed_.fill([b"22", b"1111"]) == b"%head%1111-mid%-22-%tail"
    assert in_order.match(in_order.fill([b"1%11", b"%%"]), [4, 2]) == [b"1%11", b"%%"]


# --- whole messages ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def pki() -> DevPki:
    return create_dev_pki(domain="pec.fast.test", name="Fast PEC", now=NOW)


def reference_sign(
    headers: list[tuple[str, str]], inner: bytes, signer: KeySigner, digest: smime.DigestName
) -> bytes:
    """The message as sign_multipart assembled it before, around the same CMS and boundary."""
    boundary = "----=_pecd_smime_0123456789abcdef0123456789abcdef"
    der = smime._cms_sign_built(inner, signer, digest, NOW)
    delimiter = b"--" + boundary.encode("ascii")
    out = [smime._header_line(n, v) for n, v in headers]
    out.append(b"MIME-Version: 1.0\r\n")
    out.append(
        f'Content-Type: multipart/signed; protocol="{smime.CT_SIGNATURE}";\r\n'
        f'\tmicalg="{smime._MICALG[digest]}"; boundary="{boundary}"\r\n'.encode("ascii")
    )
    out += [
        b"\r\n",
        smime.SMIME_PREAMBLE.encode("ascii") + b"\r\n",
        delimiter + b"\r\n",
        inner,
        b"\r\n" + delimiter + b"\r\n",
        f'Content-Type: {smime.CT_SIGNATURE}; name="{smime.SMIME_FILENAME}"\r\n'.encode(),
        b"Content-Transfer-Encoding: base64\r\n",
        f'Content-Disposition: attachment; filename="{smime.SMIME_FILENAME}"\r\n'.encode(),
        b"\r\n",
        ref_base64_lines(der),
        b"\r\n" + delimiter + b"--" + b"\r\n",
    ]
    return b"".join(out)


@pytest.mark.parametrize("digest", ["sha1", "sha256"])
def test_a_signed_message_is_byte_for_byte_what_it_was(pki: DevPki, digest: str) -> None:
    signer = KeySigner.from_pem(pki.signing.key_pem, pki.signing.cert_pem)
    headers = [("Subject", "ACCETTAZIONE: prova è"), ("To", "a@pec.fast.test")]
    inner = b"Content-Type: text/plain\r\n\r\ncorpo\r\n"
    made = sign_multipart(
        headers,
        inner,
        signer,
        digest=digest,  # type: ignore[arg-type]
        signing_time=NOW,
        boundary="----=_pecd_smime_0123456789abcdef0123456789abcdef",
    )
    assert made == reference_sign(headers, inner, signer, digest)  # type: ignore[arg-type]
    assert verify(made).signed_content == inner


def test_the_signer_certificate_is_encoded_once_per_object(pki: DevPki) -> None:
    signer = KeySigner.from_pem(pki.signing.key_pem, pki.signing.cert_pem)
    der = smime._cert_der(signer.certificate)
    assert der == signer.certificate.public_bytes(smime.serialization.Encoding.DER)
    assert smime._cert_der(signer.certificate) is der
    other = KeySigner.from_pem(pki.signing.key_pem, pki.signing.cert_pem).certificate
    assert other is not signer.certificate and smime._cert_der(other) == der
