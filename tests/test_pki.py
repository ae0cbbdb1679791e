"""The development PKI: the signing certificate follows the PEC profile (spec section 5), openssl
accepts the chain, and the files are written safely."""

from __future__ import annotations

import shutil
import stat
import subprocess
from datetime import UTC, datetime, timedelta
from ipaddress import ip_address
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, ExtensionOID, NameOID

from helpers import PKI_DOMAIN, PKI_NAME, PKI_NOW
from pecd.devpki import write_dev_pki
from pecd.pec.pki import DevPki, create_dev_pki
from pecd.pec.smime import KeySigner


def cert(pem: bytes) -> x509.Certificate:
    return x509.load_pem_x509_certificate(pem)


def ext(c: x509.Certificate, oid: x509.ObjectIdentifier) -> x509.Extension[x509.ExtensionType]:
    return c.extensions.get_extension_for_oid(oid)


def openssl() -> str:
    path = shutil.which("openssl")
    assert path, "openssl is needed by these tests"
    return path


def test_signing_certificate_profile(dev_pki: DevPki) -> None:
    c = cert(dev_pki.signing.cert_pem)
    ca = cert(dev_pki.ca.cert_pem)
    assert c.subject == x509.Name(
        [
            x509.NameAttribute(NameOID.COUNTRY_NAME, "IT"),
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, PKI_NAME),
            x509.NameAttribute(NameOID.COMMON_NAME, f"Posta Certificata {PKI_NAME}"),
        ]
    )
    assert c.issuer == ca.subject
    c.verify_directly_issued_by(ca)

    ku = ext(c, ExtensionOID.KEY_USAGE)
    assert ku.critical
    assert isinstance(ku.value, x509.KeyUsage)
    assert ku.value.digital_signature and not ku.value.key_cert_sign

    san = ext(c, ExtensionOID.SUBJECT_ALTERNATIVE_NAME)
    assert not san.critical
    assert isinstance(san.value, x509.SubjectAlternativeName)
    assert san.value.get_values_for_type(x509.RFC822Name) == [f"posta-certificata@{PKI_DOMAIN}"]
    assert not san.value.get_values_for_type(x509.DNSName)
    assert "@" not in c.subject.rfc4514_string()  # the address goes in the SAN, not the DN

    ski = ext(c, ExtensionOID.SUBJECT_KEY_IDENTIFIER)
    assert not ski.critical
    assert ski.value == x509.SubjectKeyIdentifier.from_public_key(c.public_key())

    aki = ext(c, ExtensionOID.AUTHORITY_KEY_IDENTIFIER)
    assert not aki.critical
    assert isinstance(aki.value, x509.AuthorityKeyIdentifier)
    ca_ski = ext(ca, ExtensionOID.SUBJECT_KEY_IDENTIFIER).value
    assert isinstance(ca_ski, x509.SubjectKeyIdentifier)
    assert aki.value.key_identifier == ca_ski.digest
    assert aki.value.authority_cert_issuer is None

    eku = ext(c, ExtensionOID.EXTENDED_KEY_USAGE)
    assert not eku.critical
    assert list(eku.value) == [ExtendedKeyUsageOID.EMAIL_PROTECTION]  # type: ignore[call-overload]

    with pytest.raises(x509.ExtensionNotFound):
        c.extensions.get_extension_for_class(x509.BasicConstraints)
    # Any extension other than keyUsage must be non-critical.
    assert [e.oid for e in c.extensions if e.critical] == [ExtensionOID.KEY_USAGE]

    assert isinstance(c.signature_hash_algorithm, hashes.SHA256)
    key = c.public_key()
    assert isinstance(key, rsa.RSAPublicKey) and key.key_size == 2048


def test_ca_certificate(dev_pki: DevPki) -> None:
    ca = cert(dev_pki.ca.cert_pem)
    assert ca.subject == ca.issuer
    ca.verify_directly_issued_by(ca)
    assert ca.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == (
        f"{PKI_NAME} Development CA"
    )
    bc = ext(ca, ExtensionOID.BASIC_CONSTRAINTS)
    assert bc.critical and isinstance(bc.value, x509.BasicConstraints) and bc.value.ca
    ku = ext(ca, ExtensionOID.KEY_USAGE)
    assert ku.critical and isinstance(ku.value, x509.KeyUsage)
    assert ku.value.key_cert_sign and ku.value.crl_sign and not ku.value.digital_signature
    ext(ca, ExtensionOID.SUBJECT_KEY_IDENTIFIER)


