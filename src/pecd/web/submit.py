"""Taking a PEC in from the web (the REST API and the webmail's compose page).

What :func:`submit` commits is what the SMTP access point commits: a SUBMISSION job with the
message (a ``Received:`` field in front) and an :class:`IntakePayload` whose ``user`` is the
mailbox; the pipeline then checks it, accepts or refuses it, and the accettazione reaches the
mailbox as for any client. The job's key is the id handed back (the accettazione carries
``data.intake`` = that key, which ``pecd.web.status`` reads). Nothing is answered before the job
is committed: no success before durable.

Once committed, the job is for the pipeline of the main process. In the web process,
:func:`set_waker` is given the call that tells it so (``pecd.runtime.web_process``); every
:func:`submit` that commits a job makes it (:func:`wake`), so the pipeline takes the job at once
rather than at its next poll. Elsewhere (a test's in-process app) there is no waker and the poll
finds the job.

While the storage is full, nothing is taken in, as at the SMTP access point (its ``452 4.3.1``):
:func:`submit` raises :class:`InsufficientStorage` when the data or Maildir filesystem is below
the threshold the access point's :class:`~pecd.runtime.intake.Intake` watches
(:func:`storage_space`, one probe per process, made on first use), and when its commit failed for
want of space (:func:`no_space`, or the filesystem found full just after). Nothing was committed
then, so a client key given with it is not used up: the same submission sent again once there is
room is taken in, once.

A big message is built off the event loop (``asyncio.to_thread``), so that one request with
100 MB of attachments does not hold up every other client of the process.

:func:`subject_error` is the one check of a subject, for every caller (the compose page, the
REST API): one line, no control character, so that the message can be built at all.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import secrets
import unicodedata
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from email.message import EmailMessage
from email.policy import SMTP
from email.utils import format_datetime, make_msgid
from pathlib import Path
from typing import Any, Final

from pecd.clock import Clock
from pecd.config import Config
from pecd.engine.vocab import IntakePayload, JobKind
from pecd.pec.address import domain_of
from pecd.runtime.diskspace import FreeSpace, connection_lost, no_space, storage_watch
from pecd.runtime.logutil import RateLimitedLog
from pecd.store import jobs
from pecd.store.db import Database

__all__ = [
    "MAX_SUBJECT",
    "RETRY_AFTER",
    "Attachment",
    "InsufficientStorage",
    "SubmitError",
    "Submitted",
    "intake_key",
    "no_space",
    "room",
    "set_waker",
    "storage_space",
    "subject_error",
    "submit",
    "wake",
]

log = logging.getLogger(__name__)

#: Attachments above this many bytes in all are encoded into the message in a worker thread.
OFF_LOOP_BYTES = 256 * 1024

#: The longest subject (characters): a header line's limit (RFC 5322 2.1.1).
MAX_SUBJECT: Final = 998
# Unicode categories no subject may hold: controls (tab apart), line and paragraph separators,
# lone surrogates. Python's email package refuses every line-breaking one in a header, and a
# surrogate cannot be encoded.
_NOT_IN_SUBJECT: Final = frozenset({"Cc", "Zl", "Zp", "Cs"})

#: Seconds a submission refused for want of storage is asked to wait (``Retry-After``). A full
#: disk is cleared by an operator, in minutes rather than seconds; mail servers wait as long
#: before trying a 4xx again (Postfix's ``minimal_backoff_time``).
RETRY_AFTER: Final = 300

_waker: Callable[[], None] | None = None
# The free-space probes of this process, by (paths, threshold): one per configuration.
_spaces: dict[tuple[tuple[Path, ...], int], FreeSpace] = {}
# While the disk is full every submission fails the same way: a line now and then.
_failures = RateLimitedLog()


def subject_error(subject: str) -> str | None:
    """Why ``subject`` cannot be a message's subject (English, for an API's error), or None
    when it can: at most :data:`MAX_SUBJECT` characters, on one line, with no control
    character but tab."""
    if len(subject) > MAX_SUBJECT:
        return f"longer than {MAX_SUBJECT} characters"
    for c in subject:
        if c != "\t" and unicodedata.category(c) in _NOT_IN_SUBJECT:
            return f"it holds a line break or a control character (U+{ord(c):04X})"
    return None


def set_waker(waker: Callable[[], None] | None) -> None:
    """The call that wakes the pipeline's workers once a job is committed (None: none)."""
    global _waker
    _waker = waker


def wake() -> None:
    """Wake the pipeline's workers (a no-op where no waker was set)."""
    if _waker is not None:
        _waker()


@dataclass(frozen=True, slots=True)
class Attachment:
    filename: str
    maintype: str
    subtype: str
    content: bytes


@dataclass(frozen=True, slots=True)
class Submitted:
    key: str  # the intake id (the job's key)
    created: bool  # False: a submission with this client key was already taken in
    message_id: str  # the Message-ID of the message built (the client msgid)
    message: bytes  # the message as submitted, without the Received: field (for a Sent copy)


class SubmitError(Exception):
    """The message cannot be taken in (too large, or no room for it now); ``status`` is the
    HTTP status to answer, ``headers`` any header to answer with it."""

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


