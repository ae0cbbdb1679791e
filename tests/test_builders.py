"""Every envelope and receipt builder: structure, literals, daticert, and openssl's verdict."""

from __future__ import annotations

import email
import email.policy
import io
import subprocess
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from lxml import etree

from pecd.pec import builders as b
from pecd.pec import daticert as dc
from pecd.pec.builders import BuiltMessage, ProviderIdentity, Transmission
from pecd.pec.checks import Violation
from pecd.pec.classify import classify
from pecd.pec.pki import DevPki
from pecd.pec.smime import KeySigner
from pecd.pec.timefmt import PecTime, pec_time
from pecd.pec.vocab import (
    DATICERT_FILENAME,
    POSTACERT_FILENAME,
    DaticertTipo,
    DestinatarioTipo,
    Errore,
    Kind,
    Ricevuta,
    TipoRicevuta,
)

DOMAIN = "pec.example.test"
WHEN = pec_time(datetime(2026, 3, 2, 9, 15, 30, tzinfo=UTC))
ORIGINAL = (
    b"Received: from client.example (client [192.0.2.1])\n\tby smtp.pec.example.test; Mon, 2 Mar 2026\n"
    b"Date: Mon, 02 Mar 2026 10:15:00 +0100\n"
    b"From: Alice Rossi <alice@pec.example.test>\n"
    b"To: Bob <bob@pec.example.test>, dave@pec.other.test\n"
    b"Cc: carol@pec.example.test, eve@gmail.example\n"
    b"Subject: =?utf-8?q?Fattura_n=2E_12_=E2=80=94_citt=C3=A0?=\n"
    b"Message-ID: <client-42@alice.laptop>\n"
    b"X-TipoRicevuta: breve\n"
    b"MIME-Version: 1.0\n"
    b'Content-Type: multipart/mixed; boundary="XYZ"\n'
    b"\n"
    b"--XYZ\nContent-Type: text/plain; charset=utf-8\n\nCiao Bob, in allegato.\n"
    b'--XYZ\nContent-Type: application/pdf; name="fattura.pdf"\n'
    b'Content-Disposition: attachment; filename="fattura.pdf"\nContent-Transfer-Encoding: base64\n\n'
    b"JVBERi0xLjQKJcfsj6IKNSAwIG9iago8PC9MZW5ndGggNiAwIFI+PgpzdHJlYW0K\n--XYZ--\n"
)
RCPTS = [
    "bob@pec.example.test",
    "dave@pec.other.test",
    "carol@pec.example.test",
    "eve@gmail.example",
]


def certified(addr: str) -> bool:
    return not addr.endswith("@gmail.example")


@pytest.fixture(scope="module", params=["sha256", "sha1"])
def provider(request: pytest.FixtureRequest, dev_pki: DevPki) -> ProviderIdentity:
    signer = KeySigner.from_pem(dev_pki.signing.key_pem, dev_pki.signing.cert_pem)
    return ProviderIdentity(
        name="Example PEC S.p.A.",
        domain=DOMAIN,
        service_address=f"posta-certificata@{DOMAIN}",
        signer=signer,
        digest=request.param,
    )


@pytest.fixture(scope="module")
def ca_file(dev_pki: DevPki, tmp_path_factory: pytest.TempPathFactory) -> Path:
    p = tmp_path_factory.mktemp("ca") / "ca.pem"
    p.write_bytes(dev_pki.ca.cert_pem)
    return p


@pytest.fixture(scope="module")
def tx() -> Transmission:
    return Transmission.from_submission(
        ORIGINAL,
        mail_from="Alice@PEC.example.test",
        rcpt_to=RCPTS,
        identificativo="pecd.20260302101530.0123456789abcdef@pec.example.test",
        is_certified=certified,
    )


