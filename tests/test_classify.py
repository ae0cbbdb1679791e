"""Classification of received messages, judged on real provider messages and on garbage."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from helpers import CORPUS_DIR as CORPUS
from pecd.pec.classify import NotMailError, classify
from pecd.pec.vocab import Kind, Ricevuta


def _manifest() -> list[dict[str, str]]:
    lines = (CORPUS / "MANIFEST.tsv").read_text("utf-8").splitlines()
    header = lines[0].split("\t")
    return [dict(zip(header, line.split("\t"), strict=True)) for line in lines[1:] if line]


MANIFEST = _manifest()


def expected_kind(row: dict[str, str]) -> tuple[Kind, Ricevuta | None]:
    t = row["type"]
    if t == "posta-certificata":
        return Kind.TRANSPORT_ENVELOPE, None
    if t.startswith("none"):
        return Kind.PLAIN, None
    return Kind.RECEIPT, Ricevuta(t)


@pytest.mark.parametrize("row", MANIFEST, ids=lambda r: r["file"])
def test_corpus_message_is_classified_as_manifest_says(row: dict[str, str]) -> None:
    raw = (CORPUS / row["file"]).read_bytes()
    c = classify(raw)
    kind, ricevuta = expected_kind(row)
    assert c.kind is kind
    assert c.ricevuta is ricevuta
    notes = row["notes"]
    if "no top-level daticert.xml" in notes:
        assert c.daticert is None
    else:
        assert c.daticert is not None
        tipo = notes.split('<postacert tipo="', 1)[1].split('"', 1)[0]
        errore = notes.split('errore="', 1)[1].split('"', 1)[0]
        gestore = notes.split('gestore-emittente="', 1)[1].split('"', 1)[0]
        assert (c.daticert.tipo.value, c.daticert.errore.value) == (tipo, errore)
        assert c.daticert.gestore_emittente == gestore
        if "<ricevuta tipo=" in notes:
            assert c.daticert.ricevuta is not None
            assert f'<ricevuta tipo="{c.daticert.ricevuta.value}" />' in notes
    if notes.startswith("cms-verify-noverify OK"):
        # Real signatures verify at their own signing time; their chain is not ours to check.
        assert c.signature.valid, c.signature.error
        assert c.signature.digest == "sha1"
        assert c.is_valid_pec
        assert (
            c.signature.signer_subject is not None
            and "Posta Certificata" in c.signature.signer_subject
        )
    elif "content altered after signing" in notes:
        assert c.signature.present and not c.signature.valid
        assert c.signature.error_code == "digest-mismatch"
        assert not c.is_valid_pec
    else:
        assert not c.signature.valid
        assert c.signature.error  # says why: no valid signature is present
        assert not c.is_valid_pec


def test_corpus_envelopes_expose_their_postacert() -> None:
    for row in MANIFEST:
        if row["type"] != "posta-certificata":
            continue
        c = classify((CORPUS / row["file"]).read_bytes())
        assert c.postacert is not None, row["file"]
        assert b"Message-ID:" in c.postacert or b"Message-Id:" in c.postacert


def test_verify_rejects_after_certificate_expiry() -> None:
    raw = (CORPUS / "accettazione__aruba__oca-fpa-it03339130126-00009.eml").read_bytes()
    c = classify(raw, at=datetime(2024, 1, 1, tzinfo=UTC))
    assert not c.signature.valid and c.signature.error_code == "expired"


def test_headers_without_signature_are_not_trusted() -> None:
    raw = (
        b"From: posta-certificata@pec.example.test\r\nTo: a@b.it\r\nX-Ricevuta: avvenuta-consegna\r\n"
        b"Subject: CONSEGNA: x\r\n\r\nhello\r\n"
    )
    c = classify(raw)
    assert c.kind is Kind.RECEIPT
    assert not c.is_valid_pec
    assert any("without daticert.xml" in e for e in c.errors)
    assert any("no S/MIME signature" in e for e in c.errors)


def test_not_mail_is_refused() -> None:
    with pytest.raises(NotMailError):
        classify(b"\x00\x01\x02 binary junk without any header")


def _mutate(data: bytes, draw: Any) -> bytes:
    op = draw(st.sampled_from(["flip", "cut", "insert", "lf", "crlf"]))
    if not data:
        return data
    i = draw(st.integers(0, len(data) - 1))
    if op == "flip":
        return data[:i] + bytes([data[i] ^ draw(st.integers(1, 255))]) + data[i + 1 :]
    if op == "cut":
        return data[:i]
    if op == "insert":
        return data[:i] + draw(st.binary(min_size=1, max_size=40)) + data[i:]
    if op == "lf":
        return data.replace(b"\r\n", b"\n")
    return data.replace(b"\n", b"\r\n")


CORPUS_BYTES = [(CORPUS / r["file"]).read_bytes() for r in MANIFEST]


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.data())
def test_classify_never_raises_on_mutated_corpus(data: st.DataObject) -> None:
    raw = data.draw(st.sampled_from(CORPUS_BYTES))
    for _ in range(data.draw(st.integers(1, 3))):
        raw = _mutate(raw, data.draw)
    try:
        c = classify(raw)
    except NotMailError:
        return
    assert isinstance(c.errors, tuple)


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=3000))
def test_classify_never_raises_on_random_bytes(raw: bytes) -> None:
    try:
        classify(b"Content-Type: multipart/signed; boundary=x\r\n\r\n" + raw)
        classify(raw)
    except NotMailError:
        pass
