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
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import hashlib
import logging
import os
import re
import secrets
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from pecd.pec.address import normalize_address

log = logging.getLogger(__name__)

__all__ = [
    "FOLDERS",
    "INBOX",
    "Delivered",
    "MailboxFull",
    "MaildirStore",
    "folder_dir",
    "to_crlf",
    "write_atomic",
]

INBOX = "INBOX"
#: The folders every mailbox gets, as IMAP names (clients find them by these names).
FOLDERS: tuple[str, ...] = ("Sent", "Drafts", "Trash", "Junk", "Archive")
#: IMAP hierarchy delimiter used for folder names given to this module (pymap uses "/").
DELIMITER = "/"

_SUBDIRS = ("cur", "new", "tmp")
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


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


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
        view = memoryview(data)
        while view:
            written = os.write(fd, view)
            view = view[written:]
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

    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        # (address, folder) -> (mailbox root, folder path) of folders known to exist: checking
        # and creating the tree costs a dozen system calls that every delivery would repeat.
        self._ready: dict[tuple[str, str], tuple[Path, Path]] = {}

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
        if not path.resolve().is_relative_to(self.root.resolve()):
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
        base = self.path_for(address)
        self._ensure_folder(base, INBOX)
        for folder in FOLDERS:
            self._ensure_folder(base, folder)
        return base

    def _ensure_folder(self, base: Path, folder: str) -> Path:
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
            _fsync_dir(path)
            _fsync_dir(path.parent)
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

        Raises MailboxFull (before writing anything) when ``quota_bytes`` is set and the
        mailbox usage plus this message would exceed it. ``fresh``: ``key`` has never been
        delivered anywhere (skip the search for an earlier copy; ``new/`` is still checked).
        """
        try:
            return self._deliver(address, key, data, folder, quota_bytes, fresh)
        except FileNotFoundError:
            # The tree changed under us (a mailbox removed by hand): make it again, once.
            self._ready.pop((normalize_address(address), folder), None)
            return self._deliver(address, key, data, folder, quota_bytes, fresh)

    def _deliver(
        self,
        address: str,
        key: str,
        data: bytes,
        folder: str,
        quota_bytes: int | None,
        fresh: bool = False,
    ) -> Delivered:
        ready = self._ready.get((normalize_address(address), folder))
        if ready is None:
            base = self.ensure(address)
            ready = base, self._ensure_folder(base, folder)
            self._ready[(normalize_address(address), folder)] = ready
        base, path = ready
        stem = self.name_for(key)
        body = to_crlf(data)
        name = f"{stem},S={len(body)}"
        # The lock makes check-then-link atomic among pecd deliverers: without it two
        # deliveries of one key could both pass the check while an IMAP server moves the first
        # file from new/ to cur/ in between.
        with self._delivery_lock(base):
            existing = None if fresh else self._find(path, stem)
            if existing is not None:
                return Delivered(existing, created=False)
            if quota_bytes is not None:
                used = self.usage(address)
                if used + len(body) > quota_bytes:
                    raise MailboxFull(normalize_address(address), used, quota_bytes)
            # The mtime is the arrival time, to the microsecond: files not numbered yet get
            # their UIDs in mtime order (pecd.mailbox.uidlist), and the kernel's own file
            # times are too coarse (a few ms) to order deliveries made in quick succession.
            dest = write_atomic(path, name, body, mtime=time.time())
            if dest is None:  # someone else linked the same name meanwhile
                return Delivered(path / "new" / name, created=False)
            return Delivered(dest, created=True)

    @contextlib.contextmanager
    def _delivery_lock(self, base: Path) -> Iterator[None]:
        fd = os.open(base / _LOCK_NAME, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)

    @staticmethod
    def _find(path: Path, stem: str) -> Path | None:
        # new/ before cur/: an IMAP server only ever moves new -> cur, so this order cannot
        # miss a file that is being claimed while we look.
        for sub in ("new", "cur"):
            with os.scandir(path / sub) as entries:
                for entry in entries:
                    base = entry.name.split(":", 1)[0]
                    if base == stem or base.startswith(stem + ","):
                        return Path(entry.path)
        return None

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
