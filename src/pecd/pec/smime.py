"""S/MIME ``multipart/signed`` (detached CMS SignedData): signing and verification, over bytes.

PEC system messages are S/MIME v3 ``multipart/signed`` with the provider certificate inside the CMS
(spec sections 2.1 and 5). This module builds the CMS itself with asn1crypto so that the digest
(SHA-1 as every provider still uses, or SHA-256) and ``signingTime`` are under our control, and uses
``cryptography`` for the key operations.

Verification (:func:`verify`) never raises anything but :class:`SignatureError` whatever the input
bytes; every failure carries a short stable ``code``.

Signed content canonicalisation: the first body part is taken exactly as it sits between its
delimiters (the line ending before the next delimiter belongs to the delimiter) and every line
ending is made CRLF, as RFC 5751 section 3.1.1 and OpenSSL do. Nothing else is touched: a removed
trailing space is a changed message.
"""

from __future__ import annotations

import binascii
import contextlib
import functools
import hashlib
import hmac
import re
import secrets
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Literal, Protocol, cast

from asn1crypto import cms, core
from asn1crypto import x509 as asn1_x509
from cryptography import x509
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa

from pecd.pec.mime import delimiter_kind
from pecd.pec.vocab import CT_SIGNATURE, CT_SIGNATURE_ALIASES, SMIME_FILENAME, SMIME_PREAMBLE

__all__ = [
    "DigestName",
    "KeySigner",
    "PrivateKey",
    "SignatureError",
    "SignatureInfo",
    "Signer",
    "certificate_sha1",
    "cms_sign_detached",
    "sign_multipart",
    "split_signed",
    "verify",
]

DigestName = Literal["sha1", "sha256"]
PrivateKey = rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey

_HASHES: dict[str, type[hashes.HashAlgorithm]] = {
    "sha1": hashes.SHA1,
    "sha256": hashes.SHA256,
    "sha384": hashes.SHA384,
    "sha512": hashes.SHA512,
}
# RFC 5751 section 3.4.3.2 micalg names.
_MICALG: dict[str, str] = {
    "sha1": "sha1",
    "sha256": "sha-256",
    "sha384": "sha-384",
    "sha512": "sha-512",
}
# One instance of each: cryptography's algorithm and padding objects hold no state.
_HASH_OBJECTS: dict[str, hashes.HashAlgorithm] = {name: cls() for name, cls in _HASHES.items()}
_PKCS1 = padding.PKCS1v15()
_CRLF = b"\r\n"
_ANY_EOL = re.compile(rb"\r?\n")
_HEAD_END = re.compile(rb"\n\r?\n")
_BCHARS = re.compile(r"[0-9A-Za-z'()+_,\-./:=? ]{0,69}[0-9A-Za-z'()+_,\-./:=?]")
_B64_BODY = re.compile(rb"[A-Za-z0-9+/]*={0,2}")
_WSP_BYTES = b" \t\r\n"
_NOT_A_FOLD = re.compile(rb"\r\n(?![ \t])")
_MAX_BOUNDARY = 200  # RFC 2046 says 70; be lenient on reading, but bound the work.
_MAX_CHAIN = 8


class SignatureError(Exception):
    """A signature that is absent, malformed or does not verify.

    ``code`` is short and stable (``not-signed``, ``malformed-mime``, ``malformed-cms``,
    ``digest-mismatch``, ``bad-signature``, ``unsupported-algorithm``, ``no-signer-certificate``,
    ``expired``, ``not-yet-valid``, ``untrusted-chain``); ``reason`` is one human-readable line.
    """

    def __init__(self, code: str, reason: str) -> None:
        super().__init__(code, reason)
        self.code = code
        self.reason = reason

    def __str__(self) -> str:
        return self.reason


# --- signing -----------------------------------------------------------------------------------


class Signer(Protocol):
    """Whatever holds the provider key (in memory, or an HSM behind an adapter)."""

    @property
    def certificate(self) -> x509.Certificate: ...

    @property
    def chain(self) -> tuple[x509.Certificate, ...]: ...

    def sign_digest_input(self, data: bytes, digest: DigestName) -> bytes:
        """The raw signature over ``data`` (hashed with ``digest`` by the signer)."""
        ...


class KeySigner:
    """A :class:`Signer` over an in-memory RSA (PKCS#1 v1.5) or EC (ECDSA) private key."""

    def __init__(
        self,
        key: PrivateKey,
        certificate: x509.Certificate,
        chain: Sequence[x509.Certificate] = (),
    ) -> None:
        if not isinstance(key, rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey):
            raise TypeError("only RSA and EC private keys are supported")
        spki = serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
        if key.public_key().public_bytes(*spki) != certificate.public_key().public_bytes(*spki):
            raise ValueError("the private key does not match the certificate")
        self._key = key
        self._certificate = certificate
        self._chain = tuple(chain)
        # Which kind of key, decided once: an isinstance against cryptography's abstract
        # classes on every signature costs more than the rest of this method's Python.
        self._rsa_key = key if isinstance(key, rsa.RSAPrivateKey) else None

    @classmethod
    def from_pem(
        cls,
        key_pem: bytes,
        cert_pem: bytes,
        chain_pem: bytes | None = None,
        password: bytes | None = None,
    ) -> KeySigner:
        key = serialization.load_pem_private_key(key_pem, password=password)
        if not isinstance(key, rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey):
            raise TypeError("only RSA and EC private keys are supported")
        cert = x509.load_pem_x509_certificate(cert_pem)
        chain = x509.load_pem_x509_certificates(chain_pem) if chain_pem else []
        return cls(key, cert, chain)

    @property
    def certificate(self) -> x509.Certificate:
        return self._certificate

    @property
    def chain(self) -> tuple[x509.Certificate, ...]:
        return self._chain

    def sign_digest_input(self, data: bytes, digest: DigestName) -> bytes:
        algorithm = _HASH_OBJECTS[digest]
        if self._rsa_key is not None:
            return self._rsa_key.sign(data, _PKCS1, algorithm)
        return cast(ec.EllipticCurvePrivateKey, self._key).sign(data, ec.ECDSA(algorithm))


