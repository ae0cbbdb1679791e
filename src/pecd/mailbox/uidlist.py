"""Dovecot's ``dovecot-uidlist``: the UID of every Maildir message, shared with Dovecot.

A Maildir folder gives its messages no numbers; IMAP (UID, UIDVALIDITY) and POP3 (UIDL) need
numbers that never change. Dovecot keeps them in ``<folder>/dovecot-uidlist``; pecd reads and
writes the same file so that either server can serve a tree the other has written.

Format (version 3, the one Dovecot writes since 1.1)::

    3 V1767225600 N7 G0f4c...32 hex...
    1 W6846 S6846 :1767225600.M1P2.host,S=6846
    4 :a1b2...,S=120

Header fields are ``<key><value>`` after the ``3``: ``V`` UIDVALIDITY, ``N`` the next UID to
give, ``G`` the mailbox GUID (128 bits in hex); others are kept as they are. Each record line is
the UID, optional extension fields (Dovecot's ``W`` virtual size, ``S`` physical size, ``G``
message GUID, ``P``/``O`` POP3 UIDL and order; pymap's ``E``/``T`` email and thread ids), then
`` :`` and the base name of the file (the part before ``:2,<flags>``). Version 1 files
(``1 <uidvalidity> <nextuid>`` / ``<uid> <name>``) are read and rewritten as version 3.

The rules kept here, whoever wrote the file:

* an existing record is never renumbered, and its extension fields are kept on rewrite;
* the next UID never falls. Dovecot appends records to the file without rewriting the header,
  so ``N`` can be below the last UID listed: the next UID is the larger of ``N`` and the
  highest UID + 1. After expunges ``N`` can be above every UID listed: it is kept;
* files not listed yet get UIDs in arrival order (file mtime, then name);
* the records of files that are gone (expunged) are dropped, their UIDs never given again;
* a new list gets a fresh UIDVALIDITY: the current time, but above any value the folder had
  before (an unreadable old list, Dovecot's index) and above the mailbox's
  ``dovecot-uidvalidity`` counter, which is advanced (as Dovecot does when it creates folders).

Locking is Dovecot's dotlock: ``dovecot-uidlist.lock`` is created with ``O_EXCL``, the new list
is written into it, fsynced and renamed over ``dovecot-uidlist`` (the rename releases the lock).
Readers take no lock: the rename is atomic. A lock file unchanged for two minutes is stale (a
crashed writer) and is removed, as Dovecot does; waiting for a live lock is bounded.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import re
import secrets
import struct
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from pecd.mailbox.maildir import write_all

__all__ = [
    "FILE_NAME",
    "LOCK_NAME",
    "Entry",
    "Listing",
    "UidListLocked",
    "read",
    "sync",
]

_log = logging.getLogger(__name__)

FILE_NAME = "dovecot-uidlist"
LOCK_NAME = "dovecot-uidlist.lock"
#: Dovecot's MAILDIR_UIDLIST_LOCK_STALE_TIMEOUT: a lock file untouched this long is stale.
STALE_SECONDS = 120.0
#: How long ``sync`` waits for a live lock before giving up.
LOCK_TIMEOUT_SECONDS = 30.0
_UIDVALIDITY_FILE = "dovecot-uidvalidity"
_MAX_UID = 0xFFFFFFFF
_SIZE_RE = re.compile(r",S=(\d+)")
_HEX8_RE = re.compile(r"[0-9a-fA-F]{1,8}")


class UidListLocked(TimeoutError):
    """The uidlist lock stayed held by a live writer for longer than the wait allowed."""


@dataclass(frozen=True)
class Entry:
    """One message of a folder: its UID and its file."""

    uid: int
    #: The Maildir base name (before ``:``), as listed in dovecot-uidlist.
    name: str
    #: The file as found now (``new/<name>`` or ``cur/<name>:2,<flags>``).
    path: Path
    #: Size in bytes (the ``,S=`` of the name when present, else the file's size).
    size: int
    #: The record's extension fields (``W``, ``S``, ``G``, pymap's ``E``/``T``, ...).
    fields: Mapping[str, str] = field(default_factory=dict, compare=False, hash=False)


@dataclass(frozen=True)
class Listing:
    """A folder's UID state after a sync."""

    uid_validity: int
    next_uid: int
    #: Present messages, ascending UID.
    entries: list[Entry]
    #: The mailbox GUID of the list's header (32 hex digits).
    guid: str = ""

    # Indexes of ``entries``, made on first use (a listing never changes once made).
    _by_uid: dict[int, Entry] | None = field(default=None, init=False, repr=False, compare=False)
    _by_name: dict[str, Entry] | None = field(default=None, init=False, repr=False, compare=False)

    def by_uid(self) -> dict[int, Entry]:
        if self._by_uid is None:
            object.__setattr__(self, "_by_uid", {e.uid: e for e in self.entries})
        assert self._by_uid is not None
        return self._by_uid

    def by_name(self) -> dict[str, Entry]:
        if self._by_name is None:
            object.__setattr__(self, "_by_name", {e.name: e for e in self.entries})
        assert self._by_name is not None
        return self._by_name


