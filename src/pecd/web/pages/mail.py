"""Reading mail: folders, message lists and search, the reading page of a PEC message, its raw
bytes, its attachments, its HTML in a sandboxed frame; the timeline of a sent transmission and
its evidence bundle.

Only the logged-in user's own mailbox is ever read: a URL names a folder and an IMAP UID, and
both are looked up in that mailbox alone (folder names as pecd's IMAP server names them, UIDs
from its ``dovecot-uidlist``). The list reads message headers only (the PEC kind comes from the
unsigned ``X-Trasporto``/``X-Ricevuta`` headers, and is only a label there); the reading page
parses and verifies the message (``pecd verify``'s check). A message's HTML is never put in a
page: it is sanitised and served alone at ``.../html`` with a Content-Security-Policy of its own
(nothing loads, nothing runs, only this site may frame it), in an ``<iframe sandbox>``.

Every page that reads a whole message (the reading page, the frame, an attachment, the timeline,
the evidence bundle) does it through ``pecd.web.timeline.heavy_work``: a few at once in the
process, whoever asks. The raw message is streamed from its file.
"""

from __future__ import annotations

import asyncio
import dataclasses
import io
import math
import tempfile
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from datetime import UTC, date, datetime, time, timedelta
from typing import IO, Any, Final

from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import HTMLResponse, Response, StreamingResponse
from starlette.routing import BaseRoute, Route

from pecd.clock import SystemClock
from pecd.config import Config
from pecd.index.model import ProviderIndex
from pecd.mailbox.maildir import INBOX, MaildirStore
from pecd.mailbox.uidlist import Entry
from pecd.pec import mime
from pecd.pec.timefmt import ROME
from pecd.web import i18n, ui
from pecd.web.evidence import make_bundle, stream
from pecd.web.mailview import (
    Attachment,
    MailView,
    OriginalRef,
    PecKind,
    Summary,
    build_view,
    content_disposition,
    find_original,
    html_of,
    original_of,
    original_ref,
    part_of,
    remote_content,
    safe_content_type,
    sanitize_html,
)
from pecd.web.providers import provider_index
from pecd.web.sentcopy import SENT
from pecd.web.timeline import (
    ENTRY_OVERHEAD,
    MAX_SCAN,
    STATUS_WORDS,
    STEP_WORDS,
    BoundedCache,
    FolderInfo,
    Loaded,
    MailboxReader,
    folder_name,
    folder_token,
    heavy_work,
    is_seen,
    load_timeline,
    text_cost,
    transmission_of,
    valid_transmission_id,
    when_text,
)
from pecd.web.ui import render, require_user

__all__ = ["FRAME_CSP", "PAGE_SIZE", "routes"]

#: Messages on one page of a list.
PAGE_SIZE: Final = 50
#: The Content-Security-Policy of the sanitised HTML frame. ``sandbox`` keeps scripts, forms,
#: plugins and same-origin access off even if something slipped through; ``allow-popups`` (and
#: escaping the sandbox for the page a link opens) is what lets a link (``target=_blank``,
#: ``rel=noopener noreferrer``) open at all.
FRAME_CSP: Final = (
    "default-src 'none'; style-src 'unsafe-inline'; img-src 'none'; frame-ancestors 'self'; "
    "form-action 'none'; base-uri 'none'; sandbox allow-popups allow-popups-to-escape-sandbox"
)
#: The iframe's own sandbox flags (the same as the frame's CSP).
FRAME_SANDBOX: Final = "allow-popups allow-popups-to-escape-sandbox"

_FRAME_STYLE: Final = (
    "body{font-family:system-ui,-apple-system,'Segoe UI',Roboto,Arial,sans-serif;"
    "margin:.5rem;color:#1d2330;background:#fff;overflow-wrap:anywhere;line-height:1.4}"
    "table{max-width:100%;border-collapse:collapse}pre{white-space:pre-wrap}"
)

