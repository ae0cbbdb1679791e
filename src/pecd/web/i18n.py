"""The webmail's two languages: Italian, the source language (every string is written in Italian
and is its own key), and English, a dictionary each page module fills at import.

    i18n.register({"Posta in arrivo": "Inbox"})
    i18n.translate("en", "Posta in arrivo")  # "Inbox"

A string with no English entry is shown in Italian (a missing translation is visible, never an
error). :func:`negotiate` picks the language from an ``Accept-Language`` header.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Final

__all__ = ["DEFAULT", "LANGS", "conflicts", "negotiate", "register", "translate"]

LANGS: Final = ("it", "en")
DEFAULT: Final = "it"

_EN: dict[str, str] = {}
#: (Italian, the English kept, the English refused) for every conflicting registration.
conflicts: list[tuple[str, str, str]] = []


def register(strings: Mapping[str, str]) -> None:
    """Add Italian -> English pairs. A string registered again with another translation keeps
    the first one and is listed in :data:`conflicts` (two pages disagreeing on a string is a
    mistake a test catches, not a reason for the webmail not to start)."""
    for it, en in strings.items():
        known = _EN.setdefault(it, en)
        if known != en:
            conflicts.append((it, known, en))


def translate(lang: str, text: str) -> str:
    """``text`` (Italian) in ``lang``."""
    if lang == "en":
        return _EN.get(text, text)
    return text


def negotiate(accept_language: str | None) -> str:
    """The first of :data:`LANGS` the header asks for, by quality then order; else
    :data:`DEFAULT`. Bounded: a hostile header costs at most its first 64 entries."""
    if not accept_language:
        return DEFAULT
    best: tuple[float, int, str] | None = None
    for index, item in enumerate(accept_language[:1024].split(",")[:64]):
        tag, _, params = item.strip().partition(";")
        primary = tag.strip().lower().split("-", 1)[0]
        if primary not in LANGS and primary != "*":
            continue
        quality = 1.0
        for param in params.split(";"):
            name, _, value = param.strip().partition("=")
            if name.strip().lower() == "q":
                try:
                    quality = float(value)
                except ValueError:
                    quality = 0.0
        if not 0.0 < quality <= 1.0:
            continue
        lang = DEFAULT if primary == "*" else primary
        candidate = (-quality, index, lang)
        if best is None or candidate < best:
            best = candidate
    return DEFAULT if best is None else best[2]
