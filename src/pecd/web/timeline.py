"""The timeline of a transmission the mailbox holder sent: per recipient, what happened and when
(accettazione, presa in carico, avvenuta consegna or errore, preavvisi), each step linked to its
receipt in the holder's mailbox when the receipt is there.

What happened comes from the trace log (:func:`pecd.web.status.transmission_status`); where the
receipts are comes from the mailbox, read as the IMAP server reads it (folders named as pecd's
IMAP names them, UIDs from ``pecd.mailbox.uidlist``): :class:`MailboxReader` is that reading,
shared by the message pages (``pecd.web.pages.mail``) and the evidence bundle
(``pecd.web.evidence``). A receipt is taken as one of the transmission's by its daticert
``identificativo`` (the PEC msgid, spec section 6), looked at only for the messages that
already point at it: first the files delivered under the keys the trace log names
(:func:`pecd.web.status.transmission_status` locates them by file name, nothing parsed), then,
for the receipts not found so, those whose headers point at it (their Message-ID is one the trace
log gave a receipt of it, or their ``X-Riferimento-Message-ID`` is the client's msgid). Headers
are not signed: anyone who can APPEND to the mailbox can make a message claim to be a receipt of
anything, so the receipts parsed for one view are bounded (:data:`MAX_RECEIPTS`, and no more
header-found ones than receipts the trace log has that were not found by name) and each file's
reading is remembered: the folder is never parsed whole, and a file is parsed once.

Heavy message work (a whole message read and parsed or verified, a bundle made) runs through
:data:`heavy_work`: at most :data:`HEAVY_SLOTS` such jobs at once in the process, whoever asks,
the slot taken before the file is read, so that one holder's many requests queue behind each
other instead of filling memory and every worker thread.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import os
import re
import sys
import threading
import weakref
from collections import OrderedDict
from collections.abc import Callable, Hashable, Iterable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import IO, Any, Final, Generic, ParamSpec, TypeVar

from sqlalchemy import select

from pecd.imap import modutf7
from pecd.mailbox import uidlist
from pecd.mailbox.maildir import DELIMITER, FOLDERS, INBOX, MaildirStore, folder_dir
from pecd.mailbox.uidlist import Entry, Listing
from pecd.pec.address import normalize_address
from pecd.pec.classify import NotMailError, classify
from pecd.pec.msgid import bracket, unbracket
from pecd.pec.timefmt import ROME, format_zona
from pecd.store.db import Database
from pecd.store.models import TraceEvent
from pecd.web.mailview import PecKind, Summary, summarize_head
from pecd.web.sentcopy import SENT, sent_key
from pecd.web.status import receipt_keys, transmission_status

__all__ = [
    "HEAVY_SLOTS",
    "BoundedCache",
    "FolderInfo",
    "HeavyWork",
    "Loaded",
    "MailboxReader",
    "MessageRef",
    "RecipientTimeline",
    "StepView",
    "Timeline",
    "build_timeline",
    "find_transmission_messages",
    "heavy_work",
    "load_timeline",
    "valid_transmission_id",
    "when_text",
]

#: The most bytes read to find a message's header block (a longer header is cut there).
HEAD_BYTES: Final = 64 * 1024
#: The most messages of one folder whose headers a search or a receipt lookup reads.
MAX_SCAN: Final = 5000
#: The most message files parsed in full for one view of a transmission (every attempt counts,
#: whether or not the file turns out to be one of its receipts; a file read before is not parsed
#: again).
MAX_RECEIPTS: Final = 500
#: Folders where receipts are looked for (where they are delivered, and where people file them).
RECEIPT_FOLDERS: Final = (INBOX, "Archive")
#: Header summaries kept in memory (a file's name never changes with its content in Maildir):
#: at most this many, taking at most this many bytes.
_SUMMARY_ITEMS: Final = 50_000
_SUMMARY_BYTES: Final = 40 * 1024 * 1024
#: What the receipts' files say (their daticert, their verdict), remembered by file.
_RECEIPT_ITEMS: Final = 20_000
_RECEIPT_BYTES: Final = 16 * 1024 * 1024
#: Heavy message jobs run at once in the process (see :class:`HeavyWork`). Each may hold a stored
#: message of up to twice the mail limit and a few times that while it is parsed.
HEAVY_SLOTS: Final = 2

_ID_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:-]{0,127}")


def valid_transmission_id(value: str) -> bool:
    """Whether ``value`` can be an intake key (what ``/transmissions/<id>`` names)."""
    return _ID_RE.fullmatch(value) is not None


# --- the mailbox, as the IMAP server sees it ----------------------------------------------------


@dataclass(frozen=True, slots=True)
class FolderInfo:
    """A folder of the mailbox: its IMAP name, its URL token (the Maildir++ directory name
    without the leading dot: levels joined by "."), its message count and unseen count."""

    name: str
    token: str
    display: str
    count: int
    unseen: int


def folder_token(name: str) -> str:
    """The URL token of the IMAP folder ``name`` ("INBOX", "Sent", "Clienti.2024")."""
    return INBOX if name.upper() == INBOX else folder_dir(name)[1:]


def folder_name(token: str) -> str | None:
    """The IMAP name a URL token stands for, or None when it cannot name a folder (a path
    separator, "..", an empty level, a control character: the names pecd's IMAP refuses)."""
    if not token or len(token) > 500 or "/" in token:
        return None
    if token.upper() == INBOX:
        return INBOX
    name = token.replace(".", DELIMITER)
    try:
        folder_dir(name)
    except ValueError:
        return None
    return name


def _display(name: str) -> str:
    if "&" in name:
        with contextlib.suppress(ValueError, UnicodeError):
            return modutf7.decode(name.encode("ascii"))
    return name


def _flags(entry: Entry) -> str:
    name = entry.path.name
    return name.split(":2,", 1)[1] if ":2," in name else ""


def is_seen(entry: Entry) -> bool:
    return "S" in _flags(entry)


K = TypeVar("K", bound=Hashable)
V = TypeVar("V")
P = ParamSpec("P")
T = TypeVar("T")

#: What one cached entry costs beyond its strings: the key tuple, the value object, the
#: dictionary's node (an estimate on the high side).
ENTRY_OVERHEAD: Final = 400


def text_cost(*texts: str | None) -> int:
    """The bytes ``texts`` take in memory (for weighing cache entries)."""
    return sum(sys.getsizeof(t) for t in texts if t is not None)


class BoundedCache(Generic[K, V]):
    """A thread-safe map that drops the least recently used entries first, bounded both in
    entries and in bytes (each entry weighed by the caller when it is put)."""

    def __init__(self, *, max_items: int, max_bytes: int) -> None:
        self.max_items = max_items
        self.max_bytes = max_bytes
        self._items: OrderedDict[K, tuple[V, int]] = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._items)

    @property
    def bytes(self) -> int:
        """The weight of what is held now."""
        return self._bytes

    def get(self, key: K) -> V | None:
        with self._lock:
            found = self._items.get(key)
            if found is None:
                return None
            self._items.move_to_end(key)
            return found[0]

    def put(self, key: K, value: V, cost: int) -> None:
        with self._lock:
            old = self._items.pop(key, None)
            if old is not None:
                self._bytes -= old[1]
            if cost > self.max_bytes:
                return
            self._items[key] = (value, cost)
            self._bytes += cost
            while len(self._items) > self.max_items or self._bytes > self.max_bytes:
                _, (_, dropped) = self._items.popitem(last=False)
                self._bytes -= dropped


