"""Writing a PEC in the webmail (``/compose``) and checking one (``/verify``).

``/compose``: To and Cc (several addresses, separated by commas or new lines; no Bcc: PEC
forbids blind copies), subject, plain-text body, attachments, the kind of delivery receipt
(``GET /compose?to=&cc=&subject=`` fills the form in, for a reply link). The
message goes in through :func:`pecd.web.submit.submit`, the durable intake the SMTP access point
and the REST API share, so the pipeline checks it and the accettazione reaches the INBOX as for
any client; then a copy is stored in Sent (``pecd.web.sentcopy``) and the browser is sent (303)
to the transmission's timeline, ``/transmissions/<intake key>``. The form carries a random client
key: the same form posted twice (Send pressed twice, a reload) names one intake, taken in once.
The limits are the mail limits: the whole message at most ``limits.max_message_size``, at most
``limits.max_recipients`` recipients. While the storage is full the message is not taken in
(:class:`pecd.web.submit.InsufficientStorage`, the SMTP access point's ``452 4.3.1``): the form
comes back, 503, as typed and with the same client key, saying to send it again in a few minutes.

``/verify``: one uploaded ``.eml`` (at most the mail limit) is checked as ``pecd verify`` checks
a file (``pecd.cli.verify.examine``), with the signer looked up in the provider index of this
installation as the reception point does. The check is heavy work: it waits for a slot of
``pecd.web.timeline.heavy_work`` (shared with the mail pages) before the upload is read into
memory; until then the upload stays where the form parser spooled it (on disk past 1 MB).
Whatever the bytes, the page shows a verdict: not mail at all, not PEC, a broken or forged
signature, a signer outside the index, or a valid PEC with its signer, signing time and
daticert.
"""

from __future__ import annotations

import dataclasses
import logging
import re
import secrets
from typing import IO, Any, Final, Literal

from starlette.datastructures import FormData, UploadFile
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import BaseRoute, Route

from pecd.cli.verify import NotMailError, Verdict, examine
from pecd.clock import SystemClock
from pecd.config import Config, LimitsConfig
from pecd.index.model import ProviderIndex
from pecd.mailbox.maildir import MaildirStore
from pecd.pec.address import normalize_address, valid_address
from pecd.pec.vocab import Kind, TipoRicevuta
from pecd.store.accounts import Accounts
from pecd.web import i18n, ui
from pecd.web.providers import provider_index
from pecd.web.sentcopy import save_sent_copy, sent_message
from pecd.web.submit import (
    MAX_SUBJECT,
    Attachment,
    InsufficientStorage,
    SubmitError,
    no_space,
    subject_error,
    submit,
)
from pecd.web.timeline import heavy_work
from pecd.web.ui import human_size

__all__ = [
    "RECEIPTS",
    "STORAGE_FULL",
    "Draft",
    "Problem",
    "check_draft",
    "client_key_of",
    "human_size",
    "parse_recipients",
    "routes",
    "upload_attachment",
    "verdict_view",
]

log = logging.getLogger(__name__)

#: What the form says when the storage is full (nothing to correct: send it again later).
STORAGE_FULL: Final = (
    "Il messaggio non è stato inviato: lo spazio di archiviazione del gestore è esaurito. "
    "Riprova tra qualche minuto: quello che hai scritto è rimasto qui."
)

