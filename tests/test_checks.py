"""Formal checks at the access point (spec/pec.md section 4): pecd.pec.checks."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from helpers import CORPUS_DIR as CORPUS
from pecd.pec.checks import (
    CODES,
    Submission,
    SubmissionLimits,
    Violation,
    check_submission,
    normalize_address,
    parse_address_list,
)
from pecd.pec.vocab import MIN_RECIPIENTS_GUARANTEED, MIN_RECIPIENTS_TIMES_SIZE

SENDER = "mario.rossi@pec.example.it"
TO = "anna@pec.example.it"
CC = "luca@pec.other.it"
LIMITS = SubmissionLimits(
    max_size=10 * 1000 * 1000,
    max_recipients=MIN_RECIPIENTS_GUARANTEED,
    max_recipients_times_size=MIN_RECIPIENTS_TIMES_SIZE,
)

BASE_HEADERS: dict[str, str] = {
    "Date": "Mon, 22 Apr 2024 13:53:28 +0200",
    "From": f'"Mario Rossi" <{SENDER}>',
    "To": f"Anna <{TO}>",
    "Cc": CC,
    "Subject": "Prova",
    "Message-ID": "<abc.123@pec.example.it>",
}


def make_raw(eol: bytes = b"\r\n", body: bytes = b"Ciao.\r\n", **changes: str | None) -> bytes:
    """A message from BASE_HEADERS; keyword ``Message_ID="x"`` sets, ``Cc=None`` removes."""
    headers = dict(BASE_HEADERS)
    for key, value in changes.items():
        name = key.replace("_", "-")
        if value is None:
            headers.pop(name, None)
        else:
            headers[name] = value
    head = b"".join(f"{k}: {v}".encode() + eol for k, v in headers.items())
    return head + eol + body


def make_sub(
    raw: bytes | None = None,
    mail_from: str = SENDER,
    rcpt_to: tuple[str, ...] = (TO, CC),
    authenticated: str | None = SENDER,
) -> Submission:
    return Submission(
        raw=make_raw() if raw is None else raw,
        mail_from=mail_from,
        rcpt_to=rcpt_to,
        authenticated=authenticated,
    )


def many_rcpts_sub(count: int, size: int | None = None) -> Submission:
    """``count`` recipients in a folded To; the raw message padded to exactly ``size`` bytes."""
    rcpts = tuple(f"u{i}@pec.example.it" for i in range(count))
    raw = make_raw(To=",\r\n ".join(rcpts), Cc=None)
    if size is not None:
        raw = make_raw(To=",\r\n ".join(rcpts), Cc=None, body=b"x" * (size - len(raw) + 7))
        assert len(raw) == size
    return make_sub(raw, rcpt_to=rcpts)


def codes(sub: Submission, limits: SubmissionLimits = LIMITS) -> list[str]:
    return [v.code for v in check_submission(sub, limits)]


# --- valid submissions ---------------------------------------------------------------------------


def test_valid_submission_passes() -> None:
    assert check_submission(make_sub(), LIMITS) == []


def test_valid_with_lf_line_endings() -> None:
    assert codes(make_sub(make_raw(eol=b"\n", body=b"Ciao.\n"))) == []


def test_real_client_message_passes() -> None:
    raw = (CORPUS / "postacert-inner__aruba__toniorusso-postacert.eml").read_bytes()
    sub = Submission(
        raw, "antoniorusso95@pec.it", ("testflorence@pec.net",), "antoniorusso95@pec.it"
    )
    assert check_submission(sub, LIMITS) == []


def test_missing_date_is_accepted() -> None:
    """Clients may leave Date to the submission server (RFC 6409 section 8.3)."""
    assert codes(make_sub(make_raw(Date=None))) == []


def test_headers_only_message_is_accepted() -> None:
    raw = make_raw().split(b"\r\n\r\n")[0] + b"\r\n"
    assert codes(make_sub(raw)) == []


def test_empty_bcc_is_allowed() -> None:
    assert codes(make_sub(make_raw(Bcc=""))) == []
    assert codes(make_sub(make_raw(Bcc="   "))) == []


def test_encoded_display_names() -> None:
    raw = make_raw(
        From=f"=?utf-8?Q?Mario_Rossi?= <{SENDER}>",
        To=f"=?utf-8?B?QW5uYSBCaWFuY2hp?= <{TO}>",
        Cc=f'"Rossi, Luca" <{CC}>',
    )
    assert codes(make_sub(raw)) == []


def test_comparisons_are_case_insensitive() -> None:
    raw = make_raw(From="Mario.Rossi@PEC.Example.IT", To="ANNA@pec.example.it", Cc=CC.upper())
    sub = make_sub(
        raw,
        mail_from="<mario.rossi@pec.EXAMPLE.it>",
        rcpt_to=("Anna@Pec.Example.It", "luca@pec.other.it"),
        authenticated="MARIO.ROSSI@pec.example.it",
    )
    assert codes(sub) == []


def test_duplicate_recipients_collapse() -> None:
    raw = make_raw(To=f"{TO}, {TO.upper()}", Cc=f"{CC}, {TO}")
    assert codes(make_sub(raw, rcpt_to=(TO, CC, TO))) == []


def test_group_syntax_in_to() -> None:
    raw = make_raw(To=f"Ufficio: {TO}, Anna2 <{CC}>;", Cc=None)
    assert codes(make_sub(raw)) == []


# --- one test per code ---------------------------------------------------------------------------

SINGLE_CASES: list[tuple[str, Submission, SubmissionLimits]] = [
    ("not-rfc5322", make_sub(make_raw(Date="Mon, 31 Feb 2024 10:00:00 +0100")), LIMITS),
    ("from-missing", make_sub(make_raw(From=None)), LIMITS),
    ("from-invalid", make_sub(make_raw(From=f"{SENDER}, other@pec.example.it")), LIMITS),
    ("to-missing", make_sub(make_raw(To=None), rcpt_to=(CC,)), LIMITS),
    ("to-invalid", make_sub(make_raw(Cc=f"{CC}, not an address")), LIMITS),
    (
        "sender-mismatch",
        make_sub(mail_from="other@pec.example.it", authenticated="other@pec.example.it"),
        LIMITS,
    ),
    ("recipients-mismatch", make_sub(rcpt_to=(TO,)), LIMITS),
    ("bcc-present", make_sub(make_raw(Bcc="hidden@pec.example.it")), LIMITS),
    ("too-many-recipients", many_rcpts_sub(51), LIMITS),
    ("too-large", make_sub(), SubmissionLimits(100, 50, MIN_RECIPIENTS_TIMES_SIZE)),
    (
        "recipients-times-size",
        many_rcpts_sub(31, size=1_000_000),
        SubmissionLimits(2_000_000, 50, MIN_RECIPIENTS_TIMES_SIZE),
    ),
    ("not-authenticated", make_sub(authenticated=None), LIMITS),
    ("auth-mismatch", make_sub(authenticated="someone.else@pec.example.it"), LIMITS),
]


def test_single_cases_cover_every_code() -> None:
    assert sorted(code for code, _, _ in SINGLE_CASES) == sorted(CODES)
    assert len(set(CODES)) == len(CODES) == 13


@pytest.mark.parametrize(("code", "sub", "limits"), SINGLE_CASES, ids=[c[0] for c in SINGLE_CASES])
def test_each_code_alone(code: str, sub: Submission, limits: SubmissionLimits) -> None:
    violations = check_submission(sub, limits)
    assert [v.code for v in violations] == [code]
    (violation,) = violations
    assert isinstance(violation, Violation)
    for text in (violation.it, violation.en):
        assert text
        assert "\n" not in text and "\r" not in text


def test_recipients_times_size_boundary() -> None:
    limits = SubmissionLimits(2_000_000, 50, MIN_RECIPIENTS_TIMES_SIZE)
    assert codes(many_rcpts_sub(30, size=1_000_000), limits) == []  # exactly at the limit
    assert codes(many_rcpts_sub(30, size=1_000_001), limits) == ["recipients-times-size"]


def test_too_many_recipients_exactly_at_limit() -> None:
    assert codes(many_rcpts_sub(50)) == []


def test_too_large_exactly_at_limit() -> None:
    raw = make_raw()
    assert codes(make_sub(raw), SubmissionLimits(len(raw), 50, MIN_RECIPIENTS_TIMES_SIZE)) == []


def test_blank_authenticated_counts_as_not_authenticated() -> None:
    assert codes(make_sub(authenticated="  ")) == ["not-authenticated"]


# --- RFC 5322 details ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "raw",
    [
        pytest.param(make_raw(Subject="é".encode().decode("latin-1")), id="latin1-mojibake"),
        pytest.param(make_raw().replace(b"Prova", "Però".encode()), id="8bit-header"),
        pytest.param(make_raw(Subject="x" * 1000), id="long-line"),
        pytest.param(make_raw().replace(b"\r\n\r\n", b"\r\nnot a header line\r\n"), id="no-sep"),
        pytest.param(make_raw().replace(b"Prova", b"Pro\rva"), id="bare-cr"),
        pytest.param(make_raw().replace(b"Prova", b"Pro\x00va"), id="nul"),
        pytest.param(make_raw().replace(b"Subject:", b"Subject: a\r\nSubject:"), id="repeated"),
        pytest.param(make_raw(Date="yesterday"), id="bad-date"),
        pytest.param(make_raw(Date="Mon, 22 Apr 2024 25:00:00 +0200"), id="bad-hour"),
        pytest.param(make_raw(Date="22 Foo 2024 10:00:00 +0200"), id="bad-month"),
    ],
)
def test_not_rfc5322_variants(raw: bytes) -> None:
    assert codes(make_sub(raw)) == ["not-rfc5322"]


def test_folded_headers_and_obs_dates_are_fine() -> None:
    raw = make_raw(
        To=f"Anna\r\n\t<{TO}>",
        Subject="a folded\r\n subject",
        Date="22 Apr 24 13:53 GMT (a comment)",
    )
    assert codes(make_sub(raw)) == []


def test_long_but_legal_header_line() -> None:
    line_len = 998
    subject = "x" * (line_len - len("Subject: "))
    assert codes(make_sub(make_raw(Subject=subject))) == []


def test_garbage_line_ends_the_header_section() -> None:
    """Headers after a non-header line are body: they count as absent."""
    raw = b"Subject: x\r\nBad Header\r\n" + make_raw()
    assert codes(make_sub(raw))[:3] == ["not-rfc5322", "from-missing", "to-missing"]


def test_message_not_starting_with_header() -> None:
    raw = b" leading continuation\r\n" + make_raw()
    assert "not-rfc5322" in codes(make_sub(raw))
    assert "not-rfc5322" in codes(make_sub(b"just text\r\n"))


def test_empty_message() -> None:
    assert codes(make_sub(b"")) == [
        "not-rfc5322",
        "from-missing",
        "to-missing",
        "recipients-mismatch",
    ]


# --- From ----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "value",
    [
        "Team: mario.rossi@pec.example.it;",
        "mario.rossi",
        "Mario <mario.rossi@pec.example.it",
        "mario.rossi@@pec.example.it",
        "mario.rossi@localhost",
        "<>",
    ],
)
def test_from_invalid_variants(value: str) -> None:
    assert codes(make_sub(make_raw(From=value))) == ["from-invalid"]


def test_repeated_from_header() -> None:
    raw = make_raw().replace(b"Subject:", f"From: {SENDER}\r\nSubject:".encode())
    assert codes(make_sub(raw)) == ["not-rfc5322", "from-invalid"]


def test_blank_from_is_missing() -> None:
    assert codes(make_sub(make_raw(From=" "))) == ["from-missing"]


# --- several at once -----------------------------------------------------------------------------


def test_several_violations_reported_together() -> None:
    raw = make_raw(From=None, Bcc="x@pec.example.it", Date="not a date")
    sub = make_sub(raw, mail_from="a@pec.example.it", rcpt_to=(TO,), authenticated=None)
    assert codes(sub, SubmissionLimits(10, 50, MIN_RECIPIENTS_TIMES_SIZE)) == [
        "not-rfc5322",
        "from-missing",
        "recipients-mismatch",
        "bcc-present",
        "too-large",
        "not-authenticated",
    ]


def test_recipients_mismatch_names_extra_and_missing() -> None:
    sub = make_sub(rcpt_to=(TO, "intruso@pec.example.it"))
    (violation,) = check_submission(sub, LIMITS)
    assert violation.code == "recipients-mismatch"
    for text in (violation.it, violation.en):
        assert "intruso@pec.example.it" in text
        assert CC in text
    assert "mancanti" in violation.it or "non tra i destinatari" in violation.it
    assert "not in To/Cc" in violation.en
    assert "not among the SMTP recipients" in violation.en


def test_mismatch_text_with_hostile_addresses_stays_one_line() -> None:
    sub = make_sub(rcpt_to=(TO, CC, "evil\r\nInjected: yes@x.it", "y" * 500 + "@x.it"))
    (violation,) = check_submission(sub, LIMITS)
    assert "\n" not in violation.it and "\r" not in violation.en
    assert len(violation.en) < 400


def test_sender_mismatch_texts_name_both_addresses() -> None:
    (violation,) = check_submission(
        make_sub(mail_from="x@pec.example.it", authenticated="x@pec.example.it"), LIMITS
    )
    assert "x@pec.example.it" in violation.en and SENDER in violation.en
    assert "x@pec.example.it" in violation.it and SENDER in violation.it


# --- limits --------------------------------------------------------------------------------------


def test_limits_refuse_values_under_legal_minimums() -> None:
    with pytest.raises(ValueError, match="max_recipients"):
        SubmissionLimits(1000, MIN_RECIPIENTS_GUARANTEED - 1, MIN_RECIPIENTS_TIMES_SIZE)
    with pytest.raises(ValueError, match="max_recipients_times_size"):
        SubmissionLimits(1000, MIN_RECIPIENTS_GUARANTEED, MIN_RECIPIENTS_TIMES_SIZE - 1)
    with pytest.raises(ValueError, match="max_size"):
        SubmissionLimits(0, MIN_RECIPIENTS_GUARANTEED, MIN_RECIPIENTS_TIMES_SIZE)
    SubmissionLimits(1, MIN_RECIPIENTS_GUARANTEED, MIN_RECIPIENTS_TIMES_SIZE)


# --- address helpers -----------------------------------------------------------------------------


def test_parse_address_list() -> None:
    valid, invalid = parse_address_list(
        '=?utf-8?Q?Mario_Rossi?= <Mario@PEC.it>, "Rossi, M." <m@b.it>, (c) z@w.it (d),'
        " grp: a1@b.it, a2@b.it;, undisclosed-recipients:;, <@relay.it:q@w.it>,"
        ' "q q"@x.it, u@città.it, u@xn--citt-5qa.it, , bad, x@y, u@1.2.3.4, a@-b.it, a b@c.it'
    )
    assert valid == [
        "Mario@PEC.it",
        "m@b.it",
        "z@w.it",
        "a1@b.it",
        "a2@b.it",
        "q@w.it",
        '"q q"@x.it',
        "u@città.it",
        "u@xn--citt-5qa.it",
    ]
    assert invalid == ["bad", "x@y", "u@1.2.3.4", "a@-b.it", "a b@c.it"]


@pytest.mark.parametrize(
    "value",
    [
        "a@b@c.it",
        "@b.it",
        "a@",
        "a@.it",
        "a@b..it",
        "a.@b.it",
        "a@b.it>",
        "<a@b.it> trailing",
        "a@" + "x" * 64 + ".it",
        "x" * 65 + "@b.it",
        "a@[1.2.3.4]",
        'Mario "unterminated <a@b.it>',
        "(unbalanced a@b.it",
    ],
)
def test_parse_address_list_rejects(value: str) -> None:
    assert parse_address_list(value)[0] == []


def test_parse_address_list_empty() -> None:
    assert parse_address_list("") == ([], [])
    assert parse_address_list(" , ,") == ([], [])


def test_normalize_address() -> None:
    assert normalize_address("  <Mario.Rossi@PEC.It> ") == "mario.rossi@pec.it"
    assert normalize_address("a@b.it") == "a@b.it"
    assert normalize_address("") == ""


# --- fuzz ----------------------------------------------------------------------------------------


def _check_result(result: list[Violation]) -> None:
    assert [v.code for v in result] == [c for c in CODES if c in {v.code for v in result}]
    for violation in result:
        assert "\n" not in violation.it + violation.en
        assert "\r" not in violation.it + violation.en


@settings(max_examples=300, deadline=None)
@given(
    raw=st.binary(max_size=2000),
    mail_from=st.text(max_size=40),
    rcpt=st.lists(st.text(max_size=40), max_size=5),
    auth=st.none() | st.text(max_size=40),
)
def test_fuzz_random_bytes_never_raise(
    raw: bytes, mail_from: str, rcpt: list[str], auth: str | None
) -> None:
    _check_result(check_submission(Submission(raw, mail_from, tuple(rcpt), auth), LIMITS))


_SEED = make_raw(Bcc="", To=f'"A, B" <{TO}>, grp: x@y.it;', Cc=f"=?utf-8?Q?L?= <{CC}> (c)")


@settings(max_examples=300, deadline=None)
@given(
    edits=st.lists(
        st.tuples(
            st.integers(0, len(_SEED)),
            st.integers(0, 8),
            st.binary(max_size=6) | st.sampled_from([b"<", b">", b'"', b"(", b":", b";", b","]),
        ),
        max_size=6,
    )
)
def test_fuzz_mutated_message_never_raises(edits: list[tuple[int, int, bytes]]) -> None:
    raw = _SEED
    for pos, cut, insert in edits:
        raw = raw[:pos] + insert + raw[pos + cut :]
    _check_result(check_submission(make_sub(raw), LIMITS))


@settings(max_examples=300, deadline=None)
@given(value=st.text(alphabet=st.sampled_from(list('ab@.<>"(),:;\\ \t=?é-')), max_size=60))
def test_fuzz_parse_address_list(value: str) -> None:
    valid, invalid = parse_address_list(value)
    for addr in valid:
        assert addr.count("@") == 1
        assert parse_address_list(addr) == ([addr], [])
    assert all(item.strip() for item in invalid)
