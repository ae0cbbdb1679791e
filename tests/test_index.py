"""The provider index: LDIF as the index publishes it, the signed .p7m, lookups, reloads, this
provider's own entry exported and read back, and ``pecd index`` (spec section 8)."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import logging
import subprocess
from dataclasses import replace
from datetime import UTC, datetime
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from helpers import openssl, wait_for_async
from pecd.cli import main
from pecd.clock import SystemClock
from pecd.config import Config, IndexConfig, load_config
from pecd.devinit import init_installation
from pecd.index import (
    IndexLoadError,
    IndexService,
    LdifError,
    ProviderEntry,
    ProviderIndex,
    SignedIndexError,
    certificate_sha1,
    entry_ldif,
    index_from_bytes,
    own_entry,
    parse_ldif,
    sign_index,
    verify_signed_index,
    write_ldif,
)
from pecd.index.ldif import escape_dn_value
from pecd.pec.pki import DevPki, create_dev_pki

NOW = datetime(2026, 1, 15, 10, 0, tzinfo=UTC)
A_DOMAIN, B_DOMAIN = "pec-a.test", "pec-b.test"


@pytest.fixture(scope="module")
def pki_a() -> DevPki:
    return create_dev_pki(domain=A_DOMAIN, name="Provider A S.p.A.", now=NOW)


@pytest.fixture(scope="module")
def pki_b() -> DevPki:
    return create_dev_pki(domain=B_DOMAIN, name="Provider B S.p.A.", now=NOW)


def cert(pki: DevPki) -> x509.Certificate:
    return x509.load_pem_x509_certificate(pki.signing.cert_pem)


def der(pki: DevPki) -> bytes:
    return cert(pki).public_bytes(serialization.Encoding.DER)


def key(pki: DevPki) -> rsa.RSAPrivateKey:
    k = serialization.load_pem_private_key(pki.signing.key_pem, None)
    assert isinstance(k, rsa.RSAPrivateKey)
    return k


def fold(line: str, width: int = 40) -> str:
    """Fold one LDIF line the way RFC 2849 allows: anywhere, continuation starts with a space."""
    parts = [line[:width]] + [line[i : i + width] for i in range(width, len(line), width)]
    return "\n ".join(parts)


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def entry_b(pki_b: DevPki, **kw: object) -> ProviderEntry:
    d = der(pki_b)
    return ProviderEntry(
        name="Provider B S.p.A.",
        mail_receipt=f"ricevute@{B_DOMAIN}",
        domains=(B_DOMAIN,),
        certificate_hashes=(certificate_sha1(d),),
        certificates=(d,),
        **kw,  # type: ignore[arg-type]
    )


# -- LDIF --------------------------------------------------------------------------------------


def index_text(pki_a: DevPki, pki_b: DevPki) -> str:
    """An index written by hand as the central directory would publish it (not by our writer)."""
    a, b = der(pki_a), der(pki_b)
    return "\r\n".join(
        [
            "# Indice dei gestori PEC",
            "#  a comment that goes on",
            "  on a continuation line",
            "version: 1",
            "",
            "dn: o=postacert",
            "objectClass: top",
            "objectClass: organization",
            "objectClass: LDIFLocationURLObject",
            "o: postacert",
            "LDIFLocationURL: https://igpec.rupa.example.com/igpec.ldif.p7m",
            "",
            "dn: providerName=Provider A S.p.A.,o=postacert",
            "objectclass: top",
            "OBJECTCLASS: provider",
            "PROVIDERNAME: Provider A S.p.A.",
            f"description:: {b64('Gestore di prova è'.encode())}",
            "mailreceipt: Ricevute@PEC-A.test",
            "managedDomains: PEC-A.Test",
            fold("managedDomains: legal.pec-a.test", 9),  # folded inside the attribute name
            f"providerCertificateHash: {certificate_sha1(a).upper()}",
            fold(f"providerCertificate;binary:: {b64(a)}", 76),
            "LDIFLocationURL: https://pec-a.test/index.ldif.p7m",
            "",
            "dn: providerUnit=test,providerName=Provider A S.p.A.,o=postacert",
            "objectClass: top",
            "objectClass: provider",
            "providerName: Provider A S.p.A.",
            "providerUnit: test",
            "mailReceipt: ricevute@test.pec-a.test",
            "managedDomains: test.pec-a.test",
            f"providerCertificateHash: {certificate_sha1(a)}",
            fold(f"providerCertificate;binary:: {b64(a)}", 64),
            "",
            f"dn:: {b64(b'providerName=Provider B S.p.A.,o=postacert')}",
            "objectClass: top",
            "objectClass: provider",
            f"1.3.6.1.4.1.16572.2.2.3:: {b64(b'Provider B S.p.A.')}",  # attributes by OID
            "1.3.6.1.4.1.16572.2.2.4: ricevute@pec-b.test",
            "1.3.6.1.4.1.16572.2.2.5: pec-b.test",
            f"providerCertificateHash: {certificate_sha1(b)}",
            fold(f"providerCertificate;binary:: {b64(b)}"),
            "",
            "",
            "dn: providerName=No Receipt,o=postacert",
            "objectClass: provider",
            "providerName: No Receipt",
            "managedDomains: noreceipt.test",
            f"providerCertificateHash: {certificate_sha1(b)}",
            f"providerCertificate;binary:: {b64(b)}",
            "",
            "dn: providerName=Bad Base64,o=postacert",
            "objectClass: provider",
            "providerName: Bad Base64",
            "mailReceipt: r@badb64.test",
            "managedDomains: badb64.test",
            "providerCertificate;binary:: ***not base64***",
            "",
        ]
    )


def test_parse_index_as_published(pki_a: DevPki, pki_b: DevPki) -> None:
    parsed = parse_ldif(index_text(pki_a, pki_b))
    assert parsed.records == 6
    by_label = {e.label: e for e in parsed.entries}
    assert sorted(by_label) == [
        "Provider A S.p.A.",
        "Provider A S.p.A. / test",
        "Provider B S.p.A.",
    ]

    a = by_label["Provider A S.p.A."]
    assert a.dn == "providerName=Provider A S.p.A.,o=postacert"
    assert a.unit is None
    assert a.mail_receipt == "ricevute@pec-a.test"
    assert a.domains == ("pec-a.test", "legal.pec-a.test")
    assert a.certificate_hashes == (certificate_sha1(der(pki_a)),)  # lower case
    assert a.certificates == (der(pki_a),)
    assert a.description == "Gestore di prova è"
    assert a.ldif_location_url == "https://pec-a.test/index.ldif.p7m"

    unit = by_label["Provider A S.p.A. / test"]
    assert (unit.name, unit.unit, unit.domains) == (
        "Provider A S.p.A.",
        "test",
        ("test.pec-a.test",),
    )
    assert unit.mail_receipt == "ricevute@test.pec-a.test"

    b = by_label["Provider B S.p.A."]
    assert b.dn == "providerName=Provider B S.p.A.,o=postacert"
    assert (b.mail_receipt, b.domains, b.certificates) == (
        "ricevute@pec-b.test",
        ("pec-b.test",),
        (der(pki_b),),
    )

    assert len(parsed.skipped) == 2
    assert "providerName=No Receipt,o=postacert" in parsed.skipped[0]
    assert "no mailReceipt" in parsed.skipped[0]
    assert "Bad Base64" in parsed.skipped[1] and "bad base64" in parsed.skipped[1]
    assert parsed.warnings == ()


def test_same_index_with_lf_and_bytes(pki_a: DevPki, pki_b: DevPki) -> None:
    text = index_text(pki_a, pki_b)
    crlf = parse_ldif(text)
    assert parse_ldif(text.replace("\r\n", "\n")) == crlf
    assert parse_ldif(("\ufeff" + text).encode()) == crlf


@pytest.mark.parametrize(
    "text",
    ["", "   \n\n", "hello world\n", "version: 1\n", "<html><body>Not found</body></html>"],
)
def test_not_ldif_at_all(text: str) -> None:
    with pytest.raises(LdifError):
        parse_ldif(text)
    with pytest.raises(IndexLoadError):
        index_from_bytes(text.encode())


def test_not_utf8_is_not_ldif() -> None:
    with pytest.raises(LdifError, match="UTF-8"):
        parse_ldif(b"dn: o=postacert\nproviderName: \xff\xfe\n")


def test_bad_values_are_left_out_with_a_reason(pki_a: DevPki, pki_b: DevPki) -> None:
    a, b = der(pki_a), der(pki_b)
    text = "\n".join(
        [
            "dn: providerName=A,o=postacert",
            "objectClass: provider",
            "providerName: A",
            "mailReceipt: r@a.test",
            "managedDomains: a.test",
            "managedDomains: not a domain",
            "providerCertificateHash: nothex",
            f"providerCertificateHash: {certificate_sha1(a)}",
            f"providerCertificate;binary:: {b64(a)}",
            f"providerCertificate;binary:: {b64(b'not a certificate')}",
            f"providerCertificate;binary:: {b64(b)}",  # no hash lists it: never found by hash
            "",
            "dn: providerName=Only URL,o=postacert",
            "objectClass: provider",
            "providerName: Only URL",
            "mailReceipt: r@u.test",
            "managedDomains: u.test",
            f"providerCertificateHash: {certificate_sha1(a)}",
            "providerCertificate:< file:///etc/cert.der",
            "",
            "dn: providerName=Gone,o=postacert",
            "changetype: delete",
        ]
    )
    parsed = parse_ldif(text)
    (entry,) = parsed.entries
    assert entry.domains == ("a.test",)
    assert entry.certificates == (a, b)
    assert entry.certificate_hashes == (certificate_sha1(a),)
    notes = "\n".join(parsed.warnings)
    assert "'not a domain'" in notes
    assert "'nothex'" in notes
    assert "#2 is not a DER certificate" in notes
    assert f"{certificate_sha1(b)} has no providerCertificateHash" in notes
    assert any("values by URL" in s for s in parsed.skipped)
    assert any("changetype delete" in s for s in parsed.skipped)


# -- the signed index (.p7m) -------------------------------------------------------------------


@pytest.mark.parametrize("digest", ["sha256", "sha1"])
def test_signed_index_verifies(pki_a: DevPki, pki_b: DevPki, digest: str) -> None:
    ldif = write_ldif([entry_b(pki_b)]).encode()
    p7m = sign_index(ldif, cert(pki_a), key(pki_a), digest=digest, signing_time=NOW)
    assert p7m[:1] == b"\x30"  # DER
    checked = verify_signed_index(p7m, cert(pki_a))
    assert checked.content == ldif
    assert checked.signer == cert(pki_a)
    assert checked.digest == digest
    loaded = index_from_bytes(p7m, trusted=cert(pki_a), source="igpec.ldif.p7m")
    assert loaded.signer == cert(pki_a)
    assert loaded.index.is_certified(f"someone@{B_DOMAIN}")
    # The same .p7m as PEM, and as bare base64, is told apart from LDIF by its content too.
    pem = b"-----BEGIN PKCS7-----\n" + base64.encodebytes(p7m) + b"-----END PKCS7-----\n"
    assert index_from_bytes(pem, trusted=cert(pki_a)).signer == cert(pki_a)
    assert index_from_bytes(base64.encodebytes(p7m), trusted=cert(pki_a)).signer == cert(pki_a)


def test_tampered_signed_index_is_refused(pki_a: DevPki, pki_b: DevPki) -> None:
    ldif = write_ldif([entry_b(pki_b)]).encode()
    p7m = sign_index(ldif, cert(pki_a), key(pki_a))
    line = f"managedDomains: {B_DOMAIN}".encode()
    assert p7m.count(line) == 1
    # Same length, so the DER structure still parses: only the content differs.
    forged = p7m.replace(line, b"managedDomains: pec-x.test")
    with pytest.raises(SignedIndexError, match="digest"):
        verify_signed_index(forged, cert(pki_a))
    with pytest.raises(IndexLoadError, match="refused"):
        index_from_bytes(forged, trusted=cert(pki_a))
    # A flipped bit in the signature itself.
    broken = p7m[:-5] + bytes([p7m[-5] ^ 1]) + p7m[-4:]
    with pytest.raises(SignedIndexError, match="signature does not verify"):
        verify_signed_index(broken, cert(pki_a))
    with pytest.raises(SignedIndexError, match="malformed"):
        verify_signed_index(p7m[:200], cert(pki_a))


def test_signed_by_another_is_refused(pki_a: DevPki, pki_b: DevPki) -> None:
    ldif = write_ldif([entry_b(pki_b)]).encode()
    by_b = sign_index(ldif, cert(pki_b), key(pki_b))
    with pytest.raises(SignedIndexError, match="not by the trusted index certificate"):
        verify_signed_index(by_b, cert(pki_a))
    with pytest.raises(IndexLoadError):
        index_from_bytes(by_b, trusted=cert(pki_a))
    # B's key, presenting A's certificate: the certificate matches, the signature cannot.
    posing = sign_index(ldif, cert(pki_a), key(pki_b))
    with pytest.raises(SignedIndexError, match="signature does not verify"):
        verify_signed_index(posing, cert(pki_a))


def test_signed_and_plain_need_the_matching_config(pki_a: DevPki, pki_b: DevPki) -> None:
    ldif = write_ldif([entry_b(pki_b)]).encode()
    with pytest.raises(IndexLoadError, match="trusted_signer"):
        index_from_bytes(sign_index(ldif, cert(pki_a), key(pki_a)))
    # Once a signer is required, a plain copy could have been written by anyone.
    with pytest.raises(IndexLoadError, match="not a signed"):
        index_from_bytes(ldif, trusted=cert(pki_a))


@pytest.mark.parametrize("digest", ["sha256", "sha1"])
def test_openssl_accepts_our_signed_index(
    pki_a: DevPki, pki_b: DevPki, tmp_path: Path, digest: str
) -> None:
    ldif = write_ldif([entry_b(pki_b)]).encode()
    p7m = sign_index(ldif, cert(pki_a), key(pki_a), digest=digest, signing_time=NOW)
    (tmp_path / "index.ldif.p7m").write_bytes(p7m)
    (tmp_path / "ca.pem").write_bytes(pki_a.ca.cert_pem)
    result = subprocess.run(
        [
            *(
                openssl(),
                "cms",
                "-verify",
                "-inform",
                "DER",
                "-in",
                str(tmp_path / "index.ldif.p7m"),
            ),
            *("-CAfile", str(tmp_path / "ca.pem"), "-purpose", "any"),
            *("-out", str(tmp_path / "out.ldif"), "-binary"),
            *("-attime", str(int(NOW.timestamp()) + 3600)),
        ],
        capture_output=True,
        check=False,
    )
    assert result.returncode == 0, result.stderr.decode(errors="replace")
    assert (tmp_path / "out.ldif").read_bytes() == ldif


# -- lookups -----------------------------------------------------------------------------------


def test_lookups(pki_a: DevPki, pki_b: DevPki) -> None:
    index = ProviderIndex(parse_ldif(index_text(pki_a, pki_b)).entries)
    a = index.provider_for_domain("PEC-A.TEST.")
    assert a is not None and a.name == "Provider A S.p.A." and a.unit is None
    assert index.provider_for_domain("test.pec-a.test").unit == "test"  # type: ignore[union-attr]
    assert index.is_certified("Alice@Legal.PEC-A.test")
    assert index.is_certified("<bob@pec-b.test>")
    assert not index.is_certified("someone@gmail.com")
    assert not index.is_certified("pec-a.test")  # not an address of that domain: no "@"
    assert index.provider_for_domain("sub.pec-a.test") is None  # no implicit subdomains

    assert index.provider_for_certificate(der(pki_b)).name == "Provider B S.p.A."  # type: ignore[union-attr]
    assert index.provider_for_certificate(cert(pki_b)).name == "Provider B S.p.A."  # type: ignore[union-attr]
    assert index.provider_for_certificate(der(pki_a)) == a  # the primary entry comes first
    assert index.provider_for_certificate(pki_a.ca.cert_pem) is None  # not DER, not listed
    ca = x509.load_pem_x509_certificate(pki_a.ca.cert_pem)
    assert index.provider_for_certificate(ca) is None
    assert [e.label for e in index.providers_for_hash(certificate_sha1(der(pki_a)).upper())] == [
        "Provider A S.p.A.",
        "Provider A S.p.A. / test",
    ]

    assert index.mail_receipt(a) == "ricevute@pec-a.test"
    assert index.mail_receipt("provider b s.p.a.") == "ricevute@pec-b.test"
    assert index.mail_receipt("Nobody") is None


def test_hash_match_alone_is_not_enough(pki_a: DevPki, pki_b: DevPki) -> None:
    """As if SHA-1 collided: the entry lists A's hash but holds B's certificate. Neither A's
    certificate (hash listed, bytes differ) nor B's (bytes listed, hash not) may match."""
    a, b = der(pki_a), der(pki_b)
    odd = ProviderEntry(
        name="Odd",
        mail_receipt="r@odd.test",
        domains=("odd.test",),
        certificate_hashes=(certificate_sha1(a),),
        certificates=(b,),
    )
    index = ProviderIndex([odd])
    assert index.providers_for_hash(certificate_sha1(a)) == (odd,)
    assert index.provider_for_certificate(a) is None
    assert index.provider_for_certificate(b) is None
    # The same entry read from LDIF is kept (with a warning) and behaves the same.
    parsed = parse_ldif(entry_ldif(odd))
    assert parsed.entries == (replace(odd, dn=parsed.entries[0].dn),)
    assert any("matches none of its providerCertificate" in w for w in parsed.warnings)
    assert ProviderIndex(parsed.entries).provider_for_certificate(a) is None