i18n.register(
    {
        # compose
        "Scrivi un messaggio PEC": "Write a PEC message",
        "Da": "From",
        "A": "To",
        "Cc": "Cc",
        "Oggetto": "Subject",
        "Testo": "Message",
        "Allegati": "Attachments",
        "Ricevuta di consegna": "Delivery receipt",
        "Invia": "Send",
        "Più indirizzi: separali con una virgola o vai a capo.": (
            "Several addresses: separate them with a comma or a new line."
        ),
        "Niente copia nascosta (Ccn): la PEC non la ammette, ogni destinatario vede tutti gli "
        "altri.": "No blind copy (Bcc): PEC does not allow it, every recipient sees all the others.",
        "Fino a {size} per tutto il messaggio, allegati compresi; al massimo {n} destinatari.": (
            "Up to {size} for the whole message, attachments included; at most {n} recipients."
        ),
        "Completa": "Complete",
        "Breve": "Short",
        "Sintetica": "Summary",
        "Per ogni destinatario torna una copia del messaggio con gli allegati: la prova più "
        "completa di che cosa è stato consegnato.": (
            "Each recipient's receipt carries a copy of the message with its attachments: the "
            "fullest proof of what was delivered."
        ),
        "Per ogni destinatario torna il messaggio con le impronte degli allegati al posto degli "
        "allegati: prova che cosa è stato consegnato con ricevute più piccole.": (
            "Each recipient's receipt carries the message with fingerprints in place of the "
            "attachments: proof of what was delivered, with smaller receipts."
        ),
        "Per ogni destinatario torna solo l'attestazione di consegna, senza il messaggio.": (
            "Each recipient's receipt only attests the delivery, without the message."
        ),
        "Il messaggio non è stato inviato: correggi i campi indicati.": (
            "The message was not sent: correct the fields shown."
        ),
        "Gli allegati vanno scelti di nuovo.": "Choose the attachments again.",
        "Scrivi almeno un destinatario.": "Enter at least one recipient.",
        "Indirizzo non valido: {address}": "Not a valid address: {address}",
        "Troppi destinatari: {n}, al massimo {max}.": "Too many recipients: {n}, at most {max}.",
        "Troppo lungo.": "Too long.",
        "L'oggetto va scritto su una riga di al massimo 998 caratteri.": (
            "The subject must be one line of at most 998 characters."
        ),
        "L'oggetto va scritto su una riga, senza a capo né caratteri di controllo.": (
            "The subject must be one line, without line breaks or control characters."
        ),
        "Il testo contiene caratteri non ammessi.": "The message contains characters not allowed.",
        "La PEC non ammette la copia nascosta (Ccn).": "PEC does not allow blind copies (Bcc).",
        "Scegli il tipo di ricevuta.": "Choose the kind of receipt.",
        "Gli allegati superano il limite: {size} in tutto, al massimo {max}.": (
            "The attachments are over the limit: {size} in all, at most {max}."
        ),
        "Il messaggio supera il limite di {max}: togli o riduci qualche allegato.": (
            "The message is over the {max} limit: remove or shrink some attachments."
        ),
        "Il messaggio è troppo grande per il numero dei suoi destinatari.": (
            "The message is too large for its number of recipients."
        ),
        "Troppi allegati: al massimo {max}.": "Too many attachments: at most {max}.",
        STORAGE_FULL: (
            "The message was not sent: the provider's storage is full. Try again in a few "
            "minutes: what you wrote is still here."
        ),
        # verify
        "Verifica un messaggio PEC": "Verify a PEC message",
        "Carica un messaggio salvato (file .eml): pecd dice che cos'è, se la firma del gestore "
        "è integra e chi l'ha firmato, confrontandolo con l'indice dei gestori PEC.": (
            "Upload a saved message (.eml file): pecd says what it is, whether the provider's "
            "signature is intact and who signed it, checking the signer against the index of "
            "PEC providers."
        ),
        "File .eml": ".eml file",
        "Al massimo {size}.": "At most {size}.",
        "Verifica il file": "Verify the file",
        "Scegli un file .eml.": "Choose an .eml file.",
        "Il file supera il limite di {max}.": "The file is over the {max} limit.",
        "Esito": "Verdict",
        "Messaggio PEC valido, firmato da un gestore dell'indice dei gestori PEC.": (
            "A valid PEC message, signed by a provider in the index of PEC providers."
        ),
        "Messaggio PEC valido (il firmatario non è stato cercato nell'indice dei gestori).": (
            "A valid PEC message (the signer was not looked up in the index of providers)."
        ),
        "Firma e struttura sono valide, ma chi ha firmato non è un gestore dell'indice dei "
        "gestori PEC: non vale come PEC.": (
            "Signature and structure are valid, but the signer is not a provider in the index "
            "of PEC providers: it does not count as PEC."
        ),
        "Non è un messaggio PEC valido.": "Not a valid PEC message.",
        "Il file non è un messaggio di posta: non ha intestazioni.": (
            "The file is not a mail message: it has no header fields."
        ),
        "Il file non può essere analizzato.": "The file cannot be analysed.",
        "Che cos'è": "What it is",
        "Busta di trasporto (messaggio PEC)": "Transport envelope (a PEC message)",
        "Busta di anomalia": "Anomaly envelope",
        "Ricevuta: {kind}": "Receipt: {kind}",
        "Messaggio ordinario (non PEC)": "Ordinary mail (not PEC)",
        "Firma": "Signature",
        "Valida ({digest})": "Valid ({digest})",
        "Non valida: {reason}": "Not valid: {reason}",
        "Assente: il messaggio non è firmato.": "Absent: the message is not signed.",
        "Firmatario": "Signer",
        "Impronta SHA-1 del certificato": "Certificate SHA-1 fingerprint",
        "Data della firma": "Signing time",
        "Validità del certificato": "Certificate validity",
        "dal {start} al {end}": "from {start} to {end}",
        "La firma cade fuori dal periodo di validità del certificato.": (
            "The signature falls outside the certificate's validity period."
        ),
        "Indice dei gestori": "Provider index",
        "Presente: {name}": "Listed: {name}",
        "Non presente": "Not listed",
        "Non consultabile: {reason}": "Not available: {reason}",
        "Dati di certificazione (daticert.xml)": "Certification data (daticert.xml)",
        "Problemi rilevati": "Problems found",
        "La firma non è valida: questi dati non sono garantiti dal gestore.": (
            "The signature is not valid: the provider does not vouch for these data."
        ),
        "Virus rilevato dal gestore (X-VerificaSicurezza: errore).": (
            "A virus was detected by the provider (X-VerificaSicurezza: errore)."
        ),
    }
)

