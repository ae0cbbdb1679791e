"""pecd.pec.address (the one address normaliser) and pecd.pec.size (the one size grammar)."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from pecd.pec import checks
from pecd.pec.address import (
    domain_of,
    normalize_address,
    normalize_domain,
    valid_address,
    valid_domain,
)
from pecd.pec.size import parse_size

# --- addresses ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("given_", "normal"),
    [
        ("a@b.it", "a@b.it"),
        ("  <Mario.Rossi@PEC.It> ", "mario.rossi@pec.it"),
        ("< Mario@Pec.It >", "mario@pec.it"),
        ("Mario@Pec.It", "mario@pec.it"),  # the local part too: PEC mailboxes ignore case
        ("", ""),  # the SMTP null path stays empty
        ("<>", ""),
        ("<a@b.it", "<a@b.it"),  # unbalanced: left for the validity check to refuse
        ("<<a@b.it>>", "<a@b.it>"),  # only one enclosing pair goes
        ("Mario+Tag@Pec.It", "mario+tag@pec.it"),  # nothing else is rewritten
    ],
)
def test_normalize_address(given_: str, normal: str) -> None:
    assert normalize_address(given_) == normal


@given(st.text(max_size=40))
def test_normalize_address_is_idempotent(text: str) -> None:
    once = normalize_address(text)
    assert normalize_address(once) == once


def test_checks_uses_the_same_normaliser() -> None:
    assert checks.normalize_address is normalize_address


@pytest.mark.parametrize(
    ("given_", "domain"),
    [
        ("a@Pec.It", "pec.it"),
        ("<a@PEC.it.>", "pec.it"),  # the root dot
        ('"a@b"@pec.it', "pec.it"),  # split at the last @
        ("no-at-sign", ""),
        ("", ""),
    ],
)
def test_domain_of(given_: str, domain: str) -> None:
    assert domain_of(given_) == domain


def test_normalize_domain() -> None:
    assert normalize_domain(" PEC.Example.It. ") == "pec.example.it"
    assert normalize_domain("pec.it") == "pec.it"


@pytest.mark.parametrize(
    "address",
    [
        "mario.rossi@pec.it",
        "a@b.it",
        "o'brien+x@pec.example.it",
        '"mario rossi"@pec.it',
        "josé@pec.it",  # UTF-8 local part
        "a@perché.it",  # IDN
        "a@xn--perch-fsa.it",  # the same in punycode
        "a@pec.localhost",
    ],
)
def test_valid_address(address: str) -> None:
    assert valid_address(address)


@pytest.mark.parametrize(
    "address",
    [
        "",
        "mario",
        "mario@",
        "@pec.it",
        "a@@pec.it",
        "a@b@pec.it",
        "mario@localhost",  # one label
        "mario@pec.123",  # numeric top label
        "mario rossi@pec.it",
        "a..b@pec.it",
        ".a@pec.it",
        "a.@pec.it",
        "a@-pec.it",
        "a@pec-.it",
        "a@pec..it",
        "a@[192.0.2.1]",  # domain literal
        "<a@pec.it>",  # not normalised
        "x" * 65 + "@pec.it",  # local part over 64 octets
        "a@" + ".".join(["x" * 63] * 4) + ".it",  # domain over 253 octets
    ],
)
def test_invalid_address(address: str) -> None:
    assert not valid_address(address)


def test_valid_domain() -> None:
    assert valid_domain("pec.example.it")
    assert valid_domain("x" * 63 + ".it")
    assert not valid_domain("x" * 64 + ".it")
    assert not valid_domain("localhost")
    assert not valid_domain("")
    assert not valid_domain("a_b.it")


# --- sizes --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "size"),
    [
        ("1048576", 1048576),
        ("0", 0),
        ("500M", 500 * 2**20),
        ("500m", 500 * 2**20),
        ("1G", 2**30),
        ("2.5GB", int(2.5 * 2**30)),
        ("100KiB", 100 * 1024),
        ("10 MiB", 10 * 2**20),
        ("10mb", 10 * 2**20),
        (" 3 T ", 3 * 2**40),
        ("12B", 12),
        ("1.5", 1),
        ("0.1K", 102),  # decimal, rounded down
    ],
)
def test_parse_size(text: str, size: int) -> None:
    assert parse_size(text) == size


def test_parse_size_takes_ints() -> None:
    assert parse_size(0) == 0
    assert parse_size(25 * 2**20) == 25 * 2**20


@pytest.mark.parametrize(
    "value", ["", "M", "-1G", "1X", "1.2.3M", "1 G B", "lots", "1e9", -1, True, 1.5, None]
)
def test_parse_size_refuses(value: object) -> None:
    with pytest.raises(ValueError, match=r"^not a size: "):
        parse_size(value)  # type: ignore[arg-type]


@given(st.integers(min_value=0, max_value=2**50), st.sampled_from(["", "K", "M", "G"]))
def test_parse_size_round_trip(n: int, unit: str) -> None:
    factor = {"": 1, "K": 2**10, "M": 2**20, "G": 2**30}[unit]
    assert parse_size(f"{n}{unit}") == n * factor