def test_own_entry_comes_first(pki_a: DevPki, pki_b: DevPki) -> None:
    own = entry_b(pki_b, description="ours")
    stale = entry_b(pki_a)  # our name, but yesterday's certificate
    squatter = ProviderEntry(
        name="Squatter",
        mail_receipt="r@squat.test",
        domains=(B_DOMAIN, "squat.test"),
        certificate_hashes=(certificate_sha1(der(pki_a)),),
        certificates=(der(pki_a),),
    )
    index = ProviderIndex([squatter, stale]).with_own(own)
    assert index.entries == (own, squatter)
    assert index.provider_for_domain(B_DOMAIN) == own
    assert index.provider_for_domain("squat.test") == squatter


# -- this provider's own entry -----------------------------------------------------------------


def test_entry_ldif_round_trip(pki_a: DevPki) -> None:
    entry = ProviderEntry(
        name="Acme, S.p.A. + figli",  # needs escaping in the DN
        mail_receipt="ricevute@acme.test",
        domains=("acme.test", "pec.acme.test"),
        certificate_hashes=(certificate_sha1(der(pki_a)),),
        certificates=(der(pki_a),),
        description="Posta certificata è",  # not ASCII: written as base64
        ldif_location_url="https://acme.test/acme.ldif.p7m",
    )
    text = write_ldif([entry])
    assert "dn: providerName=Acme\\, S.p.A. \\+ figli,o=postacert\n" in text
    assert "description:: " in text
    assert all(len(line) <= 76 for line in text.splitlines())
    (back,) = parse_ldif(text).entries
    assert back == replace(entry, dn=back.dn)
    unit = replace(entry, unit="Test, 2")
    (back_unit,) = parse_ldif(entry_ldif(unit)).entries
    assert back_unit.dn.startswith("providerUnit=Test\\, 2,providerName=Acme")
    assert back_unit.unit == "Test, 2"
    assert back_unit.ldif_location_url is None  # not allowed on a secondary entry


