"""Issue 12, the format-level deviations: each test is named after the rule it holds pecd to.

- Reply-To copied unaltered into the transport envelope.
- Control characters (and lone surrogates) stripped from any text copied into what pecd signs.
- errore-esteso in one format (code, provider, reason) whatever the path.
- The signature profile: SHA-1 or SHA-256, the intermediate CA in every signature.
"""

from __future__ import annotations

import re
import tomllib
from collections.abc import Collection
from datetime import UTC, datetime
from pathlib import Path

import pytest
from asn1crypto import cms
from cryptography import x509
from cryptography.hazmat.primitives import serialization

import helpers
from pecd.pec import builders as b
from pecd.pec import daticert as dc
from pecd.pec import mime, smime, texts
from pecd.pec.builders import BuiltMessage, ProviderIdentity, Transmission
from pecd.pec.checks import Violation
from pecd.pec.classify import classify
from pecd.pec.pki import DevPki, create_dev_pki
from pecd.pec.smime import DigestName, KeySigner
from pecd.pec.timefmt import pec_time
from pecd.pec.vocab import Errore, Kind, TipoRicevuta

DOMAIN = "pec.example.test"
NAME = "Example PEC S.p.A."
NOW = datetime(2026, 3, 2, 9, 15, 30, tzinfo=UTC)
WHEN = pec_time(NOW)
CORPUS = Path(__file__).parent / "data" / "pec-real"


@pytest.fixture(scope="module")
def chained_pki() -> DevPki:
    return create_dev_pki(domain=DOMAIN, name=NAME, now=NOW, intermediate=True)


@pytest.fixture(scope="module")
def root_file(chained_pki: DevPki, tmp_path_factory: pytest.TempPathFactory) -> Path:
    p = tmp_path_factory.mktemp("root") / "ca.pem"
    p.write_bytes(chained_pki.ca.cert_pem)  # the root only: the intermediate must come in the CMS
    return p


def provider_for(pki: DevPki, digest: DigestName) -> ProviderIdentity:
    signer = KeySigner.from_pem(pki.signing.key_pem, pki.signing.cert_pem, pki.chain_pem or None)
    return ProviderIdentity(
        name=NAME,
        domain=DOMAIN,
        service_address=f"posta-certificata@{DOMAIN}",
        signer=signer,
        digest=digest,
    )


@pytest.fixture(scope="module", params=["sha1", "sha256"])
def provider(request: pytest.FixtureRequest, chained_pki: DevPki) -> ProviderIdentity:
    return provider_for(chained_pki, request.param)


def openssl_verify(raw: bytes, ca_file: Path, tmp_path: Path) -> None:
    helpers.openssl_verify(raw, ca_file, tmp_path, at=NOW)


def submission(original: bytes, mail_from: str = f"alice@{DOMAIN}") -> Transmission:
    return Transmission.from_submission(
        original,
        mail_from=mail_from,
        rcpt_to=[f"bob@{DOMAIN}"],
        identificativo=f"pecd.20260302101530.0123456789abcdef@{DOMAIN}",
        is_certified=lambda _a: True,
    )


def message(*headers: bytes, body: bytes = b"Ciao.\r\n") -> bytes:
    base = [
        f"From: Alice <alice@{DOMAIN}>".encode(),
        f"To: bob@{DOMAIN}".encode(),
        b"Date: Mon, 02 Mar 2026 10:15:00 +0100",
    ]
    names = {h.split(b":", 1)[0].lower() for h in headers}
    kept = [h for h in base if h.split(b":", 1)[0].lower() not in names]
    return b"\r\n".join([*kept, *headers]) + b"\r\n\r\n" + body


def head_fields(raw: bytes) -> list[tuple[str, bytes]]:
    return mime.header_fields(mime.head_of(raw))


# --- 1. Reply-To copied unaltered --------------------------------------------------------------