def _cms_time(when: datetime) -> cms.Time:
    when = _as_utc(when).replace(microsecond=0)
    # RFC 5652 section 11.3: UTCTime for 1950-2049, GeneralizedTime otherwise.
    if 1950 <= when.year < 2050:
        return cms.Time({"utc_time": when})
    return cms.Time({"generalized_time": when})


@functools.lru_cache(maxsize=16)
def _signer_parts(cert_der: bytes, chain_der: tuple[bytes, ...]) -> tuple[bytes, bytes]:
    """The DER of the SignerIdentifier and of the CertificateSet for one signer.

    Building them means parsing and re-encoding every certificate, which costs more than the RSA
    signature itself; a provider signs with the same certificate all day, so they are made once.
    """
    cert = asn1_x509.Certificate.load(cert_der)
    sid = cms.SignerIdentifier(
        {
            "issuer_and_serial_number": {
                "issuer": cert.issuer,
                "serial_number": cert.serial_number,
            }
        }
    )
    certs = cms.CertificateSet([cert, *(asn1_x509.Certificate.load(c) for c in chain_der)])
    return bytes(sid.dump()), bytes(certs.dump())


def _signed_attrs(digest: DigestName, signing_time: datetime, message_digest: bytes) -> Any:
    capabilities = cms.SMIMECapabilites(
        [{"capability_id": "aes256_cbc"}, {"capability_id": "aes128_cbc"}]
    )
    return cms.CMSAttributes(
        [
            {"type": "content_type", "values": ["data"]},
            {"type": "signing_time", "values": [_cms_time(signing_time)]},
            {"type": "message_digest", "values": [message_digest]},
            {"type": "smime_capabilities", "values": [capabilities]},
        ]
    )


def _signer_der(signer: Signer) -> tuple[bytes, tuple[bytes, ...]]:
    chain = signer.chain
    return _cert_der(signer.certificate), tuple(_cert_der(c) for c in chain) if chain else ()


@dataclass(frozen=True, slots=True)
class _Encoded:
    """What is derived from one certificate object, once: its DER and the SHA-1 of it."""

    cert: x509.Certificate  # held, so that its id() is not reused while the entry lives
    der: bytes
    sha1: str


# By the id() of the certificate object: the signer's certificate and those of the CMS read
# (:func:`_certificate`) are the same objects from one message to the next, and hashing a
# certificate for a dictionary (cryptography hashes its whole encoding) costs more than
# encoding it. A certificate met as another object is looked up as a new one.
_ENCODED: dict[int, _Encoded] = {}
_MAX_ENCODED = 64


def _encoded(cert: x509.Certificate) -> _Encoded:
    found = _ENCODED.get(id(cert))
    if found is not None and found.cert is cert:
        return found
    der = cert.public_bytes(serialization.Encoding.DER)
    entry = _Encoded(cert, der, hashlib.sha1(der).hexdigest())
    if len(_ENCODED) >= _MAX_ENCODED:
        # The oldest goes; without a lock (see _remember), at worst a no-op.
        with contextlib.suppress(KeyError, RuntimeError, StopIteration):
            _ENCODED.pop(next(iter(_ENCODED)))
    _ENCODED[id(cert)] = entry
    return entry


def certificate_sha1(cert: x509.Certificate) -> str:
    """The SHA-1 of ``cert``'s DER, hex: computed once per certificate object."""
    return _encoded(cert).sha1


def _cert_der(cert: x509.Certificate) -> bytes:
    """A certificate's DER, encoded once (every signature looks its templates up by it)."""
    return _encoded(cert).der


def _signature_algorithm(public_key: object, digest: DigestName) -> str:
    if isinstance(public_key, rsa.RSAPublicKey):
        return "rsassa_pkcs1v15"  # rsaEncryption, as every PEC provider writes
    if isinstance(public_key, ec.EllipticCurvePublicKey):
        return f"{digest}_ecdsa"
    raise TypeError("only RSA and EC signer certificates are supported")


def _assemble(
    cert_der: bytes,
    chain_der: tuple[bytes, ...],
    signature_algorithm: str,
    digest: DigestName,
    signed_attrs: Any,
    signature: bytes,
) -> bytes:
    sid_der, certificates_der = _signer_parts(cert_der, chain_der)
    signer_info = cms.SignerInfo(
        {
            "version": "v1",
            "sid": cms.SignerIdentifier.load(sid_der),
            "digest_algorithm": {"algorithm": digest},
            "signed_attrs": signed_attrs,
            "signature_algorithm": {"algorithm": signature_algorithm},
            "signature": signature,
        }
    )
    signed_data = cms.SignedData(
        {
            "version": "v1",
            "digest_algorithms": [{"algorithm": digest}],
            "encap_content_info": {"content_type": "data"},
            "certificates": cms.CertificateSet.load(certificates_der),
            "signer_infos": [signer_info],
        }
    )
    content_info = cms.ContentInfo({"content_type": "signed_data", "content": signed_data})
    return bytes(content_info.dump())


def _cms_sign_built(
    content: bytes, signer: Signer, digest: DigestName, signing_time: datetime
) -> bytes:
    """The general path: every structure built and encoded by asn1crypto."""
    signed_attrs = _signed_attrs(digest, signing_time, hashlib.new(digest, content).digest())
    # The signature covers the DER SET OF (tag 0x31), not the [0] IMPLICIT form in SignerInfo.
    signature = signer.sign_digest_input(signed_attrs.dump(), digest)
    algorithm = _signature_algorithm(signer.certificate.public_key(), digest)
    return _assemble(*_signer_der(signer), algorithm, digest, signed_attrs, signature)


