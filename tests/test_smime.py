"""S/MIME multipart/signed: our signatures (checked by openssl too), real provider messages, tampering
and fuzzing. ``verify`` may only ever succeed or raise SignatureError."""

from __future__ import annotations

import base64
import functools
import hashlib
import re
import subprocess
import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from asn1crypto import cms
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from helpers import CORPUS_DIR, PKI_NOW, openssl, read_manifest
from pecd.pec.pki import DevPki, create_dev_pki
from pecd.pec.smime import (
    KeySigner,
    SignatureError,
    cms_sign_detached,
    sign_multipart,
    split_signed,
    verify,
)
from pecd.pec.vocab import SMIME_PREAMBLE

SIGN_TIME = datetime(2026, 1, 15, 10, 30, tzinfo=UTC)
ALL_CODES = {
    "not-signed",
    "malformed-mime",
    "malformed-cms",
    "digest-mismatch",
    "bad-signature",
    "unsupported-algorithm",
    "no-signer-certificate",
    "expired",
    "not-yet-valid",
    "untrusted-chain",
}
HEADERS = [
    ("Return-Path", "<posta-certificata@pec.example.test>"),
    ("Date", "Thu, 15 Jan 2026 11:30:00 +0100"),
    ("From", '"Per conto di: alice@pec.example.test" <posta-certificata@pec.example.test>'),
    ("To", "bob@pec.other.test"),
    ("Subject", "POSTA CERTIFICATA: =?utf-8?q?Fattura_citt=C3=A0?=\r\n =?utf-8?q?_n=2E_12?="),
    ("X-Trasporto", "posta-certificata"),
]
# A realistic signed part (LF line endings on purpose: signing makes them CRLF). Note the trailing
# space on the multipart/mixed line: it is signed and must survive.
INNER = (
    b'Content-Type: multipart/mixed; \n boundary="----------=_mixed_1"\n'
    b"\n"
    b"This is a multi-part message in MIME format.\n"
    b"------------=_mixed_1\n"
    b'Content-Type: multipart/alternative; boundary="----------=_alt_1"\n'
    b"\n"
    b"------------=_alt_1\n"
    b'Content-Type: text/plain; charset="iso-8859-1"\n'
    b"Content-Transfer-Encoding: quoted-printable\n"
    b"\n"
    b"Messaggio di posta certificata\n"
    b"Il giorno 15/01/2026 alle ore 11:30:00 (+0100) il messaggio =\n"
    b'"Fattura citt=E0" =C3=A8 stato inviato da "alice@pec.example.test"\n'
    b"------------=_alt_1\n"
    b'Content-Type: text/html; charset="iso-8859-1"\n'
    b"Content-Transfer-Encoding: quoted-printable\n"
    b"\n"
    b"<html><body><p>Messaggio di posta certificata</p></body></html>\n"
    b"------------=_alt_1--\n"
    b"\n"
    b"------------=_mixed_1\n"
    b'Content-Type: application/xml; name="daticert.xml"\n'
    b'Content-Disposition: inline; filename="daticert.xml"\n'
    b"Content-Transfer-Encoding: base64\n"
    b"\n"
    + base64.encodebytes(
        b'<?xml version="1.0" encoding="UTF-8"?>\n<postacert tipo="posta-certificata" '
        b'errore="nessuno"><intestazione/><dati/></postacert>\n'
    )
    + b"\n------------=_mixed_1\n"
    b'Content-Type: message/rfc822; name="postacert.eml"\n'
    b'Content-Disposition: inline; filename="postacert.eml"\n'
    b"\n"
    b"From: alice@pec.example.test\n"
    b"To: bob@pec.other.test\n"
    b"Subject: Fattura\n"
    b"\n"
    b"Ciao Bob. \n"
    b"------------=_mixed_1--\n"
)


def crlf(data: bytes) -> bytes:
    return re.sub(rb"\r?\n", b"\r\n", data)


