"""The signed index: LDIF inside a CMS SignedData with the content attached (``.p7m``, DER).

Producing uses cryptography's PKCS7 builder; checking parses the CMS with asn1crypto and verifies
with cryptography: the message digest over the attached content, the signature over the signed
attributes, and that the signer is the trusted certificate itself (a provider index is trusted
because of who signed it, not because of a chain).
"""

from __future__ import annotations

import hashlib

from asn1crypto import cms
from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from cryptography.hazmat.primitives.serialization import pkcs7

_DIGESTS = {
    "sha1": hashes.SHA1,
    "sha256": hashes.SHA256,
    "sha384": hashes.SHA384,
    "sha512": hashes.SHA512,
}


class SignedIndexError(ValueError):
    """The .p7m is not a valid signed index from the trusted signer."""


def sign_index(
    ldif: bytes, cert: x509.Certificate, key: rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey
) -> bytes:
    """``ldif`` signed into a DER ``.p7m`` (content attached, signer certificate included)."""
    return (
        pkcs7.PKCS7SignatureBuilder()
        .set_data(ldif)
        .add_signer(cert, key, hashes.SHA256())
        .sign(serialization.Encoding.DER, [pkcs7.PKCS7Options.Binary])
    )


def unwrap_signed_index(der: bytes, trusted: x509.Certificate) -> bytes:
    """The LDIF inside ``der`` once its signature by ``trusted`` holds; SignedIndexError if not."""
    try:
        info = cms.ContentInfo.load(der)
        if info["content_type"].native != "signed_data":
            raise SignedIndexError("not a CMS SignedData")
        sd = info["content"]
        content = sd["encap_content_info"]["content"].native
        if not isinstance(content, bytes):
            raise SignedIndexError("the signed index carries no content")
        signers = list(sd["signer_infos"])
        if len(signers) != 1:
            raise SignedIndexError(f"expected one signer, found {len(signers)}")
        si = signers[0]
        digest_name = si["digest_algorithm"]["algorithm"].native
        if digest_name not in _DIGESTS:
            raise SignedIndexError(f"unsupported digest {digest_name}")
        certs = [c.chosen.dump() for c in sd["certificates"] or []]
    except SignedIndexError:
        raise
    except Exception as exc:  # asn1crypto raises many kinds on garbage
        raise SignedIndexError(f"not a signed index: {type(exc).__name__}") from None
    trusted_der = trusted.public_bytes(serialization.Encoding.DER)
    if trusted_der not in certs:
        raise SignedIndexError("not signed by the trusted index certificate")
    signed_attrs = si["signed_attrs"]
    if not signed_attrs:
        raise SignedIndexError("no signed attributes")
    digest = None
    for attr in signed_attrs:
        if attr["type"].native == "message_digest":
            digest = attr["values"][0].native
    if digest != hashlib.new(digest_name, content).digest():
        raise SignedIndexError("the content does not match its signed digest (altered?)")
    # The signature covers the SET OF (tag 0x31), not the [0] IMPLICIT form stored here, and
    # over the bytes as received (re-encoding could change them).
    to_verify = b"\x31" + signed_attrs.dump()[1:]
    algorithm = _DIGESTS[digest_name]()
    public = trusted.public_key()
    try:
        if isinstance(public, rsa.RSAPublicKey):
            public.verify(si["signature"].native, to_verify, padding.PKCS1v15(), algorithm)
        elif isinstance(public, ec.EllipticCurvePublicKey):
            public.verify(si["signature"].native, to_verify, ec.ECDSA(algorithm))
        else:
            raise SignedIndexError("unsupported signer key type")
    except InvalidSignature:
        raise SignedIndexError("the signature does not verify") from None
    return content