# Placeholders for the values that change between two signatures by the same RSA key. Each is
# looked for in the encoded template and must occur exactly once there.
_PLACEHOLDER_TIME = datetime(2049, 12, 31, 23, 59, 59, tzinfo=UTC)
_PLACEHOLDER_TIME_DER = b"491231235959Z"


@dataclass(frozen=True, slots=True)
class _Template:
    """A signature's DER cut at its variable fields: (signingTime, messageDigest[, signature])."""

    pieces: tuple[bytes, ...]
    order: tuple[int, ...]
    # The pieces as one bytes format, "%b" for each field in the order of the DER: a fill is
    # then one formatting in C instead of a list built in Python.
    pattern: bytes
    in_order: bool  # the fields come in the DER in the order fill is given them

    @classmethod
    def cut(cls, der: bytes, slots: Sequence[bytes]) -> _Template | None:
        found = []
        for index, placeholder in enumerate(slots):
            if der.count(placeholder) != 1:
                return None
            found.append((der.index(placeholder), len(placeholder), index))
        found.sort()
        pieces, order, pos = [], [], 0
        for start, length, index in found:
            pieces.append(der[pos:start])
            order.append(index)
            pos = start + length
        pieces.append(der[pos:])
        pattern = b"%b".join(piece.replace(b"%", b"%%") for piece in pieces)
        return cls(tuple(pieces), tuple(order), pattern, order == sorted(order))

    def match(self, der: bytes, sizes: Sequence[int]) -> list[bytes] | None:
        """The variable fields of ``der`` (each of its size in ``sizes``) when everything else
        in it is this template's bytes; None otherwise."""
        values = [b""] * len(sizes)
        pos = 0
        for piece, index in zip(self.pieces, self.order, strict=False):
            if not der.startswith(piece, pos):
                return None
            pos += len(piece)
            values[index] = der[pos : pos + sizes[index]]
            pos += sizes[index]
        last = self.pieces[-1]
        if len(der) != pos + len(last) or not der.startswith(last, pos):
            return None
        return values

    def fill(self, values: Sequence[bytes]) -> bytes:
        if self.in_order and len(values) == len(self.order):
            return self.pattern % tuple(values)
        return self.pattern % tuple(values[index] for index in self.order)


@functools.lru_cache(maxsize=16)
def _templates(
    cert_der: bytes, chain_der: tuple[bytes, ...], digest: DigestName, signature_size: int
) -> tuple[_Template, _Template] | None:
    """Templates of the signed attributes and of the whole ContentInfo for an RSA signer.

    An RSA PKCS#1 v1.5 signature, a digest and a UTCTime have fixed sizes, so everything else in
    the DER is the same from one signature to the next: building it once with asn1crypto and
    filling in three fields gives the very bytes the general path gives (a test compares them),
    at a small part of the cost.
    """
    size = hashlib.new(digest).digest_size
    digest_slot, signature_slot = b"\xa5" * size, b"\x5a" * signature_size
    attrs = _signed_attrs(digest, _PLACEHOLDER_TIME, digest_slot)
    attrs_template = _Template.cut(attrs.dump(), [_PLACEHOLDER_TIME_DER, digest_slot])
    whole = _assemble(cert_der, chain_der, "rsassa_pkcs1v15", digest, attrs, signature_slot)
    whole_template = _Template.cut(whole, [_PLACEHOLDER_TIME_DER, digest_slot, signature_slot])
    if attrs_template is None or whole_template is None:
        return None
    return attrs_template, whole_template


def cms_sign_detached(
    content: bytes, signer: Signer, *, digest: DigestName, signing_time: datetime
) -> bytes:
    """DER ContentInfo(SignedData v1), detached, over ``content`` exactly as given.

    Signed attributes: contentType=data, signingTime, messageDigest, smimeCapabilities. The signer
    certificate and its chain are included; the signer is named by issuerAndSerialNumber.
    """
    if digest not in ("sha1", "sha256"):
        raise ValueError(f"unsupported digest {digest!r}")
    when = _as_utc(signing_time)
    public_key = signer.certificate.public_key()
    if not isinstance(public_key, rsa.RSAPublicKey) or not 1950 <= when.year < 2050:
        return _cms_sign_built(content, signer, digest, signing_time)
    size = (public_key.key_size + 7) // 8
    cert_der, chain_der = _signer_der(signer)
    templates = _templates(cert_der, chain_der, digest, size)
    if templates is None:
        return _cms_sign_built(content, signer, digest, signing_time)
    _remember(cert_der, chain_der, digest, size)
    attrs_template, whole_template = templates
    # UTCTime YYMMDDhhmmssZ (the year is 1950-2049 here); formatting is cheaper than strftime.
    time_der = b"%02d%02d%02d%02d%02d%02dZ" % (
        when.year % 100,
        when.month,
        when.day,
        when.hour,
        when.minute,
        when.second,
    )
    message_digest = hashlib.new(digest, content).digest()
    signature = signer.sign_digest_input(attrs_template.fill([time_der, message_digest]), digest)
    if len(signature) != size:  # a signer (an HSM adapter) that drops leading zero bytes
        return _cms_sign_built(content, signer, digest, signing_time)
    return whole_template.fill([time_der, message_digest, signature])


def _to_crlf(data: bytes) -> bytes:
    # Most input is CRLF already: counting is far cheaper than rebuilding a large message.
    if data.count(b"\n") == data.count(b"\r\n"):
        return data
    return _ANY_EOL.sub(_CRLF, data)


def _header_line(name: str, value: str) -> bytes:
    if not name or any(c in name for c in ": \t\r\n"):
        raise ValueError(f"invalid header name {name!r}")
    encoded = _to_crlf(f"{name}: {value}".encode())
    # A line break inside a value must be a fold (followed by SP/HTAB), never a new field.
    if _NOT_A_FOLD.search(encoded):
        raise ValueError(f"header {name!r} has a line break that is not a fold")
    return encoded + _CRLF