def test_escape_dn_value() -> None:
    assert escape_dn_value("Plain S.p.A.") == "Plain S.p.A."
    assert escape_dn_value("#1 ") == "\\#1\\ "
    assert escape_dn_value('a"b;c<d>e=f\\') == 'a\\"b\\;c\\<d\\>e\\=f\\\\'


# -- installations: config, reload service, CLI ------------------------------------------------


@pytest.fixture(scope="module")
def install(tmp_path_factory: pytest.TempPathFactory) -> Path:
    directory = tmp_path_factory.mktemp("index") / "inst"
    asyncio.run(
        init_installation(
            directory, domain=A_DOMAIN, name="Provider A S.p.A.", clock=SystemClock(), demo=False
        )
    )
    return directory


def config_with(install: Path, name: str, index: str) -> Path:
    """A copy of the installation's config with an ``[index]`` section, beside the original."""
    text = (install / "pecd.toml").read_text("utf-8") + "\n[index]\n" + index
    path = install / f"pecd-{name}.toml"
    path.write_text(text, "utf-8")
    return path


def with_index(cfg: Config, path: Path | None, **kw: object) -> Config:
    return cfg.model_copy(update={"index": IndexConfig(path=path, **kw)})  # type: ignore[arg-type]


def test_index_config_paths_are_relative_to_the_file(install: Path) -> None:
    cfg = load_config(
        config_with(
            install, "rel", 'path = "peers/igpec.ldif.p7m"\ntrusted_signer = "pki/ca.pem"\n'
        )
    )
    assert cfg.index.path == install / "peers/igpec.ldif.p7m"
    assert cfg.index.trusted_signer == install / "pki/ca.pem"
    assert cfg.index.reload_seconds == 86400
    assert load_config(install / "pecd.toml").index == IndexConfig()


