"""Modified UTF-7 for IMAP mailbox names (RFC 3501 5.1.3), total and strict.

pymap 0.36's ``modutf7_decode`` loops forever on an unterminated shift sequence (``&Jjo``: the
inner ``for`` finds no ``-`` and leaves the buffer unchanged, so the ``while`` never ends) and
its encoder writes a literal ``&`` unescaped right after an encoded run. ``install()`` puts the
functions of this module in place of pymap's, in every pymap module that imported them.

The decoder accepts exactly the strings the RFC allows and raises ``ModUtf7Error`` (a
``ValueError``) otherwise: bytes outside printable US-ASCII, an unterminated ``&`` run, a
base64 run that is empty (``&-`` is the only way to write ``&``), not in the modified alphabet,
with non-zero padding bits, or decoding to printable US-ASCII (which must be written directly),
UTF-16 that is not well formed (unpaired surrogates), and two adjacent encoded runs.
"""

from __future__ import annotations

import sys
from collections.abc import Callable

from pymap.parsing.exceptions import NotParseable

__all__ = ["ModUtf7Error", "decode", "encode", "install"]

_B64 = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+,"
_B64_VALUE = {c: i for i, c in enumerate(_B64)}
_AMP = 0x26
_DASH = 0x2D


class ModUtf7Error(ValueError):
    """The bytes are not a valid modified UTF-7 mailbox name."""


def _printable(code: int) -> bool:
    return 0x20 <= code <= 0x7E


def _decode_run(run: bytes) -> str:
    """One base64 run (between ``&`` and ``-``) to text."""
    bits = 0
    nbits = 0
    units: list[int] = []
    for c in run:
        value = _B64_VALUE.get(c)
        if value is None:
            raise ModUtf7Error(f"invalid character {chr(c)!r} in an encoded run")
        bits = (bits << 6) | value
        nbits += 6
        if nbits >= 16:
            nbits -= 16
            units.append((bits >> nbits) & 0xFFFF)
            bits &= (1 << nbits) - 1
    if nbits >= 6 or bits != 0:
        raise ModUtf7Error("an encoded run has leftover bits")
    if not units:
        raise ModUtf7Error("empty encoded run")
    out: list[str] = []
    i = 0
    while i < len(units):
        u = units[i]
        if 0xD800 <= u <= 0xDBFF:
            if i + 1 >= len(units) or not 0xDC00 <= units[i + 1] <= 0xDFFF:
                raise ModUtf7Error("unpaired UTF-16 surrogate")
            out.append(chr(0x10000 + ((u - 0xD800) << 10) + (units[i + 1] - 0xDC00)))
            i += 2
            continue
        if 0xDC00 <= u <= 0xDFFF:
            raise ModUtf7Error("unpaired UTF-16 surrogate")
        if _printable(u):
            raise ModUtf7Error("printable US-ASCII must not be encoded")
        out.append(chr(u))
        i += 1
    return "".join(out)


def decode(data: bytes | bytearray | memoryview) -> str:
    """The mailbox name that ``data`` encodes; ModUtf7Error when it is not valid."""
    raw = bytes(data)
    out: list[str] = []
    i = 0
    n = len(raw)
    after_run = False
    while i < n:
        c = raw[i]
        if not _printable(c):
            raise ModUtf7Error(f"byte 0x{c:02x} is not printable US-ASCII")
        if c != _AMP:
            out.append(chr(c))
            after_run = False
            i += 1
            continue
        end = raw.find(b"-", i + 1)
        if end < 0:
            raise ModUtf7Error("unterminated encoded run")
        if end == i + 1:
            out.append("&")
            after_run = False
        else:
            if after_run:
                raise ModUtf7Error("adjacent encoded runs")
            out.append(_decode_run(raw[i + 1 : end]))
            after_run = True
        i = end + 1
    return "".join(out)


def _encode_run(text: str) -> bytes:
    utf16 = text.encode("utf-16-be")
    out = bytearray()
    bits = 0
    nbits = 0
    for byte in utf16:
        bits = (bits << 8) | byte
        nbits += 8
        while nbits >= 6:
            nbits -= 6
            out.append(_B64[(bits >> nbits) & 0x3F])
        bits &= (1 << nbits) - 1
    if nbits:
        out.append(_B64[(bits << (6 - nbits)) & 0x3F])
    return bytes(out)


def encode(name: str) -> bytes:
    """``name`` in modified UTF-7."""
    out = bytearray()
    pending: list[str] = []

    def flush() -> None:
        if pending:
            out.append(_AMP)
            out.extend(_encode_run("".join(pending)))
            out.append(_DASH)
            pending.clear()

    for ch in name:
        code = ord(ch)
        if _printable(code):
            flush()
            out.extend(b"&-" if code == _AMP else bytes((code,)))
        else:
            pending.append(ch)
    flush()
    return bytes(out)


def _pymap_decode(data: bytes | bytearray | memoryview) -> str:
    # pymap's parsers only turn NotParseable into a BAD response; anything else would drop the
    # connection with an "unhandled server error".
    try:
        return decode(data)
    except ModUtf7Error as exc:
        raise NotParseable(memoryview(bytes(data)), b"CANNOT") from exc


def _pymap_encode(name: str) -> bytes:
    return encode(name)


_IMPORTERS = (
    "pymap.parsing.modutf7",
    "pymap.parsing.specials.mailbox",
    "pymap.parsing.command.auth",
    "pymap.parsing.response.specials",
    "pymap.backend.redis.mailbox",
)


def install() -> None:
    """Replace pymap's codec in every pymap module that holds a reference to it (idempotent).

    Modules not imported yet are imported first, so that a later import cannot bring the
    original functions back; the redis backend is only patched when already loaded (it needs
    the redis client).
    """
    import importlib

    replacements: dict[str, Callable[..., object]] = {
        "modutf7_decode": _pymap_decode,
        "modutf7_encode": _pymap_encode,
    }
    for name in _IMPORTERS:
        module = sys.modules.get(name)
        if module is None and not name.startswith("pymap.backend.redis"):
            module = importlib.import_module(name)
        if module is None:
            continue
        for attr, func in replacements.items():
            if hasattr(module, attr):
                setattr(module, attr, func)