def _header_block(headers: Sequence[tuple[str, str]]) -> bytes:
    """The lines of ``headers``, as :func:`_header_line` makes each. Values without a line
    break (all but a folded one) and names that need no check take one encode for the block;
    anything else goes line by line, which raises what it would have raised."""
    if not any(_BAD_HEADER_NAME.search(name) or not name for name, _ in headers):
        text = "".join([f"{name}: {value}\r\n" for name, value in headers])
        # Each line adds one CR and one LF: any more is a line break inside a value.
        if text.count("\n") == len(headers) and text.count("\r") == len(headers):
            with contextlib.suppress(UnicodeEncodeError):
                return text.encode()
    return b"".join([_header_line(n, v) for n, v in headers])


_BAD_HEADER_NAME = re.compile(r"[: \t\r\n]")
_B64_LINE = 76


def _base64_lines(data: bytes) -> bytes:
    text = binascii.b2a_base64(data, newline=False)
    if not text:
        return b""
    return _CRLF.join([text[i : i + _B64_LINE] for i in range(0, len(text), _B64_LINE)]) + _CRLF


def _new_boundary(inner: bytes) -> str:
    while True:
        boundary = f"----=_pecd_smime_{secrets.token_hex(16)}"
        if boundary.encode() not in inner:
            return boundary


def sign_multipart(
    headers: Sequence[tuple[str, str]],
    inner: bytes,
    signer: Signer,
    *,
    digest: DigestName,
    signing_time: datetime,
    boundary: str | None = None,
) -> bytes:
    """A whole CRLF message: ``headers``, then a ``multipart/signed`` whose first part is ``inner``.

    ``inner`` is a MIME entity (its own headers and body); it is made CRLF and signed exactly as
    emitted. The caller must not pass MIME-Version or Content-Type headers: they are written here.
    """
    for name, _ in headers:
        if name.strip().lower() in ("mime-version", "content-type", "content-transfer-encoding"):
            raise ValueError(f"{name} is written by sign_multipart, do not pass it")
    inner = _to_crlf(inner)
    if boundary is None:
        boundary = _new_boundary(inner)
    elif not _BCHARS.fullmatch(boundary) or boundary.encode() in inner:
        raise ValueError("boundary is not valid or occurs in the signed content")
    der = cms_sign_detached(inner, signer, digest=digest, signing_time=signing_time)
    delimiter = b"--" + boundary.encode("ascii")
    # One join, one copy of ``inner``: the pieces around it are made from constants.
    return b"".join(
        (
            _header_block(headers),
            _MIME_VERSION,
            _CT_SIGNED_HEAD,
            _MICALG_PARAM[digest],
            boundary.encode("ascii"),
            b'"\r\n\r\n',
            _PREAMBLE_LINE,
            delimiter,
            _CRLF,
            inner,
            _CRLF,
            delimiter,
            _CRLF,
            _SIGNATURE_PART_HEAD,
            _base64_lines(der),
            _CRLF,
            delimiter,
            b"--\r\n",
        )
    )


_MIME_VERSION = b"MIME-Version: 1.0\r\n"
_CT_SIGNED_HEAD = f'Content-Type: multipart/signed; protocol="{CT_SIGNATURE}";\r\n'.encode("ascii")
_MICALG_PARAM = {
    name: f'\tmicalg="{micalg}"; boundary="'.encode("ascii") for name, micalg in _MICALG.items()
}
_PREAMBLE_LINE = SMIME_PREAMBLE.encode("ascii") + _CRLF
_SIGNATURE_PART_HEAD = (
    f'Content-Type: {CT_SIGNATURE}; name="{SMIME_FILENAME}"\r\n'
    "Content-Transfer-Encoding: base64\r\n"
    f'Content-Disposition: attachment; filename="{SMIME_FILENAME}"\r\n'
    "\r\n"
).encode("ascii")


# --- parsing the MIME structure ---------------------------------------------------------------


def _split_head(raw: bytes) -> tuple[bytes, bytes] | None:
    """(header block, body) split at the first blank line; None when there is no blank line."""
    if raw.startswith(b"\n"):
        return b"", raw[1:]
    if raw.startswith(b"\r\n"):
        return b"", raw[2:]
    m = _HEAD_END.search(raw)
    if m is None:
        return None
    return raw[: m.start()], raw[m.end() :]


def _header_value(head: bytes, wanted: str) -> str | None:
    """The unfolded value of the first field called ``wanted`` (any case), decoded as Latin-1."""
    start = _field_start(wanted).search(head)
    if start is None:
        return None
    # No line before ``start`` is the field (the pattern finds every line that can be), so
    # reading from there gives what reading the whole block would.
    value: list[bytes] | None = None
    wanted_name = wanted.encode("ascii")
    for line in head[start.start() :].split(b"\n"):
        line = line.removesuffix(b"\r")
        if line[:1] in (b" ", b"\t"):
            if value is not None:
                value.append(line)
            continue
        if value is not None:
            break
        name, colon, rest = line.partition(b":")
        if colon and name.strip().lower() == wanted_name:
            value = [rest]
    if value is None:
        return None
    return " ".join(v.decode("latin-1").strip() for v in value).strip()


@functools.lru_cache(maxsize=8)
def _field_start(wanted: str) -> re.Pattern[bytes]:
    """Where a line that may be the field ``wanted`` starts: at least every line whose name, as
    :func:`_header_value` strips and lowercases it, is ``wanted`` (its first byte is not a
    fold's SP or HTAB, and bytes.strip's whitespace may surround the name)."""
    name = re.escape(wanted.encode("ascii"))
    return re.compile(rb"^[\r\x0b\x0c][ \t\r\x0b\x0c]*" + name + rb"|^" + name, re.I | re.M)


