"""The provider's identity (name, domain, service address, signing key) read from the config."""

from __future__ import annotations

from pecd.config import Config
from pecd.pec.builders import ProviderIdentity
from pecd.pec.smime import KeySigner


def load_signer(cfg: Config) -> KeySigner:
    chain = b"".join(p.read_bytes() for p in cfg.signing.chain) or None
    return KeySigner.from_pem(cfg.signing.key.read_bytes(), cfg.signing.cert.read_bytes(), chain)


def provider_identity(cfg: Config) -> ProviderIdentity:
    return ProviderIdentity(
        name=cfg.provider.name,
        domain=cfg.provider.domain,
        service_address=cfg.provider.service_address,
        signer=load_signer(cfg),
        digest=cfg.signing.digest,
    )
