"""Hostile bytes at both SMTP points: whatever got a 250 ends in exactly one outcome (issue 12).

- Access point: every submission answered 250 gives the sender exactly one accettazione or
  non-accettazione, matched through the intake key of the 250 reply (``queued as <key>``) and
  the ``intake`` the trace event of that receipt carries.
- Reception point: every message answered 250 ends as exactly one anomaly envelope in the
  holder's Maildir, matched through the ``job`` of the anomalia event and its generated id, or as
  another logged outcome of that job (a trace event).
  Then up to 20 of pecd's own signed envelopes of those submissions are handed back to the
  reception point, as they are (taken in charge: the copy delivered once per identificativo)
  and with a hostile unsigned Subject (an anomaly).
- No job is left parked, and no header pecd wrote into a stored message holds a NUL or another
  C0 control.

The inputs: a fixed list of known troublemakers (NUL in Subject, Message-ID, display names and
body; raw 8-bit and invalid UTF-8 in headers; RFC 2047 words that decode to NUL or lone
surrogates; unknown and broken charsets; unterminated or empty multiparts; huge folded header
lines and thousands of fields; bare CR; no body; no header...) and variants drawn from hostile
atoms by a ``random.Random`` with a fixed seed, so that any failure replays. The messages go
over the wire as raw bytes (DATA written by hand: smtplib would turn a bare CR into CRLF), and at
the reception point from hostile envelope senders too (NUL, 8-bit, source route, null).
"""

from __future__ import annotations

import asyncio
import random
import re
import smtplib
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from helpers import DOMAIN, PASSWORD, client_tls, install_e2e, wait_settled
from helpers import AppThread as Server
from pecd.config import load_config
from pecd.mailbox.maildir import MaildirStore
from pecd.pec.classify import classify
from pecd.pec.mime import get_first, head_of
from pecd.pec.vocab import Kind, Ricevuta

pytestmark = pytest.mark.slow

ALICE, BOB = f"alice@{DOMAIN}", f"bob@{DOMAIN}"
OUTSIDER = "mittente@esterno.example"
SEED = 12
VARIANTS = 150  # random variants per point, on top of the fixed list
QUEUED = re.compile(r"queued as (\S+)")


# --- the inputs ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Case:
    name: str
    raw: bytes
    mail_from: bytes | None = None  # the envelope sender at the reception point (OUTSIDER)


def msg(
    *,
    frm: bytes = ALICE.encode(),
    to: bytes = BOB.encode(),
    subject: bytes | None = b"Prova",
    msgid: bytes | None = b"<fuzz@client.example>",
    extra: tuple[bytes, ...] = (),
    body: bytes | None = b"Buongiorno.\r\n",
    ctype: bytes | None = b"text/plain; charset=utf-8",
) -> bytes:
    """A submission from ``frm`` to ``to`` with its pieces replaced by hostile bytes."""
    head = [b"From: " + frm, b"To: " + to]
    if subject is not None:
        head.append(b"Subject: " + subject)
    if msgid is not None:
        head.append(b"Message-ID: " + msgid)
    head.append(b"Date: Tue, 24 Nov 2026 10:00:00 +0100")
    if ctype is not None:
        head += [b"MIME-Version: 1.0", b"Content-Type: " + ctype]
    head += list(extra)
    out = b"\r\n".join(head) + b"\r\n"
    return out if body is None else out + b"\r\n" + body


def mp(boundary: bytes) -> bytes:
    return b'multipart/mixed; boundary="' + boundary + b'"'


#: Encoded words that decode to something hostile, or cannot be decoded at all.
WORDS = {
    "utf7-lone-surrogate": b"=?utf-7?q?a+2AA-b?=",
    "utf7-low-surrogate": b"=?utf-7?b?K0tNQS0=?=",  # +3IA- : U+DC80
    "utf8-b-invalid": b"=?utf-8?b?/w==?=",
    "utf8-b-cesu-surrogate": b"=?utf-8?b?7aCA?=",  # ED A0 80: U+D800 written as UTF-8
    "utf8-q-nul": b"=?utf-8?q?a=00b?=",
    "utf8-q-controls": b"=?utf-8?q?a=0D=0Ab=1B=7F?=",
    "unicode-escape-surrogate": b"=?unicode_escape?q?=5Cud800?=",
    "raw-unicode-escape-surrogate": b"=?raw_unicode_escape?q?=5Cudc80?=",
    "utf16-odd-length": b"=?utf-16?b?AA==?=",
    "unknown-charset": b"=?x-nonesuch?q?abc?=",
    "unterminated-word": b"=?utf-8?q?abc",
    "bad-base64-word": b"=?utf-8?b?###?=",
    "latin1-nul": b"=?iso-8859-1?q?caf=E8=00?=",
}

