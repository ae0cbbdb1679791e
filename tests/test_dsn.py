"""Issue 12: an RFC 3464 delivery status notification for an ordinary-mail (esterno) recipient
that failed for good or whose relay expired (pec/dsn.py). Each output is read back with the
stdlib parser, and the delivery-status field groups also by a small parser of their own."""

from __future__ import annotations

import email
import email.policy
import re
from datetime import UTC, datetime, timedelta
from email.message import EmailMessage, Message

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pecd.pec.dsn import EXPIRED_STATUS, Failure, delivery_status_notification
from pecd.pec.mime import parse_entity
from pecd.pec.timefmt import pec_time

NOW = datetime(2026, 3, 2, 9, 15, 30, tzinfo=UTC)
ARRIVAL = NOW - timedelta(hours=25)
MTA = "mx.pec.example.test"
SERVICE = "posta-certificata@pec.example.test"
SENDER = "alice@pec.example.test"
BODY_MARK = b"BODY-OF-THE-ORIGINAL-MUST-NOT-BE-COPIED"


def original(subject: bytes = b"Fattura 12", extra: bytes = b"", body: bytes = b"") -> bytes:
    return (
        b"Return-Path: <alice@pec.example.test>\r\n"
        b'From: "Per conto di: alice@pec.example.test" <posta-certificata@pec.example.test>\r\n'
        b"To: bob@example.com, carol@example.org\r\n"
        b"Subject: " + subject + b"\r\n"
        b"Message-ID: <opec.20260302.abc@pec.example.test>\r\n"
        b"X-Trasporto: posta-certificata\r\n" + extra + b"Date: Mon, 02 Mar 2026 10:15:00 +0100\r\n"
        b"MIME-Version: 1.0\r\n"
        b"Content-Type: text/plain\r\n"
        b"\r\n" + BODY_MARK + b"\r\n" + body
    )


def build(
    failures: list[Failure], *, orig: bytes | None = None, sender: str = SENDER, **kw: object
) -> bytes:
    return delivery_status_notification(
        reporting_mta=MTA,
        sender=sender,
        from_address=SERVICE,
        original=original() if orig is None else orig,
        failures=failures,
        when=NOW,
        message_id_domain="pec.example.test",
        arrival=ARRIVAL,
        **kw,  # type: ignore[arg-type]
    )


def parse(raw: bytes) -> EmailMessage:
    msg = email.message_from_bytes(raw, policy=email.policy.default)
    assert isinstance(msg, EmailMessage)
    return msg


def parts(raw: bytes) -> tuple[EmailMessage, Message, Message, Message]:
    msg = parse(raw)
    assert msg.get_content_type() == "multipart/report"
    assert msg.get_param("report-type") == "delivery-status"
    payload = msg.get_payload()
    assert isinstance(payload, list) and len(payload) == 3
    text, status, headers = payload
    assert isinstance(text, Message) and isinstance(status, Message)
    assert isinstance(headers, Message)
    assert text.get_content_type() == "text/plain"
    assert status.get_content_type() == "message/delivery-status"
    assert headers.get_content_type() == "text/rfc822-headers"
    return msg, text, status, headers


def status_groups(raw: bytes) -> list[dict[str, str]]:
    """The message/delivery-status body's field groups, parsed by hand (RFC 3464 2.1): groups
    separated by blank lines, fields unfolded, names lowercased."""
    body = raw.split(b"Content-Type: message/delivery-status\r\n", 1)[1]
    body = body.split(b"\r\n\r\n", 1)[1].split(b"\r\n--", 1)[0]
    groups = []
    for block in body.decode("ascii").split("\r\n\r\n"):
        fields: dict[str, str] = {}
        for line in re.sub(r"\r\n[ \t]", " ", block.strip("\r\n")).split("\r\n"):
            name, _, value = line.partition(":")
            assert name.lower() not in fields
            fields[name.lower()] = value.strip()
        groups.append(fields)
    return groups


def text_of(part: Message) -> str:
    data = part.get_payload(decode=True)
    assert isinstance(data, bytes)
    return data.decode(part.get_content_charset() or "ascii")


def assert_wire_safe(raw: bytes) -> None:
    assert raw.isascii(), "a DSN is 7bit"
    assert b"\x00" not in raw
    assert raw.count(b"\n") == raw.count(b"\r\n"), "CRLF line endings only"
    assert b"\r" not in raw.replace(b"\r\n", b"")
    assert max(len(line) for line in raw.split(b"\r\n")) <= 998
    assert raw.endswith(b"\r\n")


REFUSED = Failure.refused(
    "bob@example.com",
    "550 5.1.1 <bob@example.com>: Recipient address rejected: User unknown in virtual mailbox table",
    remote_mta="mx.example.com",
)


