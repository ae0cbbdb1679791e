"""pymap's maildir mailboxes with their UIDs kept by ``pecd.mailbox.uidlist``.

pymap (0.36.7) keeps ``dovecot-uidlist`` with its own ``UidList``, which does not keep the rules
Dovecot and pecd's POP3 rely on:

* it takes the ``N`` (next UID) header as the truth: Dovecot appends records without rewriting
  the header, so ``N`` may be below the UIDs listed, and pymap gives a new file a UID that is
  already listed (the record of the older message is replaced: its UID now names another file)
  with UIDVALIDITY unchanged; a client holding the old UID then reads another message's bytes;
* unlisted files get UIDs in directory-listing order, not arrival order;
* its lock is an empty ``dovecot-uidlist.lock`` and the new list is written to a temporary file
  in ``/tmp`` and renamed over the list: a cross-device rename fails when /tmp is another file
  system, and readers that see the lock wait while Dovecot's protocol has the list in the lock;
* it writes ``key:info`` (the flags at that moment) as the record's file name; Dovecot writes
  the base name.

These classes route every UID read and write through ``pecd.mailbox.uidlist`` instead:
``reset``, the record lookups (``_get_maildir_msg``), ``messages``, ``move``, ``delete``,
``claim_recent``, ``cleanup`` and the ``_add_record`` that APPEND and COPY use, and the
mailbox id (the list's GUID) in ``MailboxSet``.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import os
import time
from collections.abc import AsyncIterable, Iterable, Mapping
from mailbox import MaildirMessage
from pathlib import Path
from typing import Any

from pymap.backend.maildir.mailbox import MailboxData, MailboxSet, Maildir, Message
from pymap.backend.maildir.uidlist import Record
from pymap.exceptions import MailboxHasChildren, ResponseError
from pymap.parsing.response import ResponseCode, ResponseNo
from pymap.parsing.specials import ObjectId
from pymap.selected import SelectedMailbox

from pecd.mailbox import uidlist
from pecd.mailbox.uidlist import Listing

__all__ = ["ExpungedMeanwhile", "UidListMailboxData", "UidListMailboxSet", "mailbox_id_of"]


class ExpungedMeanwhile(ResponseError):
    """A message just stored (APPEND, COPY, MOVE) was expunged by another session before its
    UID was listed: ``NO [EXPUNGEISSUED]`` (RFC 5530)."""

    def get_response(self, tag: bytes) -> ResponseNo:
        return ResponseNo(
            tag, b"The message was expunged by another session.", ResponseCode.of(b"EXPUNGEISSUED")
        )


def _info_of(path: Path) -> str:
    name = path.name
    return name.split(":", 1)[1] if ":" in name else ""


def _record(entry: uidlist.Entry) -> Record:
    info = _info_of(entry.path)
    return Record(entry.uid, dict(entry.fields), entry.name + (":" + info if info else ""))


async def mailbox_id_of(path: str | Path) -> ObjectId:
    """The mailbox id of a folder: its uidlist's GUID (the list is made when missing)."""
    listing = await asyncio.to_thread(uidlist.sync, Path(path))
    return ObjectId(listing.guid.encode("ascii"))