#: Raw header bytes that are not text.
RAW = {
    "nul": b"a\x00b",
    "latin1-8bit": b"caff\xe8",
    "invalid-utf8": b"\xff\xfe\xc3\x28",
    "utf8-encoded-surrogate": b"x\xed\xa0\x80y",
    "bare-cr": b"a\rb",
    "escape-and-del": b"\x1b[31mrosso\x7f",
}


#: Envelope senders another server may give the reception point (no AUTH there to bind them).
REVERSE_PATHS = [
    OUTSIDER.encode(),
    b"",
    b"a\x00b@esterno.example",
    b"caff\xe8@esterno.example",
    b"\xed\xa0\x80@esterno.example",
    b"@relay.example:someone@esterno.example",
    b'"a \\\x00 b"@esterno.example',
    b"x" * 200 + b"@esterno.example",
]


def fixed_cases(frm: bytes, to: bytes) -> list[Case]:
    """The deterministic list, from ``frm`` to ``to`` (alice to bob at the access point)."""
    local, _, domain = frm.partition(b"@")
    cases: list[Case] = []
    for name, value in {**RAW, **WORDS}.items():
        cases.append(Case(f"subject-{name}", msg(frm=frm, to=to, subject=value)))
    for name in ("nul", "invalid-utf8", "bare-cr", "latin1-8bit"):
        value = RAW[name]
        cases.append(Case(f"msgid-{name}", msg(frm=frm, to=to, msgid=b"<a" + value + b"@x>")))
    for name in ("utf7-lone-surrogate", "utf8-q-nul", "unicode-escape-surrogate"):
        cases.append(Case(f"msgid-word-{name}", msg(frm=frm, to=to, msgid=WORDS[name])))
    for name, value in {
        "nul": b'"Al\x00ice"',
        "invalid-utf8": b"Al\xffice",
        "utf7": WORDS["utf7-lone-surrogate"],
        "q-nul": WORDS["utf8-q-nul"],
        "unicode-escape": WORDS["unicode-escape-surrogate"],
    }.items():
        cases.append(Case(f"from-display-{name}", msg(frm=value + b" <" + frm + b">", to=to)))
        cases.append(Case(f"to-display-{name}", msg(frm=frm, to=value + b" <" + to + b">")))
    for name in ("nul", "utf7-lone-surrogate", "invalid-utf8"):
        value = RAW.get(name) or WORDS[name]
        cases.append(
            Case(
                f"reply-to-{name}", msg(frm=frm, to=to, extra=(b"Reply-To: " + value + b" <r@x>",))
            )
        )
    cases += [
        Case("from-nul-in-address", msg(frm=local + b"\x00@" + domain, to=to)),
        Case("to-nul-in-address", msg(frm=frm, to=to.replace(b"@", b"\x00@"))),
        Case("to-garbage-list", msg(frm=frm, to=to + b", <<<>>>, \x00, @, =?utf-7?q?+2AA-?=")),
        Case("date-nul", msg(frm=frm, to=to, extra=(b"X-Date: a\x00", b"Date: \x00\xff"))),
        Case("body-nul", msg(frm=frm, to=to, body=b"a\x00b\r\n\x00\x00\r\n")),
        Case("body-invalid-utf8", msg(frm=frm, to=to, body=b"\xff\xfe\xed\xa0\x80\r\n")),
        Case("body-bare-cr", msg(frm=frm, to=to, body=b"uno\rdue\rtre\r\n")),
        Case("body-bare-lf", msg(frm=frm, to=to, body=b"uno\ndue\n")),
        Case("subject-missing", msg(frm=frm, to=to, subject=None)),
        Case("msgid-missing", msg(frm=frm, to=to, msgid=None)),
        Case("msgid-empty", msg(frm=frm, to=to, msgid=b"")),
        Case("subject-twice", msg(frm=frm, to=to, extra=(b"Subject: \x00second",))),
        Case("msgid-twice", msg(frm=frm, to=to, extra=(b"Message-ID: <\xff@x>",))),
        Case("headers-no-body", msg(frm=frm, to=to, body=None)),
        Case("headers-no-body-no-final-crlf", msg(frm=frm, to=to, body=None).rstrip(b"\r\n")),
        Case("only-body", b"\r\nsolo corpo, nessuna intestazione\r\n"),
        Case("garbage-first-line", b"questa non e' un'intestazione\r\n" + msg(frm=frm, to=to)),
        Case("bare-lf-head", msg(frm=frm, to=to).replace(b"\r\n", b"\n")),
        Case("bare-cr-head", msg(frm=frm, to=to).replace(b"\r\n", b"\r")),
        Case("nul-everywhere", msg(frm=frm, to=to).replace(b"\r\n", b"\x00\r\n")),
        Case("header-name-8bit", msg(frm=frm, to=to, extra=(b"S\xfcbject: x", b"\x00: y"))),
        Case(
            "subject-huge-folded",
            msg(
                frm=frm,
                to=to,
                subject=b"\r\n ".join([b"parola \xe8 \x00 =?utf-7?q?+2AA-?="] * 3000),
            ),
        ),
        Case(
            "subject-long-line",
            msg(frm=frm, to=to, subject=b"=?utf-8?q?" + b"=00" * 300 + b"?="),
        ),
        Case(
            "thousands-of-fields",
            msg(frm=frm, to=to, extra=tuple(b"X-F%d: \x00\xff" % i for i in range(5000))),
        ),
        Case("ctype-empty-boundary", msg(frm=frm, to=to, ctype=b'multipart/mixed; boundary=""')),
        Case("ctype-no-boundary", msg(frm=frm, to=to, ctype=b"multipart/mixed")),
        Case(
            "ctype-broken-params",
            msg(frm=frm, to=to, ctype=b"text/plain; charset=\"; name*=x''%FF%00; =?"),
        ),
        Case(
            "ctype-unknown-charset-8bit",
            msg(frm=frm, to=to, ctype=b"text/plain; charset=x-nonesuch", body=b"\xe8\xff\r\n"),
        ),
        Case(
            "ctype-nul-charset",
            msg(frm=frm, to=to, ctype=b"text/plain; charset=\x00utf-8", body=b"\xe8\r\n"),
        ),
        Case(
            "multipart-unterminated",
            msg(
                frm=frm,
                to=to,
                ctype=mp(b"XYZ"),
                body=b"--XYZ\r\nContent-Type: text/plain\r\n\r\nhi\r\n",
            ),
        ),
        Case(
            "multipart-no-parts", msg(frm=frm, to=to, ctype=mp(b"XYZ"), body=b"nessuna parte\r\n")
        ),
        Case("multipart-only-close", msg(frm=frm, to=to, ctype=mp(b"XYZ"), body=b"--XYZ--\r\n")),
        Case(
            "multipart-empty-part",
            msg(frm=frm, to=to, ctype=mp(b"XYZ"), body=b"--XYZ\r\n--XYZ\r\n\r\n--XYZ--\r\n"),
        ),
        Case(
            "multipart-deep",
            msg(
                frm=frm,
                to=to,
                ctype=mp(b"b0"),
                body=b"".join(
                    b"--b%d\r\nContent-Type: %s\r\n\r\n" % (i, mp(b"b%d" % (i + 1)))
                    for i in range(200)
                ),
            ),
        ),
        Case(
            "attachment-bad-filename",
            msg(
                frm=frm,
                to=to,
                ctype=mp(b"XYZ"),
                body=b"--XYZ\r\nContent-Type: application/octet-stream;"
                b" name*=x-bad''%FF%00%ED%A0%80\r\nContent-Disposition: attachment;"
                b" filename==?utf-7?q?+2AA-?=\r\nContent-Transfer-Encoding: base64\r\n\r\n"
                b"!!! not base64 \x00\r\n--XYZ--\r\n",
            ),
        ),
        Case(
            "qp-broken",
            msg(
                frm=frm,
                to=to,
                extra=(b"Content-Transfer-Encoding: quoted-printable",),
                body=b"=ZZ=0=\x00=E8=\r\n",
            ),
        ),
        Case(
            "fake-signed",
            msg(
                frm=frm,
                to=to,
                ctype=b'multipart/signed; protocol="application/pkcs7-signature"; micalg=sha1;'
                b' boundary="S"',
                body=b"--S\r\nContent-Type: text/plain\r\n\r\nciao\x00\r\n--S\r\n"
                b"Content-Type: application/pkcs7-signature\r\nContent-Transfer-Encoding: base64"
                b"\r\n\r\nMIIB\x00garbage\r\n--S--\r\n",
            ),
        ),
        Case(
            "fake-pec-daticert",
            msg(
                frm=frm,
                to=to,
                subject=b"POSTA CERTIFICATA: \x00",
                extra=(b"X-Trasporto: posta-certificata", b"X-Riferimento-Message-ID: <\x00>"),
                ctype=mp(b"D"),
                body=b"--D\r\nContent-Type: application/xml; name=daticert.xml\r\n\r\n"
                b'<?xml version="1.0"?><!DOCTYPE p [<!ENTITY a "\x00">]><postacert tipo="\xff">'
                b"&a;</postacert>\r\n--D--\r\n",
            ),
        ),
    ]
    return cases