#: The receipt kinds the form offers, the default first: (value, label, one-line explanation).
RECEIPTS: Final[tuple[tuple[str, str, str], ...]] = (
    (
        TipoRicevuta.COMPLETA.value,
        "Completa",
        "Per ogni destinatario torna una copia del messaggio con gli allegati: la prova più "
        "completa di che cosa è stato consegnato.",
    ),
    (
        TipoRicevuta.BREVE.value,
        "Breve",
        "Per ogni destinatario torna il messaggio con le impronte degli allegati al posto degli "
        "allegati: prova che cosa è stato consegnato con ricevute più piccole.",
    ),
    (
        TipoRicevuta.SINTETICA.value,
        "Sintetica",
        "Per ogni destinatario torna solo l'attestazione di consegna, senza il messaggio.",
    ),
)

MAX_ADDRESS: Final = 320  # an address longer than this is no address (RFC 5321: 64 + 1 + 255)
MAX_ATTACHMENTS: Final = 100
MAX_FILENAME: Final = 255
#: The most of To or Cc a link may fill in (GET /compose?to=...).
PREFILL_MAX: Final = 4096
#: Invalid addresses named in the form's errors, at most (the user fixes these first).
MAX_BAD_SHOWN: Final = 10
#: Form fields other than files: to, cc, subject, body, receipt, csrf, client_key (and slack).
MAX_FIELDS: Final = 20

_SPLIT = re.compile(r"[,;\r\n]+")
_ANGLED = re.compile(r"<([^<>]*)>\s*$")
_CLIENT_KEY = re.compile(r"[A-Za-z0-9_-]{16,64}")
_MIME_TOKEN = re.compile(r"[a-z0-9][a-z0-9!#$&^_.+-]{0,126}")
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


@dataclasses.dataclass(frozen=True, slots=True)
class Problem:
    """A message for the user (Italian, translated when shown) with its fields."""

    text: str
    fields: dict[str, str] = dataclasses.field(default_factory=dict)


@dataclasses.dataclass(frozen=True, slots=True)
class Draft:
    """What the user typed (files apart), as it is shown again when the form has errors."""

    to: str = ""
    cc: str = ""
    subject: str = ""
    body: str = ""
    receipt: str = TipoRicevuta.COMPLETA.value
    client_key: str = ""

    @classmethod
    def from_form(cls, form: FormData) -> Draft:
        def text(name: str) -> str:
            value = form.get(name)
            return value if isinstance(value, str) else ""

        return cls(
            to=text("to"),
            cc=text("cc"),
            subject=text("subject"),
            body=text("body"),
            receipt=text("receipt") or TipoRicevuta.COMPLETA.value,
            client_key=text("client_key"),
        )


