"""What the webmail shows of one stored message: a view model made from its bytes, pure (no I/O).

A PEC message is read the way ``pecd verify`` reads it (:func:`pecd.pec.classify.classify`: the
kind, the signature verdict, the daticert of the verified signed part, the wrapped original);
this module only turns that into what a page shows: the original message unwrapped (headers,
text, HTML, attachments), the notice text of a receipt, the certification data, and the notes
on whatever could not be read. Whatever the bytes, :func:`build_view` returns a view and never
raises: a malformed, truncated or hostile message gives a view with an error note.

The frame of the original's HTML and its attachments need only the original's bytes: once a
view has been made, :func:`original_ref` says where they were (the message itself, or a wrapped
message of that length and SHA-256), and :func:`find_original` finds them again in the stored
bytes without verifying anything (:func:`original_of` is the way there without a view).

It also holds the cheap reading the message list needs (:func:`summarize_head`: the PEC kind
from the unsigned ``X-Trasporto``/``X-Ricevuta`` headers, no body parsed) and the HTML
sanitiser of the sandboxed frame (:func:`sanitize_html`).
"""

from __future__ import annotations

import base64
import binascii
import codecs
import email.utils
import hashlib
import logging
import quopri
import re
import urllib.parse
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from enum import StrEnum
from typing import Final

import nh3
from cryptography import x509

from pecd.cli.verify import NotMailError, examine
from pecd.index.model import ProviderIndex
from pecd.pec import mime
from pecd.pec.classify import Classification, SignatureReport, classify
from pecd.pec.daticert import Daticert
from pecd.pec.msgid import unbracket
from pecd.pec.vocab import (
    DATICERT_FILENAME,
    H_RICEVUTA,
    H_RIFERIMENTO_MESSAGE_ID,
    H_TIPO_RICEVUTA,
    H_TRASPORTO,
    H_VERIFICA_SICUREZZA,
    POSTACERT_FILENAME,
    SMIME_FILENAME,
    VERIFICA_SICUREZZA_ERRORE,
    Kind,
    Ricevuta,
    TipoRicevuta,
    Trasporto,
)

__all__ = [
    "Attachment",
    "Content",
    "HeaderView",
    "MailView",
    "OriginalRef",
    "PecKind",
    "SanitizedHtml",
    "Summary",
    "build_view",
    "find_original",
    "html_of",
    "kind_of",
    "original_of",
    "original_ref",
    "part_of",
    "remote_content",
    "safe_content_type",
    "sanitize_html",
    "summarize_head",
]

log = logging.getLogger(__name__)

#: The most of a header value shown (a hostile header can be megabytes long).
MAX_HEADER_CHARS: Final = 2000
#: The most text (characters) of a body shown on a page.
MAX_TEXT_CHARS: Final = 1_000_000
#: The most HTML (characters) given to the sanitiser.
MAX_HTML_CHARS: Final = 2_000_000
#: The most attachments listed (a message of a million empty parts is a page, not a crash).
MAX_ATTACHMENTS: Final = 500
#: The most of a sender or subject a list line keeps (characters).
SUMMARY_TEXT_CHARS: Final = 500
#: The most of a Message-ID a list line keeps (characters).
SUMMARY_ID_CHARS: Final = 1000


class PecKind(StrEnum):
    """What a message is, by the PEC rules' own words: the transport envelope, each receipt or
    notice (``X-Ricevuta`` values), the anomaly envelope, or ordinary mail."""

    POSTA_CERTIFICATA = Trasporto.POSTA_CERTIFICATA.value
    ACCETTAZIONE = Ricevuta.ACCETTAZIONE.value
    NON_ACCETTAZIONE = Ricevuta.NON_ACCETTAZIONE.value
    PRESA_IN_CARICO = Ricevuta.PRESA_IN_CARICO.value
    AVVENUTA_CONSEGNA = Ricevuta.AVVENUTA_CONSEGNA.value
    ERRORE_CONSEGNA = Ricevuta.ERRORE_CONSEGNA.value
    PREAVVISO_ERRORE_CONSEGNA = Ricevuta.PREAVVISO_ERRORE_CONSEGNA.value
    RILEVAZIONE_VIRUS = Ricevuta.RILEVAZIONE_VIRUS.value
    ANOMALIA = "anomalia"
    PLAIN = "plain"

    @property
    def is_receipt(self) -> bool:
        return self.value in _RICEVUTE


