"""Maildir++ mailboxes on disk, laid out as Dovecot and pymap read them, with atomic idempotent delivery.

Layout for ``user@example.org`` under ``root``::

    root/example.org/user/            INBOX (cur/ new/ tmp/) and the Maildir++ root
    root/example.org/user/.Sent/      subfolders: "." + name, nested levels joined with "."
    root/example.org/user/.Drafts/
    root/example.org/user/.Trash/

Line endings: every message is stored with CRLF line endings. pymap serves the file bytes
verbatim (``FETCH BODY[]`` is a slice of the file) and IMAP requires CRLF on the wire, so storing
CRLF is what makes pymap correct; Dovecot reads CRLF Maildir files as well (it stores LF by
default but accepts both). Bare LF in the input is turned into CRLF; input that is already CRLF is
stored byte for byte, which keeps S/MIME signatures (computed over the CRLF canonical form) valid.

Delivery file names are ``<sha256(key) hex[:40]>,S=<size>``: the base name derives only from the
delivery key, so a re-run of the same delivery finds the earlier file (in ``new/``, or in ``cur/``
once an IMAP server has claimed it and added ``:2,<flags>``) and writes nothing. That search
reads the whole folder; a caller that knows the key was never delivered (its job was created in
the transaction just committed, and no other job will ever carry that key) passes ``fresh=True``
and skips it, so that a folder that only grows (the provider's service mailbox gets every presa
in carico) is not read on each delivery.

Durability, in batches (:meth:`MaildirStore.deliver_many`): every message of a batch is written
into ``tmp/``, then the contents are made durable, then each is linked into ``new/``, then the
links are made durable, and only then does the call report success. On Linux (5.8 or later:
before, ``syncfs`` reported no write error) each of the two steps is one ``syncfs(2)`` of the
filesystem, instead of two ``fsync`` per message, which cost most of a delivery's CPU; elsewhere,
on a folder under another mount than the root, or with ``sync="fsync"`` (environment
``PECD_MAILDIR_SYNC=fsync``), each file is fsynced before its link and each directory once after.
A file is never visible before its contents are durable. When a step fails, every message of
the batch is reported failed; what the call linked stays (its contents are durable and its name
derives from its key), and a retry, or a concurrent delivery of the same key, that finds it
reports it delivered only after a flush of its own.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import errno
import fcntl
import hashlib
import logging
import os
import re
import secrets
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from pecd.pec.address import normalize_address

log = logging.getLogger(__name__)

__all__ = [
    "FOLDERS",
    "INBOX",
    "Delivered",
    "MailboxFull",
    "MaildirStore",
    "Parcel",
    "SyncMode",
    "folder_dir",
    "to_crlf",
    "write_all",
    "write_atomic",
]

INBOX = "INBOX"
#: The folders every mailbox gets, as IMAP names (clients find them by these names).
FOLDERS: tuple[str, ...] = ("Sent", "Drafts", "Trash", "Junk", "Archive")
#: IMAP hierarchy delimiter used for folder names given to this module (pymap uses "/").
DELIMITER = "/"

_SUBDIRS = ("cur", "new", "tmp")
_TOKEN_BYTES = 6  # random bytes in a tmp file's name, as 12 hex digits (see _OWN_TMP_RE)
_KEY_HEX = 40
_LOCK_NAME = "pecd-deliver.lock"
_SIZE_RE = re.compile(r",S=(\d+)")
#: A file in tmp/ older than this is a leftover of a writer that died (Dovecot's rule; it
#: removes them when it scans a folder). Never less: another node may be writing it.
TMP_MAX_AGE_SECONDS = 36 * 3600
#: pecd's own tmp files (``write_atomic``) live seconds, not hours: an hour-old one is a leftover.
OWN_TMP_MAX_AGE_SECONDS = 3600
_OWN_TMP_RE = re.compile(r"^[0-9a-f]{40},S=\d+\.\d+\.[0-9a-f]{12}$")
# Characters never allowed in a path component derived from an address: separators, NUL and
# other control characters (a newline in a directory name is an invitation to log injection).
_BAD_CHARS = re.compile(r"[/\\\x00-\x1f\x7f]")
_BAD_FOLDER_CHARS = re.compile(r"[.\\\x00-\x1f\x7f]")


@dataclass(frozen=True, slots=True)
class Delivered:
    """Outcome of a delivery: where the message is, and whether this call created it."""

    path: Path
    created: bool


@dataclass(frozen=True, slots=True)
class Parcel:
    """One message for one folder of one mailbox (see :meth:`MaildirStore.deliver_many`):
    idempotent by ``key``; ``quota_bytes`` None never refuses it for quota; ``fresh``: its key
    was never delivered before, by anyone (see :meth:`MaildirStore.deliver`): only for a key
    that no earlier call, no retry and no other worker or node can have delivered. A wrong
    ``fresh`` makes a second copy once the first was moved to ``cur/`` or differs in size."""

    address: str
    key: str
    data: bytes
    folder: str = INBOX
    quota_bytes: int | None = None
    fresh: bool = False


class MailboxFull(Exception):
    """The delivery would take the mailbox over its quota."""

    def __init__(self, address: str, usage: int, quota: int) -> None:
        super().__init__(f"mailbox {address} is full: {usage} of {quota} bytes used")
        self.address = address
        self.usage = usage
        self.quota = quota


def to_crlf(data: bytes) -> bytes:
    """Bare LF becomes CRLF; existing CRLF (and lone CR) are left as they are.

    Data that is CRLF already (everything pecd builds or receives over SMTP) comes back as the
    same object: the two replacements would each copy the whole message."""
    if data.count(b"\n") == data.count(b"\r\n"):
        return data
    return data.replace(b"\r\n", b"\n").replace(b"\n", b"\r\n")


def folder_dir(folder: str) -> str:
    """The Maildir++ directory name of an IMAP folder name ("" for INBOX, ".A.B" for "A/B")."""
    if folder.upper() == INBOX:
        return ""
    parts = folder.split(DELIMITER)
    for part in parts:
        if not part or _BAD_FOLDER_CHARS.search(part):
            raise ValueError(f"invalid folder name {folder!r}")
    return "." + ".".join(parts)


def write_all(fd: int, data: bytes) -> None:
    """Write all of ``data`` to ``fd`` (os.write may write less than it is given)."""
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


def _fsync_dir(path: str | Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


#: How a batch is made durable: "auto" (syncfs where it reports errors, else fsync), "fsync".
SyncMode = Literal["auto", "fsync"]
#: syncfs(2) fails so when it is not there or not allowed (a seccomp filter): fsync instead.
_NO_SYNCFS = frozenset({errno.ENOSYS, errno.EPERM, errno.EACCES, errno.EINVAL})


def _load_syncfs() -> Callable[[int], int] | None:
    """libc's ``syncfs``, on Linux 5.8 or later only: earlier kernels always return 0, even
    when writing back failed, and a write error must never be reported as a delivery."""
    if not sys.platform.startswith("linux"):
        return None
    m = re.match(r"(\d+)\.(\d+)", os.uname().release)
    if m is None or (int(m.group(1)), int(m.group(2))) < (5, 8):
        return None
    try:
        fn = ctypes.CDLL(None, use_errno=True).syncfs
    except (OSError, AttributeError):
        return None
    fn.argtypes = [ctypes.c_int]
    fn.restype = ctypes.c_int

    def syncfs(fd: int) -> int:
        return int(fn(fd))

    return syncfs


_SYNCFS: Callable[[int], int] | None = _load_syncfs()


class _Flush:
    """The durability of one batch. Files on the filesystem of ``root`` (``covers(dev)``) are
    written without fsync and made durable by one syncfs per step; the others are fsynced one
    by one, and their directories once each. The syncfs descriptor is opened before anything
    is written: a write error met after that, on any file of the filesystem, fails the batch
    (errors are reported to the descriptors open when they happened)."""

    def __init__(self, root: Path, mode: SyncMode) -> None:
        self.fd: int | None = None
        self.dev: int | None = None
        if mode == "auto" and _SYNCFS is not None:
            with contextlib.suppress(OSError):
                try:
                    self.fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY)
                except FileNotFoundError:
                    # A first delivery makes the tree (the syncfs covers the new directories).
                    os.makedirs(root, mode=0o700, exist_ok=True)
                    self.fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY)
                self.dev = os.fstat(self.fd).st_dev
        # Paths as strings: these are built for every message, and pathlib costs more than
        # the string formatting (the system calls take either).
        self.unsynced: list[str] = []  # tmp files whose contents await the syncfs
        self.synced_dirs: dict[str, None] = {}  # directories whose entries await the syncfs
        self.dirs: dict[str, None] = {}  # directories to fsync one by one

    def covers(self, dev: int) -> bool:
        return self.fd is not None and dev == self.dev

    def close(self) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None

    def directory(self, path: str, covered: bool) -> None:
        """The entries of ``path`` (a link, a directory made) must be durable at :meth:`links`."""
        (self.synced_dirs if covered else self.dirs)[path] = None

    def created(self, path: Path) -> None:
        """``path`` was just made (a new mailbox or folder): its entries too, at :meth:`links`
        (at once when the syncfs does not cover it: the folder is not made again, so a later
        batch would not fsync it)."""
        if self.fd is not None and os.stat(path).st_dev == self.dev:
            self.synced_dirs[os.fspath(path)] = None
        else:
            _fsync_dir(path)

    def contents(self) -> None:
        """Make the contents of the files written so far durable."""
        if self.unsynced and not self._syncfs():
            for path in self.unsynced:  # no syncfs after all: one fsync each
                fd = os.open(path, os.O_RDONLY)
                try:
                    os.fsync(fd)
                finally:
                    os.close(fd)
        self.unsynced.clear()

    def links(self) -> None:
        """Make the links (and the directories created) so far durable."""
        if self.synced_dirs and not self._syncfs():
            self.dirs.update(self.synced_dirs)
        self.synced_dirs.clear()
        for path in list(self.dirs):
            _fsync_dir(path)
            del self.dirs[path]

    def _syncfs(self) -> bool:
        """One syncfs; False (and fsync from now on) when the system will not do it."""
        global _SYNCFS
        if self.fd is None or _SYNCFS is None:
            return False
        if _SYNCFS(self.fd) == 0:
            return True
        err = ctypes.get_errno()
        if err in _NO_SYNCFS:
            cause = errno.errorcode.get(err, str(err))
            log.warning("syncfs is not available (%s): Maildir deliveries fsync each file", cause)
            _SYNCFS = None
            return False
        raise OSError(err, os.strerror(err))


def write_atomic(
    maildir: Path, name: str, data: bytes, *, subdir: str = "new", mtime: float | None = None
) -> Path | None:
    """Write ``data`` to ``maildir/tmp``, fsync it, link it as ``maildir/<subdir>/<name>``.

    Returns the final path, or None when ``<subdir>/<name>`` already exists (nothing is
    written then). The destination directory is fsynced, so the message survives a crash.
    ``mtime`` (IMAP INTERNALDATE in Maildir) is set before the file becomes visible.
    """
    tmp = maildir / "tmp" / f"{name}.{os.getpid()}.{secrets.token_hex(6)}"
    dest = maildir / subdir / name
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        write_all(fd, data)
        if mtime is not None:
            os.utime(fd, (mtime, mtime))
        os.fsync(fd)
    except BaseException:
        os.close(fd)
        os.unlink(tmp)
        raise
    os.close(fd)
    try:
        # link, not rename: it fails instead of replacing an existing file.
        os.link(tmp, dest)
    except FileExistsError:
        return None
    finally:
        os.unlink(tmp)
    _fsync_dir(dest.parent)
    return dest


class MaildirStore:
    """All mailboxes of the provider, one Maildir++ tree per address under ``root``.

    The methods are synchronous (filesystem work); async callers use ``asyncio.to_thread``.
    """

    def __init__(self, root: Path, *, sync: SyncMode | None = None) -> None:
        self.root = Path(root)
        mode = sync or os.environ.get("PECD_MAILDIR_SYNC", "auto")
        self.sync: SyncMode = "fsync" if mode == "fsync" else "auto"
        # (address, folder) -> (mailbox root, folder path, its st_dev) of folders known to
        # exist: checking and creating the tree costs a dozen system calls that every delivery
        # would repeat. The paths as strings, which the delivery builds its own from.
        self._ready: dict[tuple[str, str], tuple[str, str, int]] = {}
        self._root_resolved: Path | None = None

    # -- addressing -------------------------------------------------------------------------

    def path_for(self, address: str) -> Path:
        """The Maildir++ root of ``address``: ``root/<domain>/<localpart>`` (lowercased).

        Raises ValueError for addresses that are malformed or could name a path outside root.
        """
        canonical = normalize_address(address)
        local, at, domain = canonical.rpartition("@")
        if not at or not local or not domain:
            raise ValueError(f"not a mailbox address: {address!r}")
        for part in (local, domain):
            if (
                _BAD_CHARS.search(part)
                or part.startswith(".")
                or ".." in part
                or len(part.encode("utf-8")) > 255
            ):
                raise ValueError(f"address {address!r} cannot name a mailbox directory")
        path = self.root / domain / local
        # Belt and braces: the checks above already exclude every way out of root.
        if self._root_resolved is None:
            self._root_resolved = self.root.resolve()
        if not path.resolve().is_relative_to(self._root_resolved):
            raise ValueError(f"address {address!r} cannot name a mailbox directory")
        return path

    def folder_path(self, address: str, folder: str = INBOX) -> Path:
        """The Maildir directory (holding cur/new/tmp) of one folder of ``address``."""
        base = self.path_for(address)
        sub = folder_dir(folder)
        return base / sub if sub else base

    # -- creation ---------------------------------------------------------------------------

    def ensure(self, address: str) -> Path:
        """Create the mailbox with INBOX and the FOLDERS if missing; return its root."""
        return self._ensure(address, _fsync_dir)

    def _ensure(self, address: str, sync_dir: Callable[[Path], None]) -> Path:
        base = self.path_for(address)
        self._ensure_folder(base, INBOX, sync_dir)
        for folder in FOLDERS:
            self._ensure_folder(base, folder, sync_dir)
        return base

    def _ensure_folder(
        self, base: Path, folder: str, sync_dir: Callable[[Path], None] = _fsync_dir
    ) -> Path:
        sub = folder_dir(folder)
        path = base / sub if sub else base
        if all((path / d).is_dir() for d in _SUBDIRS):
            return path
        created = False
        for parent in reversed((path, *path.parents)):
            if parent.is_dir():
                continue
            with contextlib.suppress(FileExistsError):
                parent.mkdir(mode=0o700)
                created = True
        for d in _SUBDIRS:
            with contextlib.suppress(FileExistsError):
                (path / d).mkdir(mode=0o700)
                created = True
        if sub:
            # Maildir++ marks subfolders with an empty "maildirfolder" file (Dovecot, pymap).
            (path / "maildirfolder").touch(exist_ok=True)
        if created:
            sync_dir(path)
            sync_dir(path.parent)
        return path

    # -- delivery ---------------------------------------------------------------------------

    @staticmethod
    def name_for(key: str) -> str:
        """The base file name (without ``,S=``) a delivery key maps to."""
        return hashlib.sha256(key.encode("utf-8")).hexdigest()[:_KEY_HEX]

    def deliver(
        self,
        address: str,
        key: str,
        data: bytes,
        *,
        folder: str = INBOX,
        quota_bytes: int | None = None,
        fresh: bool = False,
    ) -> Delivered:
        """Store one message atomically and idempotently (see the module docstring).

        Raises MailboxFull (and stores nothing) when ``quota_bytes`` is set and the mailbox
        usage plus this message would exceed it. ``fresh``: ``key`` has never been delivered
        anywhere, by anyone, including an earlier try of this very delivery: the search for an
        earlier copy is skipped, and only a file of the same name in ``new/`` is seen (not one
        moved to ``cur/``, not one of another size), so a wrong ``fresh`` makes a second copy.
        """
        [result] = self.deliver_many([Parcel(address, key, data, folder, quota_bytes)], fresh=fresh)
        if isinstance(result, Exception):
            raise result
        return result

    def deliver_many(
        self, parcels: Sequence[Parcel], *, fresh: bool = False
    ) -> list[Delivered | Exception]:
        """Store each parcel as :meth:`deliver` does, made durable together (see the module
        docstring; ``fresh`` for every parcel, else the parcel's own): per parcel, in order,
        its Delivered, or the exception that stopped it
        (MailboxFull, an OSError...). One parcel failing does not stop the others; a flush that
        fails fails them all (what was linked stays, for a retry to find and flush again).

        ``fresh`` (here or a parcel's) promises that the key was never delivered before this
        call: not by an earlier call, not by a try that failed (its file may be linked, and
        moved to ``cur/`` since), not by another worker. A key that comes twice in one batch,
        fresh or not, is stored once: the later parcels get the first one's outcome (its file,
        created False; or its failure)."""
        if not parcels:
            return []
        results: list[Delivered | Exception | None] = [None] * len(parcels)
        flush = _Flush(self.root, self.sync)
        staged: list[_Staged] = []
        # The tmp files' unique suffixes: the pid (a system call each time) and random bytes
        # taken once for the whole batch, not once per file.
        pid = os.getpid()
        tokens = secrets.token_hex(_TOKEN_BYTES * len(parcels))
        try:
            for i, parcel in enumerate(parcels):
                token = tokens[2 * _TOKEN_BYTES * i : 2 * _TOKEN_BYTES * (i + 1)]
                try:
                    staged.append(self._stage(i, parcel, flush, f".{pid}.{token}"))
                except FileNotFoundError:
                    # The tree changed under us (a mailbox removed by hand): make it again, once.
                    self._ready.pop((normalize_address(parcel.address), parcel.folder), None)
                    try:
                        suffix = f".{pid}.{secrets.token_hex(_TOKEN_BYTES)}"
                        staged.append(self._stage(i, parcel, flush, suffix))
                    except Exception as exc:
                        results[i] = exc
                except Exception as exc:
                    results[i] = exc
            try:
                flush.contents()
            except OSError as exc:  # nothing is linked: the finally removes every tmp file
                for st in staged:
                    results[st.index] = exc
                return self._finished(results)
            self._link_all(staged, parcels, results, flush, fresh)
            try:
                flush.links()
            except OSError as exc:
                # The files linked stay: their contents are durable and their names derive from
                # their keys, so a retry (or a concurrent delivery of a key) finds them, and
                # reports them delivered only once a flush of its own has made them durable.
                for st in staged:
                    results[st.index] = exc
        finally:
            for st in staged:
                with contextlib.suppress(OSError):
                    os.unlink(st.tmp)
            flush.close()
        return self._finished(results)

    @staticmethod
    def _finished(results: list[Delivered | Exception | None]) -> list[Delivered | Exception]:
        return [r if r is not None else OSError(errno.EIO, "not delivered") for r in results]

    def _stage(self, index: int, parcel: Parcel, flush: _Flush, suffix: str) -> _Staged:
        """Write the parcel into its folder's tmp/ (made durable by ``flush``), named
        ``<name>`` + ``suffix`` (``.<pid>.<12 hex digits>``)."""
        canonical = normalize_address(parcel.address)
        ready = self._ready.get((canonical, parcel.folder))
        if ready is None:
            base_path = self._ensure(parcel.address, flush.created)
            folder_path = self._ensure_folder(base_path, parcel.folder, flush.created)
            ready = os.fspath(base_path), os.fspath(folder_path), os.stat(folder_path).st_dev
            self._ready[(canonical, parcel.folder)] = ready
        base, path, dev = ready
        covered = flush.covers(dev)
        body = to_crlf(parcel.data)
        stem = self.name_for(parcel.key)
        name = f"{stem},S={len(body)}"
        tmp = f"{path}/tmp/{name}{suffix}"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            written = os.write(fd, body)
            if written < len(body):
                write_all(fd, body[written:])  # a short write: rare on a file
            # The mtime is the arrival time, to the microsecond: files not numbered yet get
            # their UIDs in mtime order (pecd.mailbox.uidlist), and the kernel's own file
            # times are too coarse (a few ms) to order deliveries made in quick succession.
            now = time.time()
            os.utime(fd, (now, now))
            if not covered:
                os.fsync(fd)
        except BaseException:
            os.close(fd)
            os.unlink(tmp)
            raise
        os.close(fd)
        if covered:
            flush.unsynced.append(tmp)
        return _Staged(index, canonical, base, path, name, stem, len(body), tmp, covered)

    def _link_all(
        self,
        staged: list[_Staged],
        parcels: Sequence[Parcel],
        results: list[Delivered | Exception | None],
        flush: _Flush,
        fresh: bool,
    ) -> None:
        """Link every staged file into new/, a mailbox at a time under its lock."""
        by_mailbox: dict[str, list[_Staged]] = {}
        for st in staged:
            if results[st.index] is None:
                by_mailbox.setdefault(st.base, []).append(st)
        for base, group in by_mailbox.items():
            try:
                # The lock makes check-then-link atomic among pecd deliverers: without it two
                # deliveries of one key could both pass the check while an IMAP server moves
                # the first file from new/ to cur/ in between.
                with self._delivery_lock(base):
                    stems: dict[str, set[str]] = {}
                    for st in group:
                        if not (fresh or parcels[st.index].fresh):
                            stems.setdefault(st.path, set()).add(st.stem)
                    found: dict[str, dict[str, str]] = {}
                    used: dict[str, int] = {}
                    # A key's first parcel in this batch, by folder and name, and its outcome:
                    # a later one of the same key gets the same (even when fresh, which would
                    # not search the folder: otherwise two files if the sizes differ).
                    first: dict[tuple[str, str], Delivered | Exception] = {}
                    for st in group:
                        parcel = parcels[st.index]
                        same = (st.path, st.stem)
                        earlier = first.get(same)
                        if isinstance(earlier, Delivered):
                            flush.directory(os.fspath(earlier.path.parent), st.covered)
                            results[st.index] = Delivered(earlier.path, created=False)
                            continue
                        if earlier is not None:
                            results[st.index] = earlier
                            continue
                        try:
                            outcome: Delivered | Exception = self._link(
                                st, parcel, stems, found, used, fresh, flush
                            )
                        except Exception as exc:
                            if isinstance(exc, FileNotFoundError):
                                self._ready.pop((st.address, parcel.folder), None)
                            outcome = exc
                        results[st.index] = first[same] = outcome
            except OSError as exc:  # the lock itself
                for st in group:
                    if results[st.index] is None:
                        results[st.index] = exc

    def _link(
        self,
        st: _Staged,
        parcel: Parcel,
        stems: dict[str, set[str]],
        found: dict[str, dict[str, str]],
        used: dict[str, int],
        fresh: bool,
        flush: _Flush,
    ) -> Delivered:
        stem = st.stem
        fresh = fresh or parcel.fresh
        if not fresh:
            if st.path not in found:
                found[st.path] = self._existing(st.path, stems[st.path])
            existing = found[st.path].get(stem)
            if existing is not None:
                flush.directory(os.path.dirname(existing), st.covered)
                return Delivered(Path(existing), created=False)
        if parcel.quota_bytes is not None:
            if st.address not in used:
                used[st.address] = self.usage(st.address)
            if used[st.address] + st.size > parcel.quota_bytes:
                raise MailboxFull(st.address, used[st.address], parcel.quota_bytes)
        new = f"{st.path}/new"
        dest = f"{new}/{st.name}"
        try:
            # link, not rename: it fails instead of replacing an existing file.
            os.link(st.tmp, dest)
        except FileExistsError:  # someone else linked the same name meanwhile
            flush.directory(new, st.covered)
            return Delivered(Path(dest), created=False)
        flush.directory(new, st.covered)
        if not fresh:
            found[st.path][stem] = dest
        if parcel.quota_bytes is not None:
            used[st.address] += st.size
        return Delivered(Path(dest), created=True)

    @contextlib.contextmanager
    def _delivery_lock(self, base: str) -> Iterator[None]:
        fd = os.open(f"{base}/{_LOCK_NAME}", os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)

    @staticmethod
    def _existing(path: str, stems: set[str]) -> dict[str, str]:
        """The files of a folder whose names derive from ``stems`` (what :meth:`name_for`
        gives), by stem: one read of the folder for every parcel of a batch that goes there."""
        # new/ before cur/: an IMAP server only ever moves new -> cur, so this order cannot
        # miss a file that is being claimed while we look.
        found: dict[str, str] = {}
        for sub in ("new", "cur"):
            with os.scandir(f"{path}/{sub}") as entries:
                for entry in entries:
                    name = entry.name
                    stem = name[:_KEY_HEX]
                    if (
                        stem in stems
                        and stem not in found
                        and name[_KEY_HEX : _KEY_HEX + 1] in ("", ",", ":")
                    ):
                        found[stem] = entry.path
        return found

    # -- inspection -------------------------------------------------------------------------

    def usage(self, address: str) -> int:
        """Bytes used by all folders of the mailbox (0 for a mailbox not created yet)."""
        base = self.path_for(address)
        if not base.is_dir():
            return 0
        total = 0
        for folder_path in self._folder_paths(base):
            for sub in ("new", "cur"):
                total += self._dir_usage(folder_path / sub)
        return total

    @staticmethod
    def _folder_paths(base: Path) -> Iterator[Path]:
        yield base
        with os.scandir(base) as entries:
            for entry in entries:
                if entry.name.startswith(".") and entry.is_dir():
                    yield Path(entry.path)

    @staticmethod
    def _dir_usage(path: Path) -> int:
        total = 0
        try:
            entries = os.scandir(path)
        except FileNotFoundError:
            return 0
        with entries:
            for entry in entries:
                match = _SIZE_RE.search(entry.name.split(":", 1)[0])
                if match:
                    total += int(match.group(1))
                    continue
                # A file expunged or moved while we look counts as gone.
                with contextlib.suppress(FileNotFoundError):
                    total += entry.stat().st_size
        return total

    # -- leftovers ----------------------------------------------------------------------------

    def clean_tmp(
        self,
        *,
        now: float | None = None,
        stop: threading.Event | None = None,
        batch: int = 500,
        pause: float = 0.01,
    ) -> int:
        """Remove the leftovers of killed writers from every folder's ``tmp/``: files older than
        36 hours (:data:`TMP_MAX_AGE_SECONDS`), or an hour for pecd's own. Recent files are
        never touched: with several nodes on shared storage another one may be writing them.
        Meant for a thread at startup: it walks the tree lazily, sleeps ``pause`` every
        ``batch`` entries so that it does not monopolise the disk, and ends early when ``stop``
        is set. Returns how many files it removed."""
        now = time.time() if now is None else now
        removed = 0
        seen = 0
        for tmp in self._tmp_dirs():
            try:
                entries = os.scandir(tmp)
            except (FileNotFoundError, NotADirectoryError, PermissionError):
                continue
            with entries:
                for entry in entries:
                    seen += 1
                    if seen % batch == 0:
                        if stop is not None and stop.is_set():
                            return removed
                        time.sleep(pause)
                    limit = (
                        OWN_TMP_MAX_AGE_SECONDS
                        if _OWN_TMP_RE.match(entry.name)
                        else TMP_MAX_AGE_SECONDS
                    )
                    try:
                        st = entry.stat(follow_symlinks=False)
                        if not entry.is_file(follow_symlinks=False) or now - st.st_mtime < limit:
                            continue
                        os.unlink(entry.path)
                    except (FileNotFoundError, PermissionError):
                        continue
                    removed += 1
        return removed

    def _tmp_dirs(self) -> Iterator[Path]:
        """Every folder's tmp/ of every mailbox: ``root/<domain>/<local>[/.<folder>]/tmp``."""
        for domain in _subdirs(self.root):
            for mailbox in _subdirs(domain):
                yield mailbox / "tmp"
                for folder in _subdirs(mailbox):
                    if folder.name.startswith("."):
                        yield folder / "tmp"

    def list_folder(self, address: str, folder: str = INBOX) -> list[Path]:
        """The message files of one folder (new/ and cur/), sorted by name."""
        path = self.folder_path(address, folder)
        found: list[Path] = []
        for sub in ("new", "cur"):
            try:
                with os.scandir(path / sub) as entries:
                    found.extend(Path(e.path) for e in entries if not e.name.startswith("."))
            except FileNotFoundError:
                continue
        return sorted(found, key=lambda p: p.name)


@dataclass(frozen=True, slots=True)
class _Staged:
    """A parcel written into its folder's tmp/, waiting for its link."""

    index: int
    address: str  # normalised
    base: str  # the mailbox root (its lock)
    path: str  # the folder
    name: str  # in new/
    stem: str  # what the key maps to (name_for), the start of ``name``
    size: int
    tmp: str
    covered: bool  # made durable by syncfs (else fsynced itself, its directory later)


def _subdirs(path: Path) -> Iterator[Path]:
    try:
        entries = os.scandir(path)
    except (FileNotFoundError, NotADirectoryError, PermissionError):
        return
    with entries:
        for entry in entries:
            with contextlib.suppress(OSError):
                if entry.is_dir(follow_symlinks=False):
                    yield Path(entry.path)


async def start_tmp_cleanup(store: MaildirStore, stack: contextlib.AsyncExitStack) -> None:
    """:meth:`MaildirStore.clean_tmp` in a thread, beside the server's startup (never in its
    way); stopped with ``stack``."""
    stop = threading.Event()

    def run() -> None:
        try:
            n = store.clean_tmp(stop=stop)
        except Exception:
            log.exception("cleaning the Maildir tmp/ folders failed")
            return
        if n:
            log.info("removed %d leftover files from Maildir tmp/ folders", n)

    task = asyncio.create_task(asyncio.to_thread(run), name="maildir-tmp-cleanup")

    async def end() -> None:
        stop.set()
        await asyncio.gather(task, return_exceptions=True)

    stack.push_async_callback(end)