def _summary_cost(key: tuple[str, str], s: Summary) -> int:
    return ENTRY_OVERHEAD + text_cost(
        *key, s.from_, s.subject, s.message_id, s.riferimento, s.tipo_ricevuta
    )


_SUMMARIES: BoundedCache[tuple[str, str], Summary] = BoundedCache(
    max_items=_SUMMARY_ITEMS, max_bytes=_SUMMARY_BYTES
)


class HeavyWork:
    """At most ``slots`` heavy jobs at once: reading a whole stored message and parsing or
    verifying it, making an evidence bundle, checking an upload. :meth:`run` waits for a slot
    on the event loop (no worker thread is held while waiting), then runs the job in a worker
    thread; the slot is given back when the job ends, even when the request that asked for it
    is gone meanwhile (a client that hangs up does not free a slot its job still uses).

    One asyncio semaphore per event loop (the web process has one loop; tests run several)."""

    def __init__(self, slots: int) -> None:
        self.slots = slots
        self._semaphores: weakref.WeakKeyDictionary[
            asyncio.AbstractEventLoop, asyncio.Semaphore
        ] = weakref.WeakKeyDictionary()
        self._lock = threading.Lock()
        #: Jobs waiting for a slot, running now, the most that ever ran at once, and the jobs
        #: run (for tests and for the curious).
        self.waiting = 0
        self.running = 0
        self.peak = 0
        self.runs = 0

    def _semaphore(self) -> asyncio.Semaphore:
        loop = asyncio.get_running_loop()
        found = self._semaphores.get(loop)
        if found is None:
            found = self._semaphores[loop] = asyncio.Semaphore(self.slots)
        return found

    async def run(self, fn: Callable[P, T], /, *args: P.args, **kwargs: P.kwargs) -> T:
        """``fn(*args, **kwargs)`` in a worker thread, in a slot."""
        slots = self._semaphore()
        self.waiting += 1
        try:
            await slots.acquire()
        finally:
            self.waiting -= 1

        def call() -> T:
            with self._lock:
                self.running += 1
                self.runs += 1
                self.peak = max(self.peak, self.running)
            try:
                return fn(*args, **kwargs)
            finally:
                with self._lock:
                    self.running -= 1

        try:
            loop = asyncio.get_running_loop()
            job = loop.run_in_executor(None, contextvars.copy_context().run, call)
        except BaseException:
            slots.release()
            raise

        def done(f: asyncio.Future[T]) -> None:
            slots.release()
            if not f.cancelled():
                f.exception()  # retrieved: a job whose asker is gone fails quietly

        job.add_done_callback(done)
        return await asyncio.shield(job)

    def reset_peak(self) -> None:
        with self._lock:
            self.peak = self.running