def sign(signer: Any, digest: str = "sha256", **kw: Any) -> bytes:
    return sign_multipart(HEADERS, INNER, signer, digest=digest, signing_time=SIGN_TIME, **kw)  # type: ignore[arg-type]


def openssl_attime(when: datetime) -> list[str]:
    return ["-attime", str(int(when.timestamp()))]


def error_code(raw: bytes, **kw: Any) -> str:
    with pytest.raises(SignatureError) as info:
        verify(raw, **kw)
    assert info.value.code in ALL_CODES
    assert str(info.value) == info.value.reason and info.value.reason
    return info.value.code


@pytest.fixture(scope="session")
def signed_sha256(signer: KeySigner) -> bytes:
    return sign(signer, "sha256")


@pytest.fixture(scope="session")
def signed_sha1(signer: KeySigner) -> bytes:
    return sign(signer, "sha1")


@pytest.fixture(scope="session")
def other_pki() -> DevPki:
    return create_dev_pki(domain="pec.other.test", name="Other PEC", now=PKI_NOW)


def load_cert(pem: bytes) -> x509.Certificate:
    return x509.load_pem_x509_certificate(pem)


# --- signing and verifying our own messages ----------------------------------------------------


@pytest.mark.parametrize(("digest", "micalg"), [("sha256", "sha-256"), ("sha1", "sha1")])
def test_sign_then_verify(signer: KeySigner, dev_pki: DevPki, digest: str, micalg: str) -> None:
    raw = sign(signer, digest)
    info = verify(raw)
    assert info.digest == digest
    assert info.micalg == micalg
    assert info.signing_time == SIGN_TIME
    assert info.signed_content == crlf(INNER)
    assert info.signer == signer.certificate
    der = signer.certificate.public_bytes(serialization.Encoding.DER)
    assert info.signer_sha1 == hashlib.sha1(der).hexdigest()
    assert info.certificates == (signer.certificate,)
    # With our CA as the only trust root, and at an explicit instant.
    ca = load_cert(dev_pki.ca.cert_pem)
    at = PKI_NOW + timedelta(days=400)
    assert verify(raw, trust_roots=[ca], at=at).signer == signer.certificate


@pytest.mark.parametrize("digest", ["sha256", "sha1"])
@pytest.mark.parametrize("purpose", ["any", "smimesign"])
def test_openssl_verifies_our_signature(
    signer: KeySigner, dev_pki: DevPki, tmp_path: Path, digest: str, purpose: str
) -> None:
    msg = tmp_path / "msg.eml"
    msg.write_bytes(sign(signer, digest))
    ca = tmp_path / "ca.pem"
    ca.write_bytes(dev_pki.ca.cert_pem)
    out = tmp_path / "content"
    result = subprocess.run(
        [
            *(openssl(), "cms", "-verify", "-inform", "SMIME", "-in", str(msg), "-CAfile", str(ca)),
            *("-purpose", purpose, "-out", str(out), *openssl_attime(SIGN_TIME)),
        ],
        capture_output=True,
        check=False,
    )
    assert result.returncode == 0, result.stderr.decode(errors="replace")
    assert out.read_bytes() == crlf(INNER)