# -- the file ---------------------------------------------------------------------------------


@dataclass
class _Record:
    uid: int
    fields: dict[str, str]
    name: str


@dataclass
class _UidList:
    uid_validity: int
    next_uid: int
    guid: str
    #: Header fields other than V, N, G, in file order.
    extra: dict[str, str]
    #: Records by base name, in file order (ascending UID).
    records: dict[str, _Record]
    #: True when the file must be rewritten even with nothing new (old version, duplicates).
    dirty: bool = False

    @property
    def effective_next_uid(self) -> int:
        top = max((r.uid for r in self.records.values()), default=0)
        return max(self.next_uid, top + 1, 1)


class _Corrupt(ValueError):
    def __init__(self, message: str, uid_validity: int = 0) -> None:
        super().__init__(message)
        self.uid_validity = uid_validity


def _parse(text: str) -> _UidList:
    lines = text.splitlines()
    if not lines or not lines[0].strip():
        raise _Corrupt("empty")
    head = lines[0].split()
    version = head[0]
    extra: dict[str, str] = {}
    if version == "1":
        if len(head) < 3:
            raise _Corrupt(f"bad version 1 header {lines[0]!r}")
        try:
            validity, next_uid = int(head[1]), int(head[2])
        except ValueError:
            raise _Corrupt(f"bad version 1 header {lines[0]!r}") from None
        guid = ""
    elif version == "3":
        values: dict[str, str] = {}
        for token in head[1:]:
            values[token[0]] = token[1:]
        try:
            validity = int(values.pop("V"))
        except (KeyError, ValueError):
            raise _Corrupt(f"no UIDVALIDITY in {lines[0]!r}") from None
        try:
            next_uid = int(values.pop("N", "1"))
        except ValueError:
            raise _Corrupt(f"bad next UID in {lines[0]!r}", validity) from None
        guid = values.pop("G", "")
        extra = values
    else:
        raise _Corrupt(f"unknown uidlist version {version!r}")
    if validity <= 0:
        raise _Corrupt("UIDVALIDITY 0")
    result = _UidList(validity, next_uid, guid, extra, {}, dirty=version != "3")
    last_uid = 0
    for line in lines[1:]:
        if not line.strip():
            continue
        rec = _parse_record(line, version)
        if rec is None:
            raise _Corrupt(f"bad record {line!r}", validity)
        if rec.uid <= last_uid or rec.name in result.records:
            # Dovecot writes ascending UIDs, one record per file: keep the first mapping
            # of a name and never a UID that goes backwards.
            _log.warning("dovecot-uidlist: dropping out-of-order record %r", line)
            result.dirty = True
            continue
        last_uid = rec.uid
        result.records[rec.name] = rec
    return result


def _parse_record(line: str, version: str) -> _Record | None:
    if version == "1":
        uid_text, _, name = line.strip().partition(" ")
        fields: dict[str, str] = {}
    else:
        head, sep, name = line.rstrip("\r\n").partition(" :")
        if not sep:
            # A record with no extension fields may also be written "<uid> :<name>" with
            # the colon right after the space, which partition found; anything else is bad.
            return None
        tokens = head.split()
        if not tokens:
            return None
        uid_text = tokens[0]
        fields = {t[0]: t[1:] for t in tokens[1:]}
    try:
        uid = int(uid_text)
    except ValueError:
        return None
    base = name.split(":", 1)[0].strip()
    if uid <= 0 or uid > _MAX_UID or not base or "/" in base:
        return None
    return _Record(uid, fields, base)