class UidListMailboxData(MailboxData):
    """pymap's MailboxData whose UIDs come from ``pecd.mailbox.uidlist``."""

    _listing: Listing | None = None

    # What the folder looked like when _listing was made (see _unchanged), and when it was made.
    _stamp: tuple[int, ...] | None = None
    _listed_at: float = 0.0
    # The messages made by the last messages(), by (UID, file path).
    _built: dict[tuple[int, str], Message] | None = None

    def _folder_stamp(self) -> tuple[int, ...] | None:
        """mtime of new/ and cur/ and mtime and size of the list, or None if one is missing."""
        folder = Path(self._path)
        try:
            new = os.stat(folder / "new").st_mtime_ns
            cur = os.stat(folder / "cur").st_mtime_ns
            ul = os.stat(folder / uidlist.FILE_NAME)
        except OSError:
            return None
        return (new, cur, ul.st_mtime_ns, ul.st_size)

    def _unchanged(self, stamp: tuple[int, ...] | None) -> bool:
        """True when nothing was added, removed or renamed in the folder since ``_listing``.

        A directory's mtime changes with every file linked, renamed or removed in it, but only
        as finely as the kernel's clock tick: two changes within one tick leave the same mtime.
        So an unchanged stamp is trusted only when the folder's last change is more than a
        second older than the listing (as Dovecot does with its own mtime checks)."""
        if stamp is None or stamp != self._stamp or self._listing is None:
            return False
        newest = max(stamp[0], stamp[1], stamp[2]) / 1e9
        return newest < self._listed_at - 1.0

    async def _sync(self, fields: Mapping[str, Mapping[str, str]] | None = None) -> Listing:
        if fields is None and self._listing is not None:
            stamp = self._folder_stamp()
            if self._unchanged(stamp):
                return self._listing
        listed_at = time.time()
        listing = await asyncio.to_thread(uidlist.sync, Path(self._path), fields=fields)
        # The stamp after the sync: a sync that rewrote the list changed its mtime.
        self._stamp = self._folder_stamp()
        self._listed_at = listed_at
        self._listing = listing
        self._uid_validity = listing.uid_validity
        self._next_uid = listing.next_uid
        return listing

    def _metadata(self, entry: uidlist.Entry) -> MaildirMessage:
        """pymap's message metadata from the listing's path, without looking the file up again:
        its subdirectory and flags are in its path, its INTERNALDATE is its mtime."""
        path = entry.path
        meta = MaildirMessage()
        meta.set_subdir("new" if path.parent.name == "new" else "cur")
        info = _info_of(path)
        if info:
            meta.set_info(info)
        meta.set_date(path.stat().st_mtime)
        return meta

    async def _entry(self, uid: int) -> uidlist.Entry:
        """The entry of ``uid``; KeyError when it is not (or no longer) in the folder."""
        listing = self._listing
        if listing is not None:
            entry = listing.by_uid().get(uid)
            if entry is not None:
                return entry
        entry = (await self._sync()).by_uid().get(uid)
        if entry is None:
            raise KeyError(uid)
        return entry

    async def reset(self) -> MailboxData:
        await self._sync()
        return self

    async def _add_record(self, key: str, info: str, fields: dict[str, str]) -> Record:
        """The UID of a file just stored under base name ``key`` (APPEND, COPY, MOVE)."""
        listing = await self._sync({key: fields})
        entry = listing.by_name().get(key)
        if entry is None:
            # Expunged by another session before it got its UID listed: there is no UID to
            # answer with (guessing one could name another message).
            raise ExpungedMeanwhile()
        return _record(entry)

    async def _get_maildir_msg(self, uid: int) -> tuple[Record, Any]:
        entry = await self._entry(uid)
        async with self.messages_lock.read_lock():
            meta = self._maildir.get_message_metadata(entry.name)
        return _record(entry), meta

    async def messages(self) -> AsyncIterable[Message]:
        """Every message of the folder (pymap compares them with what the client saw, at every
        command). A message object is reused while its UID and file name stay the same: the
        name carries its subdirectory and flags, and pymap never changes a message it was given,
        so only what was added, renamed or removed since the last call costs a lookup."""
        listing = await self._sync()
        maildir = self._maildir
        previous = self._built or {}
        built: dict[tuple[int, str], Message] = {}
        async with self.messages_lock.read_lock():
            for n, entry in enumerate(listing.entries):
                if n % 512 == 511:
                    # A large folder: let other sessions (and the heartbeat) have the loop.
                    await asyncio.sleep(0)
                ident = (entry.uid, str(entry.path))
                msg = previous.get(ident)
                if msg is None:
                    try:
                        meta = self._metadata(entry)
                    except FileNotFoundError:
                        # Renamed (flags) or expunged by another session since the listing.
                        try:
                            meta = maildir.get_message_metadata(entry.name)
                        except (KeyError, FileNotFoundError):
                            continue
                    record = _record(entry)
                    msg = Message.from_maildir(
                        entry.uid,
                        meta,
                        maildir,
                        entry.name,
                        self._get_object_id(record, "E"),
                        self._get_object_id(record, "T"),
                        self.maildir_flags,
                    )
                built[ident] = msg
                yield msg
        self._built = built

    async def move(self, uid: int, destination: MailboxData, *, recent: bool = False) -> int | None:
        if not isinstance(destination, UidListMailboxData):  # pragma: no cover - one backend
            raise TypeError(destination)
        try:
            entry = await self._entry(uid)
        except KeyError:
            return None
        dest_maildir: Maildir = destination._maildir
        async with destination.messages_lock.write_lock(), self.messages_lock.write_lock():
            try:
                new_name = self._maildir.move_message(
                    entry.name, dest_maildir, "new" if recent else "cur"
                )
            except (KeyError, FileNotFoundError):
                return None
        key, _, info = new_name.partition(":")
        record = await destination._add_record(key, info, dict(entry.fields))
        return record.uid

    async def delete(self, uids: Iterable[int]) -> None:
        wanted = set(uids)
        listing = self._listing
        if listing is None or not wanted <= listing.by_uid().keys():
            listing = await self._sync()
        async with self.messages_lock.write_lock():
            for entry in listing.entries:
                if entry.uid in wanted:
                    with contextlib.suppress(KeyError, FileNotFoundError):
                        self._maildir.remove(entry.name)

    async def claim_recent(self, selected: SelectedMailbox) -> None:
        # UIDs first: the files of new/ get theirs in arrival order before they move to cur/.
        await self._sync()
        async with self.messages_lock.write_lock():
            keys = set(self._maildir.claim_new())
        listing = await self._sync()
        for entry in listing.entries:
            if entry.name in keys:
                selected.session_flags.add_recent(entry.uid)

    async def cleanup(self) -> None:
        self._maildir.clean()
        await self._sync()


class UidListMailboxSet(MailboxSet):
    """pymap's MailboxSet whose new folders get their list from ``pecd.mailbox.uidlist``."""

    async def add_mailbox(self, name: str) -> ObjectId:
        try:
            self._layout.add_folder(name, self.delimiter)
        except FileExistsError as exc:
            raise KeyError(name) from exc
        except OSError as exc:  # pragma: no cover - as pymap
            if exc.errno == errno.ENOTEMPTY:
                raise MailboxHasChildren(name) from exc
            raise
        return await mailbox_id_of(self._layout.get_path(name, self.delimiter))