# The folders every mailbox has, in the reader's words.
_FOLDER_WORDS: Final = {
    INBOX: "Posta in arrivo",
    "Sent": "Inviata",
    "Drafts": "Bozze",
    "Trash": "Cestino",
    "Junk": "Indesiderata",
    "Archive": "Archivio",
}
# Each PEC kind's badge: (label, CSS modifier).
KIND_LABELS: Final[dict[PecKind, tuple[str, str]]] = {
    PecKind.POSTA_CERTIFICATA: ("Posta certificata", "pec"),
    PecKind.ACCETTAZIONE: ("Accettazione", "ok"),
    PecKind.NON_ACCETTAZIONE: ("Non accettazione", "bad"),
    PecKind.PRESA_IN_CARICO: ("Presa in carico", "info"),
    PecKind.AVVENUTA_CONSEGNA: ("Consegna", "ok"),
    PecKind.ERRORE_CONSEGNA: ("Mancata consegna", "bad"),
    PecKind.PREAVVISO_ERRORE_CONSEGNA: ("Preavviso di mancata consegna", "warn"),
    PecKind.RILEVAZIONE_VIRUS: ("Rilevazione virus", "bad"),
    PecKind.ANOMALIA: ("Anomalia", "warn"),
    PecKind.PLAIN: ("Posta ordinaria", "plain"),
}

