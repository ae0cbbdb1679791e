"""The provider index read from a real slapd (Debian's, started by the ``slapd`` fixture with the
RFC 6109 schema pecd ships): what is read, the config, the last good copy when the directory
fails, and two providers exchanging PEC with the directory as their only index, through a
certificate rollover and the removal of a provider."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import logging
import socket
import time
from collections.abc import Awaitable, Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from helpers import (
    LDAP_READER_DN,
    LDAP_READER_PASSWORD,
    Provider,
    Slapd,
    free_port,
    install_provider,
    provider_inbox,
    provider_send,
    provider_tls,
    slapd_fixture,
    wait_for,
    wait_settled,
)
from helpers import AppThread as Server
from pecd.clock import SystemClock
from pecd.config import Config, ConfigError, IndexConfig, load_config
from pecd.devinit import init_installation
from pecd.index import IndexService, ProviderEntry, certificate_sha1, entry_ldif, own_entry
from pecd.index.ldap import LdapIndexError, LdapSource, parse_ldap_entries, read_ldap_index
from pecd.pec.classify import Classification, classify
from pecd.pec.pki import DevPki, create_dev_pki
from pecd.pec.vocab import Kind, Ricevuta

__all__ = ["slapd_fixture"]  # the session's slapd, used here as the fixture ``slapd``

NOW = datetime(2026, 1, 15, 10, 0, tzinfo=UTC)
A, B = "pec-a.test", "pec-b.test"
A_NAME, B_NAME = "Provider A S.p.A.", "Provider B S.p.A."


@pytest.fixture(scope="module")
def pkis() -> dict[str, DevPki]:
    """A's, B's, and a second signing certificate of A's (the rollover)."""
    return {
        "a": create_dev_pki(domain=A, name=A_NAME, now=NOW),
        "a2": create_dev_pki(domain=A, name=A_NAME, now=NOW, intermediate=True),
        "b": create_dev_pki(domain=B, name=B_NAME, now=NOW),
    }


def der(pki: DevPki) -> bytes:
    return x509.load_pem_x509_certificate(pki.signing.cert_pem).public_bytes(
        serialization.Encoding.DER
    )


def entry(name: str, domains: tuple[str, ...], *pkis: DevPki, **kw: Any) -> ProviderEntry:
    certs = tuple(der(p) for p in pkis)
    return ProviderEntry(
        name=name,
        mail_receipt=f"ricevute@{domains[0]}",
        domains=domains,
        certificate_hashes=tuple(certificate_sha1(c) for c in certs),
        certificates=certs,
        **kw,
    )


def reader(slapd: Slapd, **kw: Any) -> LdapSource:
    defaults: dict[str, Any] = {
        "url": slapd.url,
        "bind_dn": LDAP_READER_DN,
        "bind_password": LDAP_READER_PASSWORD,
        "timeout": 5.0,
    }
    return LdapSource(**{**defaults, **kw})


# -- reading the directory ---------------------------------------------------------------------