_RICEVUTE = frozenset(r.value for r in Ricevuta)


def kind_of(trasporto: str | None, ricevuta: str | None) -> PecKind:
    """The kind the (unsigned) marker headers announce; unknown values count as plain mail."""
    t = (trasporto or "").strip().lower()
    r = (ricevuta or "").strip().lower()
    if t == Trasporto.POSTA_CERTIFICATA.value:
        return PecKind.POSTA_CERTIFICATA
    if t == Trasporto.ERRORE.value:
        return PecKind.ANOMALIA
    if r in _RICEVUTE:
        return PecKind(r)
    return PecKind.PLAIN


def _kind_of_classification(c: Classification) -> PecKind:
    if c.kind is Kind.TRANSPORT_ENVELOPE:
        return PecKind.POSTA_CERTIFICATA
    if c.kind is Kind.ANOMALY_ENVELOPE:
        return PecKind.ANOMALIA
    if c.kind is Kind.RECEIPT and c.ricevuta is not None:
        return PecKind(c.ricevuta.value)
    return PecKind.PLAIN


# --- headers --------------------------------------------------------------------------------------


def header_text(value: str | None) -> str:
    """A header value as a person reads it: encoded words decoded, controls dropped, bounded."""
    if value is None:
        return ""
    return mime.clean_header_text(mime.decode_words(value[: MAX_HEADER_CHARS * 4]))[
        :MAX_HEADER_CHARS
    ]


def parse_date(value: str | None) -> datetime | None:
    """The instant of a ``Date:`` value, or None when it is not one (or has no zone)."""
    if not value:
        return None
    try:
        when = email.utils.parsedate_to_datetime(value[:200])
    except (TypeError, ValueError, IndexError, OverflowError):
        return None
    return when if when.tzinfo is not None else None


def _addresses(values: Sequence[str]) -> tuple[str, ...]:
    """Each address of ``To``/``Cc``-like values, as ``Name <addr>`` text (bounded)."""
    joined = ", ".join(v[: MAX_HEADER_CHARS * 4] for v in values)
    try:
        pairs = email.utils.getaddresses([joined])
    except (TypeError, ValueError, IndexError):
        return (header_text(joined),) if joined else ()
    out: list[str] = []
    for name, addr in pairs[:200]:
        name, addr = header_text(name), header_text(addr)
        if not name and not addr:
            continue
        out.append(f"{name} <{addr}>" if name and addr else (addr or name))
    return tuple(out)


@dataclass(frozen=True, slots=True)
class HeaderView:
    """The headers a reader sees, decoded."""

    from_: str
    to: tuple[str, ...]
    cc: tuple[str, ...]
    subject: str
    date: datetime | None
    date_text: str
    message_id: str

    @classmethod
    def of(cls, raw: bytes) -> HeaderView:
        date_value = mime.get_first(raw, "Date")
        return cls(
            from_=", ".join(_addresses(mime.get_all(raw, "From"))),
            to=_addresses(mime.get_all(raw, "To")),
            cc=_addresses(mime.get_all(raw, "Cc")),
            subject=header_text(mime.get_first(raw, "Subject")),
            date=parse_date(date_value),
            date_text=header_text(date_value),
            message_id=header_text(mime.get_first(raw, "Message-ID")),
        )


# --- the cheap summary of the message list ---------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Summary:
    """One line of the message list, from the header block alone (nothing signed is checked:
    the list only announces; the reading page verifies). Bounded: the sender and the subject
    at most :data:`SUMMARY_TEXT_CHARS` characters, identifiers :data:`SUMMARY_ID_CHARS`."""

    kind: PecKind
    virus: bool
    tipo_ricevuta: str | None
    from_: str
    subject: str
    date: datetime | None
    message_id: str
    riferimento: str  # X-Riferimento-Message-ID (the client's msgid), bare

    @property
    def sender_address(self) -> str:
        """The address of ``From`` alone (lower case), for searching."""
        _, addr = email.utils.parseaddr(self.from_)
        return addr.lower()


