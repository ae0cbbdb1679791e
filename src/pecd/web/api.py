"""The REST API for software, under ``/api/v1``: send a PEC, follow its transmission and its
receipts, read the mailbox, set a webhook.

Contract with the HTTPS application
-----------------------------------
``api_routes(cfg)`` gives the routes to mount (their paths already begin with ``/api/v1``).
Their endpoints take the database from ``request.app.state.db``: the application's lifespan
opens it once and closes it at the end::

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        app.state.db = await Database.open(cfg.database_url)
        try:
            yield
        finally:
            await app.state.db.close()

Requests authenticate with ``Authorization: Bearer <token>`` (``pecd mailbox token create``) and
reach only the token's own mailbox: its transmissions, its folders, its webhook; anything else is
404, as if it did not exist. Every error is an RFC 9457 problem details document
(``application/problem+json``), unknown paths and methods under ``/api/v1`` too.

What a POST commits is what the SMTP access point commits (``pecd.web.submit``): a SUBMISSION
job with the message (a ``Received:`` field in front) and an :class:`IntakePayload` whose ``user``
is the token's mailbox; the pipeline then checks it, accepts or refuses it, and the accettazione
reaches the mailbox as for any client. The job's key is the id the API hands back; the status of
an id is read from the trace log (``pecd.web.status``). While the storage is full a POST is
refused, 503 with ``Retry-After`` and the problem kind ``insufficient-storage``, as the SMTP
access point answers ``452 4.3.1``: before its body is read, before its commit, or when the
commit (or the spooling of a multipart body) fails for want of space; its ``client_key`` is not
used up, so the same POST later is taken in, once. A message comes as JSON (attachments in
base64) or as ``multipart/form-data`` (attachments as files), with the same checks; a big one is
decoded and built in a worker thread, so the event loop keeps serving everybody else meanwhile.

Messages of the mailbox are named as in the webmail, by folder and IMAP UID
(``/api/v1/folders/<folder>/messages/<uid>``), read from the Maildir with the UIDs the IMAP server
gives (``pecd.mailbox.uidlist``). Folder names are IMAP names (``INBOX``, ``Sent``, ``A/B``),
checked before they name a directory.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import dataclasses
import functools
import json
import logging
import os
import secrets
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable, Mapping
from pathlib import Path
from typing import Any, BinaryIO
from urllib.parse import quote, urlencode

from starlette.datastructures import FormData, UploadFile
from starlette.exceptions import HTTPException
from starlette.formparsers import MultiPartException, MultiPartParser
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import BaseRoute, Match, Route

from pecd.clock import Clock, SystemClock
from pecd.config import Config, LimitsConfig
from pecd.mailbox import uidlist
from pecd.mailbox.maildir import INBOX, MaildirStore, folder_dir
from pecd.pec.address import normalize_address, valid_address
from pecd.pec.mime import clean_header_text, decode_words, get_first, head_of
from pecd.pec.msgid import bracket, unbracket
from pecd.pec.vocab import H_RICEVUTA, H_TRASPORTO, Ricevuta, TipoRicevuta, Trasporto
from pecd.store import webhooks as hooks
from pecd.store.db import Database
from pecd.store.tokens import Tokens
from pecd.web.status import transmission_status
from pecd.web.submit import (
    OFF_LOOP_BYTES,
    RETRY_AFTER,
    Attachment,
    InsufficientStorage,
    SubmitError,
    no_space,
    room,
    subject_error,
    submit,
)
from pecd.web.webhooks import check_url

__all__ = ["OPENAPI", "PREFIX", "PROBLEM", "Problem", "api_routes", "request_limit"]

log = logging.getLogger(__name__)

PREFIX = "/api/v1"
PROBLEM = "application/problem+json"
_PROBLEM_BASE = "https://pecd.example/problems/"  # not dereferenced: names a problem kind
_FIELDS = {"to", "cc", "subject", "body", "attachments", "receipt", "client_key"}
_MAX_CLIENT_KEY = 200
_MAX_SUBJECT = 998
_MAX_ATTACHMENTS = 100
_MAX_FOLDER = 255
_PAGE_DEFAULT, _PAGE_MAX = 50, 200
_HEAD_BYTES = 64 * 1024  # what is read of a message to list it
_CHUNK = 256 * 1024
_SECRET_CHARS = frozenset(map(chr, range(0x21, 0x7F)))


class Problem(Exception):
    """An error answered as problem details."""

    def __init__(
        self,
        status: int,
        kind: str,
        title: str,
        detail: str,
        headers: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__(detail)
        self.status, self.kind, self.title, self.detail = status, kind, title, detail
        self.headers = dict(headers or {})

    def response(self) -> Response:
        body = {
            "type": _PROBLEM_BASE + self.kind,
            "title": self.title,
            "status": self.status,
            "detail": self.detail,
        }
        headers = dict(self.headers)
        if self.status == 401:
            headers["WWW-Authenticate"] = 'Bearer realm="pecd"'
        return JSONResponse(body, status_code=self.status, media_type=PROBLEM, headers=headers)


def _invalid(detail: str) -> Problem:
    return Problem(422, "invalid-request", "The request is not a valid PEC submission", detail)


def _not_found(detail: str) -> Problem:
    return Problem(404, "not-found", "Not found", detail)


def _too_large(limit: int) -> Problem:
    return Problem(413, "too-large", "Request too large", f"the request exceeds {limit} bytes")


def _submit_problem(e: SubmitError) -> Problem:
    return Problem(e.status, e.kind, e.title, e.detail, headers=e.headers)


Endpoint = Callable[[Request], Awaitable[Response]]


def _problems(fn: Endpoint) -> Endpoint:
    """``fn`` with every failure answered as problem details (an unexpected one as a 500, logged)."""

    @functools.wraps(fn)
    async def endpoint(request: Request) -> Response:
        try:
            return await fn(request)
        except Problem as p:
            return p.response()
        except ClientDisconnect:
            raise
        except HTTPException as e:  # the application's body limit, say
            return Problem(e.status_code, "http-error", str(e.detail), str(e.detail)).response()
        except Exception:
            log.exception("%s %s failed", request.method, request.url.path)
            return Problem(
                500, "internal-error", "Internal error", "the server could not answer this request"
            ).response()

    return endpoint


def _db(request: Request) -> Database:
    db = getattr(request.app.state, "db", None)
    if not isinstance(db, Database):
        raise RuntimeError("the application must set app.state.db (see pecd.web.api)")
    return db


async def _mailbox(request: Request) -> str:
    """The mailbox the request's bearer token speaks for, or a 401 problem."""
    scheme, _, token = request.headers.get("authorization", "").partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise Problem(
            401, "unauthorized", "Authentication required", "send Authorization: Bearer <token>"
        )
    mailbox = await Tokens(_db(request)).authenticate(token.strip())
    if mailbox is None:
        raise Problem(401, "unauthorized", "Authentication failed", "the token is not valid")
    return mailbox