def _split_params(value: str) -> list[str]:
    """Split a structured header value on ``;`` outside quoted strings."""
    if "\\" not in value:
        # Without a backslash every quote opens or closes a quoted string: the text between
        # two quotes is in one, and only the ";" of the rest split.
        pieces = value.split('"')
        if len(pieces) == 1:
            return value.split(";")
        split = [""]
        for i, piece in enumerate(pieces):
            if i:
                split[-1] += '"'
            if i % 2:
                split[-1] += piece
            else:
                first, *more = piece.split(";")
                split[-1] += first
                split += more
        return split
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


def _content_type(value: str) -> tuple[str, dict[str, str]]:
    """(lowercased media type, parameters with lowercased names and unquoted values)."""
    first, *rest = _split_params(value)
    params: dict[str, str] = {}
    for item in rest:
        name, eq, val = item.partition("=")
        name = name.strip().lower()
        if not eq or not name or name in params:
            continue
        val = val.strip()
        if len(val) >= 2 and val[0] == '"' and val[-1] == '"':
            val = val[1:-1]
            if "\\" in val:
                val = _QUOTED_PAIR.sub(r"\1", val)
        params[name] = val
    return first.strip().lower(), params


_QUOTED_PAIR = re.compile(r"\\(.)")


def _line_end(body: bytes, pos: int) -> int:
    """Position just after the line ending at ``pos`` (where a delimiter match stopped)."""
    if body[pos : pos + 1] == b"\n":
        return pos + 1
    raise SignatureError("malformed-mime", "a MIME delimiter line is not followed by a line end")


def _part_end(body: bytes, start: int, delimiter_start: int) -> int:
    """End of a part: the line ending before the next delimiter belongs to the delimiter."""
    end = delimiter_start - 1  # the LF the delimiter line starts after
    if end > start and body[end - 1 : end] == b"\r":
        end -= 1
    return max(end, start)


def _decode_signature_part(part: bytes) -> bytes:
    split = _split_head(part)
    if split is None:
        raise SignatureError("malformed-mime", "the signature part has no header/body separator")
    head, body = split
    media, _ = _content_type(_header_value(head, "content-type") or "text/plain")
    if media not in CT_SIGNATURE_ALIASES:
        raise SignatureError(
            "malformed-mime", f"the second part is {media or 'untyped'}, not a PKCS#7 signature"
        )
    cte = (_header_value(head, "content-transfer-encoding") or "base64").strip().lower()
    if cte == "binary":
        der = body
    elif cte in ("base64", "7bit"):
        text = body.translate(None, _WSP_BYTES)
        if not text or not _B64_BODY.fullmatch(text) or len(text) % 4:
            raise SignatureError("malformed-mime", "the signature part is not valid base64")
        der = binascii.a2b_base64(text)
    else:
        raise SignatureError(
            "malformed-mime", f"unsupported transfer encoding {cte!r} for the signature"
        )
    if not der:
        raise SignatureError("malformed-mime", "the signature part is empty")
    return der


# A line starting with "--" (its text after the dashes, without the line ending).
_DASH_LINE = re.compile(rb"^--([^\r\n]*)\r?$", re.MULTILINE)


def _delimiter(body: bytes, boundary: bytes, pos: int) -> tuple[int, int, bool] | None:
    """The first delimiter line of ``boundary`` at or after ``pos``: (start of the line, end of
    its text, whether it is the closing one); None if there is none. A pattern compiled for
    each message's own boundary would cost more than the search.

    What :data:`_DASH_LINE` would find, line by line, among the lines that start with
    ``--boundary`` (a delimiter line can be no other): found with bytes.find, which skips the
    text between them far faster than the pattern tries each line."""
    dashes = b"--" + boundary
    at = body.find(dashes, pos)
    while at >= 0:
        if at == 0 or body[at - 1] == 10:  # at the start of a line
            # A line of _DASH_LINE: no CR or LF in its text, but one CR before its LF.
            eol = body.find(b"\n", at)
            end = len(body) if eol < 0 else eol
            text_end = end - 1 if end > at and body[end - 1] == 13 else end
            text = body[at + 2 : text_end]
            if b"\r" not in text:
                kind = delimiter_kind(text, boundary)
                if kind:
                    return at, end, kind == 2
        at = body.find(dashes, at + 1)
    return None


def _split_signed(raw: bytes) -> tuple[bytes, bytes, str | None]:
    split = _split_head(raw)
    if split is None:
        raise SignatureError("not-signed", "no header/body separator, so no multipart/signed body")
    head, body = split
    ctype = _header_value(head, "content-type")
    if ctype is None:
        raise SignatureError("not-signed", "no Content-Type: not a multipart/signed message")
    media, params = _content_type(ctype)
    if media != "multipart/signed":
        raise SignatureError(
            "not-signed", f"Content-Type is {media or 'empty'}, not multipart/signed"
        )
    boundary = params.get("boundary", "")
    if not boundary or len(boundary) > _MAX_BOUNDARY:
        raise SignatureError("malformed-mime", "multipart/signed without a usable boundary")
    protocol = params.get("protocol")
    if protocol is not None and protocol.lower() not in CT_SIGNATURE_ALIASES:
        raise SignatureError(
            "malformed-mime", f"multipart/signed protocol {protocol!r} is not PKCS#7"
        )
    micalg = params.get("micalg")

    bnd = boundary.encode("latin-1")
    first = _delimiter(body, bnd, 0)
    if first is None or first[2]:
        raise SignatureError("malformed-mime", "the boundary of multipart/signed is never opened")
    start = _line_end(body, first[1])
    second = _delimiter(body, bnd, start)
    if second is None:
        raise SignatureError("malformed-mime", "multipart/signed has a single unterminated part")
    signed = body[start : _part_end(body, start, second[0])]
    if second[2]:
        raise SignatureError("malformed-mime", "multipart/signed has no signature part")
    sig_start = _line_end(body, second[1])
    third = _delimiter(body, bnd, sig_start)
    sig_part = (
        body[sig_start:]
        if third is None
        else body[sig_start : _part_end(body, sig_start, third[0])]
    )
    return _to_crlf(signed), _decode_signature_part(sig_part), micalg


