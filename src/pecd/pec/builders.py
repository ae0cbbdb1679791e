"""Envelopes and receipts: original bytes + provider identity + one instant -> signed bytes to send.

Every builder takes the ``PecTime`` of its event and uses it for ``Date:``, the text, the daticert and
the CMS signingTime, so one transmission has one time value (spec section 6).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from pecd.pec import daticert as dc
from pecd.pec import mime, texts
from pecd.pec.address import normalize_address
from pecd.pec.breve import to_breve
from pecd.pec.checks import Violation, parse_address_list
from pecd.pec.daticert import Daticert, Destinatario
from pecd.pec.msgid import bracket, new_pec_msgid, unbracket
from pecd.pec.smime import DigestName, Signer, sign_multipart
from pecd.pec.timefmt import PecTime
from pecd.pec.vocab import (
    DATICERT_FILENAME,
    H_MITTENTE,
    H_RICEVUTA,
    H_RIFERIMENTO_MESSAGE_ID,
    H_RIPRODUZIONE,
    H_TIPO_RICEVUTA,
    H_TRASPORTO,
    H_VERIFICA_SICUREZZA,
    PER_CONTO_DI,
    POSTACERT_FILENAME,
    RECEIPT_SUBJECTS,
    SUBJ_ANOMALIA,
    SUBJ_POSTA_CERTIFICATA,
    VERIFICA_SICUREZZA_ERRORE,
    DaticertTipo,
    DestinatarioTipo,
    Errore,
    Ricevuta,
    TipoRicevuta,
    Trasporto,
)

# Headers an envelope copies unchanged from what it wraps (spec section 2.1); a transport
# envelope also Reply-To when present, an anomaly envelope also Message-ID.
_ENVELOPE_COPIED = ("Received", "Return-Path", "To", "Cc")


@dataclass(frozen=True)
class ProviderIdentity:
    """Who signs: the provider's name (``gestore-emittente``), mail domain and service address."""

    name: str
    domain: str
    service_address: str
    signer: Signer
    digest: DigestName = "sha256"

    def new_msgid(self, when: PecTime) -> str:
        return new_pec_msgid(self.domain, when)


