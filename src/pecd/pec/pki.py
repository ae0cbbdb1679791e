"""A development PKI: a CA, a provider signing certificate (spec section 5 profile) and a TLS one.

With ``intermediate=True`` (what ``pecd init`` makes) it has the real shape: a root, an
intermediate CA that issues the signing certificate (as AgID CA1 issues every provider's, with
name constraints on the provider's domain), and the chain file that goes into every signature.

Pure: everything comes back as PEM bytes and the time is passed in. For production the signing
certificate must come from AgID's CA; these certificates only let a test network run end to end.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

__all__ = ["DevPki", "IssuedCert", "create_dev_pki", "signing_address"]

_BACKDATE = timedelta(hours=1)


@dataclass(frozen=True)
class IssuedCert:
    key_pem: bytes  # PKCS#8, unencrypted
    cert_pem: bytes


@dataclass(frozen=True)
class DevPki:
    ca: IssuedCert  # the root: what verifiers trust; it also issues the TLS certificate
    signing: IssuedCert
    tls: IssuedCert
    intermediate: IssuedCert | None = None  # the signing certificate's issuer, when not the root

    @property
    def chain_pem(self) -> bytes:
        """The certificates between the signing certificate and the root (``[signing] chain``):
        the intermediate's PEM, or nothing when the root issues the signing certificate."""
        return b"" if self.intermediate is None else self.intermediate.cert_pem


def signing_address(domain: str) -> str:
    """The rfc822Name of the provider signing certificate (and From of system messages)."""
    return f"posta-certificata@{domain}"


def _key_pem(key: rsa.RSAPrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def _key_usage(
    *,
    digital_signature: bool = False,
    content_commitment: bool = False,
    key_encipherment: bool = False,
    key_cert_sign: bool = False,
    crl_sign: bool = False,
) -> x509.KeyUsage:
    return x509.KeyUsage(
        digital_signature=digital_signature,
        content_commitment=content_commitment,
        key_encipherment=key_encipherment,
        data_encipherment=False,
        key_agreement=False,
        key_cert_sign=key_cert_sign,
        crl_sign=crl_sign,
        encipher_only=False,
        decipher_only=False,
    )


def _issue(
    builder: x509.CertificateBuilder,
    key: rsa.RSAPrivateKey,
    ca_key: rsa.RSAPrivateKey,
    ca_cert: x509.Certificate,
) -> IssuedCert:
    """Sign ``builder`` (a leaf or the intermediate) with the CA, adding SKI and AKI(keyIdentifier)."""
    ca_ski = ca_cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    cert = (
        builder.issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ca_ski), critical=False
        )
        .sign(ca_key, hashes.SHA256())
    )
    return IssuedCert(_key_pem(key), cert.public_bytes(serialization.Encoding.PEM))


def create_dev_pki(
    *,
    domain: str,
    name: str,
    now: datetime,
    tls_hostnames: Sequence[str] = ("localhost",),
    tls_ips: Sequence[str] = ("127.0.0.1", "::1"),
    key_size: int = 2048,
    validity_days: int = 3 * 365,
    intermediate: bool = False,
) -> DevPki:
    """A fresh CA, provider signing certificate and TLS server certificate for ``domain``.

    All certificates are valid from ``now`` - 1 hour to ``now`` + ``validity_days``. With
    ``intermediate`` an intermediate CA (pathLen 0, name constraints: rfc822 ``domain``) issues
    the signing certificate, the root the TLS one; without it the root issues both.
    """
    if now.tzinfo is None:
        raise ValueError("create_dev_pki needs an aware datetime")
    not_before = now.astimezone(UTC) - _BACKDATE
    not_after = now.astimezone(UTC) + timedelta(days=validity_days)

    def base(subject: x509.Name) -> x509.CertificateBuilder:
        return (
            x509.CertificateBuilder()
            .subject_name(subject)
            .not_valid_before(not_before)
            .not_valid_after(not_after)
        )

    # CA
    ca_key = rsa.generate_private_key(public_exponent=65537, key_size=key_size)
    ca_name = x509.Name(
        [
            x509.NameAttribute(NameOID.COUNTRY_NAME, "IT"),
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, name),
            x509.NameAttribute(NameOID.COMMON_NAME, f"{name} Development CA"),
        ]
    )
    ca_cert = (
        base(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .add_extension(
            x509.BasicConstraints(ca=True, path_length=1 if intermediate else 0), critical=True
        )
        .add_extension(_key_usage(key_cert_sign=True, crl_sign=True), critical=True)
        .add_extension(
            x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), critical=False
        )
        .sign(ca_key, hashes.SHA256())
    )
    ca = IssuedCert(_key_pem(ca_key), ca_cert.public_bytes(serialization.Encoding.PEM))

    # Intermediate CA, the signing certificate's issuer (AgID CA1's place in the real chain).
    issuer_key, issuer_cert, inter = ca_key, ca_cert, None
    if intermediate:
        issuer_key = rsa.generate_private_key(public_exponent=65537, key_size=key_size)
        inter = _issue(
            base(
                x509.Name(
                    [
                        x509.NameAttribute(NameOID.COUNTRY_NAME, "IT"),
                        x509.NameAttribute(NameOID.ORGANIZATION_NAME, name),
                        x509.NameAttribute(
                            NameOID.COMMON_NAME, f"{name} Development Intermediate CA"
                        ),
                    ]
                )
            )
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(_key_usage(key_cert_sign=True, crl_sign=True), critical=True)
            .add_extension(
                x509.NameConstraints(
                    permitted_subtrees=[x509.RFC822Name(domain)], excluded_subtrees=None
                ),
                critical=True,
            ),
            issuer_key,
            ca_key,
            ca_cert,
        )
        issuer_cert = x509.load_pem_x509_certificate(inter.cert_pem)

    # Provider signing certificate: RFC 6109 section 5.5 profile, no basicConstraints.
    signing_key = rsa.generate_private_key(public_exponent=65537, key_size=key_size)
    signing_name = x509.Name(
        [
            x509.NameAttribute(NameOID.COUNTRY_NAME, "IT"),
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, name),
            x509.NameAttribute(NameOID.COMMON_NAME, f"Posta Certificata {name}"),
        ]
    )
    signing = _issue(
        base(signing_name)
        .add_extension(_key_usage(digital_signature=True, content_commitment=True), critical=True)
        .add_extension(
            x509.SubjectAlternativeName([x509.RFC822Name(signing_address(domain))]),
            critical=False,
        )
        .add_extension(
            x509.ExtendedKeyUsage([ExtendedKeyUsageOID.EMAIL_PROTECTION]), critical=False
        ),
        signing_key,
        issuer_key,
        issuer_cert,
    )

    # TLS server certificate
    tls_key = rsa.generate_private_key(public_exponent=65537, key_size=key_size)
    dns_names = list(dict.fromkeys([*tls_hostnames, domain]))
    san: list[x509.GeneralName] = [x509.DNSName(h) for h in dns_names]
    san += [x509.IPAddress(ipaddress.ip_address(ip)) for ip in tls_ips]
    tls = _issue(
        base(
            x509.Name(
                [
                    x509.NameAttribute(NameOID.ORGANIZATION_NAME, name),
                    x509.NameAttribute(NameOID.COMMON_NAME, domain),
                ]
            )
        )
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(_key_usage(digital_signature=True, key_encipherment=True), critical=True)
        .add_extension(x509.SubjectAlternativeName(san), critical=False)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False),
        tls_key,
        ca_key,
        ca_cert,
    )
    return DevPki(ca=ca, signing=signing, tls=tls, intermediate=inter)