def test_two_providers_read_with_every_attribute(slapd: Slapd, pkis: dict[str, DevPki]) -> None:
    slapd.clear()
    a = entry(
        A_NAME,
        (A, "posta." + A),
        pkis["a"],
        pkis["a2"],  # a rollover under way: two certificates, two hashes
        ldif_location_url="https://pec-a.test/index/a.ldif.p7m",
        description="Gestore A",
    )
    b = entry(B_NAME, (B,), pkis["b"])
    b_test = entry(B_NAME, ("collaudo." + B,), pkis["b"], unit="collaudo")
    slapd.add("\n".join(entry_ldif(e) for e in (a, b, b_test)))

    parsed = read_ldap_index(reader(slapd))
    by = {e.label: e for e in parsed.entries}
    assert sorted(by) == [A_NAME, B_NAME, f"{B_NAME} / collaudo"]
    assert parsed.skipped == () and parsed.warnings == ()
    ra = by[A_NAME]
    assert ra.mail_receipt == f"ricevute@{A}"
    assert sorted(ra.domains) == sorted((A, "posta." + A))
    assert sorted(ra.certificate_hashes) == sorted(a.certificate_hashes)
    assert len(ra.certificate_hashes) == 2
    assert sorted(ra.certificates) == sorted(a.certificates)
    assert ra.ldif_location_url == "https://pec-a.test/index/a.ldif.p7m"
    assert ra.description == "Gestore A"
    assert ra.dn.lower() == f"providername={A_NAME},o=postacert".lower()
    assert by[f"{B_NAME} / collaudo"].unit == "collaudo"
    assert by[f"{B_NAME} / collaudo"].ldif_location_url is None
    # Exactly what the LDIF source makes of the same entries (dn letter case aside).
    for e in (a, b, b_test):
        got = by[e.label]
        assert (got.name, got.unit, got.mail_receipt, got.description) == (
            e.name,
            e.unit,
            e.mail_receipt,
            e.description,
        )
        assert sorted(got.domains) == sorted(e.domains)
        assert sorted(got.certificates) == sorted(e.certificates)

    # Anonymous reading (the fixture's ACL allows it), and the same over ldaps:// and StartTLS
    # with the server's CA.
    for source in (
        reader(slapd, bind_dn=None, bind_password=None),
        reader(slapd, url=slapd.ldaps_url, ca=slapd.pki.ca_file),
        reader(slapd, starttls=True, ca=slapd.pki.ca_file),
    ):
        assert sorted(e.label for e in read_ldap_index(source).entries) == sorted(by)


def test_an_entry_that_is_not_usable_is_skipped_with_its_reason(pkis: dict[str, DevPki]) -> None:
    good = entry(B_NAME, (B,), pkis["b"])
    attrs = {
        "objectClass": [b"top", b"provider"],
        "providerName": [b"Broken"],
        "providerCertificateHash": [b"00" * 20],
        "providerCertificate;binary": [b"not DER"],
        "managedDomains": [b"broken.test"],
        "mailReceipt": [b"ricevute@broken.test"],
    }
    good_attrs = {
        "objectClass": [b"top", b"provider"],
        "providerName": [good.name.encode()],
        "providerCertificateHash": [h.encode() for h in good.certificate_hashes],
        "providerCertificate;binary": list(good.certificates),
        "managedDomains": [d.encode() for d in good.domains],
        "mailReceipt": [good.mail_receipt.encode()],
    }
    parsed = parse_ldap_entries(
        [("providerName=Broken,o=postacert", attrs), ("providerName=B,o=postacert", good_attrs)],
        source="test",
    )
    assert [e.name for e in parsed.entries] == [B_NAME]
    assert parsed.skipped == ("providerName=Broken,o=postacert: no usable providerCertificate",)
    with pytest.raises(LdapIndexError, match="no usable provider entry"):
        parse_ldap_entries([("providerName=Broken,o=postacert", attrs)], source="test")
    with pytest.raises(LdapIndexError, match="no provider entry found"):
        parse_ldap_entries([], source="test")


def test_directory_failures_say_why(slapd: Slapd, pkis: dict[str, DevPki]) -> None:
    slapd.clear()
    slapd.add(entry_ldif(entry(B_NAME, (B,), pkis["b"])))
    with pytest.raises(LdapIndexError, match="bind as 'cn=pecd,o=postacert' refused"):
        read_ldap_index(reader(slapd, bind_password="wrong"))
    with pytest.raises(LdapIndexError, match="base DN does not exist"):
        read_ldap_index(reader(slapd, base_dn="o=nowhere"))
    with pytest.raises(LdapIndexError, match="Can't contact LDAP server"):
        read_ldap_index(reader(slapd, url=f"ldap://127.0.0.1:{free_port()}/"))
    # The test CA is not among the system's: the server's certificate is refused.
    with pytest.raises(LdapIndexError, match="Can't contact LDAP server"):
        read_ldap_index(reader(slapd, url=slapd.ldaps_url))
    with pytest.raises(LdapIndexError, match="Connect error"):
        read_ldap_index(reader(slapd, starttls=True))


