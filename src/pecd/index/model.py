"""The provider index in memory: immutable snapshots with the lookups the points need.

Domain -> provider (access point: is a recipient PEC or not), and signing certificate ->
provider (reception point: SHA-1 of the certificate looked up in ``providerCertificateHash``,
then the whole certificate compared with ``providerCertificate``; spec section 8).
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from types import MappingProxyType

from cryptography import x509
from cryptography.hazmat.primitives import serialization

from pecd.pec.address import domain_of, normalize_address, normalize_domain

__all__ = [
    "ProviderEntry",
    "ProviderIndex",
    "certificate_der",
    "certificate_sha1",
    "domain_of",
    "normalize_domain",
    "normalize_hash",
]


def normalize_hash(value: str) -> str:
    """A SHA-1 in hex, lower case; colons and spaces (``AB:CD:…`` as some tools print it) removed."""
    return value.strip().lower().replace(":", "").replace(" ", "")


def certificate_der(cert: bytes | x509.Certificate) -> bytes:
    return (
        cert.public_bytes(serialization.Encoding.DER)
        if isinstance(cert, x509.Certificate)
        else bytes(cert)
    )


def certificate_sha1(cert: bytes | x509.Certificate) -> str:
    """``providerCertificateHash`` of a certificate: SHA-1 of its DER, lower-case hex."""
    return hashlib.sha1(certificate_der(cert)).hexdigest()


@dataclass(frozen=True)
class ProviderEntry:
    """One ``provider`` entry of the index (``o=postacert``); values are normalised on creation."""

    name: str  # providerName
    mail_receipt: str  # mailReceipt: where presa in carico and rilevazione virus go
    domains: tuple[str, ...]  # managedDomains, lower case
    certificate_hashes: tuple[str, ...]  # providerCertificateHash, lower-case hex SHA-1
    certificates: tuple[bytes, ...]  # providerCertificate;binary (DER)
    unit: str | None = None  # providerUnit: set only on a secondary environment's entry
    dn: str = ""
    description: str | None = None
    ldif_location_url: str | None = None  # LDIFLocationURL: where this provider publishes its .p7m

    def __post_init__(self) -> None:
        object.__setattr__(self, "name", self.name.strip())
        object.__setattr__(self, "mail_receipt", normalize_address(self.mail_receipt))
        object.__setattr__(self, "domains", tuple(normalize_domain(d) for d in self.domains))
        object.__setattr__(
            self, "certificate_hashes", tuple(normalize_hash(h) for h in self.certificate_hashes)
        )
        object.__setattr__(self, "certificates", tuple(bytes(c) for c in self.certificates))

    @property
    def key(self) -> tuple[str, str | None]:
        """What tells entries apart: the provider name (any case) and the environment."""
        return self.name.lower(), self.unit.lower() if self.unit else None

    @property
    def label(self) -> str:
        return f"{self.name} / {self.unit}" if self.unit else self.name


class ProviderIndex:
    """One snapshot of the index. Never changed after it is built, so a reader holding it sees a
    consistent picture while a reload builds the next one; lookups never touch disk or network."""

    __slots__ = ("_by_domain", "_by_hash", "entries")

    entries: tuple[ProviderEntry, ...]
    _by_domain: Mapping[str, ProviderEntry]
    _by_hash: Mapping[str, tuple[ProviderEntry, ...]]

    def __init__(self, entries: Iterable[ProviderEntry] = ()) -> None:
        self.entries = tuple(entries)
        by_domain: dict[str, ProviderEntry] = {}
        by_hash: dict[str, list[ProviderEntry]] = {}
        for e in self.entries:
            for d in e.domains:
                # Two entries claiming one domain: the earlier wins, which is how this
                # provider's own entry (always first, see with_own) keeps its local domains.
                by_domain.setdefault(d, e)
            for h in e.certificate_hashes:
                by_hash.setdefault(h, []).append(e)
        self._by_domain = MappingProxyType(by_domain)
        self._by_hash = MappingProxyType({h: tuple(es) for h, es in by_hash.items()})

    @classmethod
    def of(cls, entries: Iterable[ProviderEntry]) -> ProviderIndex:
        return cls(entries)

    def __len__(self) -> int:
        return len(self.entries)

    def __iter__(self) -> Iterator[ProviderEntry]:
        return iter(self.entries)

    def __repr__(self) -> str:
        return f"ProviderIndex({len(self.entries)} entries, {len(self._by_domain)} domains)"

    def provider_for_domain(self, domain: str) -> ProviderEntry | None:
        return self._by_domain.get(normalize_domain(domain))

    def is_certified(self, address: str) -> bool:
        """PEC or not: the address's domain is a ``managedDomains`` value of some provider."""
        return "@" in address and self.provider_for_domain(domain_of(address)) is not None

    def providers_for_hash(self, sha1_hex: str) -> tuple[ProviderEntry, ...]:
        """Entries listing this ``providerCertificateHash``: a first filter, never proof alone."""
        return self._by_hash.get(normalize_hash(sha1_hex), ())

    def provider_for_certificate(self, cert: bytes | x509.Certificate) -> ProviderEntry | None:
        """The provider whose index entry lists this very certificate: first by its SHA-1,
        then byte for byte, so that a hash match alone is never enough (spec section 5)."""
        der = certificate_der(cert)
        for entry in self.providers_for_hash(certificate_sha1(der)):
            if der in entry.certificates:
                return entry
        return None

    def provider_named(self, name: str, unit: str | None = None) -> ProviderEntry | None:
        key = (name.strip().lower(), unit.strip().lower() if unit else None)
        return next((e for e in self.entries if e.key == key), None)

    def mail_receipt(self, provider: ProviderEntry | str) -> str | None:
        """The service mailbox of a provider (an entry, or its ``providerName``)."""
        if isinstance(provider, ProviderEntry):
            return provider.mail_receipt
        entry = self.provider_named(provider)
        return entry.mail_receipt if entry else None

    def with_own(self, own: ProviderEntry) -> ProviderIndex:
        """This snapshot with this provider's own entry first, replacing the file's copy of it:
        our current certificate and our local domains come from our config, not from a copy
        that may be a day old (or claim our domains for someone else)."""
        return ProviderIndex([own, *(e for e in self.entries if e.key != own.key)])