def _format(ul: _UidList) -> str:
    header = [f"3 V{ul.uid_validity}", f"N{ul.effective_next_uid}"]
    if ul.guid:
        header.append(f"G{ul.guid}")
    header.extend(f"{k}{v}" for k, v in ul.extra.items())
    out = [" ".join(header), "\n"]
    for rec in sorted(ul.records.values(), key=lambda r: r.uid):
        out.append(str(rec.uid))
        for key, value in rec.fields.items():
            out.append(f" {key}{value}")
        out.append(f" :{rec.name}\n")
    return "".join(out)


# Parsed lists by file, with the (inode, size, mtime) they were read at: a list is replaced by
# a rename (a new inode) or grows by an append (a new size), so an unchanged key is the same
# text and need not be parsed again. Sync mutates what it is given: it gets a copy.
_PARSED: dict[str, tuple[tuple[int, int, int], _UidList]] = {}
_PARSED_MAX = 256
# Path objects of message files by their text: making a Path parses its text, and a large
# folder would make one per file at every sync.
_PATHS: dict[str, Path] = {}
_PATHS_MAX = 200_000


def _read_file(folder: Path) -> tuple[_UidList | None, int]:
    """The parsed list (None when absent or unreadable) and, for an unreadable one, its
    UIDVALIDITY if that much could be read (0 otherwise)."""
    path = folder / FILE_NAME
    try:
        with open(path, "rb") as fh:
            st = os.fstat(fh.fileno())
            key = (st.st_ino, st.st_size, st.st_mtime_ns)
            cached = _PARSED.get(str(path))
            if cached is not None and cached[0] == key:
                return _copy(cached[1]), 0
            text = fh.read().decode("utf-8", errors="surrogateescape")
    except FileNotFoundError:
        return None, 0
    try:
        ul = _parse(text)
    except _Corrupt as exc:
        _log.warning("%s/%s is corrupt (%s): making a new list", folder, FILE_NAME, exc)
        return None, exc.uid_validity
    if len(_PARSED) >= _PARSED_MAX:
        _PARSED.clear()
    _PARSED[str(path)] = (key, _copy(ul))
    return ul, 0


def _copy(ul: _UidList) -> _UidList:
    """A copy sync may change: its own header values and record table (records are not
    changed in place, only added and removed)."""
    return _UidList(
        ul.uid_validity, ul.next_uid, ul.guid, dict(ul.extra), dict(ul.records), ul.dirty
    )


def _path(text: str) -> Path:
    path = _PATHS.get(text)
    if path is None:
        if len(_PATHS) >= _PATHS_MAX:
            _PATHS.clear()
        path = _PATHS[text] = Path(text)
    return path


# -- the folder -------------------------------------------------------------------------------


@dataclass(frozen=True)
class _File:
    path: Path
    name: str  # base name


def _scan(folder: Path) -> dict[str, _File]:
    """Message files of new/ and cur/ by base name. new/ first: a file moved new -> cur while
    we look is then seen in cur/."""
    found: dict[str, _File] = {}
    for sub in ("new", "cur"):
        try:
            it = os.scandir(folder / sub)
        except FileNotFoundError:
            continue
        with it:
            for entry in it:
                if entry.name.startswith("."):
                    continue
                try:
                    if entry.is_dir(follow_symlinks=False):
                        continue
                except OSError:
                    continue
                base = entry.name.split(":", 1)[0]
                found[base] = _File(_path(entry.path), base)
    return found


def _size_of(f: _File) -> int:
    match = _SIZE_RE.search(f.name)
    if match:
        return int(match.group(1))
    try:
        return f.path.stat().st_size
    except FileNotFoundError:
        return 0


def _arrival_key(f: _File) -> tuple[int, str]:
    try:
        mtime = f.path.stat().st_mtime_ns
    except FileNotFoundError:
        mtime = 1 << 80  # gone meanwhile: last
    return (mtime, f.name)