@contextlib.contextmanager
def silent_server() -> Iterator[int]:
    """A port whose connections the kernel accepts and nobody ever answers."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen(8)
        yield int(s.getsockname()[1])


def test_a_silent_server_times_out() -> None:
    with silent_server() as port:
        started = time.monotonic()
        with pytest.raises(LdapIndexError, match="no answer within 1 s"):
            read_ldap_index(LdapSource(url=f"ldap://127.0.0.1:{port}/", timeout=1.0, bind_dn=None))
        assert time.monotonic() - started < 5


# -- the config --------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def install(tmp_path_factory: pytest.TempPathFactory) -> Path:
    directory = tmp_path_factory.mktemp("ldapindex") / "inst"
    asyncio.run(
        init_installation(directory, domain=A, name=A_NAME, clock=SystemClock(), demo=False)
    )
    return directory


def config_with(install: Path, index: str) -> Config:
    path = install / "pecd-ldap.toml"
    path.write_text((install / "pecd.toml").read_text("utf-8") + "\n[index]\n" + index, "utf-8")
    return load_config(path)


def test_config_of_an_ldap_index(install: Path) -> None:
    cfg = config_with(
        install,
        'source = "LDAPS://Ldap.Example.it:636"\nbind_dn = "cn=pecd,o=postacert"\n'
        'bind_password_file = "secrets/ldap"\nca = "pki/ldap-ca.pem"\ntimeout_seconds = 3\n',
    )
    ic = cfg.index
    assert ic.source == "ldaps://ldap.example.it:636/"
    assert ic.bind_password_file == install / "secrets/ldap"
    assert ic.ca == install / "pki/ldap-ca.pem"
    assert (ic.timeout_seconds, ic.base_dn, ic.path) == (3, None, None)
    assert IndexConfig(source="ldap://127.0.0.1:389").source == "ldap://127.0.0.1:389/"


@pytest.mark.parametrize(
    ("index", "error"),
    [
        ('source = "http://ldap.example.it/"', "must be an ldap:// or ldaps:// URL"),
        ('source = "ldap:///"', "names no host"),
        ('source = "ldap://h/o=postacert"', "the base DN goes in index.base_dn"),
        ('source = "ldap://h:99999/"', "not an LDAP URL"),
        ('source = "ldap://h/"\npath = "x.ldif"', "not both"),
        ('source = "ldap://h/"\ntrusted_signer = "x.pem"', "trusted through its TLS"),
        ('source = "ldaps://h/"\nstarttls = true', "ldaps:// is TLS already"),
        ('source = "ldap://h/"\nca = "ca.pem"', "ca is used only with"),
        ('source = "ldap://h/"\nbind_dn = "cn=x"', "bind_dn needs bind_password"),
        ('source = "ldaps://h/"\nbind_password = "x"', "a bind password needs bind_dn"),
        (
            'source = "ldaps://h/"\nbind_dn = "cn=x"\nbind_password = "x"\n'
            'bind_password_file = "p"',
            "not both",
        ),
        ('source = "ldap://h/"\nbind_dn = "cn=x"\nbind_password = "x"', "in clear"),
        ('base_dn = "o=postacert"', "only apply to an LDAP index"),
        ('source = "ldap://h/"\ntimeout_seconds = 0', "greater than 0"),
    ],
)
def test_config_errors_are_one_clear_line(install: Path, index: str, error: str) -> None:
    with pytest.raises(ConfigError, match=error) as err:
        config_with(install, index)
    assert "\n" not in str(err.value) and ": index" in str(err.value)


# -- the service: reloads keep the last good copy ----------------------------------------------


def ldap_cfg(cfg: Config, slapd: Slapd, **kw: Any) -> Config:
    index = {
        "source": slapd.url,
        "bind_dn": LDAP_READER_DN,
        "bind_password": LDAP_READER_PASSWORD,
        "timeout_seconds": 2,
        **kw,
    }
    return cfg.model_copy(update={"index": IndexConfig(**index)})


async def run_service(cfg: Config, body: Callable[[IndexService], Awaitable[None]]) -> None:
    svc = IndexService(cfg)
    async with contextlib.AsyncExitStack() as stack:
        await svc.start(stack)
        await body(svc)


def test_reload_keeps_the_last_good_copy(
    slapd: Slapd, install: Path, pkis: dict[str, DevPki], caplog: pytest.LogCaptureFixture
) -> None:
    slapd.clear()
    slapd.add(entry_ldif(entry(B_NAME, (B,), pkis["b"])))
    base = load_config(install / "pecd.toml")
    good_cfg = ldap_cfg(base, slapd)
    caplog.set_level(logging.INFO, logger="pecd.index")

    async def body(svc: IndexService) -> None:
        assert svc.is_certified(f"x@{B}") and svc.is_certified(f"x@{A}")  # A: its own entry
        assert svc.loaded.source == f"{slapd.url.rstrip('/')}/o=postacert"
        good = svc.current
        with silent_server() as silent:
            for cfg, why in (
                (ldap_cfg(base, slapd, bind_password="wrong"), "refused"),
                (ldap_cfg(base, slapd, source=f"ldap://127.0.0.1:{free_port()}"), "contact"),
                (ldap_cfg(base, slapd, source=f"ldap://127.0.0.1:{silent}"), "no answer"),
                (ldap_cfg(base, slapd, base_dn="o=elsewhere"), "base DN"),
            ):
                svc.cfg = cfg
                caplog.clear()
                assert await svc.reload() is False
                assert svc.current is good
                assert why in (svc.last_error or "")
                lines = [r for r in caplog.records if r.levelno >= logging.ERROR]
                assert len(lines) == 1 and "keeping the last good copy" in lines[0].getMessage()
        # An empty directory is not a good copy either.
        svc.cfg = good_cfg
        slapd.clear()
        assert await svc.reload() is False
        assert "no provider entry found" in (svc.last_error or "")
        assert svc.current is good and svc.is_certified(f"x@{B}")
        # The entry back, with one more domain: taken at once.
        slapd.add(entry_ldif(entry(B_NAME, (B, "new." + B), pkis["b"])))
        assert await svc.reload() is True
        assert svc.last_error is None and svc.is_certified(f"x@new.{B}")

    asyncio.run(run_service(good_cfg, body))


def test_password_file_is_read_at_each_reload(
    slapd: Slapd, install: Path, pkis: dict[str, DevPki], tmp_path: Path
) -> None:
    slapd.clear()
    slapd.add(entry_ldif(entry(B_NAME, (B,), pkis["b"])))
    secret = tmp_path / "ldap-password"
    secret.write_text(LDAP_READER_PASSWORD + "\n", "utf-8")
    cfg = ldap_cfg(
        load_config(install / "pecd.toml"),
        slapd,
        bind_password=None,
        bind_password_file=secret,
        source=slapd.ldaps_url,
        ca=slapd.pki.ca_file,
    )

    async def body(svc: IndexService) -> None:
        assert svc.is_certified(f"x@{B}")
        secret.write_text("rotated elsewhere\n", "utf-8")
        assert await svc.reload() is False
        assert "refused" in (svc.last_error or "")
        secret.unlink()
        assert await svc.reload() is False
        assert "cannot read index.bind_password_file" in (svc.last_error or "")
        assert svc.is_certified(f"x@{B}")

    asyncio.run(run_service(cfg, body))


# -- two providers, the directory their only index ---------------------------------------------


async def _install(
    directory: Path, domain: str, name: str, ports: dict[str, int], index: str
) -> None:
    other = B if domain == A else A
    await install_provider(directory, domain, name, ports, other, index, users=("alice", "bob"))


tls = provider_tls


def send(p: Provider, frm: str, to: str, subject: str) -> None:
    provider_send(p, frm, [to], [], subject)


def inbox(p: Provider, user: str) -> list[Classification]:
    return [classify(m) for m in provider_inbox(p, user)]


def trace_events(p: Provider, event: str) -> list[Any]:
    from pecd.store.trace import events_of_type

    assert p.server is not None and p.server.app is not None and p.server.app.runner is not None
    db = p.server.app.runner.db

    async def go() -> list[Any]:
        async with db.read_session() as s:
            return await events_of_type(s, event)

    return p.server.call(go())  # type: ignore[no-any-return]


def reload_index(p: Provider) -> bool:
    """What SIGHUP does in ``pecd serve``: the index service's reload, on the app's loop."""
    assert p.server is not None and p.server.app is not None and p.server.app.index is not None
    return bool(p.server.call(p.server.app.index.reload()))


def exchange(a: Provider, b: Provider, subject: str) -> tuple[str, list[Classification]]:
    """alice@A -> bob@B; the identificativo and alice's messages for it once all is settled."""
    before = {c.daticert.identificativo for c in inbox(a, "alice") if c.daticert}
    send(a, a.addr("alice"), b.addr("bob"), subject)

    def mine() -> list[Classification]:
        return [
            c for c in inbox(a, "alice") if c.daticert and c.daticert.identificativo not in before
        ]

    acc = wait_for(lambda: [c for c in mine() if c.ricevuta is Ricevuta.ACCETTAZIONE])
    ident = acc[0].daticert.identificativo  # type: ignore[union-attr]
    assert a.server is not None and b.server is not None
    wait_for(lambda: len(mine()) >= 2 or trace_events(b, "anomalia"), what="a receipt or anomaly")
    wait_settled(a.server, b.server)
    return ident, mine()


