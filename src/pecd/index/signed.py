"""The signed index: LDIF inside a CMS SignedData with the content attached (``.p7m``), sans I/O.

Producing uses cryptography's PKCS7 builder; checking parses the CMS with asn1crypto and verifies
with cryptography: the signer certificate found in the CMS, the message digest over the attached
content, the signature over the signed attributes, and that the signer is the trusted certificate
itself. Equality, not a chain: the index decides which providers are trusted at all, so only the
one certificate the operator named may vouch for it (a CA would let every provider it certified
rewrite everybody's index).
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import re
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from asn1crypto import cms
from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, padding, rsa
from cryptography.hazmat.primitives.serialization import pkcs7

from pecd.pec.smime import KeySigner, cms_sign_detached

__all__ = [
    "SignedIndex",
    "SignedIndexError",
    "cms_der",
    "sign_index",
    "unwrap_signed_index",
    "verify_signed_index",
]

_DIGESTS: dict[str, type[hashes.HashAlgorithm]] = {
    "sha1": hashes.SHA1,  # still what PEC providers sign with (spec section 5)
    "sha224": hashes.SHA224,
    "sha256": hashes.SHA256,
    "sha384": hashes.SHA384,
    "sha512": hashes.SHA512,
}
_PEM_RE = re.compile(rb"-----BEGIN (?:PKCS7|CMS)-----(.*?)-----END (?:PKCS7|CMS)-----", re.DOTALL)
_B64_RE = re.compile(rb"^[A-Za-z0-9+/=\s]+$")


class SignedIndexError(ValueError):
    """The .p7m is not a valid signed index from the trusted signer; ``str()`` says why."""


@dataclass(frozen=True)
class SignedIndex:
    content: bytes  # the LDIF, exactly as signed
    signer: x509.Certificate
    digest: str  # "sha1", "sha256", …


def sign_index(
    ldif: bytes,
    cert: x509.Certificate,
    key: pkcs7.PKCS7PrivateKeyTypes,
    *,
    digest: str = "sha256",
    signing_time: datetime | None = None,
    chain: Sequence[x509.Certificate] = (),
) -> bytes:
    """``ldif`` signed into a DER ``.p7m`` (content attached, signer certificate included, and
    the ``chain`` of intermediate CAs that issued it, so a peer reaches the root it trusts).

    SHA-2 digests go through cryptography's PKCS7 builder. That builder refuses SHA-1, which PEC
    providers still sign with (spec section 5), so ``sha1`` is made by pecd's own CMS signer
    (``signing_time`` is then required: the signed attributes carry it).
    """
    if digest == "sha1":
        if signing_time is None:
            raise ValueError("a sha1 signed index needs signing_time")
        return _sign_sha1(ldif, cert, key, signing_time, chain)
    if digest not in _DIGESTS:
        raise ValueError(f"digest {digest!r} is not one of {', '.join(_DIGESTS)}")
    algorithm: Any = _DIGESTS[digest]()  # PKCS7HashTypes is a union the dict cannot express
    builder = pkcs7.PKCS7SignatureBuilder().set_data(ldif).add_signer(cert, key, algorithm)
    for extra in chain:
        builder = builder.add_certificate(extra)
    # Binary: the LDIF is signed byte for byte, without S/MIME's CRLF canonicalisation.
    return builder.sign(serialization.Encoding.DER, [pkcs7.PKCS7Options.Binary])


def _sign_sha1(
    ldif: bytes,
    cert: x509.Certificate,
    key: pkcs7.PKCS7PrivateKeyTypes,
    when: datetime,
    chain: Sequence[x509.Certificate],
) -> bytes:
    if not isinstance(key, rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey):
        raise TypeError("only RSA and EC keys can sign with sha1")
    detached = cms.ContentInfo.load(
        cms_sign_detached(ldif, KeySigner(key, cert, chain), digest="sha1", signing_time=when)
    )
    sd = detached["content"]
    # The signature covers the signed attributes (which hold the content's digest), not the
    # content itself, so the content can be attached afterwards. The parts are reused as parsed,
    # so their bytes, and the signature over them, stay exactly as signed.
    attached = cms.SignedData(
        {
            "version": sd["version"],
            "digest_algorithms": sd["digest_algorithms"],
            "encap_content_info": {"content_type": "data", "content": ldif},
            "certificates": sd["certificates"],
            "signer_infos": sd["signer_infos"],
        }
    )
    return bytes(cms.ContentInfo({"content_type": "signed_data", "content": attached}).dump())


def cms_der(data: bytes) -> bytes | None:
    """The DER of ``data`` if it looks like a CMS structure (DER, PEM, or bare base64), else
    None: how a loader tells a ``.p7m`` from plain LDIF by content rather than by file name."""
    if data[:1] == b"\x30":
        return data
    m = _PEM_RE.search(data)
    if m:
        body = m.group(1)
    elif data.strip() and _B64_RE.match(data[:4096]):
        body = data  # some publish the .p7m base64-encoded; LDIF always has a colon, base64 never
    else:
        return None
    try:
        der = base64.b64decode(b"".join(body.split()), validate=True)
    except (binascii.Error, ValueError):
        return None
    return der if der[:1] == b"\x30" else None


def _signer_certificate(sd: cms.SignedData, si: cms.SignerInfo) -> cms.Certificate:
    sid = si["sid"]
    for choice in sd["certificates"] or []:
        if choice.name != "certificate":
            continue
        cert = choice.chosen
        if sid.name == "issuer_and_serial_number":
            ias = sid.chosen
            if cert.issuer == ias["issuer"] and cert.serial_number == ias["serial_number"].native:
                return cert
        elif cert.key_identifier == sid.chosen.native:
            return cert
    raise SignedIndexError("the signer's certificate is not included in the .p7m")


def _verify_signature(
    public: Any, si: cms.SignerInfo, data: bytes, algorithm: hashes.HashAlgorithm
) -> None:
    signature = si["signature"].native
    sig_alg = si["signature_algorithm"]
    kind = sig_alg.signature_algo
    if isinstance(public, rsa.RSAPublicKey) and kind == "rsassa_pkcs1v15":
        public.verify(signature, data, padding.PKCS1v15(), algorithm)
    elif isinstance(public, rsa.RSAPublicKey) and kind == "rsassa_pss":
        params = sig_alg["parameters"]
        pss_hash = _DIGESTS[params["hash_algorithm"]["algorithm"].native]()
        mgf_hash = _DIGESTS[params["mask_gen_algorithm"]["parameters"]["algorithm"].native]()
        pss = padding.PSS(padding.MGF1(mgf_hash), params["salt_length"].native)
        public.verify(signature, data, pss, pss_hash)
    elif isinstance(public, ec.EllipticCurvePublicKey) and kind == "ecdsa":
        public.verify(signature, data, ec.ECDSA(algorithm))
    elif isinstance(public, ed25519.Ed25519PublicKey) and kind == "ed25519":
        public.verify(signature, data)
    else:
        raise SignedIndexError(
            f"signature algorithm {kind} with a {type(public).__name__} is not supported"
        )


def verify_signed_index(data: bytes, trusted: x509.Certificate) -> SignedIndex:
    """Check a signed index against the one ``trusted`` certificate; SignedIndexError if not."""
    der = cms_der(data)
    if der is None:
        raise SignedIndexError("not a CMS (.p7m) structure")
    try:
        return _verify(der, trusted)
    except SignedIndexError:
        raise
    except InvalidSignature:
        raise SignedIndexError("the signature does not verify") from None
    except Exception as exc:
        # asn1crypto parses lazily and raises many kinds (ValueError, TypeError, KeyError…)
        # on malformed input, wherever a field is first touched; all mean the same here.
        raise SignedIndexError(f"malformed CMS: {type(exc).__name__}: {exc}"[:200]) from None


def _verify(der: bytes, trusted: x509.Certificate) -> SignedIndex:
    info = cms.ContentInfo.load(der, strict=True)
    if info["content_type"].native != "signed_data":
        raise SignedIndexError(f"a CMS {info['content_type'].native}, not signed-data")
    sd = info["content"]
    encap = sd["encap_content_info"]
    if encap["content_type"].native != "data":
        raise SignedIndexError(f"the signed content is {encap['content_type'].native}, not data")
    content = encap["content"].native
    if not isinstance(content, bytes):
        raise SignedIndexError("the content is not attached (a detached signature is no index)")
    signers = list(sd["signer_infos"])
    if len(signers) != 1:
        raise SignedIndexError(f"expected one signer, found {len(signers)}")
    si = signers[0]
    digest_name = si["digest_algorithm"]["algorithm"].native
    if digest_name not in _DIGESTS:
        raise SignedIndexError(f"unsupported digest {digest_name}")
    signer_asn1 = _signer_certificate(sd, si)
    signer_der = signer_asn1.dump()
    if signer_der != trusted.public_bytes(serialization.Encoding.DER):
        raise SignedIndexError(
            f"signed by {signer_asn1.subject.human_friendly!r}, "
            "not by the trusted index certificate (index.trusted_signer)"
        )
    signer = x509.load_der_x509_certificate(signer_der)
    algorithm = _DIGESTS[digest_name]()
    signed_attrs = si["signed_attrs"]
    if signed_attrs:
        found: dict[str, Any] = {}
        for attr in signed_attrs:
            found[attr["type"].native] = attr["values"][0].native
        if found.get("content_type") != "data":
            raise SignedIndexError("the signed contentType attribute is not data")
        expected = hashlib.new(digest_name, content).digest()
        if found.get("message_digest") != expected:
            raise SignedIndexError("the content does not match its signed digest (altered?)")
        # The signature covers the attributes as a SET OF (tag 0x31), not as the [0] IMPLICIT
        # field stored here, and over the bytes as received: re-encoding could change them.
        to_verify = b"\x31" + signed_attrs.dump()[1:]
    else:
        to_verify = content  # no attributes: the signature is over the content itself
    _verify_signature(signer.public_key(), si, to_verify, algorithm)
    return SignedIndex(content=content, signer=signer, digest=digest_name)


def unwrap_signed_index(data: bytes, trusted: x509.Certificate) -> bytes:
    """The LDIF inside ``data`` once its signature by ``trusted`` holds; SignedIndexError if not."""
    return verify_signed_index(data, trusted).content