def test_output_layout(signer: KeySigner, signed_sha1: bytes) -> None:
    raw = signed_sha1
    assert b"\n" not in raw.replace(b"\r\n", b"")  # CRLF everywhere
    head, _, body = raw.partition(b"\r\n\r\n")
    lines = head.split(b"\r\n")
    names = [ln.split(b":", 1)[0] for ln in lines if not ln.startswith((b" ", b"\t"))]
    assert names == [n.encode() for n, _ in HEADERS] + [b"MIME-Version", b"Content-Type"]
    unfolded = re.sub(rb"\r\n[ \t]", b" ", head).decode()
    m = re.search(
        r'Content-Type: multipart/signed; protocol="application/x-pkcs7-signature";'
        r' micalg="sha1"; boundary="([^"]+)"',
        unfolded,
    )
    assert m, unfolded
    boundary = m.group(1).encode()
    assert body.startswith(SMIME_PREAMBLE.encode() + b"\r\n--" + boundary + b"\r\n")
    assert body.endswith(b"\r\n--" + boundary + b"--\r\n")
    assert crlf(INNER) + b"\r\n--" + boundary + b"\r\n" in body
    p7s_head = (
        b'Content-Type: application/x-pkcs7-signature; name="smime.p7s"\r\n'
        b"Content-Transfer-Encoding: base64\r\n"
        b'Content-Disposition: attachment; filename="smime.p7s"\r\n\r\n'
    )
    assert p7s_head in body
    b64 = body.split(p7s_head)[1].split(b"\r\n--")[0]
    b64_lines = b64.rstrip(b"\r\n").split(b"\r\n")
    assert all(len(line) <= 76 for line in b64_lines)
    assert all(len(line) == 76 for line in b64_lines[:-1])
    assert split_signed(raw)[1] == base64.b64decode(b64)


def test_explicit_boundary(signer: KeySigner) -> None:
    raw = sign(signer, boundary="pecd-test-boundary")
    assert b'boundary="pecd-test-boundary"' in raw
    assert verify(raw).signed_content == crlf(INNER)
    with pytest.raises(ValueError):
        sign(signer, boundary="----------=_mixed_1")  # occurs in the signed part
    with pytest.raises(ValueError):
        sign(signer, boundary="bad\r\nboundary")


def test_caller_may_not_pass_mime_headers(signer: KeySigner) -> None:
    with pytest.raises(ValueError):
        sign_multipart(
            [("Content-Type", "text/plain")], INNER, signer, digest="sha1", signing_time=SIGN_TIME
        )
    with pytest.raises(ValueError):  # a header value that would inject a new field
        sign_multipart(
            [("Subject", "x\r\nBcc: evil@x")], INNER, signer, digest="sha1", signing_time=SIGN_TIME
        )


def test_lf_and_crlf_inner_sign_the_same_bytes(signer: KeySigner) -> None:
    a = verify(sign_multipart([], INNER, signer, digest="sha1", signing_time=SIGN_TIME))
    b = verify(sign_multipart([], crlf(INNER), signer, digest="sha1", signing_time=SIGN_TIME))
    assert a.signed_content == b.signed_content == crlf(INNER)


def test_lf_stored_message_still_verifies(signed_sha256: bytes) -> None:
    # Real provider messages are often stored with LF endings; the signature is over CRLF.
    lf = signed_sha256.replace(b"\r\n", b"\n")
    assert verify(lf).signed_content == crlf(INNER)


def test_header_variants_accepted(signed_sha1: bytes) -> None:
    head, _, body = signed_sha1.partition(b"\r\n\r\n")
    boundary = re.search(rb'boundary="([^"]+)"', head)
    assert boundary
    b = boundary.group(1)
    for ctype in (
        b"content-type: Multipart/Signed;\r\n boundary=" + b + b";\r\n\tmicalg=SHA1;"
        b" protocol=application/pkcs7-signature",
        b'CONTENT-TYPE: multipart/signed; micalg=sha1; boundary="' + b + b'"',
    ):
        raw = b"From: x@y\r\n" + ctype + b"\r\nX-Other: 1\r\n\r\n" + body
        raw = raw.replace(
            b"application/x-pkcs7-signature; name=", b"Application/PKCS7-Signature; name="
        )
        info = verify(raw)
        assert info.micalg == "sha1"


