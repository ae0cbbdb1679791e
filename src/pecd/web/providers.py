"""The provider index as the web process sees it, one copy per process, shared by the pages
that verify a signer (the reading page, /verify)."""

from __future__ import annotations

import asyncio
import logging
import time

from pecd.config import Config
from pecd.index.model import ProviderIndex
from pecd.index.service import load_index_report

__all__ = ["IndexCache", "provider_index"]

log = logging.getLogger(__name__)

_CACHES: dict[int, IndexCache] = {}


class IndexCache:
    """The installation's provider index as the web process sees it: loaded (in a thread) on
    first use and again after ``index.reload_seconds``, as the mail processes reload theirs.
    When it cannot be loaded, ``error`` says why and the last good copy (if any) is kept."""

    def __init__(self, cfg: Config) -> None:
        self.cfg = cfg
        self._index: ProviderIndex | None = None
        self._loaded_at = -float("inf")
        self._lock = asyncio.Lock()
        self.error: str | None = None

    async def get(self) -> ProviderIndex | None:
        async with self._lock:
            if time.monotonic() - self._loaded_at >= self.cfg.index.reload_seconds:
                self._loaded_at = time.monotonic()
                try:
                    loaded = await asyncio.to_thread(load_index_report, self.cfg)
                except Exception as exc:  # any failure: keep the last good copy
                    self.error = str(exc) or type(exc).__name__
                    log.warning("provider index not available to the web: %s", self.error)
                else:
                    self._index, self.error = loaded.index, None
            return self._index


def provider_index(cfg: Config) -> IndexCache:
    """The process's one :class:`IndexCache` for ``cfg`` (the same object for every page)."""
    cache = _CACHES.get(id(cfg))
    if cache is None or cache.cfg is not cfg:
        cache = _CACHES[id(cfg)] = IndexCache(cfg)
    return cache