async def _limited(request: Request, limit: int) -> AsyncGenerator[bytes, None]:
    """The request body, chunk by chunk; a 413 problem once it passes ``limit`` bytes."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise _too_large(limit)
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise _too_large(limit)
        yield chunk


async def _read_body(request: Request, limit: int) -> bytes:
    return b"".join([chunk async for chunk in _limited(request, limit)])


# --- the submission: JSON or multipart, the same checks ----------------------------------------


@dataclasses.dataclass(frozen=True, slots=True)
class _Submission:
    to: list[str]
    cc: list[str]
    subject: str
    body: str
    receipt: str
    client_key: str | None
    attachments: list[Attachment]


def _str(doc: Mapping[str, Any], name: str, default: str | None = None) -> str:
    value = doc.get(name, default)
    if not isinstance(value, str):
        raise _invalid(f"{name} must be a string")
    return value


def _addresses(value: Any, name: str, required: bool) -> list[str]:
    if not isinstance(value, list) or not all(isinstance(a, str) for a in value):
        raise _invalid(f"{name} must be a list of addresses")
    if required and not value:
        raise _invalid(f"{name} must name at least one recipient")
    out = []
    for raw in value:
        address = normalize_address(raw)
        if not valid_address(address) or any(c in address for c in "\r\n,<>"):
            raise _invalid(f"not a valid address in {name}: {raw!r}")
        out.append(address)
    return out


def _attachment(i: int, filename: str, content_type: str, content: bytes) -> Attachment:
    ctype = content_type.strip().lower()
    maintype, slash, subtype = ctype.partition("/")
    if not filename or any(c in filename for c in "\r\n\0") or len(filename) > 255:
        raise _invalid(f"attachments[{i}]: a file name of 1 to 255 characters on one line")
    if (
        not slash
        or not maintype.isascii()
        or not subtype.isascii()
        or not subtype
        or any(c in ctype for c in " ;\r\n\0")
    ):
        raise _invalid(f"attachments[{i}]: content_type must be type/subtype")
    return Attachment(filename, maintype, subtype, content)


def _json_attachments(doc: Mapping[str, Any]) -> list[Attachment]:
    value = doc.get("attachments", [])
    if not isinstance(value, list):
        raise _invalid("attachments must be a list")
    if len(value) > _MAX_ATTACHMENTS:
        raise _invalid(f"at most {_MAX_ATTACHMENTS} attachments")
    out = []
    for i, a in enumerate(value):
        if not isinstance(a, dict) or set(a) - {"filename", "content_type", "content_base64"}:
            raise _invalid(f"attachments[{i}]: filename, content_type, content_base64 only")
        filename = _str(a, "filename")
        ctype = _str(a, "content_type", "application/octet-stream")
        try:
            content = base64.b64decode(_str(a, "content_base64"), validate=True)
        except (binascii.Error, ValueError):
            raise _invalid(f"attachments[{i}]: content_base64 is not base64") from None
        out.append(_attachment(i, filename, ctype, content))
    return out


def _checked(
    doc: Mapping[str, Any], attachments: list[Attachment], limits: LimitsConfig
) -> _Submission:
    """The fields of a submission, checked (``doc``: the JSON object, or the form's fields in
    the same shape)."""
    if "bcc" in {str(k).lower() for k in doc}:
        raise _invalid("PEC has no blind copies: there is no bcc field")
    unknown = sorted(set(doc) - _FIELDS)
    if unknown:
        raise _invalid(f"unknown fields: {', '.join(unknown)}")
    to = _addresses(doc.get("to", []), "to", required=True)
    cc = _addresses(doc.get("cc", []), "cc", required=False)
    if len(dict.fromkeys(to + cc)) > limits.max_recipients:
        raise _invalid(f"at most {limits.max_recipients} recipients")
    subject = _str(doc, "subject", "")
    problem = subject_error(subject)
    if problem is not None:
        raise _invalid(f"subject: one line of at most {_MAX_SUBJECT} characters ({problem})")
    body = _str(doc, "body", "")
    if "\0" in body:
        raise _invalid("body: text without NUL characters")
    receipt = _str(doc, "receipt", TipoRicevuta.COMPLETA.value)
    if receipt not in {t.value for t in TipoRicevuta}:
        raise _invalid("receipt must be completa, breve or sintetica")
    client_key = doc.get("client_key")
    if client_key is not None and (
        not isinstance(client_key, str) or not 0 < len(client_key) <= _MAX_CLIENT_KEY
    ):
        raise _invalid(f"client_key: a string of 1 to {_MAX_CLIENT_KEY} characters")
    return _Submission(to, cc, subject, body, receipt, client_key, attachments)


def _from_json(raw: bytes, limits: LimitsConfig) -> _Submission:
    """A JSON submission, parsed, decoded and checked (CPU work: run off the loop when big)."""
    try:
        doc = json.loads(raw)
    except (ValueError, UnicodeDecodeError, RecursionError):
        raise _invalid("the body is not JSON") from None
    if not isinstance(doc, dict):
        raise _invalid("the body must be a JSON object")
    checked = _checked({k: v for k, v in doc.items() if k != "attachments"}, [], limits)
    return dataclasses.replace(checked, attachments=_json_attachments(doc))


def _read_upload(upload: UploadFile) -> bytes:
    upload.file.seek(0)
    return upload.file.read()


async def _from_form(request: Request, limit: int, limits: LimitsConfig) -> _Submission:
    """A ``multipart/form-data`` submission: ``to`` and ``cc`` repeated or comma-separated, the
    other fields once, each file of ``attachments`` an attachment."""
    parser = MultiPartParser(
        request.headers,
        _limited(request, limit),
        max_files=_MAX_ATTACHMENTS,
        max_fields=4 * _MAX_ATTACHMENTS,
        max_part_size=limit,
    )
    try:
        form: FormData = await parser.parse()
    except MultiPartException as exc:
        raise _invalid(f"not a valid multipart/form-data body: {exc.message}") from None
    try:
        doc: dict[str, Any] = {}
        files: list[UploadFile] = []
        for name, value in form.multi_items():
            if isinstance(value, UploadFile):
                if name != "attachments":
                    raise _invalid(f"a file in field {name!r}: files go in 'attachments'")
                if value.filename or value.size:  # an empty file input sends neither
                    files.append(value)
            elif name in ("to", "cc"):
                doc.setdefault(name, []).extend(a for a in value.split(",") if a.strip())
            elif name in doc:
                raise _invalid(f"field {name!r} given twice")
            elif name == "attachments":
                raise _invalid("attachments are files (multipart parts with a filename)")
            else:
                doc[name] = value
        if doc.get("client_key") == "":
            del doc["client_key"]
        checked = _checked(doc, [], limits)
        attachments = []
        for i, upload in enumerate(files):
            content = await asyncio.to_thread(_read_upload, upload)
            ctype = upload.content_type or "application/octet-stream"
            attachments.append(_attachment(i, upload.filename or "", ctype, content))
    finally:
        await form.close()
    return dataclasses.replace(checked, attachments=attachments)


def request_limit(limits: LimitsConfig) -> int:
    """The largest request the API reads: a message at the mail limit, base64-encoded (4 bytes
    of 3) in JSON; the JSON around it and the text fields are bounded by the slack."""
    return limits.max_message_size * 4 // 3 + 256 * 1024


# --- the mailbox: folders and messages ------------------------------------------------------------


def _folder(name: str) -> str:
    """An IMAP folder name, checked (a 422 problem otherwise); INBOX in any case is INBOX."""
    if not name or len(name) > _MAX_FOLDER:
        raise Problem(422, "invalid-folder", "Invalid folder name", "1 to 255 characters")
    try:
        folder_dir(name)
    except ValueError:
        raise Problem(
            422,
            "invalid-folder",
            "Invalid folder name",
            "folder names are IMAP names: parts separated by '/', none empty, no '.' or controls",
        ) from None
    return INBOX if name.upper() == INBOX else name


def _folder_path(store: MaildirStore, mailbox: str, folder: str) -> Path:
    """The folder's Maildir directory inside the mailbox (a 404 problem if there is none)."""
    base = store.path_for(mailbox)
    path = store.folder_path(mailbox, folder)
    if not path.resolve().is_relative_to(base.resolve()) or not (path / "cur").is_dir():
        raise _not_found(f"no folder {folder!r} in this mailbox")
    return path