def openssl_verify(raw: bytes, ca_file: Path, tmp_path: Path) -> None:
    msg = tmp_path / "msg.eml"
    msg.write_bytes(raw)
    r = subprocess.run(
        [
            "openssl",
            "cms",
            "-verify",
            "-inform",
            "SMIME",
            "-in",
            str(msg),
            "-CAfile",
            str(ca_file),
            "-purpose",
            "any",
            "-out",
            "/dev/null",
        ],
        capture_output=True,
        text=True,
        check=False,
    )
    assert r.returncode == 0, r.stderr


DTD = etree.DTD(io.StringIO(dc.dtd_text()))


def check_common(
    m: BuiltMessage, ca_file: Path, tmp_path: Path, at: PecTime = WHEN
) -> email.message.Message:
    openssl_verify(m.raw, ca_file, tmp_path)
    c = classify(m.raw, at=at.instant)
    assert c.signature.valid, c.signature.error
    assert not c.errors, c.errors
    if m.daticert is not None:
        assert c.daticert == m.daticert
        xml = dc.build(m.daticert)
        assert DTD.validate(etree.fromstring(xml)), DTD.error_log
    msg = email.message_from_bytes(m.raw, policy=email.policy.compat32)
    assert msg["Date"] == WHEN.rfc5322
    assert msg["Message-ID"] == f"<{m.message_id}>"
    assert msg.get_content_type() == "multipart/signed"
    assert all(byte < 128 for byte in m.raw.split(b"\r\n\r\n", 1)[0])  # 7-bit headers
    return msg


def parts(msg: email.message.Message) -> dict[str, email.message.Message]:
    found: dict[str, email.message.Message] = {}
    signed_mixed = msg.get_payload(0)
    assert isinstance(signed_mixed, email.message.Message)
    for part in signed_mixed.get_payload():  # type: ignore[union-attr]
        name = part.get_filename() or part.get_content_type()
        found[name] = part
    return found


def text_of(msg: email.message.Message) -> str:
    alt = parts(msg)["multipart/alternative"]
    plain = alt.get_payload(0)
    payload = plain.get_payload(decode=True)  # type: ignore[union-attr]
    assert isinstance(payload, bytes)
    return payload.decode(plain.get_content_charset() or "ascii")  # type: ignore[union-attr]


def test_transmission_from_submission(tx: Transmission) -> None:
    assert tx.mittente == "alice@pec.example.test"
    assert tx.addresses == tuple(RCPTS)
    assert [d.tipo for d in tx.destinatari] == [DestinatarioTipo.CERTIFICATO] * 3 + [
        DestinatarioTipo.ESTERNO
    ]
    assert tx.oggetto == "Fattura n. 12 — città"
    assert tx.msgid == "<client-42@alice.laptop>"
    assert tx.ricevuta is TipoRicevuta.BREVE
    assert tx.risposte == "alice@pec.example.test"
    assert tx.receipt_kind_for("bob@pec.example.test") is TipoRicevuta.BREVE
    assert tx.receipt_kind_for("CAROL@pec.example.test") is TipoRicevuta.SINTETICA
    assert (
        tx.receipt_kind_for("stranger@pec.example.test") is TipoRicevuta.BREVE
    )  # unresolved -> To


