"""Delivery status notifications (RFC 3464 inside an RFC 6522 ``multipart/report``) for the
ordinary-mail (``esterno``) recipients of a relayed message that could not be delivered.

The PEC rules owe no PEC notice for an ``esterno`` recipient (spec 2.3: such recipients get the
transport envelope as ordinary mail, outside the certified circuit), so no errore-consegna is
built for one. Ordinary mail still owes its sender a bounce (RFC 5321 4.5.5): this module builds
that bounce as any MTA would. It is **not** a PEC receipt, carries no daticert and is **not**
signed: it is a DSN from the provider's MTA, and its text says it has no legal value.

The relay builds one when an ``esterno`` recipient is refused for good (5xx: :meth:`Failure.refused`)
or when it gives up after the relay's expiry (4.4.7: :meth:`Failure.expired`). RFC 5321 4.5.5 says
how the caller must send it: with a null reverse-path (``MAIL FROM:<>``), and never in answer to a
message whose own reverse-path was null.

Pure: bytes and dataclasses in, bytes out. Output is 7bit, CRLF, every line at most 998 octets
(non-ASCII original headers are quoted-printable; the notification's own fields are ASCII).
"""

from __future__ import annotations

import quopri
import re
import textwrap
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime

from pecd.pec.mime import (
    CRLF,
    clean_field,
    clean_header_text,
    decode_words,
    encode_header_text,
    format_mailbox,
    get_first,
    head_of,
    header_fields,
    new_boundary,
    qp_text_part,
    to_crlf,
)
from pecd.pec.msgid import bracket, new_pec_msgid
from pecd.pec.texts import smtp_reply_parts
from pecd.pec.timefmt import PecTime, pec_time

__all__ = ["EXPIRED_STATUS", "Failure", "delivery_status_notification"]

EXPIRED_STATUS = "4.4.7"  # RFC 3463: delivery time expired
SUBJECT_PREFIX = "Mancata consegna (non PEC): "

_STATUS = re.compile(r"^[45]\.\d{1,3}\.\d{1,3}$")
_SMTP_REPLY = re.compile(r"^[245]\d\d(?:[ -]|$)")
_HOST = re.compile(r"^[A-Za-z0-9](?:[A-Za-z0-9.-]*[A-Za-z0-9])?$")
_MSGID = re.compile(r"^<[!-;=?-~]{1,250}@[!-;=?-~]{1,250}>$")  # visible ASCII, no < > inside
_NON_ASCII = re.compile(r"[^\x20-\x7e]")
# RFC 6533 utf-8-addr-xtext: QCHAR is %x21-2a / %x2c-3c / %x3e-5b / %x5d-7e, the rest \x{HEX}.
_NOT_QCHAR = re.compile(r"[^\x21-\x2a\x2c-\x3c\x3e-\x5b\x5d-\x7e]")
DIAGNOSTIC_MAX = 900  # characters of a Diagnostic-Code value (the field stays far below 998)
REASON_MAX = 500  # characters of a reason in the human-readable text