ATOMS = [
    b"\x00",
    b"\r",
    b"\x1b",
    b"\x7f",
    b"\xff",
    b"\xe8",
    b"\xc3",
    b"\xed\xa0\x80",
    "è".encode(),
    b'"',
    b"<",
    b">",
    b"=?",
    b"?=",
    b"\t",
    b"\r\n ",
    b"testo",
    *WORDS.values(),
]
BODIES = [
    b"Buongiorno.\r\n",
    b"\x00\xff\r\n",
    b"--XYZ\r\nContent-Type: text/plain\r\n\r\nx\r\n",
    b"",
    b"a\rb\nc\r\n",
]


def variants(rng: random.Random, frm: bytes, to: bytes, n: int) -> list[Case]:
    """``n`` messages whose Subject, Message-ID, display names and body are drawn from ATOMS."""

    def junk() -> bytes:
        return b"".join(rng.choice(ATOMS) for _ in range(rng.randint(1, 6)))

    out = []
    for i in range(n):
        fields: dict[str, Any] = {"frm": frm, "to": to}
        if rng.random() < 0.7:
            fields["subject"] = junk()
        if rng.random() < 0.4:
            fields["msgid"] = b"<" + junk() + b"@x>"
        if rng.random() < 0.3:
            fields["frm"] = junk().replace(b"\r\n ", b" ") + b" <" + frm + b">"
        if rng.random() < 0.3:
            fields["to"] = junk().replace(b"\r\n ", b" ") + b" <" + to + b">"
        if rng.random() < 0.3:
            fields["ctype"] = rng.choice([mp(b"XYZ"), b"text/plain; charset=" + junk(), mp(junk())])
        fields["body"] = rng.choice(BODIES) + (junk() + b"\r\n" if rng.random() < 0.5 else b"")
        out.append(Case(f"variant-{i}", msg(**fields)))
    return out