def test_cms_structure(signer: KeySigner) -> None:
    der = cms_sign_detached(b"hello\r\n", signer, digest="sha1", signing_time=SIGN_TIME)
    ci = cms.ContentInfo.load(der)
    assert ci["content_type"].native == "signed_data"
    sd = ci["content"]
    assert sd["version"].native == "v1"
    assert sd["encap_content_info"]["content"].native is None
    assert sd["encap_content_info"]["content_type"].native == "data"
    (si,) = sd["signer_infos"]
    assert si["version"].native == "v1"
    assert si["sid"].name == "issuer_and_serial_number"
    assert si["sid"].chosen["serial_number"].native == signer.certificate.serial_number
    assert si["digest_algorithm"]["algorithm"].native == "sha1"
    attrs = {a["type"].native: a["values"][0].native for a in si["signed_attrs"]}
    assert attrs["content_type"] == "data"
    assert attrs["signing_time"] == SIGN_TIME
    assert attrs["message_digest"] == hashlib.sha1(b"hello\r\n").digest()
    assert "smime_capabilities" in attrs


@pytest.mark.parametrize("digest", ["sha1", "sha256"])
@pytest.mark.parametrize("with_chain", [False, True])
def test_the_rsa_template_gives_the_bytes_asn1crypto_builds(
    dev_pki: DevPki, digest: Any, with_chain: bool
) -> None:
    from pecd.pec import smime

    signer = KeySigner.from_pem(
        dev_pki.signing.key_pem,
        dev_pki.signing.cert_pem,
        dev_pki.ca.cert_pem if with_chain else None,
    )
    for i, content in enumerate([b"", b"hello\r\n", INNER * 40]):
        when = SIGN_TIME + timedelta(days=400 * i, seconds=7 * i, microseconds=1234 * i)
        fast = cms_sign_detached(content, signer, digest=digest, signing_time=when)
        built = smime._cms_sign_built(content, signer, digest, when)
        assert fast == built  # RSA PKCS#1 v1.5 is deterministic: the bytes must be the same
    # Outside UTCTime's years the general path is taken, and still verifies.
    late = datetime(2051, 1, 1, tzinfo=UTC)
    der = cms_sign_detached(b"x", signer, digest=digest, signing_time=late)
    assert der == smime._cms_sign_built(b"x", signer, digest, late)
    assert smime._templates.cache_info().hits > 0


def test_chain_is_included(dev_pki: DevPki, signer: KeySigner) -> None:
    ca = load_cert(dev_pki.ca.cert_pem)
    with_chain = KeySigner.from_pem(
        dev_pki.signing.key_pem, dev_pki.signing.cert_pem, dev_pki.ca.cert_pem
    )
    info = verify(sign(with_chain), trust_roots=[ca])
    assert set(info.certificates) == {signer.certificate, ca}  # a SET OF: DER sorts it


def test_keysigner_refuses_mismatched_key(dev_pki: DevPki) -> None:
    with pytest.raises(ValueError):
        KeySigner.from_pem(dev_pki.tls.key_pem, dev_pki.signing.cert_pem)


def _ec_signer(dev_pki: DevPki) -> KeySigner:
    ca_key = serialization.load_pem_private_key(dev_pki.ca.key_pem, password=None)
    ca = load_cert(dev_pki.ca.cert_pem)
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(x509.NameOID.COMMON_NAME, "EC signer")]))
        .issuer_name(ca.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(PKI_NOW)
        .not_valid_after(PKI_NOW + timedelta(days=30))
        .add_extension(
            x509.KeyUsage(True, False, False, False, False, False, False, False, False),
            critical=True,
        )
        .sign(ca_key, hashes.SHA256())  # type: ignore[arg-type]
    )
    return KeySigner(key, cert)