@dataclass(frozen=True, slots=True)
class Failure:
    """One recipient the message could not be delivered to.

    ``status`` is an RFC 3463 enhanced code (``5.1.1``; ``4.4.7`` for an expiry). ``diagnostic`` is
    the remote SMTP reply, when there was one (``Diagnostic-Code: smtp; ...``). ``reason`` is the
    text the sender reads in the human-readable part (and, with no SMTP reply, the machine one as
    ``Diagnostic-Code: X-pecd; ...``). ``last_attempt`` defaults to the notification's time;
    ``remote_mta`` is the host that answered, when known."""

    recipient: str
    status: str
    diagnostic: str | None = None
    reason: str = ""
    last_attempt: datetime | None = None
    remote_mta: str | None = None

    def __post_init__(self) -> None:
        if not _STATUS.match(self.status):
            raise ValueError(f"not a failure status code: {self.status!r}")
        if not clean_header_text(self.recipient).strip():
            raise ValueError("a failure needs a recipient")
        if self.last_attempt is not None and self.last_attempt.tzinfo is None:
            raise ValueError("last_attempt must be an aware datetime")

    @property
    def expired(self) -> bool:
        return self.status.startswith("4.")

    @classmethod
    def refused(
        cls,
        recipient: str,
        reply: str,
        *,
        at: datetime | None = None,
        remote_mta: str | None = None,
    ) -> Failure:
        """A recipient refused for good by its server with SMTP ``reply`` (``550 5.1.1 ...``).

        The status is the reply's enhanced code, or ``5.0.0`` when it has none (or is not 5xx:
        a refusal for good is permanent whatever the peer said)."""
        code, _reason = smtp_reply_parts(reply)
        status = code if code.startswith("5.") else "5.0.0"
        diagnostic = reply if _SMTP_REPLY.match(reply.strip()) else None
        return cls(recipient, status, diagnostic, reply, at, remote_mta)

    @classmethod
    def expired_after(
        cls,
        recipient: str,
        last_error: str,
        *,
        at: datetime | None = None,
        remote_mta: str | None = None,
    ) -> Failure:
        """A recipient the relay gave up on when its retry period expired, the last temporary
        failure being ``last_error`` (an SMTP ``4xx`` reply, or a connection error):
        ``Status: 4.4.7``, ``Action: failed``."""
        diagnostic = last_error if _SMTP_REPLY.match(last_error.strip()) else None
        return cls(recipient, EXPIRED_STATUS, diagnostic, last_error, at, remote_mta)


def delivery_status_notification(
    *,
    reporting_mta: str,
    sender: str,
    from_address: str,
    original: bytes,
    failures: Sequence[Failure],
    when: PecTime | datetime,
    message_id_domain: str,
    arrival: datetime | None = None,
    from_name: str = "",
    msgid_token: str | None = None,
) -> bytes:
    """The bytes of a ``multipart/report; report-type=delivery-status`` message to ``sender``
    about ``failures`` of ``original`` (RFC 6522, RFC 3464).

    Three parts: a ``text/plain`` explanation (Italian, then English), the
    ``message/delivery-status`` (``Reporting-MTA: dns; <reporting_mta>``, ``Arrival-Date`` when
    ``arrival`` is given, then per recipient ``Final-Recipient``, ``Action: failed``, ``Status``,
    ``Remote-MTA``, ``Diagnostic-Code``, ``Last-Attempt-Date``), and the original's header block
    as ``text/rfc822-headers`` (never its body, which may be large). From ``from_address`` (the
    provider's service address, ``from_name`` its display name), To ``sender``,
    ``Auto-Submitted: auto-replied`` (RFC 3834), a new Message-ID under ``message_id_domain``
    (``msgid_token`` fixes its random part, for tests), ``In-Reply-To``/``References`` the
    original's Message-ID when it is well-formed.

    Not a PEC receipt and not signed: see the module docstring. Raise ValueError with no failure,
    no sender (a null reverse-path gets no DSN, RFC 3464 2), or a bad host name."""
    if not failures:
        raise ValueError("a delivery status notification needs at least one failure")
    sender = _address(sender)
    if not sender:
        raise ValueError("no DSN to a null reverse-path (RFC 5321 4.5.5)")
    if not _HOST.match(reporting_mta):
        raise ValueError(f"not a host name: {reporting_mta!r}")
    t = when if isinstance(when, PecTime) else pec_time(when)
    arrived = pec_time(arrival) if arrival is not None else None

    original = to_crlf(original)
    subject = _original_subject(original)
    msgid = bracket(new_pec_msgid(message_id_domain, t, token=msgid_token))

    text = _human_text(reporting_mta, sender, subject, failures, arrived)
    status = _delivery_status(reporting_mta, failures, t, arrived)
    headers = _headers_part(original)
    parts = [qp_text_part("text/plain", text), status, headers]

    boundary = new_boundary(*parts)
    fields = [
        ("From", format_mailbox(from_name, from_address) if from_name else _address(from_address)),
        ("To", sender),
        ("Subject", encode_header_text("Subject", SUBJECT_PREFIX + subject)),
        ("Date", t.rfc5322),
        ("Message-ID", msgid),
    ]
    original_id = get_first(original, "Message-ID")
    if original_id is not None and _MSGID.match(original_id.strip()):
        fields += [("In-Reply-To", original_id.strip()), ("References", original_id.strip())]
    fields += [
        ("Auto-Submitted", "auto-replied"),
        ("MIME-Version", "1.0"),
        (
            "Content-Type",
            f'multipart/report; report-type=delivery-status;\r\n boundary="{boundary}"',
        ),
    ]
    head = "".join(f"{name}: {value}\r\n" for name, value in fields).encode("ascii")
    out = [head, CRLF, b"This is a MIME-encapsulated message.\r\n", CRLF]
    for part in parts:
        out += [f"--{boundary}\r\n".encode(), part]
        if not part.endswith(CRLF):
            out.append(CRLF)
        out.append(CRLF)
    out.append(f"--{boundary}--\r\n".encode())
    return b"".join(out)