#: The process's one :class:`HeavyWork`.
heavy_work = HeavyWork(HEAVY_SLOTS)


def read_head(path: Path) -> bytes:
    """The header block of the message file ``path`` (at most :data:`HEAD_BYTES`)."""
    with open(path, "rb") as f:
        data = f.read(HEAD_BYTES)
    end = data.find(b"\r\n\r\n")
    if end < 0:
        end = data.find(b"\n\n")
    return data if end < 0 else data[: end + 2]


@dataclass(frozen=True, slots=True)
class Loaded:
    """A stored message read whole: its entry, its bytes, its file's modification time."""

    entry: Entry
    data: bytes
    mtime_ns: int


class MailboxReader:
    """One mailbox's folders and messages, read the way pecd's IMAP server reads them; every
    method is synchronous file system work (async callers use ``asyncio.to_thread``)."""

    def __init__(self, store: MaildirStore, address: str) -> None:
        self.store = store
        self.address = normalize_address(address)
        self.base = store.path_for(self.address)

    # -- folders --------------------------------------------------------------------------------

    def folder_path(self, name: str) -> Path:
        return self.store.folder_path(self.address, name)

    def exists(self, name: str) -> bool:
        path = self.folder_path(name)
        if not (path / "cur").is_dir() and not (path / "new").is_dir():
            return False
        # Belt and braces: folder_name() already refuses every way out of the mailbox.
        return path.resolve().is_relative_to(self.base.resolve())

    def folders(self) -> list[FolderInfo]:
        """INBOX, the standard folders, then the others by name; with their counts."""
        names = [INBOX]
        others: list[str] = []
        with (
            contextlib.suppress(FileNotFoundError, NotADirectoryError),
            os.scandir(self.base) as entries,
        ):
            for e in entries:
                if not (e.name.startswith(".") and len(e.name) > 1 and e.is_dir()):
                    continue
                name = e.name[1:].replace(".", DELIMITER)
                if folder_name(e.name[1:]) is None or not (Path(e.path) / "cur").is_dir():
                    continue
                others.append(name)
        names += [f for f in FOLDERS if f in others]
        names += sorted((f for f in others if f not in FOLDERS), key=str.lower)
        out = []
        for name in names:
            count, unseen = self._counts(self.folder_path(name))
            out.append(FolderInfo(name, folder_token(name), _display(name), count, unseen))
        return out

    @staticmethod
    def _counts(path: Path) -> tuple[int, int]:
        count = unseen = 0
        for sub in ("new", "cur"):
            try:
                it = os.scandir(path / sub)
            except (FileNotFoundError, NotADirectoryError):
                continue
            with it:
                for e in it:
                    if e.name.startswith("."):
                        continue
                    count += 1
                    flags = e.name.split(":2,", 1)[1] if ":2," in e.name else ""
                    unseen += "S" not in flags
        return count, unseen

    # -- messages -------------------------------------------------------------------------------

    def listing(self, name: str) -> Listing:
        """The folder's messages with their UIDs (the list is brought up to date, and made when
        missing, as the IMAP server does on SELECT)."""
        path = self.folder_path(name)
        if not (path / "cur").is_dir():
            return Listing(0, 1, [])
        return uidlist.sync(path)

    def entry(self, name: str, uid: int) -> Entry | None:
        return self.listing(name).by_uid().get(uid)

    def open_message(self, name: str, uid: int, limit: int) -> tuple[Entry, IO[bytes], int] | None:
        """The message ``uid`` of folder ``name``: its entry, its file open for reading (the
        caller closes it) and its size; None when there is no such message, or it is larger
        than ``limit``. A file renamed meanwhile (its flags changed by an IMAP client) is looked
        up again, once; once open, a rename does not matter."""
        for _ in range(2):
            found = self.entry(name, uid)
            if found is None or found.size > limit:
                return None
            try:
                f = open(found.path, "rb")  # noqa: SIM115 (the caller closes it)
            except FileNotFoundError:
                continue
            size = os.fstat(f.fileno()).st_size
            if size > limit:
                f.close()
                return None
            return found, f, size
        return None

    def load(self, name: str, uid: int, limit: int) -> Loaded | None:
        """The message ``uid`` of folder ``name`` read whole (None as for :meth:`open_message`).
        Heavy: callers run it through :data:`heavy_work`."""
        opened = self.open_message(name, uid, limit)
        if opened is None:
            return None
        entry, f, size = opened
        with f:
            mtime_ns = os.fstat(f.fileno()).st_mtime_ns
            # As much as the file holds (a read of the limit would reserve all of it first).
            data = f.read(size + 1)
        return Loaded(entry, data, mtime_ns) if len(data) <= limit else None

    def read(self, name: str, uid: int, limit: int) -> tuple[Entry, bytes] | None:
        """The message ``uid`` of folder ``name`` and its bytes (see :meth:`load`)."""
        loaded = self.load(name, uid, limit)
        return None if loaded is None else (loaded.entry, loaded.data)

    def summary(self, entry: Entry) -> Summary:
        key = (str(entry.path.parent.parent), entry.name)
        found = _SUMMARIES.get(key)
        if found is None:
            try:
                head = read_head(entry.path)
            except FileNotFoundError:
                head = self._head_after_rename(entry)
            found = summarize_head(head)
            _SUMMARIES.put(key, found, _summary_cost(key, found))
        return found

    @staticmethod
    def _head_after_rename(entry: Entry) -> bytes:
        folder = entry.path.parent.parent
        for sub in ("cur", "new"):
            with contextlib.suppress(FileNotFoundError), os.scandir(folder / sub) as it:
                for e in it:
                    if e.name.split(":", 1)[0] == entry.name:
                        return read_head(Path(e.path))
        return b""

    def mark_seen(self, entry: Entry) -> bool:
        """Add the ``S`` flag to the message file as an IMAP server does when a message is read
        (new/ -> cur/ with ``:2,S``; in cur/, ``S`` added to the flags, kept in ASCII order).
        The base name, hence the UID, is unchanged. False when the file moved meanwhile."""
        path = entry.path
        flags = _flags(entry)
        if "S" in flags:
            return True
        new_flags = "".join(sorted(set(flags + "S")))
        target = path.parent.parent / "cur" / f"{entry.name}:2,{new_flags}"
        try:
            os.rename(path, target)
        except FileNotFoundError:
            return False
        return True

    def newest(self, name: str, limit: int = MAX_SCAN) -> list[Entry]:
        """The folder's newest ``limit`` messages, newest (highest UID) first."""
        entries = self.listing(name).entries
        return list(reversed(entries[-limit:])) if limit else []