@pytest.mark.parametrize("digest", ["sha256", "sha1"])
def test_ec_key(dev_pki: DevPki, tmp_path: Path, digest: str) -> None:
    raw = sign(_ec_signer(dev_pki), digest)
    assert verify(raw, trust_roots=[load_cert(dev_pki.ca.cert_pem)]).digest == digest
    (tmp_path / "m.eml").write_bytes(raw)
    (tmp_path / "ca.pem").write_bytes(dev_pki.ca.cert_pem)
    result = subprocess.run(
        [
            *(openssl(), "cms", "-verify", "-inform", "SMIME", "-in", str(tmp_path / "m.eml")),
            *("-CAfile", str(tmp_path / "ca.pem"), "-purpose", "any", "-out", "/dev/null"),
            *openssl_attime(SIGN_TIME),
        ],
        capture_output=True,
        check=False,
    )
    assert result.returncode == 0, result.stderr.decode(errors="replace")


# --- real provider messages ---------------------------------------------------------------------

ROWS = read_manifest(CORPUS_DIR)
OK_ROWS = [r for r in ROWS if r["notes"].startswith("cms-verify-noverify OK")]
ALTERED_ROWS = [r for r in ROWS if "content altered after signing" in r["notes"]]
UNSIGNED_ROWS = [r for r in ROWS if r["signed"] == "no" or "not valid DER" in r["notes"]]


def _note(row: dict[str, str], pattern: str) -> str:
    m = re.search(pattern, row["notes"])
    assert m, (pattern, row["notes"])
    return m.group(1)


def _rdns(subject: str) -> list[str]:
    return sorted(part.strip() for part in subject.split(","))


def test_manifest_has_every_category(manifest: list[dict[str, str]]) -> None:
    assert manifest == ROWS
    assert len(OK_ROWS) >= 5 and len(ALTERED_ROWS) >= 3 and len(UNSIGNED_ROWS) >= 4


@pytest.mark.parametrize("row", OK_ROWS, ids=lambda r: r["file"])
def test_corpus_signature_verifies(corpus_dir: Path, row: dict[str, str]) -> None:
    raw = (corpus_dir / row["file"]).read_bytes()
    signing_time = datetime.strptime(
        _note(row, r"signingTime=(\w+ +\d+ [\d:]+ \d{4}) GMT"), "%b %d %H:%M:%S %Y"
    ).replace(tzinfo=UTC)
    info = verify(raw, at=signing_time)
    assert info.digest == "sha1"
    assert info.micalg == "sha1"
    assert info.signing_time == signing_time
    assert _rdns(info.signer.subject.rfc4514_string()) == _rdns(
        _note(row, r'signer subject="([^"]+)"')
    )
    der = info.signer.public_bytes(serialization.Encoding.DER)
    assert info.signer_sha1 == hashlib.sha1(der).hexdigest()
    assert len(info.certificates) == int(_note(row, r"(\d+) certs in p7s"))
    assert verify(raw).signer_sha1 == info.signer_sha1  # default instant: signingTime
    # Those certificates have expired since.
    assert error_code(raw, at=datetime(2026, 1, 1, tzinfo=UTC)) == "expired"
    assert error_code(raw, at=datetime(2000, 1, 1, tzinfo=UTC)) == "not-yet-valid"


@pytest.mark.parametrize("row", ALTERED_ROWS, ids=lambda r: r["file"])
def test_corpus_altered_content_is_detected(corpus_dir: Path, row: dict[str, str]) -> None:
    assert error_code((corpus_dir / row["file"]).read_bytes()) == "digest-mismatch"


@pytest.mark.parametrize("row", UNSIGNED_ROWS, ids=lambda r: r["file"])
def test_corpus_without_valid_signature(corpus_dir: Path, row: dict[str, str]) -> None:
    raw = (corpus_dir / row["file"]).read_bytes()
    expected = (
        {"not-signed"} if row["type"].startswith("none") else {"malformed-mime", "malformed-cms"}
    )
    assert error_code(raw) in expected


# --- tampering -------------------------------------------------------------------------------


def _rewrite_p7s(raw: bytes, change: Callable[[bytes], bytes]) -> bytes:
    marker = b'filename="smime.p7s"\r\n\r\n'
    head, _, rest = raw.partition(marker)
    b64, sep, tail = rest.partition(b"\r\n--")
    der = change(base64.b64decode(b64))
    return head + marker + base64.encodebytes(der).replace(b"\n", b"\r\n").rstrip() + sep + tail


