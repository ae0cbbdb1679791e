"""The cheaper receipt and envelope building (builders._body, mime's part helpers, Notice.html)
gives what the functions it replaced gave.

The replaced functions are kept below as the reference, as they were: every builder is run with
the same clock and the same "random" tokens through both, and the signed messages compared byte
for byte (PKCS#1 v1.5 signatures are deterministic); the helpers are compared on generated input,
hostile input included.
"""

from __future__ import annotations

import base64
import contextlib
import html
import itertools
import quopri
import secrets
from collections.abc import Callable, Iterator, Sequence
from datetime import UTC, datetime

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pecd.pec import builders as b
from pecd.pec import mime, texts
from pecd.pec.builders import BuiltMessage, ProviderIdentity, Transmission
from pecd.pec.checks import Violation
from pecd.pec.daticert import Daticert
from pecd.pec.daticert import build as build_daticert
from pecd.pec.pki import DevPki
from pecd.pec.smime import KeySigner
from pecd.pec.timefmt import pec_time
from pecd.pec.vocab import (
    DATICERT_FILENAME,
    POSTACERT_FILENAME,
    DaticertTipo,
    Errore,
    TipoRicevuta,
)

# --- the replaced functions, as they were ----------------------------------------------------------


def old_qp_text_part(content_type: str, text: str) -> bytes:
    text = mime.unsurrogate(text)
    try:
        data, charset = text.encode("iso-8859-1"), "iso-8859-1"
    except UnicodeEncodeError:
        data, charset = text.encode("utf-8"), "utf-8"
    body = quopri.encodestring(mime.to_crlf(data.replace(b"\r\n", b"\n")))
    return (
        f'Content-Type: {content_type}; charset="{charset}"\r\n'
        "Content-Transfer-Encoding: quoted-printable\r\n\r\n"
    ).encode() + mime.to_crlf(body)


def old_base64_part(headers: Sequence[str], data: bytes) -> bytes:
    encoded = base64.encodebytes(data).replace(b"\n", b"\r\n")
    head = "".join(h + "\r\n" for h in headers)
    return (head + "Content-Transfer-Encoding: base64\r\n\r\n").encode() + encoded


def old_rfc822_part(filename: str, message: bytes) -> bytes:
    message = mime.to_crlf(message)
    cte = "7bit" if message.isascii() else "8bit"
    head = (
        f'Content-Type: message/rfc822; name="{filename}"\r\n'
        f"Content-Transfer-Encoding: {cte}\r\n"
        f'Content-Disposition: inline; filename="{filename}"\r\n\r\n'
    ).encode()
    return b"".join([head, message] if message.endswith(mime.CRLF) else [head, message, mime.CRLF])


def old_new_boundary(*contents: bytes) -> str:
    while True:
        boundary = f"----=_pecd_{secrets.token_hex(16)}"
        if not any(boundary.encode() in c for c in contents):
            return boundary


def old_multipart(subtype: str, parts: Sequence[bytes]) -> bytes:
    boundary = old_new_boundary(*parts)
    out = [f'Content-Type: multipart/{subtype}; boundary="{boundary}"\r\n\r\n'.encode()]
    for part in parts:
        out.append(f"--{boundary}\r\n".encode())
        out += [part, mime.CRLF]
    out.append(f"--{boundary}--\r\n".encode())
    return b"".join(out)


def old_plain(n: texts.Notice) -> str:
    body = "\n\n".join("\n".join(p) for p in n.paragraphs)
    return f"{n.title}\n\n{body}\n"


def old_html(n: texts.Notice) -> str:
    paras = "\n".join(
        "<p>" + "<br>\n".join(html.escape(line) for line in p) + "</p>" for p in n.paragraphs
    )
    title = html.escape(n.title)
    return (
        "<html>\n<head><title>"
        + title
        + "</title></head>\n<body>\n<h3>"
        + title
        + "</h3>\n<hr>\n"
        + paras
        + "\n</body>\n</html>\n"
    )


def old_body(notice: texts.Notice, d: Daticert | None, original: bytes | None) -> bytes:
    parts = [
        old_multipart(
            "alternative",
            [
                old_qp_text_part("text/plain", old_plain(notice)),
                old_qp_text_part("text/html", old_html(notice)),
            ],
        )
    ]
    if d is not None:
        parts.append(
            old_base64_part(
                [
                    f'Content-Type: application/xml; name="{DATICERT_FILENAME}"',
                    f'Content-Disposition: inline; filename="{DATICERT_FILENAME}"',
                ],
                build_daticert(d),  # daticert.build is unchanged
            )
        )
    if original is not None:
        parts.append(old_rfc822_part(POSTACERT_FILENAME, original))
    return old_multipart("mixed", parts)