def summarize_head(head: bytes) -> Summary:
    """A :class:`Summary` of the header block ``head`` (the bytes before the first blank line;
    more is harmless: only the top header block is read). Never raises."""
    head = mime.head_of(head)
    try:
        trasporto = mime.get_first(head, H_TRASPORTO)
        ricevuta = mime.get_first(head, H_RICEVUTA)
        tipo = mime.get_first(head, H_TIPO_RICEVUTA)
        virus = (
            mime.get_first(head, H_VERIFICA_SICUREZZA) or ""
        ).strip().lower() == VERIFICA_SICUREZZA_ERRORE
        return Summary(
            kind=kind_of(trasporto, ricevuta),
            virus=virus,
            tipo_ricevuta=(tipo or "").strip().lower()[:20] or None,
            from_=", ".join(_addresses(mime.get_all(head, "From")))[:SUMMARY_TEXT_CHARS],
            subject=header_text(mime.get_first(head, "Subject"))[:SUMMARY_TEXT_CHARS],
            date=parse_date(mime.get_first(head, "Date")),
            message_id=_identifier(mime.get_first(head, "Message-ID")),
            riferimento=_identifier(mime.get_first(head, H_RIFERIMENTO_MESSAGE_ID)),
        )
    except Exception:  # hostile bytes must give a line, never an error page
        log.debug("unreadable header block", exc_info=True)
        return Summary(PecKind.PLAIN, False, None, "", "", None, "", "")


def _identifier(value: str | None) -> str:
    return unbracket(header_text(value))[:SUMMARY_ID_CHARS]


# --- bodies and attachments -------------------------------------------------------------------------


def _disposition(entity: mime.Entity) -> str:
    value = mime.get_first(entity.head + b"\r\n\r\n", "Content-Disposition") or ""
    return value.split(";", 1)[0].strip().lower()


_NOT_BASE64 = re.compile(rb"[^A-Za-z0-9+/]")
_PAD = re.compile(rb"=")
_PAD_TAIL = re.compile(rb"[=\s]*")


def decode_base64(data: mime.Buffer) -> bytes:
    """Base64 as mail carries it, leniently: every byte outside the alphabet is skipped, a
    missing padding is made up; b"" when it cannot be decoded. A well-formed body (padding
    only at its end) is decoded straight from ``data``, with no cleaned copy of it first."""
    try:
        pad = _PAD.search(data)
        if pad is None or _PAD_TAIL.fullmatch(data, pad.start()):
            return binascii.a2b_base64(data)  # not strict: skips what is not base64
    except (binascii.Error, ValueError):
        pass  # a padding missing or misplaced: the way that makes it up
    return _decode_base64_cleaned(data)


def _decode_base64_cleaned(data: mime.Buffer) -> bytes:
    try:
        cleaned = _NOT_BASE64.sub(b"", data)
        return base64.b64decode(cleaned + b"=" * (-len(cleaned) % 4))
    except (binascii.Error, ValueError):
        return b""


def decode_body(entity: mime.Entity) -> bytes:
    """The body of a leaf with its Content-Transfer-Encoding undone (as it is when unknown)."""
    cte = mime.get_first(entity.head + b"\r\n\r\n", "Content-Transfer-Encoding") or ""
    cte = cte.strip().lower()
    if cte == "base64":
        return decode_base64(entity.view)
    if cte == "quoted-printable":
        return quopri.decodestring(entity.body)
    return entity.body


def _charset(entity: mime.Entity) -> str:
    name = (entity.params.get("charset") or "utf-8").strip().strip('"').lower()[:40]
    try:
        info = codecs.lookup(name)
    except (LookupError, ValueError):
        return "utf-8"
    # Only real text encodings (not "rot13", "hex", "zlib" and the like).
    return info.name if getattr(info, "_is_text_encoding", True) else "utf-8"


def decode_text(entity: mime.Entity, data: bytes | None = None) -> str:
    """A text part as a string: its charset when it has a known one, else UTF-8; bad bytes
    become U+FFFD. Never raises."""
    data = decode_body(entity) if data is None else data
    charset = _charset(entity)
    try:
        text = data.decode(charset, "replace")
    except (LookupError, UnicodeError, ValueError, TypeError):
        text = data.decode("utf-8", "replace")
    return mime.unsurrogate(text)