def submissions() -> list[Case]:
    return fixed_cases(ALICE.encode(), BOB.encode()) + variants(
        random.Random(SEED), ALICE.encode(), BOB.encode(), VARIANTS
    )


def inbound() -> list[Case]:
    frm, to = OUTSIDER.encode(), BOB.encode()
    reverse = [
        Case(f"reverse-path-{i}", msg(frm=frm, to=to, subject=b"a\x00b"), mail_from=path)
        for i, path in enumerate(REVERSE_PATHS)
    ]
    return fixed_cases(frm, to) + variants(random.Random(SEED + 1), frm, to, VARIANTS) + reverse


def replayed(bobs: list[bytes], n: int = 20) -> list[Case]:
    """Up to ``n`` of the transport envelopes in bob's box, as they are and with a hostile
    unsigned Subject (the outer one, which the signature does not cover)."""
    out: list[Case] = []
    envelopes = [raw for raw in bobs if classify(raw).kind is Kind.TRANSPORT_ENVELOPE]
    for i, raw in enumerate(envelopes[:n]):
        # From the reception point's view another provider's server hands it on: no Received
        # of ours on top (it would be taken for the job's own).
        raw = re.sub(rb"\A(?:Received:.*\r\n(?:[ \t].*\r\n)*)+", b"", raw)
        out.append(Case(f"replay-{i}", raw, mail_from=ALICE.encode()))
        hostile = WORDS["utf7-lone-surrogate"] + b" \x00\xff"
        tampered = re.sub(
            rb"(?m)^Subject:.*\r\n(?:[ \t].*\r\n)*", b"Subject: " + hostile + b"\r\n", raw, count=1
        )
        out.append(Case(f"replay-{i}-hostile-subject", tampered, mail_from=ALICE.encode()))
    return out


