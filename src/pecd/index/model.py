"""The provider index in memory: immutable snapshots with the two lookups the points need.

Domain -> provider (access point: is a recipient PEC or not), and signing certificate ->
provider (reception point: SHA-1 of the certificate looked up in ``providerCertificateHash``,
then the whole certificate compared with ``providerCertificate``; spec section 8).
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable
from dataclasses import dataclass, field


@dataclass(frozen=True)
class ProviderEntry:
    """One ``provider`` entry of the index (``o=postacert``)."""

    name: str  # providerName
    mail_receipt: str  # mailReceipt: where presa in carico and rilevazione virus go
    domains: tuple[str, ...]  # managedDomains, lowercase
    certificate_hashes: tuple[str, ...]  # providerCertificateHash, lowercase hex SHA-1
    certificates: tuple[bytes, ...]  # providerCertificate;binary (DER)
    unit: str | None = None  # providerUnit of a secondary environment
    dn: str = ""

    def __post_init__(self) -> None:
        object.__setattr__(self, "mail_receipt", self.mail_receipt.strip().lower())
        object.__setattr__(self, "domains", tuple(d.strip().lower() for d in self.domains))
        object.__setattr__(
            self, "certificate_hashes", tuple(h.strip().lower() for h in self.certificate_hashes)
        )


def certificate_sha1(der: bytes) -> str:
    return hashlib.sha1(der).hexdigest()


@dataclass(frozen=True)
class ProviderIndex:
    """A snapshot of the index. Build one with :meth:`of`; lookups never touch disk or network."""

    entries: tuple[ProviderEntry, ...]
    _by_domain: dict[str, ProviderEntry] = field(default_factory=dict, repr=False, compare=False)
    _by_hash: dict[str, list[ProviderEntry]] = field(
        default_factory=dict, repr=False, compare=False
    )

    @classmethod
    def of(cls, entries: Iterable[ProviderEntry]) -> ProviderIndex:
        index = cls(tuple(entries))
        for e in index.entries:
            for d in e.domains:
                index._by_domain.setdefault(d, e)
            for h in e.certificate_hashes:
                index._by_hash.setdefault(h, []).append(e)
        return index

    def provider_for_domain(self, domain: str) -> ProviderEntry | None:
        return self._by_domain.get(domain.strip().lower().rstrip("."))

    def is_certified(self, address: str) -> bool:
        """PEC or not: the address's domain is a ``managedDomains`` value of some provider."""
        return self.provider_for_domain(address.rpartition("@")[2]) is not None

    def provider_for_certificate(self, der: bytes) -> ProviderEntry | None:
        """The provider whose index entry lists this very certificate: first by its SHA-1 hash,
        then byte for byte, so that a hash match alone is never enough."""
        for entry in self._by_hash.get(certificate_sha1(der), ()):
            if der in entry.certificates:
                return entry
        return None

    def mail_receipt(self, provider_name: str) -> str | None:
        for e in self.entries:
            if e.name.lower() == provider_name.lower():
                return e.mail_receipt
        return None

    def merged(self, other: Iterable[ProviderEntry]) -> ProviderIndex:
        """This snapshot plus ``other`` entries (the local provider's own entry, say)."""
        seen = {(e.name, e.unit) for e in self.entries}
        extra = [e for e in other if (e.name, e.unit) not in seen]
        return ProviderIndex.of([*self.entries, *extra])