@pytest.mark.parametrize(
    "reply_to",
    [
        b'"Ufficio Protocollo" <Protocollo@PEC.Example.test>',
        b"Anna <anna@pec.example.test>, Bruno <bruno@pec.other.test>",
        b"=?utf-8?q?Citt=C3=A0_di_Roma?= <Comune.Roma@pec.example.test>",
        b"ufficio@pec.example.test (sede legale)",
    ],
)
def test_reply_to_copied_unaltered(
    provider: ProviderIdentity, root_file: Path, tmp_path: Path, reply_to: bytes
) -> None:
    original = message(b"Subject: Prova", b"Reply-To: " + reply_to)
    tx = submission(original)
    env = b.transport_envelope(original, tx, provider, WHEN)
    openssl_verify(env.raw, root_file, tmp_path)
    fields = [chunk for name, chunk in head_fields(env.raw) if name.lower() == "reply-to"]
    assert fields == [b"Reply-To: " + reply_to + b"\r\n"]  # byte for byte, once
    # daticert <risposte> holds the bare first address (spec 3: "Reply-To (From when none)").
    first = mime.get_first(original, "Reply-To") or ""
    assert env.daticert is not None
    assert env.daticert.risposte == b._addresses(original, "Reply-To")[0]
    assert env.daticert.risposte.lower() in first.lower()


def test_reply_to_copied_unaltered_without_one_is_the_from_address(
    provider: ProviderIdentity,
) -> None:
    original = message(b"Subject: Prova", b'From: "Alice Rossi" <Alice@PEC.example.test>')
    env = b.transport_envelope(original, submission(original), provider, WHEN)
    fields = [chunk for name, chunk in head_fields(env.raw) if name.lower() == "reply-to"]
    assert fields == [b"Reply-To: alice@pec.example.test\r\n"]


@pytest.mark.parametrize(
    "sample",
    [
        "posta-certificata__aruba__oca-pecmsg-message2.eml",  # Reply-To in the original
        "posta-certificata__aruba__fabioportieri-xdcr-2022-02-00583.eml",  # and a display From
        "posta-certificata__sogei__oca-fpa-invio-file-7339338.eml",  # no Reply-To: From's
    ],
)
def test_reply_to_copied_unaltered_as_real_providers_do(
    provider: ProviderIdentity, sample: str
) -> None:
    """Re-wrap the original of a real envelope: pecd's Reply-To is the real provider's."""
    real = (CORPUS / sample).read_bytes()
    c = classify(real)
    assert c.postacert is not None
    # The original as the client sent it: the provider's Message-ID and X-Riferimento out.
    inner = mime.to_crlf(c.postacert)
    env = b.transport_envelope(inner, submission(inner), provider, WHEN)
    ours = mime.get_all(env.raw, "Reply-To")
    assert ours == mime.get_all(real, "Reply-To")
    if mime.get_all(inner, "Reply-To"):
        assert ours == mime.get_all(inner, "Reply-To")


# --- 2. control characters stripped from any text copied into headers pecd signs --------------

HOSTILE_SUBJECTS = {
    "nul": b"Subject: a\x00b",
    "encoded-nul": b"Subject: =?utf-8?q?a=00b?=",
    "crlf-injection": b"Subject: =?utf-8?q?a=0D=0ABcc:_evil@x.test=0D=0A=0D=0Abody?=",
    "lone-surrogate": b"Subject: =?utf-7?q?a+2AA-b?=",
    "escaped-surrogate": b"Subject: =?unicode-escape?q?a=5Cudcff=5Cud800b?=",
    "undecodable-bytes": b"Subject: caf\xe9 \xff\xfe fattura",
    "del-esc-bell": b"Subject: a\x7f\x1b[31m\x07b",
}
HOSTILE_OTHERS = (
    b"From: =?utf-7?q?Al+2AA-ice?= <alice@pec.example.test>",
    b"Reply-To: =?utf-8?q?Evil=00=0D=0AX-Injected:_1?= <r@pec.example.test>",
    b"Message-ID: <id\x00\x01@client.test>",
    b"Cc: carol\x00@pec.example.test",
)
_CONTROL = re.compile("[\x00-\x08\x0a-\x1f\x7f]")
_SURROGATE = re.compile("[\ud800-\udfff]")
_XML_CONTROL = re.compile(rb"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f]|&#")