# --- the wire --------------------------------------------------------------------------------


def dot_stuffed(raw: bytes) -> bytes:
    """DATA as the client sends it: lines starting with a dot doubled, the final dot line."""
    data = (b"." if raw.startswith(b".") else b"") + raw.replace(b"\n.", b"\n..")
    return data + (b"" if data.endswith(b"\r\n") else b"\r\n") + b".\r\n"


def command(smtp: smtplib.SMTP, line: bytes) -> tuple[int, str]:
    """One SMTP command written byte for byte (smtplib would encode it as ASCII)."""
    smtp.send(line + b"\r\n")
    code, reply = smtp.getreply()
    return code, reply.decode("utf-8", "replace")


def send_raw(smtp: smtplib.SMTP, mail_from: bytes, rcpt: str, raw: bytes) -> tuple[int, str]:
    """One transaction with ``raw`` byte for byte; the DATA reply (or the first refusal)."""
    code, reply = command(smtp, b"MAIL FROM:<" + mail_from + b">")
    if code != 250:
        return code, reply
    code, reply = command(smtp, b"RCPT TO:<" + rcpt.encode() + b">")
    if code not in (250, 251):
        command(smtp, b"RSET")
        return code, reply
    code, reply = command(smtp, b"DATA")
    if code != 354:
        return code, reply
    smtp.send(dot_stuffed(raw))
    code, reply = smtp.getreply()
    return code, reply.decode("utf-8", "replace")


def hand_all(
    connect: Callable[[], smtplib.SMTP],
    mail_from: Callable[[Case], bytes],
    cases: list[Case],
    refused: list[str],
) -> dict[str, Case]:
    """Each case sent over connections from ``connect`` (a new one after a disconnect); intake
    key -> case for those answered 250, the others noted in ``refused``."""
    accepted: dict[str, Case] = {}
    smtp: smtplib.SMTP | None = None
    try:
        for case in cases:
            if smtp is None:
                smtp = connect()
            try:
                code, reply = send_raw(smtp, mail_from(case), BOB, case.raw)
            except smtplib.SMTPServerDisconnected:
                refused.append(f"{case.name}: disconnected")
                smtp = None
                continue
            if code == 250:
                m = QUEUED.search(reply)
                assert m, (case.name, reply)
                accepted[m.group(1)] = case
            else:
                refused.append(f"{case.name}: {code} {reply}")
    finally:
        if smtp is not None:
            smtp.close()
    return accepted


def submit_all(srv: Server, cases: list[Case], refused: list[str]) -> dict[str, Case]:
    """Each case submitted as alice over SMTPS; intake key -> case for those answered 250."""

    def connect() -> smtplib.SMTP:
        smtp = smtplib.SMTP_SSL(
            "127.0.0.1", srv.port("smtps"), context=client_tls(srv.cfg), timeout=30
        )
        smtp.login(ALICE, PASSWORD)
        return smtp

    return hand_all(connect, lambda case: ALICE.encode(), cases, refused)


def receive_all(srv: Server, cases: list[Case], refused: list[str]) -> dict[str, Case]:
    """Each case handed to the reception point as another server would (plain SMTP, RCPT bob)."""

    def connect() -> smtplib.SMTP:
        smtp = smtplib.SMTP("127.0.0.1", srv.port("reception"), timeout=30)
        smtp.ehlo("mx.esterno.example")
        return smtp

    def sender(case: Case) -> bytes:
        return OUTSIDER.encode() if case.mail_from is None else case.mail_from

    return hand_all(connect, sender, cases, refused)