@dataclass(frozen=True, slots=True)
class Attachment:
    """One attachment of the original: ``index`` names it in ``/part/<index>``."""

    index: int
    filename: str
    content_type: str
    size: int  # decoded bytes


@dataclass(frozen=True, slots=True)
class Content:
    """A message as its reader sees it: headers, text, HTML (unsanitised: the frame sanitises
    it), attachments."""

    headers: HeaderView
    text: str | None
    html: str | None
    attachments: tuple[Attachment, ...]
    size: int
    notes: tuple[str, ...] = ()


def _leaves(raw: mime.Buffer) -> list[mime.Entity]:
    """The leaves of a message in depth-first order; a wrapped message (message/rfc822) is one
    leaf, not entered. Their positions are the part numbers of ``/part/<n>``."""
    tree = mime.parse_entity(raw, into_messages=False)
    return [
        e
        for e in tree.walk()
        if not e.children or e.content_type == "message/rfc822"
        # a multipart whose boundary is missing has no children: it is a leaf too
    ]


def _is_body(entity: mime.Entity) -> bool:
    return (
        entity.content_type in ("text/plain", "text/html")
        and _disposition(entity) != "attachment"
        and not entity.filename
    )


def _filename(entity: mime.Entity, index: int) -> str:
    name = mime.clean_header_text(entity.filename or "").strip()
    # No directory part: a name like "../../x" is shown and saved as "x".
    name = re.split(r"[/\\]", name)[-1].strip(". ")[:200]
    if name:
        return name
    if entity.content_type == "message/rfc822":
        return f"messaggio-{index}.eml"
    return f"parte-{index}"


def read_content(raw: bytes) -> Content:
    """The readable content of the message ``raw`` (any bytes; never raises)."""
    notes: list[str] = []
    try:
        headers = HeaderView.of(raw)
    except Exception:  # a header the stdlib chokes on: show none rather than fail
        log.debug("unreadable headers", exc_info=True)
        headers = HeaderView("", (), (), "", None, "", "")
        notes.append("intestazioni illeggibili / unreadable headers")
    text: str | None = None
    html: str | None = None
    attachments: list[Attachment] = []
    try:
        leaves = _leaves(raw)
    except Exception:
        log.debug("unreadable MIME structure", exc_info=True)
        leaves = []
        notes.append("struttura MIME illeggibile / unreadable MIME structure")
    for role, index, leaf in _roles(leaves):
        if role == "text":
            text = decode_text(leaf)[:MAX_TEXT_CHARS]
        elif role == "html":
            html = decode_text(leaf)[:MAX_HTML_CHARS]
        elif role == "over":
            notes.append(f"più di {MAX_ATTACHMENTS} allegati / over {MAX_ATTACHMENTS} attachments")
        else:
            size = (
                len(leaf.view) if leaf.content_type == "message/rfc822" else len(decode_body(leaf))
            )
            attachments.append(Attachment(index, _filename(leaf, index), leaf.content_type, size))
    return Content(headers, text, html, tuple(attachments), len(raw), tuple(notes))


def _roles(leaves: Sequence[mime.Entity]) -> Iterator[tuple[str, int, mime.Entity]]:
    """What each leaf is to a reader, with its part number: "text" (the first plain body),
    "html" (the first HTML body), "attachment"; then "over" once when there are more than
    :data:`MAX_ATTACHMENTS` attachments, and nothing after it."""
    text = html = False
    attachments = 0
    for index, leaf in enumerate(leaves):
        if _is_body(leaf):
            if leaf.content_type == "text/plain" and not text:
                text = True
                yield "text", index, leaf
                continue
            if leaf.content_type == "text/html" and not html:
                html = True
                yield "html", index, leaf
                continue
        if not leaf.view and not leaf.filename:
            continue  # an empty part (the preamble of a broken multipart)
        if attachments >= MAX_ATTACHMENTS:
            yield "over", index, leaf
            return
        attachments += 1
        yield "attachment", index, leaf