def every_builder(original: bytes, provider: ProviderIdentity) -> dict[str, BuiltMessage]:
    tx = submission(original)
    env = b.transport_envelope(original, tx, provider, WHEN)
    postacert = b.postacert_of(original, tx.identificativo, tx.msgid)
    rcpt = f"bob@{DOMAIN}"
    built = {
        "transport": env,
        "anomaly": b.anomaly_envelope(
            original, provider, WHEN, rcpt_to=[rcpt], error="firma non valida"
        ),
        "accettazione": b.accettazione(tx, provider, WHEN),
        "non-accettazione": b.non_accettazione(
            tx, provider, WHEN, violations=[Violation("bcc", "Bcc\x00 presente", "Bcc present")]
        ),
        "non-accettazione-virus": b.non_accettazione(tx, provider, WHEN, virus="Eicar\x00"),
        "presa-in-carico": b.presa_in_carico(
            tx, provider, WHEN, ricezione=[rcpt], mail_receipt=f"ricevute@{DOMAIN}"
        ),
        "errore-consegna": b.errore_consegna(
            tx,
            provider,
            WHEN,
            recipient=rcpt,
            errore=Errore.NO_DEST,
            errore_esteso=texts.errore_esteso("5.1.1", provider.name, "utente\x00 sconosciuto"),
        ),
        "errore-consegna-virus": b.errore_consegna(
            tx, provider, WHEN, recipient=rcpt, errore=Errore.VIRUS, errore_esteso="virus\x07 X"
        ),
        "preavviso": b.preavviso_errore_consegna(
            tx, provider, WHEN, recipient=rcpt, sent=WHEN, final=False
        ),
        "preavviso-final": b.preavviso_errore_consegna(
            tx, provider, WHEN, recipient=rcpt, sent=WHEN, final=True
        ),
        "rilevazione-virus": b.rilevazione_virus(
            tx,
            provider,
            WHEN,
            recipient=rcpt,
            errore_esteso="5.7.1 - X - virus",
            mail_receipt=f"ricevute@{DOMAIN}",
        ),
    }
    for kind in TipoRicevuta:
        built[f"avvenuta-{kind.value}"] = b.avvenuta_consegna(
            tx, provider, WHEN, recipient=rcpt, postacert=postacert, kind=kind
        )
    assert env.daticert is not None
    built["riproduzione"] = b.reproduced_receipt(
        built["accettazione"].daticert or env.daticert, provider, WHEN, to=tx.mittente
    )
    return built


# Fields an envelope copies from what it wraps (spec 2.1): byte for byte but for raw control bytes.
# Their encoded words are not pecd's text and stay as they came ("unchanged"); every other field
# is pecd's own, and its decoded text must be clean too.
COPIED = {"received", "return-path", "to", "cc", "reply-to", "message-id"}


def assert_clean(m: BuiltMessage, copied: Collection[str] = ()) -> None:
    head = mime.head_of(m.raw)
    head.decode("utf-8")  # strict: no undecodable byte, no encoded surrogate
    for name, chunk in head_fields(m.raw):
        raw_value = chunk.split(b":", 1)[1]
        # Only CRLF followed by folding whitespace, no other control byte.
        assert not re.search(
            rb"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f]|\r(?!\n)|\r\n(?![ \t]|\Z)", raw_value
        ), (
            name,
            chunk,
        )
        if name.lower() in copied:
            continue
        decoded = mime.decode_words(mime.get_first(m.raw, name) or "")
        assert not _CONTROL.search(decoded), (name, decoded)
        assert not _SURROGATE.search(decoded), (name, decoded)
        assert name.lower() not in ("bcc", "x-injected"), chunk
    if m.daticert is not None:
        xml = dc.build(m.daticert)
        assert not _XML_CONTROL.search(xml), xml
        for value in (m.daticert.oggetto, m.daticert.risposte, m.daticert.msgid):
            assert value is None or not _CONTROL.search(value)