def parse_recipients(text: str) -> tuple[list[str], list[str]]:
    """The addresses in ``text`` (separated by commas, semicolons or new lines; each either a
    bare address or ``Name <address>``), normalised and without repeats, and the first
    :data:`MAX_BAD_SHOWN` entries that are not valid addresses (as typed)."""
    good: dict[str, None] = {}
    bad: list[str] = []
    for entry in _SPLIT.split(text):
        entry = entry.strip()
        if not entry:
            continue
        angled = _ANGLED.search(entry)
        address = normalize_address(angled.group(1) if angled else entry)
        if len(address) <= MAX_ADDRESS and valid_address(address):
            good[address] = None
        elif len(bad) < MAX_BAD_SHOWN:
            bad.append(entry[:MAX_ADDRESS])
    return list(good), bad


def check_draft(
    draft: Draft, limits: LimitsConfig
) -> tuple[list[str], list[str], dict[str, list[Problem]]]:
    """The To and Cc addresses of ``draft`` and its problems by field name (none: it may be
    submitted). Cc repeats of To addresses are dropped (one recipient, one delivery)."""
    problems: dict[str, list[Problem]] = {}

    def add(name: str, text: str, **fields: str) -> None:
        problems.setdefault(name, []).append(Problem(text, dict(fields)))

    limit = limits.max_recipients * (MAX_ADDRESS + 2)
    to: list[str] = []
    cc: list[str] = []
    for name, value, out in (("to", draft.to, to), ("cc", draft.cc, cc)):
        if len(value) > limit:
            add(name, "Troppo lungo.")
            continue
        good, bad = parse_recipients(value)
        out.extend(good)
        for entry in bad:
            add(name, "Indirizzo non valido: {address}", address=entry)
    in_to = set(to)
    cc[:] = [a for a in cc if a not in in_to]
    if not to and "to" not in problems:
        add("to", "Scrivi almeno un destinatario.")
    if len(to) + len(cc) > limits.max_recipients:
        add(
            "cc" if cc else "to",
            "Troppi destinatari: {n}, al massimo {max}.",
            n=str(len(to) + len(cc)),
            max=str(limits.max_recipients),
        )
    if len(draft.subject) > MAX_SUBJECT:
        add("subject", "L'oggetto va scritto su una riga di al massimo 998 caratteri.")
    elif subject_error(draft.subject) is not None:
        add("subject", "L'oggetto va scritto su una riga, senza a capo né caratteri di controllo.")
    if "\0" in draft.body:
        add("body", "Il testo contiene caratteri non ammessi.")
    if draft.receipt not in {r[0] for r in RECEIPTS}:
        add("receipt", "Scegli il tipo di ricevuta.")
    return to, cc, problems


def client_key_of(draft: Draft) -> str | None:
    """The submission's client key (idempotency key) from the form's hidden field; None when it
    is missing or malformed (then the submission gets a random intake key)."""
    if _CLIENT_KEY.fullmatch(draft.client_key):
        return "webmail:" + draft.client_key
    return None


def _filename(name: str | None) -> str:
    """The base name of an uploaded file, on one line, at most 255 characters."""
    base = re.split(r"[/\\]", name or "")[-1]
    base = _CONTROL.sub("", base).strip()
    return base[:MAX_FILENAME] or "allegato"


def _content_type(value: str | None) -> tuple[str, str]:
    """(maintype, subtype) of an upload, application/octet-stream when the browser said nothing
    usable. message/* and multipart/* are sent as application/octet-stream: an attachment is
    base64-encoded, which RFC 2046 forbids for those."""
    ctype = (value or "").split(";", 1)[0].strip().lower()
    maintype, slash, subtype = ctype.partition("/")
    if (
        not slash
        or not _MIME_TOKEN.fullmatch(maintype)
        or not _MIME_TOKEN.fullmatch(subtype)
        or maintype in ("message", "multipart")
    ):
        return "application", "octet-stream"
    return maintype, subtype


async def upload_attachment(upload: UploadFile) -> Attachment:
    """An uploaded file as an attachment of the message."""
    maintype, subtype = _content_type(upload.content_type)
    return Attachment(_filename(upload.filename), maintype, subtype, await upload.read())


def _uploads(form: FormData, name: str) -> list[UploadFile]:
    """The files posted as ``name``; a browser posts an empty nameless part when none is
    chosen, which is no file."""
    return [
        u
        for u in form.getlist(name)
        if isinstance(u, UploadFile) and (u.filename or (u.size or 0) > 0)
    ]


