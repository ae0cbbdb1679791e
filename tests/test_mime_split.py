"""Splitting multipart bodies without compiling a pattern per boundary gives what the
boundary-specific patterns (RFC 2046 5.1.1 delimiters) gave."""

from __future__ import annotations

import re

from hypothesis import given, settings
from hypothesis import strategies as st

from pecd.pec import mime, smime

BOUNDARIES = ["abc", "a.b*c+(d)", "----=_Part_1", "abc--", "x y"]
PIECES = [
    "--{b}",
    "--{b}--",
    "--{b}  ",
    "--{b}\t--",
    "--{b}x",
    "--{b}\r",
    "--{b}--  ",
    "---{b}",
    " --{b}",
    "text",
    "",
    "\r",
    "--",
]


def _reference_parts(body: bytes, boundary: str) -> list[bytes] | None:
    delim = re.compile(
        rb"(?:^|\r?\n)--" + re.escape(boundary.encode()) + rb"(--)?[ \t]*(?=\r?\n|$)"
    )
    parts: list[bytes] = []
    start: int | None = None
    for m in delim.finditer(body):
        if start is not None:
            parts.append(body[start : m.start()])
        if m.group(1):
            return parts
        nl = body.find(b"\n", m.end())
        start = len(body) if nl < 0 else nl + 1
    if start is None:
        return None
    parts.append(body[start:])
    return parts


def _reference_delims(body: bytes, boundary: str) -> list[tuple[int, int, bool]]:
    delim = re.compile(rb"^--" + re.escape(boundary.encode()) + rb"(--)?[ \t]*\r?$", re.MULTILINE)
    return [(m.start(), m.end(), bool(m.group(1))) for m in delim.finditer(body)]


def _all_delims(body: bytes, boundary: str) -> list[tuple[int, int, bool]]:
    found = []
    pos = 0
    while (d := smime._delimiter(body, boundary.encode(), pos)) is not None:
        found.append(d)
        pos = d[1] + 1
    return found


bodies = st.tuples(
    st.sampled_from(BOUNDARIES),
    st.lists(
        st.tuples(st.sampled_from(PIECES), st.sampled_from(["\r\n", "\n", "\r", ""])),
        max_size=12,
    ),
)


@settings(max_examples=400, deadline=None)
@given(bodies)
def test_split_multipart_matches_the_boundary_pattern(
    case: tuple[str, list[tuple[str, str]]],
) -> None:
    boundary, lines = case
    body = "".join(p.format(b=boundary) + end for p, end in lines).encode()
    got = mime.split_multipart(memoryview(body), boundary)
    want = _reference_parts(body, boundary)
    assert (None if got is None else [bytes(p) for p in got]) == want
    assert _all_delims(body, boundary) == _reference_delims(body, boundary)