i18n.register(
    {
        "La firma è integra, ma chi l'ha apposta non è un gestore dell'indice dei gestori PEC.": (
            "The signature is intact, but its signer is not a provider in the PEC provider index."
        ),
        "Cartelle": "Folders",
        "Posta in arrivo": "Inbox",
        "Inviata": "Sent",
        "Bozze": "Drafts",
        "Cestino": "Trash",
        "Indesiderata": "Junk",
        "Archivio": "Archive",
        "messaggi": "messages",
        "non letti": "unread",
        "Posta certificata": "Certified mail",
        "Accettazione": "Acceptance",
        "Non accettazione": "Non-acceptance",
        "Presa in carico": "Taken in charge",
        "Consegna": "Delivery",
        "Mancata consegna": "Delivery failure",
        "Preavviso di mancata consegna": "Delivery delay warning",
        "Rilevazione virus": "Virus detected",
        "Anomalia": "Anomaly",
        "Posta ordinaria": "Ordinary mail",
        "Virus": "Virus",
        "Cerca": "Search",
        "Mittente": "Sender",
        "Oggetto": "Subject",
        "Tipo": "Type",
        "Qualsiasi": "Any",
        "Dal": "From date",
        "Al": "To date",
        "Data": "Date",
        "Dimensione": "Size",
        "Nessun messaggio.": "No messages.",
        "Pagina {page} di {pages}": "Page {page} of {pages}",
        "Precedente": "Previous",
        "Successiva": "Next",
        "Azzera": "Clear",
        "{n} messaggi trovati": "{n} messages found",
        "La ricerca riguarda solo i {n} messaggi più recenti della cartella.": (
            "The search covers only the {n} newest messages of the folder."
        ),
        "Da": "From",
        "A": "To",
        "Cc": "Cc",
        "Messaggio originale": "Original message",
        "Il messaggio": "The message",
        "Testo del gestore": "The provider's text",
        "Dati di certificazione (daticert.xml)": "Certification data (daticert.xml)",
        "Firma": "Signature",
        "Firma valida": "Valid signature",
        "Firma NON valida": "Signature NOT valid",
        "Firma assente": "No signature",
        "Messaggio ordinario, senza firma PEC.": "Ordinary message, no PEC signature.",
        "Messaggio PEC valido": "Valid PEC message",
        "Messaggio PEC NON valido": "PEC message NOT valid",
        "Firmato da": "Signed by",
        "Firmato il": "Signed at",
        "Algoritmo": "Digest",
        "Allegati": "Attachments",
        "Nessun allegato.": "No attachments.",
        "Scarica il messaggio (.eml)": "Download the message (.eml)",
        "Andamento della trasmissione": "Transmission timeline",
        "Problemi rilevati": "Problems found",
        "Contenuti remoti bloccati: immagini e altri riferimenti esterni non vengono caricati.": (
            "Remote content blocked: images and other external references are not loaded."
        ),
        "Versione HTML del messaggio": "HTML version of the message",
        "Segnato come letto.": "Marked as read.",
        "Non è stato possibile segnarlo come letto.": "It could not be marked as read.",
        "Questo messaggio non contiene il messaggio originale.": (
            "This message does not contain the original message."
        ),
        "Ricevuta di tipo": "Receipt type",
        "Allegati sostituiti dalla loro impronta (ricevuta breve).": (
            "Attachments replaced by their hash (short receipt)."
        ),
        "Segnalato dal gestore: contiene un virus.": "Flagged by the provider: it carries a virus.",
        "Torna alla cartella": "Back to the folder",
        "tipo": "type",
        "errore": "error",
        "mittente": "sender",
        "destinatari": "recipients",
        "risposte": "reply to",
        "oggetto": "subject",
        "gestore emittente": "issuing provider",
        "data": "date",
        "identificativo": "identifier",
        "msgid": "msgid",
        "ricevuta": "receipt",
        "consegna": "delivered to",
        "ricezione": "received for",
        "errore esteso": "extended error",
        "certificato": "certified",
        "esterno": "external",
        "Firmatario nell'indice dei gestori": "Signer in the provider index",
        # the timeline
        "Stato": "Status",
        "Destinatario": "Recipient",
        "Passaggi": "Steps",
        "Aggiorna": "Refresh",
        "Pacchetto di prova (.zip)": "Evidence bundle (.zip)",
        "Il messaggio inviato": "The message sent",
        "Non c'è una copia del messaggio in Inviata.": "There is no copy of the message in Sent.",
        "Accettata il": "Accepted at",
        "Non accettata": "Not accepted",
        "In coda: non ancora accettata.": "Queued: not accepted yet.",
        "Identificativo PEC": "PEC msgid",
        "apri la ricevuta": "open the receipt",
        "Trasmissione": "Transmission",
        "La pagina si aggiorna da sola ogni minuto finché ogni destinatario ha il suo esito.": (
            "The page refreshes itself every minute until every recipient has its outcome."
        ),
        "Solo i messaggi più recenti sono stati cercati: la cartella è molto grande.": (
            "Only the newest messages were searched: the folder is very large."
        ),
        **{it: en for it, en in STATUS_WORDS.values()},
        **{it: en for it, en in STEP_WORDS.values()},
    }
)


# --- shared bits ------------------------------------------------------------------------------


def _reader(request: Request, mailbox: str) -> MailboxReader:
    cfg: Config = request.app.state.cfg
    return MailboxReader(MaildirStore(cfg.maildir_root), mailbox)


def _read_limit(request: Request) -> int:
    """The largest stored message read: an envelope wraps a message of the mail limit, and a
    receipt completa too, with a little more around it."""
    cfg: Config = request.app.state.cfg
    return 2 * int(cfg.limits.max_message_size) + 1024 * 1024


def _folder(request: Request, reader: MailboxReader) -> str:
    """The IMAP name of the folder in the URL; 404 when it names none of this mailbox's."""
    name = folder_name(str(request.path_params.get("folder", "")))
    # INBOX is there before the first message makes the mailbox's directory: an empty list.
    if name is None or (name != INBOX and not reader.exists(name)):
        raise HTTPException(404)
    return name


def _short_time(when: datetime | None) -> str:
    if when is None:
        return ""
    return when.astimezone(ROME).strftime("%d/%m/%Y %H:%M")


