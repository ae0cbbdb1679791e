"""The one grammar for sizes written by people (config limits, mailbox quotas): ``25M`` -> bytes."""

from __future__ import annotations

import re
from decimal import Decimal

__all__ = ["parse_size"]

_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmgt]?)(?:i?b)?\s*$", re.IGNORECASE)
_UNITS: dict[str, int] = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}


def parse_size(value: int | str) -> int:
    """Bytes from ``1048576``, ``"1048576"``, ``"500M"``, ``"1G"``, ``"2.5GB"``, ``"100 KiB"``.

    Units are binary (K = 1024, M = 1024², G = 1024³, T = 1024⁴), as for mail quotas, in either
    case; ``B`` and ``iB`` suffixes are optional, and white space may stand around the number and
    before the unit. Fractions are exact (decimal) and rounded down to whole bytes. A non-negative
    int is taken as bytes. Anything else raises ValueError ``not a size: …``.
    """
    if isinstance(value, int) and not isinstance(value, bool):
        if value < 0:
            raise ValueError(f"not a size: {value!r} (a size cannot be negative)")
        return value
    match = _SIZE_RE.match(value) if isinstance(value, str) else None
    if not match:
        raise ValueError(f"not a size: {value!r} (examples: 1048576, 500M, 1G, 2.5GB)")
    return int(Decimal(match.group(1)) * _UNITS[match.group(2).upper()])