@pytest.mark.parametrize("subject", list(HOSTILE_SUBJECTS), ids=list(HOSTILE_SUBJECTS))
def test_control_characters_stripped_from_signed_headers(
    provider: ProviderIdentity, root_file: Path, tmp_path: Path, subject: str
) -> None:
    original = message(HOSTILE_SUBJECTS[subject], *HOSTILE_OTHERS)
    for kind, m in every_builder(original, provider).items():
        assert_clean(m, COPIED if kind in ("transport", "anomaly") else ())
        openssl_verify(m.raw, root_file, tmp_path)
        c = classify(
            m.raw, at=NOW, trust_roots=[x509.load_pem_x509_certificate(root_file.read_bytes())]
        )
        assert c.signature.valid, (kind, c.signature.error)
        if m.daticert is not None:
            assert c.daticert == m.daticert, kind


def test_control_characters_stripped_from_the_anomaly_envelope_headers(
    provider: ProviderIdentity,
) -> None:
    """The issue's case: a NUL in a Subject reached the provider-signed anomaly envelope."""
    original = message(b"Subject: fattura\x00 urgente", b"Message-ID: <a\x00b@x.test>")
    m = b.anomaly_envelope(original, provider, WHEN, rcpt_to=[f"bob@{DOMAIN}"], error="x")
    assert b"\x00" not in mime.head_of(m.raw)
    assert mime.get_first(m.raw, "Subject") == "ANOMALIA MESSAGGIO: fattura urgente"
    assert m.message_id == "ab@x.test"
    assert mime.get_all(m.raw, "Message-ID") == ["<ab@x.test>"]
    # The wrapped message itself is what was received, byte for byte.
    assert mime.to_crlf(original) in m.raw


def test_control_characters_stripped_by_one_function() -> None:
    clean = mime.clean_header_text
    assert clean("a\x00b\x7fc\x1bd") == "abcd"
    assert clean("a\r\nBcc: x") == "a Bcc: x"
    assert clean("tab\tkept") == "tab\tkept"
    assert clean("a\ud800b") == "a\ufffdb"
    assert clean("caf\udcc3\udca9") == "café"  # surrogateescape'd UTF-8 comes back
    assert clean("già pulito") == "già pulito"
    assert mime.decode_words("=?utf-7?q?a+2AA-b?=") == "a\ufffdb"
    assert b.original_subject(b"Subject: =?utf-8?q?a=00b?=\r\n\r\n") == "ab"
    assert mime.clean_field(b"To: a\x00@b.test\r\n") == b"To: a@b.test\r\n"
    assert mime.clean_field(b"To: a@b.test\r\nnot a field\r\n") == (
        b"To: a@b.test\r\n not a field\r\n"
    )


def test_lone_surrogates_do_not_crash_any_builder(provider: ProviderIdentity) -> None:
    """A Transmission made from text decoded with surrogateescape (a queued job, a caller's
    decode) still builds: every builder, and the surrogates come out as U+FFFD or bytes."""
    original = message(b"Subject: x")
    tx = Transmission(
        identificativo=f"id@{DOMAIN}",
        mittente=f"alice@{DOMAIN}",
        destinatari=submission(original).destinatari,
        risposte=f"alice@{DOMAIN}",
        oggetto="caf\udcc3\udca9 \ud800 \udcff",
        msgid="<m\udcff@x>",
    )
    assert tx.oggetto == "café \ufffd \ufffd"
    for m in (
        b.accettazione(tx, provider, WHEN),
        b.transport_envelope(original, tx, provider, WHEN),
        b.preavviso_errore_consegna(
            tx, provider, WHEN, recipient=f"bob@{DOMAIN}", sent=WHEN, final=True
        ),
    ):
        assert_clean(m)
    breve = message(
        b"Subject: =?utf-7?q?+2AA-?=",
        b'Content-Type: multipart/mixed; boundary="B"',
        body=(
            b'--B\r\nContent-Type: application/pdf; name="=?utf-7?q?f+2AA-.pdf?="\r\n\r\n'
            b"x\r\n--B--\r\n"
        ),
    )
    stx = submission(breve)
    m = b.avvenuta_consegna(
        stx,
        provider,
        WHEN,
        recipient=f"bob@{DOMAIN}",
        postacert=b.postacert_of(breve, stx.identificativo, stx.msgid),
        kind=TipoRicevuta.BREVE,
    )
    assert_clean(m)