def html_of(raw: mime.Buffer) -> str | None:
    """The HTML body of the message ``raw`` as :func:`read_content` finds it (unsanitised),
    without decoding anything else; None when it has none. Never raises."""
    try:
        for role, _, leaf in _roles(_leaves(raw)):
            if role == "html":
                return decode_text(leaf)[:MAX_HTML_CHARS]
    except Exception:
        log.debug("unreadable MIME structure", exc_info=True)
    return None


def part_of(raw: mime.Buffer, index: int) -> tuple[Attachment, bytes] | None:
    """Attachment number ``index`` of the message ``raw`` and its decoded bytes (a wrapped
    message comes as it is), or None when there is no such part."""
    if index < 0:
        return None
    try:
        leaves = _leaves(raw)
    except Exception:
        return None
    if index >= len(leaves):
        return None
    leaf = leaves[index]
    data = leaf.body if leaf.content_type == "message/rfc822" else decode_body(leaf)
    return Attachment(index, _filename(leaf, index), leaf.content_type, len(data)), data


# Types an attachment keeps when downloaded; anything else goes as application/octet-stream.
# Always with Content-Disposition: attachment; nothing here is rendered by the browser in place.
_SAFE_TYPES: Final = frozenset(
    {
        "application/pdf",
        "application/zip",
        "application/pkcs7-mime",
        "application/x-pkcs7-mime",
        "application/pkcs7-signature",
        "application/x-pkcs7-signature",
        "application/msword",
        "application/vnd.openxmlformats-officedocument.wordprocessingml.document",
        "application/vnd.openxmlformats-officedocument.spreadsheetml.sheet",
        "application/vnd.oasis.opendocument.text",
        "application/vnd.oasis.opendocument.spreadsheet",
        "image/png",
        "image/jpeg",
        "image/gif",
        "image/webp",
        "message/rfc822",
    }
)


def safe_content_type(content_type: str) -> str:
    """The Content-Type a download of a part of type ``content_type`` is served with."""
    ctype = content_type.strip().lower()
    return ctype if ctype in _SAFE_TYPES else "application/octet-stream"


def content_disposition(filename: str) -> str:
    """``attachment`` with the file name both as plain ASCII and as RFC 5987 UTF-8."""
    fallback = re.sub(r"[^A-Za-z0-9._ -]", "_", filename)[:100] or "download"
    quoted = urllib.parse.quote(filename[:200], safe="")
    return f"attachment; filename=\"{fallback}\"; filename*=UTF-8''{quoted}"


# --- the whole view ---------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class MailView:
    """Everything the reading page shows of one stored message."""

    kind: PecKind
    virus: bool
    tipo_ricevuta: TipoRicevuta | None
    headers: HeaderView  # of the stored message itself
    notice: str | None  # a PEC message's own text (the receipt's words, the envelope's note)
    original: Content | None  # the message written by a person: unwrapped, or the message itself
    original_is_wrapped: bool
    daticert: Daticert | None
    signature: SignatureReport | None  # None for plain mail
    valid_pec: bool
    pec_msgid: str | None  # daticert identificativo (the transmission's PEC msgid)
    client_msgid: str | None  # daticert msgid / X-Riferimento-Message-ID, bare
    size: int
    errors: tuple[str, ...] = field(default=())
    #: None when no provider index was given; else whether the signer is a provider in it.
    indexed: bool | None = None
    provider: str | None = None  # that provider's name in the index
    #: The bytes of ``original`` (the wrapped message, or the message itself): the part
    #: numbers of ``original.attachments`` are positions in it (:func:`part_of`).
    original_raw: bytes | None = field(default=None, repr=False, compare=False)

    @property
    def is_pec(self) -> bool:
        return self.kind is not PecKind.PLAIN