def test_transport_envelope(
    tx: Transmission, provider: ProviderIdentity, ca_file: Path, tmp_path: Path
) -> None:
    m = b.transport_envelope(ORIGINAL, tx, provider, WHEN)
    msg = check_common(m, ca_file, tmp_path)
    assert msg["X-Trasporto"] == "posta-certificata"
    assert msg["X-TipoRicevuta"] == "breve"
    assert (
        msg["From"] == '"Per conto di: alice@pec.example.test" <posta-certificata@pec.example.test>'
    )
    assert msg["Reply-To"] == "alice@pec.example.test"
    assert msg["X-Riferimento-Message-ID"] == "<client-42@alice.laptop>"
    assert msg["To"] == "Bob <bob@pec.example.test>, dave@pec.other.test"
    assert msg["Received"].startswith("from client.example")
    assert str(email.header.make_header(email.header.decode_header(msg["Subject"]))) == (
        "POSTA CERTIFICATA: Fattura n. 12 — città"
    )
    assert m.envelope_to == tuple(RCPTS)
    assert m.daticert is not None and m.daticert.tipo is DaticertTipo.POSTA_CERTIFICATA
    assert m.daticert.ricevuta is TipoRicevuta.BREVE
    c = classify(m.raw, at=WHEN.instant)
    assert c.kind is Kind.TRANSPORT_ENVELOPE
    # The wrapped original: only Message-ID replaced and X-Riferimento-Message-ID added.
    assert c.postacert is not None
    assert b"Message-ID: <pecd.20260302101530.0123456789abcdef@pec.example.test>\r\n" in c.postacert
    assert b"X-Riferimento-Message-ID: <client-42@alice.laptop>\r\n" in c.postacert
    assert b"<client-42@alice.laptop>" not in c.postacert.replace(
        b"X-Riferimento-Message-ID: <client-42", b""
    )
    assert c.postacert.replace(b"\r\n", b"\n").endswith(ORIGINAL.split(b"\n\n", 1)[1])
    assert "è stato inviato da" in text_of(msg)
    p = parts(msg)
    assert set(p) == {"multipart/alternative", DATICERT_FILENAME, POSTACERT_FILENAME}


def test_accettazione(
    tx: Transmission, provider: ProviderIdentity, ca_file: Path, tmp_path: Path
) -> None:
    m = b.accettazione(tx, provider, WHEN)
    msg = check_common(m, ca_file, tmp_path)
    assert msg["X-Ricevuta"] == "accettazione"
    assert msg["To"] == "alice@pec.example.test"
    assert msg["From"] == "posta-certificata@pec.example.test"
    text = text_of(msg)
    assert 'bob@pec.example.test ("posta certificata")' in text
    assert 'eve@gmail.example ("posta ordinaria")' in text
    assert m.daticert is not None and m.daticert.ricevuta is None and m.daticert.consegna is None
    assert POSTACERT_FILENAME not in parts(msg)


def test_non_accettazione(
    tx: Transmission, provider: ProviderIdentity, ca_file: Path, tmp_path: Path
) -> None:
    v = Violation("bcc-present", "Il campo Bcc non è ammesso", "Bcc is not allowed")
    m = b.non_accettazione(tx, provider, WHEN, violations=[v])
    msg = check_common(m, ca_file, tmp_path)
    assert msg["X-Ricevuta"] == "non-accettazione"
    assert msg["X-VerificaSicurezza"] is None
    assert "Il campo Bcc non è ammesso" in text_of(msg)
    assert m.daticert is not None and m.daticert.errore is Errore.ALTRO
    assert POSTACERT_FILENAME not in parts(msg)
    mv = b.non_accettazione(tx, provider, WHEN, virus="Eicar-Test-Signature")
    msgv = check_common(mv, ca_file, tmp_path)
    assert msgv["X-VerificaSicurezza"] == "errore"
    assert msgv["Subject"].startswith("=?") or msgv["Subject"].startswith(
        "AVVISO DI NON ACCETTAZIONE PER VIRUS: "
    )
    assert mv.daticert is not None and mv.daticert.errore is Errore.VIRUS
    with pytest.raises(ValueError):
        b.non_accettazione(tx, provider, WHEN)


def test_presa_in_carico(
    tx: Transmission, provider: ProviderIdentity, ca_file: Path, tmp_path: Path
) -> None:
    m = b.presa_in_carico(
        tx,
        provider,
        WHEN,
        ricezione=["bob@pec.example.test", "carol@pec.example.test"],
        mail_receipt="ricevute@pec.sender.test",
    )
    msg = check_common(m, ca_file, tmp_path)
    assert msg["X-Ricevuta"] == "presa-in-carico"
    assert msg["To"] == "ricevute@pec.sender.test"
    assert m.envelope_to == ("ricevute@pec.sender.test",)
    assert m.daticert is not None
    assert m.daticert.ricezione == ("bob@pec.example.test", "carol@pec.example.test")