# --- 3. errore-esteso in one format ------------------------------------------------------------


def test_errore_esteso_one_format() -> None:
    assert texts.errore_esteso("5.1.1", "ARUBA PEC S.p.A.", "indirizzo non valido") == (
        "5.1.1 - ARUBA PEC S.p.A. - indirizzo non valido"
    )
    long = texts.errore_esteso("5.0.0", "P\x00", "x\r\ny" * 500)
    assert long.startswith("5.0.0 - P - x y")
    assert len(long) <= len("5.0.0 - P - ") + texts.ERRORE_ESTESO_REASON_MAX
    with pytest.raises(ValueError):
        texts.errore_esteso("550", "P", "r")


@pytest.mark.parametrize(
    ("reply", "code", "reason"),
    [
        ("550 5.1.1 <bob@x.test>: user unknown", "5.1.1", "user unknown"),
        (
            "550-5.1.1 The email account does not exist.\r\n550 5.1.1 Try again",
            "5.1.1",
            "The email account does not exist. Try again",
        ),
        ("554 Transaction failed", "5.0.0", "Transaction failed"),
        ("452 4.2.2 mailbox full", "4.2.2", "mailbox full"),
        ("450 busy", "4.0.0", "busy"),
        ("garbage", "5.0.0", "garbage"),
    ],
)
def test_errore_esteso_one_format_from_an_smtp_reply(reply: str, code: str, reason: str) -> None:
    assert texts.smtp_reply_parts(reply) == (code, reason)
    assert texts.errore_esteso_from_reply(reply, "Prov") == f"{code} - Prov - {reason}"


_ESTESO = re.compile(r"^[45]\.\d{1,3}\.\d{1,3} - " + re.escape(NAME) + r" - \S")


def test_errore_esteso_one_format_in_every_builder(provider: ProviderIdentity) -> None:
    original = message(b"Subject: Prova")
    built = every_builder(original, provider)
    for kind in ("non-accettazione", "non-accettazione-virus", "preavviso", "preavviso-final"):
        d = built[kind].daticert
        assert d is not None and d.errore_esteso is not None
        assert _ESTESO.match(d.errore_esteso), (kind, d.errore_esteso)
    virus = built["non-accettazione-virus"].daticert
    assert virus is not None and virus.errore_esteso == f"5.7.1 - {NAME} - virus rilevato: Eicar"


def test_errore_esteso_one_format_preavviso_codes(provider: ProviderIdentity) -> None:
    """The final notice starts 5.4.1 (opec's code, PagoPA's final-failure marker); the 12 h one is
    transient and must not (it is not a failure yet)."""
    built = every_builder(message(b"Subject: Prova"), provider)
    first, final = built["preavviso"].daticert, built["preavviso-final"].daticert
    assert first is not None and final is not None
    assert final.errore_esteso == f"5.4.1 - {NAME} - messaggio non consegnato entro 24 ore"
    assert first.errore_esteso == f"4.4.1 - {NAME} - messaggio non consegnato entro 12 ore"
    assert not (first.errore_esteso or "").startswith("5.4.1")


# --- 4. the signature profile --------------------------------------------------------------------


def der(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.DER)


def cms_certificates(raw: bytes) -> list[x509.Certificate]:
    _content, der = smime.split_signed(raw)
    signed = cms.ContentInfo.load(der)["content"]
    return [x509.load_der_x509_certificate(c.chosen.dump()) for c in signed["certificates"]]