# --- the parts -----------------------------------------------------------------------------------


def _human_text(
    mta: str, sender: str, subject: str, failures: Sequence[Failure], arrived: PecTime | None
) -> str:
    it: list[str] = []
    en: list[str] = []
    for f in failures:
        rcpt = _one_line(f.recipient)
        reason = _cut(_one_line(f.reason or f.diagnostic or ""), REASON_MAX)
        if f.expired:
            it.append(f"  {rcpt}: non consegnato entro il termine dei tentativi ({f.status})")
            en.append(f"  {rcpt}: not delivered before the retry period expired ({f.status})")
        else:
            it.append(f"  {rcpt}: rifiutato dal server del destinatario ({f.status})")
            en.append(f"  {rcpt}: refused by the recipient's mail server ({f.status})")
        if reason:
            it.append(f"      {reason}")
            en.append(f"      {reason}")
    it_when = en_when = []
    if arrived is not None:
        it_when = [
            f"Ricevuto il giorno {arrived.giorno} alle ore {arrived.ora} {arrived.text_zone}"
        ]
        en_when = [f"Received on {arrived.rfc5322}"]
    return "\r\n".join(
        [
            f"Questo è un messaggio automatico del server di posta {mta}.",
            "",
            f"Il messaggio inviato da {sender}",
            f'  Oggetto: "{subject}"',
            *it_when,
            "non è stato consegnato ai seguenti destinatari ordinari (non PEC):",
            "",
            *it,
            "",
            "Per i destinatari di posta ordinaria il gestore non emette ricevute PEC:",
            "questo avviso non è una ricevuta di posta certificata e non ha valore legale.",
            "In allegato i dettagli tecnici e le intestazioni del messaggio originale.",
            "",
            "-----",
            "",
            f"This is an automatic message from the mail server {mta}.",
            "",
            f"The message sent by {sender}",
            f'  Subject: "{subject}"',
            *en_when,
            "could not be delivered to the following ordinary (non-PEC) recipients:",
            "",
            *en,
            "",
            "A PEC provider issues no PEC receipts for ordinary-mail recipients:",
            "this notice is not a certified-mail receipt and has no legal value.",
            "The technical details and the original message's headers are attached.",
            "",
        ]
    )