def _folder_word(info: FolderInfo | str) -> str:
    name = info if isinstance(info, str) else info.name
    display = name if isinstance(info, str) else info.display
    return _FOLDER_WORDS.get(name, display)


def _helpers() -> dict[str, Callable[..., Any]]:
    return {
        "when": when_text,
        "short_time": _short_time,
        "size_text": ui.human_size,
        "kind_label": lambda k: KIND_LABELS.get(k, KIND_LABELS[PecKind.PLAIN]),
        "folder_word": _folder_word,
    }


# --- /mail: the folders -------------------------------------------------------------------------


async def folders_page(request: Request) -> Response:
    user = await require_user(request)
    reader = _reader(request, user.mailbox)
    folders = await asyncio.to_thread(reader.folders)
    return render(request, "mail_folders.html", {"folders": folders, **_helpers()})


# --- /mail/<folder>: the list --------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _Search:
    sender: str
    subject: str
    kind: str
    since: date | None
    until: date | None

    @property
    def active(self) -> bool:
        return bool(self.sender or self.subject or self.kind or self.since or self.until)

    @classmethod
    def of(cls, request: Request) -> _Search:
        q = request.query_params

        def day(name: str) -> date | None:
            try:
                return date.fromisoformat(q.get(name, "")[:10])
            except ValueError:
                return None

        kind = q.get("kind", "")
        if kind not in {k.value for k in PecKind} | {"virus"}:
            kind = ""
        return cls(
            sender=q.get("from", "").strip().lower()[:200],
            subject=q.get("subject", "").strip().lower()[:200],
            kind=kind,
            since=day("since"),
            until=day("until"),
        )

    def query(self, page: int | None = None) -> str:
        from urllib.parse import urlencode

        params = {
            "from": self.sender,
            "subject": self.subject,
            "kind": self.kind,
            "since": self.since.isoformat() if self.since else "",
            "until": self.until.isoformat() if self.until else "",
        }
        if page is not None and page > 1:
            params["page"] = str(page)
        return urlencode({k: v for k, v in params.items() if v})

    def matches(self, s: Summary) -> bool:
        if self.sender and self.sender not in s.from_.lower():
            return False
        if self.subject and self.subject not in s.subject.lower():
            return False
        if self.kind == "virus":
            if not s.virus:
                return False
        elif self.kind and s.kind.value != self.kind:
            return False
        if self.since or self.until:
            if s.date is None:
                return False
            if self.since and s.date < datetime.combine(self.since, time.min, ROME):
                return False
            if self.until and s.date >= datetime.combine(self.until, time.min, ROME) + timedelta(
                days=1
            ):
                return False
        return True


@dataclass(frozen=True, slots=True)
class _Row:
    uid: int
    url: str
    seen: bool
    size: int
    summary: Summary


def _list(
    reader: MailboxReader, folder: str, search: _Search, page: int
) -> tuple[list[_Row], int, int, bool]:
    """(rows of the page, pages, matches, whether the search was cut at MAX_SCAN)."""
    token = folder_token(folder)

    def row(e: Entry) -> _Row:
        return _Row(e.uid, f"/mail/{token}/{e.uid}", is_seen(e), e.size, reader.summary(e))

    entries = reader.listing(folder).entries
    if not search.active:
        total = len(entries)
        pages = max(1, math.ceil(total / PAGE_SIZE))
        page = min(page, pages)
        newest_first = entries[::-1]
        chosen = newest_first[(page - 1) * PAGE_SIZE : page * PAGE_SIZE]
        return [row(e) for e in chosen], pages, total, False
    scanned = entries[-MAX_SCAN:][::-1]
    matched = [r for r in map(row, scanned) if search.matches(r.summary)]
    pages = max(1, math.ceil(len(matched) / PAGE_SIZE))
    page = min(page, pages)
    return (
        matched[(page - 1) * PAGE_SIZE : page * PAGE_SIZE],
        pages,
        len(matched),
        len(entries) > MAX_SCAN,
    )


