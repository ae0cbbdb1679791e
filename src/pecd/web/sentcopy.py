"""The copy in "Sent" of a message written in the webmail, as a mail client's IMAP APPEND makes it.

A mail client that sends through SMTP keeps its own copy by APPENDing the message to the
mailbox's Sent folder; the webmail does the same on the server side, once the message is taken
in (:func:`pecd.web.submit.submit` has committed its job). The folder is :data:`SENT`, the one
both IMAP servers pecd can run list with the ``\\Sent`` special-use attribute (pecd's own,
``pecd.imap.state.SPECIAL_USE``; Dovecot's, as ``pecd init`` configures it) and that every
mailbox is created with (``pecd.mailbox.maildir.FOLDERS``).

The copy's delivery key derives from the intake key, so a submission retried with the same
client key (Send pressed twice, a reload of the POST) finds the copy it already made and makes
no second one. Its bytes are those of the job taken in: a retry builds its message anew (another
Message-ID, other MIME boundaries) and finds the job made by the first, so
:func:`sent_message` reads the message back from that job while it still holds it. It is stored as a client stores it: marked ``\\Seen`` (moved into ``cur/`` with
the ``S`` flag, as an IMAP server does when it takes a new file over), and subject to the
mailbox's quota as an APPEND is; over quota, no copy is made (the transmission stands: the
accettazione and the receipts are the legal proof, and they arrive whatever the quota).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from dataclasses import dataclass
from pathlib import Path

from sqlalchemy import select

from pecd.mailbox.maildir import FOLDERS, MailboxFull, MaildirStore
from pecd.store.db import Database
from pecd.store.models import Job
from pecd.web.submit import Submitted

__all__ = [
    "SENT",
    "SentCopy",
    "save_sent_copy",
    "sent_key",
    "sent_message",
    "store_sent_copy",
    "without_first_field",
]

log = logging.getLogger(__name__)

#: The IMAP name of the Sent folder (special-use ``\Sent``).
SENT = "Sent"
assert SENT in FOLDERS

_SEEN_SUFFIX = ":2,S"


@dataclass(frozen=True, slots=True)
class SentCopy:
    """Where the copy is, and whether this call made it (False: an earlier call had)."""

    path: Path
    created: bool


def sent_key(intake_key: str) -> str:
    """The Maildir delivery key of the Sent copy of the submission ``intake_key``."""
    return f"sent-copy:{intake_key}"


def without_first_field(data: bytes) -> bytes:
    """``data`` without its first header field (the ``Received:`` the intake put in front),
    continuation lines included."""
    end = 0
    while True:
        nl = data.find(b"\n", end)
        if nl < 0:
            return data
        end = nl + 1
        if data[end : end + 1] not in (b" ", b"\t"):
            return data[end:]


async def sent_message(db: Database, submitted: Submitted) -> bytes:
    """The message to keep in Sent for ``submitted``: the one its job holds (a repeated
    submission built one of its own, which was not taken in), else the one it built."""
    if submitted.created:
        return submitted.message
    async with db.read_session() as s:
        data = await s.scalar(select(Job.data).where(Job.key == submitted.key))
    return without_first_field(data) if data else submitted.message


def store_sent_copy(
    store: MaildirStore,
    mailbox: str,
    intake_key: str,
    message: bytes,
    *,
    quota_bytes: int | None = None,
) -> SentCopy:
    """Store ``message`` in ``mailbox``'s Sent folder, once per ``intake_key``, marked seen.
    Synchronous (file system work: call it in a thread); raises MailboxFull over the quota."""
    delivered = store.deliver(
        mailbox, sent_key(intake_key), message, folder=SENT, quota_bytes=quota_bytes
    )
    if not delivered.created or delivered.path.parent.name != "new":
        return SentCopy(delivered.path, delivered.created)
    seen = delivered.path.parent.parent / "cur" / (delivered.path.name + _SEEN_SUFFIX)
    # An IMAP server may take the file over (new/ -> cur/) first: then it is where it put it.
    with contextlib.suppress(FileNotFoundError):
        os.rename(delivered.path, seen)
        return SentCopy(seen, True)
    return SentCopy(delivered.path, True)


async def save_sent_copy(
    store: MaildirStore,
    mailbox: str,
    intake_key: str,
    message: bytes,
    *,
    quota_bytes: int | None = None,
) -> SentCopy | None:
    """:func:`store_sent_copy` in a worker thread; None (logged) when the mailbox is over its
    quota or the copy cannot be written: the message has been taken in all the same."""
    try:
        return await asyncio.to_thread(
            store_sent_copy, store, mailbox, intake_key, message, quota_bytes=quota_bytes
        )
    except MailboxFull as exc:
        log.warning("no copy in %s of %s: %s", SENT, intake_key, exc)
    except OSError as exc:
        log.error("no copy in %s of %s: cannot write it: %s", SENT, intake_key, exc)
    return None