def split_signed(raw: bytes) -> tuple[bytes, bytes]:
    """(signed first part in CRLF, signature DER) of a whole ``multipart/signed`` message.

    Raises :class:`SignatureError` (``not-signed`` or ``malformed-mime``) and nothing else.
    """
    signed, der, _ = _split_signed_safe(raw)
    return signed, der


def _split_signed_safe(raw: bytes) -> tuple[bytes, bytes, str | None]:
    try:
        return _split_signed(raw)
    except SignatureError:
        raise
    except Exception as exc:  # never let a parsing accident escape
        raise SignatureError(
            "malformed-mime", f"cannot parse the MIME structure ({exc!r})"
        ) from exc


# --- parsing the CMS -------------------------------------------------------------------------


@dataclass(frozen=True)
class SignatureInfo:
    """What a verified signature says."""

    signer: x509.Certificate
    signer_sha1: str
    certificates: tuple[x509.Certificate, ...]
    digest: str
    signing_time: datetime | None
    signed_content: bytes
    micalg: str | None


@dataclass(frozen=True)
class _Cms:
    digest: str
    signed_attrs_der: bytes | None  # the SET OF (tag 0x31) the signature covers, when present
    message_digest: bytes | None
    signing_time: datetime | None
    signature_algo: str
    signature: bytes
    signer: x509.Certificate | None
    certificates: tuple[x509.Certificate, ...]


def _as_utc(when: datetime) -> datetime:
    return when.replace(tzinfo=UTC) if when.tzinfo is None else when.astimezone(UTC)


def _single_attr(by_type: dict[str, list[Any]], name: str) -> Any:
    found = by_type.get(name, [])
    if not found:
        return None
    if len(found) > 1 or len(found[0]["values"]) != 1:
        raise SignatureError("malformed-cms", f"the {name} signed attribute must occur once")
    return found[0]["values"][0]


@functools.lru_cache(maxsize=64)
def _certificate(der: bytes) -> x509.Certificate:
    """A certificate of a CMS, parsed once: a provider's signatures all carry the same ones."""
    return x509.load_der_x509_certificate(der)


def _sid_matches(sid: Any, cert: Any) -> bool:
    if sid.name == "issuer_and_serial_number":
        if cert.serial_number != sid.chosen["serial_number"].native:
            return False
        issuer = sid.chosen["issuer"]
        # The same encoding is the same name; only differently encoded names need the
        # (slow) RFC 5280 comparison.
        return cert.issuer.dump() == issuer.dump() or bool(cert.issuer == issuer)
    ski = cert.key_identifier
    return ski is not None and bytes(ski) == bytes(sid.chosen.native)


@dataclass(frozen=True, slots=True)
class _Known:
    """The shape of the signatures of one RSA signer (certificate, chain, digest): its
    templates, and what the general parse reads in every signature of that shape."""

    attrs: _Template
    whole: _Template
    sizes: tuple[int, int, int]  # signingTime, messageDigest, signature
    digest: str
    signer: x509.Certificate
    certificates: tuple[x509.Certificate, ...]


# Shapes of the signatures this process made, or verified and found in that shape: a CMS that
# matches one is read by cutting its three variable fields out, which gives what the general
# parse gives (the rest of its bytes are the very bytes the general parse read once) at a small
# part of the cost. Anything else, and any doubt, takes the general parse.
_KNOWN: dict[tuple[bytes, tuple[bytes, ...], str, int], _Known | None] = {}
_MAX_KNOWN = 16
_UTC_TIME = re.compile(rb"\d{12}Z")


def _remember(cert_der: bytes, chain_der: tuple[bytes, ...], digest: str, size: int) -> None:
    key = (cert_der, chain_der, digest, size)
    if key in _KNOWN:
        return
    known: _Known | None = None
    templates = _templates(cert_der, chain_der, digest, size) if digest in _HASHES else None
    if templates is not None:
        attrs, whole = templates
        sizes = (len(_PLACEHOLDER_TIME_DER), hashlib.new(digest).digest_size, size)
        slots = [_PLACEHOLDER_TIME_DER, b"\xa5" * sizes[1], b"\x5a" * size]
        try:
            general = _parse_cms(whole.fill(slots))
        except Exception:
            general = None
        if general is not None and general.signer is not None:
            known = _Known(attrs, whole, sizes, digest, general.signer, general.certificates)
    if len(_KNOWN) >= _MAX_KNOWN:
        # The oldest goes. Without a lock (pec/ stays free of threads): a thread that changed
        # the memory meanwhile (the web's worker threads verify too) makes this a no-op, and the
        # memory at most a few entries over its size.
        with contextlib.suppress(KeyError, RuntimeError, StopIteration):
            _KNOWN.pop(next(iter(_KNOWN)))
    _KNOWN[key] = known


def _utc_time(value: bytes) -> datetime | None:
    """A DER UTCTime ``YYMMDDhhmmssZ`` (RFC 5280: 1950-2049), or None."""
    if not _UTC_TIME.fullmatch(value):
        return None
    yy = int(value[0:2])
    try:
        return datetime(
            (2000 if yy < 50 else 1900) + yy,
            int(value[2:4]),
            int(value[4:6]),
            int(value[6:8]),
            int(value[8:10]),
            int(value[10:12]),
            tzinfo=UTC,
        )
    except ValueError:
        return None