@dataclass(frozen=True, slots=True)
class MessageRef:
    """Where a message is: folder (IMAP name and URL token) and UID."""

    folder: str
    token: str
    uid: int

    @property
    def url(self) -> str:
        return f"/mail/{self.token}/{self.uid}"


def _ref(folder: str, entry: Entry) -> MessageRef:
    return MessageRef(folder, folder_token(folder), entry.uid)


# --- the messages of one transmission in the mailbox -------------------------------------------------


@dataclass(frozen=True, slots=True)
class FoundReceipt:
    """A receipt of the transmission in the mailbox, with what its daticert says."""

    ref: MessageRef
    path: Path
    kind: PecKind
    consegna: str | None  # normalised
    instant: datetime | None
    valid: bool  # its signature and structure hold (pecd verify's judgement)


@dataclass(frozen=True, slots=True)
class TransmissionMessages:
    """The messages of one transmission in the holder's mailbox."""

    sent: MessageRef | None
    sent_path: Path | None
    receipts: tuple[FoundReceipt, ...]
    scanned_all: bool  # False: a folder had more than MAX_SCAN messages, older ones not looked at
    parsed: int = 0  # message files parsed in full to find them (files read before are not)


@dataclass(frozen=True, slots=True)
class _Facts:
    """What one stored file says as a receipt: its daticert's identificativo (bare), its kind
    (PLAIN: not a receipt), its recipient, its instant, its verdict."""

    identificativo: str
    kind: PecKind
    consegna: str | None
    instant: datetime | None
    valid: bool