class InsufficientStorage(SubmitError):
    """The storage is full: the message is not taken in now, as the SMTP access point answers
    ``452 4.3.1``; nothing was committed, so it may be sent again, with the same client key.

    503 with ``Retry-After`` rather than 507 (RFC 4918's Insufficient Storage, a WebDAV status):
    what the client must do is keep the message and try again later, and 503 with Retry-After is
    what HTTP clients and their retry helpers take for that (curl's ``--retry``, urllib3's
    ``Retry``), while most treat a 507 as one more server failure and give up. The problem's
    kind, ``insufficient-storage``, says why."""

    def __init__(self) -> None:
        super().__init__(
            503,
            "insufficient-storage",
            "Insufficient storage",
            "the provider's storage is full: the message was not taken in; send it again later "
            "(a client_key given with it is not used up)",
            {"Retry-After": str(RETRY_AFTER)},
        )


def storage_space(cfg: Config) -> FreeSpace:
    """The free-space probe of ``cfg``'s storage, made on first use: the filesystems and the
    threshold the SMTP points' Intake watches (:func:`~pecd.runtime.diskspace.storage_watch`),
    so that the web refuses exactly when they do. The web process has no Intake of its own to ask."""
    paths, minimum = storage_watch(cfg)
    space = _spaces.get((paths, minimum))
    if space is None:
        space = _spaces[(paths, minimum)] = FreeSpace(paths, minimum)
    return space


def room(cfg: Config, *, fresh: bool = False) -> bool:
    """Whether the storage has room for a submission now (:func:`storage_space`)."""
    return storage_space(cfg).enough(fresh=fresh)


def _received(hostname: str, peer: str, key: str, rcpt: str, now_text: str, via: str) -> bytes:
    """The ``Received:`` field of this hop, as the SMTP points write theirs."""
    return (
        f"Received: from {via.lower()} ([{peer}])\r\n"
        f"\tby {hostname} (pecd) with HTTPS id {key}\r\n\tfor <{rcpt}>; {now_text}\r\n"
    ).encode()


def intake_key(mailbox: str, client_key: str | None) -> str:
    """The intake id: random, or derived from the mailbox and the client's idempotency key (the
    same key twice names the same job, which is made once)."""
    if client_key is None:
        return "api-" + secrets.token_hex(16)
    digest = hashlib.sha256(f"{mailbox}\0{client_key}".encode()).hexdigest()
    return "api-" + digest[:32]


async def submit(
    db: Database,
    cfg: Config,
    clock: Clock,
    *,
    mailbox: str,
    to: Sequence[str],
    cc: Sequence[str] = (),
    subject: str,
    body: str,
    attachments: Sequence[Attachment] = (),
    receipt: str,
    client_key: str | None = None,
    peer: str,
    via: str = "api",
) -> Submitted:
    """Build the message from checked fields (addresses normalised and valid, ``subject`` one
    :func:`subject_error` passes, ``receipt`` one of completa/breve/sintetica) and commit it as
    a SUBMISSION job; :class:`InsufficientStorage` while the storage is full."""
    space = storage_space(cfg)
    # Refused before the message is built, as the SMTP access point refuses at MAIL FROM.
    if not space.enough():
        raise InsufficientStorage
    limits = cfg.limits
    rcpts = list(dict.fromkeys([*to, *cc]))
    now = clock.now()
    key = intake_key(mailbox, client_key)

    def build() -> tuple[str, bytes, bytes]:
        msg = EmailMessage()
        msg["From"] = mailbox
        msg["To"] = ", ".join(to)
        if cc:
            msg["Cc"] = ", ".join(cc)
        msg["Subject"] = subject
        msg["Date"] = format_datetime(now)
        message_id = make_msgid(via, domain=domain_of(mailbox))
        msg["Message-ID"] = message_id
        msg["X-TipoRicevuta"] = receipt
        msg.set_content(body)
        for a in attachments:
            msg.add_attachment(
                a.content, maintype=a.maintype, subtype=a.subtype, filename=a.filename
            )
        message = msg.as_bytes(policy=SMTP)
        hop = _received(cfg.listeners.hostname, peer, key, rcpts[0], format_datetime(now), via)
        return message_id, message, hop + message

    size = len(body) + sum(len(a.content) for a in attachments)
    if size > OFF_LOOP_BYTES:
        message_id, message, data = await asyncio.to_thread(build)
    else:
        message_id, message, data = build()
    if len(data) > limits.max_message_size:
        raise SubmitError(
            413,
            "too-large",
            "Message too large",
            f"the message is {len(data)} bytes, over {limits.max_message_size}",
        )
    if len(data) * len(rcpts) > limits.max_recipients_times_size:
        raise SubmitError(
            413,
            "too-large",
            "Message too large for its recipients",
            f"size times recipients is over {limits.max_recipients_times_size} bytes",
        )
    payload = IntakePayload(
        mail_from=mailbox, rcpt_to=tuple(rcpts), received_at=now, peer=peer, user=mailbox
    ).to_json()

    def commit(s: Any) -> bool:
        return jobs.enqueue_sync(
            s, kind=JobKind.SUBMISSION, key=key, payload=payload, data=data, now=now
        )

    try:
        created = await db.write(commit)
    except Exception as exc:
        # As the SMTP points' Intake: a commit that failed while the storage is full (read
        # afresh) failed for want of it, whatever the driver made of that; but not a lost
        # connection to the database, after which the commit may have happened ("not taken
        # in" would be a lie, and a resend without a client_key a second message).
        if not no_space(exc) and (space.enough(fresh=True) or connection_lost(exc)):
            raise
        _failures.failure(
            log, "web submission %s not stored for want of space; answering 503", exc, key
        )
        raise InsufficientStorage from exc
    if created:
        wake()
    return Submitted(key=key, created=created, message_id=message_id, message=message)