def _parse_known(der: bytes) -> _Cms | None:
    """``der`` read by a known shape, or None."""
    # list() copies the values in one step under the GIL, whatever another thread does.
    shapes = [k for k in list(_KNOWN.values()) if k is not None]
    for k in shapes:
        values = k.whole.match(der, k.sizes)
        if values is None:
            continue
        time_der, message_digest, signature = values
        when = _utc_time(time_der)
        if when is None:
            return None
        return _Cms(
            digest=k.digest,
            signed_attrs_der=k.attrs.fill([time_der, message_digest]),
            message_digest=message_digest,
            signing_time=when,
            signature_algo="rsassa_pkcs1v15",
            signature=signature,
            signer=k.signer,
            certificates=k.certificates,
        )
    return None


def _parse_cms(der: bytes) -> _Cms:
    info = cms.ContentInfo.load(der)
    if info["content_type"].native != "signed_data":
        raise SignatureError("malformed-cms", "the CMS is not SignedData")
    signed_data = info["content"]
    encap = signed_data["encap_content_info"]
    if encap["content_type"].native != "data":
        raise SignatureError("malformed-cms", "the signed content type is not id-data")
    if encap["content"].native is not None:
        raise SignatureError("malformed-cms", "the CMS is not detached (it embeds content)")
    signer_infos = list(signed_data["signer_infos"])
    if len(signer_infos) != 1:
        raise SignatureError(
            "malformed-cms", f"expected exactly one signer, found {len(signer_infos)}"
        )
    si = signer_infos[0]

    digest = si["digest_algorithm"]["algorithm"].native
    if digest not in _HASHES:
        raise SignatureError("unsupported-algorithm", f"digest algorithm {digest} is not supported")
    try:
        signature_algo = si["signature_algorithm"].signature_algo
    except ValueError as exc:
        raise SignatureError(
            "unsupported-algorithm",
            f"signature algorithm {si['signature_algorithm']['algorithm'].dotted} is not supported",
        ) from exc
    signature = bytes(si["signature"].native)

    signed_attrs_der: bytes | None = None
    message_digest: bytes | None = None
    signing_time: datetime | None = None
    attrs = si["signed_attrs"]
    if not isinstance(attrs, core.Void):
        by_type: dict[str, list[Any]] = {}
        for attr in attrs:
            by_type.setdefault(attr["type"].native, []).append(attr)
        content_type = _single_attr(by_type, "content_type")
        md = _single_attr(by_type, "message_digest")
        if content_type is None or md is None:
            raise SignatureError(
                "malformed-cms", "signed attributes lack contentType or messageDigest"
            )
        if content_type.native != "data":
            raise SignatureError("malformed-cms", "the contentType signed attribute is not id-data")
        message_digest = bytes(md.native)
        st = _single_attr(by_type, "signing_time")
        if st is not None:
            when = st.native
            if not isinstance(when, datetime):
                raise SignatureError("malformed-cms", "signingTime is out of range")
            signing_time = _as_utc(when)
        # The encoding as received, retagged from [0] IMPLICIT to SET OF.
        encoded = attrs.dump()
        signed_attrs_der = b"\x31" + encoded[1:]

    sid = si["sid"]
    _ = sid.chosen.native  # force lazy parsing here, inside the caller's error handling
    certificates: list[x509.Certificate] = []
    signer: x509.Certificate | None = None
    cert_set = signed_data["certificates"]
    for choice in [] if isinstance(cert_set, core.Void) else cert_set:
        if choice.name != "certificate":
            continue
        try:
            asn1_cert = choice.chosen
            crypto_cert = _certificate(bytes(asn1_cert.dump()))
            matches = _sid_matches(sid, asn1_cert)
        except Exception:  # an unreadable extra certificate is skipped, not fatal
            continue
        certificates.append(crypto_cert)
        if matches and signer is None:
            signer = crypto_cert
    return _Cms(
        digest=digest,
        signed_attrs_der=signed_attrs_der,
        message_digest=message_digest,
        signing_time=signing_time,
        signature_algo=signature_algo,
        signature=signature,
        signer=signer,
        certificates=tuple(certificates),
    )


def _check_signature(parsed: _Cms, signer: x509.Certificate, content: bytes) -> None:
    algorithm = _HASH_OBJECTS[parsed.digest]
    data = parsed.signed_attrs_der if parsed.signed_attrs_der is not None else content
    try:
        key = signer.public_key()
    except UnsupportedAlgorithm as exc:
        raise SignatureError("unsupported-algorithm", f"signer key type: {exc}") from exc
    except ValueError as exc:
        raise SignatureError("malformed-cms", "the signer public key cannot be read") from exc
    try:
        if parsed.signature_algo == "rsassa_pkcs1v15" and isinstance(key, rsa.RSAPublicKey):
            key.verify(parsed.signature, data, _PKCS1, algorithm)
        elif parsed.signature_algo == "ecdsa" and isinstance(key, ec.EllipticCurvePublicKey):
            key.verify(parsed.signature, data, ec.ECDSA(algorithm))
        else:
            raise SignatureError(
                "unsupported-algorithm",
                f"signature algorithm {parsed.signature_algo} with a "
                f"{type(key).__name__.removeprefix('_')} key is not supported",
            )
    except InvalidSignature as exc:
        raise SignatureError(
            "bad-signature", "the signature does not verify with the signer's public key"
        ) from exc
    except UnsupportedAlgorithm as exc:
        raise SignatureError("unsupported-algorithm", f"cannot verify: {exc}") from exc


def _describe(cert: x509.Certificate) -> str:
    try:
        return cert.subject.rfc4514_string()
    except Exception:
        return "a certificate"


def _check_validity(cert: x509.Certificate, at: datetime, what: str, code: str | None) -> None:
    """Raise ``code`` (or expired/not-yet-valid when ``code`` is None) if ``at`` is outside."""
    if at > cert.not_valid_after_utc:
        raise SignatureError(
            code or "expired",
            f"{what} {_describe(cert)} expired at {cert.not_valid_after_utc.isoformat()}"
            f" (checked at {at.isoformat()})",
        )
    if at < cert.not_valid_before_utc:
        raise SignatureError(
            code or "not-yet-valid",
            f"{what} {_describe(cert)} is valid only from {cert.not_valid_before_utc.isoformat()}"
            f" (checked at {at.isoformat()})",
        )