def _rewrite_cms(raw: bytes, change: Callable[[Any], None]) -> bytes:
    def apply(der: bytes) -> bytes:
        ci = cms.ContentInfo.load(der)
        change(ci)
        return bytes(ci.dump(force=True))

    return _rewrite_p7s(raw, apply)


def _flip(data: bytes, pos: int) -> bytes:
    pos %= len(data)
    return data[:pos] + bytes([data[pos] ^ 0x55]) + data[pos + 1 :]


def test_flipped_byte_in_signed_part(signed_sha256: bytes) -> None:
    i = signed_sha256.index(b"Ciao Bob.")
    raw = signed_sha256[:i] + b"c" + signed_sha256[i + 1 :]
    assert error_code(raw) == "digest-mismatch"
    # Removing the signed trailing space (what an editor's "strip whitespace" does) is tampering.
    assert (
        error_code(signed_sha256.replace(b"Ciao Bob. \r\n", b"Ciao Bob.\r\n")) == "digest-mismatch"
    )


def test_changed_signature_value(signed_sha256: bytes) -> None:
    # The signature value is the last field of the (only) SignerInfo, so the DER's last byte.
    raw = _rewrite_p7s(signed_sha256, lambda der: der[:-1] + bytes([der[-1] ^ 1]))
    assert error_code(raw) == "bad-signature"
    # Anywhere in the SignerInfo (sid, signed attributes, signature) the damage is detected.
    for pos in (-1, -100, -200, -300, -500):
        raw = _rewrite_p7s(signed_sha256, functools.partial(_flip, pos=pos))
        assert error_code(raw) in ALL_CODES - {"not-signed", "malformed-mime"}


def test_changed_certificate_breaks_the_chain(signed_sha256: bytes, dev_pki: DevPki) -> None:
    # A certificate is not covered by the CMS signature: the chain check is what catches it.
    ca = [load_cert(dev_pki.ca.cert_pem)]
    for pos in (100, 300, 600, 900, 1000):
        raw = _rewrite_p7s(signed_sha256, functools.partial(_flip, pos=pos))
        assert error_code(raw, trust_roots=ca) in ALL_CODES - {"not-signed", "malformed-mime"}


def test_changed_signed_attribute(signed_sha256: bytes) -> None:
    def later(ci: Any) -> None:
        attrs = ci["content"]["signer_infos"][0]["signed_attrs"]
        for attr in attrs:
            if attr["type"].native == "signing_time":
                attr["values"] = [cms.Time({"utc_time": SIGN_TIME + timedelta(days=1)})]

    assert error_code(_rewrite_cms(signed_sha256, later)) == "bad-signature"


def test_missing_signer_certificate(signed_sha256: bytes, dev_pki: DevPki) -> None:
    from asn1crypto import x509 as asn1_x509

    ca = asn1_x509.Certificate.load(
        load_cert(dev_pki.ca.cert_pem).public_bytes(serialization.Encoding.DER)
    )

    def drop(ci: Any) -> None:
        ci["content"]["certificates"] = [ca]

    assert error_code(_rewrite_cms(signed_sha256, drop)) == "no-signer-certificate"


def test_signer_found_by_subject_key_identifier(signed_sha256: bytes, signer: KeySigner) -> None:
    ski = signer.certificate.extensions.get_extension_for_class(x509.SubjectKeyIdentifier)

    def by_ski(ci: Any) -> None:
        si = ci["content"]["signer_infos"][0]
        si["version"] = "v3"
        si["sid"] = cms.SignerIdentifier({"subject_key_identifier": ski.value.digest})

    assert verify(_rewrite_cms(signed_sha256, by_ski)).signer == signer.certificate

    def wrong_ski(ci: Any) -> None:
        ci["content"]["signer_infos"][0]["sid"] = cms.SignerIdentifier(
            {"subject_key_identifier": b"\x01" * 20}
        )

    assert error_code(_rewrite_cms(signed_sha256, wrong_ski)) == "no-signer-certificate"