# --- /verify's check ----------------------------------------------------------------------------


def _check_upload(
    file: IO[bytes], limit: int, index: ProviderIndex | None, filename: str
) -> Verdict | Literal["too-large", "not-mail", "failed"]:
    """The verdict on the uploaded file (heavy: run in a slot of ``heavy_work``), or why
    there is none."""
    size = file.seek(0, 2)
    if size > limit:
        return "too-large"
    file.seek(0)
    raw = file.read(size)  # not read(limit): that would reserve the whole limit first
    try:
        return examine(raw, index=index)
    except NotMailError:
        return "not-mail"
    except Exception:  # hostile bytes get a verdict, never a 500
        log.exception("/verify: %s (%d bytes) could not be analysed", filename, len(raw))
        return "failed"


# --- the verdict, for the template ------------------------------------------------------------


def _when(value: Any) -> str:
    return "" if value is None else str(value.isoformat(sep=" "))


def verdict_view(verdict: Verdict, index_error: str | None = None) -> dict[str, Any]:
    """What verify.html shows of ``verdict``: plain values and Italian messages (translated by
    the template), so that the template has no logic of its own."""
    c = verdict.classification
    s = c.signature
    if verdict.valid and verdict.indexed:
        outcome = ("ok", "Messaggio PEC valido, firmato da un gestore dell'indice dei gestori PEC.")
    elif verdict.valid:
        outcome = (
            "ok",
            "Messaggio PEC valido (il firmatario non è stato cercato nell'indice dei gestori).",
        )
    elif c.is_valid_pec:
        outcome = (
            "warn",
            "Firma e struttura sono valide, ma chi ha firmato non è un gestore dell'indice dei "
            "gestori PEC: non vale come PEC.",
        )
    else:
        outcome = ("error", "Non è un messaggio PEC valido.")
    if c.kind is Kind.TRANSPORT_ENVELOPE:
        kind = Problem("Busta di trasporto (messaggio PEC)")
    elif c.kind is Kind.ANOMALY_ENVELOPE:
        kind = Problem("Busta di anomalia")
    elif c.kind is Kind.RECEIPT and c.ricevuta is not None:
        kind = Problem("Ricevuta: {kind}", {"kind": c.ricevuta.value})
    else:
        kind = Problem("Messaggio ordinario (non PEC)")
    if s.valid:
        signature = Problem("Valida ({digest})", {"digest": s.digest or ""})
    elif s.present:
        reason = s.error or "?"
        if s.error_code:
            reason += f" [{s.error_code}]"
        signature = Problem("Non valida: {reason}", {"reason": reason})
    else:
        signature = Problem("Assente: il messaggio non è firmato.")
    rows: list[tuple[str, Problem, str]] = [("Che cos'è", kind, ""), ("Firma", signature, "")]
    info = c.signature_info
    if s.valid:
        rows.append(("Firmatario", Problem(s.signer_subject or ""), "mono"))
        rows.append(("Impronta SHA-1 del certificato", Problem(s.signer_sha1 or ""), "mono"))
        if s.signing_time is not None:
            rows.append(("Data della firma", Problem(_when(s.signing_time)), ""))
        if info is not None:
            start, end = info.signer.not_valid_before_utc, info.signer.not_valid_after_utc
            rows.append(
                (
                    "Validità del certificato",
                    Problem("dal {start} al {end}", {"start": _when(start), "end": _when(end)}),
                    "",
                )
            )
            if s.signing_time is not None and not start <= s.signing_time <= end:
                rows.append(
                    (
                        "Validità del certificato",
                        Problem("La firma cade fuori dal periodo di validità del certificato."),
                        "",
                    )
                )
        if verdict.provider is not None:
            listed = Problem("Presente: {name}", {"name": verdict.provider.label})
        elif verdict.indexed is False:
            listed = Problem("Non presente")
        else:
            listed = Problem("Non consultabile: {reason}", {"reason": index_error or "?"})
        rows.append(("Indice dei gestori", listed, ""))
    daticert: list[tuple[str, str]] = []
    d = c.daticert
    if d is not None:
        errore = d.errore.value + (f" ({d.errore_esteso})" if d.errore_esteso else "")
        pairs = [  # labelled with the daticert's own element and attribute names
            ("tipo", d.tipo.value),
            ("errore", errore),
            ("gestore-emittente", d.gestore_emittente),
            ("identificativo", d.identificativo),
            ("msgid", d.msgid or ""),
            ("data", f"{d.giorno} {d.ora} {d.zona}".strip()),
            ("mittente", d.mittente),
            ("destinatari", ", ".join(f"{r.address} ({r.tipo.value})" for r in d.destinatari)),
            ("oggetto", d.oggetto or ""),
            ("risposte", d.risposte),
            ("ricevuta", d.ricevuta.value if d.ricevuta else ""),
            ("consegna", d.consegna or ""),
        ]
        daticert = [(label, value) for label, value in pairs if value]
    return {
        "outcome": outcome,
        "rows": rows,
        "daticert": daticert,
        "daticert_signed": s.valid,
        "errors": list(c.errors),
        "virus": c.virus,
    }