def _der(cert: x509.Certificate) -> bytes:
    return _cert_der(cert)


def _issued_by(cert: x509.Certificate, issuer: x509.Certificate) -> bool:
    try:
        cert.verify_directly_issued_by(issuer)
    except Exception:  # name mismatch, bad signature, unsupported or unreadable key
        return False
    return True


def _is_ca(cert: x509.Certificate) -> bool:
    """basicConstraints cA, and keyCertSign when keyUsage is present; unreadable means no."""
    try:
        extensions = cert.extensions
        bc = extensions.get_extension_for_class(x509.BasicConstraints).value
        if not bc.ca:
            return False
        try:
            return extensions.get_extension_for_class(x509.KeyUsage).value.key_cert_sign
        except x509.ExtensionNotFound:
            return True
    except Exception:  # missing basicConstraints, or extensions that do not parse
        return False


def _check_chain(
    leaf: x509.Certificate,
    intermediates: Sequence[x509.Certificate],
    roots: Sequence[x509.Certificate],
    at: datetime | None,
) -> None:
    """Signer -> intermediates (from the CMS) -> a trust root: names, signatures, validity."""
    root_ders = {_der(r) for r in roots}
    current = leaf
    used = {_der(leaf)}
    for _ in range(_MAX_CHAIN):
        if _der(current) in root_ders:
            return  # the certificate itself is trusted (a pinned provider certificate)
        for root in roots:
            if _issued_by(current, root):
                if at is not None:
                    _check_validity(root, at, "trust root", "untrusted-chain")
                return
        issuer = next(
            (
                c
                for c in intermediates
                if _der(c) not in used and _is_ca(c) and _issued_by(current, c)
            ),
            None,
        )
        if issuer is None:
            raise SignatureError(
                "untrusted-chain",
                f"no trusted issuer found for {_describe(current)}",
            )
        if at is not None:
            _check_validity(issuer, at, "intermediate CA", "untrusted-chain")
        used.add(_der(issuer))
        current = issuer
    raise SignatureError("untrusted-chain", "the certificate chain is too long")


def _learn(der: bytes, signer: x509.Certificate, parsed: _Cms) -> None:
    key = signer.public_key()
    if not isinstance(key, rsa.RSAPublicKey) or parsed.digest not in ("sha1", "sha256"):
        return
    chain = tuple(_der(c) for c in parsed.certificates if c is not signer)
    entry = (_der(signer), chain, parsed.digest, len(parsed.signature))
    if entry in _KNOWN or len(parsed.signature) != (key.key_size + 7) // 8:
        return
    _remember(*entry)
    known = _KNOWN.get(entry)
    if known is not None and known.whole.match(der, known.sizes) is None:
        _KNOWN[entry] = None  # not of this shape after all: never tried again


def _verify(
    raw: bytes, at: datetime | None, trust_roots: Sequence[x509.Certificate] | None
) -> SignatureInfo:
    content, der, micalg = _split_signed_safe(raw)
    known = _parse_known(der)
    try:
        parsed = known or _parse_cms(der)
    except SignatureError:
        raise
    except Exception as exc:
        raise SignatureError(
            "malformed-cms", f"the smime.p7s is not a valid CMS ({exc!r})"
        ) from exc

    signer = parsed.signer
    if signer is None:
        raise SignatureError("no-signer-certificate", "the signer certificate is not in the CMS")
    _check_signature(parsed, signer, content)
    if parsed.message_digest is not None:
        actual = hashlib.new(parsed.digest, content).digest()
        if not hmac.compare_digest(actual, parsed.message_digest):
            raise SignatureError(
                "digest-mismatch",
                "the signed content was altered: its digest differs from the signed messageDigest",
            )

    when = _as_utc(at) if at is not None else parsed.signing_time
    if when is not None:
        _check_validity(signer, when, "signer certificate", None)
    if trust_roots is not None:
        _check_chain(signer, parsed.certificates, trust_roots, when)

    if known is None and parsed.signature_algo == "rsassa_pkcs1v15":
        # Verified: if it has our shape, the next ones of this signer are read by it.
        _learn(der, signer, parsed)
    return SignatureInfo(
        signer=signer,
        signer_sha1=_encoded(signer).sha1,
        certificates=parsed.certificates,
        digest=parsed.digest,
        signing_time=parsed.signing_time,
        signed_content=content,
        micalg=micalg.lower() if micalg is not None else None,
    )


def verify(
    raw: bytes,
    *,
    at: datetime | None = None,
    trust_roots: Sequence[x509.Certificate] | None = None,
) -> SignatureInfo:
    """Verify the ``multipart/signed`` message ``raw``; raise :class:`SignatureError` otherwise.

    Checks, in order: the MIME structure, the CMS structure, the signer certificate is in the CMS
    (issuerAndSerialNumber or subjectKeyIdentifier), the signature over the signed attributes, the
    messageDigest against the signed content (``digest-mismatch`` thus means authentic attributes
    over altered content), then time validity and, with ``trust_roots``, the chain.

    Time: validity is checked at ``at`` (an aware datetime; a naive one is taken as UTC). When
    ``at`` is None the signingTime signed attribute is used, and when that is absent too no
    validity check is made at all. With ``trust_roots`` the chain signer -> intermediates found in
    the CMS -> one of ``trust_roots`` is checked by hand (issuer names, signatures, CA flag of
    intermediates, validity at the same instant). SHA-1 and RSA-1024 are accepted in certificates,
    because real provider chains use them. Revocation (CRL/OCSP) is not checked here.
    """
    try:
        return _verify(raw, at, trust_roots)
    except SignatureError:
        raise
    except Exception as exc:  # never let anything else escape
        raise SignatureError("malformed-cms", f"cannot verify the signature ({exc!r})") from exc