def test_unsupported_digest(signed_sha256: bytes) -> None:
    def md5(ci: Any) -> None:
        ci["content"]["signer_infos"][0]["digest_algorithm"] = {"algorithm": "md5"}

    assert error_code(_rewrite_cms(signed_sha256, md5)) == "unsupported-algorithm"


def test_embedded_content_is_refused(signed_sha256: bytes) -> None:
    def embed(ci: Any) -> None:
        ci["content"]["encap_content_info"] = {"content_type": "data", "content": b"x"}

    assert error_code(_rewrite_cms(signed_sha256, embed)) == "malformed-cms"


def test_untrusted_chain(signed_sha256: bytes, dev_pki: DevPki, other_pki: DevPki) -> None:
    other_ca = load_cert(other_pki.ca.cert_pem)
    assert error_code(signed_sha256, trust_roots=[other_ca]) == "untrusted-chain"
    assert error_code(signed_sha256, trust_roots=[]) == "untrusted-chain"
    # A certificate claiming our CA's name but with another key is no issuer either.
    impostor = load_cert(
        create_dev_pki(
            domain="pec.example.test", name="Example PEC S.p.A.", now=PKI_NOW
        ).ca.cert_pem
    )
    assert impostor.subject == load_cert(dev_pki.ca.cert_pem).subject
    assert error_code(signed_sha256, trust_roots=[impostor]) == "untrusted-chain"
    # Pinning the signer certificate itself is trust enough.
    signer_cert = load_cert(dev_pki.signing.cert_pem)
    assert verify(signed_sha256, trust_roots=[signer_cert]).signer == signer_cert


def test_validity_window(signed_sha256: bytes, dev_pki: DevPki) -> None:
    cert = load_cert(dev_pki.signing.cert_pem)
    ca = [load_cert(dev_pki.ca.cert_pem)]
    assert (
        error_code(signed_sha256, at=cert.not_valid_after_utc + timedelta(seconds=1)) == "expired"
    )
    assert (
        error_code(signed_sha256, at=cert.not_valid_before_utc - timedelta(seconds=1))
        == "not-yet-valid"
    )
    assert verify(signed_sha256, at=cert.not_valid_after_utc, trust_roots=ca)
    naive = (cert.not_valid_after_utc + timedelta(days=1)).replace(tzinfo=None)
    assert error_code(signed_sha256, at=naive) == "expired"  # naive means UTC


def test_structure_errors(signed_sha256: bytes) -> None:
    assert error_code(b"") == "not-signed"
    assert error_code(b"From: a@b\r\n\r\nhello\r\n") == "not-signed"
    assert error_code(b"Content-Type: multipart/signed\r\n\r\n--x\r\n") == "malformed-mime"
    head, _, body = signed_sha256.partition(b"\r\n\r\n")
    # Only the signed part: the signature part is gone.
    first_part = body.split(b"\r\n------=_pecd")[0]
    boundary = re.search(rb'boundary="([^"]+)"', head)
    assert boundary
    cut = head + b"\r\n\r\n" + first_part + b"\r\n--" + boundary.group(1) + b"--\r\n"
    assert error_code(cut) == "malformed-mime"
    # The signature part with another type.
    other = signed_sha256.replace(b"application/x-pkcs7-signature; name=", b"text/plain; name=")
    assert error_code(other) == "malformed-mime"
    # split_signed says the same things.
    with pytest.raises(SignatureError) as exc:
        split_signed(b"\xff\xfe\x00garbage")
    assert exc.value.code == "not-signed"


