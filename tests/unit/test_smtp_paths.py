"""The fast path for MAIL FROM / RCPT TO arguments gives aiosmtpd's own answer, or defers to it."""

from __future__ import annotations

import string

from aiosmtpd.smtp import SMTP
from hypothesis import given, settings
from hypothesis import strategies as st

from pecd.runtime.smtp import IntakeSMTP, simple_path


def _parsers(limit: int = 0) -> tuple[SMTP, IntakeSMTP]:
    stock = SMTP.__new__(SMTP)
    ours = IntakeSMTP.__new__(IntakeSMTP)
    stock.local_part_limit = ours.local_part_limit = limit
    return stock, ours


def _outcome(parser: SMTP, arg: str) -> object:
    """The parse; where the stock parser raises (on "<" and "0@[", for two), ours says "not an address"
    (None, None: aiosmtpd's 553 syntax reply) instead of a 451 and a traceback."""
    try:
        return parser._getaddr(arg)
    except Exception:
        return (None, None)


CASES = [
    "<a@b.it>",
    "<a@b.it> SIZE=10",
    "<a@b.it>  SIZE=10 BODY=8BITMIME",
    "<a@b.it> SIZE=10 ",
    "<a@b.it>\tSIZE=10",
    "<a@b.it>  ",
    "<a.b+tag@c.d.e>",
    "<A@B.IT>",
    "<o'neil@x.it>",
    "<a@b.it>SIZE=10",
    "<a@b.it> (comment) SIZE=1",
    '<"x y"@b.it>',
    "<a..b@c.it>",
    "<.a@b.it>",
    "<a.@b.it>",
    "<a@b.>",
    "<a@[192.0.2.1]>",
    "<@x,@y:a@b.it>",
    "<a@b.it",
    " <a@b.it>",
    "< a@b.it >",
    "a@b.it",
    "<>",
    "<à@b.it>",
    "<a@b.it>\n",
    "",
    "<",
    "0@[",
]


def test_known_arguments_match_aiosmtpd() -> None:
    stock, ours = _parsers()
    for arg in CASES:
        assert _outcome(ours, arg) == _outcome(stock, arg), arg


def test_common_forms_take_the_fast_path() -> None:
    assert simple_path("<a@b.it>") == ("a@b.it", "")
    assert simple_path("<a@b.it> SIZE=10") == ("a@b.it", "SIZE=10")
    assert simple_path('<"x y"@b.it>') is None  # quoted local part: the full parser
    assert simple_path("<a@b.it> (c) SIZE=1") is None  # a comment: the full parser


def test_local_part_limit_applies_on_the_fast_path() -> None:
    stock, ours = _parsers(limit=3)
    for arg in ("<abcd@b.it>", "<abc@b.it>"):
        assert ours._getaddr(arg) == stock._getaddr(arg)
    assert ours._getaddr("<abcd@b.it>") == (None, None)


_ALPHABET = string.ascii_letters[:6] + string.digits[:3] + "<>@.\"'()[]:, \t+-=_\\"


@settings(max_examples=1500, deadline=None)
@given(st.text(alphabet=_ALPHABET, max_size=30))
def test_any_argument_matches_aiosmtpd(arg: str) -> None:
    stock, ours = _parsers()
    assert _outcome(ours, arg) == _outcome(stock, arg)


@settings(max_examples=500, deadline=None)
@given(
    st.from_regex(
        r"<[a-z0-9.+_-]{1,12}@[a-z0-9.-]{1,12}>([ \t]{0,2}[A-Z=0-9 ]{0,12})?", fullmatch=True
    )
)
def test_plausible_paths_match_aiosmtpd(arg: str) -> None:
    stock, ours = _parsers()
    assert ours._getaddr(arg) == stock._getaddr(arg)