def test_dsn_is_a_multipart_report_of_three_parts() -> None:
    raw = build([REFUSED])
    assert_wire_safe(raw)
    msg, _text, _status, _headers = parts(raw)
    assert msg["From"] == SERVICE
    assert msg["To"] == SENDER
    assert msg["Subject"] == "Mancata consegna (non PEC): Fattura 12"
    assert msg["Auto-Submitted"] == "auto-replied"
    assert msg["MIME-Version"] == "1.0"
    assert msg["Date"].datetime == NOW
    assert re.fullmatch(r"<pecd\.\d{14}\.[0-9a-f]{32}@pec\.example\.test>", msg["Message-ID"])
    assert msg["In-Reply-To"] == "<opec.20260302.abc@pec.example.test>"
    assert msg["References"] == "<opec.20260302.abc@pec.example.test>"
    assert not msg.defects and all(not p.defects for p in msg.walk())
    # Not a PEC message: no PEC header, no signature, no daticert.
    assert b"X-Ricevuta" not in raw and b"X-Trasporto: errore" not in raw
    assert b"pkcs7" not in raw.lower() and b"daticert" not in raw
    # The project's own byte-exact MIME parser agrees on the structure.
    entity = parse_entity(raw)
    assert [p.content_type for p in entity.children] == [
        "text/plain",
        "message/delivery-status",
        "text/rfc822-headers",
    ]


def test_human_text_italian_first_then_english() -> None:
    _msg, text, _status, _headers = parts(build([REFUSED]))
    body = text_of(text)
    it = body.index("non è stato consegnato ai seguenti destinatari ordinari (non PEC)")
    en = body.index("could not be delivered to the following ordinary (non-PEC) recipients")
    assert it < en
    assert "bob@example.com: rifiutato dal server del destinatario (5.1.1)" in body
    assert "bob@example.com: refused by the recipient's mail server (5.1.1)" in body
    assert "User unknown in virtual mailbox table" in body
    assert "non è una ricevuta di posta certificata" in body
    assert "not a certified-mail receipt" in body
    assert 'Oggetto: "Fattura 12"' in body
    assert "Ricevuto il giorno 01/03/2026 alle ore 09:15:30 (+0100)" in body


def test_delivery_status_fields_per_message_and_per_recipient() -> None:
    raw = build([REFUSED])
    _msg, _text, status, _headers = parts(raw)
    # The stdlib reads message/delivery-status as one Message per field group.
    blocks = status.get_payload()
    assert isinstance(blocks, list) and len(blocks) == 2
    assert isinstance(blocks[0], Message) and isinstance(blocks[1], Message)
    assert blocks[0]["Reporting-MTA"] == f"dns; {MTA}"
    assert blocks[1]["Final-Recipient"] == "rfc822; bob@example.com"
    groups = status_groups(raw)
    assert groups[0] == {
        "reporting-mta": f"dns; {MTA}",
        "arrival-date": pec_time(ARRIVAL).rfc5322,
    }
    assert groups[1] == {
        "final-recipient": "rfc822; bob@example.com",
        "action": "failed",
        "status": "5.1.1",
        "remote-mta": "dns; mx.example.com",
        "diagnostic-code": "smtp; 550 5.1.1 <bob@example.com>: Recipient address rejected: "
        "User unknown in virtual mailbox table",
        "last-attempt-date": pec_time(NOW).rfc5322,
    }


def test_multi_recipient_failure_one_group_each_in_order() -> None:
    failures = [
        Failure.refused("bob@example.com", "550 5.1.1 no such user"),
        Failure.refused("dave@example.net", "554 5.7.1 Service unavailable; client blocked"),
        Failure.refused("erin@example.org", "552 mailbox full"),  # no enhanced code
    ]
    raw = build(failures)
    assert_wire_safe(raw)
    groups = status_groups(raw)
    assert [g.get("final-recipient") for g in groups[1:]] == [
        "rfc822; bob@example.com",
        "rfc822; dave@example.net",
        "rfc822; erin@example.org",
    ]
    assert [g["status"] for g in groups[1:]] == ["5.1.1", "5.7.1", "5.0.0"]
    assert all(g["action"] == "failed" for g in groups[1:])
    assert groups[3]["diagnostic-code"] == "smtp; 552 mailbox full"
    _msg, text, _status, _headers = parts(raw)
    body = text_of(text)
    for addr in ("bob@example.com", "dave@example.net", "erin@example.org"):
        assert body.count(f"  {addr}: ") == 2  # Italian and English


