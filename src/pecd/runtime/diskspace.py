"""Local storage faults: which failures are the machine's for a while (a full or failing disk, a
database that cannot be reached) rather than a message's, a rate-limited alert while they last,
and the free-space probe the access point asks before taking a message.

A transient local fault is not a legal non-delivery: a job that meets one waits, uncounted (it is
never parked), and resumes by itself when the fault clears; the 12 h / 24 h preavviso timers go on
as the rules' clock meanwhile. Only a permanent cause (a mailbox over its quota, a mailbox that does
not exist) is answered errore-consegna.

Errno values taken as transient:

* wherever met (:data:`STORAGE_ERRNOS`): ``ENOSPC`` (filesystem full), ``EDQUOT`` (the *pecd
  user's* filesystem quota: not a mailbox quota, which is
  :class:`~pecd.mailbox.maildir.MailboxFull` and permanent), ``EIO`` (a failing disk or network
  filesystem), ``EROFS`` (remounted read-only after errors), ``ESTALE`` (NFS);
* by a Maildir delivery (:data:`TRANSIENT_ERRNOS`), also ``ENOMEM``, ``EAGAIN``, ``EBUSY``,
  ``EINTR``, ``ENFILE``, ``EMFILE``, ``ENOLCK`` (resources of the machine, not of the message;
  elsewhere, a socket's say, they may be the far end's doing);
* SQLite's "database or disk is full", "disk I/O error", "unable to open database file",
  "database is locked", and a PostgreSQL connection lost or refused, or out of resources
  (SQLSTATE 08, 53, 57P): the cause ``database``.

Everything else (``EACCES``, ``EPERM``, ``ENOENT``, ``ENAMETOOLONG``, ``EINVAL``…) stays a failure
of the job: retried with backoff, then parked; a delivery failing so on its last attempt is
answered errore-consegna 5.3.0.
"""

from __future__ import annotations

import errno
import logging
import os
import sqlite3
import threading
import time
from collections import Counter
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from prometheus_client import Counter as PromCounter

from pecd.engine.effects import Unavailable

if TYPE_CHECKING:
    from pecd.config import Config

log = logging.getLogger(__name__)

#: A filesystem full or failing: transient wherever it is met (a commit, a spool file).
STORAGE_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EIO, errno.EROFS, errno.ESTALE})
#: Transient when a Maildir delivery meets them: also the machine's resources, which elsewhere
#: (a webhook's socket, say) may be the far end's doing and must not keep a job for ever.
TRANSIENT_ERRNOS = STORAGE_ERRNOS | {
    errno.ENOMEM,
    errno.EAGAIN,
    errno.EBUSY,
    errno.EINTR,
    errno.ENFILE,
    errno.EMFILE,
    errno.ENOLCK,
}

# SQLite's texts for a full or failing disk and an unreachable file (sqlite3.OperationalError).
_SQLITE_TRANSIENT = (
    "database or disk is full",
    "disk i/o error",
    "unable to open database file",
    "database is locked",
)

#: Transient faults met, by cause (``ENOSPC``, ``EIO``, ``database``…); also on /metrics.
FAULTS: Counter[str] = Counter()
STORAGE_FAULTS = PromCounter(
    "pecd_storage_faults_total",
    "Transient local storage faults met by jobs (they wait, never parked), by cause",
    ["cause"],
)

ALERT_INTERVAL = 60.0  # seconds between two alert lines about one cause


class StorageUnavailable(Unavailable):
    """Local storage cannot take a write now (a full or failing filesystem): the job waits,
    uncounted, and is tried again; it is never answered errore-consegna for it."""


def causes(exc: BaseException) -> Iterator[BaseException]:
    """``exc``, then what it wraps (a DBAPIError's driver error) or was caused by, each once."""
    seen: set[int] = set()
    e: BaseException | None = exc
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        yield e
        orig = getattr(e, "orig", None)  # sqlalchemy.exc.DBAPIError wraps the driver's error
        if isinstance(orig, BaseException) and id(orig) not in seen:
            e = orig
            continue
        e = e.__cause__ or e.__context__


def transient_cause(exc: BaseException) -> str | None:
    """The cause (an errno name, or ``database``) when ``exc`` (or what caused it) is a transient
    local fault; None when it is the job's own failure."""
    for e in causes(exc):
        if isinstance(e, StorageUnavailable):
            return str(e).split(":", 1)[0] or "storage"
        if isinstance(e, OSError) and e.errno in STORAGE_ERRNOS:
            return errno.errorcode.get(e.errno, str(e.errno))
        if isinstance(e, sqlite3.OperationalError) and str(e).lower().startswith(_SQLITE_TRANSIENT):
            return "database"
        if _database_unreachable(e):
            return "database"
    return None