_NOT_A_RECEIPT: Final = _Facts("", PecKind.PLAIN, None, None, False)
#: (folder directory, base name, size) -> what the file says (a Maildir file's content never
#: changes under its base name).
_FACTS: BoundedCache[tuple[str, str, int], _Facts] = BoundedCache(
    max_items=_RECEIPT_ITEMS, max_bytes=_RECEIPT_BYTES
)


def _read_facts(entry: Entry, max_bytes: int) -> _Facts | None:
    """Parse and verify the file of ``entry`` (heavy); None when it is gone or too big."""
    try:
        with open(entry.path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            raw = f.read(size + 1) if size <= max_bytes else b""
    except OSError:
        return None
    if not raw or len(raw) > max_bytes:
        return None
    try:
        c = classify(raw)
    except NotMailError:
        return _NOT_A_RECEIPT
    d = c.daticert
    if d is None or c.ricevuta is None:
        return _NOT_A_RECEIPT
    try:
        instant: datetime | None = d.instant
    except ValueError:
        instant = None
    return _Facts(
        identificativo=unbracket(d.identificativo)[:_ID_CHARS],
        kind=PecKind(c.ricevuta.value),
        consegna=normalize_address(d.consegna)[:_ID_CHARS] if d.consegna else None,
        instant=instant,
        valid=c.is_valid_pec,
    )


#: The most of an identifier or address kept from a daticert.
_ID_CHARS: Final = 1000


def find_transmission_messages(
    reader: MailboxReader,
    *,
    intake_key: str | None,
    pec_msgid: str,
    client_msgid: str | None,
    receipt_ids: Iterable[str] = (),
    receipt_uids: Iterable[int] = (),
    unlocated: int = 0,
    max_bytes: int,
) -> TransmissionMessages:
    """The Sent copy and the receipts of the transmission ``pec_msgid`` in ``reader``'s mailbox
    (synchronous and heavy: run it through :data:`heavy_work`).

    ``receipt_uids``: the INBOX UIDs of the files delivered under the keys the trace log gives
    the transmission's receipts (what :func:`pecd.web.status.transmission_status` locates by
    file name); each is read. ``unlocated``: how many of the trace log's steps have no receipt
    located so: at most that many other files are read among those whose (unsigned) headers
    point at the transmission (``receipt_ids``: the Message-IDs the trace log gave its
    receipts; or ``X-Riferimento-Message-ID`` is the client's msgid), newest first: receipts
    filed elsewhere, or copied. At most :data:`MAX_RECEIPTS` files are read in all; a file read
    for an earlier view is not read again."""
    known = {unbracket(i) for i in receipt_ids if i}
    client = unbracket(client_msgid) if client_msgid else ""
    scanned_all = True

    sent: MessageRef | None = None
    sent_path: Path | None = None
    if reader.exists(SENT):
        stem = MaildirStore.name_for(sent_key(intake_key)) if intake_key else None
        entries = reader.newest(SENT)
        scanned_all &= len(entries) < MAX_SCAN
        for e in entries:
            if (stem and e.name.startswith(stem + ",")) or (
                client and reader.summary(e).message_id == client
            ):
                sent, sent_path = _ref(SENT, e), e.path
                break

    receipts: list[FoundReceipt] = []
    seen: set[tuple[str, str]] = set()
    parsed = 0

    def consider(folder: str, e: Entry, may_parse: bool) -> None:
        """Take ``e`` when it is a receipt of the transmission (reading it if allowed)."""
        nonlocal parsed
        seen.add((folder, e.name))
        key = (str(e.path.parent.parent), e.name, e.size)
        facts = _FACTS.get(key)
        if facts is None:
            if not may_parse or parsed >= MAX_RECEIPTS:
                return
            parsed += 1
            facts = _read_facts(e, max_bytes)
            if facts is None:
                return
            _FACTS.put(key, facts, ENTRY_OVERHEAD + text_cost(*key[:2], *_texts(facts)))
        if (
            facts.kind.is_receipt
            and facts.identificativo == pec_msgid
            and len(receipts) < MAX_RECEIPTS
        ):
            receipts.append(
                FoundReceipt(
                    _ref(folder, e), e.path, facts.kind, facts.consegna, facts.instant, facts.valid
                )
            )

    listings = {f: reader.listing(f).entries for f in RECEIPT_FOLDERS if reader.exists(f)}
    # The files delivered under the receipts' keys: pecd's own deliveries, found by name.
    wanted = set(receipt_uids)
    if wanted and INBOX in listings:
        for e in listings[INBOX]:
            if e.uid in wanted and e.size <= max_bytes:
                consider(INBOX, e, True)
    by_name = len(receipts)
    # The others whose headers point at the transmission, as many as receipts are missing,
    # newest first: those with a Message-ID the trace log knows before those that only name the
    # client's msgid (which anyone who saw the message may write).
    by_id: list[tuple[str, Entry]] = []
    by_client: list[tuple[str, Entry]] = []
    for folder, entries in listings.items():
        scanned_all &= len(entries) <= MAX_SCAN
        for e in entries[-MAX_SCAN:][::-1]:
            if (folder, e.name) in seen or e.size > max_bytes:
                continue
            s = reader.summary(e)
            if not s.kind.is_receipt:
                continue
            if s.message_id in known:
                by_id.append((folder, e))
            elif client and s.riferimento == client:
                by_client.append((folder, e))
    attempts = 0  # files parsed here
    for folder, e in by_id + by_client:
        missing = unlocated - (len(receipts) - by_name)
        before = parsed
        consider(folder, e, attempts < unlocated and missing > 0)
        attempts += parsed - before
    receipts.sort(key=lambda r: (r.instant is None, r.instant or datetime.min, r.ref.uid))
    return TransmissionMessages(sent, sent_path, tuple(receipts), scanned_all, parsed)


def _texts(facts: _Facts) -> tuple[str, str | None]:
    return facts.identificativo, facts.consegna


async def trace_receipts(db: Database, pec_msgid: str, mailbox: str) -> tuple[list[str], int]:
    """What the trace log says of the receipts of transmission ``pec_msgid``: their Message-IDs
    (those pecd made, ``generated_ids``, and those that came back from other providers), and
    how many of them it put in the sender's ``mailbox`` (its events with a delivery key there:
    :func:`pecd.web.status.receipt_keys`)."""
    async with db.read_session() as s:
        events = list(await s.scalars(select(TraceEvent).where(TraceEvent.pec_msgid == pec_msgid)))
    ids: list[str] = []
    expected = 0
    for e in events:
        ids += [str(i) for i in e.generated_ids or ()]
        if isinstance(e.data, dict) and e.data.get("message_id"):
            ids.append(str(e.data["message_id"]))
        expected += bool(receipt_keys(e, mailbox))
    return ids, expected


# --- the timeline ------------------------------------------------------------------------------------

#: A recipient's state in words (Italian, the key of the translation; English beside).
STATUS_WORDS: Final[dict[str, tuple[str, str]]] = {
    "avvenuta-consegna": ("consegnata", "delivered"),
    "errore-consegna": ("errore", "error"),
    "non-accettazione": ("non accettata", "not accepted"),
    "accettazione": ("in attesa", "waiting"),
    "presa-in-carico": ("in attesa", "waiting"),
    "preavviso-errore-consegna": ("in attesa", "waiting"),
    "queued": ("in coda", "queued"),
}
#: Each step's name (Italian; English beside).
STEP_WORDS: Final[dict[str, tuple[str, str]]] = {
    "accettazione": ("accettazione", "acceptance"),
    "non-accettazione": ("non accettazione", "non-acceptance"),
    "presa-in-carico": ("presa in carico", "taken in charge"),
    "avvenuta-consegna": ("avvenuta consegna", "delivery"),
    "errore-consegna": ("mancata consegna", "delivery failure"),
    "preavviso-errore-consegna": ("preavviso di mancata consegna", "delivery delay warning"),
    "rilevazione-virus": ("rilevazione virus", "virus detected"),
}
#: Each receipt's name in the PEC rules (Italian; English beside).
RECEIPT_NAMES: Final[dict[str, tuple[str, str]]] = {
    "accettazione": ("ricevuta di accettazione", "acceptance receipt"),
    "non-accettazione": ("avviso di non accettazione", "non-acceptance notice"),
    "presa-in-carico": ("ricevuta di presa in carico", "taken-in-charge receipt"),
    "avvenuta-consegna": ("ricevuta di avvenuta consegna", "delivery receipt"),
    "errore-consegna": ("avviso di mancata consegna", "non-delivery notice"),
    "preavviso-errore-consegna": (
        "avviso di mancata consegna per superamento dei tempi massimi",
        "delivery time-out notice",
    ),
    "rilevazione-virus": ("avviso di rilevazione virus", "virus detection notice"),
}
_FINAL: Final = frozenset({"avvenuta-consegna", "errore-consegna", "non-accettazione"})


@dataclass(frozen=True, slots=True)
class StepView:
    """One step of a recipient's (or the whole transmission's) timeline."""

    kind: str
    at: datetime | None
    error: str | None
    receipt: MessageRef | None


@dataclass(frozen=True, slots=True)
class RecipientTimeline:
    address: str
    tipo: str | None  # certificato / esterno
    status: str  # the trace log's word: accettazione, avvenuta-consegna, errore-consegna, ...
    at: datetime | None
    error: str | None
    steps: tuple[StepView, ...]

    @property
    def final(self) -> bool:
        return self.status in _FINAL

    @property
    def words(self) -> tuple[str, str]:
        return STATUS_WORDS.get(self.status, ("in attesa", "waiting"))


@dataclass(frozen=True, slots=True)
class Timeline:
    id: str
    status: str  # accepted / not-accepted / queued
    pec_msgid: str | None
    client_msgid: str | None
    subject: str | None
    accepted_at: datetime | None
    error: str | None
    recipients: tuple[RecipientTimeline, ...]
    steps: tuple[StepView, ...]  # of the whole transmission (accettazione or not)
    sent: MessageRef | None
    receipts: tuple[FoundReceipt, ...] = field(default=())
    sent_path: Path | None = None
    scanned_all: bool = True

    @property
    def complete(self) -> bool:
        """Nothing more will happen: not accepted, or every recipient has its final receipt."""
        return self.status == "not-accepted" or (
            self.status == "accepted" and all(r.final for r in self.recipients)
        )


def when_text(when: datetime | None) -> str:
    """An instant as the PEC rules show it to people: Italian legal time, ``dd/mm/yyyy
    hh:mm:ss (+HHMM)``; "-" for None."""
    if when is None:
        return "-"
    if when.tzinfo is None:  # the store's times are UTC
        when = when.replace(tzinfo=UTC)
    local = when.astimezone(ROME)
    offset = local.utcoffset() or timedelta(0)
    return local.strftime("%d/%m/%Y %H:%M:%S") + f" ({format_zona(offset)})"


def _instant(value: Any) -> datetime | None:
    if not value:
        return None
    try:
        return datetime.fromisoformat(str(value))
    except ValueError:
        return None


class _Matcher:
    """Hands each trace event the receipt in the mailbox that tells of it: same kind, same
    recipient (a receipt with no ``consegna`` speaks for all), the same second if one has it,
    else the earliest not yet handed out."""

    def __init__(self, receipts: Sequence[FoundReceipt]) -> None:
        self.free = list(receipts)

    def take(self, kind: str, who: Sequence[str] | None, at: datetime | None) -> MessageRef | None:
        wanted = {normalize_address(w) for w in who} if who is not None else None

        def fits(r: FoundReceipt) -> bool:
            if r.kind.value != kind:
                return False
            if wanted is None or r.consegna is None:
                return True
            return r.consegna in wanted

        same = [r for r in self.free if fits(r)]
        if not same:
            return None
        exact = [
            r
            for r in same
            if at is not None and r.instant is not None and _same_second(r.instant, at)
        ]
        chosen = (exact or same)[0]
        self.free.remove(chosen)
        return chosen.ref


def _same_second(a: datetime, b: datetime) -> bool:
    try:
        return abs((a - b).total_seconds()) < 1
    except TypeError:  # one naive, one aware
        return False


def build_timeline(status: dict[str, Any], found: TransmissionMessages | None) -> Timeline:
    """The timeline of ``status`` (what :func:`transmission_status` returns) with each step
    linked to its receipt among ``found`` (pure)."""
    receipts = found.receipts if found else ()
    matcher = _Matcher(receipts)
    events = list(status.get("events") or [])
    # The trace log's steps, each with its receipt (one receipt for one step).
    steps: list[tuple[str, list[str] | None, datetime | None, str | None, MessageRef | None]] = []
    for e in events:
        kind = str(e.get("event"))
        who = e.get("recipients")
        who_list = [str(w) for w in who] if isinstance(who, list) else None
        at = _instant(e.get("at"))
        steps.append((kind, who_list, at, e.get("error"), matcher.take(kind, who_list, at)))
    general = tuple(StepView(k, at, err, ref) for k, who, at, err, ref in steps if who is None)
    recipients = []
    for r in status.get("recipients") or []:
        address = normalize_address(str(r.get("address", "")))
        mine = tuple(
            StepView(k, at, err, ref)
            for k, who, at, err, ref in steps
            if who is not None and address in {normalize_address(w) for w in who}
        )
        recipients.append(
            RecipientTimeline(
                address=address,
                tipo=r.get("tipo"),
                status=str(r.get("status")),
                at=_instant(r.get("at")),
                error=r.get("error"),
                steps=mine,
            )
        )
    return Timeline(
        id=str(status.get("id")),
        status=str(status.get("status")),
        pec_msgid=status.get("pec_msgid"),
        client_msgid=status.get("client_msgid"),
        subject=status.get("subject"),
        accepted_at=_instant(status.get("accepted_at")),
        error=status.get("error"),
        recipients=tuple(recipients),
        steps=general,
        sent=found.sent if found else None,
        receipts=tuple(receipts),
        sent_path=found.sent_path if found else None,
        scanned_all=found.scanned_all if found else True,
    )


async def load_timeline(
    db: Database, store: MaildirStore, mailbox: str, intake_key: str, *, max_bytes: int
) -> Timeline | None:
    """The timeline of the transmission ``intake_key`` of ``mailbox``; None when the mailbox
    has no such transmission (another mailbox's is not found either)."""
    status = await transmission_status(db, mailbox, intake_key, maildir=store)
    if status is None:
        return None
    pec_msgid = status.get("pec_msgid")
    if not pec_msgid:
        return build_timeline(status, None)
    ids, expected = await trace_receipts(db, str(pec_msgid), mailbox)
    located = _located(status)
    reader = MailboxReader(store, mailbox)
    found = await heavy_work.run(
        find_transmission_messages,
        reader,
        intake_key=intake_key,
        pec_msgid=str(pec_msgid),
        client_msgid=status.get("client_msgid"),
        receipt_ids=ids,
        receipt_uids=located,
        unlocated=max(0, expected - len(located)),
        max_bytes=max_bytes,
    )
    return build_timeline(status, found)


def _located(status: dict[str, Any]) -> set[int]:
    """The INBOX UIDs of the receipts ``status`` located by file name (what
    :func:`transmission_status` says with ``maildir``)."""
    uids: set[int] = set()
    for entry in [status, *(status.get("events") or [])]:
        where = entry.get("receipt")
        if isinstance(where, dict) and where.get("folder") == INBOX:
            uid = where.get("uid")
            if isinstance(uid, int):
                uids.add(uid)
    return uids


async def transmission_of(
    db: Database, mailbox: str, *, pec_msgid: str | None = None, client_msgid: str | None = None
) -> str | None:
    """The intake key of ``mailbox``'s transmission named by its PEC msgid (bare) or its client
    msgid (any form), for the links of the reading page; None when there is none."""
    if pec_msgid:
        status = await transmission_status(db, mailbox, pec_msgid=unbracket(pec_msgid))
    elif client_msgid:
        status = await transmission_status(db, mailbox, client_msgid=bracket(client_msgid))
    else:
        return None
    if status is None or not status.get("id"):
        return None
    key = str(status["id"])
    return key if valid_transmission_id(key) else None