def _folders(store: MaildirStore, mailbox: str) -> list[str]:
    base = store.path_for(mailbox)
    found = [INBOX] if (base / "cur").is_dir() else []
    try:
        with os.scandir(base) as entries:
            names = sorted(
                e.name[1:].replace(".", "/")
                for e in entries
                if e.name.startswith(".")
                and e.name not in (".", "..")
                and e.is_dir(follow_symlinks=False)
                and os.path.isdir(os.path.join(e.path, "cur"))
            )
    except FileNotFoundError:
        return found
    return found + [n for n in names if n]


def pec_kind(head: bytes) -> str | None:
    """The PEC kind the message's outer headers announce (not verified: they are not signed):
    a receipt's ``X-Ricevuta`` value, ``posta-certificata`` (an envelope), ``anomalia`` (an
    anomaly envelope); None for a message that announces none."""
    ricevuta = (get_first(head, H_RICEVUTA) or "").strip().lower()
    if ricevuta in {r.value for r in Ricevuta}:
        return ricevuta
    trasporto = (get_first(head, H_TRASPORTO) or "").strip().lower()
    if trasporto == Trasporto.POSTA_CERTIFICATA.value:
        return trasporto
    if trasporto == Trasporto.ERRORE.value:
        return "anomalia"
    return None


