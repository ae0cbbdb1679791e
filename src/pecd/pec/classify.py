"""What a received message is: transport envelope, anomaly envelope, a receipt, or plain mail.

Outer headers are not signed (spec section 5), so the kind announced by ``X-Trasporto``/``X-Ricevuta``
is checked against the daticert found inside the verified signed part; a disagreement is an error.
"""

from __future__ import annotations

import base64
import binascii
import quopri
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import TypeVar

from cryptography import x509
from cryptography.hazmat.primitives import serialization

from pecd.pec import daticert as dc
from pecd.pec import mime
from pecd.pec.daticert import Daticert, DaticertError
from pecd.pec.smime import SignatureError, SignatureInfo, verify
from pecd.pec.vocab import (
    DATICERT_FILENAME,
    H_RICEVUTA,
    H_TRASPORTO,
    H_VERIFICA_SICUREZZA,
    POSTACERT_FILENAME,
    VERIFICA_SICUREZZA_ERRORE,
    DaticertTipo,
    Kind,
    Ricevuta,
    Trasporto,
)


class NotMailError(ValueError):
    """The bytes cannot be read as an RFC 5322 message at all."""


@dataclass(frozen=True)
class SignatureReport:
    present: bool
    valid: bool
    digest: str | None = None
    signer_subject: str | None = None
    signer_sha1: str | None = None
    signing_time: datetime | None = None
    error: str | None = None
    error_code: str | None = None


@dataclass(frozen=True)
class Classification:
    kind: Kind
    trasporto: Trasporto | None
    ricevuta: Ricevuta | None
    virus: bool  # X-VerificaSicurezza: errore
    daticert: Daticert | None
    signature: SignatureReport
    signature_info: SignatureInfo | None = None
    postacert: bytes | None = None  # the wrapped message, byte for byte
    errors: tuple[str, ...] = field(default=())
    signer_der: bytes | None = None  # the verified signer's certificate (DER), for the index

    @property
    def is_valid_pec(self) -> bool:
        """A PEC envelope or receipt whose signature verifies and whose structure holds."""
        return self.kind is not Kind.PLAIN and self.signature.valid and not self.errors


# The daticert tipo each announced kind must carry.
_TIPO_OF_RICEVUTA = {r: DaticertTipo(r.value) for r in Ricevuta}


T = TypeVar("T", Trasporto, Ricevuta)


def _enum_header(head: mime.Headers, name: str, cls: type[T]) -> tuple[T | None, str | None]:
    value = head.get_first(name)
    if value is None:
        return None, None
    try:
        return cls(value.strip().lower()), None
    except ValueError:
        return None, f"unknown {name} value {value.strip()!r}"


def _find_parts(tree: mime.Entity) -> tuple[bytes | None, bytes | None, int]:
    """(daticert bytes, postacert bytes, number of daticert parts) outside wrapped messages."""
    found_dc: list[bytes] = []
    postacert: bytes | None = None
    for part in tree.walk():
        name = (part.filename or "").lower()
        if name == DATICERT_FILENAME:
            found_dc.append(_decode(part))
        elif (
            part.content_type == "message/rfc822"
            and postacert is None
            and (name in ("", POSTACERT_FILENAME))
        ):
            postacert = part.body
    return (found_dc[0] if found_dc else None), postacert, len(found_dc)


def _decode(part: mime.Entity) -> bytes:
    cte = (
        (mime.get_first(part.head + b"\r\n\r\n", "Content-Transfer-Encoding") or "").strip().lower()
    )
    if cte == "base64":
        try:
            return base64.b64decode(b"".join(part.body.split()), validate=False)
        except (binascii.Error, ValueError):
            return b""
    if cte == "quoted-printable":
        return quopri.decodestring(part.body)
    return part.body