@pytest.mark.parametrize(
    ("recipient", "kind", "has_postacert"),
    [
        ("bob@pec.example.test", TipoRicevuta.COMPLETA, True),
        ("bob@pec.example.test", TipoRicevuta.BREVE, True),
        ("bob@pec.example.test", TipoRicevuta.SINTETICA, False),
        ("carol@pec.example.test", None, False),  # Cc -> sintetica
    ],
)
def test_avvenuta_consegna(
    tx: Transmission,
    provider: ProviderIdentity,
    ca_file: Path,
    tmp_path: Path,
    recipient: str,
    kind: TipoRicevuta | None,
    has_postacert: bool,
) -> None:
    postacert = b.postacert_of(ORIGINAL, tx.identificativo, tx.msgid)
    m = b.avvenuta_consegna(tx, provider, WHEN, recipient=recipient, postacert=postacert, kind=kind)
    msg = check_common(m, ca_file, tmp_path)
    assert msg["X-Ricevuta"] == "avvenuta-consegna"
    assert m.daticert is not None and m.daticert.consegna == recipient
    assert m.daticert.ricevuta is (kind or TipoRicevuta.SINTETICA)
    c = classify(m.raw, at=WHEN.instant)
    assert (c.postacert is not None) is has_postacert
    if kind is TipoRicevuta.COMPLETA:
        assert c.postacert == postacert
    if kind is TipoRicevuta.BREVE:
        assert c.postacert is not None
        assert b'filename="fattura.pdf.hash"' in c.postacert
        assert b"JVBERi0xLjQK" not in c.postacert


def test_errore_consegna(
    tx: Transmission, provider: ProviderIdentity, ca_file: Path, tmp_path: Path
) -> None:
    m = b.errore_consegna(
        tx,
        provider,
        WHEN,
        recipient="nobody@pec.example.test",
        errore=Errore.NO_DEST,
        errore_esteso="5.1.1 - Example PEC S.p.A. - indirizzo non valido",
    )
    msg = check_common(m, ca_file, tmp_path)
    assert msg["X-Ricevuta"] == "errore-consegna"
    assert msg["Subject"].startswith("AVVISO DI MANCATA CONSEGNA: ") or msg["Subject"].startswith(
        "=?"
    )
    assert m.daticert is not None and m.daticert.errore_esteso is not None
    mv = b.errore_consegna(
        tx,
        provider,
        WHEN,
        recipient="bob@pec.example.test",
        errore=Errore.VIRUS,
        errore_esteso="virus Eicar-Test-Signature",
    )
    msgv = check_common(mv, ca_file, tmp_path)
    assert msgv["X-VerificaSicurezza"] == "errore"
    with pytest.raises(ValueError):
        b.errore_consegna(
            tx, provider, WHEN, recipient="x@y.it", errore=Errore.NESSUNO, errore_esteso=""
        )


@pytest.mark.parametrize("final", [False, True])
def test_preavviso(
    tx: Transmission, provider: ProviderIdentity, ca_file: Path, tmp_path: Path, final: bool
) -> None:
    sent = pec_time(WHEN.instant - timedelta(hours=24 if final else 12))
    m = b.preavviso_errore_consegna(
        tx, provider, WHEN, recipient="dave@pec.other.test", sent=sent, final=final
    )
    msg = check_common(m, ca_file, tmp_path)
    assert msg["X-Ricevuta"] == "preavviso-errore-consegna"
    assert msg["To"] == "alice@pec.example.test"  # the sender, not the recipient
    text = text_of(msg)
    assert ("entro 24 ore" in text) is final
    assert ("prime 12 ore" in text) is not final
    assert POSTACERT_FILENAME not in parts(msg)