def _header(head: bytes, name: str, limit: int = 998) -> str | None:
    value = get_first(head, name)
    if value is None:
        return None
    return clean_header_text(decode_words(value))[:limit]


def _summary(entry: uidlist.Entry, folder: str) -> dict[str, Any] | None:
    try:
        with open(entry.path, "rb") as f:
            head = head_of(f.read(_HEAD_BYTES))
    except FileNotFoundError:  # expunged, or moved, meanwhile
        return None
    return {
        "uid": entry.uid,
        "size": entry.size,
        "kind": pec_kind(head),
        "subject": _header(head, "Subject"),
        "from": _header(head, "From"),
        "to": _header(head, "To"),
        "date": _header(head, "Date", 200),
        "message_id": _header(head, "Message-ID", 500),
        "url": _message_url(folder, entry.uid),
    }


def _message_url(folder: str, uid: int) -> str:
    return f"{PREFIX}/folders/{quote(folder, safe='/')}/messages/{uid}"


def _page(path: Path, folder: str, before: int | None, limit: int) -> dict[str, Any]:
    listing = uidlist.sync(path)
    entries = [e for e in listing.entries if before is None or e.uid < before]
    page = entries[-limit:][::-1]  # newest first
    messages = [s for s in (_summary(e, folder) for e in page) if s is not None]
    more = len(entries) > limit
    next_url = None
    if more and page:
        next_url = f"{PREFIX}/folders/{quote(folder, safe='/')}/messages?" + urlencode(
            {"limit": limit, "before": page[-1].uid}
        )
    return {
        "folder": folder,
        "uid_validity": listing.uid_validity,
        "total": len(listing.entries),
        "messages": messages,
        "next": next_url,
    }


def _open_message(path: Path, uid: int) -> tuple[BinaryIO, int] | None:
    """The open file of message ``uid`` of the folder at ``path`` and its size (None: no such
    message). Opened here, so that a rename (an IMAP client setting a flag) cannot lose it
    while it is sent."""
    for listing in (uidlist.read(path), None):
        if listing is None:
            listing = uidlist.sync(path)
        entry = listing.by_uid().get(uid)
        if entry is None:
            continue
        try:
            f = open(entry.path, "rb")  # noqa: SIM115 - closed by the response's iterator
        except FileNotFoundError:
            continue
        return f, os.fstat(f.fileno()).st_size
    return None


async def _chunks(f: BinaryIO) -> AsyncIterator[bytes]:
    try:
        while chunk := await asyncio.to_thread(f.read, _CHUNK):
            yield chunk
    finally:
        f.close()


def _int_param(request: Request, name: str, low: int, high: int, default: int | None) -> int | None:
    raw = request.query_params.get(name)
    if raw is None:
        return default
    if not raw.isdigit() or not low <= int(raw) <= high:
        raise Problem(
            400, "invalid-parameter", "Invalid parameter", f"{name}: a number from {low} to {high}"
        )
    return int(raw)


# --- the routes ---------------------------------------------------------------------------------


def _with_urls(doc: dict[str, Any]) -> dict[str, Any]:
    """A transmission's status with a download URL beside each receipt located."""
    entries = [doc, *doc.get("recipients", []), *doc.get("events", [])]
    for entry in entries:
        if "receipt" in entry:
            r = entry["receipt"]
            entry["receipt_url"] = None if r is None else _message_url(r["folder"], r["uid"])
    return doc