def _listing(ul: _UidList, files: Mapping[str, _File]) -> Listing:
    entries = [
        Entry(rec.uid, rec.name, files[rec.name].path, _size_of(files[rec.name]), dict(rec.fields))
        for rec in sorted(ul.records.values(), key=lambda r: r.uid)
        if rec.name in files
    ]
    return Listing(ul.uid_validity, ul.effective_next_uid, entries, ul.guid)


def read(folder: Path) -> Listing | None:
    """The folder's listing as the file and the directory say now, writing nothing.

    Files not listed yet are left out. None when there is no (readable) list."""
    folder = Path(folder)
    ul, _ = _read_file(folder)
    if ul is None:
        return None
    return _listing(ul, _scan(folder))


def sync(
    folder: Path,
    *,
    fields: Mapping[str, Mapping[str, str]] | None = None,
    timeout: float = LOCK_TIMEOUT_SECONDS,
) -> Listing:
    """Bring ``folder/dovecot-uidlist`` up to date with the files and return the listing.

    Creates the list when missing, gives UIDs to unlisted files of new/ and cur/ (arrival
    order), drops the records of files that are gone. ``fields``: extension fields for files
    that get their UID in this call (by base name; pecd's IMAP passes pymap's email and
    thread ids for the messages it has just stored). Raises UidListLocked when another writer
    holds the lock for more than ``timeout`` seconds.
    """
    folder = Path(folder)
    fields = fields or {}
    ul, _ = _read_file(folder)
    files = _scan(folder)
    if ul is not None and not ul.dirty:
        missing = [name for name in ul.records if name not in files]
        unlisted = [name for name in files if name not in ul.records]
        if not missing and not unlisted:
            return _listing(ul, files)
    with _dotlock(folder, timeout) as lock_fd:
        ul, old_validity = _read_file(folder)
        files = _scan(folder)
        if ul is not None:
            missing = [name for name in ul.records if name not in files]
            if missing:
                # A rename (flags changed) while we read the directory can hide a file from
                # one listing; only files absent from two listings are gone.
                files.update(_scan(folder))
        if ul is None:
            ul = _UidList(
                _fresh_uid_validity(folder, old_validity),
                1,
                secrets.token_hex(16),
                {},
                {},
                dirty=True,
            )
        changed = ul.dirty
        for name in [n for n in ul.records if n not in files]:
            # Expunged: keep next_uid past it, never give its UID again.
            ul.next_uid = ul.effective_next_uid
            del ul.records[name]
            changed = True
        unlisted_files = sorted(
            (f for name, f in files.items() if name not in ul.records), key=_arrival_key
        )
        next_uid = ul.effective_next_uid
        for f in unlisted_files:
            if next_uid > _MAX_UID:
                raise OverflowError(f"{folder}: UIDs exhausted")
            ul.records[f.name] = _Record(next_uid, dict(fields.get(f.name, {})), f.name)
            next_uid += 1
            changed = True
        ul.next_uid = max(ul.next_uid, next_uid)
        if changed and not ul.guid:
            ul.guid = secrets.token_hex(16)
        if changed:
            _commit(folder, lock_fd, _format(ul))
        return _listing(ul, files)


# -- locking and writing ----------------------------------------------------------------------