def test_expiry_is_action_failed_status_4_4_7() -> None:
    last = NOW - timedelta(minutes=20)
    failures = [
        Failure.expired_after("carol@example.org", "451 4.3.0 Temporary lookup failure", at=last),
        Failure.expired_after("frank@example.org", "connect to mx.example.org: Connection refused"),
    ]
    raw = build(failures)
    assert_wire_safe(raw)
    groups = status_groups(raw)
    assert groups[1] == {
        "final-recipient": "rfc822; carol@example.org",
        "action": "failed",
        "status": EXPIRED_STATUS,
        "diagnostic-code": "smtp; 451 4.3.0 Temporary lookup failure",
        "last-attempt-date": pec_time(last).rfc5322,
    }
    # No SMTP reply: the reason goes in an X- diagnostic type (RFC 3464 2.3.6), never "smtp;".
    assert groups[2]["status"] == "4.4.7"
    assert groups[2]["action"] == "failed"
    assert groups[2]["diagnostic-code"] == ("X-pecd; connect to mx.example.org: Connection refused")
    body = text_of(parts(raw)[1])
    assert "carol@example.org: not delivered before the retry period expired (4.4.7)" in body
    assert "carol@example.org: non consegnato entro il termine dei tentativi (4.4.7)" in body


def test_original_headers_included_never_its_body() -> None:
    big = b"x" * 76 + b"\r\n"
    raw = build([REFUSED], orig=original(body=big * 20000))  # a 1.5 MB original
    assert BODY_MARK not in raw
    assert len(raw) < 8000
    _msg, _text, _status, headers = parts(raw)
    block = headers.get_payload(decode=True)
    assert isinstance(block, bytes)
    assert b"Message-ID: <opec.20260302.abc@pec.example.test>\r\n" in block
    assert b"X-Trasporto: posta-certificata\r\n" in block
    assert b"To: bob@example.com, carol@example.org\r\n" in block
    assert block.endswith(b"Content-Type: text/plain\r\n")
    assert BODY_MARK not in block


def test_original_headers_non_ascii_or_with_controls_stay_7bit() -> None:
    extra = "X-Note: Città di Napoli €\r\n".encode() + b"X-Bad: a\x00b\x07c\r\n"
    extra += b"X-Long: " + b"y" * 1500 + b"\r\n"
    raw = build([REFUSED], orig=original(extra=extra))
    assert_wire_safe(raw)
    _msg, _text, _status, headers = parts(raw)
    assert headers["Content-Transfer-Encoding"] == "quoted-printable"
    block = headers.get_payload(decode=True)
    assert isinstance(block, bytes)
    assert "X-Note: Città di Napoli €\r\n".encode() in block
    assert b"X-Bad: abc\r\n" in block
    assert b"X-Long: " + b"y" * 1500 + b"\r\n" in block


HOSTILE = [
    (b"Hi\x00there", "Hithere"),
    (b"Hi\r\n\tBcc: evil@attacker.example", "Hi Bcc: evil@attacker.example"),
    (b"Hi\r\nBcc: evil@attacker.example", "Hi"),  # the original's own next field
    (b"=?utf-8?q?a=00b=0D=0AX-Evil:_1?=", "ab X-Evil: 1"),
    ("Città € 日本".encode(), "Città € 日本"),
    (b"=?utf-8?b?Q2l0dMOgIOKCrA==?=", "Città €"),
    (b"bad \xff\xfe bytes", "bad \ufffd\ufffd bytes"),
    (b"=?utf-7?q?+2D3cAA-?=", None),  # decodes to a lone surrogate
]


@pytest.mark.parametrize(("subject", "expected"), HOSTILE)
def test_hostile_subject_is_clean(subject: bytes, expected: str | None) -> None:
    # A raw CRLF in the original's Subject line starts a field of the original's own; an encoded
    # CRLF, or a folded one, is the Subject's text and must not start a field in the DSN.
    raw = build([REFUSED], orig=original(subject=subject))
    assert_wire_safe(raw)
    msg, text, _status, _headers = parts(raw)
    got = msg["Subject"]
    assert got.startswith("Mancata consegna (non PEC): ")
    assert not re.search(r"[\x00-\x1f\x7f\ud800-\udfff]", got)
    if expected is not None:
        assert got == "Mancata consegna (non PEC): " + expected
        assert f'Oggetto: "{expected}"' in text_of(text)
    assert msg["Bcc"] is None and msg["X-Evil"] is None
    assert [k for k in msg if k.lower() in {"bcc", "x-evil"}] == []
    body = text_of(text)
    assert not re.search(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f\ud800-\udfff]", body)