def test_own_entry_export_round_trip(install: Path) -> None:
    cfg = load_config(install / "pecd.toml")
    signing = x509.load_pem_x509_certificate((install / "pki/signing.pem").read_bytes())
    own = own_entry(cfg)
    text = write_ldif([own])
    assert "dn: providerName=Provider A S.p.A.,o=postacert\n" in text
    assert "objectClass: top\nobjectClass: provider\n" in text
    assert f"managedDomains: {A_DOMAIN}\n" in text
    assert f"providerCertificateHash: {certificate_sha1(signing)}\n" in text
    assert "providerCertificate;binary:: " in text

    loaded = index_from_bytes(text.encode())
    assert loaded.index.provider_for_certificate(signing).name == "Provider A S.p.A."  # type: ignore[union-attr]
    assert loaded.index.provider_for_domain(A_DOMAIN.upper()).mail_receipt == f"ricevute@{A_DOMAIN}"  # type: ignore[union-attr]
    assert loaded.index.mail_receipt("Provider A S.p.A.") == cfg.provider.mail_receipt


async def _service_run(cfg: Config, body: object) -> None:
    svc = IndexService(cfg)
    async with contextlib.AsyncExitStack() as stack:
        await svc.start(stack)
        await body(svc)  # type: ignore[operator]
    assert svc._task is None  # stopped with the stack


