"""Signatures of a known shape (the ones this process made, or verified once) are read by cutting
their variable fields out of the DER: the same reading as the general parse, every check still
made, and anything else read the general way."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime, timedelta

import pytest

from pecd.pec import smime
from pecd.pec.pki import DevPki, create_dev_pki
from pecd.pec.smime import KeySigner, SignatureError, sign_multipart, split_signed, verify

NOW = datetime(2026, 6, 1, 12, 0, 0, tzinfo=UTC)
INNER = b"Content-Type: text/plain\r\n\r\ncorpo firmato\r\n"


@pytest.fixture(scope="module")
def pki() -> DevPki:
    return create_dev_pki(domain="pec.known.test", name="Known PEC", now=NOW, intermediate=True)


@pytest.fixture(autouse=True)
def fresh_shapes() -> Iterator[None]:
    saved = dict(smime._KNOWN)
    smime._KNOWN.clear()
    yield
    smime._KNOWN.clear()
    smime._KNOWN.update(saved)


def signer_of(pki: DevPki, *, chain: bool) -> KeySigner:
    return KeySigner.from_pem(
        pki.signing.key_pem, pki.signing.cert_pem, pki.chain_pem if chain else None
    )


def signed(signer: KeySigner, digest: smime.DigestName, inner: bytes = INNER) -> bytes:
    return sign_multipart([("Subject", "firmato")], inner, signer, digest=digest, signing_time=NOW)


@pytest.mark.parametrize("digest", ["sha1", "sha256"])
@pytest.mark.parametrize("chain", [False, True])
def test_a_known_shape_reads_what_the_general_parse_reads(
    pki: DevPki, digest: smime.DigestName, chain: bool
) -> None:
    signer = signer_of(pki, chain=chain)
    for i in range(3):
        raw = signed(signer, digest, INNER + b"riga %d\r\n" % i)
        _, der = split_signed(raw)
        known = smime._parse_known(der)
        assert known is not None  # the signing made the shape known
        assert known == smime._parse_cms(der)
        info = verify(raw, at=NOW + timedelta(minutes=1))
        assert info.signing_time == NOW and info.digest == digest
        assert info.signer == signer.certificate
        assert len(info.certificates) == (2 if chain else 1)


def test_a_shape_verified_once_is_known_afterwards(pki: DevPki) -> None:
    raw = signed(signer_of(pki, chain=False), "sha256")
    smime._KNOWN.clear()  # as in a process that never signed with this key
    _, der = split_signed(raw)
    assert smime._parse_known(der) is None
    first = verify(raw)
    assert smime._parse_known(der) == smime._parse_cms(der)
    assert verify(raw) == first


def test_every_check_still_holds_on_the_known_path(pki: DevPki) -> None:
    signer = signer_of(pki, chain=False)
    raw = signed(signer, "sha256")
    _, der = split_signed(raw)
    assert smime._parse_known(der) is not None
    # The content altered: its digest no longer matches.
    with pytest.raises(SignatureError) as info:
        verify(raw.replace(b"corpo firmato", b"corpo alterato"))
    assert info.value.code == "digest-mismatch"
    # The signature's own bytes altered: same shape, and it does not verify.
    sig = smime._parse_cms(der).signature
    bad = bytearray(sig)
    bad[-1] ^= 1
    forged = der.replace(sig, bytes(bad))
    assert smime._parse_known(forged) is not None
    with pytest.raises(SignatureError) as info:
        verify(raw.replace(smime._base64_lines(der), smime._base64_lines(forged)))
    assert info.value.code == "bad-signature"
    # Checked at a time the certificate is not valid: refused as the general path refuses.
    with pytest.raises(SignatureError) as info:
        verify(raw, at=NOW + timedelta(days=5000))
    assert info.value.code == "expired"


def test_the_signing_time_altered_fails_the_signature(pki: DevPki) -> None:
    raw = signed(signer_of(pki, chain=False), "sha256")
    _, der = split_signed(raw)
    when = NOW.strftime("%y%m%d%H%M%SZ").encode()
    later = (NOW + timedelta(days=1)).strftime("%y%m%d%H%M%SZ").encode()
    assert der.count(when) == 1
    moved = smime._parse_known(der.replace(when, later))
    assert moved is not None and moved.signing_time == NOW + timedelta(days=1)
    # Not a valid time at all: the general parse decides.
    assert smime._parse_known(der.replace(when, b"991399999999Z")) is None


def test_other_shapes_take_the_general_parse(pki: DevPki) -> None:
    signer = signer_of(pki, chain=False)
    signed(signer, "sha256")  # this one's shape is known
    # Made the general way (a GeneralizedTime after 2049): another shape, read the general way.
    far = smime.cms_sign_detached(
        INNER, signer, digest="sha256", signing_time=datetime(2051, 1, 1, tzinfo=UTC)
    )
    assert smime._parse_known(far) is None
    assert smime._parse_cms(far).signing_time == datetime(2051, 1, 1, tzinfo=UTC)
    # Another signer's signature, and bytes that are no CMS at all.
    other = create_dev_pki(domain="pec.altro.test", name="Altro", now=NOW)
    theirs = smime.cms_sign_detached(
        INNER,
        KeySigner.from_pem(other.signing.key_pem, other.signing.cert_pem),
        digest="sha256",
        signing_time=NOW,
    )
    smime._KNOWN.pop(next(reversed(smime._KNOWN)))  # forget the other signer's shape
    assert smime._parse_known(theirs) is None
    assert smime._parse_known(b"\x30\x03\x02\x01\x00") is None
    assert smime._parse_known(b"") is None