@pytest.fixture
def providers(slapd: Slapd, tmp_path: Path) -> Iterator[tuple[Provider, Provider]]:
    slapd.clear()
    ports = {A: free_port(), B: free_port()}
    # A reads the directory over ldaps://, B over ldap:// with StartTLS; both bind as the reader.
    common = f'bind_dn = "{LDAP_READER_DN}"\nbind_password = "{LDAP_READER_PASSWORD}"\n'
    common += f'ca = "{slapd.pki.ca_file}"\ntimeout_seconds = 5\n'
    index = {
        A: f'source = "{slapd.ldaps_url}"\n' + common,
        B: f'source = "{slapd.url}"\nstarttls = true\n' + common,
    }
    for domain, name in ((A, A_NAME), (B, B_NAME)):
        asyncio.run(_install(tmp_path / domain, domain, name, ports, index[domain]))
    (tmp_path / "peers-ca.pem").write_bytes(
        b"".join((tmp_path / d / "pki/ca.pem").read_bytes() for d in (A, B))
    )
    a = Provider(A, load_config(tmp_path / A / "pecd.toml"))
    b = Provider(B, load_config(tmp_path / B / "pecd.toml"))
    # The directory holds both providers' entries, as `pecd index export` writes them.
    slapd.add("\n".join(entry_ldif(own_entry(p.cfg)) for p in (a, b)))
    a.server, b.server = Server(a.cfg).start(), Server(b.cfg).start()
    try:
        yield a, b
    finally:
        for p in (a, b):
            if p.server is not None:
                p.server.stop()