def test_tls_certificate(dev_pki: DevPki) -> None:
    c = cert(dev_pki.tls.cert_pem)
    c.verify_directly_issued_by(cert(dev_pki.ca.cert_pem))
    san = ext(c, ExtensionOID.SUBJECT_ALTERNATIVE_NAME).value
    assert isinstance(san, x509.SubjectAlternativeName)
    assert san.get_values_for_type(x509.DNSName) == ["localhost", PKI_DOMAIN]
    assert san.get_values_for_type(x509.IPAddress) == [ip_address("127.0.0.1"), ip_address("::1")]
    eku = ext(c, ExtensionOID.EXTENDED_KEY_USAGE).value
    assert list(eku) == [ExtendedKeyUsageOID.SERVER_AUTH]  # type: ignore[call-overload]
    ku = ext(c, ExtensionOID.KEY_USAGE).value
    assert isinstance(ku, x509.KeyUsage) and ku.digital_signature and ku.key_encipherment


def test_validity_and_keys(dev_pki: DevPki) -> None:
    for issued in (dev_pki.ca, dev_pki.signing, dev_pki.tls):
        c = cert(issued.cert_pem)
        assert c.not_valid_before_utc == PKI_NOW - timedelta(hours=1)
        assert c.not_valid_after_utc == PKI_NOW + timedelta(days=3 * 365)
        key = serialization.load_pem_private_key(issued.key_pem, password=None)
        assert isinstance(key, rsa.RSAPrivateKey)
        assert key.public_key().public_numbers() == c.public_key().public_numbers()  # type: ignore[union-attr]
        assert issued.key_pem.startswith(b"-----BEGIN PRIVATE KEY-----")
    KeySigner.from_pem(dev_pki.signing.key_pem, dev_pki.signing.cert_pem)


def test_options() -> None:
    pki = create_dev_pki(
        domain="pec.a.test",
        name="A",
        now=datetime(2030, 6, 1, tzinfo=UTC),
        tls_hostnames=("mx.pec.a.test", "pec.a.test"),
        tls_ips=("192.0.2.7",),
        validity_days=10,
    )
    c = cert(pki.tls.cert_pem)
    san = ext(c, ExtensionOID.SUBJECT_ALTERNATIVE_NAME).value
    assert isinstance(san, x509.SubjectAlternativeName)
    assert san.get_values_for_type(x509.DNSName) == ["mx.pec.a.test", "pec.a.test"]
    assert san.get_values_for_type(x509.IPAddress) == [ip_address("192.0.2.7")]
    assert c.not_valid_after_utc == datetime(2030, 6, 11, tzinfo=UTC)
    with pytest.raises(ValueError):
        create_dev_pki(domain="x", name="x", now=datetime(2030, 1, 1))


@pytest.mark.parametrize(
    ("name", "purpose"), [("signing", "smimesign"), ("signing", "any"), ("tls", "sslserver")]
)
def test_openssl_verifies_chain(dev_pki: DevPki, tmp_path: Path, name: str, purpose: str) -> None:
    (tmp_path / "ca.pem").write_bytes(dev_pki.ca.cert_pem)
    leaf = tmp_path / f"{name}.pem"
    leaf.write_bytes(getattr(dev_pki, name).cert_pem)
    at = str(int((PKI_NOW + timedelta(days=1)).timestamp()))
    result = subprocess.run(
        [
            *(openssl(), "verify", "-CAfile", str(tmp_path / "ca.pem"), "-purpose", purpose),
            *("-attime", at, str(leaf)),
        ],
        capture_output=True,
        check=False,
    )
    assert result.returncode == 0, (result.stdout + result.stderr).decode(errors="replace")


def test_write_dev_pki(dev_pki: DevPki, tmp_path: Path) -> None:
    target = tmp_path / "new" / "pki"
    paths = write_dev_pki(target, dev_pki)
    assert sorted(paths) == sorted(
        ["ca.pem", "ca.key", "signing.pem", "signing.key", "tls.pem", "tls.key"]
    )
    assert paths["signing.pem"].read_bytes() == dev_pki.signing.cert_pem
    assert paths["signing.key"].read_bytes() == dev_pki.signing.key_pem
    assert paths["tls.key"].read_bytes() == dev_pki.tls.key_pem
    assert paths["ca.pem"].read_bytes() == dev_pki.ca.cert_pem
    for name, path in paths.items():
        assert path.parent == target
        mode = stat.S_IMODE(path.stat().st_mode)
        assert mode == (0o600 if name.endswith(".key") else 0o644)

    with pytest.raises(FileExistsError):
        write_dev_pki(target, dev_pki)


def test_write_dev_pki_never_overwrites(dev_pki: DevPki, tmp_path: Path) -> None:
    (tmp_path / "tls.key").write_bytes(b"precious")
    with pytest.raises(FileExistsError, match=r"tls\.key"):
        write_dev_pki(tmp_path, dev_pki)
    assert (tmp_path / "tls.key").read_bytes() == b"precious"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tls.key"]