# --- what came of them ---------------------------------------------------------------------------


def trace_events(srv: Server) -> list[Any]:
    from sqlalchemy import select

    from pecd.store.models import TraceEvent

    assert srv.app is not None and srv.app.runner is not None
    db = srv.app.runner.db

    async def query() -> list[Any]:
        async with db.read_session() as s:
            return list((await s.scalars(select(TraceEvent).order_by(TraceEvent.id))).all())

    return list(srv.call(query()))


def parked(srv: Server) -> list[str]:
    from pecd.store import jobs

    assert srv.app is not None and srv.app.runner is not None
    db = srv.app.runner.db

    async def query() -> list[str]:
        async with db.read_session() as s:
            return [f"{j.kind} {j.key}" for j in await jobs.list_jobs(s, states=["parked"])]

    return list(srv.call(query()))


def mailbox(srv: Server, address: str) -> list[bytes]:
    """Every message in ``address``'s INBOX."""
    return [p.read_bytes() for p in MaildirStore(srv.cfg.maildir_root).list_folder(address)]


def by_message_id(msgs: list[bytes]) -> dict[str, bytes]:
    """Message-ID (without brackets) -> message, for messages pecd generated (ids unique)."""
    out: dict[str, bytes] = {}
    for raw in msgs:
        mid = (get_first(raw, "Message-ID") or "").strip().strip("<>")
        assert mid not in out, f"two messages with Message-ID {mid}"
        out[mid] = raw
    return out


#: The reception point's intake key in the Received: field it wrote, which an anomaly envelope
#: copies into its own header (the envelope keeps the received Message-ID: not unique).
RX_KEY = re.compile(rb"\bid (rx-[0-9a-f]+)")


def unclean_head(raw: bytes, where: str) -> list[str]:
    """A problem if the headers pecd wrote hold a NUL, a bare CR or another C0 control but TAB."""
    head = head_of(raw).replace(b"\r\n", b"")
    bad = sorted({chr(b) for b in head if (b < 32 and b != 9) or b == 127})
    return [f"{where}: control characters {bad!r} in a header pecd wrote"] if bad else []


# --- the tests -----------------------------------------------------------------------------------


@pytest.fixture
def server(tmp_path: Path, db_url_for_e2e: str | None) -> Iterator[Server]:
    """pecd with its reception point on, and 3 attempts per job: a failing job parks at once."""
    cfg = asyncio.run(install_e2e(tmp_path / "inst", db_url_for_e2e, queue="max_attempts = 3"))
    assert cfg.source is not None
    text = cfg.source.read_text("utf-8")
    text = re.sub(r'(imaps = "[^"]*"\n)', r'\1reception = "127.0.0.1:0"\n', text, count=1)
    cfg.source.write_text(text, "utf-8")
    srv = Server(load_config(cfg.source)).start()
    try:
        yield srv
    finally:
        srv.stop()