def _outer_notice(raw: bytes, c: Classification) -> str | None:
    """The text of a PEC message itself (what the provider wrote), from its signed part when it
    verified, else from the message as received."""
    source = c.signature_info.signed_content if c.signature_info is not None else raw
    tree = mime.parse_entity(source, into_messages=False)
    html: str | None = None
    for part in tree.walk():
        if part.content_type == "message/rfc822" or part.children:
            continue
        name = (part.filename or "").lower()
        if name in (DATICERT_FILENAME, SMIME_FILENAME):
            continue
        if part.content_type == "text/plain" and _disposition(part) != "attachment":
            return decode_text(part)[:MAX_TEXT_CHARS]
        if part.content_type == "text/html" and html is None:
            html = decode_text(part)[:MAX_TEXT_CHARS]
    if html is not None:
        # A notice only in HTML: its words, no markup.
        return nh3.clean(html, tags=set())
    return None


def _error_view(raw: bytes, error: str) -> MailView:
    try:
        headers = HeaderView.of(raw)
    except Exception:
        headers = HeaderView("", (), (), "", None, "", "")
    return MailView(
        kind=PecKind.PLAIN,
        virus=False,
        tipo_ricevuta=None,
        headers=headers,
        notice=None,
        original=None,
        original_is_wrapped=False,
        daticert=None,
        signature=None,
        valid_pec=False,
        pec_msgid=None,
        client_msgid=None,
        size=len(raw),
        errors=(error,),
    )


def build_view(
    raw: bytes,
    *,
    at: datetime | None = None,
    trust_roots: Sequence[x509.Certificate] | None = None,
    index: ProviderIndex | None = None,
) -> MailView:
    """The view of the stored message ``raw``. Never raises: what cannot be read becomes an
    error note. The check is ``pecd verify``'s (:func:`pecd.cli.verify.examine`, with ``at``,
    ``trust_roots`` and ``index`` as it takes them; by default: the signature over the signed
    content, and the signer certificate's validity at its signing time)."""
    try:
        return _build_view(raw, at, trust_roots, index)
    except NotMailError as exc:
        return _error_view(raw, f"non è un messaggio di posta / not a mail message: {exc}")
    except Exception as exc:  # hostile bytes must give a page, never an error
        log.warning("message view failed: %r", exc, exc_info=True)
        return _error_view(
            raw, f"messaggio illeggibile / unreadable message ({type(exc).__name__})"
        )


def _build_view(
    raw: bytes,
    at: datetime | None,
    trust_roots: Sequence[x509.Certificate] | None,
    index: ProviderIndex | None,
) -> MailView:
    verdict = examine(raw, at=at, trust_roots=trust_roots, index=index)
    c = verdict.classification
    kind = _kind_of_classification(c)
    errors = list(c.errors)
    d = c.daticert
    notice: str | None = None
    original: Content | None = None
    wrapped = False
    original_raw: bytes | None = None
    original_raw = _original_bytes(raw, c, kind)
    if kind is not PecKind.PLAIN:
        try:
            notice = _outer_notice(raw, c)
        except Exception as exc:
            errors.append(f"testo illeggibile / unreadable text ({type(exc).__name__})")
    if original_raw is not None:
        original = read_content(original_raw)
        wrapped = kind is not PecKind.PLAIN
    if original is not None:
        errors += original.notes
    tipo: TipoRicevuta | None = None
    if d is not None and d.ricevuta is not None:
        tipo = d.ricevuta
    elif kind in (PecKind.POSTA_CERTIFICATA, PecKind.AVVENUTA_CONSEGNA):
        announced = (mime.get_first(raw, H_TIPO_RICEVUTA) or "").strip().lower()
        tipo = TipoRicevuta(announced) if announced in set(TipoRicevuta) else None
    riferimento = mime.get_first(raw, H_RIFERIMENTO_MESSAGE_ID)
    client_msgid = d.msgid if d is not None and d.msgid else riferimento
    return MailView(
        kind=kind,
        virus=c.virus,
        tipo_ricevuta=tipo,
        headers=HeaderView.of(raw),
        notice=notice,
        original=original,
        original_is_wrapped=wrapped,
        daticert=d,
        signature=c.signature if kind is not PecKind.PLAIN or c.signature.present else None,
        valid_pec=verdict.valid,
        pec_msgid=unbracket(d.identificativo) if d is not None else None,
        client_msgid=unbracket(header_text(client_msgid)) if client_msgid else None,
        size=len(raw),
        errors=tuple(errors),
        indexed=verdict.indexed if kind is not PecKind.PLAIN else None,
        provider=verdict.provider.label if verdict.provider is not None else None,
        original_raw=original_raw,
    )