# --- routes -----------------------------------------------------------------------------------


def routes(cfg: Config) -> list[BaseRoute]:
    limits = cfg.limits
    clock = SystemClock()
    store = MaildirStore(cfg.maildir_root)
    index_cache = provider_index(cfg)
    size_note = Problem(
        "Fino a {size} per tutto il messaggio, allegati compresi; al massimo {n} destinatari.",
        {"size": human_size(limits.max_message_size), "n": str(limits.max_recipients)},
    )

    def compose_page(
        request: Request,
        draft: Draft,
        problems: dict[str, list[Problem]] | None = None,
        *,
        files_lost: bool = False,
        status: int = 200,
        unavailable: Problem | None = None,
        headers: dict[str, str] | None = None,
    ) -> Response:
        return ui.render(
            request,
            "compose.html",
            {
                "draft": draft,
                "problems": problems or {},
                "files_lost": files_lost,
                "unavailable": unavailable,
                "receipts": RECEIPTS,
                "size_note": size_note,
            },
            status=status,
            headers=headers,
        )

    def storage_full(
        request: Request, draft: Draft, exc: InsufficientStorage, files: bool
    ) -> Response:
        """The form again, as typed (its client key too: sent again, it is taken in once)."""
        return compose_page(
            request,
            draft,
            files_lost=files,
            unavailable=Problem(STORAGE_FULL),
            status=exc.status,
            headers=exc.headers,
        )

    async def compose_form(request: Request) -> Response:
        """The empty form, or one filled from the query (``to``, ``cc``, ``subject``: a reply
        link from the message view), with a new client key."""
        await ui.require_user(request)
        q = request.query_params
        draft = Draft(
            to=q.get("to", "")[:PREFILL_MAX],
            cc=q.get("cc", "")[:PREFILL_MAX],
            subject=q.get("subject", "")[:MAX_SUBJECT],
            client_key=secrets.token_urlsafe(24),
        )
        return compose_page(request, draft)

    async def compose(request: Request) -> Response:
        user = await ui.require_user(request)
        try:
            form = await ui.read_form(
                request,
                max_files=MAX_ATTACHMENTS + 1,  # one more, to say "too many" in the form
                max_fields=MAX_FIELDS,
                max_size=limits.max_message_size,
            )
        except OSError as exc:
            # Attachments spooled to a full disk: what was typed is lost with the form, but
            # the answer is the same as for a full storage, not an error page.
            if not no_space(exc):
                raise
            draft = Draft(client_key=secrets.token_urlsafe(24))
            return storage_full(request, draft, InsufficientStorage(), True)
        try:
            draft = Draft.from_form(form)
            if not _CLIENT_KEY.fullmatch(draft.client_key):
                draft = dataclasses.replace(draft, client_key=secrets.token_urlsafe(24))
            to, cc, problems = check_draft(draft, limits)
            if any(k.lower() == "bcc" for k in form):
                problems.setdefault("to", []).append(
                    Problem("La PEC non ammette la copia nascosta (Ccn).")
                )
            uploads = _uploads(form, "attachments")
            total = sum(u.size or 0 for u in uploads)
            if len(uploads) > MAX_ATTACHMENTS:
                problems.setdefault("attachments", []).append(
                    Problem("Troppi allegati: al massimo {max}.", {"max": str(MAX_ATTACHMENTS)})
                )
            elif total > limits.max_message_size:
                problems.setdefault("attachments", []).append(
                    Problem(
                        "Gli allegati superano il limite: {size} in tutto, al massimo {max}.",
                        {
                            "size": human_size(total),
                            "max": human_size(limits.max_message_size),
                        },
                    )
                )
            if problems:
                return compose_page(request, draft, problems, files_lost=bool(uploads), status=422)
            attachments = [await upload_attachment(u) for u in uploads]
            try:
                done = await submit(
                    request.app.state.db,
                    cfg,
                    clock,
                    mailbox=user.mailbox,
                    to=to,
                    cc=cc,
                    subject=draft.subject.strip(),
                    body=draft.body,
                    attachments=attachments,
                    receipt=draft.receipt,
                    client_key=client_key_of(draft),
                    peer=request.client.host if request.client else "unknown",
                    via="webmail",
                )
            except InsufficientStorage as exc:
                return storage_full(request, draft, exc, bool(uploads))
            except SubmitError as exc:
                # submit() refuses for size alone, or for size times recipients (its title
                # says which: both are kind "too-large").
                text = (
                    "Il messaggio è troppo grande per il numero dei suoi destinatari."
                    if "recipients" in exc.title
                    else "Il messaggio supera il limite di {max}: togli o riduci qualche allegato."
                )
                problem = Problem(text, {"max": human_size(limits.max_message_size)})
                return compose_page(
                    request,
                    draft,
                    {"attachments": [problem]},
                    files_lost=bool(uploads),
                    status=413,
                )
        finally:
            await form.close()
        accounts: Accounts = request.app.state.accounts
        mailbox = await accounts.get(user.mailbox)
        await save_sent_copy(
            store,
            user.mailbox,
            done.key,
            await sent_message(request.app.state.db, done),
            quota_bytes=mailbox.quota_bytes if mailbox is not None else None,
        )
        return ui.redirect(f"/transmissions/{done.key}")

    def verify_page(
        request: Request,
        *,
        verdict: dict[str, Any] | None = None,
        problem: Problem | None = None,
        failure: Problem | None = None,
        filename: str = "",
        status: int = 200,
    ) -> Response:
        return ui.render(
            request,
            "verify.html",
            {
                "verdict": verdict,
                "problem": problem,
                "failure": failure,
                "filename": filename,
                "max_size": human_size(limits.max_message_size),
            },
            status=status,
        )

    async def verify_form(request: Request) -> Response:
        await ui.require_user(request)
        return verify_page(request)

    async def verify(request: Request) -> Response:
        await ui.require_user(request)
        form = await ui.read_form(
            request, max_files=1, max_fields=MAX_FIELDS, max_size=limits.max_message_size
        )
        try:
            uploads = _uploads(form, "eml")
            if not uploads:
                return verify_page(request, problem=Problem("Scegli un file .eml."), status=422)
            upload = uploads[0]
            filename = _filename(upload.filename)
            if (upload.size or 0) > limits.max_message_size:
                return verify_page(
                    request,
                    problem=Problem(
                        "Il file supera il limite di {max}.",
                        {"max": human_size(limits.max_message_size)},
                    ),
                    filename=filename,
                    status=413,
                )
            index = await index_cache.get()
            # The slot first: the upload comes into memory only in it.
            outcome = await heavy_work.run(
                _check_upload, upload.file, limits.max_message_size, index, filename
            )
        finally:
            await form.close()
        if outcome == "too-large":
            return verify_page(
                request,
                problem=Problem(
                    "Il file supera il limite di {max}.",
                    {"max": human_size(limits.max_message_size)},
                ),
                filename=filename,
                status=413,
            )
        if outcome == "not-mail":
            return verify_page(
                request,
                failure=Problem("Il file non è un messaggio di posta: non ha intestazioni."),
                filename=filename,
            )
        if not isinstance(outcome, Verdict):
            return verify_page(
                request, failure=Problem("Il file non può essere analizzato."), filename=filename
            )
        verdict = outcome
        return verify_page(
            request, verdict=verdict_view(verdict, index_cache.error), filename=filename
        )

    return [
        Route("/compose", compose_form, methods=["GET"]),
        Route("/compose", compose, methods=["POST"]),
        Route("/verify", verify_form, methods=["GET"]),
        Route("/verify", verify, methods=["POST"]),
    ]
