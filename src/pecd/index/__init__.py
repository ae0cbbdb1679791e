"""Indice dei gestori PEC: who the other providers are, which domains they serve, which
certificates sign for them, and where their service mailbox is (spec section 8).

Loaded from a local copy of the LDIF (plain, or signed as a ``.p7m`` whose signer must be the
configured certificate), always with this provider's own entry added, kept in memory, reloaded on
an interval and on demand (SIGHUP). A reload that fails keeps the last good copy.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import serialization

from pecd.config import Config, ConfigError
from pecd.index.ldif import LdifError, entry_ldif, parse_ldif, write_ldif
from pecd.index.model import ProviderEntry, ProviderIndex, certificate_sha1
from pecd.index.signed import SignedIndexError, sign_index, unwrap_signed_index

__all__ = [
    "IndexError_",
    "IndexService",
    "LdifError",
    "ProviderEntry",
    "ProviderIndex",
    "certificate_sha1",
    "entry_ldif",
    "load_index",
    "own_entry",
    "parse_ldif",
    "sign_index",
    "write_ldif",
]

log = logging.getLogger(__name__)


class IndexError_(ConfigError):
    """The index file cannot be used; ``str()`` says why in one line."""


def own_entry(cfg: Config) -> ProviderEntry:
    """This provider's entry, from its config and signing certificate."""
    der = x509.load_pem_x509_certificate(cfg.signing.cert.read_bytes()).public_bytes(
        serialization.Encoding.DER
    )
    return ProviderEntry(
        name=cfg.provider.name,
        mail_receipt=cfg.provider.mail_receipt,
        domains=tuple(cfg.provider.local_domains),
        certificate_hashes=(certificate_sha1(der),),
        certificates=(der,),
    )


def load_index(cfg: Config) -> ProviderIndex:
    """Read the configured index file (if any) and add this provider's own entry."""
    own = own_entry(cfg)
    path = cfg.index.path
    if path is None:
        return ProviderIndex.of([own])
    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        raise IndexError_(f"{path}: cannot read the provider index: {exc.strerror}") from None
    if not data.lstrip()[:1].isalpha() and not data.lstrip().startswith(b"#"):
        trusted = cfg.index.trusted_signer
        if trusted is None:
            raise IndexError_(f"{path}: a signed index needs index.trusted_signer in the config")
        try:
            data = unwrap_signed_index(data, x509.load_pem_x509_certificate(trusted.read_bytes()))
        except (SignedIndexError, OSError, ValueError) as exc:
            raise IndexError_(f"{path}: {exc}") from None
    try:
        entries, skipped = parse_ldif(data.decode("utf-8"))
    except (LdifError, UnicodeDecodeError) as exc:
        raise IndexError_(f"{path}: not a usable LDIF: {exc}") from None
    for reason in skipped:
        log.warning("provider index %s: skipped %s", path, reason)
    return ProviderIndex.of(entries).merged([own])


class IndexService:
    """Holds the current snapshot; ``reload()`` swaps it only when the new copy loads."""

    def __init__(self, cfg: Config) -> None:
        self.cfg = cfg
        self.current = load_index(cfg)
        self._task: asyncio.Task[None] | None = None

    async def reload(self) -> bool:
        try:
            fresh = await asyncio.to_thread(load_index, self.cfg)
        except IndexError_ as exc:
            log.error("provider index reload failed, keeping the last good copy: %s", exc)
            return False
        self.current = fresh
        log.info("provider index reloaded: %d providers", len(fresh.entries))
        return True

    async def start(self, stack: contextlib.AsyncExitStack) -> None:
        self._task = asyncio.create_task(self._loop(), name="index-reload")
        stack.push_async_callback(self.stop)

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    async def _loop(self) -> None:
        while True:
            await asyncio.sleep(self.cfg.index.reload_seconds)
            await self.reload()

    # The points look things up through the service, so a reload is seen at once.
    def is_certified(self, address: str) -> bool:
        return self.current.is_certified(address)

    def provider_for_certificate(self, der: bytes) -> ProviderEntry | None:
        return self.current.provider_for_certificate(der)

    def provider_for_domain(self, domain: str) -> ProviderEntry | None:
        return self.current.provider_for_domain(domain)