def _original_bytes(raw: bytes, c: Classification, kind: PecKind) -> bytes | None:
    """The bytes of the message a person wrote: the message itself when it is plain mail, else
    the wrapped message (None when there is none)."""
    return raw if kind is PecKind.PLAIN else c.postacert


# --- the original again, without a view -----------------------------------------------------------


@dataclass(frozen=True, slots=True)
class OriginalRef:
    """Where a view found the original in a stored message: the message itself (``wrapped``
    false), or a wrapped message of ``size`` bytes whose SHA-256 is ``sha256``."""

    wrapped: bool
    size: int
    sha256: bytes


def original_ref(view: MailView) -> OriginalRef | None:
    """Where ``view`` found its original (None: it has none)."""
    data = view.original_raw
    if data is None:
        return None
    if not view.original_is_wrapped:
        return OriginalRef(False, len(data), b"")
    return OriginalRef(True, len(data), hashlib.sha256(data).digest())


def original_of(raw: bytes) -> tuple[OriginalRef | None, bytes | None]:
    """The original of the stored message ``raw`` exactly as :func:`build_view` finds it (the
    message is classified, its signature verified: the signed part is where the original is
    taken from when it verifies), and where it is; without reading the original's content.
    Never raises."""
    try:
        c = classify(raw)
    except Exception:  # not mail, or bytes nothing can read: no original, as for the view
        return None, None
    kind = _kind_of_classification(c)
    data = _original_bytes(raw, c, kind)
    if data is None:
        return None, None
    if kind is PecKind.PLAIN:
        return OriginalRef(False, len(data), b""), data
    return OriginalRef(True, len(data), hashlib.sha256(data).digest()), data


def find_original(raw: bytes, ref: OriginalRef) -> mime.Buffer | None:
    """The original ``ref`` describes, found in the stored message ``raw`` by its MIME structure
    alone (nothing verified): the message itself, or the first wrapped message of the signed
    part (of the message, when it is not signed) that has exactly ``ref``'s length and digest.
    A view of ``raw``, not a copy, unless the signed part had to be put in CRLF line endings as
    S/MIME verifies it. None when it is not there as described (the caller then goes the long
    way: :func:`original_of`). Never raises."""
    whole = memoryview(raw)
    if not ref.wrapped:
        return whole if len(whole) == ref.size else None
    try:
        tree = mime.parse_entity(whole, into_messages=False)
        if tree.content_type != "multipart/signed" or not tree.children:
            return _wrapped(tree, ref)
        signed = tree.children[0]
        found = _wrapped(signed, ref)
        if found is None:
            # Where S/MIME took it from when the signature verified: the part in CRLF.
            canonical = mime.to_crlf(signed.head + b"\r\n\r\n" + signed.body)
            found = _wrapped(mime.parse_entity(canonical, into_messages=False), ref)
        return found
    except Exception:
        log.debug("unreadable MIME structure", exc_info=True)
    return None


def _wrapped(tree: mime.Entity, ref: OriginalRef) -> memoryview | None:
    """The first wrapped message of ``tree`` as classify takes it, if it is ``ref``'s."""
    for part in tree.walk():
        name = (part.filename or "").lower()
        if part.content_type == "message/rfc822" and name in ("", POSTACERT_FILENAME):
            found = part.view
            if len(found) == ref.size and hashlib.sha256(found).digest() == ref.sha256:
                return found
            return None
    return None


# --- HTML for the sandboxed frame --------------------------------------------------------------------

