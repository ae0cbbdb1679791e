"""The REST API for software, under ``/api/v1``: send a PEC, follow its transmission.

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

Requests authenticate with ``Authorization: Bearer <token>`` (``pecd mailbox token create``);
every error is an RFC 9457 problem details document (``application/problem+json``).

What a POST commits is what the SMTP access point commits: a SUBMISSION job with the message
(a ``Received:`` field in front) and an :class:`IntakePayload` whose ``user`` is the token's
mailbox; the pipeline then checks it, accepts or refuses it, and the accettazione reaches the
mailbox as for any client. The job's key is the id the API hands back; the status of an id is
read from the trace log (the accettazione carries ``data.intake`` = that key).
"""

from __future__ import annotations

import base64
import binascii
import json
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import BaseRoute, Route

from pecd.clock import Clock, SystemClock
from pecd.config import Config, LimitsConfig
from pecd.pec.address import normalize_address, valid_address
from pecd.pec.vocab import TipoRicevuta
from pecd.store.db import Database
from pecd.store.tokens import Tokens
from pecd.web.status import transmission_status
from pecd.web.submit import Attachment, SubmitError, submit

PREFIX = "/api/v1"
PROBLEM = "application/problem+json"
_PROBLEM_BASE = "https://pecd.example/problems/"  # not dereferenced: names a problem kind
_FIELDS = {"to", "cc", "subject", "body", "attachments", "receipt", "client_key"}
_MAX_CLIENT_KEY = 200
_MAX_SUBJECT = 998


class Problem(Exception):
    """An error answered as problem details."""

    def __init__(self, status: int, kind: str, title: str, detail: str) -> None:
        super().__init__(detail)
        self.status, self.kind, self.title, self.detail = status, kind, title, detail

    def response(self) -> Response:
        body = {
            "type": _PROBLEM_BASE + self.kind,
            "title": self.title,
            "status": self.status,
            "detail": self.detail,
        }
        headers = {"WWW-Authenticate": 'Bearer realm="pecd"'} if self.status == 401 else None
        return JSONResponse(body, status_code=self.status, media_type=PROBLEM, headers=headers)


def _invalid(detail: str) -> Problem:
    return Problem(422, "invalid-request", "The request is not a valid PEC submission", detail)


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


async def _read_body(request: Request, limit: int) -> bytes:
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise Problem(413, "too-large", "Request too large", f"the request exceeds {limit} bytes")
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise Problem(
                413, "too-large", "Request too large", f"the request exceeds {limit} bytes"
            )
        chunks.append(chunk)
    return b"".join(chunks)


def _str(doc: dict[str, Any], name: str, default: str | None = None) -> str:
    value = doc.get(name, default)
    if not isinstance(value, str):
        raise _invalid(f"{name} must be a string")
    return value


def _addresses(doc: dict[str, Any], name: str, required: bool) -> list[str]:
    value = doc.get(name, [])
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


def _attachments(doc: dict[str, Any]) -> list[tuple[str, str, str, bytes]]:
    value = doc.get("attachments", [])
    if not isinstance(value, list):
        raise _invalid("attachments must be a list")
    out = []
    for i, a in enumerate(value):
        if not isinstance(a, dict) or set(a) - {"filename", "content_type", "content_base64"}:
            raise _invalid(f"attachments[{i}]: filename, content_type, content_base64 only")
        filename = _str(a, "filename")
        ctype = _str(a, "content_type", "application/octet-stream").strip().lower()
        maintype, slash, subtype = ctype.partition("/")
        if not filename or any(c in filename for c in "\r\n\0") or len(filename) > 255:
            raise _invalid(f"attachments[{i}]: a file name of 1 to 255 characters on one line")
        if not slash or not maintype.isascii() or not subtype or any(c in ctype for c in " ;\r\n"):
            raise _invalid(f"attachments[{i}]: content_type must be type/subtype")
        try:
            content = base64.b64decode(_str(a, "content_base64"), validate=True)
        except (binascii.Error, ValueError):
            raise _invalid(f"attachments[{i}]: content_base64 is not base64") from None
        out.append((filename, maintype, subtype, content))
    return out


def request_limit(limits: LimitsConfig) -> int:
    """The largest request the API reads: a message at the mail limit, base64-encoded (4 bytes
    of 3) in JSON; the JSON around it and the text fields are bounded by the slack."""
    return limits.max_message_size * 4 // 3 + 256 * 1024