def test_rilevazione_virus(
    tx: Transmission, provider: ProviderIdentity, ca_file: Path, tmp_path: Path
) -> None:
    m = b.rilevazione_virus(
        tx,
        provider,
        WHEN,
        recipient="bob@pec.example.test",
        errore_esteso="virus Eicar-Test-Signature",
        mail_receipt="ricevute@pec.sender.test",
    )
    msg = check_common(m, ca_file, tmp_path)
    assert msg["X-Ricevuta"] == "rilevazione-virus"
    assert msg["X-Mittente"] == "alice@pec.example.test"
    assert msg["To"] == "ricevute@pec.sender.test"
    assert msg["Subject"].startswith("PROBLEMA DI SICUREZZA: ") or msg["Subject"].startswith("=?")
    assert m.daticert is not None and m.daticert.errore is Errore.VIRUS
    assert POSTACERT_FILENAME not in parts(msg)


def test_anomaly_envelope(provider: ProviderIdentity, ca_file: Path, tmp_path: Path) -> None:
    received = (
        b"Received: from mx.gmail.example\r\nFrom: Spammer <spam@gmail.example>\r\n"
        b"To: bob@pec.example.test\r\nSubject: offerta\r\nMessage-ID: <spam-1@gmail.example>\r\n\r\nCompra!\r\n"
    )
    m = b.anomaly_envelope(
        received, provider, WHEN, rcpt_to=["bob@pec.example.test"], error="firma assente"
    )
    msg = check_common(m, ca_file, tmp_path)
    assert msg["X-Trasporto"] == "errore"
    assert msg["Subject"] == "ANOMALIA MESSAGGIO: offerta"
    assert msg["Message-ID"] == "<spam-1@gmail.example>"
    assert msg["Reply-To"] == "spam@gmail.example"
    assert msg["From"] == '"Per conto di: spam@gmail.example" <posta-certificata@pec.example.test>'
    assert m.daticert is None
    c = classify(m.raw, at=WHEN.instant)
    assert c.kind is Kind.ANOMALY_ENVELOPE and c.daticert is None
    assert c.postacert == received
    assert set(parts(msg)) == {"multipart/alternative", POSTACERT_FILENAME}


BUILDERS: list[Callable[[Transmission, ProviderIdentity], BuiltMessage]] = [
    lambda t, p: b.accettazione(t, p, WHEN),
    lambda t, p: b.transport_envelope(ORIGINAL, t, p, WHEN),
    lambda t, p: b.presa_in_carico(
        t, p, WHEN, ricezione=["bob@pec.example.test"], mail_receipt="r@x.it"
    ),
]


@pytest.mark.parametrize("build", BUILDERS)
def test_each_message_gets_a_fresh_id(
    tx: Transmission,
    provider: ProviderIdentity,
    build: Callable[[Transmission, ProviderIdentity], BuiltMessage],
) -> None:
    first, second = build(tx, provider), build(tx, provider)
    if first.daticert and first.daticert.tipo is DaticertTipo.POSTA_CERTIFICATA:
        assert first.message_id == second.message_id == tx.identificativo
    else:
        assert first.message_id != second.message_id
        assert first.message_id.endswith("@" + DOMAIN)


def test_receipt_subject_literals(tx: Transmission, provider: ProviderIdentity) -> None:
    plain = Transmission(**{**tx.__dict__, "oggetto": "Prova"})
    subjects = {
        Ricevuta.ACCETTAZIONE: b.accettazione(plain, provider, WHEN),
        Ricevuta.PRESA_IN_CARICO: b.presa_in_carico(
            plain, provider, WHEN, ricezione=["a@b.it"], mail_receipt="r@x.it"
        ),
    }
    for ric, m in subjects.items():
        msg = email.message_from_bytes(m.raw, policy=email.policy.compat32)
        expected = {
            "accettazione": "ACCETTAZIONE: Prova",
            "presa-in-carico": "PRESA IN CARICO: Prova",
        }
        assert msg["Subject"] == expected[ric.value]