async def list_page(request: Request) -> Response:
    user = await require_user(request)
    reader = _reader(request, user.mailbox)
    folder = await asyncio.to_thread(_folder, request, reader)
    search = _Search.of(request)
    try:
        page = max(1, min(int(request.query_params.get("page", "1")), 1_000_000))
    except ValueError:
        page = 1
    rows, pages, total, cut = await asyncio.to_thread(_list, reader, folder, search, page)
    page = min(page, pages)
    token = folder_token(folder)
    base = f"/mail/{token}"

    def page_url(n: int) -> str:
        q = search.query(n)
        return base + ("?" + q if q else "")

    folders = await asyncio.to_thread(reader.folders)
    return render(
        request,
        "mail_list.html",
        {
            "folder": folder,
            "folder_display": _folder_word(next((f for f in folders if f.name == folder), folder)),
            "folders": folders,
            "token": token,
            "rows": rows,
            "page": page,
            "pages": pages,
            "total": total,
            "cut": cut,
            "max_scan": MAX_SCAN,
            "search": search,
            "kinds": [(k.value, KIND_LABELS[k][0]) for k in PecKind],
            "prev_url": page_url(page - 1) if page > 1 else None,
            "next_url": page_url(page + 1) if page < pages else None,
            **_helpers(),
        },
    )


# --- /mail/<folder>/<uid>: one message ----------------------------------------------------------
#
# Reading a message is heavy (the whole file read, parsed, its signature verified): it runs
# through heavy_work, the slot taken before the file is read. The frame and the attachments of
# a message need only its original: where the view found it is remembered, and they find it
# there again without verifying anything.

#: Where the original of each message viewed lately was, by (mailbox, folder, base name, size,
#: modification time): a Maildir file's content never changes under its base name.
_ORIGINALS_ITEMS: Final = 20_000
_ORIGINALS_BYTES: Final = 16 * 1024 * 1024
_CHUNK: Final = 1024 * 1024
_SPOOL_BYTES: Final = 1024 * 1024

_FileKey = tuple[str, str, str, int, int]


@dataclass(frozen=True, slots=True)
class _Where:
    ref: OriginalRef | None  # None: the message has no original (an error view, a receipt)


_ORIGINALS: BoundedCache[_FileKey, _Where] = BoundedCache(
    max_items=_ORIGINALS_ITEMS, max_bytes=_ORIGINALS_BYTES
)


def _file_key(reader: MailboxReader, folder: str, loaded: Loaded) -> _FileKey:
    e = loaded.entry
    return (reader.address, folder, e.name, e.size, loaded.mtime_ns)


def _remember(key: _FileKey, ref: OriginalRef | None) -> None:
    _ORIGINALS.put(key, _Where(ref), ENTRY_OVERHEAD + text_cost(*key[:3]) + 100)


async def _target(request: Request) -> tuple[MailboxReader, str, int]:
    """The logged-in user's reader, the folder and the UID the URL names (404: no such folder)."""
    user = await require_user(request)
    reader = _reader(request, user.mailbox)
    folder = await asyncio.to_thread(_folder, request, reader)
    return reader, folder, int(request.path_params["uid"])


@dataclass(frozen=True, slots=True)
class _Read:
    entry: Entry
    view: MailView
    blocked: bool  # the HTML had remote content, which the frame leaves out


def _read_view(
    reader: MailboxReader, folder: str, uid: int, limit: int, index: ProviderIndex | None
) -> _Read | None:
    """The view of message ``uid`` (heavy); None when there is no such message."""
    loaded = reader.load(folder, uid, limit)
    if loaded is None:
        return None
    view = build_view(loaded.data, index=index)
    _remember(_file_key(reader, folder, loaded), original_ref(view))
    original = view.original
    blocked = original is not None and original.html is not None and remote_content(original.html)
    # The original's bytes are the frame's and the downloads' business: they find them again.
    return _Read(loaded.entry, dataclasses.replace(view, original_raw=None), blocked)