def test_every_accepted_message_has_exactly_one_outcome(server: Server) -> None:
    started = time.monotonic()
    subs, ins = submissions(), inbound()
    refused: list[str] = []
    sent = submit_all(server, subs, refused)
    received = receive_all(server, ins, refused)
    # Most of them must get in: a point that refuses everything would pass vacuously.
    assert len(sent) >= len(subs) * 3 // 4, (len(sent), len(subs))
    assert len(received) >= len(ins) * 3 // 4, (len(received), len(ins))
    wait_settled(server, timeout=120)
    # Our own signed envelopes of those submissions, handed back to the reception point as they
    # are (valid PEC from a provider of the index: taken in charge, or a duplicate) and with
    # their unsigned Subject swapped for hostile bytes (an anomaly: it disagrees with the daticert).
    replays = replayed(mailbox(server, BOB))
    received.update(receive_all(server, replays, refused))
    ins += replays
    wait_settled(server, timeout=120)
    stuck = parked(server)
    events = trace_events(server)
    alice = by_message_id(mailbox(server, ALICE))
    problems: list[str] = []

    # (a) The access point: exactly one accettazione or non-accettazione per 250.
    notices = {"accettazione", "non-accettazione"}
    by_intake: dict[str, list[Any]] = {}
    for e in events:
        if e.event in notices and e.data and "intake" in e.data:
            by_intake.setdefault(e.data["intake"], []).append(e)
    receipts_in_box = 0
    for mid, raw in alice.items():
        c = classify(raw)
        if c.ricevuta in (Ricevuta.ACCETTAZIONE, Ricevuta.NON_ACCETTAZIONE):
            receipts_in_box += 1
        problems += unclean_head(raw, f"alice's {mid}")
    for key, case in sent.items():
        found = by_intake.get(key, [])
        if len(found) != 1:
            problems.append(f"submission {case.name} ({key}): {len(found)} notice events")
            continue
        [gid] = found[0].generated_ids
        stored = alice.get(gid.strip("<>"))
        if stored is None:
            problems.append(f"submission {case.name} ({key}): {found[0].event} {gid} not stored")
            continue
        c = classify(stored)
        if c.ricevuta is None or c.ricevuta.value != found[0].event or not c.is_valid_pec:
            problems.append(f"submission {case.name}: stored {c.ricevuta} valid={c.is_valid_pec}")
    if receipts_in_box != len(sent):
        problems.append(f"{receipts_in_box} (non-)accettazioni in alice's box for {len(sent)} 250s")

    # (b) The reception point: one anomaly envelope in bob's box, or another logged outcome.
    by_job: dict[str, list[Any]] = {}
    for e in events:
        if e.data and isinstance(e.data.get("job"), str) and e.data["job"].startswith("rx-"):
            by_job.setdefault(e.data["job"], []).append(e)
    # What bob holds of each reception job: the job's key is in the Received: field it wrote.
    # An envelope taken in charge is delivered once per identificativo: one replayed after its
    # delivery is the copy already there.
    held: dict[str, list[Kind]] = {}
    envelopes: set[str] = set()
    for i, raw in enumerate(mailbox(server, BOB)):
        problems += unclean_head(raw, f"bob's message {i}")
        c = classify(raw)
        if c.kind is Kind.TRANSPORT_ENVELOPE and c.daticert is not None:
            envelopes.add(c.daticert.identificativo)
        m = RX_KEY.search(head_of(raw))
        if m:
            held.setdefault(m.group(1).decode(), []).append(c.kind)
    for key, case in received.items():
        found = by_job.get(key, [])
        if len(found) != 1:
            problems.append(f"inbound {case.name} ({key}): {[e.event for e in found]}")
            continue
        e = found[0]
        stored = held.pop(key, [])
        if e.event == "ricezione":
            if e.pec_msgid not in envelopes or stored not in ([], [Kind.TRANSPORT_ENVELOPE]):
                problems.append(f"inbound {case.name} ({key}): ricezione, stored {stored}")
        elif stored != ([Kind.ANOMALY_ENVELOPE] if e.event == "anomalia" else []):
            problems.append(f"inbound {case.name} ({key}): {e.event}, stored {stored}")
    if held:
        problems.append(f"stored for no accepted message: {held}")

    if stuck:
        problems.append(f"parked jobs: {stuck}")
    elapsed = time.monotonic() - started
    outcomes = Counter(e.event for evs in (*by_intake.values(), *by_job.values()) for e in evs)
    print(
        f"fuzz: {len(sent)}/{len(subs)} submissions and {len(received)}/{len(ins)} inbound"
        f" accepted ({dict(outcomes)}), settled and checked in {elapsed:.1f} s;"
        f" refused by SMTP: {refused}"
    )
    assert not problems, "\n".join(problems)


def test_a_null_reverse_path_is_received_as_an_anomaly(server: Server) -> None:
    with smtplib.SMTP("127.0.0.1", server.port("reception"), timeout=30) as smtp:
        smtp.ehlo("mx.esterno.example")
        code, reply = send_raw(smtp, b"", BOB, msg(frm=b"MAILER-DAEMON@esterno.example"))
    assert code == 250, reply
    key = QUEUED.search(reply)
    assert key is not None
    wait_settled(server)
    events = [e for e in trace_events(server) if (e.data or {}).get("job") == key.group(1)]
    assert [e.event for e in events] == ["anomalia"]
    assert [classify(m).kind for m in mailbox(server, BOB)] == [Kind.ANOMALY_ENVELOPE]