def _delivery_status(
    mta: str, failures: Sequence[Failure], t: PecTime, arrived: PecTime | None
) -> bytes:
    groups = [[("Reporting-MTA", f"dns; {mta}")]]
    if arrived is not None:
        groups[0].append(("Arrival-Date", arrived.rfc5322))
    for f in failures:
        group = [
            ("Final-Recipient", _address_type_and_address(f.recipient)),
            ("Action", "failed"),
            ("Status", f.status),
        ]
        if f.remote_mta and _HOST.match(f.remote_mta.strip()):
            group.append(("Remote-MTA", f"dns; {f.remote_mta.strip()}"))
        if f.diagnostic and f.diagnostic.strip():
            group.append(("Diagnostic-Code", f"smtp; {_ascii_text(f.diagnostic)}"))
        elif f.reason.strip():
            group.append(("Diagnostic-Code", f"X-pecd; {_ascii_text(f.reason)}"))
        last = pec_time(f.last_attempt) if f.last_attempt is not None else t
        group.append(("Last-Attempt-Date", last.rfc5322))
        groups.append(group)
    body = "\r\n".join("".join(_fold(n, v) for n, v in g) for g in groups)
    head = "Content-Type: message/delivery-status\r\nContent-Transfer-Encoding: 7bit\r\n\r\n"
    return (head + body).encode("ascii")


def _headers_part(original: bytes) -> bytes:
    """The original's header block, each field cleaned of controls (:func:`clean_field`): 7bit
    when it is ASCII with short lines, else quoted-printable (the DSN stays 7bit, RFC 6522 3)."""
    head = head_of(original)
    fields = []
    for _name, chunk in header_fields(head + CRLF):
        fields.append(clean_field(chunk if chunk.endswith(CRLF) else chunk + CRLF))
    block = b"".join(fields)
    if block.isascii() and all(len(line) <= 998 for line in block.split(CRLF)):
        return (
            b"Content-Type: text/rfc822-headers\r\nContent-Transfer-Encoding: 7bit\r\n\r\n" + block
        )
    encoded = to_crlf(quopri.encodestring(block.replace(CRLF, b"\n")))
    return (
        b"Content-Type: text/rfc822-headers; charset=utf-8\r\n"
        b"Content-Transfer-Encoding: quoted-printable\r\n\r\n" + encoded
    )


# --- text helpers --------------------------------------------------------------------------------


def _original_subject(original: bytes) -> str:
    raw = get_first(original, "Subject")
    return " ".join(clean_header_text(decode_words(raw)).split()) if raw is not None else ""


def _address(address: str) -> str:
    """An address as a header value: cleaned, one token, no angle brackets or line breaks."""
    address = clean_header_text(address).strip()
    if address.startswith("<") and address.endswith(">"):
        address = address[1:-1].strip()
    if any(c in address for c in ' \t<>,;"()'):
        raise ValueError(f"not a bare address: {address!r}")
    if not address.isascii():
        # An internationalised address needs SMTPUTF8 and RFC 2047 cannot hold it: refuse rather
        # than send a header a 7bit transport would mangle.
        raise ValueError(f"not an ASCII address: {address!r}")
    return address


def _address_type_and_address(recipient: str) -> str:
    """``rfc822; <addr>``, or ``utf-8; <utf-8-addr-xtext>`` for a non-ASCII address (RFC 6533 3)."""
    address = "".join(clean_header_text(recipient).split())
    if address.startswith("<") and address.endswith(">"):
        address = address[1:-1]
    if address.isascii() and "\\" not in address:
        return f"rfc822; {address}"
    xtext = _NOT_QCHAR.sub(lambda m: f"\\x{{{ord(m.group()):X}}}", address)
    return f"utf-8; {xtext}"


def _one_line(text: str) -> str:
    return " ".join(clean_header_text(text).split())


def _cut(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[: limit - 3].rstrip() + "..."


def _ascii_text(text: str) -> str:
    """One printable-ASCII line (non-ASCII becomes ``?``), cut to ``DIAGNOSTIC_MAX``."""
    return _cut(_NON_ASCII.sub("?", _one_line(text)), DIAGNOSTIC_MAX)


def _fold(name: str, value: str) -> str:
    """``name: value`` CRLF, folded at spaces near 78 columns (a value has no line break)."""
    lines = textwrap.wrap(
        f"{name}: {value}",
        width=78,
        subsequent_indent=" ",
        break_long_words=False,
        break_on_hyphens=False,
    )
    return "\r\n".join(lines) + "\r\n"