_PG_DISK_FULL = "53100"


def no_space(exc: BaseException) -> bool:
    """Whether ``exc``, or what caused it, says a filesystem or the database is out of space:
    ``ENOSPC``, ``EDQUOT`` (the pecd user's filesystem quota), SQLite's "database or disk is
    full" (``SQLITE_FULL``), PostgreSQL's ``disk_full`` (SQLSTATE 53100)."""
    for e in causes(exc):
        if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        if isinstance(e, sqlite3.Error) and (
            getattr(e, "sqlite_errorcode", None) == sqlite3.SQLITE_FULL
            or str(e).lower().startswith("database or disk is full")
        ):
            return True
        if (getattr(e, "sqlstate", None) or getattr(e, "pgcode", None)) == _PG_DISK_FULL:
            return True
    return False


def connection_lost(exc: BaseException) -> bool:
    """Whether ``exc``, or what caused it, is a database connection lost or refused (SQLSTATE
    class 08, or one SQLAlchemy invalidated): a commit's outcome is then unknown."""
    for e in causes(exc):
        if getattr(e, "connection_invalidated", False):
            return True
        state = getattr(e, "sqlstate", None) or getattr(e, "pgcode", None)
        if isinstance(state, str) and state.startswith("08"):
            return True
    return False


def _database_unreachable(e: BaseException) -> bool:
    """A PostgreSQL connection lost or refused, or its disk full (SQLSTATE class 08, 53, 57P)."""
    if getattr(e, "connection_invalidated", False):
        return True
    state = getattr(e, "sqlstate", None) or getattr(e, "pgcode", None)
    return isinstance(state, str) and state.startswith(("08", "53", "57P"))


def unavailable(exc: OSError) -> StorageUnavailable:
    """``exc`` (a transient OSError) as the StorageUnavailable a stage waits on."""
    cause = errno.errorcode.get(exc.errno or 0, "storage")
    return StorageUnavailable(f"{cause}: {exc}")


class Alerts:
    """One WARNING line per cause at most every :data:`ALERT_INTERVAL` seconds, with how many
    faults of that cause were met since the last line."""

    def __init__(self, interval: float = ALERT_INTERVAL) -> None:
        self.interval = interval
        self._last: dict[str, float] = {}
        self._pending: Counter[str] = Counter()
        self._lock = threading.Lock()

    def fault(self, cause: str, detail: str) -> None:
        FAULTS[cause] += 1
        STORAGE_FAULTS.labels(cause).inc()
        now = time.monotonic()
        with self._lock:
            self._pending[cause] += 1
            last = self._last.get(cause)
            if last is not None and now - last < self.interval:
                return
            count = self._pending.pop(cause)
            self._last[cause] = now
        log.warning(
            "ALERT storage fault %s: met %d times since the last alert; jobs wait (never parked, "
            "no errore-consegna) and are retried until it clears; last: %s",
            cause,
            count,
            detail,
        )


ALERTS = Alerts()


# --- free space, for the access point ------------------------------------------------------------

PROBE_TTL = 1.0  # seconds a free-space reading is reused
#: The access point's answer while a filesystem it writes to is (nearly) full (RFC 3463 4.3.1).
INSUFFICIENT_STORAGE = "452 4.3.1 Insufficient system storage"


def free_bytes(path: Path) -> int:
    """Bytes an unprivileged writer may still use on ``path``'s filesystem."""
    st = os.statvfs(path)
    return st.f_bavail * st.f_frsize


def storage_watch(cfg: Config) -> tuple[tuple[Path, ...], int]:
    """What every intake (the SMTP points, the web's submissions) watches before taking a
    message: the data and Maildir filesystems, and room there for two of the largest messages;
    below it, 452 4.3.1 (SMTP) or 503 (web)."""
    return (cfg.storage.data_dir, cfg.maildir_root), 2 * cfg.limits.max_message_size


class FreeSpace:
    """Whether every one of ``paths`` has at least ``minimum`` bytes free, read at most every
    :data:`PROBE_TTL` seconds (a submission per millisecond does not call statvfs each)."""

    def __init__(self, paths: Sequence[Path], minimum: int) -> None:
        self.paths = list(dict.fromkeys(paths))
        self.minimum = minimum
        self._at = -PROBE_TTL
        self._ok = True

    def enough(self, *, fresh: bool = False) -> bool:
        now = time.monotonic()
        if fresh or now - self._at >= PROBE_TTL:
            self._ok = all(self._enough(p) for p in self.paths)
            self._at = now
        return self._ok

    def _enough(self, path: Path) -> bool:
        try:
            return free_bytes(path) >= self.minimum
        except OSError:
            return True  # a path that cannot be read (not made yet): the writes will tell