def classify(
    raw: bytes,
    *,
    at: datetime | None = None,
    trust_roots: Sequence[x509.Certificate] | None = None,
) -> Classification:
    """Classify ``raw``; raises only NotMailError, when there is no header at all."""
    head = mime.Headers(raw)  # one split of the header block for the fields read here
    if not head.fields:
        raise NotMailError("no RFC 5322 header fields found")
    errors: list[str] = []
    trasporto, err = _enum_header(head, H_TRASPORTO, Trasporto)
    errors += [err] if err else []
    ricevuta, err = _enum_header(head, H_RICEVUTA, Ricevuta)
    errors += [err] if err else []
    virus = (
        head.get_first(H_VERIFICA_SICUREZZA) or ""
    ).strip().lower() == VERIFICA_SICUREZZA_ERRORE

    ctype = (head.get_first("Content-Type") or "").lower()
    present = ctype.split(";")[0].strip() == "multipart/signed"
    info: SignatureInfo | None = None
    try:
        info = verify(raw, at=at, trust_roots=trust_roots)
        report = SignatureReport(
            present=True,
            valid=True,
            digest=info.digest,
            signer_subject=info.signer.subject.rfc4514_string(),
            signer_sha1=info.signer_sha1,
            signing_time=info.signing_time,
        )
    except SignatureError as exc:
        report = SignatureReport(
            present=present, valid=False, error=exc.reason, error_code=exc.code
        )

    # Legal data comes from the verified signed part; without one, from the message as received.
    # Only the outer structure counts: the wrapped original is not looked into.
    tree = mime.parse_entity(info.signed_content if info else raw, into_messages=False)
    if info is None and present and tree.children:
        tree = tree.children[0]
    dc_bytes, postacert, n_dc = _find_parts(tree)
    d: Daticert | None = None
    if dc_bytes is not None:
        try:
            d = dc.parse(dc_bytes)
        except DaticertError as exc:
            errors.append(str(exc))
    if n_dc > 1:
        errors.append(f"{n_dc} {DATICERT_FILENAME} parts, expected one")

    if trasporto is Trasporto.POSTA_CERTIFICATA:
        kind = Kind.TRANSPORT_ENVELOPE
    elif trasporto is Trasporto.ERRORE:
        kind = Kind.ANOMALY_ENVELOPE
    elif ricevuta is not None:
        kind = Kind.RECEIPT
    elif d is not None and report.valid:
        # Outer headers lost (e.g. rewritten by a relay) but the signed daticert says what it is.
        kind = Kind.TRANSPORT_ENVELOPE if d.tipo is DaticertTipo.POSTA_CERTIFICATA else Kind.RECEIPT
        if kind is Kind.RECEIPT:
            ricevuta = Ricevuta(d.tipo.value)
    else:
        kind = Kind.PLAIN

    if trasporto is not None and ricevuta is not None:
        errors.append(f"both {H_TRASPORTO} and {H_RICEVUTA} are present")
    if kind is Kind.TRANSPORT_ENVELOPE:
        if d is None:
            errors.append(f"transport envelope without {DATICERT_FILENAME}")
        elif d.tipo is not DaticertTipo.POSTA_CERTIFICATA:
            errors.append(f"transport envelope whose daticert tipo is {d.tipo.value!r}")
        if postacert is None:
            errors.append(f"transport envelope without {POSTACERT_FILENAME}")
    elif kind is Kind.RECEIPT and ricevuta is not None:
        if d is None:
            errors.append(f"{ricevuta.value} receipt without {DATICERT_FILENAME}")
        elif d.tipo is not _TIPO_OF_RICEVUTA[ricevuta]:
            errors.append(
                f"{H_RICEVUTA} says {ricevuta.value!r} but daticert tipo is {d.tipo.value!r}"
            )
    elif kind is Kind.ANOMALY_ENVELOPE and postacert is None:
        errors.append("anomaly envelope without the wrapped message")
    if kind is not Kind.PLAIN and not report.valid:
        errors.append("no S/MIME signature" if not report.present else f"signature: {report.error}")
    return Classification(
        kind=kind,
        trasporto=trasporto,
        ricevuta=ricevuta,
        virus=virus,
        daticert=d,
        signature=report,
        signature_info=info,
        postacert=postacert,
        errors=tuple(errors),
        signer_der=info.signer.public_bytes(serialization.Encoding.DER) if info else None,
    )