@contextlib.contextmanager
def _dotlock(folder: Path, timeout: float) -> Iterator[int]:
    """Hold ``dovecot-uidlist.lock``; yields its descriptor. Unless ``_commit`` renamed the
    lock file over the list, it is removed on exit."""
    lock = folder / LOCK_NAME
    deadline = time.monotonic() + timeout
    delay = 0.005
    while True:
        try:
            fd = os.open(lock, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            break
        except FileExistsError:
            pass
        _break_stale(lock)
        if time.monotonic() >= deadline:
            raise UidListLocked(f"{lock} held for more than {timeout:g} s")
        time.sleep(delay)
        delay = min(delay * 2, 0.2)
    st = os.fstat(fd)
    try:
        yield fd
    finally:
        os.close(fd)
        # Still our lock (not renamed over the list, not broken as stale and re-made)?
        with contextlib.suppress(FileNotFoundError):
            now = os.stat(lock)
            if (now.st_ino, now.st_dev) == (st.st_ino, st.st_dev):
                os.unlink(lock)


def _break_stale(lock: Path) -> None:
    try:
        st = os.stat(lock)
    except FileNotFoundError:
        return
    if time.time() - st.st_mtime < STALE_SECONDS:
        return
    _log.warning("removing stale lock %s (unchanged for %.0f s)", lock, time.time() - st.st_mtime)
    with contextlib.suppress(FileNotFoundError):
        # Remove it only if it is still the file we judged stale.
        again = os.stat(lock)
        if (again.st_ino, again.st_mtime) == (st.st_ino, st.st_mtime):
            os.unlink(lock)


def _commit(folder: Path, fd: int, text: str) -> None:
    data = text.encode("utf-8", errors="surrogateescape")
    write_all(fd, data)
    os.fsync(fd)
    os.rename(folder / LOCK_NAME, folder / FILE_NAME)
    dfd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(dfd)
    finally:
        os.close(dfd)


# -- UIDVALIDITY ------------------------------------------------------------------------------


def _mailbox_root(folder: Path) -> Path:
    """The Maildir++ root: a subfolder (".Sent") is marked by its ``maildirfolder`` file."""
    return folder.parent if (folder / "maildirfolder").exists() else folder


def _index_uid_validity(folder: Path) -> int:
    """The UIDVALIDITY in Dovecot's ``dovecot.index`` header, 0 when none can be read.

    The header starts: major version (1 byte, 7), minor (1), base header size (2), header
    size (4), index id (4), flags (4), uid_validity (4), in the host's byte order."""
    try:
        with open(folder / "dovecot.index", "rb") as fh:
            head = fh.read(24)
    except OSError:
        return 0
    if len(head) < 24 or head[0] != 7:
        return 0
    (value,) = struct.unpack_from("=I", head, 16)
    return int(value)


def _root_counter(root: Path) -> int:
    best = 0
    with contextlib.suppress(OSError, ValueError):
        text = (root / _UIDVALIDITY_FILE).read_text("ascii").strip()
        if _HEX8_RE.fullmatch(text):
            best = int(text, 16)
    with contextlib.suppress(OSError):
        for name in os.listdir(root):
            prefix, dot, suffix = name.partition(".")
            if prefix == _UIDVALIDITY_FILE and dot and _HEX8_RE.fullmatch(suffix):
                best = max(best, int(suffix, 16))
    return best


def _fresh_uid_validity(folder: Path, previous: int) -> int:
    """A UIDVALIDITY for a new list: now, but above every value this folder or its mailbox
    has used; the mailbox's counter (Dovecot's ``dovecot-uidvalidity``) is advanced."""
    root = _mailbox_root(folder)
    floor = max(previous, _index_uid_validity(folder), _root_counter(root))
    value = max(int(time.time()), floor + 1) & _MAX_UID or 1
    try:
        _write_root_counter(root, value)
    except OSError as exc:  # the list itself is what matters; the counter is a safeguard
        _log.warning("cannot update %s/%s: %s", root, _UIDVALIDITY_FILE, exc)
    return value


def _write_root_counter(root: Path, value: int) -> None:
    counter = root / _UIDVALIDITY_FILE
    if _root_counter(root) >= value:
        return
    tmp = root / f".{_UIDVALIDITY_FILE}.{os.getpid()}.{secrets.token_hex(4)}"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        os.write(fd, f"{value:08x}".encode("ascii"))
        os.fsync(fd)
    finally:
        os.close(fd)
    os.rename(tmp, counter)
    # Dovecot also keeps an empty "dovecot-uidvalidity.<hex>" marker of the last value.
    for name in os.listdir(root):
        if name.startswith(_UIDVALIDITY_FILE + ".") and name != f"{_UIDVALIDITY_FILE}.{value:08x}":
            with contextlib.suppress(OSError):
                os.unlink(root / name)
    try:
        os.close(
            os.open(root / f"{_UIDVALIDITY_FILE}.{value:08x}", os.O_CREAT | os.O_WRONLY, 0o600)
        )
    except OSError as exc:
        if exc.errno != errno.EEXIST:
            raise