def api_routes(cfg: Config, clock: Clock | None = None) -> list[BaseRoute]:
    """The REST API's routes (see the module's documentation for what the app provides)."""
    clk = clock or SystemClock()
    limits = cfg.limits
    body_limit = request_limit(limits)
    store = MaildirStore(cfg.maildir_root)

    async def send(request: Request) -> Response:
        mailbox = await _mailbox(request)
        # No room: refused before the body (up to the mail limit) is read, let alone spooled.
        if not room(cfg):
            raise _submit_problem(InsufficientStorage())
        try:
            fields = await fields_of(request)
        except OSError as exc:  # a multipart body spooled to a full disk
            if not no_space(exc):
                raise
            raise _submit_problem(InsufficientStorage()) from None
        peer = request.client.host if request.client else "unknown"
        try:
            done = await submit(
                _db(request),
                cfg,
                clk,
                mailbox=mailbox,
                to=fields.to,
                cc=fields.cc,
                subject=fields.subject,
                body=fields.body,
                attachments=fields.attachments,
                receipt=fields.receipt,
                client_key=fields.client_key,
                peer=peer,
            )
        except SubmitError as e:
            raise _submit_problem(e) from None
        return JSONResponse(
            {
                "id": done.key,
                "status_url": f"{PREFIX}/messages/{done.key}",
                # The Message-ID of the message built now: a repeat makes no new message.
                "message_id": done.message_id if done.created else None,
            },
            status_code=202 if done.created else 200,
        )

    async def fields_of(request: Request) -> _Submission:
        ctype = request.headers.get("content-type", "application/json").split(";")[0].strip()
        if ctype.lower() == "multipart/form-data":
            return await _from_form(request, body_limit, limits)
        if ctype.lower() in ("application/json", ""):
            raw_body = await _read_body(request, body_limit)
            if len(raw_body) > OFF_LOOP_BYTES:
                return await asyncio.to_thread(_from_json, raw_body, limits)
            return _from_json(raw_body, limits)
        raise Problem(
            415,
            "unsupported-media-type",
            "Unsupported media type",
            "send application/json or multipart/form-data",
        )

    async def status(request: Request) -> Response:
        mailbox = await _mailbox(request)
        result = await transmission_status(
            _db(request), mailbox, key=request.path_params["id"], maildir=store
        )
        if result is None:
            raise _not_found("no such transmission of this mailbox")
        return JSONResponse(_with_urls(result))

    async def lookup(request: Request) -> Response:
        mailbox = await _mailbox(request)
        q = request.query_params
        given = {n: q[n] for n in ("id", "pec_msgid", "client_msgid") if n in q}
        if len(given) != 1 or not next(iter(given.values())).strip():
            raise Problem(
                400,
                "invalid-parameter",
                "Invalid parameter",
                "name the transmission by exactly one of id, pec_msgid, client_msgid",
            )
        name, value = next(iter(given.items()))
        db = _db(request)
        if name == "id":
            result = await transmission_status(db, mailbox, key=value, maildir=store)
        elif name == "pec_msgid":
            result = await transmission_status(
                db, mailbox, pec_msgid=unbracket(value), maildir=store
            )
        else:
            result = await transmission_status(
                db, mailbox, client_msgid=bracket(value), maildir=store
            )
        if result is None:
            raise _not_found("no such transmission of this mailbox")
        return JSONResponse(_with_urls(result))

    async def folders(request: Request) -> Response:
        mailbox = await _mailbox(request)
        names = await asyncio.to_thread(_folders, store, mailbox)
        return JSONResponse(
            {
                "folders": [
                    {"name": n, "messages_url": f"{PREFIX}/folders/{quote(n, safe='/')}/messages"}
                    for n in names
                ]
            }
        )

    async def messages(request: Request) -> Response:
        mailbox = await _mailbox(request)
        folder = _folder(request.path_params["folder"])
        limit = _int_param(request, "limit", 1, _PAGE_MAX, _PAGE_DEFAULT)
        before = _int_param(request, "before", 1, 0xFFFFFFFF, None)
        assert limit is not None
        path = await asyncio.to_thread(_folder_path, store, mailbox, folder)
        try:
            page = await asyncio.to_thread(_page, path, folder, before, limit)
        except uidlist.UidListLocked:
            raise Problem(
                503, "busy", "Folder busy", "the folder is locked by a writer; try again"
            ) from None
        return JSONResponse(page)

    async def message(request: Request) -> Response:
        mailbox = await _mailbox(request)
        folder = _folder(request.path_params["folder"])
        uid = int(request.path_params["uid"])
        path = await asyncio.to_thread(_folder_path, store, mailbox, folder)
        opened = await asyncio.to_thread(_open_message, path, uid)
        if opened is None:
            raise _not_found(f"no message {uid} in {folder!r}")
        f, size = opened
        name = f"{folder.replace('/', '_')}-{uid}.eml"
        return StreamingResponse(
            _chunks(f),
            media_type="message/rfc822",
            headers={
                "Content-Length": str(size),
                "Content-Disposition": f'attachment; filename="{quote(name)}"',
                "Cache-Control": "private, no-store",
            },
        )

    async def webhook_get(request: Request) -> Response:
        mailbox = await _mailbox(request)
        hook = await hooks.get_webhook(_db(request), mailbox)
        if hook is None:
            raise _not_found("this mailbox has no webhook")
        return JSONResponse(
            {"url": hook.url, "created_at": hook.created_at.isoformat(), "events": _EVENTS}
        )

    async def webhook_put(request: Request) -> Response:
        mailbox = await _mailbox(request)
        raw = await _read_body(request, 16 * 1024)
        try:
            doc = json.loads(raw)
        except (ValueError, UnicodeDecodeError, RecursionError):
            raise _invalid("the body is not JSON") from None
        if not isinstance(doc, dict) or set(doc) - {"url", "secret"} or "url" not in doc:
            raise _invalid('the body is {"url": ..., "secret": ... (optional)}')
        url = doc["url"]
        if not isinstance(url, str):
            raise _invalid("url must be a string")
        try:
            check_url(url, allow_private=cfg.webhooks.allow_private)
        except ValueError as exc:
            raise _invalid(str(exc)) from None
        secret = doc.get("secret")
        if secret is None:
            secret = "whsec_" + secrets.token_urlsafe(32)
        elif (
            not isinstance(secret, str)
            or not 16 <= len(secret) <= 128
            or not set(secret) <= _SECRET_CHARS
        ):
            raise _invalid("secret: 16 to 128 printable ASCII characters without spaces")
        db = _db(request)
        existed = await hooks.get_webhook(db, mailbox) is not None
        now = clk.now()
        await hooks.set_webhook(db, mailbox, url, secret, now)
        return JSONResponse(
            {"url": url, "secret": secret, "created_at": now.isoformat(), "events": _EVENTS},
            status_code=200 if existed else 201,
        )

    async def webhook_delete(request: Request) -> Response:
        mailbox = await _mailbox(request)
        if not await hooks.delete_webhook(_db(request), mailbox):
            raise _not_found("this mailbox has no webhook")
        return Response(status_code=204)

    async def openapi(_request: Request) -> Response:
        return JSONResponse(OPENAPI)

    routes: list[BaseRoute] = [
        Route(f"{PREFIX}/messages", _problems(send), methods=["POST"]),
        Route(f"{PREFIX}/messages/{{id:str}}", _problems(status), methods=["GET"]),
        Route(f"{PREFIX}/transmissions", _problems(lookup), methods=["GET"]),
        Route(f"{PREFIX}/folders", _problems(folders), methods=["GET"]),
        Route(f"{PREFIX}/folders/{{folder:path}}/messages", _problems(messages), methods=["GET"]),
        Route(
            f"{PREFIX}/folders/{{folder:path}}/messages/{{uid:int}}",
            _problems(message),
            methods=["GET"],
        ),
        Route(f"{PREFIX}/webhook", _problems(webhook_get), methods=["GET"]),
        Route(f"{PREFIX}/webhook", _problems(webhook_put), methods=["PUT"]),
        Route(f"{PREFIX}/webhook", _problems(webhook_delete), methods=["DELETE"]),
        Route(f"{PREFIX}/openapi.json", openapi, methods=["GET"]),
    ]
    known = list(routes)

    async def unknown(request: Request) -> Response:
        """Anything else under /api/v1: a 405 for a known path, else a 404, as problems."""
        allowed = sorted(
            {
                m
                for r in known
                if isinstance(r, Route) and r.matches(request.scope)[0] is Match.PARTIAL
                for m in (r.methods or ())
            }
        )
        if allowed:
            raise Problem(
                405,
                "method-not-allowed",
                "Method not allowed",
                f"{request.method} is not allowed here: {', '.join(allowed)}",
                headers={"Allow": ", ".join(allowed)},
            )
        raise _not_found(f"no such API resource: {request.url.path}")

    every_method = ["GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"]
    routes.append(Route(f"{PREFIX}/{{rest:path}}", _problems(unknown), methods=every_method))
    routes.append(Route(PREFIX, _problems(unknown), methods=every_method))
    return routes


