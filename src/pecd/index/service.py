"""Loading the configured index copy and keeping the current snapshot fresh while pecd runs."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import serialization

from pecd.config import Config, ConfigError
from pecd.index.ldap import DEFAULT_BASE_DN, LdapIndexError, LdapSource, read_ldap_index
from pecd.index.ldif import LdifError, parse_ldif
from pecd.index.model import ProviderEntry, ProviderIndex, certificate_sha1
from pecd.index.signed import SignedIndexError, cms_der, verify_signed_index

__all__ = [
    "IndexLoadError",
    "IndexService",
    "LoadedIndex",
    "index_from_bytes",
    "ldap_source",
    "load_index",
    "load_index_report",
    "own_entry",
]

log = logging.getLogger("pecd.index")


class IndexLoadError(ConfigError):
    """The index copy cannot be used (unreadable, not LDIF, signature refused); ``str()`` is the
    one line to show. A ConfigError, so that ``pecd serve`` refuses to start on it."""


@dataclass(frozen=True)
class LoadedIndex:
    """A snapshot and what loading it found, for the log and ``pecd index show``."""

    index: ProviderIndex
    source: str | None = None  # the file, or None when only this provider's entry is known
    signer: x509.Certificate | None = None  # who signed the .p7m, when it was one
    skipped: tuple[str, ...] = ()
    warnings: tuple[str, ...] = ()


def own_entry(cfg: Config) -> ProviderEntry:
    """This provider's entry, from its config and signing certificate."""
    try:
        cert = x509.load_pem_x509_certificate(cfg.signing.cert.read_bytes())
    except OSError as exc:
        raise IndexLoadError(f"{cfg.signing.cert}: cannot read: {exc.strerror}") from None
    except ValueError as exc:
        raise IndexLoadError(f"{cfg.signing.cert}: not a PEM certificate: {exc}") from None
    der = cert.public_bytes(serialization.Encoding.DER)
    return ProviderEntry(
        name=cfg.provider.name,
        mail_receipt=cfg.provider.mail_receipt,
        domains=tuple(dict.fromkeys(cfg.provider.local_domains)),
        certificate_hashes=(certificate_sha1(der),),
        certificates=(der,),
    )


def index_from_bytes(
    data: bytes,
    *,
    own: ProviderEntry | None = None,
    trusted: x509.Certificate | None = None,
    source: str = "index",
) -> LoadedIndex:
    """A snapshot from the bytes of an index copy (plain LDIF, or a ``.p7m`` told apart by its
    content), with ``own`` added first. Sans I/O; raises IndexLoadError when it cannot be used."""
    signer = None
    if cms_der(data) is not None:
        if trusted is None:
            raise IndexLoadError(f"{source}: a signed index needs index.trusted_signer")
        try:
            signed = verify_signed_index(data, trusted)
        except SignedIndexError as exc:
            raise IndexLoadError(f"{source}: signed index refused: {exc}") from None
        data, signer = signed.content, signed.signer
    elif trusted is not None:
        # The operator asked for a signed copy; a plain one could have been written by anyone.
        raise IndexLoadError(f"{source}: not a signed .p7m, but index.trusted_signer is set")
    try:
        parsed = parse_ldif(data)
    except LdifError as exc:
        raise IndexLoadError(f"{source}: {exc}") from None
    index = ProviderIndex(parsed.entries)
    if own is not None:
        index = index.with_own(own)
    return LoadedIndex(index, source, signer, parsed.skipped, parsed.warnings)


def load_index_report(cfg: Config) -> LoadedIndex:
    """Read the configured index copy (if any), check it, and add this provider's own entry."""
    own = own_entry(cfg)
    if cfg.index.source is not None:
        return _load_ldap(cfg, own)
    path = cfg.index.path
    if path is None:
        return LoadedIndex(ProviderIndex([own]))
    trusted = None
    if cfg.index.trusted_signer is not None:
        try:
            trusted = x509.load_pem_x509_certificate(cfg.index.trusted_signer.read_bytes())
        except (OSError, ValueError) as exc:
            raise IndexLoadError(
                f"{cfg.index.trusted_signer}: cannot load index.trusted_signer: {exc}"
            ) from None
    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        raise IndexLoadError(f"{path}: cannot read the provider index: {exc.strerror}") from None
    return index_from_bytes(data, own=own, trusted=trusted, source=str(path))