_TAGS: Final = frozenset(
    {
        "a", "abbr", "address", "b", "bdi", "bdo", "blockquote", "br", "caption", "center",
        "cite", "code", "col", "colgroup", "dd", "del", "dfn", "div", "dl", "dt", "em",
        "font", "h1", "h2", "h3", "h4", "h5", "h6", "hr", "i", "ins", "kbd", "li", "mark",
        "ol", "p", "pre", "q", "s", "samp", "small", "span", "strike", "strong", "sub", "sup",
        "table", "tbody", "td", "tfoot", "th", "thead", "tr", "tt", "u", "ul", "var",
    }
)  # fmt: skip
# Elements dropped with everything inside them (the rest of what is not allowed keeps its text).
_CLEAN_CONTENT: Final = frozenset(
    {"script", "style", "template", "noscript", "title", "head", "iframe", "object", "embed",
     "svg", "math", "form", "textarea", "select", "button", "audio", "video", "canvas"}
)  # fmt: skip
_ATTRIBUTES: Final = {
    "*": {"align", "valign", "dir", "lang", "title", "style", "width", "height"},
    "a": {"href"},
    "font": {"color", "face", "size"},
    "td": {"colspan", "rowspan", "bgcolor", "nowrap"},
    "th": {"colspan", "rowspan", "bgcolor", "nowrap", "scope"},
    "table": {"border", "cellpadding", "cellspacing", "bgcolor"},
    "tr": {"bgcolor"},
    "col": {"span"},
    "colgroup": {"span"},
    "ol": {"start", "type"},
    "ul": {"type"},
    "li": {"value"},
}
# CSS properties that take no URL: the look of a message survives, nothing is fetched.
_STYLE_PROPERTIES: Final = frozenset(
    {
        "color", "background-color", "font", "font-family", "font-size", "font-style",
        "font-weight", "line-height", "letter-spacing", "text-align", "text-decoration",
        "text-indent", "text-transform", "vertical-align", "white-space", "word-break",
        "margin", "margin-top", "margin-right", "margin-bottom", "margin-left",
        "padding", "padding-top", "padding-right", "padding-bottom", "padding-left",
        "border", "border-top", "border-right", "border-bottom", "border-left",
        "border-color", "border-style", "border-width", "border-collapse", "border-spacing",
        "border-radius", "width", "height", "max-width", "min-width", "display",
    }
)  # fmt: skip
# A CSS value made only of words, numbers, colours and rgb(): no url(), no expression(), no escapes.
_SAFE_CSS_VALUE = re.compile(r"(?:[\w\s#%.,'\"!-]|rgba?\([\d\s.,%]*\))*")
_REMOTE_HINT = re.compile(
    r"<\s*(img|image|picture|source|video|audio|input)\b|url\s*\(|\bsrc\s*=", re.I
)


def _filter_attribute(element: str, attribute: str, value: str) -> str | None:
    """Keep only the declarations of a ``style`` whose values are plain (see _SAFE_CSS_VALUE)."""
    if attribute != "style":
        return value
    kept = []
    for declaration in value.split(";"):
        name, colon, val = declaration.partition(":")
        if colon and name.strip() and _SAFE_CSS_VALUE.fullmatch(val):
            kept.append(f"{name.strip()}:{val.strip()}")
    return ";".join(kept) or None


def remote_content(html: str) -> bool:
    """Whether ``html`` refers to images or other remote content (which the sanitiser drops)."""
    return bool(_REMOTE_HINT.search(html[:MAX_HTML_CHARS]))


@dataclass(frozen=True, slots=True)
class SanitizedHtml:
    html: str
    blocked: bool  # images or other remote content were removed


def sanitize_html(html: str) -> SanitizedHtml:
    """``html`` made inert: formatting, tables and links (http, https, mailto; opening in a new
    tab with no opener and no referrer) survive; scripts, event handlers, styles sheets, forms,
    frames, objects and every image or other remote reference are removed. CSS in ``style``
    attributes keeps only properties that cannot fetch anything."""
    html = mime.unsurrogate(html[:MAX_HTML_CHARS])
    blocked = remote_content(html)
    cleaned = nh3.clean(
        html,
        tags=set(_TAGS),
        clean_content_tags=set(_CLEAN_CONTENT),
        attributes={k: set(v) for k, v in _ATTRIBUTES.items()},
        attribute_filter=_filter_attribute,
        url_schemes={"http", "https", "mailto"},
        url_relative="deny",  # a relative link would name a page of this webmail
        link_rel="noopener noreferrer",
        set_tag_attribute_values={"a": {"target": "_blank"}},
        filter_style_properties=set(_STYLE_PROPERTIES),
        strip_comments=True,
    )
    return SanitizedHtml(cleaned, blocked)


def sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()