@dataclass(frozen=True)
class Transmission:
    """One PEC transmission as certified: the data every receipt about it repeats.

    Built by the access point from the SMTP envelope and the original (``from_submission``), or by
    the receiving side from a verified daticert (``from_daticert``).
    """

    identificativo: str  # PEC msgid, bare
    mittente: str  # SMTP reverse-path
    destinatari: tuple[Destinatario, ...]  # RCPT set, To order then Cc
    risposte: str
    oggetto: str
    msgid: str | None  # client Message-ID with brackets
    ricevuta: TipoRicevuta = TipoRicevuta.COMPLETA
    to: tuple[str, ...] = field(default=())
    cc: tuple[str, ...] = field(default=())

    def __post_init__(self) -> None:
        # What every receipt repeats in its headers and daticert, cleaned once whatever its source
        # (a submission, a received daticert, a queued job): no controls, no lone surrogates.
        for name in ("mittente", "risposte", "oggetto", "msgid"):
            value = getattr(self, name)
            if value is not None:
                object.__setattr__(self, name, mime.clean_header_text(value))

    @classmethod
    def from_submission(
        cls,
        original: bytes,
        *,
        mail_from: str,
        rcpt_to: Sequence[str],
        identificativo: str,
        is_certified: Callable[[str], bool],
    ) -> Transmission:
        # One split of the header block for every field read below.
        head = mime.Headers(original)
        to = _addresses(head, "To")
        cc = _addresses(head, "Cc")
        rcpts = [normalize_address(r) for r in rcpt_to]
        order = {a: i for i, a in enumerate([*to, *cc])}
        ordered = sorted(dict.fromkeys(rcpts), key=lambda a: order.get(a, len(order)))
        risposte = _risposte(head, mail_from)
        return cls(
            identificativo=unbracket(identificativo),
            mittente=normalize_address(mail_from),
            destinatari=tuple(
                Destinatario(
                    a,
                    DestinatarioTipo.CERTIFICATO if is_certified(a) else DestinatarioTipo.ESTERNO,
                )
                for a in ordered
            ),
            risposte=risposte,
            oggetto=original_subject(head),
            msgid=_client_msgid(head),
            ricevuta=requested_receipt(head),
            to=tuple(to),
            cc=tuple(cc),
        )

    @classmethod
    def from_daticert(cls, d: Daticert, *, envelope: bytes = b"") -> Transmission:
        """From a verified envelope's daticert; To/Cc come from the envelope's copied headers."""
        head = mime.Headers(envelope)
        return cls(
            identificativo=d.identificativo,
            mittente=d.mittente,
            destinatari=d.destinatari,
            risposte=d.risposte,
            oggetto=d.oggetto or "",
            msgid=d.msgid,
            ricevuta=d.ricevuta or TipoRicevuta.COMPLETA,
            to=tuple(_addresses(head, "To")),
            cc=tuple(_addresses(head, "Cc")),
        )

    def receipt_kind_for(self, recipient: str) -> TipoRicevuta:
        """Which delivery receipt ``recipient`` earns: Cc recipients get sintetica (spec 2.3)."""
        r = normalize_address(recipient)
        if r in self.to or r not in self.cc:
            return self.ricevuta
        return TipoRicevuta.SINTETICA

    def daticert(
        self,
        tipo: DaticertTipo,
        provider: ProviderIdentity,
        when: PecTime,
        *,
        errore: Errore = Errore.NESSUNO,
        ricevuta: TipoRicevuta | None = None,
        consegna: str | None = None,
        ricezione: Sequence[str] = (),
        errore_esteso: str | None = None,
    ) -> Daticert:
        return Daticert(
            tipo=tipo,
            errore=errore,
            mittente=self.mittente,
            destinatari=self.destinatari,
            risposte=self.risposte,
            oggetto=self.oggetto,
            gestore_emittente=provider.name,
            giorno=when.giorno,
            ora=when.ora,
            zona=when.zona,
            identificativo=self.identificativo,
            msgid=self.msgid,
            ricevuta=ricevuta,
            consegna=consegna,
            ricezione=tuple(ricezione),
            errore_esteso=None if errore_esteso is None else mime.clean_header_text(errore_esteso),
        )

    @property
    def addresses(self) -> tuple[str, ...]:
        return tuple(d.address for d in self.destinatari)

    def to_json(self) -> dict[str, object]:
        """A JSON-ready dict, so a queued job can carry the transmission between stages."""
        return {
            "identificativo": self.identificativo,
            "mittente": self.mittente,
            "destinatari": [[d.address, d.tipo.value] for d in self.destinatari],
            "risposte": self.risposte,
            "oggetto": self.oggetto,
            "msgid": self.msgid,
            "ricevuta": self.ricevuta.value,
            "to": list(self.to),
            "cc": list(self.cc),
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Transmission:
        return cls(
            identificativo=str(data["identificativo"]),
            mittente=str(data["mittente"]),
            destinatari=tuple(
                Destinatario(str(a), DestinatarioTipo(t)) for a, t in data["destinatari"]
            ),
            risposte=str(data["risposte"]),
            oggetto=str(data["oggetto"]),
            msgid=None if data["msgid"] is None else str(data["msgid"]),
            ricevuta=TipoRicevuta(data["ricevuta"]),
            to=tuple(data["to"]),
            cc=tuple(data["cc"]),
        )


@dataclass(frozen=True)
class BuiltMessage:
    """A signed message ready to send, with what the trace log needs about it."""

    raw: bytes
    message_id: str  # bare
    daticert: Daticert | None
    envelope_to: tuple[str, ...]  # SMTP forward-paths it goes to


# --- reading the original -------------------------------------------------------------------


def _headers(raw: bytes | mime.Headers) -> mime.Headers:
    return raw if isinstance(raw, mime.Headers) else mime.Headers(raw)


def _addresses(raw: bytes | mime.Headers, name: str) -> list[str]:
    found: list[str] = []
    for value in _headers(raw).get_all(name):
        valid, _ = parse_address_list(mime.clean_header_text(value))
        found += [normalize_address(a) for a in valid]
    return list(dict.fromkeys(found))


def _risposte(head: mime.Headers, mail_from: str) -> str:
    """daticert ``<risposte>``: the first Reply-To address, else the first From address, else the
    reverse-path (spec 3: "Reply-To (From when none)"), as a bare address. The envelope's own
    ``Reply-To`` header is another matter: the original's field, unaltered (``transport_envelope``)."""
    reply_to = _addresses(head, "Reply-To")
    froms = _addresses(head, "From")
    return reply_to[0] if reply_to else (froms[0] if froms else normalize_address(mail_from))


def _client_msgid(head: mime.Headers) -> str | None:
    value = mime.clean_header_text(head.get_first("Message-ID") or "")
    if not value.strip():
        return None
    return bracket(value.strip().split()[0])


def original_subject(raw: bytes | mime.Headers) -> str:
    """The original's Subject, decoded (RFC 2047) and cleaned (``mime.clean_header_text``): what
    every builder copies into the headers and the daticert it signs."""
    value = _headers(raw).get_first("Subject")
    return "" if value is None else mime.clean_header_text(mime.decode_words(value))


def requested_receipt(raw: bytes | mime.Headers) -> TipoRicevuta:
    """``X-TipoRicevuta`` of the client's message (any letter case); absent or unknown -> completa."""
    value = (_headers(raw).get_first(H_TIPO_RICEVUTA) or "").strip().lower()
    # A lookup, not TipoRicevuta(value): most messages have no such field, and the enum says so
    # by raising, which costs more than the rest of this function.
    return _TIPI_RICEVUTA.get(value, TipoRicevuta.COMPLETA)


_TIPI_RICEVUTA = {t.value: t for t in TipoRicevuta}


# --- assembly ------------------------------------------------------------------------------------


def _body(notice: texts.Notice, d: Daticert | None, original: bytes | None) -> bytes:
    """The signed content: the texts, then daticert.xml, then the original, in one join (one copy
    of the original, where a part built whole and then the whole body would copy it twice)."""
    alternative = mime.multipart(
        "alternative",
        [
            mime.qp_text_part("text/plain", notice.plain()),
            mime.qp_text_part("text/html", notice.html()),
        ],
    )
    parts: list[list[bytes]] = [[alternative]]
    # What the boundary must not occur in. The heads of the daticert and rfc822 parts cannot hold
    # it (they are constants without "_pecd_"), nor can it run from a head into what follows (a
    # head ends with LF) or from the message into the CRLF after it (it has no CR or LF): the
    # message is enough for that part.
    contents = [alternative]
    if d is not None:
        encoded = mime.base64_lines(dc.build(d))
        parts.append([_DATICERT_PART_HEAD, encoded])
        contents.append(encoded)
    if original is not None:
        pieces = mime.rfc822_pieces(POSTACERT_FILENAME, original)
        parts.append(pieces)
        contents.append(pieces[1])
    boundary = mime.new_boundary(*contents).encode()
    delimiter = b"--" + boundary + mime.CRLF
    out = [b'Content-Type: multipart/mixed; boundary="', boundary, b'"\r\n\r\n']
    for part in parts:
        out.append(delimiter)
        out += part
        out.append(mime.CRLF)
    out += [b"--", boundary, b"--\r\n"]
    return b"".join(out)


_DATICERT_PART_HEAD = (
    f'Content-Type: application/xml; name="{DATICERT_FILENAME}"\r\n'
    f'Content-Disposition: inline; filename="{DATICERT_FILENAME}"\r\n'
    "Content-Transfer-Encoding: base64\r\n\r\n"
).encode()


def _sign(
    provider: ProviderIdentity,
    when: PecTime,
    headers: list[tuple[str, str]],
    body: bytes,
    raw_fields: Sequence[bytes] = (),
) -> bytes:
    signed = sign_multipart(
        headers, body, provider.signer, digest=provider.digest, signing_time=when.instant
    )
    if not raw_fields:
        return signed
    # Copied fields go first, byte for byte, as a relay would have left them (one join: the
    # signed message is copied once).
    return b"".join([*raw_fields, signed])


def _receipt(
    ricevuta: Ricevuta,
    *,
    provider: ProviderIdentity,
    when: PecTime,
    tx: Transmission,
    to: str,
    notice: texts.Notice,
    d: Daticert,
    original: bytes | None = None,
    virus: bool = False,
    extra: Sequence[tuple[str, str]] = (),
) -> BuiltMessage:
    """Sign one receipt; ``virus`` picks the virus subject and adds ``X-VerificaSicurezza: errore``."""
    message_id = provider.new_msgid(when)
    subject = RECEIPT_SUBJECTS[(ricevuta, virus)] + tx.oggetto
    headers: list[tuple[str, str]] = [
        ("Date", when.rfc5322),
        ("Subject", mime.encode_header_text("Subject", subject)),
        ("From", provider.service_address),
        ("To", to),
        ("Message-ID", bracket(message_id)),
        (H_RICEVUTA, ricevuta.value),
    ]
    if tx.msgid:
        headers.append((H_RIFERIMENTO_MESSAGE_ID, tx.msgid))
    if virus:
        headers.append((H_VERIFICA_SICUREZZA, VERIFICA_SICUREZZA_ERRORE))
    headers += extra
    raw = _sign(provider, when, headers, _body(notice, d, original))
    return BuiltMessage(raw, message_id, d, (normalize_address(to),))


# --- envelopes -----------------------------------------------------------------------------------


def postacert_of(original: bytes, identificativo: str, client_msgid: str | None) -> bytes:
    """The original as wrapped: its Message-ID becomes the PEC msgid and X-Riferimento-Message-ID
    carries the client's; nothing else changes (spec 2.3, observed in every real sample)."""
    append = [("Message-ID", bracket(identificativo))]
    if client_msgid:
        append.append((H_RIFERIMENTO_MESSAGE_ID, client_msgid))
    return mime.replace_fields(original, ["Message-ID", H_RIFERIMENTO_MESSAGE_ID], append)


def transport_envelope(
    original: bytes, tx: Transmission, provider: ProviderIdentity, when: PecTime
) -> BuiltMessage:
    """Busta di trasporto: the original, its daticert, signed by the sender's provider."""
    wrapped = postacert_of(original, tx.identificativo, tx.msgid)
    d = tx.daticert(DaticertTipo.POSTA_CERTIFICATA, provider, when, ricevuta=tx.ricevuta)
    notice = texts.transport(when, tx.oggetto, tx.mittente, tx.addresses, tx.identificativo)
    headers: list[tuple[str, str]] = [
        ("Date", when.rfc5322),
        ("Subject", mime.encode_header_text("Subject", SUBJ_POSTA_CERTIFICATA + tx.oggetto)),
        ("From", mime.format_mailbox(PER_CONTO_DI + tx.mittente, provider.service_address)),
    ]
    # Reply-To: the original's own field, copied unaltered (display names, every address, letter
    # case: spec 2.1 and 2.3); only when it has none, the From address that daticert risposte names.
    head = mime.Headers(original)
    copied = mime.copy_fields(head, (*_ENVELOPE_COPIED, "Reply-To"))
    if not head.has("Reply-To"):
        headers.append(("Reply-To", tx.risposte))
    headers += [
        ("Message-ID", bracket(tx.identificativo)),
        (H_TRASPORTO, Trasporto.POSTA_CERTIFICATA.value),
        (H_TIPO_RICEVUTA, tx.ricevuta.value),
    ]
    if tx.msgid:
        headers.append((H_RIFERIMENTO_MESSAGE_ID, tx.msgid))
    raw = _sign(provider, when, headers, _body(notice, d, wrapped), copied)
    return BuiltMessage(raw, tx.identificativo, d, tx.addresses)


def anomaly_envelope(
    received: bytes,
    provider: ProviderIdentity,
    when: PecTime,
    *,
    rcpt_to: Sequence[str],
    error: str,
) -> BuiltMessage:
    """Busta di anomalia: anything received that is not valid PEC, wrapped whole, no daticert."""
    head = mime.Headers(received)
    froms = _addresses(head, "From")
    sender = froms[0] if froms else mime.clean_header_text(head.get_first("From") or "")
    oggetto = original_subject(head)
    received_id = _client_msgid(head)
    # Keeps the received Message-ID; a message without one gets a new id so it can be referred to.
    message_id = unbracket(received_id) if received_id else provider.new_msgid(when)
    notice = texts.anomaly(when, oggetto, sender, [normalize_address(r) for r in rcpt_to], error)
    headers: list[tuple[str, str]] = [
        ("Date", when.rfc5322),
        ("Subject", mime.encode_header_text("Subject", SUBJ_ANOMALIA + oggetto)),
        ("From", mime.format_mailbox(PER_CONTO_DI + sender, provider.service_address)),
    ]
    if not head.has("Reply-To") and froms:
        headers.append(("Reply-To", froms[0]))
    if received_id is None:
        headers.append(("Message-ID", bracket(message_id)))
    headers.append((H_TRASPORTO, Trasporto.ERRORE.value))
    copied = mime.copy_fields(head, (*_ENVELOPE_COPIED, "Message-ID", "Reply-To"))
    raw = _sign(provider, when, headers, _body(notice, None, received), copied)
    return BuiltMessage(raw, message_id, None, tuple(normalize_address(r) for r in rcpt_to))


# --- receipts --------------------------------------------------------------------------------------


def accettazione(tx: Transmission, provider: ProviderIdentity, when: PecTime) -> BuiltMessage:
    """Ricevuta di accettazione: to the sender, listing every recipient as certified or not."""
    d = tx.daticert(DaticertTipo.ACCETTAZIONE, provider, when)
    listed = [(r.address, r.tipo is DestinatarioTipo.CERTIFICATO) for r in tx.destinatari]
    notice = texts.accettazione(when, tx.oggetto, tx.mittente, listed, tx.identificativo)
    return _receipt(
        Ricevuta.ACCETTAZIONE,
        provider=provider,
        when=when,
        tx=tx,
        to=tx.mittente,
        notice=notice,
        d=d,
    )


def non_accettazione(
    tx: Transmission,
    provider: ProviderIdentity,
    when: PecTime,
    *,
    violations: Sequence[Violation] = (),
    virus: str | None = None,
) -> BuiltMessage:
    """Avviso di non accettazione (formal reasons, or the virus variant); never carries the original.

    The rules do not say which ``errore`` formal failures carry (UNSURE in the spec): pecd uses
    ``altro``, with the reasons joined in ``errore-esteso``.
    """
    if virus is None and not violations:
        raise ValueError("non_accettazione needs violations or a virus")
    reasons = [v.it for v in violations] if virus is None else [mime.clean_header_text(virus)]
    # RFC 3463: 5.7.1 (refused for security: a virus, as at the reception point), 5.6.0 (the
    # message's format); the reasons in the one errore-esteso format.
    esteso = (
        texts.errore_esteso("5.7.1", provider.name, f"virus rilevato: {reasons[0]}")
        if virus is not None
        else texts.errore_esteso("5.6.0", provider.name, "; ".join(reasons))
    )
    d = tx.daticert(
        DaticertTipo.NON_ACCETTAZIONE,
        provider,
        when,
        errore=Errore.VIRUS if virus is not None else Errore.ALTRO,
        errore_esteso=esteso,
    )
    notice = texts.non_accettazione(
        when, tx.oggetto, tx.mittente, reasons, tx.identificativo, virus is not None
    )
    return _receipt(
        Ricevuta.NON_ACCETTAZIONE,
        provider=provider,
        when=when,
        tx=tx,
        to=tx.mittente,
        notice=notice,
        d=d,
        virus=virus is not None,
    )


def presa_in_carico(
    tx: Transmission,
    provider: ProviderIdentity,
    when: PecTime,
    *,
    ricezione: Sequence[str],
    mail_receipt: str,
) -> BuiltMessage:
    """Ricevuta di presa in carico: one per SMTP transaction, to the sending provider's mailReceipt."""
    if not ricezione:
        raise ValueError("presa in carico must cover at least one recipient")
    covered = [normalize_address(r) for r in ricezione]
    d = tx.daticert(DaticertTipo.PRESA_IN_CARICO, provider, when, ricezione=covered)
    notice = texts.presa_in_carico(when, tx.oggetto, tx.mittente, covered, tx.identificativo)
    return _receipt(
        Ricevuta.PRESA_IN_CARICO,
        provider=provider,
        when=when,
        tx=tx,
        to=mail_receipt,
        notice=notice,
        d=d,
    )


def avvenuta_consegna(
    tx: Transmission,
    provider: ProviderIdentity,
    when: PecTime,
    *,
    recipient: str,
    postacert: bytes | None,
    kind: TipoRicevuta | None = None,
) -> BuiltMessage:
    """Ricevuta di avvenuta consegna for one recipient.

    ``postacert`` is the wrapped original as delivered (from the envelope). ``kind`` defaults to what
    the recipient earns (``Transmission.receipt_kind_for``): completa carries it whole, breve with
    attachments replaced by their hashes, sintetica not at all.
    """
    kind = kind or tx.receipt_kind_for(recipient)
    attached: bytes | None = None
    if kind is TipoRicevuta.COMPLETA:
        attached = postacert
    elif kind is TipoRicevuta.BREVE and postacert is not None:
        attached, _ = to_breve(postacert)
    consegna = normalize_address(recipient)
    d = tx.daticert(
        DaticertTipo.AVVENUTA_CONSEGNA, provider, when, ricevuta=kind, consegna=consegna
    )
    notice = texts.avvenuta_consegna(
        when, tx.oggetto, tx.mittente, consegna, tx.identificativo, attached is not None
    )
    return _receipt(
        Ricevuta.AVVENUTA_CONSEGNA,
        provider=provider,
        when=when,
        tx=tx,
        to=tx.mittente,
        notice=notice,
        d=d,
        original=attached,
    )


def errore_consegna(
    tx: Transmission,
    provider: ProviderIdentity,
    when: PecTime,
    *,
    recipient: str,
    errore: Errore,
    errore_esteso: str,
) -> BuiltMessage:
    """Avviso di mancata consegna; ``errore=virus`` gives the virus variant (built by the sender's
    provider from a received rilevazione-virus)."""
    if errore is Errore.NESSUNO:
        raise ValueError("errore_consegna needs an errore other than nessuno")
    virus = errore is Errore.VIRUS
    consegna = normalize_address(recipient)
    d = tx.daticert(
        DaticertTipo.ERRORE_CONSEGNA,
        provider,
        when,
        errore=errore,
        consegna=consegna,
        errore_esteso=errore_esteso,
    )
    notice = texts.errore_consegna(
        when, tx.oggetto, tx.mittente, consegna, errore_esteso, tx.identificativo, virus
    )
    return _receipt(
        Ricevuta.ERRORE_CONSEGNA,
        provider=provider,
        when=when,
        tx=tx,
        to=tx.mittente,
        notice=notice,
        d=d,
        virus=virus,
    )


def preavviso_errore_consegna(
    tx: Transmission,
    provider: ProviderIdentity,
    when: PecTime,
    *,
    recipient: str,
    sent: PecTime,
    final: bool,
) -> BuiltMessage:
    """Avviso di mancata consegna per superamento tempi massimi: the 12 h notice, or the final 24 h one.

    Goes to the sender (the RFC's "To: original recipient" is a drafting error, spec 2.2)."""
    consegna = normalize_address(recipient)
    # 5.4.1 for the final notice, as opec sends and PagoPA reads; 4.4.1 at 12 h, not a failure
    # yet (texts.PREAVVISO_CODE_*).
    code, hours = (texts.PREAVVISO_CODE_FINAL, 24) if final else (texts.PREAVVISO_CODE_FIRST, 12)
    d = tx.daticert(
        DaticertTipo.PREAVVISO_ERRORE_CONSEGNA,
        provider,
        when,
        errore=Errore.ALTRO,
        consegna=consegna,
        errore_esteso=texts.errore_esteso(
            code, provider.name, f"messaggio non consegnato entro {hours} ore"
        ),
    )
    notice = texts.preavviso(
        when, sent, tx.oggetto, tx.mittente, consegna, tx.identificativo, final
    )
    return _receipt(
        Ricevuta.PREAVVISO_ERRORE_CONSEGNA,
        provider=provider,
        when=when,
        tx=tx,
        to=tx.mittente,
        notice=notice,
        d=d,
    )


def rilevazione_virus(
    tx: Transmission,
    provider: ProviderIdentity,
    when: PecTime,
    *,
    recipient: str,
    errore_esteso: str,
    mail_receipt: str,
) -> BuiltMessage:
    """Avviso di rilevazione virus: one per affected recipient, to the sending provider's mailReceipt."""
    consegna = normalize_address(recipient)
    d = tx.daticert(
        DaticertTipo.RILEVAZIONE_VIRUS,
        provider,
        when,
        errore=Errore.VIRUS,
        consegna=consegna,
        errore_esteso=errore_esteso,
    )
    notice = texts.rilevazione_virus(
        when, tx.oggetto, tx.mittente, consegna, errore_esteso, tx.identificativo
    )
    return _receipt(
        Ricevuta.RILEVAZIONE_VIRUS,
        provider=provider,
        when=when,
        tx=tx,
        to=mail_receipt,
        notice=notice,
        d=d,
        extra=[(H_MITTENTE, tx.mittente)],
    )


# --- reproduction from the trace log ----------------------------------------------------------------


def reproduced_receipt(
    d: Daticert, provider: ProviderIdentity, now: PecTime, *, to: str, virus: bool = False
) -> BuiltMessage:
    """A receipt rebuilt from the trace log (spec section 7: the log can reproduce a lost receipt):
    the daticert exactly as it was logged, with the original event time in it, signed now, and
    ``X-Pecd-Riproduzione`` saying what it is. ``to`` is where it goes (the sender, or for a
    presa in carico the sending provider's mailReceipt)."""
    ricevuta = Ricevuta(d.tipo.value)
    tx = Transmission.from_daticert(d)
    notice = texts.riproduzione(
        now, provider.name, d.tipo.value, d.giorno, d.ora, d.zona, d.identificativo
    )
    return _receipt(
        ricevuta,
        provider=provider,
        when=now,
        tx=tx,
        to=to,
        notice=notice,
        d=d,
        virus=virus,
        extra=[
            (H_RIPRODUZIONE, f"registro dei messaggi; originale del {d.giorno} {d.ora} {d.zona}")
        ],
    )