def ldap_source(cfg: Config) -> LdapSource:
    """The ``[index]`` settings of an LDAP source (``index.source`` must be set)."""
    ic = cfg.index
    assert ic.source is not None
    return LdapSource(
        url=ic.source,
        base_dn=ic.base_dn or DEFAULT_BASE_DN,
        bind_dn=ic.bind_dn,
        bind_password=ic.bind_password,
        bind_password_file=ic.bind_password_file,
        ca=ic.ca,
        starttls=ic.starttls,
        timeout=ic.timeout_seconds,
    )


def _load_ldap(cfg: Config, own: ProviderEntry) -> LoadedIndex:
    source = ldap_source(cfg)
    try:
        parsed = read_ldap_index(source)
    except LdapIndexError as exc:
        raise IndexLoadError(f"LDAP index {exc}") from None
    index = ProviderIndex(parsed.entries).with_own(own)
    return LoadedIndex(index, source.label, None, parsed.skipped, parsed.warnings)


def load_index(cfg: Config) -> ProviderIndex:
    """:func:`load_index_report`, logging what was left out; just the snapshot."""
    loaded = load_index_report(cfg)
    _log_notes(loaded)
    return loaded.index


def _log_notes(loaded: LoadedIndex) -> None:
    for reason in loaded.skipped:
        log.warning("provider index %s: skipped %s", loaded.source, reason)
    for reason in loaded.warnings:
        log.warning("provider index %s: %s", loaded.source, reason)


class IndexService:
    """Holds the current snapshot. ``reload()`` swaps it only when the new copy loads; the file is
    read and checked in a thread, so the event loop never waits on disk or RSA."""

    def __init__(self, cfg: Config) -> None:
        self.cfg = cfg
        self._current: LoadedIndex | None = None
        self._task: asyncio.Task[None] | None = None
        self._lock = asyncio.Lock()
        self.last_error: str | None = None  # why the latest reload failed, None after a good one

    @property
    def loaded(self) -> LoadedIndex:
        if self._current is None:
            raise RuntimeError("the provider index is not loaded yet: await start() first")
        return self._current

    @property
    def current(self) -> ProviderIndex:
        return self.loaded.index

    async def start(self, stack: contextlib.AsyncExitStack) -> None:
        """Load the index (an unusable copy at startup raises IndexLoadError: there is no good
        copy to fall back on yet), then reload every ``index.reload_seconds``."""
        if self._current is None:
            loaded = await asyncio.to_thread(load_index_report, self.cfg)
            self._use(loaded)
        self._task = asyncio.create_task(self._loop(), name="index-reload")
        stack.push_async_callback(self.stop)

    async def reload(self) -> bool:
        """Read the copy again (the app calls this on SIGHUP); False, logged, if it is unusable."""
        async with self._lock:  # SIGHUP during the periodic reload: one at a time
            try:
                loaded = await asyncio.to_thread(load_index_report, self.cfg)
            except IndexLoadError as exc:
                self.last_error = str(exc)
                log.error("provider index reload failed, keeping the last good copy: %s", exc)
                return False
            except Exception as exc:  # a bug must not end the reload loop nor drop the index
                self.last_error = f"{type(exc).__name__}: {exc}"
                log.exception("provider index reload failed, keeping the last good copy")
                return False
            self._use(loaded)
            return True

    def _use(self, loaded: LoadedIndex) -> None:
        _log_notes(loaded)
        self._current = loaded
        self.last_error = None
        log.info(
            "provider index loaded from %s: %d entries, %d skipped",
            loaded.source or "the config alone",
            len(loaded.index),
            len(loaded.skipped),
        )

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    async def _loop(self) -> None:
        while True:
            await asyncio.sleep(self.cfg.index.reload_seconds)
            await self.reload()

    # The points look things up through the service, so a reload is seen at once.
    def is_certified(self, address: str) -> bool:
        return self.current.is_certified(address)

    def provider_for_certificate(self, cert: bytes | x509.Certificate) -> ProviderEntry | None:
        return self.current.provider_for_certificate(cert)

    def provider_for_domain(self, domain: str) -> ProviderEntry | None:
        return self.current.provider_for_domain(domain)

    def mail_receipt(self, provider: ProviderEntry | str) -> str | None:
        return self.current.mail_receipt(provider)