@pytest.mark.slow
def test_two_providers_on_the_ldap_index_through_rollover_and_removal(
    providers: tuple[Provider, Provider], slapd: Slapd, tmp_path: Path
) -> None:
    a, b = providers
    assert b.server is not None and b.server.app is not None and b.server.app.index is not None
    assert b.server.app.index.loaded.source == f"{slapd.url.rstrip('/')}/o=postacert"
    bob = b.addr("bob")

    # 1. Certified mail A -> B, with the directory as both providers' index.
    ident, got = exchange(a, b, "Via LDAP")
    (avv,) = [c for c in got if c.ricevuta is Ricevuta.AVVENUTA_CONSEGNA]
    assert avv.is_valid_pec and avv.daticert is not None and avv.daticert.consegna == bob
    (env,) = [c for c in inbox(b, "bob") if c.daticert and c.daticert.identificativo == ident]
    assert env.kind is Kind.TRANSPORT_ENVELOPE and env.is_valid_pec
    prese = [c for c in inbox(a, "ricevute") if c.ricevuta is Ricevuta.PRESA_IN_CARICO]
    assert [c.daticert.identificativo for c in prese if c.daticert] == [ident]

    # 2. Rollover: A's entry gets a second certificate and hash, B reloads (SIGHUP), A signs
    #    with the new key from then on, and B still takes A's envelopes as valid PEC.
    new = create_dev_pki(domain=A, name=A_NAME, now=datetime.now(UTC), intermediate=True)
    pki = tmp_path / A / "pki"
    (pki / "signing-2.key").write_bytes(new.signing.key_pem)
    (pki / "signing-2.pem").write_bytes(new.signing.cert_pem)
    chain = [pki / "chain-2.pem"] if new.intermediate is not None else []
    if new.intermediate is not None:
        chain[0].write_bytes(new.intermediate.cert_pem)
    new_der = x509.load_pem_x509_certificate(new.signing.cert_pem).public_bytes(
        serialization.Encoding.DER
    )
    dn = own_entry(a.cfg).dn or f"providerName={A_NAME},o=postacert"
    slapd.modify(
        f"dn: {dn}\nchangetype: modify\n"
        f"add: providerCertificateHash\nproviderCertificateHash: {certificate_sha1(new_der)}\n-\n"
        f"add: providerCertificate;binary\nproviderCertificate;binary:: "
        f"{base64.b64encode(new_der).decode()}\n-\n"
    )
    assert reload_index(b) is True
    (a_entry,) = [e for e in b.server.app.index.current if e.name == A_NAME]
    assert len(a_entry.certificate_hashes) == 2
    assert a.server is not None
    a.server.stop()
    signing = a.cfg.signing.model_copy(
        update={"key": pki / "signing-2.key", "cert": pki / "signing-2.pem", "chain": chain}
    )
    a.cfg = a.cfg.model_copy(update={"signing": signing})
    a.server = Server(a.cfg).start()
    ident2, got = exchange(a, b, "Dopo il cambio di chiave")
    (avv,) = [c for c in got if c.ricevuta is Ricevuta.AVVENUTA_CONSEGNA]
    assert avv.is_valid_pec
    (env,) = [c for c in inbox(b, "bob") if c.daticert and c.daticert.identificativo == ident2]
    assert env.kind is Kind.TRANSPORT_ENVELOPE and env.is_valid_pec
    assert env.signer_der == new_der

    # 3. A is removed from the directory; B reloads: A's next envelope is an anomaly at B, and
    #    no receipt of any kind goes back to A.
    slapd.delete(dn)
    assert reload_index(b) is True
    assert b.server.app.index.provider_for_domain(A) is None
    anomalies = len(trace_events(b, "anomalia"))
    ident3, got = exchange(a, b, "Gestore rimosso")
    assert [c.ricevuta for c in got] == [Ricevuta.ACCETTAZIONE]
    reasons = [e.error for e in trace_events(b, "anomalia")]
    assert len(reasons) == anomalies + 1 and "non presente nell'indice" in reasons[-1]
    bobs = inbox(b, "bob")
    assert len(bobs) == 3
    assert bobs[-1].kind is Kind.ANOMALY_ENVELOPE and bobs[-1].signature.valid
    assert bobs[-1].daticert is None
    prese = [c for c in inbox(a, "ricevute") if c.ricevuta is Ricevuta.PRESA_IN_CARICO]
    assert ident3 not in [c.daticert.identificativo for c in prese if c.daticert]
    assert len(prese) == 2