def api_routes(cfg: Config, clock: Clock | None = None) -> list[BaseRoute]:
    """The REST API's routes (see the module's documentation for what the app provides)."""
    clk = clock or SystemClock()
    limits = cfg.limits
    body_limit = request_limit(limits)

    async def send(request: Request) -> Response:
        try:
            mailbox = await _mailbox(request)
            raw_body = await _read_body(request, body_limit)
            try:
                doc = json.loads(raw_body)
            except (ValueError, UnicodeDecodeError):
                raise _invalid("the body is not JSON") from None
            if not isinstance(doc, dict):
                raise _invalid("the body must be a JSON object")
            if "bcc" in {str(k).lower() for k in doc}:
                raise _invalid("PEC has no blind copies: there is no bcc field")
            unknown = sorted(set(doc) - _FIELDS)
            if unknown:
                raise _invalid(f"unknown fields: {', '.join(unknown)}")
            to = _addresses(doc, "to", required=True)
            cc = _addresses(doc, "cc", required=False)
            rcpts = list(dict.fromkeys(to + cc))
            if len(rcpts) > limits.max_recipients:
                raise _invalid(f"at most {limits.max_recipients} recipients")
            subject = _str(doc, "subject", "")
            if any(c in subject for c in "\r\n\0") or len(subject) > _MAX_SUBJECT:
                raise _invalid("subject: one line of at most 998 characters")
            body = _str(doc, "body", "")
            receipt = _str(doc, "receipt", TipoRicevuta.COMPLETA.value)
            if receipt not in {t.value for t in TipoRicevuta}:
                raise _invalid("receipt must be completa, breve or sintetica")
            client_key = doc.get("client_key")
            if client_key is not None and (
                not isinstance(client_key, str) or not 0 < len(client_key) <= _MAX_CLIENT_KEY
            ):
                raise _invalid(f"client_key: a string of 1 to {_MAX_CLIENT_KEY} characters")
            attachments = _attachments(doc)

            peer = request.client.host if request.client else "unknown"
            try:
                done = await submit(
                    _db(request),
                    cfg,
                    clk,
                    mailbox=mailbox,
                    to=to,
                    cc=cc,
                    subject=subject,
                    body=body,
                    attachments=[Attachment(*a) for a in attachments],
                    receipt=receipt,
                    client_key=client_key,
                    peer=peer,
                )
            except SubmitError as e:
                raise Problem(e.status, e.kind, e.title, e.detail) from None
            key, created = done.key, done.created
        except Problem as p:
            return p.response()
        return JSONResponse(
            {"id": key, "status_url": f"{PREFIX}/messages/{key}"},
            status_code=202 if created else 200,
        )

    async def status(request: Request) -> Response:
        try:
            mailbox = await _mailbox(request)
            result = await transmission_status(_db(request), mailbox, key=request.path_params["id"])
            if result is None:
                raise Problem(404, "not-found", "No such transmission", "unknown to this mailbox")
        except Problem as p:
            return p.response()
        return JSONResponse(result)

    async def openapi(_request: Request) -> Response:
        return JSONResponse(OPENAPI)

    return [
        Route(f"{PREFIX}/messages", send, methods=["POST"]),
        Route(f"{PREFIX}/messages/{{id:str}}", status, methods=["GET"]),
        Route(f"{PREFIX}/openapi.json", openapi, methods=["GET"]),
    ]


def _problem_schema() -> dict[str, Any]:
    return {
        "description": "RFC 9457 problem details",
        "content": {PROBLEM: {"schema": {"$ref": "#/components/schemas/Problem"}}},
    }


OPENAPI: dict[str, Any] = {
    "openapi": "3.1.0",
    "info": {
        "title": "pecd REST API",
        "version": "1",
        "description": "Send PEC messages and follow their receipts. Authenticate with a "
        "mailbox's API token (pecd mailbox token create) as a bearer token.",
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
            "Submitted": {
                "type": "object",
                "properties": {"id": {"type": "string"}, "status_url": {"type": "string"}},
                "required": ["id", "status_url"],
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
                    "error": {"type": ["string", "null"]},
                },
            },
            "Transmission": {
                "type": "object",
                "properties": {
                    "id": {"type": "string"},
                    "status": {"type": "string", "enum": ["queued", "accepted", "not-accepted"]},
                    "pec_msgid": {"type": "string"},
                    "client_msgid": {"type": ["string", "null"]},
                    "subject": {"type": ["string", "null"]},
                    "accepted_at": {"type": ["string", "null"], "format": "date-time"},
                    "error": {"type": ["string", "null"]},
                    "recipients": {
                        "type": "array",
                        "items": {"$ref": "#/components/schemas/RecipientStatus"},
                    },
                    "events": {"type": "array", "items": {"type": "object"}},
                },
                "required": ["id", "status", "recipients"],
            },
        },
    },
    "paths": {
        f"{PREFIX}/messages": {
            "post": {
                "summary": "Send a PEC message",
                "requestBody": {
                    "required": True,
                    "content": {
                        "application/json": {"schema": {"$ref": "#/components/schemas/Submission"}}
                    },
                },
                "responses": {
                    "202": {
                        "description": "taken in: the accettazione follows",
                        "content": {
                            "application/json": {
                                "schema": {"$ref": "#/components/schemas/Submitted"}
                            }
                        },
                    },
                    "200": {
                        "description": "already taken in with this client_key",
                        "content": {
                            "application/json": {
                                "schema": {"$ref": "#/components/schemas/Submitted"}
                            }
                        },
                    },
                    "401": _problem_schema(),
                    "413": _problem_schema(),
                    "422": _problem_schema(),
                },
            }
        },
        f"{PREFIX}/messages/{{id}}": {
            "get": {
                "summary": "A transmission's status, per recipient",
                "parameters": [
                    {"name": "id", "in": "path", "required": True, "schema": {"type": "string"}}
                ],
                "responses": {
                    "200": {
                        "description": "what the trace log says of it",
                        "content": {
                            "application/json": {
                                "schema": {"$ref": "#/components/schemas/Transmission"}
                            }
                        },
                    },
                    "401": _problem_schema(),
                    "404": _problem_schema(),
                },
            }
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