# --- the OpenAPI document -----------------------------------------------------------------------

_EVENTS = list(hooks.EVENT_TYPES)


def _problem_schema() -> dict[str, Any]:
    return {
        "description": "RFC 9457 problem details",
        "content": {PROBLEM: {"schema": {"$ref": "#/components/schemas/Problem"}}},
    }


def _json(ref: str, description: str) -> dict[str, Any]:
    return {
        "description": description,
        "content": {"application/json": {"schema": {"$ref": f"#/components/schemas/{ref}"}}},
    }


def _problems_for(*statuses: int) -> dict[str, Any]:
    return {str(s): _problem_schema() for s in statuses}


_NULLABLE_STR = {"type": ["string", "null"]}
_RECEIPT = {
    "receipt": {
        "description": "where the receipt is in the mailbox (null: not there)",
        "oneOf": [{"$ref": "#/components/schemas/ReceiptRef"}, {"type": "null"}],
    },
    "receipt_url": {"type": ["string", "null"], "description": "download it as .eml"},
}
_FOLDER_PARAM = {
    "name": "folder",
    "in": "path",
    "required": True,
    "description": "an IMAP folder name (INBOX, Sent, A/B)",
    "schema": {"type": "string", "maxLength": _MAX_FOLDER},
}

OPENAPI: dict[str, Any] = {
    "openapi": "3.1.0",
    "info": {
        "title": "pecd REST API",
        "version": "1",
        "description": "Send PEC messages and follow their receipts; read the mailbox; receive "
        "transmission events by webhook. Authenticate with a mailbox's API token "
        "(pecd mailbox token create) as a bearer token: every resource is the token's mailbox's "
        "own, anything else is 404. Errors are RFC 9457 problem details.",
    },
    "servers": [{"url": "/"}],
    "security": [{"bearer": []}],
    "components": {
        "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}},
        "schemas": {
            "Problem": {
                "type": "object",
                "properties": {
                    "type": {"type": "string", "format": "uri"},
                    "title": {"type": "string"},
                    "status": {"type": "integer"},
                    "detail": {"type": "string"},
                },
                "required": ["type", "title", "status"],
            },
            "Attachment": {
                "type": "object",
                "additionalProperties": False,
                "properties": {
                    "filename": {"type": "string", "minLength": 1, "maxLength": 255},
                    "content_type": {"type": "string", "default": "application/octet-stream"},
                    "content_base64": {"type": "string", "contentEncoding": "base64"},
                },
                "required": ["filename", "content_base64"],
            },
            "Submission": {
                "type": "object",
                "additionalProperties": False,
                "description": "There is no bcc: PEC forbids blind copies.",
                "properties": {
                    "to": {
                        "type": "array",
                        "items": {"type": "string", "format": "email"},
                        "minItems": 1,
                    },
                    "cc": {"type": "array", "items": {"type": "string", "format": "email"}},
                    "subject": {"type": "string", "maxLength": _MAX_SUBJECT},
                    "body": {"type": "string", "description": "plain text"},
                    "attachments": {
                        "type": "array",
                        "maxItems": _MAX_ATTACHMENTS,
                        "items": {"$ref": "#/components/schemas/Attachment"},
                    },
                    "receipt": {
                        "type": "string",
                        "enum": ["completa", "breve", "sintetica"],
                        "default": "completa",
                    },
                    "client_key": {
                        "type": "string",
                        "maxLength": _MAX_CLIENT_KEY,
                        "description": "idempotency key: the same key twice makes one transmission",
                    },
                },
                "required": ["to"],
            },
            "FormSubmission": {
                "type": "object",
                "description": "The Submission as a form: to and cc repeated or comma-separated, "
                "each file of attachments an attachment (its part's Content-Type its type).",
                "properties": {
                    "to": {"type": "array", "items": {"type": "string"}, "minItems": 1},
                    "cc": {"type": "array", "items": {"type": "string"}},
                    "subject": {"type": "string", "maxLength": _MAX_SUBJECT},
                    "body": {"type": "string"},
                    "receipt": {"type": "string", "enum": ["completa", "breve", "sintetica"]},
                    "client_key": {"type": "string", "maxLength": _MAX_CLIENT_KEY},
                    "attachments": {
                        "type": "array",
                        "maxItems": _MAX_ATTACHMENTS,
                        "items": {"type": "string", "format": "binary"},
                    },
                },
                "required": ["to"],
            },
            "Submitted": {
                "type": "object",
                "properties": {
                    "id": {"type": "string"},
                    "status_url": {"type": "string"},
                    "message_id": {
                        **_NULLABLE_STR,
                        "description": "the Message-ID of the message built (the client "
                        "msgid); null when the client_key was taken in before",
                    },
                },
                "required": ["id", "status_url"],
            },
            "ReceiptRef": {
                "type": "object",
                "properties": {"folder": {"type": "string"}, "uid": {"type": "integer"}},
                "required": ["folder", "uid"],
            },
            "RecipientStatus": {
                "type": "object",
                "properties": {
                    "address": {"type": "string"},
                    "tipo": {"type": ["string", "null"], "enum": ["certificato", "esterno", None]},
                    "status": {
                        "type": "string",
                        "enum": [
                            "accettazione",
                            "non-accettazione",
                            "presa-in-carico",
                            "preavviso-errore-consegna",
                            "avvenuta-consegna",
                            "errore-consegna",
                        ],
                    },
                    "at": {"type": ["string", "null"], "format": "date-time"},
                    "error": _NULLABLE_STR,
                    **_RECEIPT,
                },
            },
            "TransmissionEvent": {
                "type": "object",
                "properties": {
                    "event": {"type": "string"},
                    "at": {"type": ["string", "null"], "format": "date-time"},
                    "recipients": {"type": "array", "items": {"type": "string"}},
                    "error": _NULLABLE_STR,
                    **_RECEIPT,
                },
            },
            "Transmission": {
                "type": "object",
                "properties": {
                    "id": {"type": "string"},
                    "status": {"type": "string", "enum": ["queued", "accepted", "not-accepted"]},
                    "pec_msgid": {"type": "string"},
                    "client_msgid": _NULLABLE_STR,
                    "subject": _NULLABLE_STR,
                    "accepted_at": {"type": ["string", "null"], "format": "date-time"},
                    "error": _NULLABLE_STR,
                    "recipients": {
                        "type": "array",
                        "items": {"$ref": "#/components/schemas/RecipientStatus"},
                    },
                    "events": {
                        "type": "array",
                        "items": {"$ref": "#/components/schemas/TransmissionEvent"},
                    },
                    **_RECEIPT,
                },
                "required": ["id", "status", "recipients"],
            },
            "Folders": {
                "type": "object",
                "properties": {
                    "folders": {
                        "type": "array",
                        "items": {
                            "type": "object",
                            "properties": {
                                "name": {"type": "string"},
                                "messages_url": {"type": "string"},
                            },
                        },
                    }
                },
            },
            "MessageSummary": {
                "type": "object",
                "properties": {
                    "uid": {"type": "integer"},
                    "size": {"type": "integer"},
                    "kind": {
                        "type": ["string", "null"],
                        "description": "the PEC kind the outer headers announce (X-Ricevuta, "
                        "X-Trasporto; not verified): a receipt kind, posta-certificata, "
                        "anomalia, or null",
                        "enum": [
                            *[r.value for r in Ricevuta],
                            "posta-certificata",
                            "anomalia",
                            None,
                        ],
                    },
                    "subject": _NULLABLE_STR,
                    "from": _NULLABLE_STR,
                    "to": _NULLABLE_STR,
                    "date": _NULLABLE_STR,
                    "message_id": _NULLABLE_STR,
                    "url": {"type": "string", "description": "download as .eml"},
                },
                "required": ["uid", "size", "url"],
            },
            "MessagePage": {
                "type": "object",
                "properties": {
                    "folder": {"type": "string"},
                    "uid_validity": {"type": "integer"},
                    "total": {"type": "integer"},
                    "messages": {
                        "type": "array",
                        "items": {"$ref": "#/components/schemas/MessageSummary"},
                        "description": "newest (highest UID) first",
                    },
                    "next": {**_NULLABLE_STR, "description": "the next page's URL"},
                },
            },
            "WebhookSet": {
                "type": "object",
                "additionalProperties": False,
                "properties": {
                    "url": {"type": "string", "maxLength": 2048, "description": "https or http"},
                    "secret": {
                        "type": "string",
                        "minLength": 16,
                        "maxLength": 128,
                        "description": "the HMAC key; made by the server when not given",
                    },
                },
                "required": ["url"],
            },
            "Webhook": {
                "type": "object",
                "properties": {
                    "url": {"type": "string"},
                    "secret": {"type": "string", "description": "only in the answer to PUT"},
                    "created_at": {"type": "string", "format": "date-time"},
                    "events": {"type": "array", "items": {"type": "string", "enum": _EVENTS}},
                },
                "required": ["url", "created_at"],
            },
            "WebhookEvent": {
                "type": "object",
                "description": "What a webhook receives: POSTed as JSON with the headers "
                "X-Pecd-Signature: t=<unix time>,v1=<hex HMAC-SHA256 of '<t>.<body>' under the "
                "secret>, X-Pecd-Event-Id (the id, for deduplication: an event may come twice) "
                "and X-Pecd-Event (the type). Any 2xx is success; anything else is retried with "
                "backoff.",
                "properties": {
                    "id": {"type": "string"},
                    "type": {"type": "string", "enum": _EVENTS},
                    "mailbox": {"type": "string"},
                    "transmission": {**_NULLABLE_STR, "description": "the id POST gave"},
                    "pec_msgid": {"type": "string"},
                    "client_msgid": _NULLABLE_STR,
                    "recipient": {
                        **_NULLABLE_STR,
                        "description": "delivered/failed: the recipient; else null",
                    },
                    "recipients": {"type": "array", "items": {"type": "string"}},
                    "at": {"type": "string", "format": "date-time"},
                    "error": _NULLABLE_STR,
                },
                "required": ["id", "type", "mailbox", "pec_msgid", "at"],
            },
        },
    },
    "webhooks": {
        "transmission-event": {
            "post": {
                "summary": "A transmission event of the mailbox (see PUT /api/v1/webhook)",
                "requestBody": {
                    "content": {
                        "application/json": {
                            "schema": {"$ref": "#/components/schemas/WebhookEvent"}
                        }
                    }
                },
                "responses": {"2XX": {"description": "received"}},
            }
        }
    },
    "paths": {
        f"{PREFIX}/messages": {
            "post": {
                "summary": "Send a PEC message",
                "requestBody": {
                    "required": True,
                    "content": {
                        "application/json": {"schema": {"$ref": "#/components/schemas/Submission"}},
                        "multipart/form-data": {
                            "schema": {"$ref": "#/components/schemas/FormSubmission"}
                        },
                    },
                },
                "responses": {
                    "202": _json("Submitted", "taken in: the accettazione follows"),
                    "200": _json("Submitted", "already taken in with this client_key"),
                    **_problems_for(401, 413, 415, 422),
                    "503": {
                        **_problem_schema(),
                        "description": "problem kind insufficient-storage: the provider's "
                        "storage is full (SMTP's 452 4.3.1). Nothing was taken in and the "
                        "client_key is not used up: send the same request again after "
                        "Retry-After seconds",
                        "headers": {
                            "Retry-After": {
                                "description": "seconds to wait before sending it again",
                                "schema": {"type": "integer", "example": RETRY_AFTER},
                            }
                        },
                    },
                },
            }
        },
        f"{PREFIX}/messages/{{id}}": {
            "get": {
                "summary": "A transmission's status, per recipient, with its receipts",
                "parameters": [
                    {"name": "id", "in": "path", "required": True, "schema": {"type": "string"}}
                ],
                "responses": {
                    "200": _json("Transmission", "what the trace log says of it"),
                    **_problems_for(401, 404),
                },
            }
        },
        f"{PREFIX}/transmissions": {
            "get": {
                "summary": "A transmission by its id, its PEC msgid or the client's Message-ID",
                "description": "Exactly one of the parameters. Message-IDs with or without <>.",
                "parameters": [
                    {"name": n, "in": "query", "required": False, "schema": {"type": "string"}}
                    for n in ("id", "pec_msgid", "client_msgid")
                ],
                "responses": {
                    "200": _json("Transmission", "what the trace log says of it"),
                    **_problems_for(400, 401, 404),
                },
            }
        },
        f"{PREFIX}/folders": {
            "get": {
                "summary": "The mailbox's folders",
                "responses": {"200": _json("Folders", "INBOX first"), **_problems_for(401)},
            }
        },
        f"{PREFIX}/folders/{{folder}}/messages": {
            "get": {
                "summary": "A page of a folder's messages, newest first",
                "parameters": [
                    _FOLDER_PARAM,
                    {
                        "name": "limit",
                        "in": "query",
                        "schema": {
                            "type": "integer",
                            "minimum": 1,
                            "maximum": _PAGE_MAX,
                            "default": _PAGE_DEFAULT,
                        },
                    },
                    {
                        "name": "before",
                        "in": "query",
                        "description": "only messages with a lower UID (the next page)",
                        "schema": {"type": "integer", "minimum": 1},
                    },
                ],
                "responses": {
                    "200": _json("MessagePage", "the page"),
                    **_problems_for(400, 401, 404, 422, 503),
                },
            }
        },
        f"{PREFIX}/folders/{{folder}}/messages/{{uid}}": {
            "get": {
                "summary": "Download a message or receipt as .eml",
                "parameters": [
                    _FOLDER_PARAM,
                    {
                        "name": "uid",
                        "in": "path",
                        "required": True,
                        "schema": {"type": "integer", "minimum": 1},
                    },
                ],
                "responses": {
                    "200": {
                        "description": "the message, byte for byte",
                        "content": {"message/rfc822": {"schema": {"type": "string"}}},
                    },
                    **_problems_for(401, 404, 422),
                },
            }
        },
        f"{PREFIX}/webhook": {
            "get": {
                "summary": "The mailbox's webhook (without its secret)",
                "responses": {"200": _json("Webhook", "set"), **_problems_for(401, 404)},
            },
            "put": {
                "summary": "Set the mailbox's webhook; the answer shows the secret, once",
                "requestBody": {
                    "required": True,
                    "content": {
                        "application/json": {"schema": {"$ref": "#/components/schemas/WebhookSet"}}
                    },
                },
                "responses": {
                    "201": _json("Webhook", "set"),
                    "200": _json("Webhook", "replaced"),
                    **_problems_for(401, 413, 422),
                },
            },
            "delete": {
                "summary": "Remove the mailbox's webhook",
                "responses": {"204": {"description": "removed"}, **_problems_for(401, 404)},
            },
        },
        f"{PREFIX}/openapi.json": {
            "get": {
                "summary": "This document",
                "security": [],
                "responses": {"200": {"description": "OpenAPI 3.1"}},
            }
        },
    },
}