def test_signature_profile_chain_in_every_signature(
    provider: ProviderIdentity, chained_pki: DevPki, root_file: Path, tmp_path: Path
) -> None:
    signing = x509.load_pem_x509_certificate(chained_pki.signing.cert_pem)
    inter = x509.load_pem_x509_certificate(chained_pki.chain_pem)
    root = x509.load_pem_x509_certificate(chained_pki.ca.cert_pem)
    signing.verify_directly_issued_by(inter)
    inter.verify_directly_issued_by(root)
    micalg = {"sha1": "sha1", "sha256": "sha-256"}[provider.digest]
    for kind, m in every_builder(message(b"Subject: Prova"), provider).items():
        # a SET OF in DER: sorted, whatever order they were given in
        assert sorted(cms_certificates(m.raw), key=der) == sorted([signing, inter], key=der), kind
        assert f'micalg="{micalg}"'.encode() in mime.head_of(m.raw), kind
        openssl_verify(m.raw, root_file, tmp_path)
        c = classify(m.raw, at=NOW, trust_roots=[root])
        assert c.signature.valid and c.signature.digest == provider.digest, kind
        assert c.kind is not Kind.PLAIN


def test_signature_profile_both_digests_classify_valid(chained_pki: DevPki) -> None:
    """The reception point (classify without trust roots, the index pins the certificate) and
    `pecd verify` (with the root) accept SHA-1 and SHA-256 envelopes alike."""
    root = x509.load_pem_x509_certificate(chained_pki.ca.cert_pem)
    original = message(b"Subject: Prova")
    for digest in ("sha1", "sha256"):
        p = provider_for(chained_pki, digest)  # type: ignore[arg-type]
        env = b.transport_envelope(original, submission(original), p, WHEN)
        for c in (classify(env.raw), classify(env.raw, at=NOW, trust_roots=[root])):
            assert c.is_valid_pec and c.kind is Kind.TRANSPORT_ENVELOPE, c.errors
            assert c.signature.digest == digest


def test_signature_profile_without_the_chain_the_root_is_not_reached(chained_pki: DevPki) -> None:
    bare = KeySigner.from_pem(chained_pki.signing.key_pem, chained_pki.signing.cert_pem)
    p = ProviderIdentity(NAME, DOMAIN, f"posta-certificata@{DOMAIN}", bare, "sha1")
    original = message(b"Subject: Prova")
    env = b.transport_envelope(original, submission(original), p, WHEN)
    root = x509.load_pem_x509_certificate(chained_pki.ca.cert_pem)
    with pytest.raises(smime.SignatureError) as caught:
        smime.verify(env.raw, at=NOW, trust_roots=[root])
    assert caught.value.code == "untrusted-chain"


def test_signature_profile_pecd_init_writes_sha1_and_the_chain(tmp_path: Path) -> None:
    import asyncio

    from pecd.clock import SystemClock
    from pecd.config import load_config
    from pecd.devinit import init_installation
    from pecd.runtime.identity import load_signer

    result = asyncio.run(
        init_installation(tmp_path, domain=DOMAIN, name=NAME, clock=SystemClock(), demo=False)
    )
    text = result.config.read_text("utf-8")
    signing = tomllib.loads(text)["signing"]
    assert signing["digest"] == "sha1" and signing["chain"] == ["pki/chain.pem"]
    assert re.search(r"#.*SHA-1.*\n(#.*\n)*digest = \"sha1\"", text)
    assert '"sha256" is the opt-in' in text
    cfg = load_config(result.config)
    assert cfg.signing.digest == "sha1"
    signer = load_signer(cfg)
    chain = (tmp_path / "pki" / "chain.pem").read_bytes()
    assert signer.chain == (x509.load_pem_x509_certificate(chain),)
    signer.certificate.verify_directly_issued_by(signer.chain[0])
    root = x509.load_pem_x509_certificate((tmp_path / "pki" / "ca.pem").read_bytes())
    signer.chain[0].verify_directly_issued_by(root)
    tls = x509.load_pem_x509_certificate((tmp_path / "pki" / "tls.pem").read_bytes())
    tls.verify_directly_issued_by(root)  # TLS clients keep trusting ca.pem alone