def test_huge_inputs_are_linear() -> None:
    n = 1_000_000
    cases = [
        b"Content-Type: multipart/signed; boundary=a\r\n\r\n--a\r\n" + b"x\r\n" * n,
        b"Content-Type: multipart/signed; boundary=a\r\n\r\n" + b"--a-\r\n" * n,
        b"Content-Type: multipart/signed; boundary=aa\n\n--aa\n" + b"--a\n" * n + b"--aa\n"
        b"Content-Type: application/pkcs7-signature\n\n" + b"MIIA" * n + b"\n--aa--\n",
        b"X-H: " + b"a" * (4 * n) + b"\r\n",
        b"Content-Type: multipart/signed; boundary=a\r\n" + b" ;x=y\r\n" * n + b"\r\n",
    ]
    start = time.monotonic()
    for raw in cases:
        error_code(raw)
    assert time.monotonic() - start < 20


def _const(value: bytes) -> Callable[[bytes], bytes]:
    return lambda _der: value


def test_deeply_nested_der(signed_sha256: bytes) -> None:
    for der in (b"\x30\x80" * 50_000, b"\x30\x82\xff\xff" * 1000, b"\x06\x09" + b"\xff" * 9):
        assert error_code(_rewrite_p7s(signed_sha256, _const(der))) in ALL_CODES


# --- fuzzing -----------------------------------------------------------------------------------

FUZZ = settings(
    max_examples=200,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)


def _must_not_crash(raw: bytes) -> None:
    try:
        verify(raw)
    except SignatureError as exc:
        assert exc.code in ALL_CODES


@FUZZ
@given(st.binary(max_size=3000))
def test_fuzz_random_bytes(raw: bytes) -> None:
    _must_not_crash(raw)
    _must_not_crash(b"Content-Type: multipart/signed; boundary=b\r\n\r\n--b\r\n" + raw)


def _mutate(data: st.DataObject, raw: bytes) -> bytes:
    for _ in range(data.draw(st.integers(1, 4))):
        op = data.draw(st.sampled_from(["flip", "truncate", "insert", "delete", "eol"]))
        pos = data.draw(st.integers(0, max(len(raw) - 1, 0)))
        if op == "flip" and raw:
            raw = raw[:pos] + bytes([raw[pos] ^ data.draw(st.integers(1, 255))]) + raw[pos + 1 :]
        elif op == "truncate":
            raw = raw[:pos]
        elif op == "insert":
            raw = raw[:pos] + data.draw(st.binary(min_size=1, max_size=40)) + raw[pos:]
        elif op == "delete":
            raw = raw[:pos] + raw[pos + data.draw(st.integers(1, 200)) :]
        else:
            raw = data.draw(
                st.sampled_from(
                    [
                        raw.replace(b"\r\n", b"\n"),
                        re.sub(rb"\r?\n", b"\r\n", raw),
                        raw.replace(b"\n", b"\r"),
                        raw[:pos] + raw[pos:].replace(b"\r\n", b"\n", 1),
                    ]
                )
            )
    return raw


_CORPUS_FILES = [(CORPUS_DIR / r["file"]).read_bytes() for r in ROWS]
_OK_FILES = [(CORPUS_DIR / r["file"]).read_bytes() for r in OK_ROWS]


@FUZZ
@given(data=st.data())
def test_fuzz_mutated_messages(data: st.DataObject, signed_sha1: bytes) -> None:
    base = data.draw(st.sampled_from([signed_sha1, *_CORPUS_FILES]))
    _must_not_crash(_mutate(data, base))


@FUZZ
@given(data=st.data())
def test_fuzz_mutated_cms(data: st.DataObject, signed_sha1: bytes) -> None:
    # Mutate the DER itself and re-encode it properly, so the CMS parser sees the damage.
    base = data.draw(st.sampled_from([signed_sha1, *_OK_FILES]))
    try:
        _, der = split_signed(base)
    except SignatureError:
        return
    mutated = _mutate(data, der)
    _must_not_crash(_rewrite_p7s(signed_sha1, _const(mutated)))