def old_sign(
    provider: ProviderIdentity,
    when: object,
    headers: list[tuple[str, str]],
    body: bytes,
    raw_fields: Sequence[bytes] = (),
) -> bytes:
    signed = b.sign_multipart(
        headers,
        body,
        provider.signer,
        digest=provider.digest,
        signing_time=when.instant,  # type: ignore[attr-defined]
    )
    if not raw_fields:
        return signed
    return b"".join(raw_fields) + signed


# --- determinism -----------------------------------------------------------------------------------


@contextlib.contextmanager
def fixed_tokens(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """secrets.token_hex gives 1, 2, 3... (as 32 hex digits) from here on: msgids and boundaries."""
    counter = itertools.count(1)
    with monkeypatch.context() as m:
        m.setattr(secrets, "token_hex", lambda n=16: f"{next(counter):0{2 * n}x}")
        yield


def token(i: int) -> str:
    return f"{i:032x}"


DOMAIN = "pec.example.test"
WHEN = pec_time(datetime(2026, 3, 2, 9, 15, 30, tzinfo=UTC))
SENT = pec_time(datetime(2026, 3, 1, 21, 0, 0, tzinfo=UTC))


@pytest.fixture(scope="module")
def provider(dev_pki: DevPki) -> ProviderIdentity:
    signer = KeySigner.from_pem(dev_pki.signing.key_pem, dev_pki.signing.cert_pem)
    return ProviderIdentity(
        name="Example PEC S.p.A.",
        domain=DOMAIN,
        service_address=f"posta-certificata@{DOMAIN}",
        signer=signer,
    )


def original(subject: bytes, body: bytes, *, eol: bytes = b"\r\n", msgid: bool = True) -> bytes:
    lines = [
        b"Received: from client.example (client [192.0.2.1])",
        b"\tby smtp.pec.example.test; Mon, 2 Mar 2026",
        b"Date: Mon, 02 Mar 2026 10:15:00 +0100",
        b"From: Alice Rossi <alice@pec.example.test>",
        b"Reply-To: Alice <alice.reply@pec.example.test>",
        b"To: Bob <bob@pec.example.test>, dave@pec.other.test",
        b"Cc: carol@pec.example.test, eve@gmail.example",
        b"Subject: " + subject,
        *([b"Message-ID: <client-42@alice.laptop>"] if msgid else []),
        b"X-TipoRicevuta: breve",
        b"MIME-Version: 1.0",
        b'Content-Type: multipart/mixed; boundary="XYZ"',
        b"",
        b"--XYZ",
        b"Content-Type: text/plain; charset=utf-8",
        b"",
        body,
        b"--XYZ",
        b'Content-Type: application/pdf; name="fattura.pdf"',
        b'Content-Disposition: attachment; filename="fattura.pdf"',
        b"Content-Transfer-Encoding: base64",
        b"",
        b"JVBERi0xLjQKJcfsj6IKNSAwIG9iago8PC9MZW5ndGggNiAwIFI+PgpzdHJlYW0K",
        b"--XYZ--",
    ]
    return eol.join(lines)


SUBJECTS = [
    b"Fattura n. 12",
    b"=?utf-8?q?Fattura_n=2E_12_=E2=80=94_citt=C3=A0?=",  # not Latin-1: the UTF-8 text parts
    b"=?utf-8?q?Citt=C3=A0_e_perch=C3=A9?=",  # Latin-1
    b"a = b,  spaces at the end   ",
    b"." + b"x" * 200,  # a line far longer than 76 characters, a leading dot
    b"tab\tand <html> & \"quotes\" 'single'",
    b"=?utf-8?b?" + base64.b64encode(b"bell\x07 nul\x00 cr\r lf\n") + b"?=",
    b"=?utf-8?b?" + base64.b64encode("\ufffe\uffff \U0001f600 \u2028".encode()) + b"?=",
    b"caf\xe9 raw latin-1 byte",
]
BODIES = [
    b"Ciao Bob, in allegato.",
    # The boundaries the builders will draw (tokens 2 and 3 are the first two after the msgid):
    # each must be drawn again, in the old code and the new alike.
    b"----=_pecd_" + token(2).encode() + b" and ----=_pecd_" + token(3).encode(),
    b"----=_pecd_" + token(4).encode() + b"\r\n----=_pecd_smime_" + token(5).encode(),
]


def transmission(raw: bytes) -> Transmission:
    return Transmission.from_submission(
        raw,
        mail_from="alice@pec.example.test",
        rcpt_to=[
            "bob@pec.example.test",
            "dave@pec.other.test",
            "carol@pec.example.test",
            "eve@gmail.example",
        ],
        identificativo=f"pecd.20260302101530.{'a' * 32}@{DOMAIN}",
        is_certified=lambda a: not a.endswith("@gmail.example"),
    )


def every_build(raw: bytes, p: ProviderIdentity) -> dict[str, Callable[[], BuiltMessage]]:
    tx = transmission(raw)
    post = b.postacert_of(raw, tx.identificativo, tx.msgid)
    esteso = '5.1.1 - Example PEC S.p.A. - utente <sconosciuto> & "altro"'
    logged = tx.daticert(DaticertTipo.AVVENUTA_CONSEGNA, p, SENT, consegna="bob@pec.example.test")
    return {
        "accettazione": lambda: b.accettazione(tx, p, WHEN),
        "non_accettazione": lambda: b.non_accettazione(
            tx, p, WHEN, violations=[Violation("x", "it", "manca <From> & altro")]
        ),
        "non_accettazione_virus": lambda: b.non_accettazione(tx, p, WHEN, virus="Eicar-Test"),
        "transport_envelope": lambda: b.transport_envelope(raw, tx, p, WHEN),
        "anomaly_envelope": lambda: b.anomaly_envelope(
            raw, p, WHEN, rcpt_to=["Bob@pec.example.test"], error="firma non valida\r\n<x>"
        ),
        "presa_in_carico": lambda: b.presa_in_carico(
            tx,
            p,
            WHEN,
            ricezione=["bob@pec.example.test", "carol@pec.example.test"],
            mail_receipt="ricevute@pec.other.test",
        ),
        **{
            f"avvenuta_consegna_{kind.value}": (
                lambda kind=kind: b.avvenuta_consegna(
                    tx, p, WHEN, recipient="bob@pec.example.test", postacert=post, kind=kind
                )
            )
            for kind in TipoRicevuta
        },
        "avvenuta_consegna_cc": lambda: b.avvenuta_consegna(
            tx, p, WHEN, recipient="carol@pec.example.test", postacert=post
        ),
        "errore_consegna": lambda: b.errore_consegna(
            tx,
            p,
            WHEN,
            recipient="dave@pec.other.test",
            errore=Errore.NO_DEST,
            errore_esteso=esteso,
        ),
        "errore_consegna_virus": lambda: b.errore_consegna(
            tx, p, WHEN, recipient="dave@pec.other.test", errore=Errore.VIRUS, errore_esteso=esteso
        ),
        "preavviso_12": lambda: b.preavviso_errore_consegna(
            tx, p, WHEN, recipient="dave@pec.other.test", sent=SENT, final=False
        ),
        "preavviso_24": lambda: b.preavviso_errore_consegna(
            tx, p, WHEN, recipient="dave@pec.other.test", sent=SENT, final=True
        ),
        "rilevazione_virus": lambda: b.rilevazione_virus(
            tx,
            p,
            WHEN,
            recipient="dave@pec.other.test",
            errore_esteso=esteso,
            mail_receipt="ricevute@pec.other.test",
        ),
        "reproduced_receipt": lambda: b.reproduced_receipt(
            logged, p, WHEN, to="alice@pec.example.test"
        ),
    }


CASES = [
    (s, body, eol, msgid)
    for s in SUBJECTS
    for body in BODIES[:1]
    for eol in (b"\r\n",)
    for msgid in (True,)
] + [
    (SUBJECTS[0], BODIES[1], b"\r\n", True),
    (SUBJECTS[1], BODIES[2], b"\n", True),
    (SUBJECTS[0], BODIES[0], b"\n", False),
    (SUBJECTS[0], BODIES[0] + b"\r\n", b"\r\n", False),  # ends with a line end
]


@pytest.mark.parametrize(("subject", "body", "eol", "msgid"), CASES)
def test_every_builder_signs_the_same_bytes(
    provider: ProviderIdentity,
    monkeypatch: pytest.MonkeyPatch,
    subject: bytes,
    body: bytes,
    eol: bytes,
    msgid: bool,
) -> None:
    raw = original(subject, body, eol=eol, msgid=msgid)
    builds = every_build(raw, provider)
    for name, build in builds.items():
        with fixed_tokens(monkeypatch):
            new = build()
        with fixed_tokens(monkeypatch), monkeypatch.context() as m:
            m.setattr(b, "_body", old_body)
            m.setattr(b, "_sign", old_sign)
            old = build()
        assert new.raw == old.raw, name
        assert (new.message_id, new.daticert, new.envelope_to) == (
            old.message_id,
            old.daticert,
            old.envelope_to,
        ), name


def test_a_boundary_found_in_the_original_is_drawn_again(
    provider: ProviderIdentity, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The case above that makes both codes draw again does make them (token 2 is the text
    parts' boundary in an accettazione: msgid 1, alternative 2)."""
    raw = original(SUBJECTS[0], BODIES[1])
    tx = transmission(raw)
    post = b.postacert_of(raw, tx.identificativo, tx.msgid)
    with fixed_tokens(monkeypatch):
        built = b.avvenuta_consegna(
            tx, provider, WHEN, recipient="bob@pec.example.test", postacert=post
        )
    # msgid 1, alternative 2, mixed 3 is in the original: 4.
    assert f'multipart/mixed; boundary="----=_pecd_{token(4)}"'.encode() in built.raw


# --- the helpers, on generated input ---------------------------------------------------------------

any_text = st.lists(
    st.one_of(
        st.characters(),  # surrogates, controls, anything
        st.sampled_from(["\r", "\n", "\r\n", " ", "\t", "=", ".", "è", "€", "\udce9", "\ud800"]),
    ),
    max_size=400,
).map("".join)
line = st.lists(
    st.one_of(
        st.characters(blacklist_categories=("Cs",)),
        st.sampled_from(["\n", " ", "\t", "&", "<", ">", '"', "'", "<br>", ""]),
    ),
    max_size=90,
).map("".join)
notices = st.builds(
    texts.Notice, line, st.lists(st.lists(line, max_size=6).map(tuple), max_size=5).map(tuple)
)


@settings(max_examples=500, deadline=None)
@given(any_text, st.sampled_from(["text/plain", "text/html"]))
def test_qp_text_part_as_before(text: str, content_type: str) -> None:
    assert mime.qp_text_part(content_type, text) == old_qp_text_part(content_type, text)


@pytest.mark.parametrize(
    "text",
    [
        "",
        "no line end at all " * 10,
        "x" * 75 + "\n" + "x" * 76 + "\n" + "x" * 77 + "\n",
        "trailing space \ntrailing tab\t\n=equals=\n.\n.dot\n",
        "è" * 30 + "\n" + "€" * 30 + "\n",
        "a\r\nb\rc\n\r\n",
        "lone \udce9 escaped byte\n",
        "\udcc3\udca9 escaped UTF-8\n",
        "ends without a line end",
        "  \n\t\n",
    ],
)
def test_qp_text_part_edges(text: str) -> None:
    for content_type in ("text/plain", "text/html"):
        assert mime.qp_text_part(content_type, text) == old_qp_text_part(content_type, text)


@settings(max_examples=500, deadline=None)
@given(notices)
def test_notice_renders_as_before(notice: texts.Notice) -> None:
    assert notice.plain() == old_plain(notice)
    assert notice.html() == old_html(notice)


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=3000))
def test_base64_and_rfc822_parts_as_before(data: bytes) -> None:
    headers = ['Content-Type: application/xml; name="x"', "Content-Disposition: inline"]
    assert mime.base64_part(headers, data) == old_base64_part(headers, data)
    assert mime.rfc822_part(POSTACERT_FILENAME, data) == old_rfc822_part(POSTACERT_FILENAME, data)


def test_part_heads_cannot_hold_a_boundary() -> None:
    """What builders._body leaves out of the boundary check."""
    heads = [mime.rfc822_pieces(POSTACERT_FILENAME, m)[0] for m in (b"a\r\n", b"\xe9\r\n")]
    for head in [*heads, b._DATICERT_PART_HEAD]:
        assert b"_pecd_" not in head
        assert head.endswith(b"\r\n\r\n")