def _original(reader: MailboxReader, folder: str, uid: int, limit: int) -> mime.Buffer | None:
    """The original of message ``uid`` (heavy): found where its view found it when that is
    known, else the long way (verified, as the view does); None when there is no such message
    or it has no original."""
    loaded = reader.load(folder, uid, limit)
    if loaded is None:
        return None
    key = _file_key(reader, folder, loaded)
    known = _ORIGINALS.get(key)
    if known is not None:
        if known.ref is None:
            return None
        found = find_original(loaded.data, known.ref)
        if found is not None:
            return found
    ref, data = original_of(loaded.data)
    _remember(key, ref)
    return data


def _frame(reader: MailboxReader, folder: str, uid: int, limit: int) -> str | None:
    """The sanitised HTML document of message ``uid``'s original (heavy); None: it has none."""
    original = _original(reader, folder, uid, limit)
    html = html_of(original) if original is not None else None
    if html is None:
        return None
    clean = sanitize_html(html)
    return (
        '<!DOCTYPE html><html><head><meta charset="utf-8">'
        '<meta name="referrer" content="no-referrer">'
        f"<style>{_FRAME_STYLE}</style></head><body>{clean.html}</body></html>"
    )


def _part(
    reader: MailboxReader, folder: str, uid: int, limit: int, n: int
) -> tuple[Attachment, IO[bytes], int] | None:
    """Part ``n`` of message ``uid``'s original, decoded (heavy) into memory up to a megabyte,
    else into a temporary file on disk, ready to be read from the start, and its size; None:
    there is none. Out of the slot, a download waiting for a slow client holds no more memory
    than that."""
    original = _original(reader, folder, uid, limit)
    found = part_of(original, n) if original is not None else None
    del original
    if found is None:
        return None
    att, data = found
    # Big: straight to a temporary file (a SpooledTemporaryFile would copy it twice first).
    spool: IO[bytes] = io.BytesIO()
    if len(data) > _SPOOL_BYTES:
        spool = tempfile.TemporaryFile()  # noqa: SIM115 (closed once streamed)
    try:
        spool.write(data)
        spool.seek(0)
    except BaseException:
        spool.close()
        raise
    return att, spool, len(data)


async def read_page(request: Request) -> Response:
    reader, folder, uid = await _target(request)
    index = await provider_index(request.app.state.cfg).get()
    found = await heavy_work.run(_read_view, reader, folder, uid, _read_limit(request), index)
    if found is None:
        raise HTTPException(404)
    entry, view = found.entry, found.view
    seen = await asyncio.to_thread(reader.mark_seen, entry)
    db = request.app.state.db
    transmission: str | None = None
    if view.pec_msgid:
        transmission = await transmission_of(db, reader.address, pec_msgid=view.pec_msgid)
    elif view.kind is PecKind.PLAIN and view.headers.message_id:
        transmission = await transmission_of(
            db, reader.address, client_msgid=view.headers.message_id
        )
    token = folder_token(folder)
    base = f"/mail/{token}/{entry.uid}"
    return render(
        request,
        "mail_read.html",
        {
            "view": view,
            "folder": folder,
            "folder_display": _folder_word(folder),
            "folder_url": f"/mail/{token}",
            "base": base,
            "original": view.original,
            "blocked": found.blocked,
            "seen": seen,
            "sent_folder": folder == SENT,
            "transmission_url": f"/transmissions/{transmission}" if transmission else None,
            "frame_sandbox": FRAME_SANDBOX,
            **_helpers(),
        },
    )