def test_service_without_a_file_knows_only_this_provider(install: Path) -> None:
    cfg = load_config(install / "pecd.toml")

    async def body(svc: IndexService) -> None:
        assert len(svc.current) == 1
        assert svc.is_certified(f"x@{A_DOMAIN}")
        assert not svc.is_certified(f"x@{B_DOMAIN}")
        assert svc.loaded.source is None

    asyncio.run(_service_run(cfg, body))


def test_reload_keeps_the_last_good_copy(
    install: Path, pki_b: DevPki, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    file = tmp_path / "peers.ldif"
    file.write_text(write_ldif([entry_b(pki_b)]), "utf-8")
    cfg = with_index(load_config(install / "pecd.toml"), file)
    caplog.set_level(logging.INFO, logger="pecd.index")

    async def body(svc: IndexService) -> None:
        assert svc.is_certified(f"x@{B_DOMAIN}") and svc.is_certified(f"x@{A_DOMAIN}")
        good = svc.current
        file.write_bytes(b"\x00\x01garbage, not LDIF")
        assert await svc.reload() is False
        assert svc.current is good
        assert svc.last_error is not None and "not LDIF" in svc.last_error
        assert "keeping the last good copy" in caplog.text
        file.unlink()
        assert await svc.reload() is False
        assert "cannot read" in (svc.last_error or "")
        assert svc.is_certified(f"x@{B_DOMAIN}")
        # A good copy again, with one more domain: taken at once.
        file.write_text(
            write_ldif([entry_b(pki_b, unit=None)]).replace(
                f"managedDomains: {B_DOMAIN}\n",
                f"managedDomains: {B_DOMAIN}\nmanagedDomains: new.{B_DOMAIN}\n",
            ),
            "utf-8",
        )
        assert await svc.reload() is True
        assert svc.last_error is None
        assert svc.is_certified(f"x@new.{B_DOMAIN}")

    asyncio.run(_service_run(cfg, body))


def test_reload_on_an_interval(install: Path, pki_b: DevPki, tmp_path: Path) -> None:
    file = tmp_path / "peers.ldif"
    file.write_text(entry_ldif(entry_b(pki_b)), "utf-8")
    cfg = with_index(load_config(install / "pecd.toml"), file, reload_seconds=0.05)

    async def body(svc: IndexService) -> None:
        assert not svc.is_certified("x@later.test")
        file.write_text(
            entry_ldif(entry_b(pki_b)).replace(
                f"managedDomains: {B_DOMAIN}", "managedDomains: later.test"
            ),
            "utf-8",
        )
        await wait_for_async(
            lambda: svc.is_certified("x@later.test"), 4, "the new copy loaded", interval=0.02
        )
        assert svc.is_certified("x@later.test")

    asyncio.run(_service_run(cfg, body))


def test_start_refuses_an_unusable_copy(install: Path, tmp_path: Path) -> None:
    file = tmp_path / "peers.ldif"
    file.write_text("this is not LDIF", "utf-8")
    cfg = with_index(load_config(install / "pecd.toml"), file)

    async def run() -> None:
        async with contextlib.AsyncExitStack() as stack:
            await IndexService(cfg).start(stack)

    with pytest.raises(IndexLoadError, match="not LDIF"):
        asyncio.run(run())
    with pytest.raises(RuntimeError, match="not loaded"):
        IndexService(cfg).is_certified("x@y.test")


def test_service_with_a_signed_copy(
    install: Path, pki_a: DevPki, pki_b: DevPki, tmp_path: Path
) -> None:
    file = tmp_path / "igpec.ldif.p7m"
    file.write_bytes(
        sign_index(
            write_ldif([entry_b(pki_b)]).encode(),
            cert(pki_a),
            key(pki_a),
            digest="sha1",
            signing_time=NOW,
        )
    )
    (tmp_path / "agid.pem").write_bytes(pki_a.signing.cert_pem)
    cfg = with_index(load_config(install / "pecd.toml"), file, trusted_signer=tmp_path / "agid.pem")

    async def body(svc: IndexService) -> None:
        assert svc.is_certified(f"x@{B_DOMAIN}")
        assert svc.loaded.signer == cert(pki_a)
        # Re-signed by someone else: refused, the good copy stays.
        file.write_bytes(sign_index(write_ldif([]).encode(), cert(pki_b), key(pki_b)))
        assert await svc.reload() is False
        assert "not by the trusted" in (svc.last_error or "")
        assert svc.is_certified(f"x@{B_DOMAIN}")

    asyncio.run(_service_run(cfg, body))


def test_cli_lookup_show_export(
    install: Path, pki_b: DevPki, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (install / "peers.ldif").write_text(write_ldif([entry_b(pki_b)]), "utf-8")
    conf = str(config_with(install, "cli", 'path = "peers.ldif"\n'))
    sha_a = certificate_sha1(
        x509.load_pem_x509_certificate((install / "pki/signing.pem").read_bytes())
    )

    assert main(["index", "lookup", "PEC-B.test", "--json", "-c", conf]) == 0
    (row,) = json.loads(capsys.readouterr().out)
    assert row == {
        "provider": "Provider B S.p.A.",
        "unit": None,
        "mail_receipt": f"ricevute@{B_DOMAIN}",
        "domains": [B_DOMAIN],
        "certificate_sha1": [certificate_sha1(der(pki_b))],
    }
    assert main(["index", "lookup", f"Alice@{A_DOMAIN}", "--json", "-c", conf]) == 0
    assert json.loads(capsys.readouterr().out)[0]["provider"] == "Provider A S.p.A."
    assert main(["index", "lookup", sha_a.upper(), "--json", "-c", conf]) == 0
    assert json.loads(capsys.readouterr().out)[0]["certificate_sha1"] == [sha_a]
    assert main(["index", "lookup", "gmail.com", "-c", conf]) == 1
    assert "not in the provider index" in capsys.readouterr().err
    assert main(["index", "lookup", "pec-b.test", "-c", conf]) == 0
    assert "Provider B S.p.A." in capsys.readouterr().out

    assert main(["index", "show", "--json", "-c", conf]) == 0
    shown = json.loads(capsys.readouterr().out)
    assert [r["provider"] for r in shown] == ["Provider A S.p.A.", "Provider B S.p.A."]

    out = tmp_path / "own.ldif"
    assert main(["index", "export", "-o", str(out), "-c", conf]) == 0
    (entry,) = parse_ldif(out.read_bytes()).entries
    assert (entry.name, entry.domains, entry.certificate_hashes) == (
        "Provider A S.p.A.",
        (A_DOMAIN,),
        (sha_a,),
    )
    signed = tmp_path / "own.ldif.p7m"
    assert main(["index", "export", "--sign", "-o", str(signed), "-c", conf]) == 0
    signer = x509.load_pem_x509_certificate((install / "pki/signing.pem").read_bytes())
    assert verify_signed_index(signed.read_bytes(), signer).content == out.read_bytes()
    # A peer holding our signed entry recognises our signing certificate, and so does openssl.
    peer_view = index_from_bytes(signed.read_bytes(), trusted=signer).index
    found = peer_view.provider_for_certificate(signer)
    assert found is not None and found.name == "Provider A S.p.A."
    result = subprocess.run(
        [
            *(openssl(), "cms", "-verify", "-inform", "DER", "-in", str(signed)),
            *("-CAfile", str(install / "pki/ca.pem"), "-purpose", "any", "-binary"),
        ],
        capture_output=True,
        check=False,
    )
    assert result.returncode == 0, result.stderr.decode(errors="replace")
    assert result.stdout == out.read_bytes()


def test_cli_refuses_a_bad_index_in_one_line(
    install: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (install / "garbage.ldif").write_bytes(b"\x89PNG\r\n")
    conf = str(config_with(install, "garbage", 'path = "garbage.ldif"\n'))
    assert main(["index", "show", "-c", conf]) == 1
    err = capsys.readouterr().err
    assert err.startswith("pecd: ") and "garbage.ldif" in err and err.count("\n") == 1