@settings(max_examples=150, deadline=None)
@given(
    subject=st.binary(max_size=300),
    reply=st.text(max_size=1200),
    rcpt=st.text(min_size=1, max_size=80).filter(lambda s: s.strip("\x00\r\n\t ") != ""),
)
def test_any_subject_reply_or_recipient_gives_a_wire_safe_parseable_dsn(
    subject: bytes, reply: str, rcpt: str
) -> None:
    try:
        failure = Failure.refused(rcpt, "550 5.1.1 " + reply)
    except ValueError:
        return  # a recipient of controls only
    raw = build([failure, Failure.expired_after("x@example.org", reply)], orig=original(subject))
    assert_wire_safe(raw)
    msg, _text, _status, _headers = parts(raw)
    # (A subject with a line break can end the original's header block before its Message-ID.)
    assert {k.lower() for k in msg} - {"in-reply-to", "references"} == {
        "from",
        "to",
        "subject",
        "date",
        "message-id",
        "auto-submitted",
        "mime-version",
        "content-type",
    }
    groups = status_groups(raw)
    assert len(groups) == 3
    assert groups[1]["status"] == "5.1.1" and groups[2]["status"] == "4.4.7"
    assert groups[1]["final-recipient"].startswith(("rfc822; ", "utf-8; "))


def test_multi_line_and_long_replies_stay_on_one_folded_field() -> None:
    reply = "550-5.7.1 first line\r\n550-5.7.1 second line\r\n550 5.7.1 " + "z" * 3000
    raw = build([Failure.refused("bob@example.com", reply)])
    assert_wire_safe(raw)
    g = status_groups(raw)[1]
    assert g["status"] == "5.7.1"
    assert g["diagnostic-code"].startswith(
        "smtp; 550-5.7.1 first line 550-5.7.1 second line 550 5.7.1 zzz"
    )
    assert g["diagnostic-code"].endswith("...")
    assert len(g["diagnostic-code"]) < 1000


def test_non_ascii_recipient_uses_utf8_addr_xtext() -> None:
    raw = build([Failure.refused("jürgen+x@exämple.de", "550 5.1.1 unknown")])
    g = status_groups(raw)[1]
    assert g["final-recipient"] == r"utf-8; j\x{FC}rgen\x{2B}x@ex\x{E4}mple.de"


def test_from_display_name_and_fixed_msgid() -> None:
    raw = build([REFUSED], from_name="Posta Certificata Example", msgid_token="0" * 32)
    msg = parse(raw)
    assert msg["From"].addresses[0].display_name == "Posta Certificata Example"
    assert msg["From"].addresses[0].addr_spec == SERVICE
    assert msg["Message-ID"] == f"<pecd.{pec_time(NOW).compact}.{'0' * 32}@pec.example.test>"


def test_when_as_pectime_or_datetime_and_arrival_optional() -> None:
    kw = dict(
        reporting_mta=MTA,
        sender=SENDER,
        from_address=SERVICE,
        original=original(),
        failures=[REFUSED],
        message_id_domain="pec.example.test",
        msgid_token="1" * 32,
    )
    a = delivery_status_notification(when=NOW, **kw)  # type: ignore[arg-type]
    b = delivery_status_notification(when=pec_time(NOW), **kw)  # type: ignore[arg-type]
    strip = re.compile(rb"_pecd_[0-9a-f]{32}")
    assert strip.sub(b"", a) == strip.sub(b"", b)
    assert "arrival-date" not in status_groups(a)[0]
    assert b"Ricevuto il giorno" not in a


def test_refusal_without_enhanced_code_or_not_5xx_is_permanent() -> None:
    assert Failure.refused("b@example.com", "550 no such user").status == "5.0.0"
    assert Failure.refused("b@example.com", "421 4.7.0 try later").status == "5.0.0"
    f = Failure.refused("b@example.com", "")
    assert f.status == "5.0.0" and f.diagnostic is None
    raw = build([f])
    assert "diagnostic-code" not in status_groups(raw)[1]


def test_no_failure_no_sender_or_bad_input_is_refused() -> None:
    with pytest.raises(ValueError):
        build([])
    with pytest.raises(ValueError):
        build([REFUSED], sender="")  # null reverse-path: never a DSN (RFC 5321 4.5.5)
    with pytest.raises(ValueError):
        build([REFUSED], sender="<>")
    with pytest.raises(ValueError):
        build([REFUSED], sender="alice@pec.example.test\r\nBcc: evil@attacker.example")
    with pytest.raises(ValueError):
        Failure("b@example.com", "2.0.0")
    with pytest.raises(ValueError):
        Failure("b@example.com", "5.1")
    with pytest.raises(ValueError):
        Failure("\x00\r\n", "5.1.1")
    with pytest.raises(ValueError):
        Failure("b@example.com", "5.1.1", last_attempt=datetime(2026, 1, 1))
    with pytest.raises(ValueError):
        delivery_status_notification(
            reporting_mta="mx.example.test\r\nX: y",
            sender=SENDER,
            from_address=SERVICE,
            original=original(),
            failures=[REFUSED],
            when=NOW,
            message_id_domain="pec.example.test",
        )


def test_angle_bracketed_sender_is_accepted() -> None:
    assert parse(build([REFUSED], sender="<alice@pec.example.test>"))["To"] == SENDER