async def raw_message(request: Request) -> Response:
    """The stored bytes, streamed from the file (never whole in memory)."""
    reader, folder, uid = await _target(request)
    opened = await asyncio.to_thread(reader.open_message, folder, uid, _read_limit(request))
    if opened is None:
        raise HTTPException(404)
    entry, f, size = opened
    name = f"{folder_token(folder)}-{entry.uid}.eml"
    return StreamingResponse(
        _chunks(f, size),
        media_type="message/rfc822",
        headers={
            "Content-Disposition": content_disposition(name),
            "Content-Length": str(size),
            "Cache-Control": "no-store",
        },
    )


async def _chunks(f: IO[bytes], size: int) -> AsyncIterator[bytes]:
    """``size`` bytes of ``f`` in chunks (read in a worker thread); closes it at the end."""
    try:
        left = size
        while left > 0:
            chunk = await asyncio.to_thread(f.read, min(_CHUNK, left))
            if not chunk:
                break
            left -= len(chunk)
            yield chunk
    finally:
        f.close()


async def html_frame(request: Request) -> Response:
    reader, folder, uid = await _target(request)
    doc = await heavy_work.run(_frame, reader, folder, uid, _read_limit(request))
    if doc is None:
        raise HTTPException(404)
    return HTMLResponse(
        doc, headers={"Content-Security-Policy": FRAME_CSP, "Cache-Control": "no-store"}
    )


async def part(request: Request) -> Response:
    reader, folder, uid = await _target(request)
    n = int(request.path_params["n"])
    found = await heavy_work.run(_part, reader, folder, uid, _read_limit(request), n)
    if found is None:
        raise HTTPException(404)
    att, spool, size = found
    return StreamingResponse(
        _chunks(spool, size),
        media_type=safe_content_type(att.content_type),
        headers={
            "Content-Disposition": content_disposition(att.filename),
            "Content-Length": str(size),
            "Cache-Control": "no-store",
        },
    )


# --- /transmissions/<id>: the timeline and the evidence -------------------------------------------


async def _timeline(request: Request) -> Any:
    user = await require_user(request)
    key = str(request.path_params["id"])
    if not valid_transmission_id(key):
        raise HTTPException(404)
    cfg: Config = request.app.state.cfg
    found = await load_timeline(
        request.app.state.db,
        MaildirStore(cfg.maildir_root),
        user.mailbox,
        key,
        max_bytes=_read_limit(request),
    )
    if found is None:
        raise HTTPException(404)
    return found


async def timeline_page(request: Request) -> Response:
    timeline = await _timeline(request)
    return render(
        request,
        "mail_timeline.html",
        {
            "tl": timeline,
            "refresh": not timeline.complete,
            "status_words": STATUS_WORDS,
            "step_words": STEP_WORDS,
            **_helpers(),
        },
    )


async def evidence_zip(request: Request) -> Response:
    timeline = await _timeline(request)
    user = await require_user(request)
    bundle = await make_bundle(
        timeline, mailbox=user.mailbox, now=SystemClock().now().astimezone(UTC)
    )
    return StreamingResponse(
        stream(bundle),
        media_type="application/zip",
        headers={
            "Content-Disposition": content_disposition(f"pec-evidenza-{timeline.id}.zip"),
            "Content-Length": str(bundle.size),
            "Cache-Control": "no-store",
        },
    )


def routes(cfg: Config) -> list[BaseRoute]:
    return [
        Route("/mail", folders_page, methods=["GET"]),
        Route("/mail/{folder}", list_page, methods=["GET"]),
        Route("/mail/{folder}/{uid:int}", read_page, methods=["GET"]),
        Route("/mail/{folder}/{uid:int}/raw", raw_message, methods=["GET"]),
        Route("/mail/{folder}/{uid:int}/html", html_frame, methods=["GET"]),
        Route("/mail/{folder}/{uid:int}/part/{n:int}", part, methods=["GET"]),
        Route("/transmissions/{id}", timeline_page, methods=["GET"]),
        Route("/transmissions/{id}/evidence.zip", evidence_zip, methods=["GET"]),
    ]
