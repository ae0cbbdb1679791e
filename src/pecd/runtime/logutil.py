"""Logging of failures that repeat once per event during an outage (the database down, a full
disk): one WARNING line per kind of failure at most every ``every`` seconds, saying how many
were left out since the last, and the traceback only the first time a kind is seen (after that
at DEBUG). A 20-second database stop under load is then a few lines, not megabytes of the same
traceback."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable

DEFAULT_EVERY_SECONDS = 10.0


class RateLimitedLog:
    """``limited.failure(log, "what failed", exc)`` in an ``except`` block."""

    def __init__(
        self,
        every: float = DEFAULT_EVERY_SECONDS,
        *,
        clock: Callable[[], float] = time.monotonic,
        max_kinds: int = 256,
    ) -> None:
        self.every = every
        self.clock = clock
        self.max_kinds = max_kinds
        self._lock = threading.Lock()
        self._last: dict[tuple[str, str], float] = {}  # kind: when last logged
        self._suppressed: dict[tuple[str, str], int] = {}
        self._seen: set[tuple[str, str]] = set()  # kinds whose traceback has been logged

    @staticmethod
    def kind(what: str, exc: BaseException) -> tuple[str, str]:
        """A kind of failure: what failed and the exception's class (not its text, which
        often holds an address or a key that differs every time)."""
        return what, f"{type(exc).__module__}.{type(exc).__qualname__}"

    def failure(
        self,
        logger: logging.Logger,
        what: str,
        exc: BaseException,
        *args: object,
        level: int = logging.WARNING,
    ) -> bool:
        """Log that ``what`` (a %-format with ``args``) failed with ``exc``, unless the same
        kind was logged less than ``every`` seconds ago. Returns whether a line was written."""
        key = self.kind(what, exc)
        now = self.clock()
        with self._lock:
            last = self._last.get(key)
            if last is not None and now - last < self.every:
                self._suppressed[key] = self._suppressed.get(key, 0) + 1
                suppressed = -1
            else:
                if len(self._last) >= self.max_kinds and key not in self._last:
                    self._last.clear()
                    self._suppressed.clear()
                self._last[key] = now
                suppressed = self._suppressed.pop(key, 0)
            first = key not in self._seen
            if first and len(self._seen) < self.max_kinds:
                self._seen.add(key)
        if suppressed < 0:
            if logger.isEnabledFor(logging.DEBUG):
                logger.debug(what + ": %s", *args, _describe(exc), exc_info=exc)
            return False
        more = f" ({suppressed} more like it not logged)" if suppressed else ""
        logger.log(
            level,
            what + ": %s%s",
            *args,
            _describe(exc),
            more,
            exc_info=exc if first else None,
        )
        return True


def _describe(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    first = text[0] if text else ""
    if len(first) > 300:
        first = first[:300] + "..."
    return f"{type(exc).__name__}: {first}" if first else type(exc).__name__
